"""PolyCL (Moseley & Imran): contrastive pretraining with positives chosen by organ or by scan.

Each anchor slice ``s`` gets one positive ``s+`` and one negative ``s-``, chosen once for the
whole dataset as the paper and its code do (``resample=True`` draws new ones at every read):

- PolyCL-O (``contourcl pretrain polycl-o``, :class:`OrganSampler`): ``s+`` has the same presence
  of an organ as ``s``, ``s-`` the opposite, both from any scan. Presence needs labels (the
  paper's weak, slice-level signal): label files or a coarse model's predictions
  (:func:`contourcl.training.pretrain.agcl.load_coarse_labels`); scans without any are left out.
- PolyCL-S (``contourcl pretrain polycl-s``, :class:`ScanSampler`): ``s+`` another slice of the
  same scan, ``s-`` a slice of another scan; no labels needed.

Loss (the paper's Eq. 1, :func:`polycl_loss`), with ``z = g(f(s))`` and cosine similarity ``sim``::

    L_C = -log( exp(sim(z, z+)/tau) / (exp(sim(z, z+)/tau) + exp(sim(z, z-)/tau)) )

averaged over the minibatch, ``tau = 1/M`` with ``M`` the minibatch size (``temperature`` fixes
it). As the paper: ``g`` one Linear(feature_dim, 256) after global average pooling; the middle
``slice_fraction`` (0.3) of ALL of a scan's slices by position (:func:`middle_slices`, as
tbwa233/PolyCL), of those only the slices with body (:class:`~contourcl.training.pretrain.volumes.SliceDataset`);
no augmentation; Adam, lr 1e-4; the learning rate annealed by a cosine with warm restarts, ten
cycles over the run (the paper's "warm restarts after every 10 epochs" of 100; torch's
``CosineAnnealingWarmRestarts``, ``T_0`` = steps / 10: 30 steps at the CPU scale's 300, 300 at
3000). The label-efficiency tables' PolyCL rows were pretrained before this (one cosine decay
over the run, issue 32); they are not rerun yet.

Deviations from the paper, each with its reason:

- Encoder: the app's :class:`~contourcl.models.networks.ResNetEncoder`, not the paper's
  16-32-64-128-256 channels with instance norm and LeakyReLU(0.2): the checkpoint must load into the U-Net.
- Several organs (the seven OARs), not one (the liver): each anchor draws one for which it has a
  positive and a negative (option ``organ`` fixes one, as the paper).
- Inputs are the app's windowed slices at ``image_size``: what fine-tuning and serving see.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from contourcl.data import labels as label_names
from contourcl.models.networks import ResNetEncoder
from contourcl.training.pretrain.base import ConfigError, PretrainConfig, PretrainMethod, RunContext, Stage
from contourcl.training.pretrain.heads import mlp_head
from contourcl.training.pretrain.volumes import SliceDataset

logger = logging.getLogger(__name__)

__all__ = [
    "PolyCLOrgan",
    "PolyCLScan",
    "OrganSampler",
    "PolyCLTripletDataset",
    "ScanSampler",
    "middle_slices",
    "organ_presence",
    "polycl_loss",
]


# =============================================================================== the loss
def polycl_loss(z: torch.Tensor, z_pos: torch.Tensor, z_neg: torch.Tensor, temperature: float | None = None) -> torch.Tensor:
    """PolyCL Eq. 1, averaged over the ``M`` anchors of ``(M, D)`` projections.

    ``temperature=None`` is the paper's ``tau = 1/M``.
    """
    m = z.shape[0]
    tau = 1.0 / m if temperature is None else float(temperature)
    pos = F.cosine_similarity(z, z_pos, dim=1) / tau
    neg = F.cosine_similarity(z, z_neg, dim=1) / tau
    # -log(e^pos / (e^pos + e^neg)) = logsumexp(pos, neg) - pos
    return (torch.logsumexp(torch.stack([pos, neg], dim=1), dim=1) - pos).mean()


# =============================================================================== pair selection
def _pick_excluding(group: np.ndarray, i: int, rng: np.random.Generator) -> int:
    """A random element of the sorted ``group`` other than ``i`` (``group`` holds ``i``, size >= 2)."""
    j = int(rng.integers(group.size - 1))
    pos = int(np.searchsorted(group, i))
    return int(group[j + 1 if j >= pos else j])


class ScanSampler:
    """PolyCL-S selection: ``(positive, negative)`` of anchor ``i`` (``-1, -1`` if it has none).

    Positive: another slice of the anchor's scan; negative: a slice of any other scan.
    """

    def __init__(self, scans: Sequence[int]):
        self.scans = np.asarray(scans)
        self.groups = {s: np.flatnonzero(self.scans == s) for s in np.unique(self.scans)}
        self.others = {s: np.flatnonzero(self.scans != s) for s in self.groups}

    def __call__(self, i: int, rng: np.random.Generator) -> tuple[int, int]:
        same, others = self.groups[self.scans[i]], self.others[self.scans[i]]
        if same.size < 2 or others.size == 0:
            return -1, -1
        return _pick_excluding(same, i, rng), int(others[int(rng.integers(others.size))])


class OrganSampler:
    """PolyCL-O selection: ``(positive, negative, organ)`` of anchor ``i`` (``-1``s if none).

    ``presence`` ``(N, K)`` bool. The organ is ``organ`` or, if ``None``, drawn among those for
    which the anchor has both a positive (same presence, not itself) and a negative.
    """

    def __init__(self, presence: np.ndarray, organ: int | None = None):
        presence = np.asarray(presence, dtype=bool)
        self.presence = presence[:, None] if presence.ndim == 1 else presence
        self.organ = organ
        self.groups = [(np.flatnonzero(~col), np.flatnonzero(col)) for col in self.presence.T]

    def __call__(self, i: int, rng: np.random.Generator) -> tuple[int, int, int]:
        candidates = [self.organ] if self.organ is not None else range(self.presence.shape[1])
        usable = []
        for k in candidates:
            has = int(self.presence[i, k])
            same, opposite = self.groups[k][has], self.groups[k][1 - has]
            if same.size >= 2 and opposite.size >= 1:
                usable.append(k)
        if not usable:
            return -1, -1, -1
        k = int(usable[int(rng.integers(len(usable)))])
        has = int(self.presence[i, k])
        same, opposite = self.groups[k][has], self.groups[k][1 - has]
        return _pick_excluding(same, i, rng), int(opposite[int(rng.integers(opposite.size))]), k


def middle_slices(index: np.ndarray, num_slices: Sequence[int], fraction: float) -> np.ndarray:
    """Mask of the rows ``(volume, slice)`` of ``index`` in the middle ``fraction`` of their volume.

    The middle is that of all ``num_slices[v]`` slices of the volume (as PolyCL's code), whatever
    rows ``index`` holds (e.g. body slices only).
    """
    if not 0 < fraction <= 1:
        raise ConfigError(f"slice_fraction must lie in (0, 1], got {fraction}")
    keep = np.zeros(len(index), dtype=bool)
    for row, (vi, z) in enumerate(index):
        n = num_slices[vi]
        lo = (1 - fraction) / 2 * n
        keep[row] = lo <= z + 0.5 < n - lo
    return keep


def organ_presence(labels: np.ndarray, slices: Sequence[int], values: Sequence[int]) -> np.ndarray:
    """``(len(slices), len(values))`` bool: slice ``z`` of ``labels (H, W, D)`` contains value ``v``."""
    out = np.zeros((len(slices), len(values)), dtype=bool)
    for r, z in enumerate(slices):
        present = np.unique(labels[..., int(z)])
        out[r] = np.isin(np.asarray(values), present)
    return out


# =============================================================================== dataset
class PolyCLTripletDataset(Dataset):
    """``{"anchor", "positive", "negative"}`` slices ``(1, S, S)`` of a :class:`SliceDataset`.

    ``draw(i, rng) -> (positive, negative)`` chooses the pair of anchor ``i`` (indices into
    ``slices``); it is called once per anchor at construction (seeded by ``seed``), or at each
    read with ``resample``. Anchors without a valid pair are left out.
    """

    def __init__(self, slices: SliceDataset, draw, seed: int = 0, resample: bool = False):
        self.slices = slices
        self.draw = draw
        self.resample = resample
        rng = np.random.default_rng(seed)
        pairs = np.array([draw(i, rng)[:2] for i in range(len(slices))], dtype=np.int64).reshape(-1, 2)
        valid = (pairs >= 0).all(axis=1)
        self.anchors = np.flatnonzero(valid)
        self.pairs = pairs[valid]
        if len(self.anchors) < 2:
            raise ConfigError("PolyCL found too few slices with both a positive and a negative example")

    def __len__(self) -> int:
        return len(self.anchors)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        a = int(self.anchors[i])
        if self.resample:  # torch's generator is seeded per DataLoader worker
            pos, neg = self.draw(a, np.random.default_rng(int(torch.randint(0, 2**31 - 1, (1,)))))[:2]
        else:
            pos, neg = (int(v) for v in self.pairs[i])
        return {"anchor": self.slices[a], "positive": self.slices[pos], "negative": self.slices[neg]}


# =============================================================================== methods
def _bare_linear_projection_keys(module, state_dict, prefix, *args) -> None:
    """Reads training states written when the projection was a bare Linear (``projection.weight``)."""
    for name in ("weight", "bias"):
        key = f"{prefix}projection.{name}"
        if key in state_dict:
            state_dict[f"{prefix}projection.0.{name}"] = state_dict.pop(key)


class _PolyCL(PretrainMethod):
    """The shared part of PolyCL-O and PolyCL-S: projection, Eq. 1 loss, slice selection."""

    default_options: dict[str, Any] = {
        "temperature": None,  # None: 1 / minibatch size (the paper)
        "proj_dim": 256,
        "slice_fraction": 0.3,
        "resample": False,
    }
    default_lr = 1e-4
    default_optimizer = "adam"
    #: the paper: "cosine-annealing learn rate scheduler with warm restarts after every 10 epochs"
    #: over 100 epochs: 10 cycles of the run's steps (torch's CosineAnnealingWarmRestarts)
    default_schedule = "cosine-restarts"
    restart_cycles = 10

    def __init__(self, encoder: ResNetEncoder, config: PretrainConfig):
        super().__init__(encoder, config)
        self.projection = mlp_head([encoder.feature_dim, int(self.options["proj_dim"])])
        self.register_load_state_dict_pre_hook(_bare_linear_projection_keys)

    def slice_dataset(self, volumes: Sequence) -> SliceDataset:
        slices = SliceDataset(volumes, self.config.image_size)
        keep = middle_slices(slices.index, [v.num_slices for v in slices.volumes], float(self.options["slice_fraction"]))
        slices.index = slices.index[keep]
        return slices

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.projection(self.encoder.pooled(x))

    def loss(self, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        z = self.embed(torch.cat([batch["anchor"], batch["positive"], batch["negative"]]))
        z, z_pos, z_neg = z.float().chunk(3)
        t = self.options["temperature"]
        loss = polycl_loss(z, z_pos, z_neg, None if t is None else float(t))
        with torch.no_grad():
            gap = (F.cosine_similarity(z, z_pos) - F.cosine_similarity(z, z_neg)).mean()
        return loss, {"loss": float(loss.detach()), "sim_gap": float(gap)}


class PolyCLScan(_PolyCL):
    """PolyCL-S: positive from the same scan, negative from another scan; no labels."""

    name = "polycl-s"
    def build_dataset(self, volumes: Sequence) -> PolyCLTripletDataset:
        if len(volumes) < 2:
            raise ConfigError("PolyCL-S needs at least two scans (its negatives come from another scan)")
        slices = self.slice_dataset(volumes)
        scans = slices.index[:, 0]
        return PolyCLTripletDataset(
            slices, ScanSampler(scans), self.config.seed, bool(self.options["resample"])
        )


class PolyCLOrgan(_PolyCL):
    """PolyCL-O: positive with the anchor's organ presence, negative with the opposite.

    Options (besides the shared ones): ``organs`` (stored structure names; default the seven
    OARs), ``organ`` (one of them, or ``None``: a random organ per anchor), ``labels`` /
    ``label_numbering`` / ``coarse_model`` (where the labels come from, as for AGCL).
    """

    name = "polycl-o"
    default_options = {
        **_PolyCL.default_options,
        "organs": list(label_names.OAR_NAMES),
        "organ": None,
        "labels": None,
        "label_numbering": "stored",
        "coarse_model": None,
    }

    def build_dataset(self, volumes: Sequence, device: torch.device | None = None) -> PolyCLTripletDataset:
        from contourcl.training.pretrain.agcl import load_coarse_labels

        o = self.options
        organs = [label_names.canonical_name(n) for n in o["organs"]]
        values = [label_names.STORED_LABELS[n] for n in organs]
        organ = None
        if o["organ"] is not None:
            name = label_names.canonical_name(o["organ"])
            if name not in organs:
                raise ConfigError(f"organ {o['organ']!r} is not among the organs {organs}")
            organ = organs.index(name)
        labels = load_coarse_labels(volumes, self.config, o, device)
        labeled = [v for v, lab in zip(volumes, labels, strict=False) if lab is not None]
        if not labeled:
            raise ConfigError("PolyCL-O needs organ labels: give label files (option 'labels') or 'coarse_model'")
        if len(labeled) < len(volumes):
            logger.warning("PolyCL-O: %d of %d scans have no labels and are left out", len(volumes) - len(labeled), len(volumes))
        lab_of = [lab for lab in labels if lab is not None]
        slices = self.slice_dataset(labeled)
        presence = np.concatenate([organ_presence(lab_of[vi], [z], values) for vi, z in slices.index])
        return PolyCLTripletDataset(
            slices, OrganSampler(presence, organ), self.config.seed, bool(o["resample"])
        )

    def stages(self, volumes: Sequence, ctx: RunContext):
        yield Stage("main", self, self.build_dataset(volumes, ctx.device), self.config.iterations)
