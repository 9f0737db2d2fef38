import pytest
import torch
from monai.losses import DiceCELoss

from contourcl.training.finetune.partial_label_loss import PartialLabelDiceCELoss


def test_equals_dice_ce_when_every_structure_is_contoured():
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 8, 8)
    target = torch.randint(0, 4, (2, 1, 8, 8))
    ours = PartialLabelDiceCELoss()(logits, target, torch.ones(2, 4))
    ref = DiceCELoss(include_background=False, to_onehot_y=True, softmax=True, batch=True)(logits, target)
    assert torch.allclose(ours, ref, atol=1e-4)


def test_marginal_probabilities_by_hand():
    logits = torch.log(torch.tensor([0.5, 0.2, 0.3])).view(1, 3, 1, 1)
    q = PartialLabelDiceCELoss.marginal_probabilities(logits, torch.tensor([[1.0, 0.0, 1.0]]))
    assert torch.allclose(q.view(-1), torch.tensor([0.7, 0.0, 0.3]), atol=1e-6)


def test_uncontoured_structure_is_not_trained_as_background():
    # the case contours only structure 1; the network predicts structure 2 where the label is 0
    target = torch.zeros(1, 1, 4, 4, dtype=torch.long)
    target[..., :2, :] = 1
    logits = torch.full((1, 3, 4, 4), -5.0, requires_grad=True)
    with torch.no_grad():
        logits[:, 1, :2, :] = 5.0
        logits[:, 2, 2:, :] = 5.0  # structure 2 where the label says background
    loss = PartialLabelDiceCELoss()(logits, target, torch.tensor([[1.0, 1.0, 0.0]]))
    loss.backward()
    # pushing structure 2 down would be erasing an organ the case did not contour: no gradient asks for it
    assert float(logits.grad[0, 2, 2:, :].sum()) <= 1e-6
    full = PartialLabelDiceCELoss()(logits.detach(), target, torch.ones(1, 3))
    assert float(full) > float(loss) + 0.5  # with the structure counted as contoured, that is a big error


def test_a_structure_pushed_below_any_clamp_still_gets_its_gradient():
    """Issue 10: the shipped oar model's oesophagus had probability 6e-7 on its own voxels and a
    clamp at 1e-6 in the cross-entropy cut its gradient. By hand: the cross-entropy's gradient on
    the true class's logit is (p - 1) / N for a mean over N voxels."""
    logits = torch.zeros(1, 3, 1, 2)
    logits[0, 2, 0, 0] = -30.0  # voxel 0 is structure 2, predicted with p ~ 5e-14
    logits = logits.requires_grad_(True)
    target = torch.tensor([[[[2, 0]]]])
    loss = PartialLabelDiceCELoss(lambda_dice=0.0, lambda_ce=1.0)(logits, target, torch.ones(1, 3))
    loss.backward()
    p = torch.softmax(logits.detach()[0, :, 0, 0], 0)
    assert torch.isfinite(loss) and float(loss) > 10  # -log(5e-14) / 2 = 15.3
    assert logits.grad[0, 2, 0, 0] == pytest.approx(float((p[2] - 1) / 2), rel=1e-5)


def test_background_folds_absent_structures_in_log_space():
    # log q_0 = log(p_0 + p_absent), exactly, even where the probabilities underflow a clamp
    logits = torch.tensor([-40.0, 0.0, -41.0]).view(1, 3, 1, 1)
    log_q = PartialLabelDiceCELoss.marginal_log_probabilities(logits, torch.tensor([[1.0, 1.0, 0.0]]))
    logp = torch.log_softmax(logits.double().view(-1), 0)
    assert float(log_q[0, 0]) == pytest.approx(float(torch.logaddexp(logp[0], logp[2])), abs=1e-4)
    assert float(log_q[0, 1]) == pytest.approx(float(logp[1]), abs=1e-6)
