"""A studies folder of DICOM CT series, served by the real MONAI Label server.

Each series folder becomes an image; a series that is not a usable CT is named in /info/ with
why; the clinician's final label is written back as an RTSTRUCT and a SEG on the series' own
grid, and reads back voxel for voxel. The folder's reading in-process:
``tests/unit/test_series_ingest.py``.
"""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pydicom
import pytest
from monailabel.client import MONAILabelClient

from contourcl.data.dicom_series import read_series_geometry
from contourcl.data.labels import STORED_LABELS, from_model
from contourcl.data.rtstruct import read_rtstruct, to_series_grid
from contourcl.data.seg import read_seg
from contourcl.testing import REPO, start_monailabel, stop_process, wait_until_serving, write_dicom_studies

pytestmark = pytest.mark.timeout(600)


def test_server_on_dicom_series_exports_the_final_label(tmp_path):
    studies = write_dicom_studies(tmp_path)
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
