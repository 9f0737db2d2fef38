"""Clicks as input maps for the refinement network.

Each click is a small Gaussian disk in its axial plane that reaches a few slices above and below:

- in-plane: ``exp(-d^2 / (2 sigma^2))`` with ``sigma = radius / 2`` for in-plane distances ``d``
  (mm, with the grid's pixel spacing) up to :data:`CLICK_RADIUS_MM` (9 mm: 3 pixels of the
  shipped models' 3 mm grid), 0 beyond;
- along the axial axis: the slices within :data:`CLICK_REACH_MM` (7.5 mm) of the click's slice,
  at least one on each side (:func:`reach_slices`: 2 slices on 3 mm slices, 3 on 2.5 mm, 6 on
  1.25 mm), weighted ``1 - 0.5 |dz| / reach`` (1 on the click's slice, 0.5 at the reach), 0 beyond.

Positive clicks make one channel, negative clicks the other; where clicks overlap the map keeps
the larger value. The axial axis is the voxel axis that runs closest to head-foot
(:func:`contourcl.effort.axial_axis`), whatever its position in the array: :func:`click_maps`
works on the image's own grid (any voxel order, oblique or feet-first affines), and
:func:`axial_maps` on a grid whose axial axis is last (the refiner's).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np

from contourcl.effort import axial_axis, voxel_sizes

#: in-plane radius of a click's disk (mm); the Gaussian's sigma is half of it
CLICK_RADIUS_MM = 9.0
#: how far above and below its slice a click reaches (mm); at least one slice each way
CLICK_REACH_MM = 7.5
#: how far from a click, in its axial plane, the refinement network may change the mask (mm), on
#: the slices the click reaches: a click corrects what is near it and leaves the rest alone
EDIT_RADIUS_MM = 20.0


@dataclass(frozen=True)
class ClickScope:
    """How far one model's clicks act: the network may change the mask within ``edit_radius_mm`` of
    a click in its axial plane, on the slices within ``reach_mm`` of its slice; ``None``: the
    refinement file's (what it was trained with). A model config sets it (``gtv``: a target's
    errors are whole regions); the refinement method takes it as keyword arguments
    (:meth:`kwargs`)."""

    edit_radius_mm: float | None = None
    reach_mm: float | None = None

    def __post_init__(self):
        for name, value in asdict(self).items():
            if value is not None and not (isinstance(value, int | float) and float(value) > 0):
                raise ValueError(f"{name} must be a positive number of mm, not {value!r}")

    def kwargs(self) -> dict:
        """``{"edit_radius_mm": ..., "reach_mm": ...}``: the refinement method's keyword arguments."""
        return asdict(self)


def model_scopes(models: Sequence[str], **per_model: str) -> dict[str, ClickScope]:
    """Each model's :class:`ClickScope` from options of the form ``"MODEL=MM,..."``, one per field
    (``edit_radius_mm="gtv=40"``, ``reach_mm="gtv=25"``); models not named get the file's.
    Raises ValueError naming a malformed item or an unknown model."""
    values: dict[str, dict] = {m: {} for m in models}
    for field, text in per_model.items():
        for item in filter(None, (x.strip() for x in (text or "").split(","))):
            name, _, mm = item.partition("=")
            if name.strip() not in values:
                raise ValueError(f"{item!r}: {name.strip()!r} is not one of the models {list(models)}")
            try:
                values[name.strip()][field] = float(mm)
            except ValueError:
                raise ValueError(f"{item!r}: give MODEL=MM, e.g. gtv=40") from None
    return {m: ClickScope(**v) for m, v in values.items()}


def scope_options(scopes: Mapping[str, ClickScope]) -> dict[str, str]:
    """The ``"MODEL=MM,..."`` option text of each field of ``scopes`` (the inverse of
    :func:`model_scopes`; fields no model sets are left out)."""
    out: dict[str, str] = {}
    for field in ("edit_radius_mm", "reach_mm"):
        text = ",".join(f"{m}={getattr(s, field):g}" for m, s in scopes.items() if getattr(s, field) is not None)
        if text:
            out[field] = text
    return out


def reach_slices(slice_mm: float, reach_mm: float = CLICK_REACH_MM) -> int:
    """How many slices above and below its own a click reaches on slices ``slice_mm`` apart."""
    return max(1, int(np.floor(reach_mm / float(slice_mm) + 1e-6)))


def as_voxels(points: np.ndarray | Sequence | None) -> np.ndarray:
    """``points`` as an integer ``(N, 3)`` array of voxel indices (``(0, 3)`` for none)."""
    if points is None:
        return np.zeros((0, 3), np.int64)
    return np.asarray(points, dtype=np.int64).reshape(-1, 3)


