"""ContourCL's own handlers for the endpoints that take files from a client, or give them out.

MONAI Label 0.8.5's handlers write each upload to a named temporary file and remove it in a
background task that only runs when the request succeeds: every refused upload left its file
behind (measurement: docs/design-notes.md), each dataset download left a zip of every CT, and
``PUT /model/<name>`` copied any file over the served model. These handlers answer the same
requests (Slicer and ``MONAILabelClient`` see no difference) and differ where it matters:

- every file a request writes lives in a private folder of that request, removed when the
  request ends, whatever the outcome; an upload larger than the server's limit is refused (413);
- an uploaded file is only ever handled as the request's own input: ``infer`` contours a
  datastore id or the file sent with the request, nothing else, and a ``label`` sent with it is
  only the starting contour of its clicks;
- ``PUT /model/<name>`` goes the way of a retrained model: validated as a ContourCL model file
  (read as data, never unpickled as code), archived in the history, scored by the quality gate
  on the fixed validation cases, and published only if not worse;
- ``DELETE /model/<name>`` stops serving the model but keeps its file in the history.

The roles these endpoints need are enforced by :mod:`contourcl.serving.security`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import zipfile
from pathlib import Path

from fastapi import APIRouter, File, Form, HTTPException, UploadFile
from fastapi.responses import JSONResponse, Response, StreamingResponse
from requests_toolbelt import MultipartEncoder

from contourcl.ids import check_id
from contourcl.serving.errors import http_errors
from contourcl.serving.routes import listing
from contourcl.serving.security import limits
from contourcl.training.finetune.engine import return_freed_memory

logger = logging.getLogger(__name__)

#: The image formats the datastore takes (as MONAI Label's local datastore: by file name).
IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd")
#: How deep a request's ``params`` may nest (Slicer's are 3 levels deep)
MAX_PARAMS_DEPTH = 32
#: Request keys an infer request may not set: what is contoured, by which model, and the upload
#: marker (where a result is stored, ``label_tag``, is the app's: ContourApp.infer keeps ``original``)
INFER_RESERVED = ("image", "model")


def _suffix(filename: str | None, allowed=IMAGE_SUFFIXES, default: str = ".nii.gz") -> str:
    """The upload's file type from its name (what the readers go by), refused if not one of ``allowed``."""
    if not filename:
        return default
    name = os.path.basename(filename).lower()
    for suffix in allowed:
        if name.endswith(suffix):
            return suffix
    raise HTTPException(422, f"{os.path.basename(filename)!r}: unsupported file type; send one of {list(allowed)}")


def _save_upload(upload: UploadFile, folder: Path, name: str, limit_mb: float) -> Path:
    """Copy ``upload`` into ``folder/name``, refusing (413) past ``limit_mb`` (the gateway of
    :mod:`~contourcl.serving.security` refuses larger bodies first; this bounds the file itself)."""
    path = folder / name
    limit = int(limit_mb * 1024 * 1024)
    written = 0
    with http_errors("receiving the upload"), open(path, "wb") as out:  # a full temporary folder: 507
        while chunk := upload.file.read(1024 * 1024):
            written += len(chunk)
            if written > limit:
                raise HTTPException(413, f"upload {upload.filename!r} is larger than this server's limit of {limit_mb} MB")
            out.write(chunk)
    return path


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"the number {text} is out of range")
    return value


def _no_constant(name: str):
    raise ValueError(f"{name} is not a number JSON allows")


def _params(text: str) -> dict:
    """The ``params`` form field: a JSON object of finite numbers, nested at most 32 deep."""
    try:
        value = json.loads(text, parse_float=_finite, parse_constant=_no_constant) if text else {}
    except RecursionError:
        raise HTTPException(422, "params is nested too deeply") from None
    except ValueError as err:
        raise HTTPException(422, f"params is not JSON: {err}") from err
    if not isinstance(value, dict):
        raise HTTPException(422, "params must be a JSON object")
    if _depth(value) > MAX_PARAMS_DEPTH:
        raise HTTPException(422, f"params is nested more than {MAX_PARAMS_DEPTH} levels deep")
    return value


def _depth(value, level: int = 0) -> int:
    if level > MAX_PARAMS_DEPTH:
        return level
    if isinstance(value, dict):
        return max((_depth(v, level + 1) for v in value.values()), default=level + 1)
    if isinstance(value, list):
        return max((_depth(v, level + 1) for v in value), default=level + 1)
    return level


def _result_response(result: dict, output: str | None) -> Response:
    """The inference answer in MONAI Label's formats (``json``, ``image``, or both as multipart).

    The result file is read and removed here, before anything is sent, so it cannot outlive
    the request (MONAI Label removes it in a background task that a dropped connection skips).
    """
    path = result.get("file") or result.get("label")
    params = result.get("params") or {}
    data = None
    if path and os.path.isfile(path):
        try:
            data = Path(path).read_bytes()
        finally:
            os.remove(path)
    if output == "json" or data is None:
        return JSONResponse(params)
    filename = os.path.basename(path)
    if output == "image":
        return Response(data, media_type="application/octet-stream", headers={"Content-Disposition": f'attachment; filename="{filename}"'})
    body = MultipartEncoder(fields={"params": (None, json.dumps(params), "application/json"), "image": (filename, data, "application/octet-stream")})
    return Response(content=body.to_string(), media_type=body.content_type)


