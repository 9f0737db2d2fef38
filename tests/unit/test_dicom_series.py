"""A DICOM CT series as input: geometry against SimpleITK (head first, feet first, oblique), HU,
compressed transfer syntaxes, the NIfTI it becomes, and what is refused."""

from __future__ import annotations

import shutil

import nibabel as nib
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.data import get_testdata_file
from pydicom.encaps import encapsulate
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    RLELossless,
    generate_uid,
)

from contourcl.data.dicom_series import (
    _stored_pixels,
    list_series,
    read_series,
    read_series_geometry,
    write_ct_series,
    write_nifti_from_series,
)
from contourcl.errors import InvalidImageError

LPS = np.diag([-1.0, -1.0, 1.0, 1.0])
C30, S30 = np.cos(np.radians(30)), np.sin(np.radians(30))
#: RAS affines of 40 columns x 56 rows x 7 slices, origins off zero.
GEOMETRIES = {
    # ImageOrientationPatient [1,0,0, 0,1,0]: columns to the patient's left, rows posterior, slices up
    "head-first": np.array([[-0.8, 0, 0, 15.6], [0, -1.2, 0, 31.7], [0, 0, 2.5, -412.5], [0, 0, 0, 1]]),
    # [-1,0,0, 0,1,0] (feet first supine): columns to the patient's right, slices down the body
    "feet-first": np.array([[0.8, 0, 0, -15.6], [0, -1.2, 0, 31.7], [0, 0, -2.5, -397.5], [0, 0, 0, 1]]),
    # in-plane rotation by 30 degrees, 3 mm slices
    "oblique": np.array([[-0.8 * C30, 1.2 * S30, 0, 20.0], [-0.8 * S30, -1.2 * C30, 0, -5.0], [0, 0, 3.0, 100.0], [0, 0, 0, 1]]),
}


def ct_volume(shape=(40, 56, 7), seed=0) -> np.ndarray:
    """HU from air to bone, different on every slice (so a wrong slice order shows)."""
    rng = np.random.default_rng(seed)
    vol = rng.integers(-1024, 3000, size=shape).astype(np.int16)
    vol[:, :, :] += np.arange(shape[2], dtype=np.int16)[None, None, :] * 7
    return vol


def sitk_reference(folder):
    """SimpleITK's ImageSeriesReader: (array (column, row, slice), RAS affine)."""
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder)))
    img = reader.Execute()
    lps = np.eye(4)
    lps[:3, :3] = np.array(img.GetDirection()).reshape(3, 3) * np.array(img.GetSpacing())
    lps[:3, 3] = img.GetOrigin()
    return sitk.GetArrayFromImage(img).transpose(2, 1, 0), LPS @ lps


def scramble(paths) -> None:
    """Rename the files in reverse-shuffled order and number the instances backwards, so neither
    file names nor InstanceNumber give the slice order."""
    rng = np.random.default_rng(5)
    n = len(paths)
    for new, k in enumerate(rng.permutation(n)):
        ds = pydicom.dcmread(paths[k])
        ds.InstanceNumber = n - k
        ds.save_as(paths[k].parent / f"IMG{new:04d}", write_like_original=False)
        paths[k].unlink()


def edit(path, **attrs) -> None:
    ds = pydicom.dcmread(path)
    for key, value in attrs.items():
        if value is None:
            delattr(ds, key)
        else:
            setattr(ds, key, value)
    ds.save_as(path, write_like_original=False)


@pytest.mark.parametrize("name, signed", [("head-first", False), ("feet-first", True), ("oblique", False)])
def test_geometry_and_hu_match_simpleitk(tmp_path, name, signed):
    affine = GEOMETRIES[name]
    vol = ct_volume()
    paths = write_ct_series(vol, affine, tmp_path / "ct", signed=signed, rescale_intercept=0 if signed else -1024,
                            patient_position="FFS" if name == "feet-first" else "HFS")
    scramble(paths)

    arr, aff = read_series(tmp_path / "ct")
    ref_arr, ref_aff = sitk_reference(tmp_path / "ct")

    assert arr.shape == (40, 56, 7) and arr.dtype == np.int16
    np.testing.assert_allclose(aff, ref_aff, atol=1e-4)  # SimpleITK is the reference
    np.testing.assert_allclose(aff, affine, atol=1e-4)  # and it is the geometry written
    np.testing.assert_array_equal(arr, ref_arr)
    np.testing.assert_array_equal(arr, vol)  # HU: rescale applied, slices in the right order


