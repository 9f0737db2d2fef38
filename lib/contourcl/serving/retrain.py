"""Retraining a served model on the clinicians' final labels, with a quality gate.

:func:`retrain` is what ``POST /train/<model>`` runs (in MONAI Label's training subprocess):

1. take every case whose ``final`` label contours at least one of the model's structures;
2. split them with the fixed validation cases of :class:`~contourcl.serving.model_store.ModelStore`;
3. fine-tune from the served model (:func:`contourcl.training.finetune.engine.finetune`);
4. score the served model and the new one on the same validation cases with the quality gate
   (:func:`gate_dice`), and publish the new model only if its Dice is not lower
   (:meth:`~contourcl.serving.model_store.ModelStore.consider`).

The gate scores exactly what is served: each model file contours each validation CT as the
server does (:class:`~contourcl.inference.Contourer`: whole body-cropped slices, the model file's
largest-component rule or the model config's for a file without one, mapped back to the CT's grid) and is scored on the CT's own grid with the
Dice of :func:`contourcl.evaluation.contour_metrics`, averaged as ``contourcl evaluate`` averages
(per patient over the structures it contours, then over patients). A model uploaded with
``PUT /model/<name>`` goes the same way (:func:`consider_model_file`).
"""

from __future__ import annotations

import logging
import math
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np

from contourcl.data.labels import STORED_LABELS, model_labels, values_in
from contourcl.data.volumes import read_ct, read_nifti
from contourcl.errors import InvalidImageError
from contourcl.evaluation import evaluate_model_file, summarise
from contourcl.models.checkpoint import check_model_file, load_model, read_meta
from contourcl.serving.model_store import ModelStore
from contourcl.training.finetune.engine import (
    FinetuneConfig,
    finetune,
    following,
    save_finetuned,
)

logger = logging.getLogger(__name__)

#: Request keys a client may set (Slicer shows them in its training options).
DEFAULTS = {"max_epochs": 10, "val_split": 0.2, "lr": 3e-4, "train_batch_size": 16, "samples_per_volume": 16, "seed": 0}


def contoured_cases(model: str, cases: list[dict]) -> list[dict]:
    """The cases whose stored label contours at least one of ``model``'s structures."""
    wanted = {STORED_LABELS[name] for name in model_labels(model)}
    keep = []
    for case in cases:
        if wanted & values_in(np.rint(np.asarray(read_nifti(case["label"])[0])).astype(np.int64)):
            keep.append(case)
        else:
            logger.info("%s: no %s structure in its final label; not used for %s", case["id"], model, model)
    return keep


def usable_cases(cases: list[dict]) -> tuple[list[dict], dict[str, str]]:
    """``(usable, {id: reason})``: cases whose CT is not a usable CT (NaN, constant, impossible
    grid) are named and left out, so that one bad file cannot sink a training run."""
    keep, excluded = [], {}
    for case in cases:
        try:
            read_ct(case["image"], case["id"])
        except InvalidImageError as err:
            excluded[case["id"]] = str(err)
            logger.warning("%s excluded from training: %s", case["id"], err)
            continue
        keep.append(case)
    return keep, excluded


def gate_dice(model_file: str | Path, cases: list[dict], largest_component: bool = True) -> tuple[float, dict[str, float]]:
    """The quality gate's figure of ``model_file`` on labeled ``cases``: mean Dice over patients
    (each patient's mean over the structures it contours) and per structure, of the served
    inference path on each CT's own grid (``largest_component``: the rule for a file without
    one). The same number ``contourcl evaluate`` reports."""
    per_case = evaluate_model_file(model_file, cases, largest_component=largest_component)
    structures = list(read_meta(model_file).labels)
    summary = summarise([per_case], structures)
    per = {s: summary[(s, "dice")]["mean"] for s in structures if summary[(s, "dice")]["patients"]}
    return summary[("mean", "dice")]["mean"], per


def _gate_note(n: int, floor: int) -> str | None:
    if n < floor:
        return f"the quality gate decided on {n} validation case(s), fewer than {floor}: its figure is not reliable; submit more final labels"
    return None


