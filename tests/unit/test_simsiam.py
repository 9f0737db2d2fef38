"""SimSiam: loss values by hand, stop-gradient, heads, augmentations, a tiny baseline run."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

from contourcl.data.datasets import find_ct_images
from contourcl.models.encoder_checkpoint import load_encoder
from contourcl.models.networks import NetConfig, ResNetEncoder, build_network
from contourcl.testing import COLLAPSE_FLOOR, embedding_spread
from contourcl.training.pretrain.augment import Augment, RandResizedCrop, TwoViews
from contourcl.training.pretrain.base import PretrainConfig
from contourcl.training.pretrain.simsiam import SimSiamLoss, SimSiamModel, negative_cosine, simsiam_loss
from contourcl.training.pretrain.trainer import pretrain
from contourcl.training.pretrain.volumes import SliceDataset, load_volumes, write_synthetic_cts

torch.set_num_threads(1)

SQRT2 = math.sqrt(2.0)


def test_negative_cosine_by_hand():
    p = torch.tensor([[1.0, 0.0], [3.0, 4.0]])
    z = torch.tensor([[1.0, 1.0], [4.0, 3.0]])
    # cos = 1/sqrt(2) and 24/25
    expected = -(1 / SQRT2 + 24 / 25) / 2
    assert negative_cosine(p, z).item() == pytest.approx(expected, abs=1e-6)
    expected_code = ((2 - 2 / SQRT2) + (2 - 2 * 24 / 25)) / 2
    assert negative_cosine(p, z, distance="2-2cos").item() == pytest.approx(expected_code, abs=1e-6)


def test_symmetric_loss_by_hand():
    p1 = torch.tensor([[1.0, 0.0]])
    p2 = torch.tensor([[0.0, 2.0]])
    z1 = torch.tensor([[1.0, 1.0]])
    z2 = torch.tensor([[-1.0, 0.0]])
    # 1/2 D(p1, z2) + 1/2 D(p2, z1) = 1/2 (-(-1)) + 1/2 (-(1/sqrt 2))
    expected = 0.5 * 1.0 + 0.5 * (-1 / SQRT2)
    assert simsiam_loss(p1, p2, z1, z2).item() == pytest.approx(expected, abs=1e-6)
    assert SimSiamLoss()(p1, p2, z1, z2).item() == pytest.approx(expected, abs=1e-6)


def test_stop_gradient_blocks_the_target_branch():
    torch.manual_seed(0)
    z = torch.randn(8, 4, requires_grad=True)  # projections of both views
    predictor = torch.nn.Linear(4, 4)
    p = predictor(z)
    z1, z2 = z.chunk(2)
    p1, p2 = p.chunk(2)

    # the targets: no gradient reaches z through them
    z_leaf1, z_leaf2 = z1.detach().requires_grad_(), z2.detach().requires_grad_()
    p_leaf1, p_leaf2 = p1.detach().requires_grad_(), p2.detach().requires_grad_()
    simsiam_loss(p_leaf1, p_leaf2, z_leaf1, z_leaf2).backward()
    assert z_leaf1.grad is None and z_leaf2.grad is None
    assert p_leaf1.grad.abs().sum() > 0 and p_leaf2.grad.abs().sum() > 0

    # through the whole graph, z's gradient is exactly the one through the predictor
    (g_stop,) = torch.autograd.grad(simsiam_loss(p1, p2, z1, z2), z, retain_graph=True)
    no_sg = 0.5 * (negative_cosine(p1, z2, stop_gradient=False) + negative_cosine(p2, z1, stop_gradient=False))
    (g_full,) = torch.autograd.grad(no_sg, z, retain_graph=True)
    manual = 0.5 * (-torch.nn.functional.cosine_similarity(p1, z2.detach()).mean() - torch.nn.functional.cosine_similarity(p2, z1.detach()).mean())
    (g_manual,) = torch.autograd.grad(manual, z)
    assert torch.allclose(g_stop, g_manual, atol=1e-7)
    assert not torch.allclose(g_stop, g_full, atol=1e-4)


def test_heads_have_the_papers_shape():
    """SepaReg (Method, Region-level representation): the projector has "two layers with a hidden
    dimension of 4096 and output size of 256", batch norm and ReLU between them; the predictor has
    "same architecture as projector" (256 -> 4096 -> 256). Every layer's widths, checked one by one."""
    encoder = ResNetEncoder("resnet10", 8)
    model = SimSiamModel(encoder)  # SepaReg's defaults
    d = encoder.feature_dim

    def shape(head):
        out = []
        for m in head:
            if isinstance(m, torch.nn.Linear):
                out.append(("Linear", m.in_features, m.out_features, m.bias is not None))
            elif isinstance(m, torch.nn.BatchNorm1d):
                out.append(("BatchNorm1d", m.num_features))
            else:
                out.append((type(m).__name__,))
        return out

    # a Linear followed by batch norm has no bias (the norm's shift replaces it)
    assert shape(model.projector) == [("Linear", d, 4096, False), ("BatchNorm1d", 4096), ("ReLU",), ("Linear", 4096, 256, True)]
    assert shape(model.predictor) == [("Linear", 256, 4096, False), ("BatchNorm1d", 4096), ("ReLU",), ("Linear", 4096, 256, True)]
    small = SimSiamModel(ResNetEncoder("resnet10", 8), proj_hidden=32, proj_dim=16, pred_hidden=32)
    assert shape(small.predictor) == [("Linear", 16, 32, False), ("BatchNorm1d", 32), ("ReLU",), ("Linear", 32, 16, True)]
    x = torch.rand(4, 1, 32, 32)
    z = small.project(x)
    assert z.shape == (4, 16) and small.predictor(z).shape == (4, 16)
    loss, logs = small((x, torch.rand(4, 1, 32, 32)))
    assert loss.ndim == 0 and "z_std" in logs


