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
        """The preprocessed image dict and the transforms applied (to invert them later)."""
        pre = Compose(ct_preprocessing("image", None, meta.spacing, meta.window))
        try:
            data = pre({"image": str(image_path)})
        except Exception as err:  # MONAI wraps reader errors; name the file and the cause
            cause = err.__cause__ or err
            raise InvalidImageError(f"cannot read {Path(image_path).name} as a CT volume: {cause}") from err
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
        data["pred"] = MetaTensor(pred.float(), affine=data["image"].affine, meta=dict(data["image"].meta))
        inverted = Invertd(keys="pred", transform=pre, orig_keys="image", nearest_interp=True)(data)["pred"]
        label = np.rint(inverted[0].cpu().numpy()).astype(np.uint8)
        affine = np.asarray(inverted.affine, dtype=np.float64)
        t3 = time.perf_counter()
        return Prediction(
            label=label,
            affine=affine,
            labels=dict(meta.labels),
            model_version=version,
            timings={"pre": t1 - t0, "infer": t2 - t1, "invert": t3 - t2, "total": t3 - t0},
        )
