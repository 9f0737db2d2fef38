"""DICOM SEG out: segments named by structure (never by list position), SNOMED CT codes,
laterality, the algorithm and model version, empty structures left out, geometry exact."""

from __future__ import annotations

import json
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.uid import generate_uid
from skimage.color import lab2rgb
from test_rtstruct import FEET_FIRST, SHAPE, make_label

from contourcl.data.dicom_series import read_series_geometry, write_ct_series
from contourcl.data.labels import STORED_LABELS
from contourcl.data.rtstruct import DEFAULT_COLORS
from contourcl.data.seg import InvalidSegError, read_seg, write_seg
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
    # each segment's colour is the RTSTRUCT's (sRGB, DEFAULT_COLORS), in CIELab (OHIF warns and picks its own without one)
    for name, item in by_name.items():
        scaled = np.asarray(item.RecommendedDisplayCIELabValue, float)  # PS3.3 C.10.7.1.1: L* 0..100, a*, b* -128..127 on 0..65535
        lab = [scaled[0] * 100 / 65535, scaled[1] * 255 / 65535 - 128, scaled[2] * 255 / 65535 - 128]
        rgb = lab2rgb(np.array([[lab]]))[0, 0] * 255
        np.testing.assert_allclose(rgb, DEFAULT_COLORS[name], atol=2, err_msg=name)
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


# -- a SEG from elsewhere (a viewer's export): frames placed by what their own attributes agree on --
def _written(series, tmp_path):
    label = make_label(FEET_FIRST)
    out = write_seg(label, FEET_FIRST, dict(STORED_LABELS), series, tmp_path / "seg.dcm")
    return label, pydicom.dcmread(str(out))


def _save(ds, tmp_path, name):
    path = tmp_path / name
    ds.save_as(str(path))
    return path


def _same(back, numbers, label):
    for name, number in numbers.items():
        np.testing.assert_array_equal(back == number, label == STORED_LABELS[name], err_msg=name)


def test_frames_are_placed_by_reference_or_position_when_one_is_missing(series, tmp_path):
    label, ds = _written(series, tmp_path)
    assert all("PlanePositionSequence" in f and "DerivationImageSequence" in f for f in ds.PerFrameFunctionalGroupsSequence)
    no_position = pydicom.dcmread(str(tmp_path / "seg.dcm"))
    for item in no_position.PerFrameFunctionalGroupsSequence:
        del item.PlanePositionSequence  # as cornerstone3D's export wrote them for a while (its PR #2611)
    _same(*read_seg(_save(no_position, tmp_path, "no_position.dcm"), series), label)
    no_reference = pydicom.dcmread(str(tmp_path / "seg.dcm"))
    for item in no_reference.PerFrameFunctionalGroupsSequence:
        del item.DerivationImageSequence
    _same(*read_seg(_save(no_reference, tmp_path, "no_reference.dcm"), series), label)


def test_a_seg_whose_frames_contradict_themselves_is_refused(series, tmp_path):
    """A writer that puts each frame's pixels under the reversed slice's reference (a flip head to
    foot) while the plane positions stay: the frames contradict themselves, nothing is placed."""
    label, ds = _written(series, tmp_path)
    uids = list(read_series_geometry(series).sop_instance_uids)  # in slice order
    for f in ds.PerFrameFunctionalGroupsSequence:
        source = f.DerivationImageSequence[0].SourceImageSequence[0]
        source.ReferencedSOPInstanceUID = uids[len(uids) - 1 - uids.index(source.ReferencedSOPInstanceUID)]
    with pytest.raises(InvalidSegError, match="contradicts itself"):
        read_seg(_save(ds, tmp_path, "flipped.dcm"), series)