def test_head_first_and_feet_first_are_the_same_world(tmp_path):
    """One body scanned head first and feet first: different arrays, the same HU at each point."""
    vol = ct_volume()
    hfs = GEOMETRIES["head-first"]
    # the same voxels seen feet first: columns and slices reversed
    ffs = hfs @ np.array([[-1, 0, 0, 39], [0, 1, 0, 0], [0, 0, -1, 6], [0, 0, 0, 1]])
    write_ct_series(vol, hfs, tmp_path / "hfs")
    write_ct_series(vol[::-1, :, ::-1], ffs, tmp_path / "ffs", patient_position="FFS")
    a, aff_a = read_series(tmp_path / "hfs")
    b, aff_b = read_series(tmp_path / "ffs")
    assert read_series_geometry(tmp_path / "ffs").normal[2] < 0  # feet first: slices go down the body
    ijk = np.array([[3, 10, 1, 1], [20, 40, 5, 1], [39, 0, 6, 1]]).T
    world = aff_a @ ijk
    ijk_b = np.rint(np.linalg.solve(aff_b, world)).astype(int)
    for (i, j, k), (ib, jb, kb) in zip(ijk[:3].T, ijk_b[:3].T, strict=False):
        assert a[i, j, k] == b[ib, jb, kb]
    np.testing.assert_allclose(np.linalg.solve(aff_b, world)[:3], ijk_b[:3], atol=1e-6)


def test_nifti_from_series_reads_back_as_the_series(tmp_path):
    from monai.transforms import LoadImage

    write_ct_series(ct_volume(), GEOMETRIES["feet-first"], tmp_path / "ct")
    arr, aff = read_series(tmp_path / "ct")
    out = write_nifti_from_series(tmp_path / "ct", tmp_path / "ct.nii.gz")
    img = nib.load(out)
    np.testing.assert_array_equal(np.asarray(img.dataobj), arr)
    np.testing.assert_allclose(img.affine, aff, atol=1e-5)
    monai_img = LoadImage(image_only=True)(str(out))  # what contourcl.volumes.read_volume uses
    np.testing.assert_array_equal(np.asarray(monai_img), arr)
    np.testing.assert_allclose(np.asarray(monai_img.affine), aff, atol=1e-5)


def transcode(paths, syntax) -> None:
    """Re-encode each file's pixel data: RLE with pydicom's encoder, JPEG 2000 with
    pylibjpeg-openjpeg's, JPEG-LS with pyjpegls (CharLS); deflate is applied by pydicom on write."""
    for path in paths:
        ds = pydicom.dcmread(path)
        arr = ds.pixel_array
        if syntax == RLELossless:
            ds.compress(RLELossless)
        elif syntax == JPEG2000Lossless:
            import openjpeg

            ds.PixelData = encapsulate([openjpeg.encode(arr, bits_stored=16)])
        elif syntax == JPEGLSLossless:
            jpeg_ls = pytest.importorskip("jpeg_ls", reason="pyjpegls (the test extra) encodes JPEG-LS")
            ds.PixelData = encapsulate([bytes(jpeg_ls.encode_array(arr.view(np.uint16)))])
        if syntax in (JPEG2000Lossless, JPEGLSLossless):
            ds["PixelData"].is_undefined_length = True
            ds["PixelData"].VR = "OB"
        ds.file_meta.TransferSyntaxUID = syntax
        ds.save_as(path, write_like_original=False)


@pytest.mark.parametrize("syntax, signed", [
    (RLELossless, False),
    (JPEG2000Lossless, False),
    (JPEG2000Lossless, True),
    (JPEGLSLossless, False),
    (JPEGLSLossless, True),
    (DeflatedExplicitVRLittleEndian, True),
])
def test_compressed_series_decode_to_the_same_hu(tmp_path, syntax, signed):
    vol = ct_volume(seed=3)
    plain = write_ct_series(vol, GEOMETRIES["head-first"], tmp_path / "plain", signed=signed,
                            rescale_intercept=0 if signed else -1024)
    shutil.copytree(tmp_path / "plain", tmp_path / "packed")
    packed = sorted((tmp_path / "packed").iterdir())
    transcode(packed, syntax)
    assert {str(pydicom.dcmread(p, stop_before_pixels=True).file_meta.TransferSyntaxUID) for p in packed} == {syntax}
    if syntax != DeflatedExplicitVRLittleEndian:
        assert sum(p.stat().st_size for p in packed) != sum(p.stat().st_size for p in plain)
    a, aff_a = read_series(tmp_path / "plain")
    b, aff_b = read_series(tmp_path / "packed")
    np.testing.assert_array_equal(a, vol)
    np.testing.assert_array_equal(b, a)
    np.testing.assert_array_equal(aff_b, aff_a)


@pytest.mark.filterwarnings("ignore:The \\(0028,0103\\) Pixel Representation")
def test_decoders_read_files_other_software_compressed():
    """pydicom's test files, compressed by other toolkits: JPEG 2000, JPEG-LS and RLE lossless
    copies of one MR slice decode to the uncompressed slice, and a real JPEG 2000 CT slice whose
    PixelRepresentation disagrees with its codestream decodes to plausible HU."""
    ref = pydicom.dcmread(get_testdata_file("MR_small.dcm")).pixel_array
    for name in ("MR_small_jp2klossless.dcm", "MR_small_jpeg_ls_lossless.dcm", "MR_small_RLE.dcm"):
        ds = pydicom.dcmread(get_testdata_file(name))
        np.testing.assert_array_equal(_stored_pixels(ds, name), ref, err_msg=name)
    ds = pydicom.dcmread(get_testdata_file("J2K_pixelrep_mismatch.dcm"))
    assert ds.file_meta.TransferSyntaxUID == JPEG2000Lossless and ds.PixelRepresentation == 1
    hu = _stored_pixels(ds, "J2K_pixelrep_mismatch.dcm").astype(float) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    assert hu.min() == -2000  # the scanner's padding outside the field of view, kept negative
    assert -1100 < np.median(hu[250:260, :40]) < -900  # air beside the head (looked at: an axial head CT)
    assert 0 < np.median(hu[300:320, 240:270]) < 80  # brain
    assert 1000 < hu.max() < 3000  # skull


