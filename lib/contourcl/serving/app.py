"""``ContourApp``: the MONAI Label app base class of ``apps/radonc/main.py``.

The app's ``main.py`` subclasses it with ``configs``, the models of its ``lib/configs/``
(:mod:`contourcl.serving.config`): their names, descriptions and largest-component rules.
"""

from __future__ import annotations

import logging
from pathlib import Path

from fastapi import HTTPException
from monailabel.interfaces.app import MONAILabelApp

from contourcl.effort import summarise_effort
from contourcl.errors import InvalidImageError
from contourcl.ids import check_id
from contourcl.serving.config import ModelConfig
from contourcl.serving.datastore import SafeDatastore
from contourcl.serving.dicom_push import DicomPush
from contourcl.serving.dicomweb import is_dicomweb, open_pacs, study_ids
from contourcl.serving.effort_record import EffortRecord
from contourcl.serving.endpoints import install as install_endpoints
from contourcl.serving.errors import http_errors
from contourcl.serving.infer import ContourInferTask
from contourcl.serving.lifecycle import TrainerBusyError, in_task_subprocess
from contourcl.serving.model_store import ModelStore, min_gate_cases_of
from contourcl.serving.result_format import answer_in
from contourcl.serving.result_format import requested as requested_format
from contourcl.serving.retrain import consider_model_file
from contourcl.serving.scoring import UncertaintyScoring, request_scoring
from contourcl.serving.security import install as install_security
from contourcl.serving.security import status as security_status
from contourcl.serving.series import ingest_series, refused_series
from contourcl.serving.slots import InferenceSlots
from contourcl.serving.strategy import RandomStrategy, UncertaintyStrategy
from contourcl.serving.train import RetrainTask

logger = logging.getLogger(__name__)

