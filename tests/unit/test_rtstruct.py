"""RTSTRUCT out and in: label -> RTSTRUCT -> label on real DICOM files, what the file holds,
laterality in patient coordinates, outlines on voxel edges, ROI names, a third-party file."""

from __future__ import annotations

import shutil
import subprocess

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from contourcl.data.dicom_series import (
    read_series,
    read_series_geometry,
    write_ct_series,
)
from contourcl.data.labels import STORED_LABELS
from contourcl.data.rtstruct import (
    RT_STRUCTURE_SET_STORAGE,
    contour_volumes,
    load_rois,
    match_roi_names,
    outline_polygons,
    polygon_area,
    read_rtstruct,
    write_rtstruct,
)
from contourcl.errors import LabelMismatchError, UnknownLabelError

#: ContourCL's stored numbering
STRUCTURES = dict(STORED_LABELS)
#: 40 columns x 56 rows x 9 slices, origin off zero, x centred on 0.
#: Feet first: ImageOrientationPatient [-1,0,0, 0,1,0], columns to the patient's right, slices down.
FEET_FIRST = np.array([[0.8, 0, 0, -15.6], [0, -1.2, 0, 31.7], [0, 0, -2.5, -397.5], [0, 0, 0, 1]])
HEAD_FIRST = np.array([[-0.8, 0, 0, 15.6], [0, -1.2, 0, 31.7], [0, 0, 2.5, -417.5], [0, 0, 0, 1]])
SHAPE = (40, 56, 9)


def make_label(affine) -> np.ndarray:
    """Every hard case on one grid, placed in patient coordinates through ``affine``."""
    lab = np.zeros(SHAPE, dtype=np.uint8)
    i, j, k = np.meshgrid(*(np.arange(n) for n in SHAPE), indexing="ij")
    x_ras = affine[0, 0] * i + affine[0, 3]  # RAS x: positive = the patient's right
    # Parotid_R on the patient's right, Parotid_L on the left, whichever way the array runs
    lab[(x_ras > 6.2) & (x_ras < 13.9) & (j >= 30) & (j < 38) & (k >= 2) & (k < 6)] = 3
    lab[(x_ras < -6.2) & (x_ras > -13.9) & (j >= 30) & (j < 38) & (k >= 2) & (k < 6)] = 4
    # Brainstem: a ring with a hole, and an island inside the hole
    lab[14:26, 4:18, 1:5] = 1
    lab[16:24, 6:16, 1:5] = 0
    lab[19:21, 10:12, 2] = 1
    # SpinalCord: one voxel on most slices; two diagonal voxels (touching at a corner) on one
    for kk in range(0, 8):
        lab[20, 46, kk] = 2
    lab[21, 47, 3] = 2
    # Mandible: a U (concave), open towards the back
    lab[8:32, 22:26, 5:8] = 5
    lab[8:12, 22:34, 5:8] = 5
    lab[28:32, 22:34, 5:8] = 5
    # Esophagus: touches the image's edge (last row, first column)
    lab[0:3, 50:56, 6:9] = 7
    # GTV: an irregular blob with a thin bridge and a pinhole
    rng = np.random.default_rng(7)
    blob = rng.random((10, 12)) < 0.7
    lab[26:36, 40:52, 4][blob] = 8
    lab[30, 44, 4] = 0
    # Larynx: empty
    return lab


def _every_value(ds) -> None:
    for elem in ds:
        if elem.VR == "SQ":
            for item in elem.value:
                _every_value(item)
        else:
            _ = elem.value  # reading it decodes it: a malformed value raises here


def dice(a, b) -> float:
    return 2.0 * np.count_nonzero(a & b) / (np.count_nonzero(a) + np.count_nonzero(b))


@pytest.fixture
def series(tmp_path):
    folder = tmp_path / "ct"
    vol = np.full(SHAPE, -1000, dtype=np.int16)
    vol[2:38, 4:52, :] = 40
    write_ct_series(vol, FEET_FIRST, folder, patient_name="Test^Patient", patient_id="PT-201",
                    patient_position="FFS", study_uid=generate_uid())
    return folder


