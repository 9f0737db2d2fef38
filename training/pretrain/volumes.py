"""Unlabeled CT for pretraining: find the images, load them windowed to [0, 1] with a body mask.

Volumes go through :func:`contourcl.data.transforms.ct_preprocessing` (the app's own pipeline: RAS,
in-plane resampling, window), so that pretraining sees what fine-tuning and serving see; axial
slices lie along the last axis. Each volume also gets a body mask (:func:`body_mask`). Loaded
volumes are cached on disk (one ``.npz`` per case and setting) and loaded by worker processes.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from contourcl.data.datasets import case_id
from contourcl.data.transforms import DEFAULT_SPACING, DEFAULT_WINDOW
from contourcl.errors import InvalidImageError

logger = logging.getLogger(__name__)

#: body threshold (HU): air is -1000, fat -100; -400 keeps the skin and drops the air around it
BODY_HU = -400.0
CACHE_VERSION = 2  # 2: keyed by the file's bytes, not its size and time


@dataclass
class Volume:
    """A CT volume ready for pretraining: ``image`` in [0, 1] and ``body``, both ``(H, W, D)``."""

    case: str
    image: np.ndarray  #: float32 (or float16 from the cache), windowed to [0, 1]
    body: np.ndarray  #: bool body mask
    path: str = ""

    @property
    def num_slices(self) -> int:
        return int(self.image.shape[-1])


def window_value(hu: float, window: Sequence[float]) -> float:
    """Where ``hu`` falls in ``window`` scaled to [0, 1] (clipped)."""
    return float(np.clip((hu - window[0]) / (window[1] - window[0]), 0.0, 1.0))


def body_mask(image: np.ndarray, threshold: float, opening: int = 1) -> np.ndarray:
    """Body mask of a windowed ``(H, W, D)`` volume.

    Threshold (``image > threshold``), an in-plane opening (cuts thin couch and cable
    connections), the largest 3D connected component, and holes filled slice by slice (so
    that the airway and sinuses, closed in an axial slice, belong to the body).
    """
    from scipy import ndimage

    mask = np.asarray(image) > threshold
    if opening > 0:
        mask = ndimage.binary_opening(mask, structure=np.ones((3, 3, 1), bool), iterations=opening)
    labels, n = ndimage.label(mask)
    if n == 0:
        return mask
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    mask = labels == int(np.argmax(sizes))
    fill = np.ones((3, 3), bool)
    for z in range(mask.shape[-1]):
        if mask[..., z].any():
            mask[..., z] = ndimage.binary_fill_holes(mask[..., z], structure=fill)
    return mask


def load_volume(
    path: str | Path,
    spacing: Sequence[float] = DEFAULT_SPACING,
    window: Sequence[float] = DEFAULT_WINDOW,
    body_hu: float = BODY_HU,
) -> Volume:
    """Load one CT with :func:`~contourcl.data.transforms.ct_preprocessing` and compute its body mask."""
    from monai.transforms import Compose

    from contourcl.data.transforms import ct_preprocessing

    path = Path(path)
    try:
        data = Compose(ct_preprocessing(spacing=spacing, window=window))({"image": str(path)})
    except Exception as err:  # noqa: BLE001 - MONAI raises many kinds
        raise InvalidImageError(f"cannot read {path} as a CT volume: {err}") from err
    image = np.asarray(data["image"].detach().cpu().numpy()[0], dtype=np.float32)
    if image.ndim != 3:
        raise InvalidImageError(f"{path} is not a 3D volume (shape {image.shape})")
    return Volume(case_id(path), image, body_mask(image, window_value(body_hu, window)), str(path))


def _cache_key(path: Path, spacing, window, body_hu) -> str:
    """The file's content (not its name, size or time: a corrected copy of a dataset may keep
    all three) and the preprocessing settings."""
    h = hashlib.sha1(f"{tuple(spacing)}|{tuple(window)}|{body_hu}|v{CACHE_VERSION}|".encode())
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def _load_cached(args) -> Volume:
    path, spacing, window, body_hu, cache_dir = args
    path = Path(path)
    if cache_dir is None:
        return load_volume(path, spacing, window, body_hu)
    cache = Path(cache_dir) / "volumes" / f"{case_id(path)}-{_cache_key(path, spacing, window, body_hu)}.npz"
    if cache.is_file():
        try:
            with np.load(cache) as z:
                return Volume(case_id(path), z["image"].astype(np.float32), z["body"].astype(bool), str(path))
        except (OSError, ValueError, KeyError):
            logger.warning("ignoring unreadable cache file %s", cache)
    vol = load_volume(path, spacing, window, body_hu)
    # the cache holds float16 (1/2048 of the window is finer than CT noise); return the same
    # values as a later cached load, so that a first run and a resumed run see identical data
    vol.image = vol.image.astype(np.float16)
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_name(f"{cache.stem}.{os.getpid()}.tmp.npz")
    np.savez(tmp, image=vol.image, body=vol.body)
    tmp.replace(cache)
    vol.image = vol.image.astype(np.float32)
    return vol


def load_volumes(
    paths: Sequence[str | Path],
    spacing: Sequence[float] = DEFAULT_SPACING,
    window: Sequence[float] = DEFAULT_WINDOW,
    body_hu: float = BODY_HU,
    cache_dir: str | Path | None = None,
    num_workers: int = 0,
) -> list[Volume]:
    """Load ``paths`` (cached under ``cache_dir/volumes`` when given; ``num_workers`` processes)."""
    jobs = [(str(p), tuple(spacing), tuple(window), body_hu, None if cache_dir is None else str(cache_dir)) for p in paths]
    if num_workers > 1 and len(jobs) > 1:
        with get_context("spawn" if torch.cuda.is_initialized() else "fork").Pool(min(num_workers, len(jobs))) as pool:
            vols = pool.map(_load_cached, jobs, chunksize=1)
    else:
        vols = [_load_cached(j) for j in jobs]
    # several files may share a case id (flat folders): make the ids unique
    seen: dict[str, int] = {}
    for v in vols:
        n = seen.get(v.case, 0)
        seen[v.case] = n + 1
        if n:
            v.case = f"{v.case}#{n}"
    return vols


def to_square(image: torch.Tensor, size: int, mode: str = "pad") -> torch.Tensor:
    """A ``(C, h, w)`` image as ``(C, size, size)``.

    ``pad``: zero-padded (centred) to a square, then resized: the aspect ratio is kept
    (SepaReg's paper). ``resize``: resized directly (SepaReg's code; the aspect ratio is lost).
    """
    if mode not in ("pad", "resize"):
        raise ValueError(f"mode must be 'pad' or 'resize', not {mode!r}")
    c, h, w = image.shape
    if mode == "pad" and h != w:
        side = max(h, w)
        top, left = (side - h) // 2, (side - w) // 2
        image = F.pad(image, (left, side - w - left, top, side - h - top))
    if image.shape[-2:] == (size, size):
        return image
    down = image.shape[-1] > size or image.shape[-2] > size
    return F.interpolate(image[None], size=(size, size), mode="bilinear", align_corners=False, antialias=down)[0]


class SliceDataset(Dataset):
    """The axial slices of ``volumes`` whose body covers at least ``min_body_fraction``.

    Item ``i`` is a ``(1, image_size, image_size)`` float tensor (zero-padded to a square and
    resized); ``index[i] = (volume number, slice)`` and ``cases`` map it back.
    """

    def __init__(self, volumes: Sequence[Volume], image_size: int = 128, min_body_fraction: float = 0.02):
        self.volumes = list(volumes)
        self.image_size = image_size
        self.cases = [v.case for v in self.volumes]
        index = []
        for vi, v in enumerate(self.volumes):
            frac = v.body.reshape(-1, v.num_slices).mean(axis=0)
            index += [(vi, int(z)) for z in np.flatnonzero(frac >= min_body_fraction)]
        if not index:
            raise InvalidImageError("no slice with enough body in the pretraining images")
        self.index = np.asarray(index, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.index)

    def slice(self, i: int) -> torch.Tensor:
        vi, z = self.index[i]
        img = torch.from_numpy(np.ascontiguousarray(self.volumes[vi].image[..., z], dtype=np.float32))[None]
        return to_square(img, self.image_size, "pad")

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.slice(i)


def synthetic_ct(shape: Sequence[int] = (64, 64, 8), seed: int = 0) -> np.ndarray:
    """A small synthetic head-and-neck-like CT in HU (tests, benchmarks without data).

    Air around an elliptic soft-tissue body, a few random blobs of bone, fat and air inside
    (an "airway"), and noise.
    """
    rng = np.random.default_rng(seed)
    x, y, z = np.meshgrid(*[np.arange(n, dtype=np.float32) for n in shape], indexing="ij")
    cx, cy = shape[0] / 2, shape[1] / 2
    ax, ay = shape[0] * 0.38, shape[1] * 0.32
    hu = np.full(shape, -1000.0, np.float32)
    body = ((x - cx) / ax) ** 2 + ((y - cy) / ay) ** 2 <= 1.0
    hu[body] = 40.0
    for value in (700.0, -100.0, 300.0, -850.0):
        for _ in range(2):
            bx, by = cx + rng.uniform(-0.5, 0.5) * ax, cy + rng.uniform(-0.5, 0.5) * ay
            r = rng.uniform(0.08, 0.2) * min(shape[:2])
            zc, zr = rng.uniform(0, shape[2]), rng.uniform(0.3, 0.8) * shape[2]
            blob = ((x - bx) ** 2 + (y - by) ** 2 <= r * r) & (np.abs(z - zc) <= zr) & body
            hu[blob] = value
    hu += rng.normal(0.0, 15.0, shape).astype(np.float32)
    return hu


def write_synthetic_cts(folder: str | Path, n: int = 2, shape: Sequence[int] = (64, 64, 8), spacing: float = 4.0, seed: int = 0) -> list[Path]:
    """Write ``n`` :func:`synthetic_ct` volumes as ``folder/case{i}.nii.gz`` (``spacing`` mm voxels)."""
    import nibabel as nib

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        affine = np.diag([spacing, spacing, spacing, 1.0])
        path = folder / f"case{i}.nii.gz"
        nib.save(nib.Nifti1Image(synthetic_ct(shape, seed + i), affine), str(path))
        paths.append(path)
    return paths
