"""Active learning: the unlabeled study the model is least sure of."""

from __future__ import annotations

import logging
import random

from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.strategy import Strategy

from contourcl.active_learning import mc_dropout_entropy
from contourcl.inference import Contourer

logger = logging.getLogger(__name__)


class MCDropoutEntropy(Strategy):
    """Scores up to ``max_candidates`` unlabeled studies with MC-dropout entropy, returns the highest.

    Scores are cached per (study, model version), so asking again is cheap until the model
    is retrained.
    """

    def __init__(self, contourer: Contourer, model: str, max_candidates: int = 16):
        super().__init__(f"Uncertainty: the unlabeled CT with the highest MC-dropout entropy under the {model} model")
        self.contourer = contourer
        self.model = model
        self.max_candidates = max_candidates
        self._cache: dict[tuple[str, str], float] = {}

    def __call__(self, request, datastore: Datastore):
        images = datastore.get_unlabeled_images(request.get("label_tag"), request.get("labels"))
        if not images or not self.contourer.is_available():
            return None
        version = self.contourer.model()[0]
        candidates = images if len(images) <= self.max_candidates else random.sample(images, self.max_candidates)
        scores = {}
        for image_id in candidates:
            key = (image_id, version)
            if key not in self._cache:
                self._cache[key] = mc_dropout_entropy(self.contourer, datastore.get_image_uri(image_id))
            scores[image_id] = self._cache[key]
        best = max(scores, key=scores.get)
        logger.info("%s uncertainty: %s", self.model, {k: round(v, 4) for k, v in sorted(scores.items(), key=lambda kv: -kv[1])})
        return {"id": best, "score": scores[best], "scores": scores}
