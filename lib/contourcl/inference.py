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


def nearest_to_grid(label: np.ndarray, affine: np.ndarray, out_affine: np.ndarray, out_shape: tuple[int, ...]) -> np.ndarray | None:
    """Nearest-neighbour resampling of ``label`` (on ``affine``) onto another grid, when both
    grids share their axes up to order, flips and scaling (no rotation between them).

    Then each output axis is one index lookup into ``label``, and the only memory used is the
    output's (a general resampler builds a coordinate grid of 3 floats per output voxel: 1.4 GB
    for a 512 x 512 x 150 CT). Returns ``None`` for grids rotated against each other.
    """
    m = np.linalg.inv(affine) @ out_affine  # output voxel index -> label voxel index
    rot = m[:3, :3]
    big = np.abs(rot) > 1e-6 * np.abs(rot).max()
    if not (big.sum(axis=0) == 1).all() or not (big.sum(axis=1) == 1).all():
        return None
    src_axis = big.argmax(axis=0)  # for each output axis, the label axis it runs along
    padded = np.pad(label, 1)  # index 0 and n+1: outside the label's grid -> background
    index = []
    for c in range(3):
        r = src_axis[c]
        pos = np.rint(rot[r, c] * np.arange(out_shape[c]) + m[r, 3]).astype(np.int64)
        index.append(np.clip(pos + 1, 0, label.shape[r] + 1))
    return padded.transpose(tuple(src_axis))[np.ix_(*index)]


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
                      sw_batch_size: int = 32) -> tuple[torch.Tensor, tuple[slice, slice]]:
    """Softmax probabilities ``(C, h, w, D)`` of a preprocessed ``(1, H, W, D)`` CT inside the
    body's box (:func:`body_box`), and the box ``(rows, cols)``; outside it everything is background.

    Whole axial slices of the box and, when the model file says ``tta_flip``, the mean with the
    prediction of the left-right mirrored CT, its ``*_R``/``*_L`` channels swapped back.
    """
    rows, cols = body_box(image[0])
    crop = image[None, :, rows, cols]
    roi = whole_slice_roi(crop.shape[2:4])
    probs = slice_probabilities(network, crop, roi, sw_batch_size, device)[0].cpu()
    if meta.tta_flip:  # RAS: the first in-plane axis runs right to left
        mirrored = slice_probabilities(network, torch.flip(crop, dims=[2]), roi, sw_batch_size, device)[0].cpu()
        probs = (probs + torch.flip(mirrored, dims=[1])[mirror_channels(meta.labels)]) / 2
    return probs, (rows, cols)


def model_probabilities(network: ContourUNet, image: torch.Tensor, meta: ModelMeta, device: str | torch.device = "cpu",
                        sw_batch_size: int = 32) -> torch.Tensor:
    """Softmax probabilities ``(C, H, W, D)`` of a preprocessed ``(1, H, W, D)`` CT, as served
    (:func:`box_probabilities`, background outside the body's box)."""
    probs, (rows, cols) = box_probabilities(network, image, meta, device, sw_batch_size)
    out = torch.zeros((probs.shape[0], *image.shape[1:]), dtype=probs.dtype)
    out[0] = 1.0
    out[:, rows, cols] = probs
    return out


def contour(network: ContourUNet, meta: ModelMeta, data: dict, pre: Compose, largest_component: bool,
            device: str | torch.device = "cpu", sw_batch_size: int = 32) -> tuple[np.ndarray, dict[str, float]]:
    """The label map of a CT preprocessed by :meth:`Contourer.preprocess`, on the CT's own grid.

    This is the one inference path: the app serves it, and the fine-tuning engine's model
    selection, the retraining gate, ``contourcl evaluate`` and the benchmarks score it.
    The argmax of :func:`model_probabilities`, each structure reduced to its largest connected
    component when ``largest_component``; both are computed inside the body's box only (outside
    it the label is background, so the result is the same, at a fraction of the cost).
    Returns the label map (model numbering) and timings (``infer``, ``invert``) in seconds.
    """
    t1 = time.perf_counter()
    image = data["image"]
    probs, (rows, cols) = box_probabilities(network, image, meta, device, sw_batch_size)
    box = torch.argmax(probs, dim=0, keepdim=True).to(torch.uint8)
    del probs
    if largest_component and len(meta.labels):
        box = KeepLargestConnectedComponent(applied_labels=sorted(meta.labels.values()), independent=True)(box)
    pred = torch.zeros((1, *image.shape[1:]), dtype=torch.uint8)
    pred[:, rows, cols] = torch.as_tensor(box)
    t2 = time.perf_counter()
    affine, shape = data["grid"]
    label = nearest_to_grid(np.asarray(pred[0]), np.asarray(image.affine, dtype=np.float64), affine, shape)
    if label is None:  # an oblique grid: MONAI's general inverse of the preprocessing
        data = dict(data)
        data["pred"] = MetaTensor(pred.float(), affine=image.affine, meta=dict(image.meta))
        inverted = Invertd(keys="pred", transform=pre, orig_keys="image", nearest_interp=True)(data)["pred"]
        label = np.rint(inverted[0].cpu().numpy()).astype(np.uint8)
    return label, {"infer": t2 - t1, "invert": time.perf_counter() - t2}


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