def test_label_rtstruct_label_round_trip_is_exact(series, tmp_path):
    label = make_label(FEET_FIRST)
    out = write_rtstruct(label, FEET_FIRST, STRUCTURES, series, series / "RS.dcm",
                         algorithm_name="ContourCL", algorithm_version="0.1.0")  # in the series' folder: ignored as a series
    back, mapped, unmapped = read_rtstruct(out, series, STRUCTURES)

    present = [n for n, v in STRUCTURES.items() if (label == v).any()]
    assert "Larynx" not in present
    assert mapped == {n: n for n in present} and unmapped == []
    scores = {n: dice(label == v, back == v) for n, v in STRUCTURES.items() if n in present}
    assert scores == {n: 1.0 for n in present}, scores
    np.testing.assert_array_equal(back, label)
    arr, aff = read_series(series)
    assert back.shape == arr.shape
    np.testing.assert_allclose(aff, FEET_FIRST, atol=1e-5)

    # a planning system's volume (polygon areas x slice thickness) equals the voxel volume
    voxel = 0.8 * 1.2 * 2.5
    volumes = contour_volumes(out, slice_thickness=2.5)
    for name in present:
        assert volumes[name] / (np.count_nonzero(label == STRUCTURES[name]) * voxel) == pytest.approx(1.0, abs=1e-6)


def test_rtstruct_holds_what_a_planning_system_needs(series, monkeypatch):
    label = make_label(FEET_FIRST)
    out = write_rtstruct(label, FEET_FIRST, STRUCTURES, series, series.parent / "RS.dcm",
                         interpreted_types={"GTV": "GTV"}, algorithm_name="ContourCL", algorithm_version="0.1.0")
    monkeypatch.setattr(pydicom.config.settings, "reading_validation_mode", pydicom.config.RAISE)
    ds = pydicom.dcmread(out)  # no force: a preamble, DICM and valid file meta
    _every_value(ds)  # each value valid for its VR (lengths, characters), or pydicom raises
    geo = read_series_geometry(series)
    ct = pydicom.dcmread(geo.files[0], stop_before_pixels=True)

    assert ds.file_meta.MediaStorageSOPClassUID == RT_STRUCTURE_SET_STORAGE == ds.SOPClassUID
    assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
    assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
    assert ds.Modality == "RTSTRUCT" and ds.ApprovalStatus == "UNAPPROVED"
    for keyword in ("PatientName", "PatientID", "StudyInstanceUID", "StudyDate", "StudyID"):
        assert ds[keyword].value == ct[keyword].value, keyword
    assert ds.SeriesInstanceUID != ct.SeriesInstanceUID and ds.SOPInstanceUID not in geo.sop_instance_uids

    (for_ref,) = ds.ReferencedFrameOfReferenceSequence
    assert for_ref.FrameOfReferenceUID == ct.FrameOfReferenceUID
    (study_ref,) = for_ref.RTReferencedStudySequence
    assert study_ref.ReferencedSOPInstanceUID == ct.StudyInstanceUID
    (series_ref,) = study_ref.RTReferencedSeriesSequence
    assert series_ref.SeriesInstanceUID == ct.SeriesInstanceUID
    assert sorted(i.ReferencedSOPInstanceUID for i in series_ref.ContourImageSequence) == sorted(geo.sop_instance_uids)

    names = [r.ROIName for r in ds.StructureSetROISequence]
    assert names == ["Brainstem", "SpinalCord", "Parotid_R", "Parotid_L", "Mandible", "Esophagus", "GTV"]  # Larynx empty: left out
    assert {r.ROIGenerationAlgorithm for r in ds.StructureSetROISequence} == {"AUTOMATIC"}
    algo = ds.StructureSetROISequence[0].ROIDerivationAlgorithmIdentificationSequence[0]
    assert (algo.AlgorithmName, algo.AlgorithmVersion) == ("ContourCL", "0.1.0")
    types = {o.ReferencedROINumber: o.RTROIInterpretedType for o in ds.RTROIObservationsSequence}
    assert types == {STRUCTURES[n]: ("GTV" if n == "GTV" else "ORGAN") for n in names}

    depth = {uid: float(p @ geo.normal) for uid, p in zip(geo.sop_instance_uids, geo.positions, strict=False)}
    n_contours = {}
    for rc in ds.ROIContourSequence:
        n_contours[rc.ReferencedROINumber] = len(rc.ContourSequence)
        for c in rc.ContourSequence:
            assert c.ContourGeometricType == "CLOSED_PLANAR"
            pts = np.array(c.ContourData, dtype=float).reshape(-1, 3)
            assert len(pts) == c.NumberOfContourPoints >= 3
            (ref,) = c.ContourImageSequence
            assert ref.ReferencedSOPClassUID == ct.SOPClassUID
            np.testing.assert_allclose(pts @ geo.normal, depth[ref.ReferencedSOPInstanceUID], atol=1e-3)  # on its slice
    # SpinalCord: one contour per slice, two on the slice where two voxels touch at a corner;
    # Brainstem: outer + hole on 4 slices, + the island on one
    assert n_contours[2] == 8 + 1
    assert n_contours[1] == 4 * 2 + 1


