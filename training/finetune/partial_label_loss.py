"""Dice + cross-entropy for partially labeled cases: the marginal loss.

OpenKBP cases, and clinicians' corrections, contour only some structures. A structure a case
does not contour must not be trained as background. Following Shi et al., "Marginal loss and
exclusion loss for partially supervised multi-organ segmentation" (Medical Image Analysis 70,
2021, Eq. 2-4), the softmax probabilities of the structures a case lacks are merged into the
background before the loss:

    q_0 = p_0 + sum_{k not contoured} p_k,    q_k = p_k  (k contoured),

so predicting an uncontoured organ where the label says "background" costs nothing, while every
contoured organ is trained as usual. The loss is ``CE(q, y) + Dice(q, y)``. The cross-entropy
takes ``log q`` from ``log_softmax`` (``log q_0`` as a log-sum-exp), never as the log of a clamped
probability: a clamp at 1e-6 cut the gradient of a structure the network had pushed below it, and
the oesophagus of the shipped ``oar`` model (issue 10) never recovered (its probability was
6e-7 on its own voxels, and neither loss term could raise it). The Dice is the soft
Dice of each foreground structure (Milletari et al. 2016, Eq. 1), its sums taken over the whole
batch, counting only the samples whose case contours that structure: a 2D slice usually shows
two or three of the seven organs, and a per-slice Dice would reward predicting nothing. A
structure with no voxel in the batch is left to the cross-entropy: its Dice would be a constant
1 with no gradient, diluting the others'.
"""

from __future__ import annotations

import torch
from monai.networks.utils import one_hot
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

    def __init__(self, lambda_dice: float = 1.0, lambda_ce: float = 1.0, smooth: float = 1e-5):
        super().__init__()
        self.lambda_dice = lambda_dice
        self.lambda_ce = lambda_ce
        self.smooth = smooth

    @staticmethod
    def marginal_log_probabilities(logits: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        """``log q`` of the module docstring, computed stably: ``log q_0`` is the log-sum-exp of
        the log-softmax over background and the absent structures; the other channels are the
        log-softmax itself (an absent structure's channel is never a target)."""
        logp = torch.log_softmax(logits.float(), dim=1)
        fold = 1.0 - present.to(logp)  # background and the structures the case does not contour
        fold[:, 0] = 1.0
        fold = fold.view(fold.shape + (1,) * (logp.ndim - 2))
        log_q0 = torch.logsumexp(logp + torch.log(fold), dim=1, keepdim=True)  # log(0) = -inf: left out
        return torch.cat([log_q0, logp[:, 1:]], dim=1)

    @staticmethod
    def _probabilities(log_q: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        """``q`` from ``log q``, 0 in the channels of the structures the case does not contour."""
        keep = present.to(log_q).clone()
        keep[:, 0] = 1.0
        return log_q.exp() * keep.view(keep.shape + (1,) * (log_q.ndim - 2))

    @staticmethod
    def marginal_probabilities(logits: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        """``q`` of the module docstring: absent structures' probability moved to background."""
        log_q = PartialLabelDiceCELoss.marginal_log_probabilities(logits, present)
        return PartialLabelDiceCELoss._probabilities(log_q, present)

    def forward(self, logits: torch.Tensor, target: torch.Tensor, present: torch.Tensor | None = None) -> torch.Tensor:
        b, c = logits.shape[:2]
        if present is None:
            present = torch.ones(b, c, device=logits.device)
        target = target.long()
        log_q = self.marginal_log_probabilities(logits, present)
        q = self._probabilities(log_q, present)
        ce = nn.functional.nll_loss(log_q, target[:, 0])
        y = one_hot(target, c)
        w = present.to(q).view(b, c, *([1] * (q.ndim - 2)))  # only the cases that contour k count for k
        dims = [0] + list(range(2, q.ndim))
        inter = (q * y * w).sum(dims)
        truth = (y * w).sum(dims)
        dice_per_class = 1.0 - (2.0 * inter + self.smooth) / ((q * w).sum(dims) + truth + self.smooth)  # (C,)
        seen = truth[1:] > 0  # contoured structures with voxels in this batch
        dice = dice_per_class[1:][seen].mean() if bool(seen.any()) else q.sum() * 0.0
        return self.lambda_ce * ce + self.lambda_dice * dice