def build_router(instance, prefix: str = "", server=None) -> APIRouter:
    """The routes, bound to the running ``ContourApp`` ``instance`` (and, for ``GET /info/routes``,
    the FastAPI ``server`` that serves them)."""
    router = APIRouter(prefix=prefix)
    limit = limits(instance.conf or {})
    upload_mb, model_mb = limit["max_upload_mb"], limit["max_model_mb"]
    slots = instance.infer_slots

    # -- datastore --------------------------------------------------------------------------
    def add_image(image: str | None = None, params: str = Form("{}"), file: UploadFile = File(...)):
        suffix = _suffix(file.filename)
        image_id = image or os.path.basename(file.filename or "")[: -len(suffix)]
        with http_errors():
            check_id(image_id)
        info = _params(params)
        with tempfile.TemporaryDirectory(prefix="contourcl-upload-") as tmp:
            path = _save_upload(file, Path(tmp), f"{image_id}{suffix}", upload_mb)
            return {"image": instance.datastore().add_image(image_id, str(path), info)}

    def save_label(image: str, params: str = Form("{}"), tag: str = "final", label: UploadFile = File(...)):
        suffix = _suffix(label.filename)
        info = _params(params)
        with tempfile.TemporaryDirectory(prefix="contourcl-upload-") as tmp:
            path = _save_upload(label, Path(tmp), f"label{suffix}", upload_mb)
            label_id = instance.datastore().save_label(image, str(path), tag or "final", info)
        return {**(instance.on_save_label(image, label_id) or {}), "image": image, "label": label_id}

    def download_dataset(limit_cases: int | None = None):
        datalist = instance.datastore().datalist()
        if not datalist:
            raise HTTPException(404, "no labeled cases: the dataset archive would be empty")
        if limit_cases and 0 < limit_cases < len(datalist):
            datalist = datalist[:limit_cases]
        # the archive is written to a file that is unlinked at once: it is streamed from the open
        # handle and vanishes with it, however the download ends
        handle = tempfile.TemporaryFile(prefix="contourcl-dataset-")
        with zipfile.ZipFile(handle, mode="w") as archive:
            for case in datalist:
                for key, path in case.items():
                    archive.write(path, arcname=os.path.join(key, os.path.basename(path)))
        handle.seek(0)

        def chunks():
            with handle:
                while chunk := handle.read(1024 * 1024):
                    yield chunk

        return StreamingResponse(chunks(), media_type="application/zip", headers={"Content-Disposition": 'attachment; filename="dataset.zip"'})

    # -- inference --------------------------------------------------------------------------
    def infer(model: str, image: str = "", session_id: str = "", params: str = Form("{}"), file: UploadFile = File(None),
              label: UploadFile = File(None), output: str | None = None):
        if session_id:
            raise HTTPException(422, "session_id is not supported by this server: send a datastore image id, or the image itself")
        if output not in (None, "image", "json", "all"):
            raise HTTPException(422, f"output {output!r} is not supported; use image, json or all")
        if not file and not image:
            raise HTTPException(422, "no image: send a datastore image id (?image=ID) or an image file")
        request = {k: v for k, v in _params(params).items() if k not in INFER_RESERVED and not k.startswith("_")}
        request.update(model=model, image=image)
        with tempfile.TemporaryDirectory(prefix="contourcl-infer-") as tmp:
            if file:
                path = _save_upload(file, Path(tmp), f"image{_suffix(file.filename)}", upload_mb)
                request.update(image=str(path), _upload=str(path))
            if label is not None:  # the starting contour of a click request (contourcl.serving.infer)
                path = _save_upload(label, Path(tmp), f"label{_suffix(label.filename)}", upload_mb)
                request.update(_label_upload=str(path))
            with slots.slot():
                try:
                    result = instance.infer(request)
                finally:
                    if slots.status()["running"] <= 1:
                        # the volume's copies, freed in this thread's arena, back to the system; no full
                        # garbage collection (about 0.3 s of every answer, docs/models/refine.md): the
                        # arrays are freed as their last reference goes
                        return_freed_memory(collect=False)
            if result is None:
                raise HTTPException(500, "inference gave no result")
            return _result_response(result, output)

    # -- models -----------------------------------------------------------------------------
    def put_model(model: str, file: UploadFile = File(...)):
        with tempfile.TemporaryDirectory(prefix="contourcl-model-") as tmp:
            path = _save_upload(file, Path(tmp), "upload.pt", model_mb)
            with http_errors():
                entry = instance.consider_uploaded_model(model, path)
        if not entry["published"]:
            raise HTTPException(409, f"model {model!r} not published: {entry['reason']} (kept as version {entry['version']} in the history)")
        return {k: entry.get(k) for k in ("version", "published", "reason", "val_dice", "served_val_dice", "gate_cases")}

    def delete_model(model: str):
        with http_errors():
            entry = instance.withdraw_model(model)
        return {"model": model, "withdrawn": True, "kept_as_version": entry["version"]}

    def route_list():
        return {"routes": listing(server) if server is not None else [], "infer": slots.status()}

    router.add_api_route("/info/routes", route_list, methods=["GET"])
    router.add_api_route("/datastore/image", add_image, methods=["PUT"])
    router.add_api_route("/datastore/", add_image, methods=["PUT"], include_in_schema=False)
    router.add_api_route("/datastore/label", save_label, methods=["PUT"])
    router.add_api_route("/datastore/dataset", download_dataset, methods=["GET"])
    router.add_api_route("/infer/{model}", infer, methods=["POST"])
    router.add_api_route("/model/{model}", put_model, methods=["PUT"])
    router.add_api_route("/model/{model}", delete_model, methods=["DELETE"])
    return router


def install(server, app) -> None:
    """Put ContourCL's handlers in front of MONAI Label's for the same paths and methods
    (Starlette matches routes in order, so the first match answers)."""
    from monailabel.config import settings

    router = build_router(app, settings.MONAI_LABEL_API_STR or "", server)
    server.router.routes[:0] = router.routes
    logger.info("ContourCL handlers answer: %s", ", ".join(f"{'/'.join(sorted(r.methods))} {r.path}" for r in router.routes))
