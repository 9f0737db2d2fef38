"""The ``oar`` and ``gtv`` inference tasks."""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from monailabel.interfaces.tasks.infer_v2 import InferTask, InferType

from contourcl.data.labels import model_labels
from contourcl.inference import Contourer


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
        self.contourer = Contourer(self.model_path, device=device, largest_component=largest_component)

    def is_valid(self) -> bool:
        return self.contourer.is_available()

    def get_path(self, validate=True):
        return str(self.model_path) if (self.model_path.is_file() or not validate) else None

    def __call__(self, request, callbacks=None):
        asked = request.get("largest_component")
        override = None if asked is None else str(asked).lower() in ("1", "true", "yes")
        prediction = self.contourer(request["image"], largest_component=override)
        out = tempfile.NamedTemporaryFile(suffix=".nii.gz", prefix=f"{self.model}_", delete=False).name
        prediction.save(out)
        t = prediction.timings
        return out, {
            "label_names": prediction.labels,
            "model": self.model,
            "model_version": prediction.model_version,
            "latencies": {"pre": round(t["pre"], 2), "infer": round(t["infer"], 2), "invert": round(t["invert"], 2), "total": round(t["total"], 2)},
        }