def retrain(model: str, cases: list[dict], store: ModelStore, request: dict | None = None, init: str | None = None, progress: bool = False,
            largest_component: bool = True) -> dict:
    """Fine-tune ``model`` on ``cases`` (``id``, ``image``, ``label`` in stored numbering).

    The new model file records the served file's largest-component rule, or ``largest_component``
    (the model config's) when the served file has none or there is no served file. Returns a summary: the history entry (``published``, ``reason``, figures) plus the split.
    Raises ``ValueError`` when there is nothing to train on.
    """
    req = {**DEFAULTS, **(request or {})}
    cases, excluded = usable_cases(contoured_cases(model, cases))
    if len(cases) < 2:
        raise ValueError(
            f"{model}: {len(cases)} usable case(s) with final labels of its structures; at least 2 are needed "
            f"(one to train on, one to validate before the new model may be served)"
            + (f"; excluded: {excluded}" if excluded else "")
        )
    val_ids = set(store.validation_ids([c["id"] for c in cases], float(req["val_split"]), int(req["seed"])))
    train = [c for c in cases if c["id"] not in val_ids]
    val = [c for c in cases if c["id"] in val_ids]

    with tempfile.TemporaryDirectory(dir=store.served.parent) as tmp:
        # the served file as it is now: trained from, gated, and named by its sha256 to the
        # store, which gates the candidate again if a restore or an upload replaced it meanwhile
        served, served_sha = store.snapshot_served(Path(tmp) / "served.pt")
        served_net = None
        if served is not None:
            served_net, meta = load_model(served)
            cfg = replace(following(FinetuneConfig(model=model, largest_component=largest_component), meta), tta_flip=meta.tta_flip)
        else:
            cfg = FinetuneConfig(model=model, init=init, largest_component=largest_component)
        cfg = replace(
            cfg, max_epochs=int(req["max_epochs"]), lr=float(req["lr"]), batch_size=int(req["train_batch_size"]),
            samples_per_volume=int(req["samples_per_volume"]), seed=int(req["seed"]),
        )
        served_dice = gate_dice(served, val, largest_component)[0] if served_net is not None else None
        logger.info("%s: %d training, %d validation cases %s; served model's validation Dice %s",
                    model, len(train), len(val), sorted(val_ids), "-" if served_dice is None else f"{served_dice:.4f}")

        result = finetune(train, val, cfg, start_from=served_net, progress=progress)
        candidate = save_finetuned(Path(tmp) / "candidate.pt", cfg, result, trained_on=[c["id"] for c in train], validated_on=sorted(val_ids))
        candidate_dice, per_structure = gate_dice(candidate, val, largest_component)
        # an image removed from the datastore while this trained: it was trained on, so it is named
        # (its labels are kept in the datastore's label history, contourcl.serving.datastore)
        removed = sorted(c["id"] for c in train + val if not Path(c["image"]).is_file())
        if removed:
            logger.warning("%s: trained on images removed from the datastore meanwhile: %s", model, removed)
        entry = store.consider(
            candidate, candidate_dice, served_dice, served_sha=served_sha, regate=lambda path: gate_dice(path, val, largest_component)[0],
            per_structure=per_structure, best_epoch=result.best_epoch, epochs=cfg.max_epochs,
            train_ids=[c["id"] for c in train], val_ids=sorted(val_ids), gate_cases=len(val), gate_note=_gate_note(len(val), store.min_gate_cases),
            excluded=excluded or None, skipped_steps=result.skipped or None, seconds=round(result.seconds, 1),
            removed_during_training=removed or None,
        )
    logger.info("%s: %s", model, entry["reason"])
    return {**entry, "model": model}


