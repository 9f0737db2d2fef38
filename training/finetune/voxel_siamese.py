"""Voxel-level Siamese representation learning (Lee, Chung & Shin), an auxiliary fine-tuning loss.

A projector and a predictor MLP per layer read three U-Net feature maps, by default the paper's
(Sec. III-A, III-C; ``placement="encoder"``): F_1 = the last encoder layer (layer4, stride 32),
F_2, F_3 = the two deepest skip connections (layer3, layer2). At each layer up to
``max_samples`` voxels are drawn, false negatives first (:func:`sample_voxels`), and every
prediction ``p = pred(proj(f))`` is pulled towards the stop-gradient projections
``z' = stopgrad(proj(f))`` of the sampled voxels of its class; there are no negatives. The heads
exist only during training (:class:`VoxelSiameseNet`); inference uses the U-Net alone.

Paper equations implemented by :class:`VoxelSiameseLoss`:

- Eq. 4, voxel-wise similarity of class ``c``: ``sum_{p in P^c} sum_{z in Z^c} p/|p| . z/|z|``;
- Eq. 5/6, the loss ``-sum_c w_c L_voxel-wise(p, stopgrad(z))`` over the voxels of the whole
  batch, with class weights inverse to frequency
  ``w_c = (|P| / |P^c|) / sum_c' (|P| / |P^c'|)`` (over the classes among the sampled voxels);
- Eq. 7, summed over the layers with weights ``w_f`` (1 each in the paper);
- Eq. 8, the total ``L = L_dice + lambda * L_feature`` (the paper's ``lambda = 10`` for three
  layers; 0.3 here, :data:`DEFAULT_LAMBDA`), added by the fine-tuning loop
  (:mod:`contourcl.training.finetune.engine`).

Deviations from the paper and choices it leaves open (no public code exists), each with its reason:

- Eq. 4 averaged over the pairs (``pair_reduction="mean"``; ``"sum"`` is literal): the sum grows
  as ``|P^c|^2``, which no ``lambda`` balances against a Dice loss in [0, 1].
- ``lambda = 0.3``, not 10 (:data:`DEFAULT_LAMBDA`): with the averaged Eq. 4, 10 lets the feature
  loss outweigh the Dice loss. The paper: "The weighting parameter lambda was 10 for
  L_feature_3 and 100 for L_feature_1" (Sec. IV-B). 0.3 was chosen with ``placement="decoder"``
  (since abandoned) and is not re-checked for the encoder placement (issue 32):
  :func:`select_lambda` chooses it among :data:`LAMBDA_CHOICES` (0.3, 1, 3, 10) on an inner split
  of the labeled cases, the last epoch's Dice on the held-out inner cases deciding; the
  label-efficiency row ``voxel-siamese-inner`` does so per draw (with one labeled patient there is
  no inner split: it keeps 0.3 and its record says so). Not yet run.
- Input size and the deepest map (issue 32): the paper resamples each CT to 128 x 128 x 64 and
  feeds the whole volume to a 3D U-Net (Cicek et al.: three poolings, stride 8), so its deepest
  map F_1 is 16 x 16 x 8, an eighth of the input's side. Here F_1 is the ResNet encoder's layer4 at
  stride 32, on 2D crops: 64 px at the CPU scale gives 2 x 2 (a small organ covers less than one
  voxel of it), 96 px (gpu scale) 3 x 3, 128 px (paper scale) 4 x 4, a whole 3 mm slice of about
  170 px 5 x 5. Keeping the paper's proportion (16 across) would take 512 px inputs, more than a
  whole slice at 3 mm: it cannot be kept with this encoder, whose stride the served U-Net fixes.
  F_2 and F_3 (stride 16 and 8) are 4 x 4 and 8 x 8 at 64 px.
- ``placement="decoder"`` (the finest three decoder outputs), an option only: the earlier
  label-efficiency runs used it.
- Sampling caps (the paper's 1000 false negatives of 1700) shrink in proportion on small layers:
  this carries the paper's 3D caps to 2D layers.
- Heads Linear-BN-ReLU-Linear-BN / Linear-BN-ReLU-Linear (SimSiam's shape), width 256: the paper's
  Table V finds 256 best (64 in its implementation section).
- Optimiser (issue 9): the app's fine-tuning loop (AdamW, cosine), not Adam 1e-3 with polynomial
  decay over 500 epochs: the benchmark's methods then differ in the loss alone.
- Pairs include a voxel with itself, as the double sum does; labels and predictions reach each
  layer by nearest-neighbour interpolation.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from contourcl.training.pretrain.heads import mlp_head

__all__ = [
    "DEFAULT_LAMBDA",
    "PAPER_LAMBDA",
    "VoxelFeatureHead",
    "VoxelSiameseLoss",
    "VoxelSiameseNet",
    "trusted_voxels",
    "PLACEMENTS",
    "decoder_features",
    "encoder_features",
    "feature_channels",
    "forward_with_decoder_features",
    "forward_with_features",
    "sample_voxels",
    "class_weights",
    "voxel_siamese_layer_loss",
]

#: ``lambda`` of Eq. 8 for three layers in the paper (100 for a single layer).
PAPER_LAMBDA = 10.0
#: ``lambda`` used here. With the pair-averaged Eq. 4 (see above) the feature loss of three layers
#: spans [-3, 3]; at the paper's 10 it outweighed the Dice loss and fine-tuning collapsed to
#: background. Chosen with placement="decoder", not re-checked for the paper's placement
#: (measurements: docs/design-notes.md).
DEFAULT_LAMBDA = 0.3
#: the lambdas :func:`select_lambda` chooses among (issue 32): the default, the paper's 10, and between
LAMBDA_CHOICES = (0.3, 1.0, 3.0, 10.0)

#: where the voxel feature heads go: the paper's (``"encoder"``: F_1 = last encoder layer, F_2,
#: F_3 = the two deepest skips) or, a deviation kept as an option, the finest decoder outputs
PLACEMENTS = ("encoder", "decoder")


# --------------------------------------------------------------------------- decoder features
def decoder_features(network: nn.Module, features: list[torch.Tensor], n_last: int = 3) -> list[torch.Tensor]:
    """The last ``n_last`` decoder block outputs of a :class:`contourcl.models.networks.ContourUNet`
    for encoder ``features`` (:meth:`~contourcl.models.networks.ContourUNet.decoder_outputs`).
    Coarsest first, finest (full resolution, what ``ContourUNet.decode`` returns) last.
    """
    outs = network.decoder_outputs(features)
    if not 1 <= n_last <= len(outs):
        raise ValueError(f"n_last must lie in 1..{len(outs)}, got {n_last}")
    return outs[-n_last:]


def encoder_features(features: Sequence[torch.Tensor], n_last: int = 3) -> list[torch.Tensor]:
    """The paper's F_1..F_n: the last encoder layer, then the deepest skip connections.

    ``features`` is a :class:`~contourcl.models.networks.ResNetEncoder`'s output ``[f1, ..., f5]``
    (strides 2 to 32); the decoder takes ``f5`` as its input and ``f4, f3, f2, f1`` as skips. Returns
    ``[f5, f4, f3][:n_last]`` (F_1, F_2, F_3: coarsest first, like :func:`decoder_features`).
    """
    if not 1 <= n_last <= len(features):
        raise ValueError(f"n_last must lie in 1..{len(features)}, got {n_last}")
    return list(features[::-1][:n_last])


def feature_channels(network: nn.Module, n_layers: int = 3, placement: str = "encoder") -> tuple[int, ...]:
    """The channels of the feature maps the heads read (same order as the maps)."""
    if placement == "encoder":
        return tuple(network.encoder.out_channels[::-1][:n_layers])
    if placement == "decoder":
        return tuple(network.config.decoder_channels[-n_layers:])
    raise ValueError(f"placement must be one of {PLACEMENTS}, got {placement!r}")


def forward_with_features(
    network: nn.Module, x: torch.Tensor, n_layers: int = 3, placement: str = "encoder"
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """``(logits, the n_layers feature maps of placement)`` in one pass; logits as ``network(x)``."""
    if placement == "decoder":
        return forward_with_decoder_features(network, x, n_layers)
    if placement != "encoder":
        raise ValueError(f"placement must be one of {PLACEMENTS}, got {placement!r}")
    enc = network.encoder(x)
    return network.head(network.decode(enc)), encoder_features(enc, n_layers)


def forward_with_decoder_features(
    network: nn.Module, x: torch.Tensor, n_last: int = 3
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """``(logits, last n_last decoder features)`` of a ContourUNet in one pass.

    The logits are those of ``network(x)`` (same modules, same order).
    """
    feats = decoder_features(network, network.encoder(x), n_last)
    return network.head(feats[-1]), feats


# --------------------------------------------------------------------------- heads
class VoxelFeatureHead(nn.Module):
    """Projector and predictor MLPs applied to voxel feature vectors ``(n, C)``.

    ``forward`` returns ``(p, z)`` with ``z = proj(f)`` and ``p = pred(z)``.
    """

    def __init__(self, in_channels: int, hidden: int = 256):
        super().__init__()
        self.projector = mlp_head([in_channels, hidden, hidden], last_bn=True)
        self.predictor = mlp_head([hidden, hidden, hidden])

    def forward(self, f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = self.projector(f)
        return self.predictor(z), z


# --------------------------------------------------------------------------- sampling
def _to_grid(t: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Nearest-neighbour resize of an integer map ``(B, H, W)`` to ``size``."""
    if tuple(t.shape[-2:]) == tuple(size):
        return t
    return F.interpolate(t[:, None].float(), size=tuple(size), mode="nearest")[:, 0].round().long()


