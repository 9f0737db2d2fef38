"""Uncertainty scores of the unlabeled CTs, computed off the request path and stored on disk.

MONAI Label runs scoring methods in a subprocess of the server (``app.async_scoring``: at start,
after each next-sample request and after each training, while ``MONAI_LABEL_AUTO_UPDATE_SCORING``
is on, the default). :class:`UncertaintyScoring` computes the Monte-Carlo-dropout entropy
(:func:`contourcl.active_learning.mc_dropout_entropy`) of every unlabeled image that has no score
for the model file being served, and stores it in ``<studies>/.contourcl/scores/<model>.json``::

    {"model": "oar", "updated": "...",
     "images": {"<image id>": {"version": "<model version>", "mtime_ns": ..., "size": ...,
                               "score": 0.61, "time": "..."},
                "<bad image>": {"version": ..., "mtime_ns": ..., "size": ..., "error": "...", ...}}}

An entry is current while the model version and the image file's modification time and size
are unchanged. An image that cannot be scored (unreadable, a score that is not a finite number)
gets an ``error`` entry and the others are scored. The file is replaced atomically after each
image (temporary file + ``os.replace``), so a reader never sees half of it and a stopped run
keeps what it scored. The active-learning strategy (:mod:`contourcl.serving.strategy`) only reads
this file.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path

from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.scoring import ScoringMethod

from contourcl.active_learning import mc_dropout_entropy
from contourcl.files import atomic_write_text
from contourcl.inference import Contourer, model_version
from contourcl.serving.lifecycle import (
    TrainerBusyError,
    TrainLock,
    die_with_parent,
    in_task_subprocess,
    note_server_process,
)

logger = logging.getLogger(__name__)

SCORES_DIR = Path(".contourcl") / "scores"


def scores_path(studies: str | Path, model: str) -> Path:
    """``<studies>/.contourcl/scores/<model>.json``."""
    return Path(studies) / SCORES_DIR / f"{model}.json"


def read_scores(path: str | Path) -> dict:
    """The stored scores file (``{"images": {}}`` when it is missing or unreadable)."""
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        return {"images": {}}
    except (OSError, ValueError) as err:
        logger.warning("ignoring unreadable scores file %s: %s", path, err)
        return {"images": {}}
    if not isinstance(data, dict) or not isinstance(data.get("images"), dict):
        return {"images": {}}
    return data


def write_scores(path: str | Path, data: dict) -> None:
    """Replace the scores file atomically (a temporary file in the same folder + ``os.replace``)."""
    atomic_write_text(path, json.dumps(data, indent=1, sort_keys=True, allow_nan=False))


def image_state(uri: str | Path | None) -> dict:
    """The image file's modification time (ns) and size; ``None`` values when it is missing."""
    try:
        st = os.stat(uri) if uri else None
    except OSError:
        st = None
    return {"mtime_ns": st.st_mtime_ns if st else None, "size": st.st_size if st else None}


def is_current(entry: dict | None, version: str, state: dict) -> bool:
    """True when ``entry`` was made with model ``version`` on the image file as it is now."""
    return (
        isinstance(entry, dict)
        and entry.get("version") == version
        and entry.get("mtime_ns") == state["mtime_ns"]
        and entry.get("size") == state["size"]
    )


def current_scores(datastore: Datastore, image_ids: list[str], path: str | Path, version: str) -> tuple[dict[str, float], dict[str, str]]:
    """Of ``image_ids``: ``({id: score}, {id: error})`` of the entries current for ``version``."""
    stored = read_scores(path)["images"]
    scores, errors = {}, {}
    for image_id in image_ids:
        entry = stored.get(image_id)
        if not isinstance(entry, dict) or entry.get("version") != version:
            continue  # cheap test first: no stat for images never scored under this version
        if not is_current(entry, version, image_state(datastore.get_image_uri(image_id))):
            continue
        if "error" in entry:
            errors[image_id] = str(entry["error"])
        elif isinstance(entry.get("score"), (int, float)):
            scores[image_id] = float(entry["score"])
    return scores, errors