def as_points(points: np.ndarray | Sequence | None) -> np.ndarray:
    """``points`` as a float ``(N, 3)`` array (``(0, 3)`` for none)."""
    if points is None:
        return np.zeros((0, 3))
    p = np.asarray(points, dtype=np.float64)
    if p.size == 0:
        return np.zeros((0, 3))
    if p.ndim != 2 or p.shape[1] != 3:
        raise ValueError(f"clicks must be an (N, 3) array of voxel indices, not shape {p.shape}")
    return p


def axial_maps(points: np.ndarray, shape: tuple[int, int, int], pixel_mm: Sequence[float], slice_mm: float,
               slices: Sequence[int] | None = None, radius_mm: float = CLICK_RADIUS_MM,
               reach_mm: float = CLICK_REACH_MM) -> np.ndarray:
    """The click map ``(H, W, len(slices))`` (float32, in [0, 1]) of ``points`` on a grid of
    ``shape`` ``(H, W, D)`` whose last axis is axial, for the axial ``slices`` (all by default).

    ``points`` ``(N, 3)``: voxel coordinates ``(row, column, slice)``; in-plane they may be
    fractional (a click mapped onto a resampled grid), the slice is rounded.
    """
    points = as_points(points)
    h, w, d = (int(s) for s in shape)
    slices = np.arange(d) if slices is None else np.asarray(slices, dtype=np.int64)
    out = np.zeros((h, w, len(slices)), dtype=np.float32)
    if not len(points) or not len(slices):
        return out
    py, px = float(pixel_mm[0]), float(pixel_mm[1])
    sigma = radius_mm / 2.0
    reach = reach_slices(slice_mm, reach_mm)
    reach_weight = max(reach_mm, reach * float(slice_mm))
    where = {int(z): n for n, z in enumerate(slices)}
    ry, rx = int(np.ceil(radius_mm / py)), int(np.ceil(radius_mm / px))
    for y, x, z in points:
        z = int(round(z))
        y0, y1 = max(0, int(np.floor(y)) - ry), min(h, int(np.ceil(y)) + ry + 1)
        x0, x1 = max(0, int(np.floor(x)) - rx), min(w, int(np.ceil(x)) + rx + 1)
        if y0 >= y1 or x0 >= x1:
            continue
        dy = (np.arange(y0, y1) - y)[:, None] * py
        dx = (np.arange(x0, x1) - x)[None, :] * px
        dist2 = dy ** 2 + dx ** 2
        disk = np.where(dist2 <= radius_mm ** 2, np.exp(-dist2 / (2 * sigma ** 2)), 0.0).astype(np.float32)
        for dz in range(-reach, reach + 1):
            n = where.get(z + dz)
            if n is None:
                continue
            weight = 1.0 - 0.5 * abs(dz) * float(slice_mm) / reach_weight
            np.maximum(out[y0:y1, x0:x1, n], disk * weight, out=out[y0:y1, x0:x1, n])
    return out


def edit_region(points: np.ndarray, shape: tuple[int, int, int], pixel_mm: Sequence[float], slice_mm: float,
                slices: Sequence[int] | None = None, radius_mm: float = EDIT_RADIUS_MM,
                reach_mm: float = CLICK_REACH_MM) -> np.ndarray:
    """Where clicks at ``points`` may change the mask: ``(H, W, len(slices))`` bool, within
    ``radius_mm`` of a click in its axial plane on the slices it reaches (the grid of
    :func:`axial_maps`)."""
    return axial_maps(points, shape, pixel_mm, slice_mm, slices=slices, radius_mm=radius_mm, reach_mm=reach_mm) > 0


def click_maps(positive: np.ndarray | Sequence | None, negative: np.ndarray | Sequence | None, shape: tuple[int, int, int],
               affine: np.ndarray, radius_mm: float = CLICK_RADIUS_MM, reach_mm: float = CLICK_REACH_MM) -> np.ndarray:
    """The two click maps ``(2, *shape)`` (positive, negative) on the image's own grid.

    ``positive``, ``negative``: ``(N, 3)`` voxel indices in the image's voxel order (as nibabel
    reads the file); ``affine``: its voxel-to-world matrix, which says which axis is axial and the
    voxel sizes.
    """
    axis = axial_axis(affine)
    order = [a for a in range(3) if a != axis] + [axis]
    sizes = voxel_sizes(affine)
    moved = tuple(int(shape[a]) for a in order)
    maps = []
    for points in (positive, negative):
        p = as_points(points)[:, order]
        m = axial_maps(p, moved, (sizes[order[0]], sizes[order[1]]), sizes[axis], radius_mm=radius_mm, reach_mm=reach_mm)
        maps.append(np.moveaxis(m, 2, axis))
    return np.stack(maps)