def consider_model_file(model: str, path: str | Path, store: ModelStore, cases: list[dict], origin: str,
                        largest_component: bool = True) -> dict:
    """Archive a model file from outside retraining (an upload) and publish it only if the quality
    gate finds it not worse than the served model on the fixed validation cases
    (``largest_component``: the rule for a model file without one).

    Raises :class:`~contourcl.errors.InvalidModelError` (nothing archived, nothing served changes)
    when the file is not a valid ``model`` file, and
    :class:`~contourcl.serving.model_store.ModelBusyError` (a ``TrainerBusyError``, naming the
    trainer's pid) while a training of ``model`` runs: its candidate is gated against what is
    served, and an upload landing meanwhile would make the two race.
    """
    store.refuse_while_training()
    check_model_file(path, model)
    cases, excluded = usable_cases(contoured_cases(model, cases))
    val_ids = set(store.validation_ids([c["id"] for c in cases]))
    val = [c for c in cases if c["id"] in val_ids]
    with tempfile.TemporaryDirectory(dir=store.served.parent) as tmp:
        served, served_sha = store.snapshot_served(Path(tmp) / "served.pt")
        if val:
            candidate_dice, per_structure = gate_dice(path, val, largest_component)
            served_dice = gate_dice(served, val, largest_component)[0] if served is not None else None
            regate = lambda current: gate_dice(current, val, largest_component)[0]
        else:  # no validation case: consider() refuses to replace a served model without a figure
            candidate_dice, per_structure, served_dice, regate = float("nan"), {}, (None if served is None else float("nan")), None
    return store.consider(
        Path(path), candidate_dice, served_dice, origin=origin, served_sha=served_sha, regate=regate, per_structure=per_structure,
        val_ids=[c["id"] for c in val], gate_cases=len(val), gate_note=_gate_note(len(val), store.min_gate_cases), excluded=excluded or None,
    )


def _finite(value):
    """``value`` if it is a finite number (or not a number at all), else ``None``: JSON has no NaN."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def served_summary(store: ModelStore) -> dict:
    """What ``/info/`` reports for a model: the served version and its validation figures, and
    ``"warning"``/``"problems"`` naming a file that cannot be used (an unreadable served model or
    history) and what to do. Never raises: a broken file must not take ``/info/`` down."""
    from contourcl.models.checkpoint import describe_encoder, encoder_of_file, trace_retrained

    out: dict = {"model_file": str(store.served.name), "min_gate_cases": store.min_gate_cases}
    problems = store.problems()
    if store.served.is_file() and not store.served_problem():
        try:
            meta = read_meta(store.served)
            out.update(val_dice=_finite(meta.metrics.get("val_dice")), trained=meta.created)
            # where the served weights' encoder came from (issue 32): random init, a pretraining
            # checkpoint (method, steps, data, sha256), or a retraining of the first served file's
            encoder = encoder_of_file(store.served)
            if encoder.get("source") == "retrained":
                try:
                    earlier = [store.root / e["file"] for e in store.entries()]
                except Exception:  # noqa: BLE001 -- the history's own problems are reported below
                    earlier = []
                encoder = trace_retrained(encoder, earlier)
            out.update(encoder=encoder, encoder_summary=describe_encoder(encoder))
        except Exception as err:  # noqa: BLE001 -- replaced or broken since it was checked
            problems.append(f"{store.served}: {err}")
    try:
        entries = store.entries()
    except Exception as err:  # e.g. a history folder that cannot be read at all
        logger.exception("%s: the model history cannot be read", store.name)
        entries = []
        problems.append(f"the history of {store.name} ({store.root}) cannot be read: {err}; tell the administrator of this server")
    served = [e for e in entries if e.get("served")]
    entry = served[-1] if served else None
    if entry:
        out.update(version=entry["version"], val_dice=_finite(entry.get("val_dice")))
    warnings = problems + ([entry["gate_note"]] if entry and entry.get("gate_note") else [])
    if warnings:
        out["warning"] = " | ".join(warnings)
    if problems:
        out["problems"] = problems
    out["history"] = [{k: _finite(e.get(k)) for k in ("version", "time", "origin", "val_dice", "served_val_dice", "gate_cases", "gate_note", "published", "reason")}
                      for e in entries]
    return out
