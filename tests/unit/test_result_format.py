"""The infer answer in the format asked (issue 33, items 1 and 6): OHIF's NRRD in OHIF's voxel order.

The voxel order is checked against an emulation of what the OHIF viewer does, written from the
DICOM headers alone and independent of :mod:`contourcl.serving.result_format`: the series' slices
are sorted as cornerstone3D sorts them (by ``(first position - position) . (row x column
cosine)``, largest first), each slice's pixels run columns fastest, then rows, and the NRRD's
bytes after its header fill that volume as they are (``MonaiLabelPanel.updateView``). Every
voxel's expected value is the label's value at that voxel's patient position. The label is a
random one (any flip or transposition changes it), on head-first, feet-first and non-square series.
"""

from __future__ import annotations

import gzip

import nibabel as nib
import numpy as np
import pydicom
import pytest

from contourcl.data.dicom_series import write_ct_series
from contourcl.serving.result_format import EXTENSIONS, ResultFormat, ResultFormatError, convert, requested

OHIF = {"result_extension": ".nrrd", "result_dtype": "uint8", "result_compress": False}  # what the panel sends
LPS = np.diag([-1.0, -1.0, 1.0, 1.0])


def _affine_lps(row_cos, col_cos, normal, spacing, origin) -> np.ndarray:
    lps = np.eye(4)
    lps[:3, 0] = np.asarray(row_cos, float) * spacing[0]
    lps[:3, 1] = np.asarray(col_cos, float) * spacing[1]
    lps[:3, 2] = np.asarray(normal, float) * spacing[2]
    lps[:3, 3] = origin
    return LPS @ lps  # RAS


#: (name, RAS affine of the series grid indexed column, row, slice, shape)
SERIES = [
    ("head first", _affine_lps((1, 0, 0), (0, 1, 0), (0, 0, 1), (0.8, 0.8, 2.5), (-40.0, -30.0, -100.0)), (9, 9, 6)),
    # feet first supine: row cosine toward the patient's right, so the normal points to the feet
    ("feet first", _affine_lps((-1, 0, 0), (0, 1, 0), (0, 0, -1), (0.8, 0.8, 2.5), (40.0, -30.0, 100.0)), (9, 9, 6)),
    ("non-square", _affine_lps((1, 0, 0), (0, 1, 0), (0, 0, 1), (0.7, 1.1, 3.0), (-20.0, -35.0, 7.5)), (11, 6, 5)),
    ("feet first, non-square", _affine_lps((-1, 0, 0), (0, 1, 0), (0, 0, -1), (0.9, 0.6, 2.0), (30.0, -10.0, 50.0)), (5, 8, 7)),
    # turned 30 degrees in the axial plane: no axis of the grid along an axis of the patient
    ("oblique", _affine_lps((np.cos(0.5236), np.sin(0.5236), 0), (-np.sin(0.5236), np.cos(0.5236), 0), (0, 0, 1),
                            (0.8, 1.0, 2.5), (-25.0, -30.0, 12.0)), (8, 6, 5)),
]


def _series(tmp_path, affine, shape):
    folder = tmp_path / "series"
    write_ct_series(np.zeros(shape), affine, folder)
    return [pydicom.dcmread(p, stop_before_pixels=True) for p in sorted(folder.glob("*.dcm"))]


