"""Contour a CT volume with a model file: preprocess, slice-wise 2D inference, map back.

:class:`Contourer` is what the app serves. It reloads the model when the file changes (the
retrainer replaces it atomically, so a half-written file is never read), and returns a label
map on exactly the input image's grid (shape and affine), whatever the model's spacing.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from monai.data import MetaTensor
from monai.inferers import SliceInferer
from monai.transforms import Compose, Invertd, KeepLargestConnectedComponent

from contourcl.data.labels import mirror_channels
from contourcl.data.transforms import ct_preprocessing, neighbouring_slices
from contourcl.data.volumes import check_header, imaged_slices, write_label
from contourcl.errors import InvalidImageError
from contourcl.models.checkpoint import ModelMeta, load_model
from contourcl.models.networks import ContourUNet

logger = logging.getLogger(__name__)


def slice_probabilities(
    network: ContourUNet,
    image: torch.Tensor,
    roi: tuple[int, int] = (128, 128),
    sw_batch_size: int = 32,
    device: str | torch.device = "cpu",
) -> torch.Tensor:
    """Softmax probabilities ``(B, C, H, W, D)`` of a ``(B, 1, H, W, D)`` volume, slice by slice.

    A 2.5D network (``in_channels`` = 2 context + 1) gets each slice with its neighbours as
    channels (:func:`~contourcl.data.transforms.neighbouring_slices`).

    When a slice fits in ``roi`` (see :func:`whole_slice_roi`), slices are zero-padded to ``roi``
    and run in batches of ``sw_batch_size``; otherwise they are tiled with ``roi``-sized windows
    (MONAI's ``SliceInferer``). Mixed precision on CUDA.
    """
    device = torch.device(device)
    if isinstance(image, MetaTensor):  # metadata is not needed here and slows every op
        image = image.as_tensor()
    channels = network.config.in_channels
    if channels > 1 and image.shape[1] == 1:
        image = neighbouring_slices(image, (channels - 1) // 2)
    b, _, h, w, d = image.shape
    with torch.no_grad(), torch.autocast(device.type, enabled=device.type == "cuda"):
        if h <= roi[0] and w <= roi[1]:
            top, left = (roi[0] - h) // 2, (roi[1] - w) // 2
            padded = torch.nn.functional.pad(image, (0, 0, left, roi[1] - w - left, top, roi[0] - h - top))
            slices = padded.permute(0, 4, 1, 2, 3).reshape(b * d, channels, *roi)  # (B*D, channels, H', W')
            chunks = [network(slices[i : i + sw_batch_size].to(device)).float() for i in range(0, b * d, sw_batch_size)]
            out = torch.cat(chunks)[:, :, top : top + h, left : left + w]
            logits = out.reshape(b, d, -1, h, w).permute(0, 2, 3, 4, 1)
        else:
            inferer = SliceInferer(roi_size=tuple(roi), sw_batch_size=sw_batch_size, spatial_dim=2, overlap=0.25, progress=False)
            logits = inferer(image.to(device), network).float()
    return torch.softmax(logits, dim=1)


def whole_slice_roi(size: tuple[int, int], multiple: int = 32, cap: int = 512) -> tuple[int, int]:
    """The window for :func:`slice_probabilities` that covers a whole ``size`` slice at once.

    The network is fully convolutional (and its input sides must be multiples of 32), so a slice
    is contoured in one window padded up to a multiple of 32, rather than in overlapping tiles of
    the training patch size. Slices larger than ``cap`` are tiled.
    """
    return tuple(min(cap, max(multiple, -(-int(s) // multiple) * multiple)) for s in size)


def body_box(image: torch.Tensor, margin: int = 8) -> tuple[slice, slice]:
    """In-plane ``(rows, columns)`` slices around everything brighter than air in ``(H, W, D)``.

    ``image`` is windowed to [0, 1] with the window starting above air (-500 HU by default), so
    air and the space outside the scan are 0. Organs lie inside the body, so contouring the box
    gives the same label map as the whole slice, at a fraction of the cost (an OpenKBP neck
    fills about a quarter of its field of view).
    """
    inside = (image > 0).any(dim=-1)
    if not bool(inside.any()):
        return slice(0, image.shape[0]), slice(0, image.shape[1])
    rows = torch.nonzero(inside.any(dim=1)).flatten()
    cols = torch.nonzero(inside.any(dim=0)).flatten()
    return (slice(max(0, int(rows[0]) - margin), min(image.shape[0], int(rows[-1]) + 1 + margin)),
            slice(max(0, int(cols[0]) - margin), min(image.shape[1], int(cols[-1]) + 1 + margin)))


@dataclass
class Prediction:
    """A label map on the input image's grid, numbered as :attr:`labels`."""

    label: np.ndarray  # (X, Y, Z) uint8, the input image's shape
    affine: np.ndarray  # the input image's affine (RAS, as nibabel reads it)
    labels: dict[str, int]
    model_version: str
    timings: dict[str, float] = field(default_factory=dict)

    def save(self, path: str | Path) -> Path:
        return write_label(path, self.label, self.affine)


def preprocess_ct(image_path: str | Path, meta: ModelMeta, imaged: bool = False, keep_hu: bool = False) -> tuple[dict, Compose]:
    """The preprocessed image dict and the invertible transforms applied after loading.

    ``data["grid"]`` is the loaded image's ``(affine, shape)``: the grid of the output. With
    ``imaged``, ``data["imaged_slices"]`` is :func:`contourcl.data.volumes.imaged_slices` of the
    loaded CT (for scoring; serving does not need it). With ``keep_hu``, ``data["hu"]`` is the
    loaded CT itself (HU, on the file's grid), for checking a reference against it
    (:mod:`contourcl.data.reference_check`) without reading the file again.
    """
    steps = ct_preprocessing("image", None, meta.spacing, meta.window)
    load, pre = Compose(steps[:3]), Compose(steps[3:])  # load + channel + type; orientation, spacing, window
    check_header(image_path)  # before a voxel is read or resampled
    try:
        data = load({"image": str(image_path)})
        grid = (np.asarray(data["image"].affine, dtype=np.float64), tuple(data["image"].shape[1:]))
        hu = np.asarray(data["image"][0]) if imaged or keep_hu else None  # serving keeps no hold on it
        imaged_axis = imaged_slices(hu, grid[0]) if imaged else None
        data = pre(data)  # new tensors: ``hu`` keeps the loaded values
    except Exception as err:  # MONAI wraps reader errors; name the file and the cause
        cause = err.__cause__ or err
        raise InvalidImageError(f"cannot read {Path(image_path).name} as a CT volume: {cause}") from err
    data["grid"] = grid
    if imaged_axis is not None:
        data["imaged_slices"] = imaged_axis
    if keep_hu:
        data["hu"] = hu
    image = data["image"]
    if not bool(torch.isfinite(image).all()):
        raise InvalidImageError(f"{Path(image_path).name} holds NaN or infinite values: not a CT")
    if image.ndim != 4 or image.shape[0] != 1 or min(image.shape[1:]) < 2:
        raise InvalidImageError(
            f"{Path(image_path).name} is not a 3D volume (shape {tuple(image.shape[1:])} after loading)"
        )
    return data, pre


def box_probabilities(network: ContourUNet, image: torch.Tensor, meta: ModelMeta, device: str | torch.device = "cpu",
                      sw_batch_size: int = 32, averaged: bool = True) -> tuple[torch.Tensor, tuple[slice, slice]]:
    """Softmax probabilities ``(C, h, w, D)`` of a preprocessed ``(1, H, W, D)`` CT inside the
    body's box (:func:`body_box`), and the box ``(rows, cols)``; outside it everything is background.

    Whole axial slices of the box and, when the model file says ``tta_flip``, the mean with the
    prediction of the left-right mirrored CT, its ``*_R``/``*_L`` channels swapped back; then
    :func:`neighbour_average` along the slices (as served; ``averaged=False``: each slice's own,
    for ``contourcl.training.experiments.decision_rules``).
    """
    rows, cols = body_box(image[0])
    crop = image[None, :, rows, cols]
    roi = whole_slice_roi(crop.shape[2:4])
    probs = slice_probabilities(network, crop, roi, sw_batch_size, device)[0].cpu()
    if meta.tta_flip:  # RAS: the first in-plane axis runs right to left
        mirrored = slice_probabilities(network, torch.flip(crop, dims=[2]), roi, sw_batch_size, device)[0].cpu()
        probs = (probs + torch.flip(mirrored, dims=[1])[mirror_channels(meta.labels)]) / 2
    return (neighbour_average(probs) if averaged else probs), (rows, cols)


def neighbour_average(probs: torch.Tensor, weights: tuple[float, float, float] = (1.0, 1.0, 1.0)) -> torch.Tensor:
    """Each axial slice's probabilities ``(C, h, w, D)`` averaged with its two neighbours', weighted
    ``(below, itself, above)`` (the first and last slices stand in for their missing neighbour).

    The network sees one slice at a time; averaging its answers for adjacent slices is the
    cheapest way to make a contour agree with the slices above and below it. Served with equal
    weights, chosen on the inner split of the shipped recipes (README, *The network's
    probabilities on the CT's grid*; ``contourcl.training.experiments.decision_rules`` scores other weights).
    """
    if probs.shape[-1] < 2:
        return probs
    padded = torch.cat([probs[..., :1], probs, probs[..., -1:]], dim=-1)
    below, itself, above = weights
    return (below * padded[..., :-2] + itself * padded[..., 1:-1] + above * padded[..., 2:]) / sum(weights)


def model_probabilities(network: ContourUNet, image: torch.Tensor, meta: ModelMeta, device: str | torch.device = "cpu",
                        sw_batch_size: int = 32) -> torch.Tensor:
    """Softmax probabilities ``(C, H, W, D)`` of a preprocessed ``(1, H, W, D)`` CT, as served
    (:func:`box_probabilities`, background outside the body's box)."""
    probs, (rows, cols) = box_probabilities(network, image, meta, device, sw_batch_size)
    out = torch.zeros((probs.shape[0], *image.shape[1:]), dtype=probs.dtype)
    out[0] = 1.0
    out[:, rows, cols] = probs
    return out


def grid_mapping(affine: np.ndarray, out_affine: np.ndarray, out_shape: tuple[int, ...]) -> list[tuple[int, np.ndarray]] | None:
    """For each axis of the output grid (``out_affine``, ``out_shape``), the axis of the grid on
    ``affine`` it runs along and the (fractional) index on that axis of each output voxel.

    ``None`` when the grids are rotated against each other (then no axis maps to one axis).
    """
    m = np.linalg.inv(affine) @ out_affine  # output voxel index -> source voxel index
    rot = m[:3, :3]
    big = np.abs(rot) > 1e-6 * np.abs(rot).max()
    if not (big.sum(axis=0) == 1).all() or not (big.sum(axis=1) == 1).all():
        return None
    src_axis = big.argmax(axis=0)
    return [(int(src_axis[c]), rot[src_axis[c], c] * np.arange(out_shape[c]) + m[src_axis[c], 3]) for c in range(3)]


def _interpolated(values: torch.Tensor, mapping: list[tuple[int, np.ndarray]], lo: list[int], out: list[slice]) -> torch.Tensor:
    """``values`` ``(C, a, b, c)`` (a block of the source grid starting at voxel ``lo``) linearly
    interpolated at the output voxels ``out`` (a box of the output grid), ``(C, *box)``.

    Separable: one axis at a time, an index lookup where the output voxels lie on source voxels
    (the slice axis, which preprocessing keeps), else a product with the ``(source, output)``
    matrix of interpolation weights.
    """
    x = values.permute(0, *(r + 1 for r, _ in mapping))
    at = [np.clip(pos[out[c]] - lo[r], 0, x.shape[c + 1] - 1) for c, (r, pos) in enumerate(mapping)]
    on_voxels = [not (a - np.floor(a)).any() for a in at]
    for c in sorted(range(3), key=lambda c: not on_voxels[c]):  # lookups first: they shrink the block
        below = np.floor(at[c]).astype(np.int64)
        if on_voxels[c]:
            x = x.index_select(c + 1, torch.as_tensor(below))
            continue
        frac = torch.as_tensor(at[c] - below, dtype=x.dtype)
        n = x.shape[c + 1]
        weights = torch.zeros((n, len(below)), dtype=x.dtype)
        rows = torch.arange(len(below))
        weights.index_put_((torch.as_tensor(below), rows), 1 - frac, accumulate=True)
        weights.index_put_((torch.as_tensor(np.minimum(below + 1, n - 1)), rows), frac, accumulate=True)
        x = torch.movedim(torch.movedim(x, c + 1, -1) @ weights, -1, c + 1)
    return x


_CHUNK_VALUES = 1 << 24  # interpolated values held at once (64 MB of float32)


def argmax_on_grid(probs: torch.Tensor, affine: np.ndarray, out_affine: np.ndarray, out_shape: tuple[int, ...],
                   largest_component: bool) -> np.ndarray | None:
    """The label map on the output grid of probabilities ``(C, h, w, D)`` on ``affine``: at each
    output voxel, the argmax of the probabilities linearly interpolated there (background outside
    ``probs``' grid). ``None`` for grids rotated against each other. ``probs`` is used as working
    space (changed).

    Interpolating the probabilities, not the label, keeps what the network says between its
    voxels: on a finer CT grid the contour runs where the probabilities cross instead of in steps
    of the network's voxels, and on a coarser one each voxel takes the network's estimate at its
    centre instead of its nearest network voxel's label (on OpenKBP's 3.9-5.4 mm grids, +0.009
    mean Dice over nearest neighbour on the inner split; README, *Shipped weights*).

    ``largest_component``: each structure is first reduced, on ``probs``' grid, to the largest
    connected component of its argmax; it competes for the voxels within one voxel of that
    component in-plane (where its boundary is interpolated) and nowhere else (its probability
    is 0 there; the background's is left as it is). On the output grid each structure is then
    its largest connected component again (the interpolation can leave a few isolated voxels at
    the edge of that band).

    The work is done structure by structure inside the box where it can win, so the cost grows
    with the structures' size, not the CT's: near its band, or without the largest-component
    rule where its probability exceeds ``1/C`` (below that at every voxel around a point it
    cannot be the argmax there: the interpolated probabilities still sum to 1).
    """
    from monai.transforms.utils import get_largest_connected_component_mask
    from scipy.ndimage import find_objects

    mapping = grid_mapping(affine, out_affine, out_shape)
    if mapping is None:
        return None
    channels, size = probs.shape[0], probs.shape[1:]
    probs = probs.float()
    blocks = {}  # structure -> the box of probs' grid where it can win, grown by a voxel for the interpolation
    if largest_component:
        hard = torch.argmax(probs, dim=0).to(torch.uint8).numpy()
        for k, found in enumerate(find_objects(hard, max_label=channels - 1), start=1):
            if found is None:
                probs[k] = 0
                continue
            component = np.zeros(size, dtype=np.uint8)
            component[found] = get_largest_connected_component_mask(hard[found] == k)
            band = _grown(find_objects(component)[0], size, (1, 1, 0))
            near = torch.nn.functional.max_pool3d(torch.as_tensor(component[band])[None, None].float(), (3, 3, 1), 1, (1, 1, 0))[0, 0] > 0
            kept = probs[k][band] * near
            probs[k] = 0
            probs[k][band] = kept
            blocks[k] = _grown(band, size, (1, 1, 1))
    else:
        for k in range(1, channels):
            found = find_objects((probs[k] > 1.0 / channels).to(torch.uint8).numpy())
            if found:
                blocks[k] = _grown(found[0], size, (1, 1, 1))
    label = np.zeros(out_shape, dtype=np.uint8)
    for k, block in blocks.items():
        out = []
        for r, pos in mapping:  # output voxels inside the block (at the grid's edge: up to half a voxel beyond)
            low = -0.5 if block[r].start == 0 else block[r].start
            high = size[r] - 0.5 if block[r].stop == size[r] else block[r].stop - 1
            inside = np.nonzero((pos >= low) & (pos <= high))[0]
            out.append(slice(int(inside[0]), int(inside[-1]) + 1) if inside.size else slice(0, 0))
        if any(s.stop == s.start for s in out):
            continue
        values, lo = probs[(slice(None), *block)], [b.start for b in block]
        wins = np.zeros([o.stop - o.start for o in out], dtype=bool)
        along = [r for r, _ in mapping].index(2)  # in pieces along the output axis of the slices
        step = max(1, _CHUNK_VALUES // (channels * wins.size // wins.shape[along]))
        for start in range(out[along].start, out[along].stop, step):
            piece = list(out)
            piece[along] = slice(start, min(start + step, out[along].stop))
            at = [slice(None)] * 3
            at[along] = slice(start - out[along].start, piece[along].stop - out[along].start)
            wins[tuple(at)] = (torch.argmax(_interpolated(values, mapping, lo, piece), dim=0) == k).numpy()
        if largest_component and wins.any():
            wins = np.asarray(get_largest_connected_component_mask(torch.as_tensor(wins))).astype(bool)
        label[tuple(out)][wins] = k
    return label


def _grown(box: tuple[slice, ...], size: tuple[int, ...], by: tuple[int, ...]) -> tuple[slice, ...]:
    """``box`` grown by ``by`` voxels on each side, inside a grid of ``size``."""
    return tuple(slice(max(0, b.start - g), min(n, b.stop + g)) for b, n, g in zip(box, size, by, strict=False))


def contour(network: ContourUNet, meta: ModelMeta, data: dict, pre: Compose, largest_component: bool,
            device: str | torch.device = "cpu", sw_batch_size: int = 32) -> tuple[np.ndarray, dict[str, float]]:
    """The label map of a CT preprocessed by :meth:`Contourer.preprocess`, on the CT's own grid.

    This is the one inference path: the app serves it, and the fine-tuning engine's model
    selection, the retraining gate, ``contourcl evaluate`` and the benchmarks score it.
    :func:`box_probabilities` (the body's box, each slice averaged with its neighbours), put on the
    CT's grid by :func:`label_on_grid` (probabilities interpolated linearly, each structure its
    largest connected component when ``largest_component``).
    Returns the label map (model numbering) and timings (``infer``, ``invert``) in seconds.
    """
    t1 = time.perf_counter()
    probs, box = box_probabilities(network, data["image"], meta, device, sw_batch_size)
    t2 = time.perf_counter()
    label = label_on_grid(probs, box, meta, data, pre, largest_component)
    return label, {"infer": t2 - t1, "invert": time.perf_counter() - t2}


def label_on_grid(probs: torch.Tensor, box: tuple[slice, slice], meta: ModelMeta, data: dict, pre: Compose,
                  largest_component: bool) -> np.ndarray:
    """The label map on the CT's own grid of :func:`box_probabilities`' ``(probs, box)`` for a CT
    preprocessed by :meth:`Contourer.preprocess`: :func:`argmax_on_grid`, or for a CT whose grid
    is rotated against the model's, the label on the model's grid put back by MONAI's general
    inverse of the preprocessing (nearest neighbour)."""
    image = data["image"]
    rows, cols = box
    affine, shape = data["grid"]
    largest_component = largest_component and bool(meta.labels)
    # one voxel of background around the box (where the grid goes on): what the box's edge is interpolated with
    top, left = int(rows.start > 0), int(cols.start > 0)
    bottom, right = int(rows.stop < image.shape[1]), int(cols.stop < image.shape[2])
    padding = (0, 0, left, right, top, bottom)
    padded = torch.cat([torch.nn.functional.pad(probs[:1], padding, value=1.0), torch.nn.functional.pad(probs[1:], padding)])
    box_affine = np.asarray(image.affine, dtype=np.float64) @ _translation(rows.start - top, cols.start - left)
    label = argmax_on_grid(padded, box_affine, affine, shape, largest_component)
    if label is None:  # an oblique grid: the label on the model's grid, MONAI's general inverse
        pred = label_on_model_grid(probs, box, image.shape[1:], meta, largest_component)
        data = dict(data)
        data["pred"] = MetaTensor(pred.float(), affine=image.affine, meta=dict(image.meta))
        inverted = Invertd(keys="pred", transform=pre, orig_keys="image", nearest_interp=True)(data)["pred"]
        label = np.rint(inverted[0].cpu().numpy()).astype(np.uint8)
    return label


def label_on_model_grid(probs: torch.Tensor, box: tuple[slice, slice], size: tuple[int, ...], meta: ModelMeta,
                        largest_component: bool) -> torch.Tensor:
    """The ``(1, *size)`` label map on the model's grid of :func:`box_probabilities`' ``(probs,
    box)``: their argmax, each structure its largest connected component when
    ``largest_component``, background outside the box (what :func:`label_on_grid` puts back on an
    oblique CT's grid)."""
    on_box = torch.argmax(probs, dim=0, keepdim=True).to(torch.uint8)
    if largest_component:
        on_box = KeepLargestConnectedComponent(applied_labels=sorted(meta.labels.values()), independent=True)(on_box)
    pred = torch.zeros((1, *size), dtype=torch.uint8)
    pred[(slice(None), *box)] = torch.as_tensor(on_box)
    return pred


def _translation(rows: int, cols: int) -> np.ndarray:
    """The voxel-index shift of a box starting at ``(rows, cols, 0)``."""
    shift = np.eye(4)
    shift[:2, 3] = (rows, cols)
    return shift


def model_version(path: str | Path) -> str:
    """A short id of a model file's content state (its modification time and size)."""
    st = os.stat(path)
    return f"{st.st_mtime_ns:x}-{st.st_size:x}"


class Contourer:
    """Contours CT volumes with the model file at ``model_path``.

    The file is (re)loaded on first use and whenever its modification time or size changes.
    Each structure is reduced to its largest connected component (organs at risk are single
    objects; a tumour target may not be) as the model file says
    (:attr:`~contourcl.models.checkpoint.ModelMeta.largest_component`); ``largest_component`` is
    the rule for files that do not say, and a call's ``largest_component`` overrides both.
    """

    def __init__(self, model_path: str | Path, device: str = "cpu", largest_component: bool = True, sw_batch_size: int = 32):
        self.model_path = Path(model_path)
        self.device = device
        self.largest_component = largest_component
        self.sw_batch_size = sw_batch_size
        self._lock = threading.Lock()
        self._loaded: tuple[str, ContourUNet, ModelMeta] | None = None

    def is_available(self) -> bool:
        return self.model_path.is_file()

    def model(self) -> tuple[str, ContourUNet, ModelMeta]:
        """``(version, network, meta)`` of the model file as it is now."""
        with self._lock:
            version = model_version(self.model_path)
            if self._loaded is None or self._loaded[0] != version:
                network, meta = load_model(self.model_path, self.device)
                logger.info("loaded %s model %s (version %s)", meta.model, self.model_path, version)
                self._loaded = (version, network, meta)
            return self._loaded

    def preprocess(self, image_path: str | Path, meta: ModelMeta) -> tuple[dict, Compose]:
        """:func:`preprocess_ct` (kept as a method: callers reuse its result with :meth:`predict`)."""
        return preprocess_ct(image_path, meta)

    def keeps_largest_component(self, meta: ModelMeta, override: bool | None = None) -> bool:
        """The largest-component rule: ``override``, else the model file's, else :attr:`largest_component`."""
        if override is not None:
            return override
        return self.largest_component if meta.largest_component is None else meta.largest_component

    def __call__(self, image_path: str | Path, largest_component: bool | None = None) -> Prediction:
        t0 = time.perf_counter()
        version, network, meta = self.model()
        data, pre = self.preprocess(image_path, meta)
        return self.predict(data, pre, t0, largest_component)

    def predict(self, data: dict, pre: Compose, t0: float | None = None, largest_component: bool | None = None) -> Prediction:
        """Contour an image already preprocessed by :meth:`preprocess` (which may be reused)."""
        t1 = time.perf_counter()
        t0 = t1 if t0 is None else t0
        version, network, meta = self.model()
        label, timings = contour(network, meta, data, pre, self.keeps_largest_component(meta, largest_component), self.device, self.sw_batch_size)
        affine, _ = data["grid"]
        return Prediction(
            label=label,
            affine=affine,
            labels=dict(meta.labels),
            model_version=version,
            timings={"pre": t1 - t0, **timings, "total": time.perf_counter() - t0},
        )
