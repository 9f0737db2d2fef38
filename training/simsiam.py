"""SimSiam (Chen & He, CVPR 2021): heads, the stop-gradient loss, augmentations, and the
image-level SimSiam baseline.

The heads follow SepaReg (Wang et al., AAAI 2022), which reuses SimSiam on regions: the
projector is two layers, Linear-BN-ReLU-Linear (hidden 4096, out 256), and the predictor "has
the same architecture as the projector" (hidden 4096). The loss is SepaReg's Eq. 1-2 (SimSiam's
Eq. 1-2 and 4)::

    D(p, z) = - p / ||p||_2 . z / ||z||_2                    (Eq. 2)
    L = 1/2 D(p1, stopgrad(z2)) + 1/2 D(p2, stopgrad(z1))    (Eq. 1)

with ``z = projector(encoder(view))`` and ``p = predictor(z)``. SepaReg's code uses
``2 - 2 cos`` instead of ``-cos`` (same minimiser, twice the gradient); ``distance="2-2cos"``
selects it.

The baseline (``contourcl pretrain simsiam``) trains on two augmented views of an axial slice.
Augmentations are plain torch ops on ``(1, H, W)`` images in [0, 1]: random resized crop,
horizontal flip, brightness/contrast jitter and Gaussian blur (:class:`Augment`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from contourcl.networks import ResNetEncoder
from contourcl.training.base import PretrainMethod, register_method
from contourcl.training.volumes import SliceDataset

DISTANCES = ("neg-cos", "2-2cos")


# ----------------------------------------------------------------------------------------------
# heads


def projection_mlp(in_dim: int, hidden_dim: int = 4096, out_dim: int = 256) -> nn.Sequential:
    """Linear-BN-ReLU-Linear: SepaReg's projector (and, with ``in_dim = out_dim``, its predictor)."""
    return nn.Sequential(
        nn.Linear(in_dim, hidden_dim, bias=False),
        nn.BatchNorm1d(hidden_dim),
        nn.ReLU(inplace=True),
        nn.Linear(hidden_dim, out_dim),
    )


# ----------------------------------------------------------------------------------------------
# loss


def negative_cosine(p: torch.Tensor, z: torch.Tensor, stop_gradient: bool = True, distance: str = "neg-cos") -> torch.Tensor:
    """``D(p, z)`` of SepaReg's Eq. 2 averaged over the batch: ``-cos(p, z)``; ``z`` is detached.

    ``distance="2-2cos"`` gives ``2 - 2 cos(p, z)`` (SepaReg's and BYOL's code). Computed in
    float32 (safe under autocast).
    """
    if distance not in DISTANCES:
        raise ValueError(f"distance must be one of {DISTANCES}, not {distance!r}")
    if stop_gradient:
        z = z.detach()
    cos = F.cosine_similarity(p.float(), z.float(), dim=-1, eps=1e-8)
    d = -cos if distance == "neg-cos" else 2.0 - 2.0 * cos
    return d.mean()


def simsiam_loss(p1, p2, z1, z2, distance: str = "neg-cos") -> torch.Tensor:
    """SepaReg's Eq. 1: ``1/2 D(p1, stopgrad(z2)) + 1/2 D(p2, stopgrad(z1))``."""
    return 0.5 * (negative_cosine(p1, z2, True, distance) + negative_cosine(p2, z1, True, distance))


class SimSiamLoss(nn.Module):
    """The symmetric negative-cosine loss with stop-gradient (SepaReg Eq. 1-2, SimSiam Eq. 4).

    ``forward(p1, p2, z1, z2)``: predictions and projections of the two views, ``(B, D)``.
    """

    def __init__(self, distance: str = "neg-cos"):
        super().__init__()
        if distance not in DISTANCES:
            raise ValueError(f"distance must be one of {DISTANCES}, not {distance!r}")
        self.distance = distance

    def forward(self, p1, p2, z1, z2) -> torch.Tensor:
        return simsiam_loss(p1, p2, z1, z2, self.distance)


class SimSiamModel(nn.Module):
    """Encoder + projector + predictor; ``forward((v1, v2))`` returns ``(loss, logs)``.

    ``logs["z_std"]`` is the per-dimension std of the l2-normalised projections, SimSiam's
    collapse monitor: about ``1/sqrt(out_dim)`` when healthy, 0 when collapsed.
    """

    def __init__(self, encoder: ResNetEncoder, proj_hidden: int = 4096, proj_dim: int = 256, pred_hidden: int = 4096, distance: str = "neg-cos"):
        super().__init__()
        self.encoder = encoder
        self.projector = projection_mlp(encoder.feature_dim, proj_hidden, proj_dim)
        self.predictor = projection_mlp(proj_dim, pred_hidden, proj_dim)
        self.criterion = SimSiamLoss(distance)

    def project(self, x: torch.Tensor) -> torch.Tensor:
        return self.projector(self.encoder.pooled(x))

    def forward(self, v1, v2: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, float]]:
        """``forward(v1, v2)`` or ``forward((v1, v2))`` (a batch of :class:`TwoViews`, as a stage module)."""
        if v2 is None:
            v1, v2 = v1
        z = self.project(torch.cat([v1, v2]))  # one pass: BN statistics over both views
        p = self.predictor(z)
        z1, z2 = z.chunk(2)
        p1, p2 = p.chunk(2)
        loss = self.criterion(p1, p2, z1, z2)
        with torch.no_grad():
            z_std = F.normalize(z1.float(), dim=1).std(dim=0).mean().item()
        return loss, {"loss": loss.item(), "z_std": z_std}


# ----------------------------------------------------------------------------------------------
# augmentations


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


# ----------------------------------------------------------------------------------------------
# the image-level baseline


SIMSIAM_OPTIONS = {
    "proj_hidden": 4096,
    "proj_dim": 256,
    "pred_hidden": 4096,
    "distance": "neg-cos",
    "crop_scale": [0.2, 1.0],
    "flip_p": 0.5,
    "jitter_p": 0.8,
    "jitter": 0.4,
    "blur_p": 0.5,
}


def augment_from_options(size: int, opts: dict) -> Augment:
    return Augment(size, opts["crop_scale"], opts["flip_p"], opts["jitter_p"], opts["jitter"], opts["blur_p"])


@register_method("simsiam")
class SimSiamMethod(PretrainMethod):
    """Image-level SimSiam on axial slices (baseline). SGD, lr 0.05 x batch / 256 (SimSiam's rule)."""

    default_options = dict(SIMSIAM_OPTIONS)
    default_lr = 0.05
    default_optimizer = "sgd"
    lr_reference_batch = 256

    def __init__(self, encoder: ResNetEncoder, config):
        super().__init__(encoder, config)
        o = self.options
        self.model = SimSiamModel(encoder, o["proj_hidden"], o["proj_dim"], o["pred_hidden"], o["distance"])

    def build_dataset(self, volumes) -> Dataset:
        return TwoViews(SliceDataset(volumes, self.config.image_size), augment_from_options(self.config.image_size, self.options))

    def loss(self, batch):
        v1, v2 = batch
        return self.model(v1, v2)
