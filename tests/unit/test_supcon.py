"""The modal-target supervised contrastive loss (AGCL Eq. 3) against values computed by hand."""

import math

import pytest
import torch

from contourcl.training.pretrain.supcon import SupConLoss, modal_target_labels, supcon_loss

torch.set_num_threads(1)

# four unit vectors in the plane; labels: {0, 1} share class 0, {2, 3} share class 1
Z = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0], [-1.0, 0.0]])
LABELS = torch.tensor([0, 0, 1, 1])


def hand_value(T: float) -> list[float]:
    """Per-anchor terms of Eq. 3, written out from the dot products.

    Dot products: z0.z1 = 0.6, z0.z2 = 0, z0.z3 = -1, z1.z2 = 0.8, z1.z3 = -0.6, z2.z3 = 0.
    Each anchor has exactly one positive, so the term is -log(e^{pos/T} / sum_{j != k} e^{dot/T}).
    """
    e = lambda d: math.exp(d / T)  # noqa: E731
    k0 = -math.log(e(0.6) / (e(0.6) + e(0.0) + e(-1.0)))  # positive: z1
    k1 = -math.log(e(0.6) / (e(0.6) + e(0.8) + e(-0.6)))  # positive: z0
    k2 = -math.log(e(0.0) / (e(0.0) + e(0.8) + e(0.0)))  # positive: z3
    k3 = -math.log(e(0.0) / (e(-1.0) + e(-0.6) + e(0.0)))  # positive: z2
    return [k0, k1, k2, k3]


def test_sum_over_anchors_matches_hand_value():
    for T in (0.1, 0.5, 1.0):
        expected = sum(hand_value(T))
        got = supcon_loss(Z, LABELS, temperature=T)
        assert got.item() == pytest.approx(expected, rel=1e-5)


def test_loss_at_temperature_half_is_these_numbers():
    # each anchor's term at T = 0.5, simplified by hand from the dot products (positive first):
    # k0 = log(1 + e^-1.2 + e^-3.2), k1 = log(1 + e^0.4 + e^-2.4), k2 = log(2 + e^1.6),
    # k3 = log(1 + e^-1.2 + e^-2), evaluated to five decimals
    terms = [0.29413, 0.94877, 1.93918, 0.36223]
    assert hand_value(0.5) == pytest.approx(terms, abs=1e-5)
    assert supcon_loss(Z, LABELS, temperature=0.5).item() == pytest.approx(sum(terms), abs=1e-4)  # 3.54431
    assert supcon_loss(Z, LABELS, temperature=0.5, reduction="mean").item() == pytest.approx(sum(terms) / 4, abs=1e-4)
    # a wrong positive set (every other sample a positive) gives another number
    assert supcon_loss(Z, torch.zeros(4, dtype=torch.long), temperature=0.5).item() != pytest.approx(sum(terms), abs=1e-2)


def test_mean_reduction_and_module_form():
    expected = sum(hand_value(0.1)) / 4
    assert supcon_loss(Z, LABELS, 0.1, reduction="mean").item() == pytest.approx(expected, rel=1e-5)
    assert SupConLoss(0.1, reduction="mean")(Z, LABELS).item() == pytest.approx(expected, rel=1e-5)


def test_several_positives_are_averaged():
    # three samples of one class and one other: anchor 0 has positives 1 and 2
    z = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0], [-1.0, 0.0]])
    labels = torch.tensor([0, 0, 0, 1])
    T = 1.0
    den0 = math.exp(0.6) + math.exp(0.0) + math.exp(-1.0)
    k0 = -0.5 * (math.log(math.exp(0.6) / den0) + math.log(math.exp(0.0) / den0))
    den1 = math.exp(0.6) + math.exp(0.8) + math.exp(-0.6)
    k1 = -0.5 * (math.log(math.exp(0.6) / den1) + math.log(math.exp(0.8) / den1))
    den2 = math.exp(0.0) + math.exp(0.8) + math.exp(0.0)
    k2 = -0.5 * (math.log(math.exp(0.0) / den2) + math.log(math.exp(0.8) / den2))
    # anchor 3 has no positive: it contributes nothing
    got = supcon_loss(z, labels, T)
    assert got.item() == pytest.approx(k0 + k1 + k2, rel=1e-5)
    assert supcon_loss(z, labels, T, reduction="mean").item() == pytest.approx((k0 + k1 + k2) / 3, rel=1e-5)


def test_features_are_normalised_and_order_does_not_matter():
    scaled = Z * torch.tensor([[2.0], [0.5], [3.0], [1.5]])
    assert supcon_loss(scaled, LABELS, 0.1).item() == pytest.approx(supcon_loss(Z, LABELS, 0.1).item(), rel=1e-5)
    perm = torch.tensor([2, 0, 3, 1])
    assert supcon_loss(Z[perm], LABELS[perm], 0.1).item() == pytest.approx(supcon_loss(Z, LABELS, 0.1).item(), rel=1e-5)


def test_no_positive_at_all_gives_zero_with_gradient():
    z = torch.randn(3, 4, requires_grad=True)
    loss = supcon_loss(z, torch.tensor([0, 1, 2]))
    assert loss.item() == 0.0
    loss.backward()
    assert z.grad is not None


def test_gradient_pulls_positives_together():
    z = Z.clone().requires_grad_(True)
    supcon_loss(z, LABELS, 0.1).backward()
    # moving z0 towards its positive z1 lowers the loss: the gradient points away from z1
    assert torch.dot(z.grad[0], Z[1] - Z[0]).item() < 0


def test_modal_target_labels():
    modality = torch.tensor([0, 0, 1, 1, 2])
    target = torch.tensor([0, 6, 0, 3, 6])
    assert modal_target_labels(modality, target, 7).tolist() == [0, 6, 7, 10, 20]
    with pytest.raises(ValueError):
        modal_target_labels(modality, torch.tensor([0, 7, 0, 0, 0]), 7)


def test_bad_arguments():
    with pytest.raises(ValueError):
        supcon_loss(Z, LABELS[:3])
    with pytest.raises(ValueError):
        supcon_loss(Z, LABELS, reduction="max")
    with pytest.raises(ValueError):
        SupConLoss(temperature=0.0)
