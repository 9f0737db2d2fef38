"""Voxel-level Siamese feature loss (Lee, Chung & Shin): hand values, stop-gradient, sampling, U-Net hooks."""

import math

import pytest
import torch

from contourcl.models.networks import NetConfig, build_network
from contourcl.training.finetune.voxel_siamese import (
    DEFAULT_LAMBDA,
    VoxelSiameseLoss,
    class_weights,
    decoder_features,
    forward_with_decoder_features,
    forward_with_features,
    sample_voxels,
    voxel_siamese_layer_loss,
)

torch.set_num_threads(1)

# four voxels: three of class 0, one of class 2
P = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8], [3.0, 4.0]])
Z = torch.tensor([[2.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, 5.0]])
LAB = torch.tensor([0, 0, 0, 2])


def hand_layer_loss(reduction: str) -> float:
    """Eq. 6 written out: w_c = (|P|/|P^c|) / sum_c' (|P|/|P^c'|).

    Class 0: |P^0| = 3 -> 4/3; class 2: |P^2| = 1 -> 4; sum 16/3, so w_0 = 1/4, w_2 = 3/4.
    Normalised vectors: p = (1,0), (0,1), (.6,.8), (.6,.8); z = (1,0), (0,1), (-1,0), (0,1).
    Class 0, all 9 pairs p_i . z_j:
      p0: 1, 0, -1   p1: 0, 1, 0   p2: .6, .8, -.6   -> sum 1.8, mean 0.2
    Class 2: p3 . z3 = 0.8.
    """
    w0, w2 = 0.25, 0.75
    s0, s2 = 1.8, 0.8
    if reduction == "mean":
        s0 = s0 / 9
    return -(w0 * s0 + w2 * s2)


def test_layer_loss_matches_hand_value():
    assert voxel_siamese_layer_loss(P, Z, LAB).item() == pytest.approx(hand_layer_loss("mean"), rel=1e-6)
    assert hand_layer_loss("mean") == pytest.approx(-(0.25 * 0.2 + 0.75 * 0.8))
    got = voxel_siamese_layer_loss(P, Z, LAB, pair_reduction="sum")
    assert got.item() == pytest.approx(hand_layer_loss("sum"), rel=1e-6)


def test_unweighted_variant():
    # w_c = 1: -(0.2 + 0.8)
    assert voxel_siamese_layer_loss(P, Z, LAB, weighted=False).item() == pytest.approx(-1.0, rel=1e-6)


def test_class_weights_inverse_frequency():
    classes, w = class_weights(torch.tensor([0, 0, 0, 0, 0, 0, 1, 1, 3]))
    assert classes.tolist() == [0, 1, 3]
    # |P|/|P^c| = 9/6, 9/2, 9/1 -> proportional to 1/6 : 1/2 : 1
    inv = torch.tensor([1 / 6, 1 / 2, 1.0])
    assert torch.allclose(w, inv / inv.sum())
    assert w.sum().item() == pytest.approx(1.0)


def test_stop_gradient_blocks_the_target_branch():
    p = P.clone().requires_grad_(True)
    z = Z.clone().requires_grad_(True)
    voxel_siamese_layer_loss(p, z, LAB).backward()
    assert p.grad is not None and p.grad.abs().sum() > 0
    assert z.grad is None  # nothing flows through stopgrad(z)

    p2 = P.clone().requires_grad_(True)
    z2 = Z.clone().requires_grad_(True)
    voxel_siamese_layer_loss(p2, z2, LAB, stop_gradient=False).backward()
    assert z2.grad is not None and z2.grad.abs().sum() > 0  # the control: without it, it would flow


def test_stop_gradient_inside_the_heads():
    """z = proj(f) receives gradient only through the predictor branch p = pred(z), never as the target."""
    torch.manual_seed(0)
    loss_fn = VoxelSiameseLoss([4], hidden=8)
    head = loss_fn.heads[0].eval()  # fixed batch-norm statistics, so the two passes agree
    labels = torch.tensor([0, 0, 1, 1, 1, 2])
    z = head.projector(torch.randn(6, 4)).detach().requires_grad_(True)
    (g_sg,) = torch.autograd.grad(voxel_siamese_layer_loss(head.predictor(z), z, labels), z)
    (g_pred_only,) = torch.autograd.grad(voxel_siamese_layer_loss(head.predictor(z), z.detach(), labels), z)
    (g_both,) = torch.autograd.grad(voxel_siamese_layer_loss(head.predictor(z), z, labels, stop_gradient=False), z)
    assert torch.allclose(g_sg, g_pred_only)
    assert not torch.allclose(g_sg, g_both)


