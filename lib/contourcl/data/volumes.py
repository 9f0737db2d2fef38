"""Reading and writing volumes, and checking that a file can be a CT and a label belongs to its image.

:func:`read_volume` / :func:`read_ct` read an image to store, contour or train on (with the checks
below); :func:`read_nifti` reads a file as stored (a label map to score), :func:`read_ras` in RAS
order (for pictures). :func:`write_nifti` / :func:`write_label` write every volume ContourCL
produces (served label maps, stored labels, phantoms), with the affine as both qform and sform.

:func:`check_header` reads only a file's header and refuses a grid no CT has (too many voxels,
impossible spacing or field of view) *before* any voxel is read or resampled: a 100 KB file may
claim 100 mm voxels or a billion of them. :func:`check_ct_values` refuses what no CT holds
(NaN or infinite values, a constant image).

Files in, never files out: :func:`check_plain_file` refuses, before the file is opened, anything but
a regular file (a FIFO would hang the reader for ever, a device or socket is no image) and, in
:func:`read_volume`, a symbolic link; :func:`check_attached_data` refuses a header whose voxels live
in another file (NRRD ``data file:``/``datafile:``, a NIfTI-1 ``.hdr``/``.img`` pair): an upload
must never make the server read, and then contour or serve, a file of the server's choosing.
"""

from __future__ import annotations

import gzip
import io
import os
import stat
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import SimpleITK as sitk
from monai.transforms import LoadImage

from contourcl.errors import InvalidImageError, LabelMismatchError

#: Largest difference (mm) tolerated between an image's and its label's affine.
AFFINE_TOLERANCE_MM = 1e-2

#: CT values above this (HU) are tissue, not air.
TISSUE_HU = -500.0
#: An axial slice whose largest connected piece of tissue is smaller than this (cm²) is not a full
#: image of the patient. The body's cross-section is larger on every slice through a head or neck
#: (the smallest complete neck slice seen in OpenKBP: 77 cm²). OpenKBP's CTs hold values only in a region
#: around the treatment on many slices, and on the others only in islands around the drawn
#: structures (1-50 cm² each): there the image either gives the contour away (an island shaped
#: like the brainstem) or shows nothing of it (a few voxels along the cord). 96 of the 170
#: training cases have contours on such slices.
MIN_IMAGED_AREA_CM2 = 50.0


@dataclass(frozen=True)
class CTBounds:
    """What a CT grid can be. Planning CTs are 512 x 512 in-plane, 0.5-1.5 mm pixels, 1-5 mm
    slices, up to a few hundred slices; OpenKBP's are 128^3 at up to 5.4 mm."""

    max_voxels: int = 512 * 512 * 1000  # 262 M voxels (1 GB as float32)
    min_spacing_mm: float = 0.2
    max_spacing_mm: float = 10.0
    max_extent_mm: float = 2000.0  # along any axis (a whole-body scan is under 2 m)


CT_BOUNDS = CTBounds()


