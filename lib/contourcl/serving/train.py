"""The retraining task behind ``POST /train/oar`` and ``/train/gtv``.

MONAI Label runs it in a subprocess of the server. That subprocess ends with the server
(:func:`contourcl.serving.lifecycle.die_with_parent`), and holds the model's training lock
(:class:`contourcl.serving.lifecycle.TrainLock`) while it trains: a second trainer of the same
model, started next to a running or orphaned one, fails at once naming the pid that holds it.
"""

from __future__ import annotations

import logging
from pathlib import Path

from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.train import TrainTask

from contourcl.serving.lifecycle import (
    TrainLock,
    die_with_parent,
    in_task_subprocess,
    note_server_process,
)
from contourcl.serving.model_store import MIN_GATE_CASES, ModelStore
from contourcl.serving.retrain import DEFAULTS, retrain, served_summary

logger = logging.getLogger(__name__)


class RetrainTask(TrainTask):
    """Fine-tunes the served model on every ``final`` label and publishes it only if not worse."""

    def __init__(self, model: str, model_dir: str | Path, init: str | None = None, largest_component: bool = True,
                 min_gate_cases: int = MIN_GATE_CASES):
        super().__init__(f"Fine-tune the {model} model on the submitted final labels; the new model is served only if its validation Dice is not lower")
        self.model = model
        self.store = ModelStore(model_dir, model, min_gate_cases)
        self.init = init
        self.largest_component = largest_component  # the model config's rule, for files without one
        note_server_process()  # in the server: its pid, for the training subprocess to watch

    def config(self):
        return dict(DEFAULTS)

    def stats(self):
        return served_summary(self.store)

    def lock(self) -> TrainLock:
        """The lock held while this model trains: ``<model_dir>/history/<model>/train.lock``."""
        return self.store.train_lock()

    def __call__(self, request, datastore: Datastore):
        if in_task_subprocess():  # not when the server runs it in-process (run_sync)
            die_with_parent()
        request = {k: v for k, v in request.items() if k in DEFAULTS}
        with self.lock():
            result = retrain(self.model, datastore.final_cases(), self.store, request, init=self.init, progress=False, largest_component=self.largest_component)
        logger.info("retrain %s finished: %s", self.model, result["reason"])
        return result