def test_sampling_favours_false_negatives():
    g = torch.Generator().manual_seed(0)
    labels = torch.zeros(1, 100, 100, dtype=torch.long)
    preds = torch.zeros_like(labels)
    labels[0, :10, :] = 1  # 1000 voxels of class 1 ...
    preds[0, :5, :] = 1  # ... of which 500 predicted: 500 false negatives
    idx = sample_voxels(labels, preds, max_samples=50, max_false_negatives=30, generator=g)
    assert idx.numel() == 50
    fn = (labels.flatten()[idx] == 1) & (preds.flatten()[idx] == 0)
    assert int(fn.sum()) == 30  # the cap of false negatives is filled first
    assert len(set(idx.tolist())) == 50  # without repetition

    preds[0, :10, :] = 1
    preds[0, 9, :4] = 0  # only 4 false negatives: all taken
    idx = sample_voxels(labels, preds, 50, 30, generator=g)
    fn = (labels.flatten()[idx] == 1) & (preds.flatten()[idx] == 0)
    assert idx.numel() == 50 and int(fn.sum()) == 4


def test_sampling_caps_scale_down_on_small_layers():
    labels = torch.ones(1, 1, 34, dtype=torch.long)
    preds = labels.clone()
    preds[0, 0, :20] = 0  # 20 false negatives, 14 true positives
    idx = sample_voxels(labels, preds, max_samples=1700, max_false_negatives=1000)
    # 34 voxels < 1700: the false-negative cap becomes 1000 * 34 / 1700 = 20, the total 34
    assert idx.numel() == 34 and sorted(idx.tolist()) == list(range(34))
    preds[0, 0, :] = 0  # all 34 are false negatives: at most 20 of them are taken
    idx = sample_voxels(labels, preds, max_samples=1700, max_false_negatives=1000)
    assert idx.numel() == 20
    valid = torch.zeros_like(labels, dtype=torch.bool)
    valid[0, 0, 30:] = True  # 4 valid voxels, cap round(1000 * 4 / 1700) = 2
    idx = sample_voxels(labels, preds, valid=valid)
    assert idx.numel() == 2 and set(idx.tolist()) <= {30, 31, 32, 33}


def tiny_net():
    torch.manual_seed(0)
    return build_network(NetConfig(out_channels=4, encoder="resnet10", width=8))


