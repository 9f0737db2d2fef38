"""The ``oar`` and ``gtv`` inference tasks.

An infer request that carries clicks (:mod:`contourcl.clicks`: Slicer's DeepEdit form or DeepGrow's)
refines the current contour instead (:meth:`ContourInferTask.refine`); the tasks are declared
``deepedit`` so that Slicer's MONAI Label module and OHIF show their point tools, and a request with
no point still answers the automatic contour. Each model is also served as ``<model>_seg``
(:meth:`ContourInferTask.automatic`), declared ``segmentation``, the same model and file: OHIF's
panel lists only ``segmentation`` models under *Auto-Segmentation*, and only ``deepedit`` ones
under *Point Prompts* (MONAI Label's radiology app pairs ``deepedit`` and ``deepedit_seg`` alike).

A served model file that cannot be used (truncated by a full disk, edited, NaN weights) never
stops the server: the task is not valid (``is_valid()`` is False, ``unavailable_reason()`` says
why and what to do), the uncertainty scoring skips it, and an inference request answers
:class:`ServedModelError` naming the file instead of a 500.
"""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from monailabel.interfaces.tasks.infer_v2 import InferTask, InferType

from contourcl.clicks import Clicks, merge_structure, parse_clicks
from contourcl.data.labels import model_labels
from contourcl.data.volumes import check_label_geometry, read_ct, read_volume, write_label
from contourcl.errors import ContourCLError, InvalidClickError, LabelMismatchError
from contourcl.inference import Contourer, model_version
from contourcl.refine.encoding import ClickScope
from contourcl.refine.plain_edit import PlainEdit
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


class NetworkRefinement:
    """The shipped refinement network (:class:`contourcl.refine.refiner.Refiner`) as a refinement
    method: ``name`` and ``describe()`` (its provenance, in ``/info/``)."""

    name = "refinement network"

    def __init__(self, path: Path):
        from contourcl.refine.refiner import Refiner

        self.path = path
        self.refiner = Refiner.from_file(path)

    def __call__(self, ct, affine, mask, positive, negative, edit_radius_mm=None, reach_mm=None):
        return self.refiner(ct, affine, mask, positive, negative, edit_radius_mm=edit_radius_mm, reach_mm=reach_mm)

    def describe(self, edit_radius_mm: float | None = None, reach_mm: float | None = None) -> dict:
        """Its provenance, and how far a model's clicks act (``edit_radius_mm``, ``reach_mm``, else the file's)."""
        keep = ("data", "steps", "seconds_trained", "date", "git_commit", "init")
        provenance = {k: v for k, v in self.refiner.meta.provenance.items() if k in keep}
        radius, reach = self.refiner.scope(edit_radius_mm, reach_mm)
        return {"method": self.name, "file": self.path.name, "version": model_version(self.path), **provenance,
                "edit_radius_mm": radius, "reach_mm": reach}


_REFINERS: dict[Path, tuple[str, object]] = {}  # refine.pt -> (its model_version, the method or the reason it is unusable)


def refiner_for(model_dir: str | Path):
    """The refinement method of the models in ``model_dir``: ``method(ct, affine, mask, positive,
    negative) -> mask`` with a ``name`` (reported as ``refined_by``) and ``describe()`` (in
    ``/info/``). The refinement network when ``model_dir`` holds a usable ``refine.pt`` (loaded
    once per file state), else the plain edit (:class:`contourcl.refine.plain_edit.PlainEdit`);
    a ``refine.pt`` that cannot be loaded is logged once, and the plain edit answers."""
    weights = Path(model_dir) / "refine.pt"
    if not weights.is_file():
        return PlainEdit()
    version = model_version(weights)
    cached = _REFINERS.get(weights)
    if cached is None or cached[0] != version:
        try:
            cached = (version, NetworkRefinement(weights))
        except Exception as err:  # noqa: BLE001 -- a broken file must not take clicks down
            logger.warning("%s cannot be used (%s): the plain edit answers clicks", weights, err)
            cached = (version, str(err))
        _REFINERS[weights] = cached
    return cached[1] if isinstance(cached[1], NetworkRefinement) else PlainEdit()


