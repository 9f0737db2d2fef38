"""The simulated clinician: where the next click goes.

The error of a structure's mask against its reference is the missed voxels (in the reference,
not in the mask) and the over-drawn ones (in the mask, not in the reference). Their 3D connected
components (26-connectivity) are the error regions; the next click goes to the largest region
(most voxels; ties: missed before over-drawn, then the first found), at its centre: the voxel
farthest from the region's edge by a Euclidean distance transform with the grid's voxel spacing
(the grid's border counts as an edge). Voxels equally far are drawn at random with ``rng`` (seeded
by the caller: the same seed gives the same clicks). A missed region gives a positive click, an
over-drawn one a negative click; no error gives ``None``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

_FULL = np.ones((3, 3, 3), dtype=bool)


@dataclass(frozen=True)
class Click:
    """A simulated click: a voxel index and whether it says "structure" (positive)."""

    point: tuple[int, int, int]
    positive: bool
    region_voxels: int  # the size of the error region it was placed in


def _largest_region(error: np.ndarray) -> tuple[np.ndarray, int] | None:
    """The largest 3D connected component of ``error`` (a bool mask) and its size, or None."""
    if not error.any():
        return None
    labels, n = ndimage.label(error, structure=_FULL)
    sizes = np.bincount(labels.ravel(), minlength=n + 1)
    sizes[0] = 0
    k = int(np.argmax(sizes))
    return labels == k, int(sizes[k])


def region_centre(region: np.ndarray, spacing: Sequence[float], rng: np.random.Generator | None = None) -> tuple[int, int, int]:
    """The voxel of ``region`` farthest from its edge (distance transform with ``spacing`` mm);
    ties drawn with ``rng`` (the first one without)."""
    found = ndimage.find_objects(region.astype(np.uint8))[0]
    box = tuple(slice(max(0, s.start - 1), s.stop + 1) for s in found)
    local = np.pad(region[box], 1)  # the grid's border is an edge too
    dist = ndimage.distance_transform_edt(local, sampling=[float(s) for s in spacing])
    best = np.argwhere(dist >= dist.max() - 1e-9)
    pick = best[0] if rng is None or len(best) == 1 else best[rng.integers(len(best))]
    return tuple(int(p) - 1 + b.start for p, b in zip(pick, box, strict=True))


def next_click(mask: np.ndarray, reference: np.ndarray, spacing: Sequence[float], rng: np.random.Generator | None = None,
               valid: np.ndarray | None = None) -> Click | None:
    """The simulated clinician's next click on ``mask`` against ``reference`` (bool arrays of one
    grid, ``spacing`` its voxel sizes in mm), or None when they agree.

    ``valid``: where clicks may go (e.g. the slices that image the patient; a bool array of the
    grid or broadcastable to it); errors elsewhere are ignored.
    """
    mask = np.asarray(mask, dtype=bool)
    reference = np.asarray(reference, dtype=bool)
    if mask.shape != reference.shape:
        raise ValueError(f"mask shape {mask.shape} differs from the reference's {reference.shape}")
    missed = reference & ~mask
    over = mask & ~reference
    if valid is not None:
        valid = np.broadcast_to(np.asarray(valid, dtype=bool), mask.shape)
        missed &= valid
        over &= valid
    # work inside the box of all errors: the labelling costs what the box holds, not the grid
    errors = missed | over
    if not errors.any():
        return None
    box = ndimage.find_objects(errors.astype(np.uint8))[0]
    candidates = []
    for error, positive in ((missed[box], True), (over[box], False)):
        found = _largest_region(error)
        if found is not None:
            candidates.append((found[1], positive, found[0]))
    size, positive, region = max(candidates, key=lambda c: (c[0], c[1]))
    point = region_centre(region, spacing, rng)
    return Click(tuple(int(p + b.start) for p, b in zip(point, box, strict=True)), positive, size)