def test_feature_maps_are_the_papers_layers():
    """Lee, Chung & Shin: F_1 = the last encoder layer, F_2, F_3 = the two deepest skips (the default).

    Expected shapes from the encoder config alone: resnet10 (basic blocks, expansion 1), width 8:
    layer4 has 8 * width channels at stride 32, layer3 4 * width at 16, layer2 2 * width at 8.
    """
    from contourcl.training.finetune.voxel_siamese import VoxelSiameseNet, forward_with_features

    net = tiny_net().eval()
    width, side = 8, 64
    expected = [(2, 8 * width, side // 32, side // 32), (2, 4 * width, side // 16, side // 16), (2, 2 * width, side // 8, side // 8)]
    x = torch.randn(2, 1, side, side)
    with torch.no_grad():
        logits, feats = forward_with_features(net, x)
        assert [tuple(f.shape) for f in feats] == expected
        enc = net.encoder(x)  # [f1..f5]; the decoder's input is f5, its deepest skips f4, f3
        assert torch.equal(feats[0], enc[4]) and torch.equal(feats[1], enc[3]) and torch.equal(feats[2], enc[2])
        assert torch.allclose(logits, net(x))
    aux = VoxelSiameseLoss.for_network(net, hidden=16)
    assert [h.projector[0].in_features for h in aux.heads] == [8 * width, 4 * width, 2 * width]
    assert VoxelSiameseNet(net, hidden=16).placement == "encoder"
    with pytest.raises(ValueError):
        forward_with_features(net, x, placement="middle")


def test_decoder_placement_is_an_explicit_option():
    """The deviation kept as an option: the finest three decoder outputs."""
    from contourcl.training.finetune.voxel_siamese import forward_with_features

    net = tiny_net().eval()
    x = torch.randn(2, 1, 64, 64)
    with torch.no_grad():
        feats = decoder_features(net, net.encoder(x))
        logits, feats2 = forward_with_decoder_features(net, x)
        assert [tuple(f.shape) for f in feats] == [(2, c, s, s) for c, s in zip(net.config.decoder_channels[-3:], (16, 32, 64), strict=False)]
        assert torch.allclose(feats[-1], net.decode(net.encoder(x)))
        assert torch.allclose(logits, net(x))
        assert all(torch.equal(a, b) for a, b in zip(feats, feats2, strict=False))
        _, feats3 = forward_with_features(net, x, placement="decoder")
        assert all(torch.equal(a, b) for a, b in zip(feats, feats3, strict=False))
    aux = VoxelSiameseLoss.for_network(net, hidden=16, placement="decoder")
    assert [h.projector[0].in_features for h in aux.heads] == list(net.config.decoder_channels[-3:])


def test_auxiliary_loss_trains_the_unet_and_the_heads():
    net = tiny_net().train()
    aux = VoxelSiameseLoss.for_network(net, hidden=16)
    assert len(aux.heads) == 3
    x = torch.randn(2, 1, 64, 64)
    labels = torch.zeros(2, 1, 64, 64, dtype=torch.long)
    labels[:, :, 10:30, 10:30] = 1
    labels[:, :, 40:50, 35:60] = 3
    from contourcl.training.finetune.voxel_siamese import forward_with_features

    logits, feats = forward_with_features(net, x)
    feature_loss = aux(feats, labels, logits)
    assert torch.isfinite(feature_loss)
    assert -3.0 - 1e-5 <= feature_loss.item() <= 3.0 + 1e-5  # three layers, each a weighted mean cosine
    seg = logits.float().mean() * 0  # stands in for the Dice loss
    total = seg + DEFAULT_LAMBDA * feature_loss  # Eq. 8, as the fine-tuning loop adds it
    total.backward()
    # the paper's placement: the feature loss trains the encoder (layer4, layer3, layer2 and below),
    # not the decoder
    assert net.encoder.resnet.layer4[0].conv1.weight.grad.abs().sum() > 0
    assert net.encoder.resnet.layer2[0].conv1.weight.grad.abs().sum() > 0
    assert net.encoder.resnet.conv1.weight.grad.abs().sum() > 0
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in net.decoder.parameters())
    assert all(h.predictor[0].weight.grad is not None for h in aux.heads)
    assert net.head[0].weight.grad is None or net.head[0].weight.grad.abs().sum() == 0  # not on the logits path


def test_feature_loss_decreases_when_optimised():
    net = tiny_net().train()
    aux = VoxelSiameseLoss.for_network(net, hidden=16, max_samples=256, max_false_negatives=128)
    opt = torch.optim.Adam([*net.parameters(), *aux.parameters()], lr=1e-2)
    torch.manual_seed(1)
    x = torch.rand(2, 1, 64, 64)
    labels = torch.zeros(2, 1, 64, 64, dtype=torch.long)
    labels[:, :, 8:40, 8:40] = 1
    labels[:, :, 44:60, 20:60] = 2
    x = x + labels.float()
    values = []
    for _ in range(15):
        logits, feats = forward_with_features(net, x)
        loss = aux(feats, labels, logits)
        opt.zero_grad()
        loss.backward()
        opt.step()
        values.append(loss.item())
    assert sum(values[-3:]) / 3 < sum(values[:3]) / 3
    # a lower loss is also what collapse gives (every voxel of a class on one vector, -3 at the
    # limit): each head's projections must still spread over the voxels. The mean per-dimension
    # std of the l2-normalised z, times sqrt(d), measured: 0.94-0.97 here; 0.23-0.25 with the
    # stop-gradient and the projector's batch norm removed (collapse, loss -2.9)
    net.eval()
    aux.eval()
    with torch.no_grad():
        _, feats = forward_with_features(net, x)
        for layer, (f, head) in enumerate(zip(feats, aux.heads, strict=True)):
            z = torch.nn.functional.normalize(head.projector(f.permute(0, 2, 3, 1).reshape(-1, f.shape[1])), dim=1)
            spread = float(z.std(dim=0).mean()) * math.sqrt(z.shape[1])
            assert spread > 0.3, f"layer {layer} collapsed: per-dimension std {spread:.3f}/sqrt(d)"


def test_all_invalid_gives_zero_and_bad_inputs_raise():
    aux = VoxelSiameseLoss([4, 4, 4], hidden=8)
    feats = [torch.randn(1, 4, s, s) for s in (4, 8, 16)]
    labels = torch.ones(1, 16, 16, dtype=torch.long)
    assert aux(feats, labels, labels, valid=torch.zeros(1, 16, 16, dtype=torch.bool)).item() == 0.0
    with pytest.raises(ValueError):
        aux(feats[:2], labels, labels)
    with pytest.raises(ValueError):
        VoxelSiameseLoss([4], max_samples=10, max_false_negatives=20)
    assert math.isfinite(aux(feats, labels, torch.zeros(1, 3, 16, 16)).item())


def test_wrapper_for_the_fine_tuning_loop():
    from contourcl.training.finetune.voxel_siamese import VoxelSiameseNet, trusted_voxels

    net = tiny_net()
    model = VoxelSiameseNet(net, hidden=16).train()
    x = torch.randn(2, 1, 64, 64)
    labels = torch.zeros(2, 1, 64, 64, dtype=torch.long)
    labels[:, :, 10:30, 10:30] = 1
    logits, feature_loss = model(x, labels)
    assert logits.shape == (2, 4, 64, 64) and feature_loss.ndim == 0
    (logits.mean() + DEFAULT_LAMBDA * feature_loss).backward()
    assert all(h.projector[0].weight.grad is not None for h in model.feature_loss.heads)
    model.eval()
    with torch.no_grad():
        assert torch.allclose(model(x)[0], net(x))
        assert model(x)[1].item() == 0.0
    # heads are not part of the U-Net: its state dict (what is saved) is unchanged in keys
    assert set(net.state_dict()) == set(build_network(net.config).state_dict())

    present = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 1]], dtype=torch.float32)
    trusted = trusted_voxels(labels, present)
    assert trusted.shape == (2, 64, 64)
    assert trusted[0].all()  # every structure contoured: background is background
    assert torch.equal(trusted[1], labels[1, 0] > 0)  # structure 2 not contoured: background unsure
    assert trusted_voxels(labels, None) is None
