"""Retraining a served model on the clinicians' final labels, with a quality gate.

:func:`retrain` is what ``POST /train/<model>`` runs (in MONAI Label's training subprocess):

1. take every case whose ``final`` label contours at least one of the model's structures;
2. split them with the fixed validation cases of :class:`~contourcl.model_store.ModelStore`;
3. fine-tune from the served model (:func:`contourcl.training.finetune.finetune`);
4. score the served model on the same validation cases, and publish the new model only if its
   Dice is not lower (:meth:`~contourcl.model_store.ModelStore.consider`).
"""

from __future__ import annotations

import logging
import math
import tempfile
from dataclasses import replace
from pathlib import Path

import nibabel as nib
import numpy as np

from contourcl.checkpoint import load_model, read_meta
from contourcl.labels import STORED_LABELS, model_labels
from contourcl.model_store import ModelStore
from contourcl.training.finetune import FinetuneConfig, evaluate, finetune, save_finetuned

logger = logging.getLogger(__name__)

#: Request keys a client may set (Slicer shows them in its training options).
DEFAULTS = {"max_epochs": 10, "val_split": 0.2, "lr": 3e-4, "train_batch_size": 16, "samples_per_volume": 16, "seed": 0}


def contoured_cases(model: str, cases: list[dict]) -> list[dict]:
    """The cases whose stored label contours at least one of ``model``'s structures."""
    wanted = {STORED_LABELS[name] for name in model_labels(model)}
    keep = []
    for case in cases:
        values = np.unique(np.asanyarray(nib.load(case["label"]).dataobj))
        if wanted & {int(v) for v in values}:
            keep.append(case)
        else:
            logger.info("%s: no %s structure in its final label; not used for %s", case["id"], model, model)
    return keep


def retrain(model: str, cases: list[dict], store: ModelStore, request: dict | None = None, init: str | None = None, progress: bool = False) -> dict:
    """Fine-tune ``model`` on ``cases`` (``id``, ``image``, ``label`` in stored numbering).

    Returns a summary: the history entry (``published``, ``reason``, figures) plus the split.
    Raises ``ValueError`` when there is nothing to train on.
    """
    req = {**DEFAULTS, **(request or {})}
    cases = contoured_cases(model, cases)
    if len(cases) < 2:
        raise ValueError(
            f"{model}: {len(cases)} case(s) with final labels of its structures; at least 2 are needed "
            "(one to train on, one to validate before the new model may be served)"
        )
    val_ids = set(store.validation_ids([c["id"] for c in cases], float(req["val_split"]), int(req["seed"])))
    train = [c for c in cases if c["id"] not in val_ids]
    val = [c for c in cases if c["id"] in val_ids]

    served_net = None
    if store.served.is_file():
        served_net, meta = load_model(store.served)
        cfg = FinetuneConfig(model=model, net={k: v for k, v in meta.net.items() if k != "out_channels"},
                             spacing=meta.spacing, window=meta.window, roi=meta.roi)
    else:
        cfg = FinetuneConfig(model=model, init=init)
    cfg = replace(
        cfg, max_epochs=int(req["max_epochs"]), lr=float(req["lr"]), batch_size=int(req["train_batch_size"]),
        samples_per_volume=int(req["samples_per_volume"]), seed=int(req["seed"]),
    )
    served_dice = evaluate(served_net, val, cfg)[0] if served_net is not None else None
    logger.info("%s: %d training, %d validation cases %s; served model's validation Dice %s",
                model, len(train), len(val), sorted(val_ids), "-" if served_dice is None else f"{served_dice:.4f}")

    result = finetune(train, val, cfg, start_from=served_net, progress=progress)
    with tempfile.TemporaryDirectory(dir=store.served.parent) as tmp:
        candidate = save_finetuned(Path(tmp) / "candidate.pt", cfg, result, trained_on=[c["id"] for c in train], validated_on=sorted(val_ids))
        entry = store.consider(
            candidate, result.best_dice, served_dice,
            per_structure=result.per_structure, best_epoch=result.best_epoch, epochs=cfg.max_epochs,
            train_ids=[c["id"] for c in train], val_ids=sorted(val_ids), seconds=round(result.seconds, 1),
        )
    logger.info("%s: %s", model, entry["reason"])
    return {**entry, "model": model}


def _finite(value):
    """``value`` if it is a finite number (or not a number at all), else ``None``: JSON has no NaN."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def served_summary(store: ModelStore) -> dict:
    """What ``/info/`` reports for a model: the served version and its validation figures."""
    out: dict = {"model_file": str(store.served.name)}
    if store.served.is_file():
        meta = read_meta(store.served)
        out.update(val_dice=_finite(meta.metrics.get("val_dice")), trained=meta.created)
    entry = store.served_entry()
    if entry:
        out.update(version=entry["version"], val_dice=_finite(entry.get("val_dice")))
    out["history"] = [{k: _finite(e.get(k)) for k in ("version", "time", "val_dice", "served_val_dice", "published", "reason")} for e in store.entries()]
    return out
