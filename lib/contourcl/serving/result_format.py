"""The file an infer answers, in the format the client asked for (MONAI Label's result parameters).

MONAI Label's clients name the answer's format in the request: ``result_extension`` (``.nii.gz``,
``.nii``, ``.nrrd``), ``result_dtype`` (``uint8``, ...) and ``result_compress``. The OHIF viewer's
MONAI Label panel always asks for ``.nrrd``, ``uint8``, uncompressed, and reads the answer
without looking at its geometry: it parses the NRRD with nrrd-js, takes the bytes after the
header as a ``Uint8Array`` and puts them, as they are, into the labelmap volume of the displayed
series (``MonaiLabelPanel.updateView``: ``voxelManager.setCompleteScalarDataArray``). That
volume is cornerstone3D's: columns fastest, then rows, then slices sorted along the normal
``row cosine x column cosine`` in increasing position (``sortImageIdsAndGetSpacing`` sorts by
``(first - position) . normal``, largest first). So the answer's voxels must come in that order:

- ``i`` along the series' row cosine (DICOM columns), ``j`` along its column cosine (rows),
  ``k`` along ``i x j`` (LPS), whatever the patient position (head first, feet first) or the
  shape (non-square slices);
- one byte per voxel when ``uint8`` is asked.

A CT that ContourCL read from DICOM (a studies folder of series, a DICOMweb PACS) is stored
indexed (column, row, slice) with its slices sorted along that same normal
(:mod:`contourcl.data.dicom_series`), so its labels are in that order already; :func:`ohif_order`
puts any other grid in it (its first two axes kept as the slice's pixel axes, the third turned to
run along their cross product), or onto a given series grid exactly (``target_affine``). The NRRD
header says the same geometry (``space: left-posterior-superior``, directions and origin of the
reordered grid), so Slicer or any NRRD reader places it right as well.

:func:`requested` reads and checks the three parameters (an unknown one: :class:`ResultFormatError`,
answered 422 naming what is allowed); :func:`convert` is the pure function from the label file and
the request's format to the answered file.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import NamedTuple

import nibabel as nib
import numpy as np

from contourcl.errors import ContourCLError

#: the result extensions an infer may answer in (MONAI Label's ``result_extension``)
EXTENSIONS = (".nii.gz", ".nii", ".nrrd")
#: the result dtypes (MONAI Label's ``result_dtype``); a label's values are 0..255
DTYPES = ("uint8", "int8", "uint16", "int16", "uint32", "int32", "float32", "float64")
DEFAULT_EXTENSION = ".nii.gz"
#: RAS (NIfTI) <-> LPS (DICOM, NRRD's ``left-posterior-superior``)
_FLIP = np.diag([-1.0, -1.0, 1.0, 1.0])
#: how far two grids may differ and still be the same (mm, and direction cosines)
TOLERANCE = 1e-3


class ResultFormatError(ContourCLError):
    """A result parameter this server cannot answer in (422)."""


class ResultFormat(NamedTuple):
    extension: str = DEFAULT_EXTENSION
    dtype: str | None = None  # None: as stored (uint8)
    compress: bool = False

    @property
    def is_default(self) -> bool:
        return self.extension == DEFAULT_EXTENSION and self.dtype in (None, "uint8")


def _flag(value, name: str) -> bool:
    if isinstance(value, bool):
        return value
    if value is None:
        return False
    text = str(value).strip().lower()
    if text in ("true", "1", "yes"):
        return True
    if text in ("false", "0", "no", ""):
        return False
    raise ResultFormatError(f"{name}={value!r}: give true or false")


def requested(request: dict) -> ResultFormat:
    """The result format ``request`` asks for; :class:`ResultFormatError` names the allowed values
    of an unknown ``result_extension`` or ``result_dtype``. Nothing asked: ``.nii.gz`` as stored."""
    ext = request.get("result_extension")
    ext = DEFAULT_EXTENSION if ext in (None, "") else ext
    if not isinstance(ext, str) or ext.strip().lower() not in EXTENSIONS:
        raise ResultFormatError(f"result_extension={ext!r} is not one this server answers in; allowed: {list(EXTENSIONS)}")
    dtype = request.get("result_dtype")
    dtype = None if dtype in (None, "") else dtype
    if dtype is not None and (not isinstance(dtype, str) or dtype.strip().lower() not in DTYPES):
        raise ResultFormatError(f"result_dtype={dtype!r} is not one this server answers in; allowed: {list(DTYPES)}")
    return ResultFormat(ext.strip().lower(), dtype.strip().lower() if dtype else None,
                        _flag(request.get("result_compress"), "result_compress"))


def _axes_lps(affine: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    lps = _FLIP @ np.asarray(affine, dtype=np.float64)
    m = lps[:3, :3]
    spacing = np.linalg.norm(m, axis=0)
    if np.any(spacing <= 0):
        raise ResultFormatError("the label's affine has an axis of zero length")
    return m / spacing, spacing, lps[:3, 3]


def ohif_order(label: np.ndarray, affine: np.ndarray, target_affine: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``(label, affine)`` with the voxels in the order OHIF's labelmap reads (see the module).

    Without ``target_affine``: axes 0 and 1 stay (the slices' columns and rows), and axis 2 is
    flipped if it runs against their cross product (LPS). With ``target_affine`` (a series' grid,
    RAS, indexed column, row, slice): the label is permuted and flipped onto it, and a grid that
    is not the same voxels in another order raises :class:`ResultFormatError`.
    """
    label = np.asarray(label)
    affine = np.asarray(affine, dtype=np.float64)
    if label.ndim != 3:
        raise ResultFormatError(f"the label has {label.ndim} dimensions, not 3")
    if target_affine is None:
        dirs, _, _ = _axes_lps(affine)
        if np.dot(np.cross(dirs[:, 0], dirs[:, 1]), dirs[:, 2]) >= 0:
            return label, affine
        return _flip_axes(label, affine, [2])
    target_affine = np.asarray(target_affine, dtype=np.float64)
    dirs, spacing, _ = _axes_lps(affine)
    tdirs, tspacing, _ = _axes_lps(target_affine)
    dots = tdirs.T @ dirs  # [target axis, label axis]
    perm = [int(np.argmax(np.abs(dots[t]))) for t in range(3)]
    if sorted(perm) != [0, 1, 2] or any(abs(abs(dots[t, perm[t]]) - 1) > TOLERANCE for t in range(3)):
        raise ResultFormatError("the label's grid is not the series' grid in another voxel order (axes differ)")
    out = np.transpose(label, perm)
    new_affine = affine[:, perm + [3]]
    flips = [t for t in range(3) if dots[t, perm[t]] < 0]
    out, new_affine = _flip_axes(out, new_affine, flips)
    if not np.allclose(new_affine, target_affine, atol=TOLERANCE * max(1.0, float(np.max(tspacing)))):
        raise ResultFormatError("the label's grid is not the series' grid in another voxel order "
                                f"(origin or spacing differ: {spacing.round(4).tolist()} vs {tspacing.round(4).tolist()})")
    return out, target_affine


