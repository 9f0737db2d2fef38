"""DICOM SEG out: segments named by structure (never by list position), SNOMED CT codes,
laterality, the algorithm and model version, empty structures left out, geometry exact."""

from __future__ import annotations

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.uid import generate_uid
from test_rtstruct import FEET_FIRST, SHAPE, make_label

from contourcl.data.dicom_series import write_ct_series
from contourcl.data.labels import STORED_LABELS
from contourcl.data.seg import read_seg, write_seg
from contourcl.errors import UnknownLabelError


@pytest.fixture
def series(tmp_path):
    folder = tmp_path / "ct"
    vol = np.full(SHAPE, -1000, dtype=np.int16)
    vol[2:38, 4:52, :] = 40
    write_ct_series(vol, FEET_FIRST, folder, patient_position="FFS", study_uid=generate_uid())
    return folder


def test_segments_are_named_by_structure_and_coded(series, tmp_path):
    label = make_label(FEET_FIRST)
    label[label == 2] = 0  # SpinalCord empty too: the structures after it must keep their names
    out = write_seg(label, FEET_FIRST, dict(STORED_LABELS), series, tmp_path / "seg.dcm",
                    algorithm_name="ContourCL oar", algorithm_version="18eb94ba-35b2fd")
    seg = hd.seg.segread(str(out))
    names = {int(n): seg.get_segment_description(n).segment_label for n in seg.segment_numbers}
    assert sorted(names.values()) == sorted(["Brainstem", "Parotid_R", "Parotid_L", "Mandible", "Esophagus", "GTV"])
    raw = pydicom.dcmread(str(out))
    by_name = {item.SegmentLabel: item for item in raw.SegmentSequence}
    # SNOMED CT, as the DICOM standard codes them (written out here, not read from the module)
    assert by_name["Parotid_R"].SegmentedPropertyTypeCodeSequence[0].CodeValue == "45289007"
    assert by_name["Parotid_R"].AnatomicRegionSequence[0].AnatomicRegionModifierSequence[0].CodeValue == "24028007"  # right
    assert by_name["Parotid_L"].AnatomicRegionSequence[0].AnatomicRegionModifierSequence[0].CodeValue == "7771000"  # left
    assert by_name["Mandible"].SegmentedPropertyTypeCodeSequence[0].CodeValue == "91609006"
    assert by_name["Brainstem"].SegmentedPropertyCategoryCodeSequence[0].CodeValue == "123037004"
    for item in raw.SegmentSequence:
        assert item.SegmentAlgorithmType == "AUTOMATIC"
        assert item.SegmentedPropertyTypeCodeSequence[0].CodingSchemeDesignator == "SCT"
        assert item.SegmentAlgorithmName == "ContourCL oar"
        assert item.SegmentationAlgorithmIdentificationSequence[0].AlgorithmVersion == "18eb94ba-35b2fd"
    # every voxel back where it was, under its own name
    back, numbers = read_seg(out, series)
    for name, number in numbers.items():
        np.testing.assert_array_equal(back == number, label == STORED_LABELS[name], err_msg=name)
    assert raw.FrameOfReferenceUID == pydicom.dcmread(str(next(series.iterdir()))).FrameOfReferenceUID


def test_an_empty_label_writes_nothing_and_an_uncoded_structure_is_refused(series, tmp_path):
    assert write_seg(np.zeros(SHAPE, np.uint8), FEET_FIRST, dict(STORED_LABELS), series, tmp_path / "seg.dcm") is None
    assert not (tmp_path / "seg.dcm").exists()
    with pytest.raises(UnknownLabelError, match="Thyroid"):
        write_seg(np.zeros(SHAPE, np.uint8), FEET_FIRST, {"Thyroid": 1}, series, tmp_path / "seg.dcm")