def _ohif_expected(headers, label: np.ndarray, label_affine: np.ndarray) -> np.ndarray:
    """The labelmap OHIF shows, ``[slice, row, column]`` in cornerstone3D's order, from the DICOM
    headers and the label's value at each voxel's patient position."""
    iop = np.array(headers[0].ImageOrientationPatient, float)
    row_cos, col_cos = iop[:3], iop[3:]
    normal = np.cross(row_cos, col_cos)
    first = np.array(headers[0].ImagePositionPatient, float)
    ordered = sorted(headers, key=lambda ds: -float((first - np.array(ds.ImagePositionPatient, float)) @ normal))
    rows, cols = int(headers[0].Rows), int(headers[0].Columns)
    dr, dc = (float(v) for v in headers[0].PixelSpacing)  # between rows, between columns
    to_voxel = np.linalg.inv(label_affine)
    out = np.zeros((len(ordered), rows, cols), np.uint8)
    r, c = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
    for s, ds in enumerate(ordered):
        ipp = np.array(ds.ImagePositionPatient, float)
        lps = ipp + c[..., None] * dc * row_cos + r[..., None] * dr * col_cos
        ras = lps * np.array([-1.0, -1.0, 1.0])
        ijk = np.rint(ras @ to_voxel[:3, :3].T + to_voxel[:3, 3]).astype(int)
        out[s] = label[ijk[..., 0], ijk[..., 1], ijk[..., 2]]
    return out


