"""The served model file, its history, and the fixed validation cases.

Layout, for model ``oar`` in ``model_dir``::

    model_dir/oar.pt                       the served model (what inference loads)
    model_dir/history/oar/history.json     every candidate: version, sha256, figures, published or not
    model_dir/history/oar/vNNNN.pt         every candidate's weights, published or rejected
    model_dir/history/oar/validation.json  the fixed validation cases
    model_dir/history/oar/model.lock       held (flock) while the served file or the history changes
    model_dir/history/oar/train.lock       held by a running trainer (:class:`~contourcl.serving.lifecycle.TrainLock`)

A publish (:meth:`ModelStore.consider`) goes in this order, so that a process killed at any
point (``kill -9``, a power cut) loses no model:

1. the candidate is copied to a new ``vNNNN.pt`` (synced, created exclusively: an archived file is
   never overwritten, and a version number is never used twice: the next one is above every
   entry and every ``v*.pt`` on disk) -- fault point ``model-archived``;
2. ``history.json`` is replaced with the new entry (its file's sha256, figures, decision) --
   fault point ``model-history-written``;
3. the served file is replaced by a copy of the archive (atomically) -- fault point ``model-published``.

:meth:`ModelStore.reconcile` repairs whatever an interruption left: an archive with no entry is
recorded, the served file is matched to its entry by sha256 (a served file with no entry is
archived as a new version "found served at start-up"), and the entries' ``served`` flags are set
to match. The server runs it at start-up (:class:`contourcl.serving.infer.ContourInferTask`), and
every change (consider, restore, withdraw) runs it first, under the model lock.

The quality gate compares a candidate with what is served *when it is published*: a candidate
gated against a served file that has changed since (a restore, an upload) is gated again against
the file served now, or not published. A candidate is published only when its validation Dice is
not below the served model's on the same cases, so a worse model is never served. Earlier models
stay in the history and can be restored.

An unreadable ``history.json`` never stops the server: it is moved aside
(``history.json.corrupt-<time>``), the history is rebuilt from the ``vNNNN.pt`` files, and
:meth:`ModelStore.problems` names the broken file and what to do.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import re
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path

from contourcl.errors import ContourCLError
from contourcl.files import (
    atomic_copy,
    atomic_write_text,
    fault,
    fsync_dir,
    sha256_file,
    temporary_name,
)
from contourcl.serving.conf import conf_int
from contourcl.serving.lifecycle import TrainerBusyError, TrainLock

logger = logging.getLogger(__name__)

#: Fewer validation cases than this, and the gate does not replace a served model (``--conf min_gate_cases``);
#: a first model (none served) is published with the gate's note that its figure is not reliable.
MIN_GATE_CASES = 3
#: An archived model file's name: ``v`` and the version number (at least four digits), ``.pt``.
ARCHIVE_NAME = re.compile(r"^v(\d{4,})\.pt$")
#: Seconds a change waits for another change of the same model (e.g. an upload being gated).
LOCK_TIMEOUT_S = 900.0
#: The origin recorded for a served file that the history did not know.
FOUND_SERVED = "found served at start-up (not recorded in the history)"


def min_gate_cases_of(conf: dict) -> int:
    """``--conf min_gate_cases N`` (a whole number, at least 1; default :data:`MIN_GATE_CASES`)."""
    return conf_int(conf, "min_gate_cases", MIN_GATE_CASES, minimum=1, what="a whole number of validation cases")


class ModelStoreError(ContourCLError):
    """A request on the served model or its history that cannot be done (nothing was changed)."""


class ModelBusyError(TrainerBusyError, ContourCLError):
    """The model is being trained (its train lock is held), or changed by another request."""


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S")


def archive_version(name: str) -> int | None:
    """The version number of an archived file name ``vNNNN.pt``, or ``None`` for any other name."""
    match = ARCHIVE_NAME.match(name) if isinstance(name, str) else None
    return int(match.group(1)) if match else None


def _valid_entries(data) -> bool:
    """True when ``data`` is a history: a list of entries, each with an int version and a file name."""
    return isinstance(data, list) and all(
        isinstance(e, dict) and isinstance(e.get("version"), int) and isinstance(e.get("file"), str) for e in data
    )


class ModelStore:
    """Served model, history and validation split of one model (``oar`` or ``gtv``).

    Changes (:meth:`consider`, :meth:`restore`, :meth:`withdraw`, :meth:`reconcile`) hold the
    model lock (:meth:`locked`), across processes and threads; reads never wait for it.
    """

    def __init__(self, model_dir: str | Path, name: str, min_gate_cases: int = MIN_GATE_CASES):
        self.name = name
        #: a candidate gated on fewer validation cases than this does not replace a served model
        self.min_gate_cases = int(min_gate_cases)
        self.served = Path(model_dir) / f"{name}.pt"
        self.root = Path(model_dir) / "history" / name
        self._thread_lock = threading.RLock()
        self._lock_fd: int | None = None
        self._lock_depth = 0

    # -- locks ----------------------------------------------------------------------------
    def train_lock(self) -> TrainLock:
        """The lock a trainer of this model holds: ``history/<model>/train.lock``."""
        return TrainLock(self.root / "train.lock", f"the {self.name} model")

    def refuse_while_training(self) -> None:
        """Raise :class:`ModelBusyError` naming the trainer when a training of this model runs."""
        try:
            self.train_lock().check()
        except TrainerBusyError as err:
            raise ModelBusyError(f"the {self.name} model is being retrained ({err}); a model file cannot be uploaded meanwhile: "
                                 "upload it once the training has finished (GET /train/ shows its status)") from None

    @contextlib.contextmanager
    def locked(self, timeout: float = LOCK_TIMEOUT_S):
        """Hold the model lock (an ``flock`` on ``history/<model>/model.lock``, separate from the
        train lock) while the served file or the history changes. Re-entrant in one thread."""
        import fcntl

        with self._thread_lock:
            if self._lock_depth == 0:
                self._lock_fd = self._take_flock(fcntl, timeout)
            self._lock_depth += 1
            try:
                yield
            finally:
                self._lock_depth -= 1
                if self._lock_depth == 0:
                    fd, self._lock_fd = self._lock_fd, None
                    fcntl.flock(fd, fcntl.LOCK_UN)
                    os.close(fd)

    def _take_flock(self, fcntl, timeout: float) -> int:
        path = self.root / "model.lock"
        self.root.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return fd
            except BlockingIOError:
                if time.monotonic() > deadline:
                    os.close(fd)
                    raise ModelBusyError(f"the {self.name} model has been changed by another request for over {timeout:g} s "
                                         f"({path} is locked); try again later") from None
                time.sleep(0.1)

    # -- validation cases -------------------------------------------------------------
    def validation_ids(self, labeled_ids: list[str], fraction: float = 0.2, seed: int = 0) -> list[str]:
        """The validation cases among ``labeled_ids``, fixed across retrains (MONAILabel #1752).

        A case never moves between training and validation: a validation case stays one, and a
        case that could have been trained on never becomes one. The first draw is a seeded
        ``fraction`` of the cases (at least one when there are two or more). As labels arrive the
        set grows back to ``fraction`` from the cases labeled since the last call only (no model
        has trained on those yet), so the gate of a department that began with 5 labels does not
        decide on 1 case forever. Cases whose label was removed drop out; when none is left a
        new draw is made.
        """
        path = self.root / "validation.json"
        labeled = sorted(set(labeled_ids))
        kept: list[str] = []
        seen: set[str] | None = None  # the labeled cases at the last call (None: a file from before this was kept)
        if path.is_file():
            try:
                data = json.loads(path.read_text())
                kept = [i for i in data.get("ids", []) if i in labeled]
                seen = set(data["seen"]) if isinstance(data.get("seen"), list) else None
            except (ValueError, AttributeError) as err:  # unreadable: a new draw (logged), not a failed request
                logger.warning("%s: %s is unreadable (%s); drawing the validation cases again", self.name, path, err)
        want = min(len(labeled) - 1, max(1, round(fraction * len(labeled)))) if len(labeled) >= 2 else 0
        if not kept and want:
            kept = sorted(random.Random(seed).sample(labeled, want))
        elif kept and seen is not None and len(kept) < want:
            new = [i for i in labeled if i not in seen and i not in kept]
            kept = sorted(kept + random.Random(f"{seed}:{len(labeled)}").sample(new, min(len(new), want - len(kept))))
        self.root.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps({"ids": kept, "fraction": fraction, "seen": labeled, "updated": now()}, indent=1))
        return kept

    # -- history ------------------------------------------------------------------------
    def entries(self) -> list[dict]:
        """The history entries, oldest first. An unreadable ``history.json`` is moved aside and
        the history rebuilt from the archived files (see :meth:`problems`)."""
        path = self.root / "history.json"
        if not path.is_file():
            return []
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            return self._repair_history(f"{type(err).__name__}: {err}")
        if not _valid_entries(data):
            return self._repair_history("not a list of entries with a version and a file")
        return data

    def _repair_history(self, why: str) -> list[dict]:
        """Move an unreadable ``history.json`` aside and rebuild the history from ``v*.pt``."""
        from contourcl.models.checkpoint import read_meta

        path = self.root / "history.json"
        with self.locked():
            try:  # another process may have repaired it while this one waited for the lock
                data = json.loads(path.read_text())
                if _valid_entries(data):
                    return data
            except (OSError, ValueError):
                pass
            aside = path.with_name(f"history.json.corrupt-{time.strftime('%Y%m%d-%H%M%S')}-{time.time_ns() % 10**9:09d}")
            os.replace(path, aside)
            entries = []
            for version, file in self._archived_files():
                entry = {"version": version, "file": file.name, "sha256": sha256_file(file),
                         "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(file.stat().st_mtime)),
                         "origin": f"rebuilt from {file.name}: {aside.name} was unreadable", "published": None, "served": False}
                try:
                    entry["val_dice"] = read_meta(file).metrics.get("val_dice")
                except Exception as err:  # noqa: BLE001 -- an unreadable archive is recorded, not fatal
                    entry["unreadable"] = f"{type(err).__name__}: {err}"
                entries.append(entry)
            self._save_entries(entries)
            logger.error("%s: %s could not be read (%s): moved to %s; the history was rebuilt from %d archived file(s) %s",
                         self.name, path, why, aside.name, len(entries), [e["file"] for e in entries])
            return self._reconcile_locked(entries, FOUND_SERVED)

    def _archived_files(self) -> list[tuple[int, Path]]:
        """``(version, path)`` of every ``vNNNN.pt`` in the history folder, by version."""
        if not self.root.is_dir():
            return []
        found = [(archive_version(p.name), p) for p in self.root.iterdir() if p.is_file()]
        return sorted((v, p) for v, p in found if v is not None)

    def _save_entries(self, entries: list[dict]) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.root / "history.json", json.dumps(entries, indent=1))

    def next_version(self, entries: list[dict]) -> int:
        """A version number above every entry's and every archived file's on disk."""
        on_disk = [v for v, _ in self._archived_files()]
        return 1 + max([e["version"] for e in entries] + on_disk, default=-1)

    def _archive_file(self, src: Path, entries: list[dict]) -> tuple[int, Path, str]:
        """Copy ``src`` to a new ``vNNNN.pt`` (synced; created exclusively, so that no archived
        file is ever overwritten). Returns ``(version, path, sha256)``."""
        self.root.mkdir(parents=True, exist_ok=True)
        version = self.next_version(entries)
        tmp = temporary_name(self.root / "archive.pt")
        try:
            with open(src, "rb") as source, open(tmp, "wb") as out:
                shutil.copyfileobj(source, out, 1 << 20)
                out.flush()
                os.fsync(out.fileno())
            sha = sha256_file(tmp)
            while True:
                dst = self.root / f"v{version:04d}.pt"
                try:
                    os.link(tmp, dst)  # fails if dst exists: never overwrites an archive
                    break
                except FileExistsError:
                    version += 1
        finally:
            tmp.unlink(missing_ok=True)
        fsync_dir(self.root)
        return version, dst, sha

    def _record(self, src: Path, entries: list[dict], **record) -> dict:
        """Archive ``src`` and append its entry (not saved) to ``entries``."""
        version, dst, sha = self._archive_file(src, entries)
        entry = {"version": version, "file": dst.name, "sha256": sha, "time": now(), **record}
        entries.append(entry)
        return entry

    def served_entry(self) -> dict | None:
        """The history entry of the model being served, if it is recorded."""
        served = [e for e in self.entries() if e.get("served")]
        return served[-1] if served else None

    def snapshot_served(self, dst: str | Path) -> tuple[Path | None, str | None]:
        """Copy the served file to ``dst`` (one open file: a publish replacing it meanwhile does not
        mix two files) and return ``(dst, sha256)``; ``(None, None)`` when no model is served.
        Gate this copy, and pass its sha256 to :meth:`consider`."""
        dst = Path(dst)
        try:
            with open(self.served, "rb") as source, open(dst, "wb") as out:
                shutil.copyfileobj(source, out, 1 << 20)
        except FileNotFoundError:
            dst.unlink(missing_ok=True)
            return None, None
        return dst, sha256_file(dst)

    # -- start-up repair --------------------------------------------------------------------
    def reconcile(self) -> list[str]:
        """Make the history agree with the files (after an interrupted publish, or an old layout).

        Call it once at server start-up (:class:`~contourcl.serving.infer.ContourInferTask` does);
        :meth:`consider`, :meth:`restore` and :meth:`withdraw` run it first. Without any history
        (no ``history.json``, no ``vNNNN.pt``) it does nothing. Returns what it fixed
        (each also logged): archives with no entry are recorded; entries get the sha256 of their
        file; the served file is matched to its entry by sha256, or archived as a new version
        (``FOUND_SERVED``); the entries' ``served`` flags are set to match.
        """
        if not (self.root / "history.json").is_file() and not self._archived_files():
            return []  # no history yet: the first change archives the served file (nothing to lose before)
        with self.locked():
            notes: list[str] = []
            self._reconcile_locked(self.entries(), FOUND_SERVED, notes=notes)
            return notes

    def _reconcile_locked(self, entries: list[dict], served_origin: str, notes: list[str] | None = None, served_figures: dict | None = None) -> list[dict]:
        """:meth:`reconcile` on ``entries`` (the caller holds the lock); saves them if it changed
        anything. ``served_figures``: figures for a served file archived here (e.g. its gate Dice)."""
        notes = [] if notes is None else notes
        self._record_orphans(entries, notes)
        for e in entries:
            if not e.get("sha256") and (self.root / e["file"]).is_file() and archive_version(e["file"]) is not None:
                e["sha256"] = sha256_file(self.root / e["file"])
                notes.append(f"v{e['version']:04d}: recorded the sha256 of {e['file']}")
        served_sha = sha256_file(self.served) if self.served.is_file() else None
        chosen = None
        if served_sha is not None:
            matches = [e for e in entries if e.get("sha256") == served_sha]
            chosen = next((e for e in reversed(matches) if e.get("served")), matches[-1] if matches else None)
            if chosen is None:
                chosen = self._record(self.served, entries, origin=served_origin, published=True, served=True, **(served_figures or {}))
                notes.append(f"{self.served.name} was served but not in the history: archived as version {chosen['version']} ({served_origin})")
        now_served = f"version {chosen['version']}" if chosen else "absent"
        for e in entries:
            should = e is chosen
            if bool(e.get("served")) != should:
                notes.append(f"v{e['version']:04d}: served flag {bool(e.get('served'))} -> {should} (the served file is {now_served})")
                e["served"] = should
        if notes:
            self._save_entries(entries)
            for note in notes:
                logger.warning("%s model history repaired: %s", self.name, note)
        return entries

    def _record_orphans(self, entries: list[dict], notes: list[str]) -> None:
        """Add an entry for every ``vNNNN.pt`` that no entry names (a publish killed after archiving)."""
        from contourcl.models.checkpoint import read_meta

        named = {e["file"] for e in entries}
        for version, file in self._archived_files():
            if file.name in named:
                continue
            entry = {"version": version, "file": file.name, "sha256": sha256_file(file),
                     "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(file.stat().st_mtime)),
                     "origin": "found in the history folder with no entry (an interrupted publish)", "published": False,
                     "reason": "not recorded when it was archived; restore it to serve it"}
            if any(e["version"] == version for e in entries):
                entry["version"] = self.next_version(entries)
            try:
                entry["val_dice"] = read_meta(file).metrics.get("val_dice")
            except Exception as err:  # noqa: BLE001
                entry["unreadable"] = f"{type(err).__name__}: {err}"
            entries.append(entry)
            notes.append(f"{file.name} had no history entry: recorded as version {entry['version']}")

    # -- problems, for /info/ ---------------------------------------------------------------
    def problems(self) -> list[str]:
        """What a person must look at: history files found unreadable (moved aside) and a served
        file that cannot be used, each with what to do. Never raises."""
        out = []
        try:
            aside = sorted(self.root.glob("history.json.corrupt-*")) if self.root.is_dir() else []
        except OSError:
            aside = []
        for path in aside:
            out.append(f"{self.root / 'history.json'} could not be read: it was moved to {path} and the history was rebuilt from the "
                       f"archived vNNNN.pt files (their figures and gate reasons are lost). Check the history "
                       f"(contourcl models {self.name}), then delete {path.name} to clear this warning.")
        reason = self.served_problem()
        if reason:
            out.append(reason)
        return out

    def served_problem(self) -> str | None:
        """Why the served file cannot be served (it does not pass the model check), with what to
        do; ``None`` when it is fine or absent (cached per file state)."""
        return served_file_problem(self.served, self.name)

    # -- publishing -------------------------------------------------------------------------
    def consider(self, candidate: Path, candidate_dice: float, served_dice: float | None, origin: str = "retrain",
                 served_sha: str | None = "unchecked", regate: Callable[[Path], float] | None = None, **details) -> dict:
        """Archive ``candidate`` and publish it if it is not worse than the model served now.

        ``served_dice`` is the gate's Dice of the served file whose sha256 is ``served_sha`` on the
        same validation cases (``None`` for both when no model was served). If the served file
        has changed since (a restore, an upload), ``regate(path)`` gives the gate's Dice of the
        file served now and the decision is made on it; without ``regate`` the candidate is not
        published. (``served_sha="unchecked"``: the caller vouches the served file did not change.)
        A nan candidate Dice (no validation case) is never published over a served model, nor one
        gated on fewer than :attr:`min_gate_cases` cases (``details["gate_cases"]``, when given).
        Returns the history entry with ``published`` and ``reason``.
        """
        with self.locked():
            entries = self.entries()
            current_sha = sha256_file(self.served) if self.served.is_file() else None
            if served_sha == "unchecked":
                served_sha = current_sha
            same = current_sha == served_sha
            # the model served before any retraining (e.g. the shipped one) is kept restorable,
            # with the gate's figure when it is the file that was gated
            if same:
                self._reconcile_locked(entries, "served before first retrain", served_figures={"val_dice": served_dice})
            else:
                self._reconcile_locked(entries, FOUND_SERVED)
            if not same:
                served_dice, regated = self._regate(current_sha, served_sha, regate)
                details["regated"] = regated
            ok, reason = self._decide(candidate_dice, served_dice, current_sha is not None, details.get("regated"),
                                      details.get("gate_cases"), self.min_gate_cases)
            entry = self._publish(Path(candidate), entries, ok, origin=origin, val_dice=candidate_dice, served_val_dice=served_dice,
                                  published=ok, reason=reason, **details)
            return entry

    def _regate(self, current_sha: str | None, gated_sha: str | None, regate) -> tuple[float | None, str]:
        """The gate's figure of the file served now, which differs from the one the candidate was gated against."""
        if current_sha is None:
            logger.warning("%s: the served model was withdrawn after the candidate was gated", self.name)
            return None, "withdrawn"
        if regate is None:
            return float("nan"), "changed"
        logger.warning("%s: the served model changed since the candidate was gated (sha256 %s -> %s): gating again against it",
                       self.name, (gated_sha or "none")[:12], current_sha[:12])
        return float(regate(self.served)), "regated"

    @staticmethod
    def _decide(candidate_dice, served_dice, serving: bool, regated: str | None, gate_cases: int | None = None,
                min_gate_cases: int = MIN_GATE_CASES) -> tuple[bool, str]:
        against = " (the served model changed meanwhile; gated again against it)" if regated == "regated" else ""
        if regated == "withdrawn":
            return False, "the served model was withdrawn while this candidate was prepared: not published; restore it to serve it"
        if regated == "changed":
            return False, "the served model changed after this candidate was gated and it could not be gated again: not published"
        if served_dice is None or not serving:
            return True, "no model was served"
        if candidate_dice is None or math.isnan(candidate_dice):
            return False, "no validation figure: a model is published only after validation"
        if gate_cases is not None and int(gate_cases) < min_gate_cases:
            return False, (f"validation Dice {candidate_dice:.4f} (served {served_dice:.4f}) on {int(gate_cases)} validation case(s), "
                           f"fewer than {min_gate_cases}: too few to replace the served model; kept it (submit more final labels, "
                           f"or set --conf min_gate_cases)")
        if candidate_dice >= served_dice:
            return True, f"validation Dice {candidate_dice:.4f} >= served {served_dice:.4f}{against}"
        return False, f"validation Dice {candidate_dice:.4f} < served {served_dice:.4f}: kept the served model{against}"

    def _publish(self, candidate: Path, entries: list[dict], ok: bool, **record) -> dict:
        """Archive, record, then (if ``ok``) serve ``candidate``; fault points between the steps."""
        entry = self._record(candidate, entries, **record)
        fault("model-archived")
        if ok:
            for e in entries:
                e["served"] = e is entry
        self._save_entries(entries)
        fault("model-history-written")
        if ok:
            atomic_copy(self.root / entry["file"], self.served)
            logger.info("%s: now serving version %d (%s)", self.name, entry["version"], record.get("reason"))
            fault("model-published")
        return entry

    # -- withdraw and restore ---------------------------------------------------------------
    def withdraw(self) -> dict:
        """Stop serving the model: its file is archived (if it is not already) and removed from
        the served place; ``restore`` serves it again. Returns its history entry."""
        with self.locked():
            if not self.served.is_file():
                raise FileNotFoundError(f"{self.name}: no model is served ({self.served} does not exist)")
            entries = self._reconcile_locked(self.entries(), "served before withdrawal")
            entry = next(e for e in entries if e.get("served"))
            os.remove(self.served)
            fsync_dir(self.served.parent)
            for e in entries:
                e["served"] = False
            entry["withdrawn"] = now()
            self._save_entries(entries)
            logger.info("%s: withdrawn (version %d kept in the history)", self.name, entry["version"])
            return entry

    def restore(self, version: int) -> dict:
        """Serve the archived model ``version`` again (atomically), after checking its file as an
        upload is checked. Raises :class:`ModelStoreError` (nothing served changes) otherwise."""
        from contourcl.models.checkpoint import check_model_file

        with self.locked():
            entries = self._reconcile_locked(self.entries(), FOUND_SERVED)
            match = [e for e in entries if e["version"] == version]
            if not match:
                raise ModelStoreError(f"{self.name} has no archived version {version}; versions: {[e['version'] for e in entries]}")
            entry = match[-1]
            path = self._archive_path(entry)
            if entry.get("sha256") and sha256_file(path) != entry["sha256"]:
                raise ModelStoreError(f"{self.name} version {version}: {path.name} has changed since it was archived (its sha256 "
                                      "differs from the history's): not served; restore another version or upload a model file")
            try:
                check_model_file(path, self.name)
            except ContourCLError as err:
                raise ModelStoreError(f"{self.name} version {version} cannot be served: {err}; nothing was changed. "
                                      "Restore another version or upload a model file (PUT /model)") from err
            atomic_copy(path, self.served)
            for e in entries:
                e["served"] = e is entry
            entry["restored"] = now()
            self._save_entries(entries)
            logger.info("%s: restored version %d (%s)", self.name, version, entry["file"])
            return entry

    def _archive_path(self, entry: dict) -> Path:
        """The entry's archived file, only when it is a plain ``vNNNN.pt`` in the history folder."""
        name = entry.get("file")
        if archive_version(name) is None:
            raise ModelStoreError(f"{self.name} version {entry.get('version')}: its history entry names {name!r}, not an archived "
                                  f"file vNNNN.pt of {self.root}: refused, nothing was changed (the history may have been edited)")
        path = self.root / name
        if not path.is_file():
            raise ModelStoreError(f"{self.name} version {entry.get('version')}: {path} is missing; restore another version")
        return path


_SERVED_CHECKS: dict[tuple[str, str], tuple[tuple, str | None]] = {}
_SERVED_CHECKS_LOCK = threading.Lock()


def served_file_problem(path: str | Path, model: str) -> str | None:
    """Why the model file at ``path`` cannot be served as ``model`` (it fails
    :func:`~contourcl.models.checkpoint.check_model_file`, the check an upload passes), with
    what to do; ``None`` when it passes or is absent. Cached per file state (inode, size,
    modification time), so ``/info/`` does not load the file each time."""
    from contourcl.models.checkpoint import check_model_file

    path = Path(path)
    try:
        st = path.stat()
    except OSError:
        return None
    state = (st.st_ino, st.st_size, st.st_mtime_ns)
    key = (str(path), model)
    with _SERVED_CHECKS_LOCK:
        cached = _SERVED_CHECKS.get(key)
        if cached and cached[0] == state:
            return cached[1]
        try:
            check_model_file(path, model)
            problem = None
        except Exception as err:  # noqa: BLE001 -- any failure to load is a reason not to serve it
            problem = (f"the served {model} model file {path} cannot be used: {err}. Restore an archived version "
                       f"(contourcl models {model} --restore VERSION) or upload a model file (PUT /model/{model})")
            logger.error("%s", problem)
        _SERVED_CHECKS[key] = (state, problem)
        return problem
