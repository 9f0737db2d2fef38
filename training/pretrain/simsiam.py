"""SimSiam (Chen & He, CVPR 2021): heads, the stop-gradient loss and the image-level SimSiam baseline.

The heads follow SepaReg (Wang et al., AAAI 2022), which reuses SimSiam on regions: the
projector is two layers, Linear-BN-ReLU-Linear (hidden 4096, out 256), and the predictor "has
the same architecture as the projector" (hidden 4096): ``mlp_head([d, 4096, 256])``
(:mod:`contourcl.training.pretrain.heads`). SimSiam's own projector has three layers with BN on
each, "including its output fc", and its predictor is Linear-BN-ReLU-Linear (Sec. 3, baseline
settings). The loss is SepaReg's Eq. 1-2 (SimSiam's Eq. 1-2 and 4)::

    D(p, z) = - p / ||p||_2 . z / ||z||_2                    (Eq. 2)
    L = 1/2 D(p1, stopgrad(z2)) + 1/2 D(p2, stopgrad(z1))    (Eq. 1)

with ``z = projector(encoder(view))`` and ``p = predictor(z)``. SepaReg's code uses
``2 - 2 cos`` instead of ``-cos`` (same minimiser, twice the gradient); ``distance="2-2cos"``
selects it.

The baseline (``contourcl pretrain simsiam``) trains on two augmented views of an axial slice
(:mod:`contourcl.training.pretrain.augment`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from contourcl.models.networks import ResNetEncoder
from contourcl.training.pretrain.augment import TwoViews, augment_from_options
from contourcl.training.pretrain.base import PretrainMethod
from contourcl.training.pretrain.heads import mlp_head
from contourcl.training.pretrain.volumes import SliceDataset

DISTANCES = ("neg-cos", "2-2cos")


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
    """Encoder + projector + predictor (SepaReg's: Linear-BN-ReLU-Linear); ``forward((v1, v2))`` -> ``(loss, logs)``.

    ``logs["z_std"]`` is the per-dimension std of the l2-normalised projections, SimSiam's
    collapse monitor: about ``1/sqrt(out_dim)`` when healthy, 0 when collapsed.
    """

    def __init__(self, encoder: ResNetEncoder, proj_hidden: int = 4096, proj_dim: int = 256, pred_hidden: int = 4096, distance: str = "neg-cos"):
        super().__init__()
        self.encoder = encoder
        self.projector = mlp_head([encoder.feature_dim, proj_hidden, proj_dim])
        self.predictor = mlp_head([proj_dim, pred_hidden, proj_dim])
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


class SimSiamMethod(PretrainMethod):
    """Image-level SimSiam on axial slices (baseline). SGD, lr 0.05 x batch / 256 (SimSiam's rule)."""

    name = "simsiam"
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
