"""SimCLR (Chen et al., ICML 2020): the image-level contrastive baseline with NT-Xent.

For a batch of ``N`` slices, two augmented views each give ``2N`` projections ``z``; for the
positive pair ``(i, j)`` (SimCLR Eq. 1)::

    l(i, j) = -log( exp(sim(z_i, z_j) / tau) / sum_{k != i} exp(sim(z_i, z_k) / tau) )

with ``sim`` the cosine similarity, and the loss is the mean of ``l`` over all ``2N`` anchors
(both orders of every pair). :class:`monai.losses.ContrastiveLoss` computes exactly this
(``forward(z_view1, z_view2)``; the test checks it against a hand computation); it is called
in float32. Negatives are the other images of the local batch (no gathering across GPUs).

Projection head: SimCLR's "MLP with one hidden layer", ``g(h) = W2 relu(W1 h)`` (Sec. 2.1), i.e.
Linear-ReLU-Linear on the encoder's pooled features (:func:`~contourcl.training.pretrain.heads.mlp_head`
without batch norm). Augmentations: :class:`contourcl.training.pretrain.augment.Augment`.
"""

from __future__ import annotations

import torch
from monai.losses import ContrastiveLoss
from torch.utils.data import Dataset

from contourcl.models.networks import ResNetEncoder
from contourcl.training.pretrain.augment import TwoViews, augment_from_options
from contourcl.training.pretrain.base import PretrainMethod
from contourcl.training.pretrain.heads import mlp_head
from contourcl.training.pretrain.volumes import SliceDataset


class SimCLRMethod(PretrainMethod):
    """Image-level SimCLR on axial slices (baseline). Adam, lr 1e-3."""

    name = "simclr"
    default_options = {
        "temperature": 0.5,
        "proj_hidden": 512,
        "proj_dim": 128,
        "crop_scale": [0.2, 1.0],
        "flip_p": 0.5,
        "jitter_p": 0.8,
        "jitter": 0.4,
        "blur_p": 0.5,
    }
    default_lr = 1e-3
    default_optimizer = "adam"

    def __init__(self, encoder: ResNetEncoder, config):
        super().__init__(encoder, config)
        self.head = mlp_head([encoder.feature_dim, self.options["proj_hidden"], self.options["proj_dim"]], batch_norm=False)
        self.criterion = ContrastiveLoss(temperature=float(self.options["temperature"]))

    def build_dataset(self, volumes) -> Dataset:
        return TwoViews(SliceDataset(volumes, self.config.image_size), augment_from_options(self.config.image_size, self.options))

    def loss(self, batch):
        v1, v2 = batch
        z = self.head(self.encoder.pooled(torch.cat([v1, v2])))
        z1, z2 = z.float().chunk(2)
        loss = self.criterion(z1, z2)
        return loss, {"loss": loss.item()}
