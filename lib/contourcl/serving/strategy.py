"""Active learning: the unlabeled study the model is least sure of, from stored scores.

The strategy never computes anything heavy on the request path: it reads the scores that
:class:`contourcl.serving.scoring.UncertaintyScoring` stored in the background and answers in
milliseconds.
"""

from __future__ import annotations

import logging
import random
from pathlib import Path

from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.strategy import Strategy

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
