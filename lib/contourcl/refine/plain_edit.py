"""The plain edit: refinement from clicks with no network, the baseline of the click benchmark.

A positive click adds a disk of :data:`PLAIN_EDIT_RADIUS_MM` (5 mm) radius around it, in the
axial plane, on the click's own slice only; a negative click removes the connected piece of the
structure under it on its own axial slice (in-plane, edge-connected, of the mask after the disks
are added): a clinician's eraser works a slice at a time, and the piece in 3D is, for an
over-drawn border, the whole structure. Its own voxel always ends up background. A negative
click on background removes nothing. Positive disks are added first, so a negative click on a
piece removes a disk that joined it.

Arrays are ``(i, j, k)`` voxel arrays on the grid of ``affine`` (the image's, as nibabel reads
it); the axial axis is the voxel axis closest to the world's head-foot direction
(:func:`contourcl.effort.axial_axis`), and the disk's radius is measured with the in-plane voxel
sizes of ``affine``, so it is round in mm on a non-square or oblique grid.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from contourcl.effort import axial_axis, voxel_sizes
from contourcl.refine.encoding import as_voxels

#: The radius of the disk a positive click adds, in mm.
PLAIN_EDIT_RADIUS_MM = 5.0


def _disk_on_slice(shape: tuple[int, int, int], centre, affine: np.ndarray, radius_mm: float) -> tuple[tuple, np.ndarray]:
    """``(index of the click's axial slice, the disk on that slice)``."""
    axis = axial_axis(affine)
    size = voxel_sizes(affine)
    plane = [a for a in range(3) if a != axis]
    grids = np.ogrid[tuple(slice(0, shape[a]) for a in plane)]
    distance2 = sum(((g - int(centre[a])) * size[a]) ** 2 for g, a in zip(grids, plane, strict=True))
    index: list = [slice(None)] * 3
    index[axis] = int(centre[axis])
    return tuple(index), distance2 <= radius_mm ** 2


def disk(shape: tuple[int, int, int], centre, affine: np.ndarray, radius_mm: float = PLAIN_EDIT_RADIUS_MM) -> np.ndarray:
    """The voxels of the axial slice through ``centre`` within ``radius_mm`` of it (bool, ``shape``)."""
    out = np.zeros(shape, dtype=bool)
    index, plane = _disk_on_slice(shape, centre, affine, radius_mm)
    out[index] = plane
    return out


def plain_edit(mask: np.ndarray, positive, negative, affine: np.ndarray, radius_mm: float = PLAIN_EDIT_RADIUS_MM) -> np.ndarray:
    """``mask`` (bool, ``(i, j, k)``) edited by the clicks: a disk of ``radius_mm`` on its slice
    added around each ``positive`` point, then the connected piece under each ``negative`` point
    removed on that point's axial slice. Points are ``(N, 3)`` voxel indices; returns a new bool array."""
    out = np.array(mask, dtype=bool, copy=True)
    for point in as_voxels(positive):
        index, plane = _disk_on_slice(out.shape, point, affine, radius_mm)
        out[index] |= plane
    negative = as_voxels(negative)
    if len(negative):
        axis = axial_axis(affine)
        for k in sorted({int(p[axis]) for p in negative}):
            index: list = [slice(None)] * 3
            index[axis] = k
            plane = out[tuple(index)]  # a view: removing from it removes from out
            pieces, _ = ndimage.label(plane)
            clicks = np.delete(negative[negative[:, axis] == k], axis, axis=1)
            hit = {int(v) for v in pieces[tuple(clicks.T)]} - {0}
            if hit:
                plane &= ~np.isin(pieces, sorted(hit))
        out[tuple(negative.T)] = False
    return out


class PlainEdit:
    """:func:`plain_edit` as a refinement method: ``method(ct, affine, mask, positive, negative)
    -> mask`` (the CT is not looked at)."""

    name = "plain edit"

    def __init__(self, radius_mm: float = PLAIN_EDIT_RADIUS_MM):
        self.radius_mm = float(radius_mm)

    def __call__(self, ct: np.ndarray, affine: np.ndarray, mask: np.ndarray, positive: np.ndarray, negative: np.ndarray,
                 edit_radius_mm: float | None = None, reach_mm: float | None = None) -> np.ndarray:
        """``edit_radius_mm`` and ``reach_mm`` (the refinement network's) do not apply: the disk is
        ``radius_mm``, on the click's slice."""
        return plain_edit(mask, positive, negative, affine, self.radius_mm)

    def describe(self, edit_radius_mm: float | None = None, reach_mm: float | None = None) -> dict:
        """What it does (``edit_radius_mm`` and ``reach_mm``, the refinement network's, do not apply, as in ``__call__``)."""
        return {"method": self.name, "radius_mm": self.radius_mm,
                "what": "a disk on the click's axial slice added per positive click; the connected piece under a negative click removed on its slice"}