class UncertaintyScoring(ScoringMethod):
    """Scores the unlabeled images of the datastore under the served ``model`` (see module doc)."""

    def __init__(self, contourer: Contourer, model: str, studies: str | Path, passes: int = 4, max_slices: int = 24):
        super().__init__(f"Monte-Carlo-dropout entropy of each unlabeled CT under the served {model} model (stored for the {model}_uncertainty strategy)")
        self.contourer = contourer
        self.model = model
        self.path = scores_path(studies, model)
        self.passes = passes
        self.max_slices = max_slices
        note_server_process()  # in the server: its pid, for the scoring subprocess to watch

    def version(self) -> str | None:
        """The served model file's version, or ``None`` when there is no model file."""
        try:
            return model_version(self.contourer.model_path)
        except OSError:
            return None

    def pending(self, datastore: Datastore) -> list[str]:
        """Unlabeled images without a current entry (cheap: reads the file and stats images)."""
        version = self.version()
        if version is None:
            return []
        stored = read_scores(self.path)["images"]
        return [
            i for i in datastore.get_unlabeled_images()
            if not is_current(stored.get(i), version, image_state(datastore.get_image_uri(i)))
        ]

    def _score(self, uri: str) -> float:
        score = mc_dropout_entropy(self.contourer, uri, passes=self.passes, max_slices=self.max_slices)
        if not math.isfinite(score):
            raise ValueError(f"the uncertainty score is not a finite number ({score})")
        return float(score)

    def __call__(self, request, datastore: Datastore):
        if in_task_subprocess():
            die_with_parent()  # a scoring run ends with the server that started it
        if not self.contourer.is_available():
            return {"model": self.model, "skipped": f"no model file {self.contourer.model_path}"}
        try:
            lock = TrainLock(self.path.with_name(f"{self.model}.lock"), f"the {self.model} scores", role="scoring run").acquire()
        except TrainerBusyError as err:
            logger.info("%s", err)
            return {"model": self.model, "skipped": str(err)}
        try:
            return self._run(datastore)
        finally:
            lock.release()

    def _run(self, datastore: Datastore) -> dict:
        t0 = time.perf_counter()
        data = read_scores(self.path)
        known = set(datastore.list_images())
        images = {k: v for k, v in data["images"].items() if k in known}  # forget removed images
        todo = []
        for image_id in sorted(datastore.get_unlabeled_images()):
            uri = datastore.get_image_uri(image_id)
            state = image_state(uri)
            entry = images.get(image_id)
            if not is_current(entry, self.version(), state):
                todo.append((entry is not None, image_id, uri, state))
        todo.sort()  # images never scored first, then those scored under an earlier model
        scored, failed = 0, 0
        for _, image_id, uri, state in todo:
            version = self.version()  # before: an entry is never newer than the model it used
            if version is None:
                break
            record = {"version": version, **state, "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
            try:
                if state["size"] is None:
                    raise FileNotFoundError(f"image file {uri!r} is missing")
                record["score"] = self._score(uri)
                scored += 1
            except Exception as err:  # one bad CT must not stop the scoring of the others
                logger.warning("%s uncertainty: cannot score %s: %s", self.model, image_id, err)
                record["error"] = f"{type(err).__name__}: {err}"
                failed += 1
            images[image_id] = record
            data.update(model=self.model, updated=record["time"], images=images)
            write_scores(self.path, data)
        if not todo:
            data.update(model=self.model, images=images)
            if images != read_scores(self.path)["images"]:
                write_scores(self.path, data)
        result = {"model": self.model, "version": self.version(), "scored": scored, "errors": failed,
                  "unchanged": len(datastore.get_unlabeled_images()) - len(todo), "seconds": round(time.perf_counter() - t0, 2),
                  "path": str(self.path)}
        logger.info("%s uncertainty scoring: %s", self.model, result)
        return result


def request_scoring(app) -> list[str]:
    """Start (in MONAI Label's scoring subprocess) the scoring methods of ``app`` that have
    unlabeled images to score and are not already queued or running. Returns their names.

    Called after a next-sample request instead of MONAI Label's "every method, every time".
    Never raises: a failure to start scoring is logged, the request is still answered.
    """
    from monailabel.utils.async_tasks.utils import tasks

    busy = {t.get("request", {}).get("method") for t in tasks("scoring") if t.get("status") in ("SUBMITTED", "RUNNING")}
    started = []
    for name, method in getattr(app, "_scoring_methods", {}).items():
        try:
            if name in busy or (hasattr(method, "pending") and not method.pending(app.datastore())):
                continue
            app.async_scoring(name)
            started.append(name)
        except Exception as err:
            logger.warning("could not start scoring %s: %s", name, err)
    return started
