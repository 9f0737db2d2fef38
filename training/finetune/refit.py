"""Choose on an inner split, then train on every case: how the shipped model files are made.

Stage 1 (*select*) fine-tunes on the training cases minus an inner validation split and scores
every validation through the served path (:func:`~contourcl.training.finetune.engine.finetune`):
it chooses the number of epochs, the moving average against the raw weights, and flip
test-time augmentation. Stage 2 (*refit*) fine-tunes again on all cases with those choices, for
the chosen number of epochs, and keeps the last weights: no case is held back from the model that
ships, and no figure of it comes from a case it trained on (report the held-out test split).

Both stages write a resumable state into ``state_dir`` after every epoch; running the same
command again resumes where it stopped (a different configuration is refused, not mixed in).
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, replace
from pathlib import Path

from contourcl.errors import ConfigError
from contourcl.training.finetune.engine import (
    FinetuneConfig,
    FinetuneResult,
    finetune,
    return_freed_memory,
    save_finetuned,
)

logger = logging.getLogger(__name__)


def _same_configuration(stored: dict, current: dict) -> bool:
    """Whether a state left by ``stored`` may be resumed by ``current``: equal, except for settings
    added to :class:`FinetuneConfig` since the state was written, left at their defaults (the
    older code behaved as those defaults)."""
    defaults = json.loads(json.dumps(asdict(FinetuneConfig()), default=str))
    config = dict(stored.get("config", {}))
    for key, value in current.get("config", {}).items():
        if key not in config and key in defaults and value == defaults[key]:
            config[key] = value
    return {**stored, "config": config} == current


def _check_state_dir(state_dir: Path, fingerprint: dict) -> None:
    """Create ``state_dir`` for this configuration, or refuse one left by another configuration."""
    state_dir.mkdir(parents=True, exist_ok=True)
    config = state_dir / "config.json"
    text = json.dumps(fingerprint, sort_keys=True, indent=1, default=str)
    if config.is_file() and not _same_configuration(json.loads(config.read_text()), json.loads(text)):
        raise ConfigError(f"{state_dir} holds the state of a run with another configuration ({config}); "
                          "delete the folder to start afresh, or run that configuration again to resume it")
    config.write_text(text)


def select_and_refit(train: list[dict], val: list[dict], cfg: FinetuneConfig, out: str | Path, state_dir: str | Path,
                     half: bool = False, **provenance) -> dict:
    """Stage 1 on ``train`` with ``val`` held out, stage 2 on ``train + val``; writes ``out``.

    Returns a summary: the selection's validation figures and choices, and each stage's time.
    """
    if not val:
        raise ConfigError("choosing on an inner split needs validation cases (--val-fraction > 0)")
    state_dir = Path(state_dir)
    _check_state_dir(state_dir, {"config": asdict(cfg), "train": [c["id"] for c in train], "val": [c["id"] for c in val]})
    chosen_file = state_dir / "selection.json"
    if chosen_file.is_file():
        chosen = json.loads(chosen_file.read_text())
        logger.info("selection already done: %s", chosen)
    else:
        selected: FinetuneResult = finetune(train, val, cfg, state_path=state_dir / "select.pt")
        save_finetuned(state_dir / "selected.pt", cfg, selected, half=half, **provenance, stage="select")
        chosen = {"val_dice": selected.best_dice, "per_structure": selected.per_structure, "best_epoch": selected.best_epoch,
                  "tta_flip": selected.tta_flip, "choices": selected.choices, "seconds": round(selected.seconds, 1),
                  "history": selected.history}
        chosen_file.write_text(json.dumps(chosen, indent=1))
        del selected
        return_freed_memory()  # stage 1's cache, before the refit caches every case
    # the raw weights won the comparison with the average: refit without it
    use_ema = cfg.ema if chosen["choices"].get("kept", "ema") == "ema" else None
    refit_cfg = replace(cfg, max_epochs=max(1, int(chosen["best_epoch"])), tta_flip=bool(chosen["tta_flip"]), ema=use_ema)
    result = finetune([*train, *val], [], refit_cfg, state_path=state_dir / "refit.pt")
    result.tta_flip = bool(chosen["tta_flip"])
    result.choices = {**chosen["choices"], "inner_val_dice": chosen["val_dice"], "inner_val_per_structure": chosen["per_structure"],
                      "selected_epoch": chosen["best_epoch"]}
    save_finetuned(out, refit_cfg, result, half=half, **provenance, inner_val_ids=[c["id"] for c in val])
    return {"out": str(out), "inner_val_dice": chosen["val_dice"], "inner_val_per_structure": chosen["per_structure"],
            "epochs": refit_cfg.max_epochs, "tta_flip": refit_cfg.tta_flip, "ema": refit_cfg.ema, "choices": chosen["choices"],
            "select_seconds": chosen["seconds"], "refit_seconds": round(result.seconds, 1), "history": chosen["history"]}