def test_tilted_gantry_series_are_refused(tmp_path):
    sheared = GEOMETRIES["head-first"].copy()
    sheared[:3, 2] = [0, -0.6, 2.5]  # each slice 0.6 mm further along y: a 13.5 degree tilt
    write_ct_series(ct_volume(), sheared, tmp_path / "sheared")
    with pytest.raises(InvalidImageError, match="tilted-gantry or sheared series"):
        read_series(tmp_path / "sheared")

    paths = write_ct_series(ct_volume(), GEOMETRIES["head-first"], tmp_path / "tag")
    for p in paths:
        edit(p, GantryDetectorTilt="12.0")
    with pytest.raises(InvalidImageError, match=r"tilted gantry \(GantryDetectorTilt \[12.0\] degrees\)"):
        read_series(tmp_path / "tag")


def test_irregular_spacing_and_duplicates_are_refused(tmp_path):
    paths = write_ct_series(ct_volume(), GEOMETRIES["head-first"], tmp_path / "gap")
    paths[3].unlink()
    with pytest.raises(InvalidImageError, match=r"irregular slice spacing: 5.000 mm .* others are 2.500 mm apart"):
        read_series(tmp_path / "gap")

    paths = write_ct_series(ct_volume(), GEOMETRIES["head-first"], tmp_path / "dup")
    ds = pydicom.dcmread(paths[2])
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.save_as(tmp_path / "dup" / "copy.dcm", write_like_original=False)
    with pytest.raises(InvalidImageError, match="duplicate slice position"):
        read_series(tmp_path / "dup")


def test_mixed_orientation_size_modality_and_missing_data_are_refused(tmp_path):
    def series(name):
        return write_ct_series(ct_volume(), GEOMETRIES["head-first"], tmp_path / name)

    paths = series("orient")
    edit(paths[4], ImageOrientationPatient=["0", "1", "0", "0", "0", "-1"])
    with pytest.raises(InvalidImageError, match="mixes slice orientations"):
        read_series(tmp_path / "orient")

    paths = series("size")
    edit(paths[1], Rows=28, PixelData=np.zeros((28, 40), np.uint16).tobytes())
    with pytest.raises(InvalidImageError, match=r"mixes image sizes \(columns x rows\): 40 x 56 \(6 images\), 40 x 28 \(1 images\)"):
        read_series(tmp_path / "size")

    paths = series("mr")
    for p in paths:
        edit(p, Modality="MR")
    with pytest.raises(InvalidImageError, match=r"modality MR \(7 images\): ContourCL contours CT .*refused"):
        read_series(tmp_path / "mr")
    assert read_series(tmp_path / "mr", allow_non_ct=True)[0].shape == (40, 56, 7)

    paths = series("nopixels")
    edit(paths[2], PixelData=None)
    with pytest.raises(InvalidImageError, match=f"{paths[2].name}' has no pixel data"):
        read_series(tmp_path / "nopixels")

    paths = series("noposition")
    edit(paths[0], ImagePositionPatient=None)
    with pytest.raises(InvalidImageError, match="has no ImagePositionPatient"):
        read_series(tmp_path / "noposition")


def test_a_folder_with_several_series_needs_series_uid(tmp_path):
    a = write_ct_series(ct_volume(), GEOMETRIES["head-first"], tmp_path / "both", series_uid=generate_uid())
    b = write_ct_series(ct_volume(seed=1)[:, :, :5], GEOMETRIES["feet-first"], tmp_path / "both", series_uid=generate_uid())
    uid_a = pydicom.dcmread(a[0]).SeriesInstanceUID
    uid_b = pydicom.dcmread(b[0]).SeriesInstanceUID
    (tmp_path / "both" / "README.txt").write_text("not DICOM")  # other files are skipped
    with pytest.raises(InvalidImageError, match="holds 2 image series") as err:
        read_series(tmp_path / "both")
    assert uid_a in str(err.value) and uid_b in str(err.value)
    assert [s.series_uid for s in list_series(tmp_path / "both")] == [uid_a, uid_b]  # largest first
    assert read_series(tmp_path / "both", series_uid=uid_b)[0].shape == (40, 56, 5)
    (tmp_path / "empty").mkdir()
    with pytest.raises(InvalidImageError, match="no DICOM image found"):
        read_series(tmp_path / "empty")


def test_geometry_is_refused_before_pixels_are_decoded(tmp_path):
    paths = write_ct_series(ct_volume(), GEOMETRIES["head-first"], tmp_path / "ct")
    for p in paths:
        edit(p, PixelSpacing=["0.05", "0.05"])
    with pytest.raises(InvalidImageError, match="voxel spacing"):
        read_series(tmp_path / "ct")
