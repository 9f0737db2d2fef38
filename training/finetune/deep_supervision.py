"""Deep supervision of the U-Net's decoder, a fine-tuning option (training only).

Each of the ``levels`` decoder blocks before the last gets its own segmentation head, a 1x1
convolution to the classes, and its logits are scored against the label resized to its
resolution, as nnU-Net does (Isensee et al., *Nature Methods* 18, 2021: a loss at several decoder
resolutions, its weight halving with each level):

    L = sum_{l=0}^{levels} w_l * L_seg(logits_l, resize(y, size_l), present),   w_l = 2^-l,

with ``l = 0`` the network's own output at full resolution and ``L_seg`` the marginal Dice + CE
of :mod:`contourcl.training.finetune.partial_label_loss` (the weights and the nearest-neighbour
resizing of the label are MONAI's :class:`monai.losses.DeepSupervisionLoss`, ``weight_mode="exp"``,
which this extends by the per-case ``present`` mask; like MONAI, and unlike nnU-Net, the weights
are not normalised, so the full-resolution term keeps weight 1).

The heads exist only while training (:class:`DeepSupervisedNet`); the served model is the U-Net
alone, so a deeply supervised model file has the same network and inference path as any other.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.losses import DeepSupervisionLoss
from torch import nn

__all__ = ["DeepSupervisedNet", "PartialLabelDeepSupervisionLoss"]


class DeepSupervisedNet(nn.Module):
    """A :class:`~contourcl.models.networks.ContourUNet` plus ``levels`` auxiliary heads, for training only.

    ``forward(image) -> [logits, aux_1, ..., aux_levels]``: ``logits`` is exactly
    ``network(image)``; ``aux_l`` are the logits of the ``l``-th decoder block from the end (half
    the resolution per level). Keep :attr:`network` for inference and saving; the heads are
    discarded.
    """

    def __init__(self, network: nn.Module, levels: int = 2):
        super().__init__()
        channels = tuple(network.config.decoder_channels)
        if not 1 <= levels < len(channels):
            raise ValueError(f"deep supervision levels must lie in 1..{len(channels) - 1}, got {levels}")
        self.network = network
        self.levels = levels
        out = network.config.out_channels
        # heads[l - 1] reads the output of decoder block -(l + 1)
        self.heads = nn.ModuleList(nn.Conv2d(channels[-(l + 1)], out, kernel_size=1) for l in range(1, levels + 1))

    def forward(self, image: torch.Tensor) -> list[torch.Tensor]:
        net = self.network
        outs = net.decoder_outputs(net.encoder(image))
        return [net.head(outs[-1]), *(head(outs[-(l + 1)]) for l, head in enumerate(self.heads, start=1))]


class PartialLabelDeepSupervisionLoss(DeepSupervisionLoss):
    """MONAI's :class:`~monai.losses.DeepSupervisionLoss` for a loss that also takes ``present``
    (which structures each case contours): ``forward(outputs, target, present)`` is the sum above.
    """

    def forward(self, outputs: list[torch.Tensor], target: torch.Tensor, present: torch.Tensor | None = None) -> torch.Tensor:
        weights = self.get_weights(levels=len(outputs))
        total = outputs[0].new_zeros((), dtype=torch.float32)
        for w, logits in zip(weights, outputs, strict=False):
            y = target if logits.shape[2:] == target.shape[2:] else F.interpolate(target.float(), size=logits.shape[2:], mode=self.interp_mode)
            total = total + w * self.loss(logits.float(), y, present)
        return total