def test_augment_shapes_and_range():
    torch.manual_seed(0)
    x = torch.rand(1, 40, 30)
    aug = Augment(32, jitter_p=1.0, blur_p=1.0)
    views = [aug(x) for _ in range(5)]
    assert all(type(v) is torch.Tensor and v.dtype == torch.float32 and v.shape == (1, 32, 32) for v in views)
    assert all(0.0 <= v.min() and v.max() <= 1.0 for v in views)
    assert not torch.allclose(views[0], views[1])
    # the whole image (area fraction 1), no flip or jitter: identity; with flip_p = 1: mirrored
    y = torch.rand(1, 16, 16)
    assert torch.allclose(Augment(16, (1.0, 1.0), flip_p=0.0, jitter_p=0.0, blur_p=0.0)(y), y)
    assert torch.allclose(Augment(16, (1.0, 1.0), flip_p=1.0, jitter_p=0.0, blur_p=0.0)(y), y.flip(-1))
    # blur keeps a constant image constant, also at the borders, and smooths an impulse
    blur = Augment(16, (1.0, 1.0), flip_p=0.0, jitter_p=0.0, blur_p=1.0, blur_sigma=(1.0, 1.0))
    assert torch.allclose(blur(torch.full((1, 16, 16), 0.5)), torch.full((1, 16, 16), 0.5), atol=1e-4)
    impulse = torch.zeros(1, 16, 16)
    impulse[0, 8, 8] = 1
    assert blur(impulse)[0, 8, 8] < 0.5 and blur(impulse).sum().item() == pytest.approx(1.0, abs=1e-3)
    # the crop box: area fraction in crop_scale, aspect ratio 3/4 to 4/3 (up to rounding), inside the image
    crop = RandResizedCrop(32, (0.2, 1.0))
    crop.set_random_state(0)
    for _ in range(200):
        crop.randomize((100, 80))
        top, left, h, w = crop.box
        assert 0 <= top and top + h <= 100 and 0 <= left and left + w <= 80
        if (h, w) != (100, 80):  # else the fallback: the whole image
            assert 0.19 <= h * w / 8000 <= 1.0 and 0.74 <= w / h <= 1.36


def test_augment_is_seeded_by_torch_and_differs_between_workers():
    aug = Augment(16)
    x = torch.rand(1, 20, 20)
    torch.manual_seed(3)
    a = [aug(x) for _ in range(3)]
    torch.manual_seed(3)
    b = [aug(x) for _ in range(3)]
    assert all(torch.equal(u, v) for u, v in zip(a, b, strict=False))

    class Same(torch.utils.data.Dataset):
        def __len__(self):
            return 2

        def __getitem__(self, i):
            return x

    def views(seed):
        loader = torch.utils.data.DataLoader(TwoViews(Same(), aug), batch_size=1, num_workers=2, generator=torch.Generator().manual_seed(seed))
        return [torch.cat(pair) for pair in loader]

    first, again = views(0), views(0)
    assert all(torch.equal(u, v) for u, v in zip(first, again, strict=False)), "same seed, same views"
    assert not torch.allclose(first[0], first[1]), "each worker draws its own views"


def test_tiny_simsiam_run_lowers_loss_and_checkpoint_loads(tmp_path):
    write_synthetic_cts(tmp_path / "imgs", 2, shape=(48, 48, 6))
    cfg = PretrainConfig(
        method="simsiam", images=[str(tmp_path / "imgs")], out=str(tmp_path / "simsiam.pt"), encoder="resnet10", width=8,
        image_size=32, batch_size=8, iterations=16, lr=0.05, schedule="constant", num_workers=0, cache_dir=str(tmp_path / "cache"),
        progress=False, options={"proj_hidden": 64, "pred_hidden": 64, "proj_dim": 32},
    )
    volumes = load_volumes(find_ct_images(cfg.images), cache_dir=cfg.cache_dir)
    result = pretrain(cfg, volumes=volumes)
    losses = [v for _, v in result["history"]["main"]]
    assert len(losses) == 16
    assert np.mean(losses[-4:]) < np.mean(losses[:4])
    # a lower loss is also what collapse gives: the projections must still spread over the slices
    slices = SliceDataset(volumes, cfg.image_size)
    model = copy.deepcopy(result["method"].model).train()
    spread = embedding_spread(model.project, torch.stack([slices[i] for i in range(len(slices))]))
    assert spread > COLLAPSE_FLOOR, f"collapsed: per-dimension std {spread:.3f}/sqrt(d)"

    net = build_network(NetConfig(out_channels=8, encoder="resnet10", width=8))
    meta = load_encoder(net, cfg.out)
    assert meta["method"] == "simsiam" and meta["iterations"] == 16
    torch.manual_seed(cfg.seed)
    initial = ResNetEncoder("resnet10", 8)  # the trainer's initial encoder (same seed)
    changed = [k for k, v in initial.state_dict().items() if v.is_floating_point() and not torch.allclose(v, net.encoder.state_dict()[k])]
    assert "resnet.conv1.weight" in changed and len(changed) > len(initial.state_dict()) // 2
