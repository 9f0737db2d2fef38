"""Dice + cross-entropy for partially labeled cases: the marginal loss.

OpenKBP cases, and clinicians' corrections, contour only some structures. A structure a case
does not contour must not be trained as background. Following Shi et al., "Marginal loss and
exclusion loss for partially supervised multi-organ segmentation" (Medical Image Analysis 70,
2021, Eq. 2-4), the softmax probabilities of the structures a case lacks are merged into the
background before the loss:

    q_0 = p_0 + sum_{k not contoured} p_k,    q_k = p_k  (k contoured),

so predicting an uncontoured organ where the label says "background" costs nothing, while every
contoured organ is trained as usual. The loss is ``CE(q, y) + Dice(q, y)``, the Dice taken over
the contoured foreground structures of each case (soft Dice per class, Milletari et al. 2016).
"""

from __future__ import annotations

import torch
from monai.losses import DiceLoss
from torch import nn


class PartialLabelDiceCELoss(nn.Module):
    """Marginal Dice + cross-entropy.

    Args:
        lambda_dice, lambda_ce: weights of the two terms.

    ``forward(logits, target, present)``: ``logits`` ``(B, C, *spatial)``, ``target``
    ``(B, 1, *spatial)`` integer labels, ``present`` ``(B, C)`` with 1 where the case contours
    structure ``k`` (``present[:, 0]`` is ignored: background is always there). Without
    ``present`` every structure counts as contoured and this is plain Dice + CE.
    """

    def __init__(self, lambda_dice: float = 1.0, lambda_ce: float = 1.0, eps: float = 1e-6):
        super().__init__()
        self.lambda_dice = lambda_dice
        self.lambda_ce = lambda_ce
        self.eps = eps
        self.dice = DiceLoss(include_background=False, to_onehot_y=True, softmax=False, reduction="none")

    @staticmethod
    def marginal_probabilities(logits: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        """``q`` of the module docstring: absent structures' probability moved to background."""
        probs = torch.softmax(logits.float(), dim=1)
        mask = present.to(probs).clone()
        mask[:, 0] = 1.0
        shape = mask.shape + (1,) * (probs.ndim - 2)
        mask = mask.view(shape)
        merged = probs * mask
        merged[:, :1] = merged[:, :1] + (probs * (1.0 - mask)).sum(dim=1, keepdim=True)
        return merged

    def forward(self, logits: torch.Tensor, target: torch.Tensor, present: torch.Tensor | None = None) -> torch.Tensor:
        b, c = logits.shape[:2]
        if present is None:
            present = torch.ones(b, c, device=logits.device)
        target = target.long()
        q = self.marginal_probabilities(logits, present)
        ce = nn.functional.nll_loss(torch.log(q.clamp_min(self.eps)), target[:, 0])
        dice_per_class = self.dice(q, target).reshape(b, c - 1)  # (B, C-1)
        weights = present[:, 1:].to(dice_per_class)
        dice = (dice_per_class * weights).sum() / weights.sum().clamp_min(1.0)
        return self.lambda_ce * ce + self.lambda_dice * dice
