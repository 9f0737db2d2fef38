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
