"""DICOM in, RT Structure Set out and back, through the ``contourcl`` commands a user runs."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pydicom
import pytest

from contourcl.cli import main as cli_main
from contourcl.data.dicom_series import read_series_geometry, write_ct_series
from contourcl.data.labels import from_model
from contourcl.data.phantom import make_phantom
from contourcl.testing import REPO

MODEL = REPO / "apps" / "radonc" / "model" / "synthetic" / "oar.pt"


def test_contour_a_dicom_series_to_rtstruct_and_import_it_back(tmp_path, capsys):
    ct, _, affine = make_phantom(3, shape=(96, 80, 12), spacing=(4.0, 4.0, 6.0))
    series = tmp_path / "series"
    write_ct_series(ct, affine, series, patient_id="PHANTOM3")

    rc = cli_main(["contour", str(series), "--model", str(MODEL), "--out", str(tmp_path / "pred.nii.gz"), "--rtstruct", str(tmp_path / "rs.dcm"),
                  "--seg", str(tmp_path / "seg.dcm")])
    assert rc == 0, capsys.readouterr().err
    said = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert said["rtstruct"] == str(tmp_path / "rs.dcm")
    pred = nib.load(tmp_path / "pred.nii.gz")
    # on the series' own grid (slices ordered along the series' normal), the same voxels as the CT
    grid = read_series_geometry(series).affine
    assert pred.shape == ct.shape and np.allclose(pred.affine, grid, atol=1e-3)
    assert np.allclose(np.abs(grid[:3, :3]), np.abs(affine[:3, :3])) and np.allclose(grid @ [0, 0, ct.shape[2] - 1, 1], affine @ [0, 0, 0, 1])

    rs = pydicom.dcmread(tmp_path / "rs.dcm")
    assert rs.Modality == "RTSTRUCT" and rs.PatientID == "PHANTOM3" and rs.ApprovalStatus == "UNAPPROVED"
    names = {roi.ROIName for roi in rs.StructureSetROISequence}
    predicted = {name for name, v in said["labels"].items() if (np.asanyarray(pred.dataobj) == v).any()}
    assert names == predicted and names, "every predicted structure, and only those, is in the RTSTRUCT"
    assert {o.RTROIInterpretedType for o in rs.RTROIObservationsSequence} == {"ORGAN"}
    seg = pydicom.dcmread(tmp_path / "seg.dcm")
    assert seg.Modality == "SEG" and {item.SegmentLabel for item in seg.SegmentSequence} == names, "the SEG holds the same structures, by name"

    rc = cli_main(["import-rtstruct", str(tmp_path / "rs.dcm"), str(series), "--out", str(tmp_path / "back.nii.gz")])
    assert rc == 0
    said = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert said["unmapped"] == [] and set(said["mapped"].values()) == names
    back = nib.load(tmp_path / "back.nii.gz")
    assert np.allclose(back.affine, pred.affine, atol=1e-3)
    assert np.array_equal(np.asanyarray(back.dataobj), from_model(np.asanyarray(pred.dataobj), "oar")), "label -> RTSTRUCT -> label is exact"


def test_rtstruct_needs_a_series_and_something_to_write(tmp_path, capsys):
    assert cli_main(["contour", str(REPO / "sample-data" / "synthetic_hn_000.nii.gz"), "--model", str(MODEL), "--rtstruct", str(tmp_path / "x.dcm")]) == 2
    assert "needs a DICOM series folder" in capsys.readouterr().err
    assert cli_main(["contour", str(REPO / "sample-data" / "synthetic_hn_000.nii.gz"), "--model", str(MODEL)]) == 2
    assert "nothing to write" in capsys.readouterr().err


def test_evaluate_on_dicom_series_with_their_rtstructs(tmp_path, capsys):
    """``contourcl evaluate --data`` a folder of patients as a PACS exports them (CT series + the
    clinician's RTSTRUCT) gives the figures of the same patients as NIfTI files."""
    from contourcl.data.labels import STORED_LABELS
    from contourcl.data.rtstruct import write_rtstruct

    dicom, nifti = tmp_path / "dicom", tmp_path / "nifti"
    (nifti / "labels" / "final").mkdir(parents=True)
    for seed in (5, 6):
        ct, truth, affine = make_phantom(seed, shape=(96, 80, 12), spacing=(4.0, 4.0, 6.0))
        series = dicom / f"patient{seed}"
        write_ct_series(ct, affine, series / "CT", patient_id=f"P{seed}")
        write_rtstruct(truth, affine, STORED_LABELS, series / "CT", series / "RS.dcm")
        nib.save(nib.Nifti1Image(ct.astype(np.int16), affine), str(nifti / f"patient{seed}.nii.gz"))
        nib.save(nib.Nifti1Image(truth.astype(np.uint8), affine), str(nifti / "labels" / "final" / f"patient{seed}.nii.gz"))
    figures = {}
    for name, folder in (("dicom", dicom), ("nifti", nifti)):
        pictures = ["--overlays", str(tmp_path / "overlays")] if name == "nifti" else []
        assert cli_main(["evaluate", str(MODEL), "--data", str(folder), "--json", str(tmp_path / f"{name}.json"), *pictures]) == 0, \
            capsys.readouterr().err
        figures[name] = json.loads((tmp_path / f"{name}.json").read_text())
    assert set(figures["dicom"]["cases"]) == {"patient5", "patient6"}
    for case, per in figures["nifti"]["cases"].items():
        for structure, metrics in per.items():
            assert figures["dicom"]["cases"][case][structure]["dice"] == pytest.approx(metrics["dice"], abs=1e-6, nan_ok=True), (case, structure)
    # one picture per structure the cases contour: its best, median and worst case
    contoured = {s for per in figures["nifti"]["cases"].values() for s, m in per.items() if not np.isnan(m["dice"])}
    assert contoured and {p.name for p in (tmp_path / "overlays").glob("*.png")} == {f"oar-{s}.png" for s in contoured}
