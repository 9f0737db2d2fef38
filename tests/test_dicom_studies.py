"""A studies folder of DICOM CT series, served by the real MONAI Label server.

Each series folder becomes an image; a series that is not a usable CT is named in /info/ with
why; the clinician's final label is written back as an RTSTRUCT and a SEG on the series' own
grid, and reads back voxel for voxel.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from monailabel.client import MONAILabelClient

from conftest import start_monailabel, stop_process, wait_until_serving
from contourcl.data.dicom_series import read_series_geometry, write_ct_series
from contourcl.data.labels import STORED_LABELS, from_model, values_in
from contourcl.data.phantom import make_phantom
from contourcl.data.rtstruct import read_rtstruct, to_series_grid, write_rtstruct
from contourcl.data.seg import read_seg
from contourcl.serving.series import ingest_series, refused_series

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.timeout(600)


def _studies(root: Path) -> Path:
    studies = root / "studies"
    for seed, name, position in ((11, "patient_a", "HFS"), (12, "patient_b", "FFS")):
        ct, _, affine = make_phantom(seed, shape=(96, 80, 14), spacing=(4.0, 4.0, 5.0))
        write_ct_series(ct, affine, studies / name / "CT", patient_id=name, patient_position=position)
    # patient_c: an approved plan's export, the CT series and its RTSTRUCT (ROI names as a planning
    # system writes them); it becomes a final label
    ct, truth, affine = make_phantom(14, shape=(96, 80, 14), spacing=(4.0, 4.0, 5.0))
    write_ct_series(ct, affine, studies / "patient_c" / "CT", patient_id="patient_c")
    names = {"Parotid R": 3, "Mandible": 5, "BODY": 99}
    plan = np.zeros_like(truth)
    plan[truth == 3], plan[truth == 5], plan[(truth == 0) & (ct > -500)] = 3, 5, 99
    write_rtstruct(plan, affine, names, studies / "patient_c" / "CT", studies / "patient_c" / "RS_plan.dcm")
    ct, _, affine = make_phantom(13, shape=(96, 80, 14), spacing=(4.0, 4.0, 5.0))
    files = write_ct_series(ct, affine, studies / "patient_gap")
    files[7].unlink()  # a missing slice: not a regular grid
    return studies


def test_series_become_images_once_and_bad_ones_are_named(tmp_path):
    studies = _studies(tmp_path)
    found = ingest_series(studies)
    assert set(found) == {"patient_a", "patient_b", "patient_c"}
    # the plan's RTSTRUCT is patient_c's final label: its parotid and mandible, in the stored numbering
    final = studies / "labels" / "final" / "patient_c.nii.gz"
    assert final.is_file() and not (studies / "labels" / "final" / "patient_a.nii.gz").exists()
    stored = np.asanyarray(nib.load(final).dataobj)
    image = nib.load(studies / "patient_c.nii.gz")
    assert stored.shape == image.shape and np.allclose(nib.load(final).affine, image.affine, atol=1e-4)
    assert values_in(stored) == {0, STORED_LABELS["Parotid_R"], STORED_LABELS["Mandible"]}
    assert "BODY" in (studies / ".contourcl" / "series.json").read_text()  # the unmapped ROI is named
    assert (studies / "patient_a.nii.gz").is_file() and not (studies / "patient_gap.nii.gz").exists()
    registry = (studies / ".contourcl" / "series.json").read_text()
    assert "patient_gap" in registry
    before = os.stat(studies / "patient_a.nii.gz").st_mtime_ns
    import contourcl.serving.series as series_module

    def no_reading(folder):
        raise AssertionError(f"{folder} was read again, though none of its files changed")

    original = series_module.list_series
    series_module.list_series = no_reading
    try:
        again = ingest_series(studies)  # unchanged folders are not read, their series not written again
    finally:
        series_module.list_series = original
    assert again == found and os.stat(studies / "patient_a.nii.gz").st_mtime_ns == before
    assert "patient_gap" in json.dumps(refused_series(studies))  # the refused one is still named
    array = np.asanyarray(nib.load(studies / "patient_a.nii.gz").dataobj)
    assert array.shape == read_series_geometry(studies / "patient_a").shape


def test_server_on_dicom_series_exports_the_final_label(tmp_path):
    studies = _studies(tmp_path)
    log = tmp_path / "server.log"
    proc, url = start_monailabel(REPO / "apps" / "radonc", studies, {"models": "oar", "weights": "synthetic", "skip_trainers": "true",
                                                                     "skip_strategies": "true"}, log, cwd=tmp_path)
    try:
        wait_until_serving(proc, url, log)
        client = MONAILabelClient(url, tmpdir=str(tmp_path))
        info = client.info()
        reasons = [v for k, v in info["refused_series"].items() if k.startswith("patient_gap")]
        assert len(reasons) == 1 and "gap" in reasons[0], info["refused_series"]
        image_id = client.next_sample("random", {})["id"]
        assert image_id in ("patient_a", "patient_b")  # patient_c has a final label (from its RTSTRUCT)

        result_file, params = client.infer("oar", image_id, {})
        image = nib.load(studies / f"{image_id}.nii.gz")
        pred = nib.load(result_file)
        assert pred.shape == image.shape and np.allclose(pred.affine, image.affine, atol=1e-4)

        # the clinician accepts the contours: submitted as the final label
        accepted = from_model(np.asanyarray(pred.dataobj), "oar").astype(np.uint8)
        assert accepted.any()
        label_file = tmp_path / "accepted.nii.gz"
        nib.save(nib.Nifti1Image(accepted, image.affine), str(label_file))
        client.save_label(image_id, str(label_file), tag="final", params={})

        out = studies / ".contourcl" / "dicom" / image_id
        rtstruct = next(out.glob("RTSTRUCT_final_*.dcm"))
        seg = next(out.glob("SEG_final_*.dcm"))
        series = studies / image_id
        geo = read_series_geometry(series)
        expected = to_series_grid(accepted, image.affine, geo)
        back, mapped, unmapped = read_rtstruct(rtstruct, series, STORED_LABELS)
        np.testing.assert_array_equal(back, expected)
        rs = pydicom.dcmread(str(rtstruct))
        assert rs.StudyInstanceUID == geo.study_uid and rs.ApprovalStatus == "UNAPPROVED"
        refs = rs.ReferencedFrameOfReferenceSequence[0].RTReferencedStudySequence[0].RTReferencedSeriesSequence[0]
        assert {i.ReferencedSOPInstanceUID for i in refs.ContourImageSequence} == set(geo.sop_instance_uids)
        assert {r.ROIGenerationAlgorithm for r in rs.StructureSetROISequence} == {"SEMIAUTOMATIC"}  # the clinician reviewed it
        seg_back, numbers = read_seg(seg, series)
        for name, number in numbers.items():
            np.testing.assert_array_equal(seg_back == number, expected == STORED_LABELS[name], err_msg=name)
        assert set(numbers) == {n for n, v in STORED_LABELS.items() if (accepted == v).any()}
        # contourcl evaluate --data <studies> finds the series image with its final label
        from contourcl.data.datasets import labeled_cases
        assert sorted(c["id"] for c in labeled_cases(studies, "oar")) == sorted([image_id, "patient_c"])
    finally:
        stop_process(proc)
