"""The served model file, its history, and the fixed validation cases.

Layout, for model ``oar`` in ``model_dir``::

    model_dir/oar.pt                       the served model (what inference loads)
    model_dir/history/oar/history.json     every candidate: version, figures, published or not
    model_dir/history/oar/vNNNN.pt         every candidate's weights, published or rejected
    model_dir/history/oar/validation.json  the fixed validation cases

Publishing copies the candidate next to the served file and ``os.replace``-s it: readers see
the old file or the new one, never half of one. A candidate is published only when its
validation Dice is not below the served model's on the same cases (computed in the same run),
so a worse model is never served. Earlier models stay in the history and can be restored.
"""

from __future__ import annotations

import filecmp
import json
import math
import os
import random
import shutil
import time
from pathlib import Path

from contourcl.files import atomic_write_text

#: Fewer validation cases than this, and the gate's decision is flagged as unreliable.
MIN_GATE_CASES = 3


def _atomic_copy(src: Path, dst: Path) -> None:
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
    shutil.copyfile(src, tmp)
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, dst)


class ModelStore:
    """Served model, history and validation split of one model (``oar`` or ``gtv``)."""

    def __init__(self, model_dir: str | Path, name: str):
        self.name = name
        self.served = Path(model_dir) / f"{name}.pt"
        self.root = Path(model_dir) / "history" / name

    # -- validation cases -------------------------------------------------------------
    def validation_ids(self, labeled_ids: list[str], fraction: float = 0.2, seed: int = 0) -> list[str]:
        """The validation cases among ``labeled_ids``, fixed across retrains (MONAILabel #1752).

        Chosen once (a seeded draw of ``fraction`` of the cases, at least one when there are
        two or more), then kept: new cases go to training. Cases whose label was removed drop
        out; when none is left a new draw is made.
        """
        path = self.root / "validation.json"
        labeled = sorted(set(labeled_ids))
        kept: list[str] = []
        if path.is_file():
            kept = [i for i in json.loads(path.read_text()).get("ids", []) if i in labeled]
        if not kept and len(labeled) >= 2:
            n = min(len(labeled) - 1, max(1, round(fraction * len(labeled))))
            kept = sorted(random.Random(seed).sample(labeled, n))
        self.root.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps({"ids": kept, "fraction": fraction, "updated": time.strftime("%Y-%m-%dT%H:%M:%S")}, indent=1))
        return kept

    # -- history ------------------------------------------------------------------------
    def entries(self) -> list[dict]:
        path = self.root / "history.json"
        return json.loads(path.read_text()) if path.is_file() else []

    def _save_entries(self, entries: list[dict]) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.root / "history.json", json.dumps(entries, indent=1))

    def _archive(self, src: Path, entries: list[dict], **record) -> dict:
        version = 1 + max((e["version"] for e in entries), default=-1)
        dst = self.root / f"v{version:04d}.pt"
        self.root.mkdir(parents=True, exist_ok=True)
        _atomic_copy(src, dst)
        entry = {"version": version, "file": dst.name, "time": time.strftime("%Y-%m-%dT%H:%M:%S"), **record}
        entries.append(entry)
        return entry

    def served_entry(self) -> dict | None:
        """The history entry of the model being served, if it is recorded."""
        served = [e for e in self.entries() if e.get("served")]
        return served[-1] if served else None

    def consider(self, candidate: Path, candidate_dice: float, served_dice: float | None, origin: str = "retrain", **details) -> dict:
        """Archive ``candidate`` and publish it if it is not worse than the served model.

        ``served_dice`` is the served model's Dice on the same validation cases (``None``
        when no model is served yet). A nan candidate Dice (no validation case) is never
        published over a served model. Returns the history entry with ``published`` and
        ``reason``.
        """
        entries = self.entries()
        if self.served.is_file() and not any(e.get("served") for e in entries):
            # the model served before any retraining (e.g. the shipped one): keep it restorable,
            # with the gate's figure on the same validation cases as the candidate's
            self._archive(self.served, entries, origin="served before first retrain", val_dice=served_dice, published=True, served=True)
        if served_dice is None or not self.served.is_file():
            ok, reason = True, "no model was served"
        elif candidate_dice is None or math.isnan(candidate_dice):
            ok, reason = False, "no validation figure: a model is published only after validation"
        elif candidate_dice >= served_dice:
            ok, reason = True, f"validation Dice {candidate_dice:.4f} >= served {served_dice:.4f}"
        else:
            ok, reason = False, f"validation Dice {candidate_dice:.4f} < served {served_dice:.4f}: kept the served model"
        entry = self._archive(
            Path(candidate), entries, origin=origin, val_dice=candidate_dice, served_val_dice=served_dice,
            published=ok, reason=reason, **details,
        )
        if ok:
            _atomic_copy(self.root / entry["file"], self.served)
            for e in entries:
                e["served"] = e is entry
        self._save_entries(entries)
        return entry

    def withdraw(self) -> dict:
        """Stop serving the model: its file is archived (if it is not already) and removed from
        the served place; ``restore`` serves it again. Returns its history entry."""
        if not self.served.is_file():
            raise FileNotFoundError(f"{self.name}: no model is served ({self.served} does not exist)")
        entries = self.entries()
        served = [e for e in entries if e.get("served") and filecmp.cmp(self.root / e["file"], self.served, shallow=False)]
        entry = served[-1] if served else self._archive(self.served, entries, origin="served before withdrawal", val_dice=None, published=True)
        for e in entries:
            e["served"] = False
        entry["withdrawn"] = time.strftime("%Y-%m-%dT%H:%M:%S")
        self._save_entries(entries)
        os.remove(self.served)
        return entry

    def restore(self, version: int) -> dict:
        """Serve the archived model ``version`` again (atomically)."""
        entries = self.entries()
        match = [e for e in entries if e["version"] == version]
        if not match:
            raise ValueError(f"{self.name} has no archived version {version}; versions: {[e['version'] for e in entries]}")
        _atomic_copy(self.root / match[0]["file"], self.served)
        for e in entries:
            e["served"] = e is match[0]
        match[0]["restored"] = time.strftime("%Y-%m-%dT%H:%M:%S")
        self._save_entries(entries)
        return match[0]
