"""Augmented views for the image- and region-level methods (SimSiam, SimCLR, SepaReg).

Plain torch ops on ``(C, H, W)`` images in [0, 1]: random resized crop, horizontal flip,
brightness/contrast jitter and Gaussian blur (:class:`Augment`); :class:`TwoViews` gives two
independent views of each item.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset


class Augment:
    """Random view of a ``(C, H, W)`` image in [0, 1], output ``(C, size, size)``.

    Random resized crop (area ``crop_scale``, aspect 3/4-4/3), horizontal flip, brightness and
    contrast jitter (factors in ``1 +- jitter``, with probability ``jitter_p``), Gaussian blur
    (sigma 0.1-2 px, probability ``blur_p``). Uses the torch RNG (seeded per DataLoader worker).
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

    @staticmethod
    def _u(lo: float, hi: float) -> float:
        return lo + (hi - lo) * torch.rand(()).item()

    def crop_box(self, h: int, w: int) -> tuple[int, int, int, int]:
        area = h * w
        for _ in range(10):
            target = area * self._u(*self.crop_scale)
            ratio = math.exp(self._u(math.log(3 / 4), math.log(4 / 3)))
            cw, ch = int(round(math.sqrt(target * ratio))), int(round(math.sqrt(target / ratio)))
            if 0 < cw <= w and 0 < ch <= h:
                top = int(torch.randint(0, h - ch + 1, ()).item())
                left = int(torch.randint(0, w - cw + 1, ()).item())
                return top, left, ch, cw
        return 0, 0, h, w

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        _, h, w = x.shape
        top, left, ch, cw = self.crop_box(h, w)
        x = x[:, top : top + ch, left : left + cw]
        down = ch > self.size or cw > self.size
        x = F.interpolate(x[None], size=(self.size, self.size), mode="bilinear", align_corners=False, antialias=down)[0]
        if torch.rand(()).item() < self.flip_p:
            x = x.flip(-1)
        if torch.rand(()).item() < self.jitter_p:
            j = self.jitter
            order = torch.randperm(2).tolist()
            for op in order:
                if op == 0:  # brightness
                    x = x * self._u(1 - j, 1 + j)
                else:  # contrast
                    mean = x.mean()
                    x = (x - mean) * self._u(1 - j, 1 + j) + mean
            x = x.clamp(0.0, 1.0)
        if torch.rand(()).item() < self.blur_p:
            x = gaussian_blur(x, self._u(*self.blur_sigma))
        return x.contiguous()


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of a ``(C, H, W)`` image (reflect padding)."""
    radius = max(1, int(math.ceil(3 * sigma)))
    radius = min(radius, (min(x.shape[-2:]) - 1))
    if radius < 1:
        return x
    t = torch.arange(-radius, radius + 1, dtype=x.dtype)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = k / k.sum()
    c = x.shape[0]
    y = F.pad(x[None], (radius, radius, radius, radius), mode="reflect")
    y = F.conv2d(y, k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    y = F.conv2d(y, k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)
    return y[0]


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