def _nrrd_body(path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    head, _, body = raw.partition(b"\n\n")
    fields = dict(line.split(": ", 1) for line in head.decode().splitlines()[1:] if not line.startswith("#"))
    return fields, body


def _write_label(tmp_path, label, affine, name="label.nii.gz"):
    path = tmp_path / name
    nib.save(nib.Nifti1Image(label.astype(np.uint8), affine), str(path))
    return path


@pytest.mark.parametrize("name,affine,shape", SERIES, ids=[s[0] for s in SERIES])
def test_the_nrrd_fills_ohifs_labelmap_voxel_for_voxel(tmp_path, name, affine, shape):
    headers = _series(tmp_path, affine, shape)
    label = np.random.default_rng(0).integers(0, 8, size=shape).astype(np.uint8)
    path = _write_label(tmp_path, label, affine)
    out = convert(path, requested(OHIF), out_dir=tmp_path)
    fields, body = _nrrd_body(out)
    assert out.suffix == ".nrrd" and fields["type"] in ("uint8", "unsigned char") and fields["encoding"] == "raw"
    assert len(body) == label.size, "one byte a voxel, nothing else after the header"
    got = np.frombuffer(body, np.uint8).reshape(shape[2], shape[1], shape[0])
    expected = _ohif_expected(headers, label, affine)
    assert np.array_equal(got, expected), f"{name}: {np.mean(got != expected):.0%} of the voxels differ"


def test_other_voxel_orders_of_the_same_grid_are_put_in_ohifs(tmp_path):
    """A label on the series' voxels stored in another order: slices running against the normal
    (fixed from the affine alone), or the closest-to-RAS order a NIfTI tool writes (fixed onto
    the series' grid, ``target_affine``)."""
    name, affine, shape = SERIES[3]
    headers = _series(tmp_path, affine, shape)
    label = np.random.default_rng(1).integers(0, 8, size=shape).astype(np.uint8)
    expected = _ohif_expected(headers, label, affine)

    reversed_slices = label[:, :, ::-1]
    rev_affine = affine.copy()
    rev_affine[:3, 3] = affine[:3, 3] + affine[:3, 2] * (shape[2] - 1)
    rev_affine[:3, 2] = -affine[:3, 2]
    out = convert(_write_label(tmp_path, reversed_slices, rev_affine, "rev.nii.gz"), requested(OHIF), out_dir=tmp_path)
    got = np.frombuffer(_nrrd_body(out)[1], np.uint8).reshape(shape[2], shape[1], shape[0])
    assert np.array_equal(got, expected)

    canonical = nib.as_closest_canonical(nib.Nifti1Image(label, affine))
    assert not np.allclose(canonical.affine, affine)  # the test needs another order
    path = tmp_path / "canonical.nii.gz"
    nib.save(canonical, str(path))
    out = convert(path, requested(OHIF), target_affine=affine, out_dir=tmp_path)
    got = np.frombuffer(_nrrd_body(out)[1], np.uint8).reshape(shape[2], shape[1], shape[0])
    assert np.array_equal(got, expected)
    # rows first, then columns (a transposed slice)
    swapped = nib.Nifti1Image(np.transpose(label, (1, 0, 2)).copy(), affine[:, [1, 0, 2, 3]])
    path = tmp_path / "swapped.nii.gz"
    nib.save(swapped, str(path))
    out = convert(path, requested(OHIF), target_affine=affine, out_dir=tmp_path)
    got = np.frombuffer(_nrrd_body(out)[1], np.uint8).reshape(shape[2], shape[1], shape[0])
    assert np.array_equal(got, expected)
    # another grid (shifted by half a voxel) is not the series' voxels in another order: refused
    shifted = affine.copy()
    shifted[:3, 3] += affine[:3, 0] * 0.5
    with pytest.raises(ResultFormatError, match="not the series' grid"):
        convert(path, requested(OHIF), target_affine=shifted, out_dir=tmp_path)


def test_the_nrrd_header_places_it_for_other_readers_and_gzip_is_what_pako_inflates(tmp_path):
    import nrrd

    name, affine, shape = SERIES[4]  # oblique: the directions are not a diagonal
    label = np.random.default_rng(2).integers(0, 8, size=shape).astype(np.uint8)
    path = _write_label(tmp_path, label, affine)
    out = convert(path, requested({**OHIF, "result_compress": "true"}), out_dir=tmp_path)
    fields, body = _nrrd_body(out)
    assert fields["encoding"] == "gzip" and fields["space"] == "left-posterior-superior"
    assert gzip.decompress(body) == np.asarray(label).tobytes(order="F")  # the order for this (DICOM-ordered) grid
    data, header = nrrd.read(str(out), index_order="F")
    lps_affine = np.eye(4)
    lps_affine[:3, :3] = np.asarray(header["space directions"]).T
    lps_affine[:3, 3] = header["space origin"]
    assert np.allclose(LPS @ lps_affine, affine) and np.array_equal(data, label)


def test_dtypes_and_nifti_answers(tmp_path):
    name, affine, shape = SERIES[0]
    label = np.random.default_rng(3).integers(0, 8, size=shape).astype(np.uint8)
    path = _write_label(tmp_path, label, affine)
    assert convert(path, requested({}), out_dir=tmp_path) == path  # nothing asked: the file as it is
    for ext in (".nii", ".nii.gz"):
        out = convert(path, requested({"result_extension": ext, "result_dtype": "int16"}), out_dir=tmp_path)
        img = nib.load(str(out))
        assert out.name.endswith(ext) and img.get_data_dtype() == np.int16
        assert np.array_equal(np.asanyarray(img.dataobj), label) and np.allclose(img.affine, affine)
    out = convert(path, requested({"result_extension": ".nrrd", "result_dtype": "uint16"}), out_dir=tmp_path)
    fields, body = _nrrd_body(out)
    assert len(body) == 2 * label.size and fields["endian"] == "little"
    wide = tmp_path / "wide.nii.gz"  # a label file holding 300: not a uint8 answer
    nib.save(nib.Nifti1Image(np.full(shape, 300, np.uint16), affine), str(wide))
    with pytest.raises(ResultFormatError, match="do not fit result_dtype=uint8"):
        convert(wide, requested(OHIF), out_dir=tmp_path)


def test_unknown_result_parameters_are_refused_naming_the_allowed_ones():
    assert requested({}) == ResultFormat(".nii.gz", None, False)
    assert requested(OHIF) == ResultFormat(".nrrd", "uint8", False)
    assert requested({"result_extension": ".NRRD", "result_compress": "true"}).compress is True
    for bad in (".png", ".seg.nrrd", "nrrd", ".nii.gz;rm", 5, [".nrrd"]):
        with pytest.raises(ResultFormatError) as err:
            requested({"result_extension": bad})
        assert all(ext in str(err.value) for ext in EXTENSIONS), str(err.value)
    for bad in ("uint9", "object", "complex64", 8):
        with pytest.raises(ResultFormatError, match="allowed"):
            requested({"result_dtype": bad})
    with pytest.raises(ResultFormatError, match="true or false"):
        requested({"result_compress": "maybe"})
