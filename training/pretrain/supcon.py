"""The modal-target supervised contrastive loss of AGCL (Lee et al., Eq. 3).

AGCL generalises the self-supervised contrastive loss (its Eq. 2, SimCLR's NT-Xent) with the
supervised contrastive loss of Khosla et al. (2020, their Eq. 2, ``L_out``): every other sample
that shares the anchor's label is a positive. The label is the pair (modality, target), encoded
as one integer ``modality * n_targets + target`` (:func:`modal_target_labels`):

.. math::

    \\mathcal{L}_{MT} = \\sum_{k=1}^{2N} \\frac{-1}{|L(k)|} \\sum_{l \\in L(k)}
        \\log \\frac{\\exp(z_k \\cdot z_l / T)}{\\sum_{j \\in J(k)} \\exp(z_k \\cdot z_j / T)}

where ``J(k)`` is every sample but ``k`` and ``L(k) = {l in J(k) : label_l = label_k}``. The
embeddings ``z`` are L2-normalised projections; ``T = 0.1`` in the paper.

Paper versus code: the paper sums over the ``2N`` anchors (``reduction="sum"``, the default);
Khosla et al.'s released code averages them (``reduction="mean"``) and also multiplies by
``T / base_temperature``, which only rescales the loss (left out). AGCL's own released loss is
broken, so nothing is taken from it. An anchor with no positive in the batch (possible only if
a batch holds a single view of a label) contributes nothing and is not counted by ``"mean"``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["SupConLoss", "supcon_loss", "modal_target_labels"]


def modal_target_labels(modality: torch.Tensor, target: torch.Tensor, n_targets: int) -> torch.Tensor:
    """One class per (modality, target) pair: ``modality * n_targets + target``.

    ``target`` counts from 0 (``0 <= target < n_targets``); ``modality`` from 0 as well (a
    single modality, when the scanner or contrast phase is unknown, is all zeros).
    """
    modality = torch.as_tensor(modality).long()
    target = torch.as_tensor(target).long()
    if target.numel() and (int(target.min()) < 0 or int(target.max()) >= n_targets):
        raise ValueError(f"targets must lie in 0..{n_targets - 1}, got {target.tolist()}")
    return modality * n_targets + target


def supcon_loss(
    features: torch.Tensor,
    labels: torch.Tensor,
    temperature: float = 0.1,
    reduction: str = "sum",
    normalize: bool = True,
) -> torch.Tensor:
    """Supervised contrastive loss (AGCL Eq. 3 / Khosla et al. Eq. 2) of ``features`` ``(M, D)``.

    ``labels`` ``(M,)``: samples with equal labels are positives of each other (the two views of
    one patch share a label, so each is the other's positive). ``normalize`` L2-normalises the
    features first (the paper's projection is normalised; pass ``False`` if already done).
    """
    if features.ndim != 2:
        raise ValueError(f"features must be (M, D), got {tuple(features.shape)}")
    labels = torch.as_tensor(labels, device=features.device).reshape(-1)
    if labels.numel() != features.shape[0]:
        raise ValueError(f"{labels.numel()} labels for {features.shape[0]} features")
    if reduction not in ("sum", "mean"):
        raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")
    z = F.normalize(features, dim=1) if normalize else features
    logits = z @ z.t() / temperature
    m = z.shape[0]
    self_mask = torch.eye(m, dtype=torch.bool, device=z.device)
    # J(k): every sample but k. The row max is subtracted for stability (it cancels in the ratio).
    logits = logits.masked_fill(self_mask, float("-inf"))
    logits = logits - logits.max(dim=1, keepdim=True).values.detach()
    log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    positives = (labels[:, None] == labels[None, :]) & ~self_mask
    n_pos = positives.sum(dim=1)
    has_pos = n_pos > 0
    # -1/|L(k)| * sum_{l in L(k)} log p(l | k), for anchors with at least one positive
    pos_log_prob = torch.where(positives, log_prob, torch.zeros_like(log_prob)).sum(dim=1)
    per_anchor = -pos_log_prob[has_pos] / n_pos[has_pos]
    if per_anchor.numel() == 0:
        return features.sum() * 0.0
    return per_anchor.sum() if reduction == "sum" else per_anchor.mean()


class SupConLoss(nn.Module):
    """Module form of :func:`supcon_loss` (AGCL Eq. 3); ``forward(features, labels)``."""

    def __init__(self, temperature: float = 0.1, reduction: str = "sum", normalize: bool = True):
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.temperature = float(temperature)
        self.reduction = reduction
        self.normalize = normalize

    def forward(self, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return supcon_loss(features, labels, self.temperature, self.reduction, self.normalize)
