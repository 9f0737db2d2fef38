"""SimCLR: the loss it trains with (MONAI's ContrastiveLoss, NT-Xent) against hand computations, and a tiny run."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from contourcl.models.encoder_checkpoint import load_encoder
from contourcl.models.networks import NetConfig, ResNetEncoder, build_network
from contourcl.training.pretrain.base import PretrainConfig
from contourcl.training.pretrain.simclr import SimCLRMethod
from contourcl.training.pretrain.trainer import pretrain
from contourcl.training.pretrain.volumes import write_synthetic_cts

torch.set_num_threads(1)


def nt_xent(t: float):
    """The criterion :class:`SimCLRMethod` trains with, at temperature ``t``."""
    return SimCLRMethod(ResNetEncoder("resnet10", 8), PretrainConfig(method="simclr", options={"temperature": t})).criterion


def nt_xent_by_hand(z1, z2, t):
    """SimCLR Eq. 1 with plain Python loops, mean over the 2N anchors."""
    reps = [np.asarray(v, float) for v in list(z1) + list(z2)]
    n = len(z1)
    cos = lambda a, b: float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))  # noqa: E731
    total = 0.0
    for i in range(2 * n):
        j = (i + n) % (2 * n)
        denom = sum(math.exp(cos(reps[i], reps[k]) / t) for k in range(2 * n) if k != i)
        total += -math.log(math.exp(cos(reps[i], reps[j]) / t) / denom)
    return total / (2 * n)


def test_nt_xent_closed_form():
    # views equal and orthogonal across images: every anchor has l = log(1 + 2 exp(-1/t))
    e = torch.eye(2)
    for t in (0.5, 0.1):
        assert nt_xent(t)(e, e.clone()).item() == pytest.approx(math.log(1 + 2 * math.exp(-1 / t)), rel=1e-4, abs=1e-7)


def test_nt_xent_matches_hand_computation():
    z1 = torch.tensor([[1.0, 2.0, 0.0], [0.0, -1.0, 1.0], [2.0, 0.5, 0.5]])
    z2 = torch.tensor([[1.0, 1.5, 0.5], [0.5, -1.0, 0.0], [-1.0, 0.0, 1.0]])
    for t in (0.5, 0.2):
        assert nt_xent(t)(z1, z2).item() == pytest.approx(nt_xent_by_hand(z1.numpy(), z2.numpy(), t), rel=1e-5)


def test_tiny_simclr_run_lowers_loss_and_checkpoint_loads(tmp_path):
    write_synthetic_cts(tmp_path / "imgs", 2, shape=(48, 48, 6))
    cfg = PretrainConfig(
        method="simclr", images=[str(tmp_path / "imgs")], out=str(tmp_path / "simclr.pt"), encoder="resnet10", width=8,
        image_size=32, batch_size=8, iterations=16, lr=3e-3, schedule="constant", num_workers=0, cache_dir=str(tmp_path / "cache"),
        progress=False, options={"proj_hidden": 32, "proj_dim": 16},
    )
    result = pretrain(cfg)
    losses = [v for _, v in result["history"]["main"]]
    assert np.mean(losses[-4:]) < np.mean(losses[:4])
    net = build_network(NetConfig(out_channels=8, encoder="resnet10", width=8))
    assert load_encoder(net, cfg.out)["method"] == "simclr"
    assert not torch.allclose(net.encoder.resnet.conv1.weight, ResNetEncoder("resnet10", 8).resnet.conv1.weight)