def _models(conf: dict, configs: dict[str, ModelConfig]) -> list[str]:
    """The models named by ``--conf models`` (``all``, or a comma-separated list) among ``configs``."""
    value = conf.get("models", "all")
    names = list(configs) if value == "all" else [m.strip() for m in value.split(",") if m.strip()]
    unknown = [m for m in names if m not in configs]
    if unknown:
        raise ValueError(f"--conf models: unknown model(s) {unknown}; known: {list(configs)} or 'all'")
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
    """Serves the models of :attr:`configs` from ``<app_dir>/model`` over a :class:`SafeDatastore`.

    ``--conf`` keys: ``models`` (``all`` or ``oar,gtv``), ``weights`` (a subfolder of
    ``<app_dir>/model`` to serve instead, see :func:`model_dir`), ``<model>_init`` (a pretraining
    checkpoint used when no model file exists yet), ``skip_trainers``, ``skip_strategies``,
    ``skip_scoring``, ``insecure``, ``max_upload_mb``, ``max_model_mb``, ``dicom_export``, ``dicom_push`` and its
    ``dicom_push_*`` keys (:mod:`contourcl.serving.dicom_push`); for
    ``--studies http(s)://.../dicom-web`` (:mod:`contourcl.serving.dicomweb`): ``dicomweb_cache``,
    ``dicomweb_search``, ``dicomweb_refresh_s``, ``dicomweb_timeout_s``, ``dicomweb_import_seg``.
    """

    #: ``{model: config}``, set by the app's ``main.py`` from its ``lib/configs/``
    configs: dict[str, ModelConfig] = {}

    def __init__(self, app_dir, studies, conf, name="ContourCL radonc", description="Auto-contouring of head-and-neck CT"):
        if not self.configs:
            raise ValueError(f"{type(self).__name__} has no model configs: the app's main.py sets configs from its lib/configs/")
        self.model_dir = model_dir(app_dir, conf or {})
        self.models = _models(conf or {}, self.configs)
        self.infer_slots = InferenceSlots.from_conf(conf or {})  # how many inferences run at once
        self.min_gate_cases = min_gate_cases_of(conf or {})  # fewer validation cases never replace a served model
        super().__init__(app_dir=app_dir, studies=studies, conf=conf, name=name, description=description, version="0.1.0")

    def init_datastore(self):
        export = str(self.conf.get("dicom_export", "true")).lower() != "false"
        if is_dicomweb(self.studies):
            # a DICOMweb PACS: mirrored into a local cache folder, a SafeDatastore with every check
            # (contourcl.serving.dicomweb); from here on self.studies is that folder (scores live there)
            self.studies_url = str(self.studies).strip().rstrip("/")
            store = open_pacs(self.studies_url, self.app_dir, self.conf, offline=in_task_subprocess(),
                              extensions=("*.nii.gz", "*.nii", "*.nrrd"), auto_reload=True, dicom_export=export)
            self.studies = str(store.mirror.cache)
            return self._with_effort(store)
        if "://" in str(self.studies):
            raise ValueError(f"--studies {self.studies}: only http:// and https:// DICOMweb servers are supported; "
                             "give such a URL or a local folder (NIfTI/NRRD files, or DICOM CT series in subfolders)")
        self.studies_url = None
        ingest_series(self.studies)  # DICOM CT series in subfolders become images (contourcl.serving.series)
        return self._with_effort(SafeDatastore(self.studies, extensions=("*.nii.gz", "*.nii", "*.nrrd"), auto_reload=True, dicom_export=export))

    def _with_effort(self, store):
        """Every final label stored is scored against the models' proposals (the effort record)."""
        self.effort = EffortRecord(self.studies)
        store.final_label_listeners.append(self.effort.score_final)
        # --conf dicom_push AE@HOST:PORT: each final label's RTSTRUCT sent by C-STORE, in the background (serving.dicom_push)
        self.dicom_push = None if in_task_subprocess() else DicomPush.from_conf(self.conf or {}, store, self.studies)
        if self.dicom_push is not None:
            store.final_label_listeners.append(self.dicom_push.on_final_label)
        return store

    def init_infers(self):
        """``oar`` and ``gtv`` (declared ``deepedit``: clicks) and ``oar_seg``, ``gtv_seg`` (the same
        models declared ``segmentation``: what OHIF's *Auto-Segmentation* lists)."""
        tasks = {m: ContourInferTask(m, self.model_dir / f"{m}.pt", self.configs[m].description, self.configs[m].largest_component,
                                     click_scope=self.configs[m].click_scope) for m in self.models}
        return {**tasks, **{f"{m}_seg": task.automatic() for m, task in tasks.items()}}

    def init_trainers(self):
        if str(self.conf.get("skip_trainers", "false")).lower() == "true":
            return {}
        return {m: RetrainTask(m, self.model_dir, init=self.conf.get(f"{m}_init"), largest_component=self.configs[m].largest_component,
                               min_gate_cases=self.min_gate_cases) for m in self.models}

    def init_strategies(self):
        strategies = {"random": RandomStrategy()}
        if str(self.conf.get("skip_strategies", "false")).lower() != "true":
            for m in self.models:
                strategies[f"{m}_uncertainty"] = UncertaintyStrategy(self._infers[m].contourer, m, self.studies)
        return strategies

    def init_scoring_methods(self):
        # the uncertainty scores behind <model>_uncertainty, computed in MONAI Label's scoring
        # subprocess and stored under <studies>/.contourcl/scores/ (contourcl.serving.scoring)
        skip = any(str(self.conf.get(k, "false")).lower() == "true" for k in ("skip_scoring", "skip_strategies"))
        if skip:
            return {}
        return {f"{m}_uncertainty": UncertaintyScoring(self._infers[m].contourer, m, self.studies) for m in self.models}

    def next_sample(self, request):
        """MONAI Label's next sample, with a 404 naming the strategies for an unknown one, and
        background scoring started only for methods that have unscored images and are not
        already queued (instead of every method after every request).

        A chosen image that is not a usable CT (checked when first chosen, see
        :meth:`SafeDatastore.check_image`) is skipped, with its reason logged and in ``/info/``.
        """
        strategy = request.get("strategy") or "random"
        self.datastore().refresh_studies()  # a DICOMweb PACS: new series, at most every dicomweb_refresh_s
        task = self._strategies.get(strategy)
        if task is None:
            raise HTTPException(404, f"unknown active-learning strategy {strategy!r}; this server has {sorted(self._strategies)}")
        result = {}
        for _ in range(8):  # an image found unusable now is recorded, and the strategy asked again
            with http_errors():
                result = task(request, self.datastore()) or {}
            if not result.get("id") or self.datastore().check_image(result["id"]) is None:
                break
            result = {}
        if result.get("id"):
            result["path"] = self.datastore().get_image_uri(result["id"])
            # the series' DICOM ids: OHIF's panel opens StudyInstanceUIDs=<StudyInstanceUID> (serving.dicomweb)
            result = {**study_ids(self.studies, result["id"], self.studies_url), **result}
        if self._auto_update_scoring:
            request_scoring(self)
        return result

    def info(self):
        """MONAI Label's app info, plus ``"security"``: auth on/off, host, the insecure override
        and its warning, the upload limits (:func:`contourcl.serving.security.status`); and
        ``"unusable_images"``: the studies-folder files found not to be usable CTs, with why; and
        ``"refused_series"``: the DICOM series there that could not become images, with why; and
        ``"studies"``: where the studies are (a folder, or a DICOMweb PACS and its cache folder); and
        ``"background"`` among the labels (Slicer's segment for negative clicks)."""
        self.datastore().refresh_studies()
        meta = super().info()
        # a "background" label: Slicer's MONAI Label module sends the points placed on a segment of
        # that name as a deepedit model's negative clicks (contourcl.clicks); it never saves that segment
        meta["labels"] = [*[n for n in meta.get("labels") or [] if n != "background"], "background"]
        meta["studies"] = self.studies_status()
        meta["security"] = {**security_status(self), **self.infer_slots.status()}
        # images in the studies folder that are not usable CTs: skipped by next-sample and training
        meta["unusable_images"] = {i: e["reason"] for i, e in self.datastore().unusable().items()}
        # DICOM series in the studies folder that could not become images, with why
        meta["refused_series"] = refused_series(self.studies)
        # what the clinicians changed, per model and model version (contourcl.effort.summarise_effort)
        meta["correction_effort"] = summarise_effort(self.effort.latest())
        meta["dicom_push"] = self.dicom_push.status() if self.dicom_push is not None else {}  # {node: last_ok, last_error, pending}
        return meta

    def studies_status(self) -> dict:
        """``{"kind": "folder", "path"}``, or for a DICOMweb PACS its URL, cache folder, last sync
        and exports not yet stored (:meth:`contourcl.serving.dicomweb.PacsDatastore.studies_status`)."""
        store = self.datastore()
        if hasattr(store, "studies_status"):
            return store.studies_status()
        return {"kind": "folder", "path": str(self.studies)}

    def on_init_complete(self):
        """Runs once in the server process (not in the training subprocess), before the first
        request: the server's own safety layer goes on here."""
        from monailabel.app import app as server  # the FastAPI app that uvicorn is serving

        # each step lives in its own module of contourcl.serving. The order matters: the host
        # check refuses an unsafe start before any background job (scoring) is launched, and
        # the security gateway wraps every route, including the ones installed after it
        install_security(server, self)
        install_endpoints(server, self)
        super().on_init_complete()

    # -- request checks the endpoints do not make ---------------------------------------------
    def _trainable(self) -> dict:
        """The served models by name, without their ``_seg`` aliases (which have no file of their own)."""
        return {m: self._infers[m] for m in self.models}

    def _check_model(self, model, tasks: dict) -> None:
        if model not in tasks:
            raise HTTPException(404, f"unknown model {model!r}; this server has {sorted(tasks)}")

    def infer(self, request, datastore=None):
        """Contour a datastore image, or the file uploaded with this very request (its path is
        passed as ``_upload`` by :mod:`contourcl.serving.endpoints`, a key no client can set):
        never any other path on the server.

        A request with clicks refines (:meth:`ContourInferTask.refine`) the label uploaded with it
        (``_label_upload``, set by the endpoint too), else this model's last answer for the image
        (the effort record's proposal, passed as ``_last_answer``), else the automatic contour; its
        answer is kept as the latest proposal like every answer."""
        request = dict(request)
        upload = request.pop("_upload", None)
        request.pop("_last_answer", None)  # the app's to set, below
        request.pop("label_tag", None)
        if request.get("save_label"):
            request["label_tag"] = "original"  # an infer keeps its proposal, never a final label
        self._check_model(request.get("model"), self._infers)
        with http_errors():  # MONAI Label's result_extension/_dtype/_compress; unknown ones: 422 before any work
            result_format = requested_format(request)
        task = self._infers[request["model"]]
        request["model"] = task.model  # oar_seg is oar: one proposal, one effort record
        if not task.is_valid():
            if not task.model_path.is_file():
                raise HTTPException(404, f"model {request['model']!r} has no weights yet ({task.model_path} is missing): submit labels "
                                         "and train it, or see docs/models/ (how the shipped weights are made)")
            raise HTTPException(503, task.unavailable_reason() or f"model {request['model']!r} cannot be used now")  # it says what to do
        image = request.get("image")
        image_id = None
        if not (upload and image == upload):
            with http_errors():
                image_id = check_id(image)
            if image_id not in self.datastore().list_images():
                raise HTTPException(404, f"image {image_id!r} is not in the datastore")
        if image_id and not request.get("_label_upload"):
            # clicks refine this model's last answer for the image (ContourInferTask.refine)
            last = self.effort.proposals(image_id).get(request["model"])
            if last:
                request["_last_answer"] = str(last[0])
        with http_errors():
            try:
                result = super().infer(request, datastore)
            except InvalidImageError as err:  # a CT in the studies folder that cannot be contoured
                if image_id:
                    self.datastore().mark_unusable(image_id, str(err))
                raise
        if image_id and result and result.get("file"):
            # every answer for a datastore image is remembered: the proposal a final label is scored against
            try:
                self.effort.keep_proposal(image_id, request["model"], result["file"], result.get("params") or {}, request)
            except OSError as err:
                logger.warning("the proposal of %s for %s could not be kept: %s", request["model"], image_id, err)
        with http_errors():
            return answer_in(result, result_format)  # e.g. OHIF's NRRD, in its voxel order (serving.result_format)

    # -- the served models: uploads and withdrawal go the way of a retrained model ------------
    def consider_uploaded_model(self, model: str, path) -> dict:
        """Validate, archive, gate and (if not worse) publish a model file a client uploaded."""
        self._check_model(model, self._trainable())
        cases = self.datastore().final_cases()
        return consider_model_file(model, path, ModelStore(self.model_dir, model, self.min_gate_cases), cases, origin="uploaded (PUT /model)",
                                   largest_component=self.configs[model].largest_component)

    def withdraw_model(self, model: str) -> dict:
        """Stop serving ``model`` (``DELETE /model``); its file stays in the history, restorable."""
        self._check_model(model, self._trainable())
        try:
            return ModelStore(self.model_dir, model).withdraw()
        except FileNotFoundError as err:
            raise HTTPException(404, str(err)) from err

    def bundle_path(self, model):
        # called by the /train and /batch/infer endpoints before they start their subprocess:
        # the one place to refuse an unknown model with a clear error
        if model is not None:
            self._check_model(model, {**self._infers, **self._trainers})
            if model in self._trainers:
                try:  # a trainer of this model still runs (or an orphan of a killed server): refuse now
                    self._trainers[model].lock().check()
                except TrainerBusyError as err:
                    raise HTTPException(409, str(err)) from err
        return None
