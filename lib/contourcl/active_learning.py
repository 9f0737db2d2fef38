"""Which unlabeled CT should a clinician contour next: Monte-Carlo dropout entropy.

The network's decoder has dropout. With dropout switched on at inference (batch norm kept in
eval mode), ``passes`` stochastic predictions are averaged and the predictive entropy
``H = -sum_c p_c log p_c`` (Gal & Ghahramani 2016; Gal et al. 2017, "Deep Bayesian active
learning", max-entropy acquisition) is taken per voxel. A study's score is the mean entropy over
the voxels any pass calls foreground: how unsure the model is about the structures it sees, not
about the air around the patient. A study where no pass finds any structure gets the maximum
score (log C): the model recognises nothing there.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from contourcl.inference import Contourer, slice_probabilities


def _dropout_on(network: torch.nn.Module) -> None:
    network.eval()
    for m in network.modules():
        if isinstance(m, (torch.nn.Dropout, torch.nn.Dropout2d, torch.nn.Dropout3d)):
            m.train()


def mc_dropout_entropy(contourer: Contourer, image_path: str | Path, passes: int = 4, max_slices: int = 24, seed: int = 0) -> float:
    """Mean predictive entropy (nats) of ``image_path`` over the voxels predicted as a structure.

    ``max_slices`` evenly spaced axial slices are scored (enough to rank studies; all would
    cost a full inference per pass).
    """
    _, network, meta = contourer.model()
    data, _ = contourer.preprocess(image_path, meta)
    image = data["image"].as_tensor()[None]  # (1, 1, H, W, D)
    depth = image.shape[-1]
    idx = torch.linspace(0, depth - 1, steps=min(max_slices, depth)).round().long().unique()
    image = image[..., idx]
    torch.manual_seed(seed)
    _dropout_on(network)
    try:
        probs = torch.stack([slice_probabilities(network, image, meta.roi, device=contourer.device)[0].cpu() for _ in range(passes)])
    finally:
        network.eval()
    mean = probs.mean(0)  # (C, H, W, D)
    entropy = -(mean * torch.log(mean.clamp_min(1e-8))).sum(0)
    foreground = (probs.argmax(1) > 0).any(0)
    if not bool(foreground.any()):
        return math.log(mean.shape[0])
    return float(entropy[foreground].mean())
