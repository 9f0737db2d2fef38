"""AGCL's fine-tuning variant: a frozen 2-channel AGCL encoder, one ASPP head per target, label fusion.

Lee et al. (AGCL), stage 2: each target is segmented by its own binary model
(:class:`AGCLSegmenter`) that sees the image and that target's coarse mask (the attention channel
of pretraining, :mod:`contourcl.training.pretrain.agcl`); the encoder stays frozen and only the
ASPP heads (:class:`ASPPHead`) learn (soft Dice per binary model, the paper's Eq. 1). The
per-target outputs are fused into one multi-structure map (:func:`fuse_labels`). The paper
publishes no code for the fusion; the rule here is: per voxel, the target with the highest
foreground probability, and background where every target's foreground probability is below 0.5.
The paper's segmentation experiments use DeepLabv3+, whose decoder fuses the ASPP output with
stride-4 encoder features (``low_level=True``, the default); AGCL's code has ASPP, 1x1 conv and
bilinear upsampling (``low_level=False``).

Coarse masks: in training, each target's reference contour perturbed (:func:`perturbed_coarse`:
dilated or eroded by up to ``coarse_jitter`` voxels and shifted by up to as many; a stand-in for a
first-stage model's imperfect mask); in validation and use, the prediction of a first-stage model
(the ``oar`` model file given as ``coarse_model``), as the paper does.
Structures a case does not contour are left out of its loss.

Departures from the paper (issue 32), each with its reason:

- Optimiser: the paper trains the heads "for 10 epochs with Adam optimizer with batch size of 4
  and learning rate of 10^-4" and keeps the epoch with the best validation Dice (appendix 6.2).
  :func:`finetune_agcl` uses AdamW at the config's ``lr`` and batch, for ``max_epochs``, and keeps
  the last epoch: the same fine-tuning budget as the benchmark's other rows (which keep their last
  weights too). Set ``lr=1e-4``, ``batch_size=4`` in the config for the paper's.
- Coarse masks in training: the reference perturbed (see above), not a first-stage model's output:
  a model trained on the same cases would reproduce their references almost exactly, and the heads
  must learn to correct an imperfect mask. Measured (2026-12-07): with the reference always dilated
  by 2 voxels, the heads learned to erode by 2 and erased the coarse model's masks at evaluation
  (0.017 and 0.021 mean Dice on two ``oar`` draws at one labeled patient, against the random-init
  coarse model's 0.331 and 0.278; on a validation slice the heads given the reference dilated by 2
  found the parotid, 33 of its 33 pixels, and given the coarse model's mask 1 pixel).
- Steps: the paper counts epochs; :func:`finetune_agcl` trains ``steps_per_epoch`` batches per
  epoch when the config sets it (cases drawn with replacement), as the other rows of the
  label-efficiency tables do, so that a row at one labeled patient is not ten steps long.

Scoring: the fused map is what :class:`AGCLStage3` gives the served path
(:func:`contourcl.inference.contour`: the body's box, neighbour averaging, probabilities
interpolated onto the CT's grid), scored by :func:`contourcl.evaluation.evaluate_network` with the
coarse model file's preprocessing and rules, as every other row and ``contourcl evaluate`` score
(:func:`stage3_scores`, patient-wise means). The label-efficiency tables' ``agcl`` row is this stage 3, each draw's
random-init model its coarse model (:mod:`contourcl.training.experiments.label_efficiency`); their
``agcl-unet`` row fine-tunes the whole U-Net from the 1-channel checkpoint instead.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from monai.data import CacheDataset, DataLoader, Dataset, list_data_collate
from monai.losses import DiceLoss
from monai.networks.blocks import SimpleASPP
from monai.transforms import Compose
from scipy.ndimage import binary_dilation, binary_erosion
from torch import nn
from torch.utils.data import RandomSampler
from tqdm.auto import tqdm

from contourcl.data.labels import model_labels
from contourcl.evaluation import DEFAULT_TOLERANCE_MM, evaluate_network, prepare_cases, summarise
from contourcl.models.checkpoint import read_meta
from contourcl.models.encoder_checkpoint import read_encoder
from contourcl.models.networks import ContourUNet, ResNetEncoder
from contourcl.training.finetune.engine import FinetuneConfig, _item, augmentation, preprocessing

logger = logging.getLogger(__name__)


class ASPPHead(nn.Module):
    """DeepLab-style decoder on a frozen encoder's feature maps; ``(B, n_classes, H, W)`` logits.

    MONAI's :class:`~monai.networks.blocks.SimpleASPP` (1x1 and three dilated 3x3 convolutions,
    dilations 6/12/18) plus the image-pooling branch of DeepLabv3, a 1x1 projection and, with
    ``low_level`` (DeepLabv3+), fusion with the stride-4 features before the classifier; the
    logits are upsampled bilinearly to the input size.
    """

    def __init__(
        self,
        encoder_channels: Sequence[int],
        channels: int = 64,
        n_classes: int = 2,
        dilations: Sequence[int] = (6, 12, 18),
        low_level: bool = True,
        low_level_channels: int = 48,
    ):
        super().__init__()
        c_in = encoder_channels[-1]
        self.aspp = SimpleASPP(2, c_in, channels, kernel_sizes=(1, 3, 3, 3), dilations=(1, *dilations))
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(c_in, channels, 1, bias=False), nn.ReLU(inplace=True))
        self.project = nn.Sequential(
            nn.Conv2d(5 * channels, channels, 1, bias=False), nn.BatchNorm2d(channels), nn.ReLU(inplace=True)
        )
        self.low_level = low_level
        if low_level:
            self.reduce = nn.Sequential(
                nn.Conv2d(encoder_channels[1], low_level_channels, 1, bias=False),
                nn.BatchNorm2d(low_level_channels),
                nn.ReLU(inplace=True),
            )
            self.fuse = nn.Sequential(
                nn.Conv2d(channels + low_level_channels, channels, 3, padding=1, bias=False),
                nn.BatchNorm2d(channels),
                nn.ReLU(inplace=True),
            )
        self.classifier = nn.Conv2d(channels, n_classes, 1)

    def forward(self, features: Sequence[torch.Tensor], size: Sequence[int]) -> torch.Tensor:
        top = features[-1]
        pooled = self.pool(top).expand(-1, -1, *top.shape[-2:])
        x = self.project(torch.cat([self.aspp(top), pooled], dim=1))
        if self.low_level:
            low = features[1]
            x = F.interpolate(x, size=low.shape[-2:], mode="bilinear", align_corners=False)
            x = self.fuse(torch.cat([x, self.reduce(low)], dim=1))
        return F.interpolate(self.classifier(x), size=tuple(size), mode="bilinear", align_corners=False)


def fuse_labels(fg_probs: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """Label fusion of per-target foreground probabilities ``(B, T, H, W)`` into ``(B, H, W)``.

    Per voxel: ``1 + argmax_t p_t`` (targets numbered from 1, as the ``oar`` model's labels), and
    0 (background) where every ``p_t < threshold``.
    """
    best, idx = fg_probs.max(dim=1)
    return torch.where(best >= threshold, idx + 1, torch.zeros_like(idx))


class AGCLSegmenter(nn.Module):
    """AGCL's fine-tuning model: a frozen 2-channel encoder, one binary :class:`ASPPHead` per target.

    ``forward(image, coarse)``: ``image`` ``(B, 1, H, W)``, ``coarse`` ``(B, H, W)`` the coarse
    segmentation numbered 1..T (the ``oar`` model's numbering); returns per-target logits
    ``(B, T, 2, H, W)`` (training). At use each target is answered only on the patch centred on
    its coarse mask (:meth:`attended_probabilities`) and the answers are fused (:func:`fuse_labels`,
    :class:`AGCLStage3`). Training
    (:func:`finetune_agcl`) scores each binary output with soft Dice (the paper's Eq. 1).
    """

    def __init__(self, encoder: ResNetEncoder, n_targets: int, **head_kwargs):
        super().__init__()
        if encoder.config.in_channels != 2:
            raise ValueError("AGCLSegmenter needs the 2-channel (image, mask) AGCL encoder")
        self.encoder = encoder
        for p in self.encoder.parameters():
            p.requires_grad_(False)
        self.heads = nn.ModuleList(ASPPHead(encoder.out_channels, **head_kwargs) for _ in range(n_targets))

    @classmethod
    def from_checkpoint(cls, path: str | Path, n_targets: int, **head_kwargs) -> AGCLSegmenter:
        """Build on a 2-channel AGCL checkpoint (:func:`contourcl.training.pretrain.agcl.two_channel_path`)."""
        return cls(read_encoder(path)[0], n_targets, **head_kwargs)

    def train(self, mode: bool = True) -> AGCLSegmenter:
        super().train(mode)
        self.encoder.eval()  # frozen: batch-norm statistics stay those of pretraining
        return self

    def forward(self, image: torch.Tensor, coarse: torch.Tensor) -> torch.Tensor:
        size = image.shape[-2:]
        coarse = coarse.reshape(image.shape[0], *size)
        outs = []
        for t, head in enumerate(self.heads):
            x = torch.cat([image, (coarse == t + 1).to(image.dtype)[:, None]], dim=1)
            with torch.no_grad():
                feats = self.encoder(x)
            outs.append(head(feats, size))
        return torch.stack(outs, dim=1)

    def attended_probabilities(self, image: torch.Tensor, coarse: torch.Tensor, size: int) -> torch.Tensor:
        """Per-target foreground probabilities ``(B, T, H, W)`` where the paper answers them: each
        target on a ``size`` x ``size`` patch centred on its coarse mask's bounding box in the slice
        (zero-padded past the slice's edge; the box rounded up to a multiple of 32 where it is
        larger), 0 elsewhere and on slices whose coarse mask lacks the target. The heads never see
        a slice without their target's mask in training (its channel is the attention); answered
        on whole slices they mark foreground far from it."""
        b, _, h, w = image.shape
        out = image.new_zeros(b, len(self.heads), h, w)
        for t, head in enumerate(self.heads):
            for i in range(b):
                target = coarse[i] == t + 1
                if not bool(target.any()):
                    continue
                rows, cols = torch.nonzero(target.any(dim=1)).flatten(), torch.nonzero(target.any(dim=0)).flatten()
                box = []
                for lo, hi in ((int(rows[0]), int(rows[-1])), (int(cols[0]), int(cols[-1]))):
                    side = max(int(size), -(-(hi - lo + 1) // 32) * 32)
                    start = (lo + hi + 1) // 2 - side // 2
                    box.append((start, side))
                (r0, rs), (c0, cs) = box
                pad = (max(0, -c0), max(0, c0 + cs - w), max(0, -r0), max(0, r0 + rs - h))
                x = torch.cat([image[i : i + 1], target[None, None].to(image.dtype)], dim=1)
                x = F.pad(x, pad)[..., r0 + pad[2] : r0 + pad[2] + rs, c0 + pad[0] : c0 + pad[0] + cs]
                with torch.no_grad():
                    p = torch.softmax(head(self.encoder(x), (rs, cs)), dim=1)[0, 1]
                top, left = max(0, r0), max(0, c0)
                bottom, right = min(h, r0 + rs), min(w, c0 + cs)
                out[i, t, top:bottom, left:right] = p[top - r0 : bottom - r0, left - c0 : right - c0]
        return out


class AGCLStage3(nn.Module):
    """AGCL's stage 3 as one network of the served path: slices ``(B, 1, H, W)`` in, class scores
    ``(B, T + 1, H, W)`` out, numbered as the coarse model's labels.

    The coarse model (a 2D model file's network, e.g. the draw's random-init ``oar`` model) draws
    each slice's coarse mask (its argmax), the segmenter's heads answer each target on a ``patch``-pixel
    patch centred on it (:meth:`AGCLSegmenter.attended_probabilities`; the training crops' size), and the
    output is the log of ``[threshold, p_1, ..., p_T]`` (the threshold's float just below it): the softmax the served path takes of it
    is those scores over their sum, whose argmax is :func:`fuse_labels`' rule (background where
    every ``p_t`` is below ``threshold``, else the most probable target). ``config`` is the coarse
    network's (one input slice, T + 1 outputs): what :func:`contourcl.inference.slice_probabilities` reads.
    """

    def __init__(self, segmenter: AGCLSegmenter, coarse: ContourUNet, patch: int, threshold: float = 0.5):
        super().__init__()
        if int(coarse.config.in_channels) != 1:
            raise ValueError(f"the coarse model takes {coarse.config.in_channels} slices; AGCL's stage 3 needs a one-slice model")
        if int(coarse.config.out_channels) != len(segmenter.heads) + 1:
            raise ValueError(f"the coarse model has {coarse.config.out_channels - 1} structures, the segmenter {len(segmenter.heads)} heads")
        self.segmenter, self.coarse, self.patch, self.threshold = segmenter, coarse, int(patch), float(threshold)
        self.config = coarse.config

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        coarse = self.coarse(x).argmax(dim=1)
        probs = self.segmenter.attended_probabilities(x, coarse, self.patch)
        # background just under the threshold: a target at exactly the threshold is kept, as fuse_labels keeps it
        floor = torch.nextafter(torch.tensor(self.threshold, dtype=probs.dtype), torch.tensor(0.0, dtype=probs.dtype))
        scores = torch.cat([floor.expand_as(probs[:, :1]), probs], dim=1)
        return torch.log(scores.clamp_min(1e-6))


def stage3_scores(segmenter: AGCLSegmenter, coarse_model: str | Path, cases: Sequence, patch: int,
                  tolerance_mm: float = DEFAULT_TOLERANCE_MM) -> tuple[dict[str, dict[str, dict[str, float]]], dict[str, dict[str, str]]]:
    """Each case's figures (:func:`contourcl.evaluation.evaluate_network`: the served path and the
    one metric) of AGCL's stage 3 on ``coarse_model`` (a model file) over labeled ``cases``
    (:func:`contourcl.data.datasets.labeled_cases` entries), and the reference structures the
    check set aside (``{case: {structure: reason}}``)."""
    from contourcl.inference import Contourer

    contourer = Contourer(coarse_model)
    _, coarse_net, meta = contourer.model()
    network = AGCLStage3(segmenter.eval(), coarse_net.eval(), patch).to(contourer.device)
    prepared = prepare_cases(cases, meta)
    metrics = evaluate_network(network, meta, prepared, contourer.keeps_largest_component(meta), tolerance_mm, device=contourer.device)
    return metrics, {c.id: c.set_aside for c in prepared if c.set_aside}


@dataclass
class AGCLFinetuneResult:
    segmenter: AGCLSegmenter
    val_dice: dict[str, float]  # per structure, with the coarse masks of ``coarse_model`` (:func:`stage3_scores`, patient-wise means)
    history: list[dict]
    seconds: float


def perturbed_coarse(label: torch.Tensor, rng: np.random.Generator, jitter: int = 2) -> torch.Tensor:
    """Each structure of ``label`` ``(B, 1, H, W)`` as an imperfect coarse mask: dilated or eroded
    by up to ``jitter`` voxels (an erosion that would empty it is not made) and shifted by up to
    ``jitter`` voxels along each axis, each drawn from ``rng``; larger structures drawn first so
    that small ones stay visible: ``(B, H, W)``."""
    lab = label[:, 0].long().cpu().numpy()
    out = np.zeros_like(lab)
    for b in range(lab.shape[0]):
        values, counts = np.unique(lab[b][lab[b] > 0], return_counts=True)
        for v in values[np.argsort(-counts)]:
            mask = lab[b] == v
            k = int(rng.integers(-jitter, jitter + 1))
            if k > 0:
                mask = binary_dilation(mask, iterations=k)
            elif k < 0:
                eroded = binary_erosion(mask, iterations=-k)
                mask = eroded if eroded.any() else mask
            mask = np.roll(mask, tuple(int(d) for d in rng.integers(-jitter, jitter + 1, size=2)), axis=(0, 1))
            out[b][mask] = v
    return torch.as_tensor(out)


def finetune_agcl(
    train_items: list[dict], val_items: list[dict], encoder_2ch: str | Path, coarse_model: str | Path,
    cfg: FinetuneConfig, coarse_jitter: int = 2, progress: bool = True,
) -> AGCLFinetuneResult:
    """Train the per-target ASPP heads on ``train_items``; score the fused map on ``val_items``."""
    t0 = time.perf_counter()
    names = list(model_labels(cfg.model))
    segmenter = AGCLSegmenter.from_checkpoint(encoder_2ch, n_targets=len(names)).train()
    coarse_meta = read_meta(coarse_model)
    if coarse_meta.model != cfg.model:
        raise ValueError(f"coarse model {coarse_model} is a {coarse_meta.model} model, not {cfg.model}")
    cache = CacheDataset([_item(i) for i in train_items], Compose(preprocessing(cfg)), progress=False)
    train_ds = Dataset(cache, Compose(augmentation(cfg)))
    volumes_per_batch = max(1, cfg.batch_size // cfg.samples_per_volume)
    sampler = None
    if cfg.steps_per_epoch:  # a fixed number of steps whatever the number of cases, as the engine trains
        sampler = RandomSampler(train_ds, replacement=True, num_samples=cfg.steps_per_epoch * volumes_per_batch)
    loader = DataLoader(train_ds, batch_size=volumes_per_batch, shuffle=sampler is None, sampler=sampler, collate_fn=list_data_collate)
    dice = DiceLoss(include_background=False, to_onehot_y=True, softmax=True, reduction="none")
    optimizer = torch.optim.AdamW([p for p in segmenter.parameters() if p.requires_grad], lr=cfg.lr, weight_decay=cfg.weight_decay)
    history = []
    rng = np.random.default_rng(cfg.seed)  # the coarse masks' perturbations
    for epoch in tqdm(range(1, cfg.max_epochs + 1), desc=f"AGCL heads {cfg.model}", disable=not progress):
        losses = []
        for batch in loader:
            image, label, present = batch["image"], batch["label"], batch["present"]
            logits = segmenter(image, perturbed_coarse(label, rng, coarse_jitter))  # (B, T, 2, H, W)
            per = torch.stack([dice(logits[:, t], (label == t + 1).long()).reshape(-1) for t in range(len(names))], 1)  # (B, T)
            weights = present[:, 1:]
            loss = (per * weights).sum() / weights.sum().clamp_min(1.0)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
        history.append({"epoch": epoch, "loss": float(np.mean(losses))})
        logger.info("AGCL epoch %d/%d  loss %.4f", epoch, cfg.max_epochs, history[-1]["loss"])
    segmenter.eval()
    val = {}
    if val_items:  # each structure's patient-wise mean Dice, over the cases that contour it
        summary = summarise([stage3_scores(segmenter, coarse_model, val_items, cfg.roi[0])[0]], names)
        val = {n: summary[(n, "dice")]["mean"] for n in names if summary[(n, "dice")]["patients"]}
    return AGCLFinetuneResult(segmenter, val, history, time.perf_counter() - t0)


def save_agcl(path: str | Path, model: str, result: AGCLFinetuneResult, encoder_2ch: str | Path, coarse_model: str | Path) -> None:
    """Write the trained segmenter (format ``contourcl-agcl/1``; the app does not serve it)."""
    torch.save({"format": "contourcl-agcl/1", "model": model, "state_dict": result.segmenter.state_dict(),
                "encoder_2ch": str(encoder_2ch), "coarse_model": str(coarse_model), "val_dice": result.val_dice,
                "history": result.history, "seconds": result.seconds}, path)


def load_agcl(path: str | Path) -> tuple[AGCLFinetuneResult, dict]:
    """A segmenter :func:`save_agcl` wrote (on the two-channel encoder it names), as the result it
    saved, and the file's other fields."""
    saved = torch.load(path, map_location="cpu", weights_only=True)
    if saved.get("format") != "contourcl-agcl/1":
        raise ValueError(f"{path} is not an AGCL stage-3 file (format {saved.get('format')!r})")
    segmenter = AGCLSegmenter.from_checkpoint(saved["encoder_2ch"], n_targets=len(model_labels(saved["model"])))
    segmenter.load_state_dict(saved["state_dict"])
    result = AGCLFinetuneResult(segmenter.eval(), dict(saved["val_dice"]), list(saved["history"]), float(saved.get("seconds") or float("nan")))
    return result, {k: v for k, v in saved.items() if k != "state_dict"}