class ContourInferTask(InferTask):
    """Runs :class:`contourcl.inference.Contourer` on a datastore image (or an uploaded file).

    The result's params carry ``model_version`` (the served file's state), so a client can
    tell which model answered. ``largest_component`` is the rule for model files that do not
    record one; a request's ``largest_component`` overrides both.

    A request with clicks is answered by :meth:`refine`. The app passes what it knows as keys no
    client can set: ``_label_upload`` (the label file uploaded with the request) and
    ``_last_answer`` (this model's last answer for the datastore image, from the effort record).
    """

    def __init__(self, model: str, model_path: str | Path, description: str, largest_component: bool = True,
                 infer_type: str = InferType.DEEPEDIT, contourer: ServedContourer | None = None, click_scope: ClickScope | None = None):
        super().__init__(
            type=infer_type,  # deepedit: Slicer and OHIF show their point tools; no points: the automatic contour
            labels=model_labels(model),
            dimension=3,
            description=description,
            config={"largest_component": largest_component},
        )
        self.model = model
        self.model_path = Path(model_path)
        self.click_scope = click_scope or ClickScope()  # the model config's; None fields: the refinement file's
        if contourer is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
            # loads nothing yet: a broken file cannot stop the server here
            contourer = ServedContourer(model, self.model_path, device=device, largest_component=largest_component)
            if not in_task_subprocess():
                reconcile_at_startup(model, self.model_path.parent)
        self.contourer = contourer

    def automatic(self) -> ContourInferTask:
        """The same model declared ``segmentation`` (served as ``<model>_seg``): one contourer, one
        file, one answer; OHIF's *Auto-Segmentation* lists it (clicks are answered as by this task)."""
        return ContourInferTask(self.model, self.model_path, f"{self.description} (automatic contours)",
                                self._config["largest_component"], infer_type=InferType.SEGMENTATION, contourer=self.contourer,
                                click_scope=self.click_scope)

    def is_valid(self) -> bool:
        """True when the served file exists and passes the model check (see :meth:`unavailable_reason`)."""
        return self.contourer.is_available()

    def unavailable_reason(self) -> str | None:
        """Why this model cannot contour now, with what to do; ``None`` when it can."""
        if not self.model_path.is_file():
            return (f"model {self.model!r} has no weights yet ({self.model_path} is missing): submit labels and train it, "
                    f"restore an archived version (contourcl models {self.model} --restore VERSION) or upload one (PUT /model/{self.model})")
        return self.contourer.problem()

    def info(self):
        """MONAI Label's task info, plus ``refine``: the method that answers clicks."""
        return {**super().info(), "refine": refiner_for(self.model_path.parent).describe(**self.click_scope.kwargs())}

    def get_path(self, validate=True):
        return str(self.model_path) if (self.model_path.is_file() or not validate) else None

    def __call__(self, request, callbacks=None):
        asked = request.get("largest_component")
        override = None if asked is None else str(asked).lower() in ("1", "true", "yes")
        reason = self.unavailable_reason()
        if reason:
            raise ServedModelError(reason)
        labels = model_labels(self.model)
        clicks = parse_clicks(request, self.model, labels)
        if clicks is not None:
            return self.refine(request, clicks, labels, override)
        if request.get("_label_upload"):  # a label uploaded with no point: checked; the automatic contour answers
            ct, affine = read_ct(request["image"])
            self._uploaded_label(request["_label_upload"], ct, affine, labels)
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

    def refine(self, request: dict, clicks: Clicks, labels: dict[str, int], largest_component: bool | None = None):
        """The starting contour refined by ``clicks``: only the structures the clicks name change
        (:meth:`Clicks.targets`, :func:`contourcl.clicks.merge_structure`).

        The starting contour, in order: the label uploaded with the request (in the model's
        numbering, on the image's grid), this model's last answer for the image, the automatic
        contour. Raises :class:`InvalidClickError` / :class:`LabelMismatchError` (422) before
        anything is computed for a point outside the image or an upload that does not fit.
        """
        t0 = time.perf_counter()
        ct, affine = read_ct(request["image"])
        upload = self._uploaded_label(request.get("_label_upload"), ct, affine, labels)
        clicks.check_inside(ct.shape)
        t1 = time.perf_counter()
        if upload is not None:
            start, source = upload, "uploaded label"
        else:
            start, source = self._last_answer(request.get("_last_answer"), ct, affine), "last answer"
        if start is None:
            prediction = self.contourer(request["image"], largest_component=largest_component)
            start, source = np.asarray(prediction.label).astype(np.uint8), "automatic contour"
        t2 = time.perf_counter()
        method = refiner_for(self.model_path.parent)
        out = start.copy()
        targets = clicks.targets(start, labels)
        for name in targets:
            mask = method(ct, affine, start == labels[name], clicks.positive_of(name), clicks.negative, **self.click_scope.kwargs())
            out = merge_structure(out, start, labels[name], mask)
        t3 = time.perf_counter()
        with tempfile.NamedTemporaryFile(suffix=".nii.gz", prefix=f"{self.model}_", delete=False) as f:
            path = f.name
        write_label(path, out, affine)
        logger.info("%s: refined %s from the %s by %s (%d clicks) in %.2f s", self.model, targets or "nothing", source,
                    method.name, clicks.count, time.perf_counter() - t0)
        return path, {
            "label_names": labels,
            "model": self.model,
            "model_version": model_version(self.model_path),
            "refined_by": method.name,
            "refined": targets,
            "start": source,
            "clicks": {"positive": clicks.count - len(clicks.negative), "negative": len(clicks.negative)},
            "latencies": {"pre": round(t1 - t0, 2), "start": round(t2 - t1, 2), "refine": round(t3 - t2, 2),
                          "total": round(time.perf_counter() - t0, 2)},
        }

    def _uploaded_label(self, path, ct: np.ndarray, affine: np.ndarray, labels: dict[str, int]) -> np.ndarray | None:
        """The uploaded starting label, checked: on the image's grid, in the model's numbering."""
        if not path:
            return None
        label, label_affine = read_volume(path, "label", "uploaded label")
        check_label_geometry((ct, affine), (label, label_affine), "uploaded label")
        label = np.rint(np.asarray(label))
        known = {0, *labels.values()}
        if label.min() < 0 or label.max() > 255:  # not a label map of this model: name its values (np.unique sorts, slowly)
            unknown = sorted({int(v) for v in np.unique(label)} - known)
        else:  # counting the values of 8 bits is some 100 times faster than np.unique's sort on a whole CT's grid
            label = label.astype(np.uint8)
            unknown = sorted(set(np.flatnonzero(np.bincount(label.ravel(), minlength=256)).tolist()) - known)
        if unknown:
            raise InvalidClickError(f"the uploaded label holds values {unknown[:10]} that model {self.model!r} does not have: "
                                    f"send it in the model's numbering ({labels}, 0 background)")
        return label

    def _last_answer(self, path, ct: np.ndarray, affine: np.ndarray) -> np.ndarray | None:
        """This model's last answer for the image (the effort record's proposal), if it is still on
        the image's grid; ``None`` otherwise (the automatic contour starts)."""
        if not path:
            return None
        try:
            img = nib.load(str(path))  # written by this server: a uint8 label map, read as it is
            label, label_affine = np.asanyarray(img.dataobj), img.affine
            check_label_geometry((ct, affine), (label, label_affine), "last answer")
        except (OSError, LabelMismatchError, ContourCLError) as err:
            logger.warning("%s: the last answer %s cannot start the refinement (%s): the automatic contour does", self.model, path, err)
            return None
        return np.asarray(label).astype(np.uint8)


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
