"""Refine one structure's mask from clicks: :class:`Refiner`, what the server calls.

``Refiner.from_file(path)(ct, affine, mask, positive, negative)`` takes arrays in the image's own
voxel order (as nibabel reads the file; ``affine`` its voxel-to-world matrix), clicks as ``(N, 3)``
voxel indices in that order, and returns the structure's new mask on the same grid.

How: the arrays are viewed in RAS order (:class:`Orientation`: a transpose and flips, no copy; the
axial axis last), as the shipped models' preprocessing orients a CT. Only the axial slices the
clicks reach (:func:`contourcl.refine.encoding.reach_slices` around each click's slice) are
recomputed; every other voxel is the input mask's, exactly. Those slices are resampled in-plane
to the model file's grid (bilinear; the CT windowed after, the mask thresholded at 0.5), the click
maps drawn on that grid, the network run on the window of those slices around the clicks'
edit region (:func:`crop_window`; the whole slices without an edit radius; zero-padded to a
multiple of 32; a network with slice context, :func:`contourcl.refine.network.has_context`, also
gets the CT and the input mask of each slice's neighbours, :func:`neighbours`), and its answer kept only within the edit radius of a click
(:func:`contourcl.refine.encoding.edit_region`: the file's, or the caller's for its model, e.g.
``gtv``'s config; files without one and no caller's: everywhere on those slices).
Where that answer differs from the current mask, it is resampled back (bilinear, 0.5); everywhere
else the input mask is kept exactly. The slice grid is kept: the network is 2D.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from nibabel.orientations import io_orientation

from contourcl.effort import voxel_sizes
from contourcl.models.checkpoint import ModelMeta, load_model
from contourcl.models.networks import ContourUNet
from contourcl.refine.encoding import (
    CLICK_RADIUS_MM,
    CLICK_REACH_MM,
    as_voxels,
    axial_maps,
    edit_region,
    reach_slices,
)
from contourcl.refine.network import MASK_PRIOR_LOGIT, has_context, refine_logits


@dataclass(frozen=True)
class Orientation:
    """The axis permutation and flips that view an array of an image in RAS voxel order.

    ``perm[c]``: the image's voxel axis that RAS axis ``c`` comes from; ``flip[c]``: whether it runs
    the other way. Views (:meth:`view`) are numpy views: writing into one writes the image's array.
    """

    perm: tuple[int, int, int]
    flip: tuple[bool, bool, bool]

    @classmethod
    def of(cls, affine: np.ndarray) -> Orientation:
        ornt = io_orientation(np.asarray(affine, dtype=np.float64))
        perm = [0, 0, 0]
        flip = [False, False, False]
        for axis, (to, direction) in enumerate(ornt):
            perm[int(to)] = axis
            flip[int(to)] = bool(direction < 0)
        return cls(tuple(perm), tuple(flip))

    def view(self, array: np.ndarray) -> np.ndarray:
        """``array`` (the image's voxel order) in RAS order."""
        out = np.transpose(array, self.perm)
        return out[tuple(slice(None, None, -1) if f else slice(None) for f in self.flip)]

    def points(self, points: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        """Voxel indices ``(N, 3)`` of a grid of ``shape`` (the image's order), in RAS order."""
        p = np.asarray(points, dtype=np.int64).reshape(-1, 3)[:, list(self.perm)].copy()
        for c, f in enumerate(self.flip):
            if f:
                p[:, c] = int(shape[self.perm[c]]) - 1 - p[:, c]
        return p

    def spacing(self, affine: np.ndarray) -> np.ndarray:
        """The voxel sizes (mm) in RAS order."""
        return voxel_sizes(affine)[list(self.perm)]


def network_size(size: tuple[int, int], pixel_mm: tuple[float, float], spacing: tuple[float, float]) -> tuple[int, int]:
    """The in-plane size on the network's grid (``spacing`` mm) of ``size`` pixels of ``pixel_mm``."""
    return tuple(max(1, int(round(n * float(p) / float(s)))) for n, p, s in zip(size, pixel_mm, spacing, strict=True))


def to_network_points(points: np.ndarray, size: tuple[int, int], net_size: tuple[int, int]) -> np.ndarray:
    """Voxel coordinates ``(N, 3)`` (RAS order) moved onto the network's in-plane grid (the
    resampling of :func:`resample_slices`: bilinear, ``align_corners=False``); slices unchanged."""
    p = np.asarray(points, dtype=np.float64).reshape(-1, 3).copy()
    for c in range(2):
        p[:, c] = (p[:, c] + 0.5) * net_size[c] / size[c] - 0.5
    return p


def resample_slices(slices: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``(N, C, H, W)`` resampled in-plane to ``size`` (bilinear, ``align_corners=False``)."""
    if tuple(slices.shape[-2:]) == tuple(size):
        return slices
    return torch.nn.functional.interpolate(slices, size=tuple(size), mode="bilinear", align_corners=False)


def windowed(hu: torch.Tensor, window: tuple[float, float]) -> torch.Tensor:
    """CT values (HU) windowed to ``window`` and scaled to [0, 1], as the model files' preprocessing."""
    lo, hi = float(window[0]), float(window[1])
    return ((hu - lo) / (hi - lo)).clamp_(0.0, 1.0)


def run_network(network: ContourUNet, inputs: torch.Tensor, batch: int = 16, device: str | torch.device = "cpu",
                prior: float = MASK_PRIOR_LOGIT) -> torch.Tensor:
    """Probabilities ``(N, H, W)`` of the network on ``(N, 4, H, W)`` inputs, zero-padded to a
    multiple of 32 in-plane (and cropped back)."""
    n, _, h, w = inputs.shape
    hp, wp = -(-h // 32) * 32, -(-w // 32) * 32
    top, left = (hp - h) // 2, (wp - w) // 2
    padded = torch.nn.functional.pad(inputs, (left, wp - w - left, top, hp - h - top))
    device = torch.device(device)
    out = []
    with torch.no_grad(), torch.autocast(device.type, enabled=device.type == "cuda"):
        for i in range(0, n, batch):
            out.append(refine_logits(network, padded[i : i + batch].to(device), prior).cpu())
    logits = torch.cat(out)[:, top : top + h, left : left + w]
    return torch.sigmoid(logits)


#: the least in-plane window (network pixels) the network answers clicks on: its training windows' size
WINDOW = 96
#: context (network pixels) kept around the region a click may change
WINDOW_MARGIN = 16


def crop_window(region: np.ndarray, size: int = WINDOW, margin: int = WINDOW_MARGIN, multiple: int = 32) -> tuple[slice, slice]:
    """The in-plane window ``(rows, columns)`` of a slice the network runs on to answer inside
    ``region`` (``(H, W)`` bool, on the network's grid): the region's bounding box and ``margin``
    pixels of context around it, at least ``size`` pixels (the training windows' size), rounded up to
    a ``multiple``, and kept inside the slice (the whole axis where the slice is not larger)."""
    window = []
    for axis in range(2):
        n = region.shape[axis]
        hit = np.nonzero(region.any(axis=1 - axis))[0]
        if not len(hit):
            return slice(0, 0), slice(0, 0)
        lo, hi = int(hit[0]) - margin, int(hit[-1]) + 1 + margin
        want = -(-max(hi - lo, size) // multiple) * multiple
        if want >= n:
            window.append(slice(0, n))
            continue
        lo = min(max(0, (lo + hi - want) // 2), n - want)
        window.append(slice(lo, lo + want))
    return window[0], window[1]


def as_slices(volume: np.ndarray) -> torch.Tensor:
    """Axial slices ``(H, W, n)`` as a float32 batch ``(n, 1, H, W)``."""
    return torch.from_numpy(np.ascontiguousarray(np.moveaxis(volume, 2, 0), dtype=np.float32))[:, None]


def neighbours(zs: np.ndarray, depth: int) -> tuple[np.ndarray, np.ndarray]:
    """The slice below and the slice above each of ``zs`` on a grid of ``depth`` slices (the slice
    itself at the grid's ends): what a network with slice context sees beside each slice."""
    zs = np.asarray(zs, dtype=np.int64)
    return np.clip(zs - 1, 0, depth - 1), np.clip(zs + 1, 0, depth - 1)


def reached_slices(points: np.ndarray, depth: int, slice_mm: float, reach_mm: float = CLICK_REACH_MM) -> np.ndarray:
    """The sorted axial slices (last axis of a RAS grid of ``depth`` slices) that clicks at
    ``points`` (RAS voxel indices) reach."""
    reach = reach_slices(slice_mm, reach_mm)
    reached = set()
    for z in np.asarray(points).reshape(-1, 3)[:, 2]:
        z = int(round(float(z)))
        reached.update(range(max(0, z - reach), min(depth, z + reach + 1)))
    return np.asarray(sorted(reached), dtype=np.int64)


class Refiner:
    """The refinement network of a model file, answering clicks on any CT's grid."""

    def __init__(self, network: ContourUNet, meta: ModelMeta, device: str | torch.device = "cpu"):
        self.network = network.to(device).eval()
        self.meta = meta
        self.device = device
        encoding = dict(meta.provenance.get("encoding", {}))
        self.radius_mm = float(encoding.get("radius_mm", CLICK_RADIUS_MM))
        self.reach_mm = float(encoding.get("reach_mm", CLICK_REACH_MM))
        edit = encoding.get("edit_radius_mm")  # a file without one changes the whole reached slices
        self.edit_radius_mm = None if edit is None else float(edit)
        self.prior = float(meta.provenance.get("mask_prior_logit", MASK_PRIOR_LOGIT))
        self.context = has_context(network)  # the neighbouring slices as inputs too
        self._lock = threading.Lock()  # one request at a time through the network

    @classmethod
    def from_file(cls, path: str | Path, device: str | torch.device = "cpu") -> Refiner:
        network, meta = load_model(path, device)
        try:
            has_context(network)  # the inputs: 4, or 8 with slice context
        except ValueError as e:
            raise ValueError(f"{Path(path).name} is not a refinement model file: {e}") from None
        if int(network.config.out_channels) != 1:
            raise ValueError(f"{Path(path).name} is not a refinement model file: {network.config.out_channels} outputs, not 1")
        return cls(network, meta, device)

    def __call__(self, ct: np.ndarray, affine: np.ndarray, mask: np.ndarray, positive: np.ndarray, negative: np.ndarray,
                 edit_radius_mm: float | None = None, reach_mm: float | None = None) -> np.ndarray:
        """The structure's new mask (bool, ``mask``'s grid) after the clicks ``positive`` and
        ``negative`` (``(N, 3)`` voxel indices of the image's voxel order); the network's answer
        kept within ``edit_radius_mm`` of a click, on the slices within ``reach_mm`` of its slice
        (defaults: the file's)."""
        ct = np.asarray(ct)
        mask = np.asarray(mask, dtype=bool)
        if ct.ndim != 3 or mask.shape != ct.shape:
            raise ValueError(f"the CT {ct.shape} and the mask {mask.shape} must be 3D arrays of one grid")
        pos, neg = as_voxels(positive), as_voxels(negative)
        for p in (pos, neg):
            if len(p) and ((p < 0).any() or (p >= np.asarray(ct.shape)).any()):
                raise ValueError(f"a click lies outside the image of shape {ct.shape}")
        out = mask.copy()
        if not len(pos) and not len(neg):
            return out
        orient = Orientation.of(affine)
        spacing = orient.spacing(affine)
        ras_ct, ras_out = orient.view(ct), orient.view(out)
        ras_pos, ras_neg = orient.points(pos, ct.shape), orient.points(neg, ct.shape)
        radius, reach = self.scope(edit_radius_mm, reach_mm)
        zs = reached_slices(np.concatenate([ras_pos, ras_neg]), ras_ct.shape[2], spacing[2], reach)
        context = None
        if self.context:  # the CT and the input mask on each slice's neighbours (the slice itself at the ends)
            below, above = neighbours(zs, ras_ct.shape[2])
            context = (ras_ct[:, :, below], ras_ct[:, :, above], ras_out[:, :, below], ras_out[:, :, above])
        new = self.refine_slices(ras_ct[:, :, zs], ras_out[:, :, zs], ras_pos, ras_neg, zs, spacing, radius, reach, context)
        ras_out[:, :, zs] = new
        return out

    def scope(self, edit_radius_mm: float | None = None, reach_mm: float | None = None) -> tuple[float | None, float]:
        """How far clicks act: ``(edit radius, reach)`` in mm, a model's own where given, else the
        file's (an edit radius of ``None``: the whole reached slices)."""
        return (self.edit_radius_mm if edit_radius_mm is None else float(edit_radius_mm),
                self.reach_mm if reach_mm is None else float(reach_mm))

    def refine_slices(self, ct: np.ndarray, mask: np.ndarray, positive: np.ndarray, negative: np.ndarray, zs: np.ndarray,
                      spacing: np.ndarray, edit_radius_mm: float | None, reach_mm: float,
                      context: tuple[np.ndarray, ...] | None = None) -> np.ndarray:
        """The new mask ``(H, W, len(zs))`` of the axial slices ``zs`` (RAS order: ``ct`` and
        ``mask`` are those slices), for clicks given as RAS voxel indices of the whole grid; the
        network's answer kept within ``edit_radius_mm`` of a click (``None``: everywhere), the
        click maps reaching ``reach_mm`` (:meth:`scope`). With an edit radius the network runs on
        the window of the slices around it (:func:`crop_window`), not the whole slices. ``context``:
        the CT below, the CT above, the mask below and the mask above each slice, for a network
        with slice context."""
        size = ct.shape[:2]
        pixel = (float(spacing[0]), float(spacing[1]))
        net_size = network_size(size, pixel, self.meta.spacing)
        net_pixel = (size[0] * pixel[0] / net_size[0], size[1] * pixel[1] / net_size[1])
        def ct_in(slices: np.ndarray) -> torch.Tensor:  # (H, W, n) HU -> (n, 1, h, w) windowed, the network's grid
            return windowed(resample_slices(as_slices(slices), net_size), self.meta.window)

        def mask_in(slices: np.ndarray) -> torch.Tensor:
            return (resample_slices(as_slices(slices), net_size) > 0.5).float()

        image, current = ct_in(ct), mask_in(mask)
        extra = [] if context is None else [ct_in(context[0]), ct_in(context[1]), mask_in(context[2]), mask_in(context[3])]
        points = [to_network_points(p, size, net_size) for p in (positive, negative)]  # on the network's grid
        grid = (*net_size, int(zs.max()) + 1)
        maps = [
            torch.from_numpy(np.moveaxis(axial_maps(p, grid, net_pixel, float(spacing[2]), slices=zs, radius_mm=self.radius_mm,
                                                    reach_mm=reach_mm), 2, 0))[:, None]
            for p in points
        ]
        inputs = torch.cat([image, current, *maps, *extra], dim=1)
        was = current[:, 0] > 0.5
        window = (slice(None), slice(None))
        region = None
        if edit_radius_mm is not None:  # only near the clicks: the network sees the window around them
            region = torch.from_numpy(np.moveaxis(edit_region(np.concatenate(points), grid, net_pixel, float(spacing[2]), slices=zs,
                                                              radius_mm=edit_radius_mm, reach_mm=reach_mm), 2, 0))
            window = crop_window(region.any(dim=0).numpy())
        new = was.clone()
        if region is None or bool(region.any()):  # else it holds no pixel of the grid (a radius under a pixel)
            with self._lock:
                probs = run_network(self.network, inputs[(slice(None), slice(None), *window)], device=self.device, prior=self.prior)
            new[(slice(None), *window)] = probs > 0.5
        if region is not None:
            new = torch.where(region, new, was)
        # back on the CT's grid, only what the network changed: elsewhere the mask is exactly the input's
        changed = resample_slices((new != was).float()[:, None], size)[:, 0] > 0
        back = resample_slices(new.float()[:, None], size)[:, 0] > 0.5
        return np.where(np.moveaxis(changed.numpy(), 0, 2), np.moveaxis(back.numpy(), 0, 2), mask)
