"""Reading volumes and checking that a label belongs to its image."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from monai.transforms import LoadImage

from contourcl.errors import InvalidImageError, LabelMismatchError

#: Largest difference (mm) tolerated between an image's and its label's affine.
AFFINE_TOLERANCE_MM = 1e-2


def read_volume(path: str | Path, what: str = "image", name: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``(array, affine)`` of a 3D volume (NIfTI, NRRD, ... via MONAI's readers).

    Raises :class:`InvalidImageError` for a file that cannot be read or is not a 3D volume
    (a trailing singleton dimension is allowed and dropped).
    """
    name = name or Path(path).name
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
