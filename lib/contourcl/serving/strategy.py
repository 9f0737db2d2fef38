"""Active learning: the unlabeled study the model is least sure of, from stored scores.

The strategy never computes anything heavy on the request path: it reads the scores that
:class:`contourcl.serving.scoring.UncertaintyScoring` stored in the background and answers in
milliseconds.
"""

from __future__ import annotations

import logging
import random
import time
from pathlib import Path

from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.strategy import Strategy
from monailabel.tasks.activelearning.random import Random

from contourcl.inference import Contourer, model_version
from contourcl.serving.scoring import current_scores, scores_path

logger = logging.getLogger(__name__)


class UncertaintyStrategy(Strategy):
    """The unlabeled CT with the highest stored MC-dropout entropy under the served ``model``.

    Only scores made with the model file being served now count. When no unlabeled CT has one
    yet (the model was just retrained, or scoring has not finished), a random unlabeled CT is
    returned with ``"score": null`` and a ``reason``.
    """

    def __init__(self, contourer: Contourer, model: str, studies: str | Path):
        super().__init__(f"Uncertainty: the unlabeled CT with the highest MC-dropout entropy under the {model} model (scored in the background)")
        self.contourer = contourer
        self.model = model
        self.path = scores_path(studies, model)

    def __call__(self, request, datastore: Datastore):
        images = datastore.get_unlabeled_images(request.get("label_tag"), request.get("labels"))
        if not images:
            return None
        try:
            version = model_version(self.contourer.model_path)
        except OSError:
            version = None
        scores, errors = current_scores(datastore, images, self.path, version) if version else ({}, {})
        if scores:
            best = max(sorted(scores), key=scores.get)
            return {"id": best, "score": scores[best], "model_version": version, "scored": len(scores),
                    "unscored": len(images) - len(scores) - len(errors), "unscorable": len(errors)}
        if version is None:
            reason = f"the {self.model} model has no weights yet ({self.contourer.model_path} is missing)"
        else:
            reason = (f"no unlabeled CT has an uncertainty score for the served {self.model} model yet "
                      f"(scoring runs in the background; {len(errors)} of {len(images)} could not be scored)")
        choice = random.choice(images)
        logger.info("%s_uncertainty: %s; random choice %s", self.model, reason, choice)
        return {"id": choice, "score": None, "model_version": version, "reason": f"{reason}: a random unlabeled CT was chosen"}


class RandomStrategy(Random):
    """MONAI Label's ``random``: an unlabeled CT, the longer since it was last offered the likelier.

    MONAI Label weights each CT by the seconds since it was offered, so when every candidate was
    offered within the current second all weights are 0 and ``random.choices`` raises ("Total of
    weights must be greater than zero"): two quick *Next Sample* clicks answered 500. Here each
    weight is at least 1 second.
    """

    def __call__(self, request, datastore: Datastore):
        images = datastore.get_unlabeled_images(request.get("label_tag"), request.get("labels"))
        if not images:
            return None
        strategy = request.get("strategy", "random")
        now = int(time.time())
        weights = [max(1, now - datastore.get_image_info(i).get("strategy", {}).get(strategy, {}).get("ts", 0)) for i in images]
        image = random.choices(images, weights=weights)[0]
        logger.info("random: %s (weight %d of %d)", image, weights[images.index(image)], sum(weights))
        return {"id": image, "weight": weights[images.index(image)]}
