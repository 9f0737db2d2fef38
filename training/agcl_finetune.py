"""AGCL's fine-tuning variant: a frozen 2-channel AGCL encoder, one ASPP head per target, label fusion.

Lee et al. (AGCL), stage 2: each target is segmented by its own binary model that sees the image
and that target's coarse mask (the attention channel of pretraining); the encoder stays frozen and
only the ASPP heads learn (soft Dice per binary model, the paper's Eq. 1). The per-target outputs
are fused into one multi-structure map by :func:`contourcl.training.agcl.fuse_labels`.

Coarse masks: in training, each target's reference contour dilated by ``coarse_dilation`` voxels
(a stand-in for a first-stage model's imperfect mask); in validation and use, the prediction of a
first-stage model (the ``oar`` model file given as ``coarse_model``), as the paper does.
Structures a case does not contour are left out of its loss.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from monai.data import CacheDataset, DataLoader, Dataset, list_data_collate
from monai.losses import DiceLoss
from monai.transforms import Compose
from scipy.ndimage import binary_dilation
from tqdm.auto import tqdm

from contourcl.checkpoint import load_model
from contourcl.inference import slice_probabilities
from contourcl.labels import model_labels
from contourcl.training.agcl import AGCLSegmenter
from contourcl.training.finetune import FinetuneConfig, _item, augmentation, preprocessing

logger = logging.getLogger(__name__)


@dataclass
class AGCLFinetuneResult:
    segmenter: AGCLSegmenter
    val_dice: dict[str, float]  # per structure, with the coarse masks of ``coarse_model``
    history: list[dict]
    seconds: float


def dilated_coarse(label: torch.Tensor, iterations: int) -> torch.Tensor:
    """Each structure of ``label`` ``(B, 1, H, W)`` dilated by ``iterations`` voxels, larger
    structures drawn first so that small ones stay visible: ``(B, H, W)``."""
    lab = label[:, 0].long().cpu().numpy()
    out = np.zeros_like(lab)
    for b in range(lab.shape[0]):
        values, counts = np.unique(lab[b][lab[b] > 0], return_counts=True)
        for v in values[np.argsort(-counts)]:
            out[b][binary_dilation(lab[b] == v, iterations=iterations)] = v
    return torch.as_tensor(out)


def finetune_agcl(
    train_items: list[dict], val_items: list[dict], encoder_2ch: str | Path, coarse_model: str | Path,
    cfg: FinetuneConfig, coarse_dilation: int = 2, progress: bool = True,
) -> AGCLFinetuneResult:
    """Train the per-target ASPP heads on ``train_items``; score the fused map on ``val_items``."""
    t0 = time.perf_counter()
    names = list(model_labels(cfg.model))
    segmenter = AGCLSegmenter.from_checkpoint(encoder_2ch, n_targets=len(names)).train()
    coarse_net, coarse_meta = load_model(coarse_model)
    if coarse_meta.model != cfg.model:
        raise ValueError(f"coarse model {coarse_model} is a {coarse_meta.model} model, not {cfg.model}")
    cache = CacheDataset([_item(i) for i in train_items], Compose(preprocessing(cfg)), progress=False)
    loader = DataLoader(Dataset(cache, Compose(augmentation(cfg))), batch_size=max(1, cfg.batch_size // cfg.samples_per_volume),
                        shuffle=True, collate_fn=list_data_collate)
    dice = DiceLoss(include_background=False, to_onehot_y=True, softmax=True, reduction="none")
    optimizer = torch.optim.AdamW([p for p in segmenter.parameters() if p.requires_grad], lr=cfg.lr, weight_decay=cfg.weight_decay)
    history = []
    for epoch in tqdm(range(1, cfg.max_epochs + 1), desc=f"AGCL heads {cfg.model}", disable=not progress):
        losses = []
        for batch in loader:
            image, label, present = batch["image"], batch["label"], batch["present"]
            logits = segmenter(image, dilated_coarse(label, coarse_dilation))  # (B, T, 2, H, W)
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
    val = agcl_dice(segmenter, coarse_net, [_item(i) for i in val_items], cfg) if val_items else {}
    return AGCLFinetuneResult(segmenter, val, history, time.perf_counter() - t0)


def agcl_dice(segmenter: AGCLSegmenter, coarse_net, items: list[dict], cfg: FinetuneConfig) -> dict[str, float]:
    """Per-structure Dice of the fused map, coarse masks from ``coarse_net``; absent structures skipped."""
    names = list(model_labels(cfg.model))
    scores: dict[str, list[float]] = {n: [] for n in names}
    for vol in CacheDataset(items, Compose(preprocessing(cfg)), progress=False):
        image = vol["image"][None]  # (1, 1, H, W, D)
        coarse = torch.argmax(slice_probabilities(coarse_net, image, cfg.roi), dim=1)[0]  # (H, W, D)
        with torch.no_grad():
            slices = [segmenter.predict(image[..., z], coarse[None, ..., z])[0] for z in range(image.shape[-1])]
        pred = torch.stack(slices, dim=-1)
        truth = vol["label"][0].long()
        for t, name in enumerate(names, start=1):
            if vol["present"][t] > 0:
                p, y = pred == t, truth == t
                scores[name].append(float(2 * (p & y).sum() / max(int(p.sum() + y.sum()), 1)))
    return {n: float(np.mean(v)) for n, v in scores.items() if v}