@pytest.mark.parametrize("affine, position", [(FEET_FIRST, "FFS"), (HEAD_FIRST, "HFS")])
def test_parotid_r_lies_on_the_patients_right(tmp_path, affine, position):
    """In DICOM's LPS coordinates the patient's right is negative x."""
    write_ct_series(np.zeros(SHAPE, np.int16), affine, tmp_path / "ct", patient_position=position)
    out = write_rtstruct(make_label(affine), affine, STRUCTURES, tmp_path / "ct", tmp_path / "RS.dcm")
    rois = {r.name: np.concatenate([c.points for c in r.contours]) for r in load_rois(out)}
    assert rois["Parotid_R"][:, 0].max() < 0 < rois["Parotid_L"][:, 0].min()
    # voxel edges: Parotid_R's voxels have RAS x centres 6.8..13.2 (0.8 mm apart), so its outline
    # runs from LPS x = -13.6 to -6.4
    assert rois["Parotid_R"][:, 0].min() == pytest.approx(-13.6) and rois["Parotid_R"][:, 0].max() == pytest.approx(-6.4)


def test_a_label_in_another_axis_order_is_put_on_the_series_grid(series, tmp_path):
    """The same voxels reoriented (here to RAS-closest order, as nibabel's as_closest_canonical
    does: columns and slices reversed) give the same RTSTRUCT; another grid is refused."""
    import nibabel as nib

    label = make_label(FEET_FIRST)
    canon = nib.as_closest_canonical(nib.Nifti1Image(label, FEET_FIRST))
    assert not np.array_equal(canon.affine, FEET_FIRST)
    out = write_rtstruct(np.asarray(canon.dataobj), canon.affine, STRUCTURES, series, tmp_path / "RS.dcm")
    back, _, _ = read_rtstruct(out, series, STRUCTURES)
    np.testing.assert_array_equal(back, label)

    shifted = FEET_FIRST.copy()
    shifted[0, 3] += 0.4  # half a voxel
    with pytest.raises(LabelMismatchError, match="not the series' grid"):
        write_rtstruct(label, shifted, STRUCTURES, series, tmp_path / "x.dcm")
    with pytest.raises(LabelMismatchError, match="shape"):
        write_rtstruct(label[:, :, :5], None, STRUCTURES, series, tmp_path / "x.dcm")
    bad = label.copy()
    bad[0, 0, 0] = 9
    with pytest.raises(UnknownLabelError, match=r"label values \[9\]"):
        write_rtstruct(bad, FEET_FIRST, STRUCTURES, series, tmp_path / "x.dcm")


def test_outlines_follow_voxel_edges():
    """Polygon area = voxel area exactly, and XOR filling of the polygons gives the mask back,
    on random masks full of holes, islands and corner contacts."""
    from skimage.draw import polygon

    rng = np.random.default_rng(1)
    for _ in range(150):
        shape = tuple(rng.integers(1, 25, size=2))
        mask = rng.random(shape) < rng.random()
        loops = outline_polygons(mask)
        assert sum(polygon_area(p) for p in loops) == mask.sum()
        filled = np.zeros(shape, bool)
        for p in loops:
            assert len(p) >= 4 and np.all(np.mod(p, 1) == 0.5)  # pixel corners
            rr, cc = polygon(p[:, 0], p[:, 1], shape)
            one = np.zeros(shape, bool)
            one[rr, cc] = True
            filled ^= one
        np.testing.assert_array_equal(filled, mask)
    (single,) = outline_polygons(np.ones((1, 1), bool))
    assert sorted(map(tuple, single)) == [(-0.5, -0.5), (-0.5, 0.5), (0.5, -0.5), (0.5, 0.5)]
    assert len(outline_polygons(np.eye(2, dtype=bool))) == 2  # corner contact: two contours


def test_roi_names_map_through_the_alias_table():
    names = ["RT PAROTID", "parotid_l", "Spinal Cord", "Brain Stem", "PTV 70", "GTV", "Cord PRV", "BODY",
             "Parotid_Rt", "Bone_Mandible", "oesophagus", "LARYNX"]
    mapped = match_roi_names(names, STRUCTURES)
    assert mapped == {
        "Parotid_Rt": "Parotid_R", "parotid_l": "Parotid_L", "Spinal Cord": "SpinalCord", "Brain Stem": "Brainstem",
        "GTV": "GTV", "Bone_Mandible": "Mandible", "oesophagus": "Esophagus", "LARYNX": "Larynx",
    }  # GTV is preferred to PTV 70 and "Parotid_Rt" to "RT PAROTID" (the table's order); a PRV is not the organ
    assert match_roi_names(["PTV_70", "Cord"], STRUCTURES) == {"PTV_70": "GTV", "Cord": "SpinalCord"}
    assert match_roi_names(["RT PAROTID", "Parotid_R"], STRUCTURES) == {"Parotid_R": "Parotid_R"}  # exact name first
    assert match_roi_names(["patient"], {"Body": 1}, aliases={"patient": "Body"}) == {"patient": "Body"}


