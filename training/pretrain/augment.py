"""Augmented views for the image- and region-level methods (SimSiam, SimCLR, SepaReg).

:class:`Augment` is a :class:`monai.transforms.Compose` of MONAI array transforms on ``(C, H, W)``
images in [0, 1]: random resized crop, horizontal flip, brightness/contrast jitter and Gaussian
blur; :class:`TwoViews` gives two independent views of each item.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from monai.data import get_track_meta, set_track_meta
from monai.transforms import (
    BorderPad,
    CenterSpatialCrop,
    Compose,
    Identity,
    OneOf,
    RandFlip,
    RandGaussianSmooth,
    Randomizable,
    RandomOrder,
    RandScaleIntensity,
    RandScaleIntensityFixedMean,
    Resize,
    ScaleIntensityRange,
    SpatialCrop,
    Transform,
)
from torch.utils.data import Dataset

#: seeds drawn from torch's RNG for MONAI's per-transform NumPy RandomState
_SEED_RANGE = 2**31 - 1


class RandResizedCrop(Randomizable, Transform):
    """Random resized crop (the SimCLR/SimSiam one): area fraction in ``scale``, aspect in ``ratio``.

    MONAI's random crops draw each side's length on its own (``RandSpatialCrop``,
    ``RandScaleCrop``), which fixes neither the area fraction nor the aspect ratio; so the box is
    drawn here (log-uniform aspect, up to 10 tries, else the whole image, as torchvision's
    ``RandomResizedCrop``) and cut and resized by MONAI's ``SpatialCrop`` and ``Resize``.
    """

    def __init__(self, size: int, scale: Sequence[float] = (0.2, 1.0), ratio: Sequence[float] = (3 / 4, 4 / 3)):
        self.scale = tuple(float(s) for s in scale)
        self.log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
        self.resize = Resize((size, size), mode="bilinear", align_corners=False, anti_aliasing=True)
        self.box: tuple[int, int, int, int] = (0, 0, 0, 0)

    def randomize(self, shape: Sequence[int]) -> None:
        h, w = shape
        for _ in range(10):
            target = h * w * self.R.uniform(*self.scale)
            ratio = math.exp(self.R.uniform(*self.log_ratio))
            cw, ch = int(round(math.sqrt(target * ratio))), int(round(math.sqrt(target / ratio)))
            if 0 < cw <= w and 0 < ch <= h:
                self.box = (int(self.R.randint(0, h - ch + 1)), int(self.R.randint(0, w - cw + 1)), ch, cw)
                return
        self.box = (0, 0, h, w)

    def __call__(self, img):
        self.randomize(img.shape[1:])
        top, left, ch, cw = self.box
        return self.resize(SpatialCrop(roi_start=(top, left), roi_end=(top + ch, left + cw))(img))


class RandIsotropicGaussianSmooth(RandGaussianSmooth):
    """MONAI's ``RandGaussianSmooth`` with one sigma for every axis (it draws one per axis)."""

    def randomize(self, data=None) -> None:
        super().randomize(data)
        self.y = self.z = self.x


class Augment:
    """Random view of a ``(C, H, W)`` image in [0, 1], output ``(C, size, size)`` float32 in [0, 1].

    Random resized crop (area fraction ``crop_scale``, aspect 3/4-4/3, bilinear resize:
    :class:`RandResizedCrop`), horizontal flip (probability ``flip_p``), brightness and contrast
    jitter in random order (factors in ``1 +- jitter``, together with probability ``jitter_p``:
    ``RandScaleIntensity``, ``RandScaleIntensityFixedMean``), clipped to [0, 1], and Gaussian blur
    (one sigma in ``blur_sigma`` px, probability ``blur_p``; reflect-padded, since MONAI's
    smoothing pads with zeros). Written by hand, as MONAI lacks them: the crop box's draw and the
    single sigma. The transforms share one NumPy ``RandomState``, re-seeded from torch's RNG at
    every call, so views follow ``torch.manual_seed``, a resumed run's restored torch RNG and the
    per-worker seeds of a DataLoader (two workers never draw the same views).
    """

    def __init__(
        self,
        size: int,
        crop_scale: Sequence[float] = (0.2, 1.0),
        flip_p: float = 0.5,
        jitter_p: float = 0.8,
        jitter: float = 0.4,
        blur_p: float = 0.5,
        blur_sigma: Sequence[float] = (0.1, 2.0),
    ):
        self.size = int(size)
        self.crop_scale = tuple(float(s) for s in crop_scale)
        self.flip_p, self.jitter_p, self.jitter, self.blur_p = flip_p, jitter_p, jitter, blur_p
        self.blur_sigma = tuple(float(s) for s in blur_sigma)
        j = float(jitter)
        jitter_ops = RandomOrder([RandScaleIntensity(factors=j, prob=1.0), RandScaleIntensityFixedMean(prob=1.0, factors=j)])
        # MONAI's Gaussian kernel reaches int(4 sigma + 0.5) px
        pad = min(int(4 * self.blur_sigma[1] + 0.5), self.size - 1)
        blur = Compose([
            BorderPad(pad, mode="reflect"),
            RandIsotropicGaussianSmooth(self.blur_sigma, self.blur_sigma, self.blur_sigma, prob=1.0),
            CenterSpatialCrop((self.size, self.size)),
        ])
        self.transform = Compose([
            RandResizedCrop(self.size, self.crop_scale),
            RandFlip(prob=flip_p, spatial_axis=1),  # (C, H, W): axis 1 of the spatial ones is W
            OneOf([jitter_ops, Identity()], weights=(jitter_p, 1.0 - jitter_p)),
            OneOf([blur, Identity()], weights=(blur_p, 1.0 - blur_p)),
            ScaleIntensityRange(0.0, 1.0, 0.0, 1.0, clip=True),
        ])
        # one RandomState shared by every random transform, re-seeded in place at each call
        self._rng = np.random.RandomState()
        _share_random_state(self.transform, self._rng)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self._rng.seed(int(torch.randint(0, _SEED_RANGE, ())))
        track = get_track_meta()
        set_track_meta(False)  # views need no meta-data; tracking it would double the cost
        try:
            out = self.transform(torch.as_tensor(x, dtype=torch.float32))
        finally:
            set_track_meta(track)
        return torch.as_tensor(out).as_subclass(torch.Tensor).float().contiguous()


def _share_random_state(transform, state: np.random.RandomState) -> None:
    if isinstance(transform, Randomizable):
        transform.set_random_state(state=state)
    for t in getattr(transform, "transforms", ()):
        _share_random_state(t, state)


class TwoViews(Dataset):
    """Two independent augmentations of each item of ``base``: ``(view1, view2)``."""

    def __init__(self, base: Dataset, augment: Augment):
        self.base = base
        self.augment = augment

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int):
        x = self.base[i]
        return self.augment(x), self.augment(x)


def augment_from_options(size: int, opts: dict) -> Augment:
    """The :class:`Augment` a method's options describe (``crop_scale``, ``flip_p``, ``jitter_p``, ``jitter``, ``blur_p``)."""
    return Augment(size, opts["crop_scale"], opts["flip_p"], opts["jitter_p"], opts["jitter"], opts["blur_p"])