#: the most of a NRRD header read to look for a detached data file (a real header is a few hundred bytes)
NRRD_HEADER_BYTES = 64 * 1024
_KINDS = ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
          (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a folder"), (stat.S_ISLNK, "a symbolic link"))


def check_plain_file(path: str | Path, what: str = "image", name: str | None = None, follow_links: bool = True) -> None:
    """Raise :class:`InvalidImageError` unless ``path`` is a regular file, judged before it is
    opened (``stat``, or ``lstat`` with ``follow_links=False``, which also refuses a symbolic link)."""
    name = name or Path(path).name
    try:
        mode = (os.stat if follow_links else os.lstat)(path).st_mode
    except FileNotFoundError as err:
        raise InvalidImageError(f"cannot read the {what} {name!r}: the file does not exist") from err
    if not stat.S_ISREG(mode):
        kind = next((k for test, k in _KINDS if test(mode)), "not a regular file")
        raise InvalidImageError(f"the {what} {name!r} is {kind}, not a regular file: refused without reading it")


def _nrrd_data_file(head: bytes) -> str | None:
    """The ``data file``/``datafile`` field of a NRRD header (``head``: the file's first bytes), or None."""
    for raw in head.split(b"\n")[1:]:  # the first line is the magic, NRRD000x
        line = raw.strip(b"\r")
        if not line:
            return None  # the blank line ends the header: the data is attached
        key, sep, value = line.partition(b":")
        if line.startswith(b"#") or not sep or value.startswith(b"="):  # a comment, or a key:=value pair
            continue
        if key.replace(b" ", b"").lower() == b"datafile":
            return value.strip().decode("latin-1")
    return None


def _nifti1_detached(path: Path) -> bool:
    """Whether a NIfTI-1 header says its voxels are in a separate ``.img`` file (magic ``ni1``)."""
    with open(path, "rb") as f:
        head = f.read(2)
        f.seek(0)
        try:
            header = (gzip.GzipFile(fileobj=f) if head == b"\x1f\x8b" else f).read(348)
        except (OSError, EOFError):  # not gzip after all: the readers say what is wrong
            return False
    return len(header) == 348 and header[344:348] == b"ni1\x00"


def check_attached_data(path: str | Path, what: str = "image", name: str | None = None) -> None:
    """Raise :class:`InvalidImageError` if ``path`` is a header whose voxels live in another file:
    a NRRD with ``data file:`` (or ``datafile:``), or a NIfTI-1 header with magic ``ni1``."""
    name = name or Path(path).name
    with open(path, "rb") as f:
        head = f.read(NRRD_HEADER_BYTES)
    if head.startswith(b"NRRD"):
        target = _nrrd_data_file(head)
        if target is not None:
            raise InvalidImageError(f"the {what} {name!r} is a NRRD header whose voxels are in another file (data file: {target[:200]!r}): "
                                    "only NRRD files with their data attached are accepted")
        return
    if _nifti1_detached(Path(path)):
        raise InvalidImageError(f"the {what} {name!r} is a NIfTI header whose voxels are in a separate .img file: send a single-file NIfTI")


def check_header(path: str | Path, what: str = "image", name: str | None = None, bounds: CTBounds = CT_BOUNDS) -> tuple[tuple[int, ...], tuple[float, ...]]:
    """``(size, spacing)`` from ``path``'s header alone; raise :class:`InvalidImageError` when
    the file is not a regular file, keeps its voxels in another file (:func:`check_attached_data`),
    cannot be read or its grid is outside ``bounds``."""
    name = name or Path(path).name
    check_plain_file(path, what, name)
    check_attached_data(path, what, name)
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as err:
        first = str(err).strip().splitlines()[-1][:200] if str(err).strip() else type(err).__name__
        raise InvalidImageError(f"cannot read the {what} {name!r}: not a NIfTI/NRRD volume ({first})") from err
    size = tuple(int(s) for s in reader.GetSize())
    spacing = tuple(float(s) for s in reader.GetSpacing())
    voxels = int(np.prod(size, dtype=np.int64))
    if voxels > bounds.max_voxels:
        raise InvalidImageError(f"the {what} {name!r} has {voxels:,} voxels {size}: more than a CT has (at most {bounds.max_voxels:,})")
    bad = [s for s in spacing[:3] if not (bounds.min_spacing_mm <= s <= bounds.max_spacing_mm)]
    if bad:
        raise InvalidImageError(
            f"the {what} {name!r} has voxel spacing {tuple(round(s, 4) for s in spacing)} mm: a CT's spacing lies within "
            f"{bounds.min_spacing_mm}-{bounds.max_spacing_mm} mm"
        )
    extent = [n * s for n, s in zip(size[:3], spacing[:3], strict=False)]
    if max(extent) > bounds.max_extent_mm:
        raise InvalidImageError(f"the {what} {name!r} spans {tuple(round(e) for e in extent)} mm: more than a CT (at most {bounds.max_extent_mm:g} mm)")
    return size, spacing


def check_ct_values(array, name: str) -> None:
    """Raise :class:`InvalidImageError` for values no CT holds: NaN or infinite, or one constant."""
    arr = np.asarray(array)
    if np.issubdtype(arr.dtype, np.floating) and not np.isfinite(arr).all():
        raise InvalidImageError(f"the image {name!r} holds NaN or infinite values: not a CT")
    if arr.size and arr.min() == arr.max():
        raise InvalidImageError(f"the image {name!r} is constant (every voxel {arr.flat[0]}): not a CT")


def read_volume(path: str | Path, what: str = "image", name: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``(array, affine)`` of a 3D volume (NIfTI, NRRD, ... via MONAI's readers).

    Raises :class:`InvalidImageError` for a symbolic link or anything but a regular file
    (:func:`check_plain_file`), a file that cannot be read, whose header is outside
    :data:`CT_BOUNDS` (checked before the voxels are read) or that is not a 3D volume (a
    trailing singleton dimension is allowed and dropped).
    """
    name = name or Path(path).name
    check_plain_file(path, what, name, follow_links=False)
    check_header(path, what, name)
    try:
        img = LoadImage(image_only=True)(str(path))
    except Exception as err:
        cause = err.__cause__ or err
        raise InvalidImageError(f"cannot read the {what} {name!r}: {type(cause).__name__}: {cause}") from err
    arr = np.asarray(img)
    while arr.ndim > 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim != 3 or min(arr.shape) < 2:
        raise InvalidImageError(f"the {what} {name!r} is not a 3D volume (shape {tuple(np.asarray(img).shape)})")
    if not np.issubdtype(arr.dtype, np.number):
        raise InvalidImageError(f"the {what} {name!r} does not hold numbers ({arr.dtype})")
    return arr, np.asarray(img.affine, dtype=np.float64)


def read_ct(path: str | Path, name: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """:func:`read_volume` of a CT, with :func:`check_ct_values`: what an image must pass to be
    stored, contoured or trained on."""
    name = name or Path(path).name
    arr, affine = read_volume(path, "image", name)
    check_ct_values(arr, name)
    return arr, affine


def check_label_geometry(image: tuple[np.ndarray, np.ndarray], label: tuple[np.ndarray, np.ndarray], label_name: str = "label") -> None:
    """Raise :class:`LabelMismatchError` unless the label lies on the image's grid."""
    (img, img_affine), (lab, lab_affine) = image, label
    if img.shape != lab.shape:
        raise LabelMismatchError(f"the {label_name} has shape {lab.shape} but its image has shape {img.shape}")
    diff = float(np.abs(img_affine - lab_affine).max())
    if diff > AFFINE_TOLERANCE_MM:
        raise LabelMismatchError(
            f"the {label_name}'s affine differs from its image's by {diff:.3g} mm "
            f"(label {np.round(lab_affine, 3).tolist()} vs image {np.round(img_affine, 3).tolist()})"
        )
    if np.issubdtype(lab.dtype, np.floating) and not np.all(np.equal(np.mod(lab, 1), 0)):
        raise LabelMismatchError(f"the {label_name} holds non-integer values: it is not a label map")


def imaged_slices(ct: np.ndarray, affine: np.ndarray, min_area_cm2: float = MIN_IMAGED_AREA_CM2) -> tuple[int, np.ndarray]:
    """The axial axis of ``ct`` (on ``affine``, RAS) and, along it, which slices image the patient.

    A slice images the patient when its largest connected piece of tissue (:data:`TISSUE_HU`,
    4-connected in the slice) covers at least ``min_area_cm2``. Other slices are neither scored
    (:func:`contourcl.evaluation.prepare_cases`) nor trained on
    (:class:`contourcl.data.transforms.UnimagedSlicesToBackgroundd`).
    """
    from scipy import ndimage

    ct = np.asarray(ct)
    affine = np.asarray(affine, dtype=np.float64)
    columns = affine[:3, :3]
    spacing = np.linalg.norm(columns, axis=0)
    axis = int(np.argmax(np.abs(columns[2]) / spacing))  # the voxel axis closest to inferior-superior
    in_plane = [a for a in range(3) if a != axis]
    pixel_cm2 = float(spacing[in_plane[0]] * spacing[in_plane[1]]) / 100.0
    tissue = np.moveaxis(ct > TISSUE_HU, axis, 0)
    least = min_area_cm2 / pixel_cm2  # in pixels
    imaged = tissue.sum(axis=(1, 2)) >= least  # a slice with less tissue in all has no such piece
    for k in np.nonzero(imaged)[0]:
        sizes = np.bincount(ndimage.label(tissue[k])[0].ravel())[1:]
        imaged[k] = (sizes.max() if sizes.size else 0) >= least
    return axis, imaged


def blank_slices(label: np.ndarray, imaged: tuple[int, np.ndarray]) -> tuple[np.ndarray, int]:
    """``label`` set to background where ``imaged = (axis, kept)`` (:func:`imaged_slices`) says a
    slice does not image the patient, and how many labeled voxels that removed."""
    axis, imaged = imaged
    index = [slice(None)] * 3
    index[axis] = ~imaged
    index = tuple(index)
    removed = int(np.count_nonzero(label[index]))
    if removed:
        label = np.array(label, copy=True)
        label[index] = 0
    return label, removed


def read_nifti(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """``(array, affine)`` of a NIfTI file as stored: no reorientation and no checks."""
    img = nib.load(str(path))
    return np.asanyarray(img.dataobj), np.asarray(img.affine, dtype=np.float64)


def to_ras(array: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """``array`` (on ``affine``) with its axes reordered and flipped to RAS, the closest canonical order."""
    return np.asanyarray(nib.as_closest_canonical(nib.Nifti1Image(np.asanyarray(array), affine)).dataobj)


def read_ras(path: str | Path) -> np.ndarray:
    """A NIfTI file's array in RAS order (what :func:`contourcl.plots.contour_overlay` draws)."""
    return np.asanyarray(nib.as_closest_canonical(nib.load(str(path))).dataobj)


def write_nifti(path: str | Path, array: np.ndarray, affine: np.ndarray) -> Path:
    """Write ``array`` (its own dtype) as NIfTI with ``affine`` as qform and sform (code 1, scanner) in mm."""
    nib.save(_nifti(array, affine), str(path))
    return Path(path)


def _nifti(array: np.ndarray, affine: np.ndarray) -> nib.Nifti1Image:
    """``array`` (its own dtype) as NIfTI with ``affine`` as qform and sform (code 1, scanner) in mm."""
    array = np.asanyarray(array)
    affine = np.asarray(affine, dtype=np.float64)
    img = nib.Nifti1Image(array, affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    img.header.set_xyzt_units("mm")
    img.set_data_dtype(array.dtype)
    return img


def write_label(path: str | Path, label: np.ndarray, affine: np.ndarray) -> Path:
    """Write a label map (uint8) on ``affine``: :func:`write_nifti`."""
    return write_nifti(path, np.asarray(label).astype(np.uint8), affine)


def label_bytes(label: np.ndarray, affine: np.ndarray) -> bytes:
    """What :func:`write_label` writes to a ``.nii.gz`` file, as bytes (gzip without a time stamp,
    so the same label always gives the same bytes): for a file written whole, atomically."""
    buffer = io.BytesIO()
    with gzip.GzipFile(fileobj=buffer, mode="wb", mtime=0) as out:
        out.write(_nifti(np.asarray(label).astype(np.uint8), affine).to_bytes())
    return buffer.getvalue()
