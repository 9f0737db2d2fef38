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

import nibabel as nib
import numpy as np
import torch
from monai.data import MetaTensor
from monai.inferers import SliceInferer
from monai.transforms import Compose, Invertd, KeepLargestConnectedComponent

from contourcl.checkpoint import ModelMeta, load_model
from contourcl.errors import InvalidImageError
from contourcl.networks import ContourUNet
from contourcl.transforms import ct_preprocessing

logger = logging.getLogger(__name__)


def slice_probabilities(
    network: ContourUNet,
    image: torch.Tensor,
    roi: tuple[int, int] = (128, 128),
    sw_batch_size: int = 32,
    device: str | torch.device = "cpu",
) -> torch.Tensor:
    """Softmax probabilities ``(B, C, H, W, D)`` of a ``(B, 1, H, W, D)`` volume, slice by slice.

    Axial slices (the last axis) are tiled with ``roi``-sized windows (padded when smaller), so
    any in-plane size works; mixed precision on CUDA.
    """
    inferer = SliceInferer(roi_size=tuple(roi), sw_batch_size=sw_batch_size, spatial_dim=2, overlap=0.25, progress=False)
    device = torch.device(device)
    with torch.no_grad(), torch.autocast(device.type, enabled=device.type == "cuda"):
        logits = inferer(image.to(device), network)
    return torch.softmax(logits.float(), dim=1)


@dataclass
class Prediction:
    """A label map on the input image's grid, numbered as :attr:`labels`."""

    label: np.ndarray  # (X, Y, Z) uint8, the input image's shape
    affine: np.ndarray  # the input image's affine (RAS, as nibabel reads it)
    labels: dict[str, int]
    model_version: str
    timings: dict[str, float] = field(default_factory=dict)

    def save(self, path: str | Path) -> Path:
        img = nib.Nifti1Image(self.label.astype(np.uint8), self.affine)
        img.set_qform(self.affine, code=1)
        img.set_sform(self.affine, code=1)
        nib.save(img, str(path))
        return Path(path)


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


def model_version(path: str | Path) -> str:
    """A short id of a model file's content state (its modification time and size)."""
    st = os.stat(path)
    return f"{st.st_mtime_ns:x}-{st.st_size:x}"


class Contourer:
    """Contours CT volumes with the model file at ``model_path``.

    The file is (re)loaded on first use and whenever its modification time or size changes.
    ``largest_component`` keeps the largest connected component of each structure (organs at
    risk are single objects; a tumour target may not be).
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
        """The preprocessed image dict and the invertible transforms applied after loading.

        ``data["grid"]`` is the loaded image's ``(affine, shape)``: the grid of the output.
        """
        steps = ct_preprocessing("image", None, meta.spacing, meta.window)
        load, pre = Compose(steps[:3]), Compose(steps[3:])  # load + channel + type; orientation, spacing, window
        try:
            data = load({"image": str(image_path)})
            grid = (np.asarray(data["image"].affine, dtype=np.float64), tuple(data["image"].shape[1:]))
            data = pre(data)
        except Exception as err:  # MONAI wraps reader errors; name the file and the cause
            cause = err.__cause__ or err
            raise InvalidImageError(f"cannot read {Path(image_path).name} as a CT volume: {cause}") from err
        data["grid"] = grid
        image = data["image"]
        if image.ndim != 4 or image.shape[0] != 1 or min(image.shape[1:]) < 2:
            raise InvalidImageError(
                f"{Path(image_path).name} is not a 3D volume (shape {tuple(image.shape[1:])} after loading)"
            )
        return data, pre

    def __call__(self, image_path: str | Path) -> Prediction:
        t0 = time.perf_counter()
        version, network, meta = self.model()
        data, pre = self.preprocess(image_path, meta)
        t1 = time.perf_counter()
        probs = slice_probabilities(network, data["image"][None], meta.roi, self.sw_batch_size, self.device)
        pred = torch.argmax(probs[0], dim=0, keepdim=True).to(torch.uint8).cpu()
        del probs
        if self.largest_component and len(meta.labels):
            pred = KeepLargestConnectedComponent(applied_labels=sorted(meta.labels.values()), independent=True)(pred)
        t2 = time.perf_counter()
        affine, shape = data["grid"]
        label = nearest_to_grid(pred[0].numpy(), np.asarray(data["image"].affine, dtype=np.float64), affine, shape)
        if label is None:  # an oblique grid: MONAI's general inverse of the preprocessing
            data["pred"] = MetaTensor(pred.float(), affine=data["image"].affine, meta=dict(data["image"].meta))
            inverted = Invertd(keys="pred", transform=pre, orig_keys="image", nearest_interp=True)(data)["pred"]
            label = np.rint(inverted[0].cpu().numpy()).astype(np.uint8)
        t3 = time.perf_counter()
        return Prediction(
            label=label,
            affine=affine,
            labels=dict(meta.labels),
            model_version=version,
            timings={"pre": t1 - t0, "infer": t2 - t1, "invert": t3 - t2, "total": t3 - t0},
        )
