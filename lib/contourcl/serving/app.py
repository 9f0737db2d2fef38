"""``ContourApp``: the MONAI Label app base class that ``apps/radonc/main.py`` instantiates."""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

from fastapi import HTTPException
from monailabel.interfaces.app import MONAILabelApp
from monailabel.tasks.activelearning.random import Random

from contourcl.ids import check_id
from contourcl.labels import MODEL_LABELS
from contourcl.serving.datastore import SafeDatastore
from contourcl.serving.endpoints import install as install_endpoints
from contourcl.serving.errors import http_errors
from contourcl.serving.infer import ContourInferTask
from contourcl.serving.security import install as install_security
from contourcl.serving.strategy import MCDropoutEntropy
from contourcl.serving.train import RetrainTask

logger = logging.getLogger(__name__)

DESCRIPTIONS = {
    "oar": "Organs at risk of the head and neck (TG-263 names), 2D U-Net on axial slices",
    "gtv": "Tumour target (trained on PTV70 where no GTV exists), 2D U-Net on axial slices",
}


def _models(conf: dict) -> list[str]:
    """The models named by ``--conf models`` (``all``, or a comma-separated list)."""
    value = conf.get("models", "all")
    names = list(MODEL_LABELS) if value == "all" else [m.strip() for m in value.split(",") if m.strip()]
    unknown = [m for m in names if m not in MODEL_LABELS]
    if unknown:
        raise ValueError(f"--conf models: unknown model(s) {unknown}; known: {list(MODEL_LABELS)} or 'all'")
    return names


def model_dir(app_dir: str | Path, conf: dict) -> Path:
    """The folder of served model files: ``<app_dir>/model``, or ``<app_dir>/model/<weights>``
    for ``--conf weights NAME`` (``synthetic``: the weights trained on the synthetic phantoms of
    ``sample-data``, for the offline demo)."""
    base = Path(app_dir) / "model"
    name = str(conf.get("weights", "") or "").strip()
    if name in ("", "default", "openkbp"):
        return base
    check_id(name, "--conf weights")
    folder = base / name
    if not (folder / "oar.pt").is_file() and not (folder / "gtv.pt").is_file():
        known = sorted(p.name for p in base.iterdir() if p.is_dir() and any(p.glob("*.pt"))) if base.is_dir() else []
        raise ValueError(f"--conf weights {name!r}: no model files in {folder}; choose the default or one of {known}")
    return folder


class ContourApp(MONAILabelApp):
    """Serves the ``oar``/``gtv`` models of ``<app_dir>/model`` over a :class:`SafeDatastore`.

    ``--conf`` keys: ``models`` (``all`` or ``oar,gtv``), ``weights`` (a subfolder of
    ``<app_dir>/model`` to serve instead, see :func:`model_dir`), ``<model>_init`` (a pretraining
    checkpoint used when no model file exists yet), ``skip_trainers``, ``skip_strategies``.
    """

    def __init__(self, app_dir, studies, conf, name="ContourCL radonc", description="Auto-contouring of head-and-neck CT"):
        self.model_dir = model_dir(app_dir, conf or {})
        self.models = _models(conf or {})
        super().__init__(app_dir=app_dir, studies=studies, conf=conf, name=name, description=description, version="0.1.0")

    def init_datastore(self):
        return SafeDatastore(self.studies, extensions=("*.nii.gz", "*.nii", "*.nrrd"), auto_reload=True)

    def init_infers(self):
        return {m: ContourInferTask(m, self.model_dir / f"{m}.pt", DESCRIPTIONS[m], largest_component=(m == "oar")) for m in self.models}

    def init_trainers(self):
        if str(self.conf.get("skip_trainers", "false")).lower() == "true":
            return {}
        return {m: RetrainTask(m, self.model_dir, init=self.conf.get(f"{m}_init")) for m in self.models}

    def init_strategies(self):
        strategies = {"random": Random()}
        if str(self.conf.get("skip_strategies", "false")).lower() != "true":
            for m in self.models:
                strategies[f"{m}_uncertainty"] = MCDropoutEntropy(self._infers[m].contourer, m)
        return strategies

    def init_scoring_methods(self):
        return {}

    def on_init_complete(self):
        """Runs once in the server process (not in the training subprocess), before the first
        request: the server's own safety layer goes on here."""
        super().on_init_complete()
        from monailabel.app import app as server  # the FastAPI app that uvicorn is serving

        # each step lives in its own module of contourcl.serving; the order matters: the
        # security gateway must wrap every route, including the ones installed after it
        install_security(server, self)
        install_endpoints(server, self)

    # -- request checks the endpoints do not make ---------------------------------------------
    def _check_model(self, model, tasks: dict) -> None:
        if model not in tasks:
            raise HTTPException(404, f"unknown model {model!r}; this server has {sorted(tasks)}")

    def infer(self, request, datastore=None):
        self._check_model(request.get("model"), self._infers)
        task = self._infers[request["model"]]
        if not task.is_valid():
            raise HTTPException(404, f"model {request['model']!r} has no weights yet ({task.model_path} is missing): submit labels and train it, or see README 'Shipped weights'")
        image = request.get("image")
        if isinstance(image, str):
            uploaded = os.path.isfile(image) and Path(image).resolve().parent == Path(tempfile.gettempdir()).resolve()
            if not uploaded:
                with http_errors():
                    check_id(image)
                if image not in self.datastore().list_images():
                    raise HTTPException(404, f"image {image!r} is not in the datastore")
        with http_errors():
            return super().infer(request, datastore)

    def bundle_path(self, model):
        # called by the /train and /batch/infer endpoints before they start their subprocess:
        # the one place to refuse an unknown model with a clear error
        if model is not None:
            self._check_model(model, {**self._infers, **self._trainers})
        return None
