"""The retraining task behind ``POST /train/oar`` and ``/train/gtv``."""

from __future__ import annotations

import logging
from pathlib import Path

from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.train import TrainTask

from contourcl.model_store import ModelStore
from contourcl.retrain import DEFAULTS, retrain, served_summary

logger = logging.getLogger(__name__)


class RetrainTask(TrainTask):
    """Fine-tunes the served model on every ``final`` label and publishes it only if not worse."""

    def __init__(self, model: str, model_dir: str | Path, init: str | None = None):
        super().__init__(f"Fine-tune the {model} model on the submitted final labels; the new model is served only if its validation Dice is not lower")
        self.model = model
        self.store = ModelStore(model_dir, model)
        self.init = init

    def config(self):
        return dict(DEFAULTS)

    def stats(self):
        return served_summary(self.store)

    def __call__(self, request, datastore: Datastore):
        request = {k: v for k, v in request.items() if k in DEFAULTS}
        cases = []
        for image_id in datastore.get_labeled_images("final"):
            cases.append({"id": image_id, "image": datastore.get_image_uri(image_id), "label": datastore.get_label_uri(image_id, "final")})
        result = retrain(self.model, cases, self.store, request, init=self.init, progress=False)
        logger.info("retrain %s finished: %s", self.model, result["reason"])
        return result