def test_rtstruct_with_other_names_reads_into_tg263(series, tmp_path):
    label = make_label(FEET_FIRST)
    clinic = {"Brain Stem": 1, "SPINALCORD": 2, "RT PAROTID": 3, "Lt Parotid": 4, "Mandible": 5,
              "Esophagus": 7, "PTV70": 8, "Cord PRV": 9}
    label[label == 2] = 0
    label[20, 46, 0] = 2
    label[36, 10, 0] = 9
    out = write_rtstruct(label, FEET_FIRST, clinic, series, tmp_path / "RS.dcm")
    back, mapped, unmapped = read_rtstruct(out, series, STRUCTURES)
    assert mapped == {"Brain Stem": "Brainstem", "SPINALCORD": "SpinalCord", "RT PAROTID": "Parotid_R",
                      "Lt Parotid": "Parotid_L", "Mandible": "Mandible", "Esophagus": "Esophagus", "PTV70": "GTV"}
    assert unmapped == ["Cord PRV"]
    expected = label.copy()
    expected[expected == 9] = 0
    np.testing.assert_array_equal(back, expected)


def test_third_party_rtstruct_is_read(tmp_path):
    """pydicom's rtstruct.dcm (no file meta, implicit VR): ROI 'patient' is a 400 x 300 mm
    rectangle (x -200..200, y -150..150) on z = -200, -190 and -180 mm; two isocentres are POINTs.
    On a 5 mm grid whose pixel centres are 2.5 mm off the rectangle's sides, it covers 80 x 60
    pixels on each of 3 slices."""
    path = get_testdata_file("rtstruct.dcm")
    rois = load_rois(path)
    assert [(r.number, r.name, r.interpreted_type) for r in rois] == [
        (1, "patient", "EXTERNAL"), (2, "Isocenter 1", "ISOCENTER"), (3, "Isocenter 2", "ISOCENTER")]
    assert [[c.geometric_type for c in r.contours] for r in rois] == [["CLOSED_PLANAR"] * 3, ["POINT"], ["POINT"]]
    assert [len(c.points) for c in rois[0].contours] == [5, 6, 6]
    assert contour_volumes(path, slice_thickness=10.0)["patient"] == pytest.approx(3 * 400 * 300 * 10)

    # a CT in the structure set's frame of reference: 84 x 64 pixels of 5 mm, slices at z -200, -190, -180
    affine = np.array([[-5.0, 0, 0, 207.5], [0, -5.0, 0, 157.5], [0, 0, 10.0, -200.0], [0, 0, 0, 1]])
    write_ct_series(np.zeros((84, 64, 3), np.int16), affine, tmp_path / "ct",
                    frame_of_reference_uid="1.2.826.0.1.3680043.8.498.2010020400001.2")
    label, mapped, unmapped = read_rtstruct(path, tmp_path / "ct", {"Body": 1}, aliases={"patient": "Body"})
    assert mapped == {"patient": "Body"} and unmapped == ["Isocenter 1", "Isocenter 2"]
    expected = np.zeros((84, 64, 3), np.uint8)
    expected[2:82, 2:62, :] = 1  # LPS x centres -197.5..197.5, y -147.5..147.5
    np.testing.assert_array_equal(label, expected)

    write_ct_series(np.zeros((84, 64, 3), np.int16), affine, tmp_path / "other")  # another frame of reference
    with pytest.raises(LabelMismatchError, match="frame of reference"):
        read_rtstruct(path, tmp_path / "other", {"Body": 1}, aliases={"patient": "Body"})
    shifted = affine.copy()
    shifted[2, 3] = -195.0  # slices between the contours' planes
    write_ct_series(np.zeros((84, 64, 3), np.int16), shifted, tmp_path / "between",
                    frame_of_reference_uid="1.2.826.0.1.3680043.8.498.2010020400001.2")
    with pytest.raises(LabelMismatchError, match="drawn on another series"):
        read_rtstruct(path, tmp_path / "between", {"Body": 1}, aliases={"patient": "Body"})


@pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dciodvfy (Debian package dicom3tools) not installed")
def test_dciodvfy_finds_no_error(series, tmp_path):
    """David Clunie's IOD checker, where it is installed (apt-get install dicom3tools)."""
    out = write_rtstruct(make_label(FEET_FIRST), FEET_FIRST, STRUCTURES, series, tmp_path / "RS.dcm")
    report = subprocess.run(["dciodvfy", str(out)], capture_output=True, text=True).stderr
    assert "RTStructureSet" in report and "Error" not in report, report