def test_a_seg_off_the_series_or_malformed_is_refused_naming_why(series, tmp_path):
    label, ds = _written(series, tmp_path)
    shifted = pydicom.dcmread(str(tmp_path / "seg.dcm"))
    for item in shifted.PerFrameFunctionalGroupsSequence:
        del item.DerivationImageSequence
        pos = [float(v) for v in item.PlanePositionSequence[0].ImagePositionPatient]
        item.PlanePositionSequence[0].ImagePositionPatient = [pos[0], pos[1], pos[2] + 1.0]  # between slices
    with pytest.raises(InvalidSegError, match="on no slice"):
        read_seg(_save(shifted, tmp_path, "shifted.dcm"), series)
    turned = pydicom.dcmread(str(tmp_path / "seg.dcm"))
    turned.SharedFunctionalGroupsSequence[0].PlaneOrientationSequence[0].ImageOrientationPatient = [0, 1, 0, 0, 0, -1]
    with pytest.raises(InvalidSegError, match="oriented"):
        read_seg(_save(turned, tmp_path, "turned.dcm"), series)
    neither = pydicom.dcmread(str(tmp_path / "seg.dcm"))
    for item in neither.PerFrameFunctionalGroupsSequence:
        del item.DerivationImageSequence
        del item.PlanePositionSequence
    with pytest.raises(InvalidSegError, match="neither"):
        read_seg(_save(neither, tmp_path, "neither.dcm"), series)
    broken = pydicom.dcmread(str(tmp_path / "seg.dcm"))
    del broken.PerFrameFunctionalGroupsSequence[0].SegmentIdentificationSequence
    with pytest.raises(InvalidSegError):
        read_seg(_save(broken, tmp_path, "broken.dcm"), series)
    (tmp_path / "garbage.dcm").write_bytes(b"DICM" * 100)
    with pytest.raises(InvalidSegError, match="not a (readable )?DICOM SEG"):
        read_seg(tmp_path / "garbage.dcm", series)


FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "ohif-seg"


@pytest.mark.parametrize("name", ["hfs", "ffs"])
def test_a_seg_exported_by_ohif_is_read_where_it_was_drawn(name):
    """SEGs made by OHIF's own *Export DICOM SEG* (MONAI Label 0.8.5's OHIF, dcmjs; made by this
    project, tests/fixtures/ohif-seg/README.md) from the labelmap ``oar_seg`` drew in MONAI Label
    mode, on a head-first and a feet-first series: every structure comes back voxel for voxel
    where it was drawn (the frames' references, positions and pixels agree; no flip)."""
    drawn = np.load(FIXTURES / f"drawn-{name}-monai-label-mode.npz")
    structures = json.loads(str(drawn["names"]))
    back, numbers = read_seg(FIXTURES / f"seg-{name}-monai-label-mode.dcm", FIXTURES / f"series-{name}")
    present = {n for n, v in structures.items() if (drawn["label"] == v).any()}
    assert present and present <= set(numbers)
    for structure in present:
        np.testing.assert_array_equal(back == numbers[structure], drawn["label"] == structures[structure], err_msg=structure)


def test_a_seg_exported_from_ohifs_basic_viewer_is_read_where_it_was_drawn():
    """The same export from OHIF's basic viewer (a stack), of ContourCL's own SEG of the phantom's
    truth (the series was written from ``make_phantom(21)``)."""
    from contourcl.data.phantom import make_phantom
    from contourcl.data.rtstruct import to_series_grid

    geo = read_series_geometry(FIXTURES / "series-hfs")
    _, truth, affine = make_phantom(21, shape=(96, 80, 14), spacing=(4.0, 4.0, 5.0))
    expected = to_series_grid(truth, affine, geo)
    back, numbers = read_seg(FIXTURES / "seg-hfs-viewer.dcm", FIXTURES / "series-hfs")
    assert set(numbers) == {n for n, v in STORED_LABELS.items() if (expected == v).any()}
    for structure, number in numbers.items():
        np.testing.assert_array_equal(back == number, expected == STORED_LABELS[structure], err_msg=structure)
