"""What a next-sample answer carries of the image's series (issue 33, item 1): the ids the OHIF
viewer's MONAI Label panel needs to open the study (``StudyInstanceUIDs=<StudyInstanceUID>``).

Through the real server and a DICOMweb PACS: ``tests/integration/test_dicomweb.py``.
"""

from __future__ import annotations

import nibabel as nib
import numpy as np

from contourcl.data.dicom_series import write_ct_series
from contourcl.serving.dicomweb import study_ids
from contourcl.serving.series import ingest_series, read_registry


def test_a_series_image_names_its_study_and_a_nifti_image_nothing(tmp_path):
    studies = tmp_path / "studies"
    affine = np.diag([-1.0, -1.0, 2.5, 1.0])
    write_ct_series(np.zeros((8, 6, 5)), affine, studies / "patient_a" / "ct", patient_id="PAT-A",
                    study_uid="1.2.826.0.1.3680043.8.498.1", series_uid="1.2.826.0.1.3680043.8.498.2", study_date="20260315")
    nib.save(nib.Nifti1Image(np.zeros((8, 6, 5), np.int16), affine), str(studies / "plain.nii.gz"))
    ingest_series(studies)
    (image_id,) = read_registry(studies)["images"]
    ids = study_ids(studies, image_id)
    assert ids == {"StudyInstanceUID": "1.2.826.0.1.3680043.8.498.1", "SeriesInstanceUID": "1.2.826.0.1.3680043.8.498.2",
                   "PatientID": "PAT-A", "StudyDate": "20260315", "StudyTime": "120000", "Modality": "CT"}, ids
    url = "http://pacs.example:8042/dicom-web/"
    assert study_ids(studies, image_id, url)["RetrieveURL"] == (
        "http://pacs.example:8042/dicom-web/studies/1.2.826.0.1.3680043.8.498.1/series/1.2.826.0.1.3680043.8.498.2")
    assert study_ids(studies, "plain") == {} and study_ids(studies, "no_such_image") == {}
