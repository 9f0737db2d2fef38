"""The ``oar`` and ``gtv`` inference tasks.

A served model file that cannot be used (truncated by a full disk, edited, NaN weights) never
stops the server: the task is not valid (``is_valid()`` is False, ``unavailable_reason()`` says
why and what to do), the uncertainty scoring skips it, and an inference request answers
:class:`ServedModelError` naming the file instead of a 500.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import torch
from monailabel.interfaces.tasks.infer_v2 import InferTask, InferType

from contourcl.data.labels import model_labels
from contourcl.errors import ContourCLError
from contourcl.inference import Contourer
from contourcl.serving.lifecycle import in_task_subprocess
from contourcl.serving.model_store import ModelStore, served_file_problem

logger = logging.getLogger(__name__)


class ServedModelError(ContourCLError):
    """The served model file cannot be used (it does not pass the model check)."""


class ServedContourer(Contourer):
    """A :class:`Contourer` of the served file that is available only when the file passes the
    model check (:func:`~contourcl.serving.model_store.served_file_problem`, cached per file
    state), so scoring and strategies skip a broken file instead of failing on it."""

    def __init__(self, model: str, model_path: str | Path, **kwargs):
        super().__init__(model_path, **kwargs)
        self.model_name = model

    def problem(self) -> str | None:
        return served_file_problem(self.model_path, self.model_name)

    def is_available(self) -> bool:
        return self.model_path.is_file() and self.problem() is None

    def model(self):
        problem = self.problem()
        if problem:
            raise ServedModelError(problem)
        return super().model()


class ContourInferTask(InferTask):
    """Runs :class:`contourcl.inference.Contourer` on a datastore image (or an uploaded file).

    The result's params carry ``model_version`` (the served file's state), so a client can
    tell which model answered. ``largest_component`` is the rule for model files that do not
    record one; a request's ``largest_component`` overrides both.
    """

    def __init__(self, model: str, model_path: str | Path, description: str, largest_component: bool = True):
        super().__init__(
            type=InferType.SEGMENTATION,
            labels=model_labels(model),
            dimension=3,
            description=description,
            config={"largest_component": largest_component},
        )
        self.model = model
        self.model_path = Path(model_path)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        # loads nothing yet: a broken file cannot stop the server here
        self.contourer = ServedContourer(model, self.model_path, device=device, largest_component=largest_component)
        if not in_task_subprocess():
            reconcile_at_startup(model, self.model_path.parent)

    def is_valid(self) -> bool:
        """True when the served file exists and passes the model check (see :meth:`unavailable_reason`)."""
        return self.contourer.is_available()

    def unavailable_reason(self) -> str | None:
        """Why this model cannot contour now, with what to do; ``None`` when it can."""
        if not self.model_path.is_file():
            return (f"model {self.model!r} has no weights yet ({self.model_path} is missing): submit labels and train it, "
                    f"restore an archived version (contourcl models {self.model} --restore VERSION) or upload one (PUT /model/{self.model})")
        return self.contourer.problem()

    def get_path(self, validate=True):
        return str(self.model_path) if (self.model_path.is_file() or not validate) else None

    def __call__(self, request, callbacks=None):
        asked = request.get("largest_component")
        override = None if asked is None else str(asked).lower() in ("1", "true", "yes")
        reason = self.unavailable_reason()
        if reason:
            raise ServedModelError(reason)
        prediction = self.contourer(request["image"], largest_component=override)
        with tempfile.NamedTemporaryFile(suffix=".nii.gz", prefix=f"{self.model}_", delete=False) as f:
            out = f.name
        prediction.save(out)
        t = prediction.timings
        return out, {
            "label_names": prediction.labels,
            "model": self.model,
            "model_version": prediction.model_version,
            "latencies": {"pre": round(t["pre"], 2), "infer": round(t["infer"], 2), "invert": round(t["invert"], 2), "total": round(t["total"], 2)},
        }


def reconcile_at_startup(model: str, model_dir: Path) -> None:
    """Repair the model's history after an interrupted publish (:meth:`ModelStore.reconcile`),
    once, when the server starts; a failure is logged, never fatal."""
    try:
        notes = ModelStore(model_dir, model).reconcile()
    except Exception:  # a read-only or broken model folder must not stop the server
        logger.exception("%s: the model history could not be checked at start-up", model)
        return
    if notes:
        logger.warning("%s: model history repaired at start-up: %s", model, "; ".join(notes))