def _as_label_map(t: torch.Tensor, name: str) -> torch.Tensor:
    """``(B, H, W)`` integer map from ``(B, H, W)``, ``(B, 1, H, W)`` labels or ``(B, C, H, W)`` scores."""
    if t.ndim == 4:
        t = t[:, 0] if t.shape[1] == 1 else t.argmax(dim=1)
    if t.ndim != 3:
        raise ValueError(f"{name} must be (B, H, W), (B, 1, H, W) or (B, C, H, W), got {tuple(t.shape)}")
    return t.detach().round().long() if t.is_floating_point() else t.detach().long()


def sample_voxels(
    labels: torch.Tensor,
    preds: torch.Tensor,
    max_samples: int = 1700,
    max_false_negatives: int = 1000,
    valid: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Flat indices of the voxels to use at one layer, false negatives first.

    ``labels``, ``preds`` and ``valid`` are ``(B, H, W)`` on the layer's grid. False negatives
    (``label > 0`` and ``pred != label``) are drawn first, up to ``max_false_negatives``; the
    remaining samples are drawn uniformly from the other valid voxels; false negatives beyond
    the cap are never drawn. With fewer valid voxels than ``max_samples`` both caps scale down
    in proportion.
    """
    lab = labels.reshape(-1)
    prd = preds.reshape(-1)
    ok = torch.ones_like(lab, dtype=torch.bool) if valid is None else valid.reshape(-1).bool()
    n_valid = int(ok.sum())
    n_total = min(max_samples, n_valid)
    if n_total == 0:
        return torch.zeros(0, dtype=torch.long, device=lab.device)
    n_fn_cap = max_false_negatives if n_valid >= max_samples else int(round(max_false_negatives * n_valid / max_samples))
    fn = ok & (lab > 0) & (prd != lab)
    fn_idx = torch.nonzero(fn).flatten()
    rest_idx = torch.nonzero(ok & ~fn).flatten()

    def pick(idx: torch.Tensor, k: int) -> torch.Tensor:
        if k >= idx.numel():
            return idx
        perm = torch.randperm(idx.numel(), generator=generator, device="cpu")[:k].to(idx.device)
        return idx[perm]

    chosen_fn = pick(fn_idx, min(n_fn_cap, n_total))
    chosen_rest = pick(rest_idx, n_total - chosen_fn.numel())
    return torch.cat([chosen_fn, chosen_rest])


def class_weights(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Classes present in ``labels`` (1D) and their weights ``(|P|/|P^c|) / sum_c' (|P|/|P^c'|)``."""
    classes, counts = torch.unique(labels, return_counts=True)
    inv = labels.numel() / counts.float()
    return classes, inv / inv.sum()


# --------------------------------------------------------------------------- the loss
def voxel_siamese_layer_loss(
    p: torch.Tensor,
    z: torch.Tensor,
    labels: torch.Tensor,
    weighted: bool = True,
    pair_reduction: str = "mean",
    stop_gradient: bool = True,
) -> torch.Tensor:
    """Eq. 6 for one layer: ``-sum_c w_c * sim_c(p, stopgrad(z))`` on sampled voxels.

    ``p``, ``z``: ``(n, D)``; ``labels``: ``(n,)``. ``sim_c`` is Eq. 4 over the pairs of class
    ``c`` (mean over pairs, or the literal sum with ``pair_reduction="sum"``). Without
    ``weighted`` every class has weight 1 (the paper's "w/o weight" ablation).
    """
    if pair_reduction not in ("mean", "sum"):
        raise ValueError(f"pair_reduction must be 'mean' or 'sum', got {pair_reduction!r}")
    if p.shape[0] == 0:
        return p.sum() * 0.0
    p = F.normalize(p, dim=1)
    z = F.normalize(z.detach() if stop_gradient else z, dim=1)
    classes, weights = class_weights(labels)
    if not weighted:
        weights = torch.ones_like(weights)
    loss = p.new_zeros(())
    for c, w in zip(classes, weights, strict=False):
        sel = labels == c
        pc, zc = p[sel], z[sel]
        # sum_i sum_j p_i . z_j = (sum_i p_i) . (sum_j z_j)
        sim = pc.sum(0) @ zc.sum(0)
        if pair_reduction == "mean":
            sim = sim / (pc.shape[0] * zc.shape[0])
        loss = loss - w * sim
    return loss


class VoxelSiameseLoss(nn.Module):
    """The voxel-level feature loss of Eq. 7 over several decoder layers, with its heads.

    Args:
        in_channels: channels of each decoder layer used (coarsest first), e.g.
            ``net.config.decoder_channels[-3:]``; one :class:`VoxelFeatureHead` each.
        hidden: the heads' width (256, the paper's best; 64 in its implementation section).
        max_samples / max_false_negatives: sampling caps per layer (1700 / 1000, the paper's).
        layer_weights: ``w_f`` per layer (1 each, the paper's).
        weighted: inverse-frequency class weights ``w_c`` (on, the paper's).
        pair_reduction: ``"mean"`` (default) or ``"sum"`` over the pairs of Eq. 4; see the module doc.
        ignore_index: label value to leave out (e.g. unlabeled voxels), or ``None``.

    ``forward(features, labels, preds, valid=None)``: ``features`` the decoder layers
    (:func:`decoder_features`), ``labels`` ``(B, H, W)`` / ``(B, 1, H, W)`` class indices at the
    input's resolution, ``preds`` the current logits ``(B, C, H, W)`` or a label map (only used to
    find false negatives; never differentiated), ``valid`` an optional ``(B, H, W)`` /
    ``(B, 1, H, W)`` mask of voxels whose label can be trusted (e.g. leave out background of
    cases in which a structure was not contoured). Returns the scalar feature loss.
    """

    def __init__(
        self,
        in_channels: Sequence[int],
        hidden: int = 256,
        max_samples: int = 1700,
        max_false_negatives: int = 1000,
        layer_weights: Sequence[float] | None = None,
        weighted: bool = True,
        pair_reduction: str = "mean",
        ignore_index: int | None = None,
    ):
        super().__init__()
        if max_false_negatives > max_samples:
            raise ValueError("max_false_negatives cannot exceed max_samples")
        self.heads = nn.ModuleList(VoxelFeatureHead(int(c), hidden) for c in in_channels)
        self.layer_weights = [1.0] * len(self.heads) if layer_weights is None else [float(w) for w in layer_weights]
        if len(self.layer_weights) != len(self.heads):
            raise ValueError(f"{len(self.layer_weights)} layer weights for {len(self.heads)} layers")
        self.max_samples = int(max_samples)
        self.max_false_negatives = int(max_false_negatives)
        self.weighted = weighted
        self.pair_reduction = pair_reduction
        self.ignore_index = ignore_index
        self.generator: torch.Generator | None = None

    @classmethod
    def for_network(cls, network: nn.Module, n_layers: int = 3, placement: str = "encoder", **kwargs) -> VoxelSiameseLoss:
        """Heads for ``n_layers`` feature maps of a :class:`ContourUNet`: the paper's F_1..F_n
        (``placement="encoder"``) or the last decoder layers (``"decoder"``, a deviation)."""
        return cls(feature_channels(network, n_layers, placement), **kwargs)

    def forward(
        self,
        features: Sequence[torch.Tensor],
        labels: torch.Tensor,
        preds: torch.Tensor,
        valid: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if len(features) != len(self.heads):
            raise ValueError(f"{len(features)} feature maps for {len(self.heads)} heads")
        lab = _as_label_map(labels, "labels")
        prd = _as_label_map(preds, "preds")
        ok = None if valid is None else _as_label_map(valid, "valid").bool()
        if self.ignore_index is not None:
            ignore = lab == self.ignore_index
            ok = ~ignore if ok is None else ok & ~ignore
        total = features[0].new_zeros(())
        for feat, head, w_f in zip(features, self.heads, self.layer_weights, strict=False):
            size = feat.shape[-2:]
            lab_l, prd_l = _to_grid(lab, size), _to_grid(prd, size)
            ok_l = None if ok is None else _to_grid(ok.long(), size).bool()
            idx = sample_voxels(lab_l, prd_l, self.max_samples, self.max_false_negatives, ok_l, self.generator)
            if idx.numel() < 2:  # BatchNorm needs two samples; nothing to pull together anyway
                continue
            f = feat.permute(0, 2, 3, 1).reshape(-1, feat.shape[1])[idx]
            p, z = head(f)
            total = total + w_f * voxel_siamese_layer_loss(
                p, z, lab_l.reshape(-1)[idx], self.weighted, self.pair_reduction
            )
        return total


def trusted_voxels(labels: torch.Tensor, present: torch.Tensor | None) -> torch.Tensor | None:
    """Voxels whose class is known in partially contoured cases: ``(B, H, W)`` bool, or ``None``.

    ``present`` ``(B, C)`` marks the structures each case contours (as
    :class:`~contourcl.data.transforms.StructurePresenced` writes it). A structure voxel is always
    trusted; a background voxel only in a case that contours every structure (elsewhere it may
    be an uncontoured organ). ``present=None``: every voxel is trusted (returns ``None``).
    """
    if present is None:
        return None
    lab = _as_label_map(labels, "labels")
    complete = (present[:, 1:] > 0.5).all(dim=1)  # (B,)
    return (lab > 0) | complete[:, None, None]


class VoxelSiameseNet(nn.Module):
    """A :class:`~contourcl.models.networks.ContourUNet` plus the voxel feature heads, for training only.

    ``forward(image, labels=None, valid=None) -> (logits, feature_loss)``: the U-Net's logits
    (identical to ``network(image)``) and the Eq. 7 loss of its ``n_layers`` feature maps of
    ``placement`` (the paper's F_1..F_3 by default; 0 without ``labels``). The heads run in float32 outside autocast. Keep :attr:`network` for
    inference and saving; the heads are discarded.

    In a fine-tuning loop, wrap this module, not the bare U-Net, in DDP, so that the heads'
    gradients are synchronised too; save ``.network`` only::

        model = VoxelSiameseNet(net)                                   # heads on F_1..F_3 (encoder)
        opt = torch.optim.AdamW(model.parameters(), ...)               # U-Net + heads
        logits, feature_loss = model(images, labels, trusted_voxels(labels, present))
        loss = seg_loss(logits, labels, present) + DEFAULT_LAMBDA * feature_loss   # Eq. 8
    """

    def __init__(self, network: nn.Module, n_layers: int = 3, placement: str = "encoder", **loss_kwargs):
        super().__init__()
        self.network = network
        self.n_layers = n_layers
        self.placement = placement
        self.feature_loss = VoxelSiameseLoss.for_network(network, n_layers, placement, **loss_kwargs)

    def forward(
        self, image: torch.Tensor, labels: torch.Tensor | None = None, valid: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        logits, feats = forward_with_features(self.network, image, self.n_layers, self.placement)
        if labels is None:
            return logits, logits.new_zeros((), dtype=torch.float32)
        with torch.autocast(device_type=image.device.type, enabled=False):
            loss = self.feature_loss([f.float() for f in feats], labels, logits.detach().float(), valid)
        return logits, loss


def inner_split(items: Sequence[dict], fraction: float = 0.2, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """``(inner training, inner validation)`` of ``items``: a seeded ``fraction`` (at least one
    case) held out; ``([], [])`` with fewer than two cases (no inner split exists)."""
    import numpy as np

    if len(items) < 2:
        return [], []
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(items))
    k = max(1, int(round(fraction * len(items))))
    held = set(order[:k].tolist())
    return [c for i, c in enumerate(items) if i not in held], [c for i, c in enumerate(items) if i in held]


def select_lambda(items: Sequence[dict], cfg, choices: Sequence[float] = LAMBDA_CHOICES, fraction: float = 0.2,
                  seed: int = 0, progress: bool = False) -> dict:
    """Choose the voxel-Siamese ``lambda`` on an inner split of the labeled ``items`` (issue 32).

    Fine-tunes ``cfg`` (a :class:`~contourcl.training.finetune.engine.FinetuneConfig` with
    ``voxel_siamese=True``) on the inner training cases once per ``choices`` and scores each on the
    inner validation cases: the last epoch's mean Dice decides (the benchmark keeps the last
    weights, not the best epoch); ties go to the smaller lambda. Returns ``{"lambda", "scores",
    "inner_val_ids"}``; with fewer than two cases there is no inner split: ``lambda`` is
    ``cfg.voxel_siamese_lambda`` and ``scores`` is empty.
    """
    import dataclasses
    import math

    from contourcl.training.finetune.engine import finetune

    if not cfg.voxel_siamese:
        raise ValueError("select_lambda chooses the voxel-Siamese loss's weight: the config must have voxel_siamese=True")
    train, val = inner_split(items, fraction, seed)
    if not val:
        return {"lambda": float(cfg.voxel_siamese_lambda), "scores": {}, "inner_val_ids": [],
                "reason": f"{len(items)} labeled case(s): no inner split"}
    scores = {}
    for lam in choices:
        trial = dataclasses.replace(cfg, voxel_siamese_lambda=float(lam), val_interval=cfg.max_epochs)
        result = finetune(train, val, trial, progress=progress)
        last = [h["val_dice"] for h in result.history if "val_dice" in h]
        scores[float(lam)] = float(last[-1]) if last else float("nan")
    finite = {k: v for k, v in scores.items() if math.isfinite(v)}
    best = max(sorted(finite), key=lambda k: finite[k]) if finite else float(cfg.voxel_siamese_lambda)
    return {"lambda": best, "scores": scores, "inner_val_ids": [c.get("id") for c in val]}
