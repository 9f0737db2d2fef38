"""A studies folder of DICOM CT series read in-process (:func:`contourcl.serving.series.ingest_series`):
each series folder becomes an image once, a series that is not a usable CT is named with why, a
plan's RTSTRUCT becomes the final label. Through the real server: ``tests/integration/test_dicom_studies.py``.
"""

from __future__ import annotations

import json
import os

import nibabel as nib
import numpy as np

from contourcl.data.dicom_series import read_series_geometry
from contourcl.data.labels import STORED_LABELS, values_in
from contourcl.serving.series import ingest_series, refused_series
from contourcl.testing import write_dicom_studies


def test_series_become_images_once_and_bad_ones_are_named(tmp_path):
    studies = write_dicom_studies(tmp_path)
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