def _flip_axes(label: np.ndarray, affine: np.ndarray, axes: list[int]) -> tuple[np.ndarray, np.ndarray]:
    affine = affine.copy()
    for a in axes:
        affine[:3, 3] = affine[:3, 3] + affine[:3, a] * (label.shape[a] - 1)
        affine[:3, a] = -affine[:3, a]
        label = np.flip(label, axis=a)
    return np.ascontiguousarray(label), affine


def _cast(label: np.ndarray, dtype: str | None) -> np.ndarray:
    dtype = np.dtype(dtype or "uint8")
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        if label.size and (label.min() < info.min or label.max() > info.max):
            raise ResultFormatError(f"the label's values {int(label.min())}..{int(label.max())} do not fit result_dtype={dtype.name}")
    return label.astype(dtype)


def write_nrrd(path: str | Path, label: np.ndarray, affine: np.ndarray, compress: bool = False) -> Path:
    """``label`` (indexed i, j, k on the RAS ``affine``) as an NRRD whose data run ``i`` fastest,
    in LPS space (what nrrd-js, ITK and Slicer read)."""
    import nrrd

    lps = _FLIP @ np.asarray(affine, dtype=np.float64)
    header = {
        "dimension": 3,
        "space": "left-posterior-superior",
        "sizes": np.array(label.shape),
        "space directions": lps[:3, :3].T,  # one row per axis
        "space origin": lps[:3, 3],
        "kinds": ["domain", "domain", "domain"],
        "encoding": "gzip" if compress else "raw",
    }
    nrrd.write(str(path), np.asarray(label), header, index_order="F")
    return Path(path)


def convert(label_path: str | Path, fmt: ResultFormat, target_affine: np.ndarray | None = None,
            out_dir: str | Path | None = None) -> Path:
    """The answered file for the label file ``label_path`` (a NIfTI) in the format ``fmt``: the
    same file when the default is asked, else a new file (``out_dir``, default the temporary
    folder) the caller removes. NRRD answers are in OHIF's voxel order (:func:`ohif_order`)."""
    label_path = Path(label_path)
    if fmt.is_default and target_affine is None:
        return label_path
    img = nib.load(str(label_path))
    label, affine = np.asanyarray(img.dataobj), img.affine
    label = _cast(np.asarray(label), fmt.dtype)
    fd, out = tempfile.mkstemp(suffix=fmt.extension, prefix=label_path.name.split(".")[0] + "_", dir=out_dir)
    os.close(fd)
    try:
        if fmt.extension == ".nrrd":
            label, affine = ohif_order(label, affine, target_affine)
            write_nrrd(out, label, affine, fmt.compress)
        else:
            if target_affine is not None:
                label, affine = ohif_order(label, affine, target_affine)
            image = nib.Nifti1Image(label, affine)
            image.set_qform(affine, code=1)
            image.set_sform(affine, code=1)
            nib.save(image, out)
    except BaseException:
        os.unlink(out)
        raise
    return Path(out)


def answer_in(result: dict | None, fmt: ResultFormat) -> dict | None:
    """An infer's ``result`` (``{"file", "label", "params", ...}``) with its file in the format
    ``fmt``: the converted file replaces the label file, which is removed."""
    path = (result or {}).get("file")
    if not path or fmt.is_default:
        return result
    try:
        out = str(convert(path, fmt))
    except BaseException:
        Path(path).unlink(missing_ok=True)  # nothing is answered: the label file goes too
        raise
    if out != str(path):
        Path(path).unlink(missing_ok=True)
    return {**result, "file": out, **({"label": out} if result.get("label") == path else {})}
