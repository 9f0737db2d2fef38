"""A local datastore that checks what it is given before it stores anything, and stores it whole.

On top of MONAI Label's ``LocalDatastore``:

- image ids and label tags must be safe file names (:func:`contourcl.ids.check_id`), and a
  file (e.g. a symlink) whose real path leaves the studies folder is never served, nor anything
  but a regular file (a FIFO would hang the thread that reads it);
- an uploaded image must be a CT (:func:`contourcl.data.volumes.read_ct`: a regular file with its
  voxels attached, header within :data:`~contourcl.data.volumes.CT_BOUNDS` before any voxel is
  read, finite, not constant), and may not replace an existing image;
- a file put into the studies folder by hand that is not a usable CT is found when first used
  (:meth:`SafeDatastore.check_image`), recorded with its reason in ``.contourcl/unusable.json``
  and left out of next-sample and training;
- a label must be readable, lie on its image's grid (shape and affine), and its segments are
  renumbered by name (Slicer's ``label_info``) into the stored numbering
  (:func:`contourcl.data.labels.remap_by_name`), and the stored ``label_info`` describes the stored
  voxels (and names their file's ``sha256``), not the client's numbering;
- every label that is replaced or removed, and every label of a removed image, is first copied to
  ``.contourcl/label-history/<tag>/`` under a name of its own;
- a ``final`` label of an image that came from a DICOM series is also written as an RTSTRUCT and a
  SEG on the series' grid (:func:`contourcl.serving.series.export_label`; a DICOMweb PACS as the
  studies also gets them: :mod:`contourcl.serving.dicomweb`).

Nothing is written until every check has passed, and what is written survives ``kill -9`` and a
full or read-only disk at every step (:mod:`contourcl.files`): labels, images, the label history
and ``datastore_v2.json`` are each written to a temporary file in their folder, synced and renamed
into place. A label file and its label info change together or not at all: before the new label is
renamed into place, ``.contourcl/pending/<image>.<tag>.json`` records its info and its file's
sha256; once the info is stored, the entry is removed. A server that starts finds any entry left by
a crash (:meth:`SafeDatastore.recover`): if the label file is the new one, its info is applied, else
the entry is dropped (the old label and its info are still in place). A write the disk refuses is
answered 507 (full) or 503 (read-only) by :func:`contourcl.serving.errors.http_errors`, with the
temporary files removed and everything stored as it was. Saves (and removals) of one image are
serialised, so no submission is lost to a concurrent one.

Fault points (:func:`contourcl.files.fault`, for the tests), in the order a label save passes them:
``label-temp-written`` (the new label written and synced under a temporary name),
``label-history-kept`` (the replaced label copied to the history), ``label-pending-written`` (the
journal entry written), ``label-renamed`` (the new label in place, its info not yet stored),
``label-info-written`` (``datastore_v2.json`` written, the journal entry not yet removed); an image
upload: ``image-temp-written`` (copied and synced under a temporary name in the studies folder),
``image-renamed`` (in place, not registered yet), ``image-registered`` (``datastore_v2.json``
written); removing an image or a label: ``image-labels-kept`` (its labels copied to the history);
``datastore-file-temp-written`` (any write of ``datastore_v2.json``, before its rename).
"""

from __future__ import annotations

import contextlib
import copy
import errno
import hashlib
import json
import logging
import os
import shutil
import threading
import time
from pathlib import Path

import numpy as np
from fastapi import HTTPException
from filelock import FileLock
from monailabel.datastore.local import DataModel, ImageLabelModel, LocalDatastore

from contourcl.data.labels import (
    STORED_LABELS,
    from_model,
    remap_by_name,
    stored_label_info,
)
from contourcl.data.volumes import (
    check_label_geometry,
    check_plain_file,
    label_bytes,
    read_ct,
    read_volume,
)
from contourcl.errors import InvalidImageError, LabelMismatchError, UnsafeIdError
from contourcl.files import (
    atomic_copy,
    atomic_write_text,
    fault,
    fsync_dir,
    remove_stale_temporaries,
    sha256_file,
    temporary_name,
    write_temporary,
)
from contourcl.ids import check_id
from contourcl.serving.errors import http_errors
from contourcl.serving.lifecycle import in_task_subprocess
from contourcl.serving.series import export_label

logger = logging.getLogger(__name__)

#: the file type every stored label is written in (:func:`contourcl.data.volumes.label_bytes`)
LABEL_EXT = ".nii.gz"


class SafeDatastore(LocalDatastore):
    """``LocalDatastore`` with input checks and whole, serialised writes; see the module docstring."""

    def __init__(self, *args, dicom_export: bool = True, **kwargs):
        self._usable: dict[str, list[int]] = {}  # image id -> the file state found to be a usable CT
        self.dicom_export = dicom_export  # final labels of DICOM-series images also as RTSTRUCT + SEG
        # the in-memory datastore (MONAI Label reloads it from datastore_v2.json at any time) and that file
        self._model_lock = threading.RLock()
        self._image_locks: dict[str, threading.Lock] = {}  # image id -> held while one of its labels is saved
        self._image_locks_guard = threading.Lock()
        #: called as ``listener(image_id, label_path)`` after a final label is stored (the app scores
        #: the correction effort there, contourcl.serving.effort_record); a listener's error is logged
        self.final_label_listeners: list = []
        super().__init__(*args, **kwargs)
        if not in_task_subprocess():  # the server owns the journal; a training subprocess only reads
            self.recover()

    def _contourcl_dir(self) -> Path:
        return Path(self._datastore_path) / ".contourcl"

    def _history_dir(self, tag: str) -> Path:
        return self._contourcl_dir() / "label-history" / tag

    def _pending_dir(self) -> Path:
        return self._contourcl_dir() / "pending"

    @contextlib.contextmanager
    def _image_lock(self, image_id: str):
        """Held while one image's files change: its saves and its removal happen one after the other."""
        with self._image_locks_guard:
            lock = self._image_locks.setdefault(image_id, threading.Lock())
        with lock:
            yield

    # -- datastore_v2.json: written whole, and never reloaded in the middle of a change ---------
    def _update_datastore_file(self, lock=True):
        """Write ``datastore_v2.json`` atomically (MONAI Label rewrites it in place: a crash or a
        full disk there leaves a truncated file that loses every label's info)."""
        with self._model_lock:
            text = json.dumps(self._datastore.model_dump(exclude={"base_path"}), indent=2, default=str)
            with FileLock(self._lock_file) if lock else contextlib.nullcontext():
                atomic_write_text(self._datastore_config_path, text, point="datastore-file-temp-written")
                self._config_ts = os.stat(self._datastore_config_path).st_mtime

    def _init_from_datastore_file(self, throw_exception=False):
        with self._model_lock:
            return super()._init_from_datastore_file(throw_exception)

    def _reconcile_datastore(self):
        with self._model_lock:
            return super()._reconcile_datastore()

    # -- after a crash ----------------------------------------------------------------------
    def recover(self) -> None:
        """Finish or drop what a crash (``kill -9``, a power cut) interrupted: temporary files of a
        dead process are removed, and each journal entry of an unfinished label save is applied
        (the new label is in place) or dropped (it is not). Run when the server starts."""
        with self._model_lock:
            folders = [Path(self._datastore.image_path()), self._pending_dir(), self._contourcl_dir()]
            for parent in (Path(self._datastore.label_path(None)), self._contourcl_dir() / "label-history"):
                folders += [parent] + ([d for d in parent.iterdir() if d.is_dir()] if parent.is_dir() else [])
            for folder in folders:
                for path in remove_stale_temporaries(folder):
                    logger.warning("removed %s, left by a write that was interrupted (the server stopped)", path)
            for entry in sorted(self._pending_dir().glob("*.json")):
                self._finish_pending(entry)

    def _finish_pending(self, entry_path: Path) -> None:
        """Apply one journal entry's label info if its label file is in place, else drop it."""
        try:
            entry = json.loads(entry_path.read_text())
            image_id, tag, name, sha, info = entry["image"], entry["tag"], entry["name"], entry["sha256"], entry["info"]
        except (OSError, ValueError, KeyError, TypeError) as err:
            logger.warning("dropped the unreadable journal entry %s: %s", entry_path.name, err)
            entry_path.unlink(missing_ok=True)
            return
        label_file = Path(self._datastore.label_path(tag)) / name
        obj = self._datastore.objects.get(image_id)
        if obj is not None and label_file.is_file() and sha256_file(label_file) == sha:
            obj.labels[tag] = DataModel(info=info, ext=name[len(image_id):])
            self._update_datastore_file()
            logger.warning("the %s label of %s was in place when the server stopped, its label info was not: stored now (%s)",
                           tag, image_id, ", ".join(info.get("structures", [])) or "no structures")
        else:
            logger.warning("a save of the %s label of %s was interrupted before the new label was in place: "
                           "the label stays as it was", tag, image_id)
        entry_path.unlink(missing_ok=True)
        fsync_dir(entry_path.parent)

    # -- files stay inside the studies folder, and are files --------------------------------
    def _inside(self, path: str | None, what: str) -> str | None:
        """``path`` if its real path (symlinks followed) lies inside the studies folder and is a
        regular file (a FIFO, device or socket is never opened: reading a FIFO hangs)."""
        if path and os.path.lexists(path):
            root = os.path.realpath(self._datastore_path)
            if os.path.commonpath([root, os.path.realpath(path)]) != root:
                raise UnsafeIdError(f"{what} {os.path.basename(path)!r} points outside the studies folder: refused")
            check_plain_file(path, what, os.path.basename(path))
        return path

    # -- usable CTs -------------------------------------------------------------------------
    def _unusable_file(self) -> Path:
        return Path(self._datastore_path) / ".contourcl" / "unusable.json"

    def unusable(self) -> dict[str, dict]:
        """``{image id: {"reason", "stat"}}`` of the images found not to be usable CTs."""
        path = self._unusable_file()
        try:
            return json.loads(path.read_text()) if path.is_file() else {}
        except (OSError, ValueError):
            return {}

    def _stat(self, image_id: str) -> list[int]:
        st = os.stat(super().get_image_uri(image_id))
        return [st.st_mtime_ns, st.st_size]

    def mark_unusable(self, image_id: str, reason: str) -> None:
        """Record that ``image_id`` (as its file is now) is not a usable CT, and why."""
        entries = self.unusable()
        try:
            stat = self._stat(image_id)
        except OSError:
            stat = None
        if entries.get(image_id, {}).get("reason") == reason and entries[image_id].get("stat") == stat:
            return
        entries[image_id] = {"reason": reason, "stat": stat, "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
        logger.warning("image %s is not usable and is skipped by next-sample and training: %s", image_id, reason)
        self._write_unusable(entries)

    def _write_unusable(self, entries: dict) -> None:
        atomic_write_text(self._unusable_file(), json.dumps(entries, indent=1))

    def check_image(self, image_id: str) -> str | None:
        """``None`` if ``image_id`` is a usable CT, else the reason (recorded, see :meth:`unusable`).

        A file is read once per state: the verdict is kept until the file changes.
        """
        known = self.unusable().get(image_id)
        try:
            stat = self._stat(image_id)
            if known and known.get("stat") == stat:
                return known["reason"]
            if self._usable.get(image_id) == stat:
                return None
            self._inside(super().get_image_uri(image_id), "image")
            read_ct(super().get_image_uri(image_id), image_id)
        except (InvalidImageError, UnsafeIdError, OSError) as err:
            self.mark_unusable(image_id, str(err))
            return str(err)
        self._usable[image_id] = stat
        if known:  # the file was replaced by a usable one
            entries = self.unusable()
            entries.pop(image_id, None)
            self._write_unusable(entries)
        return None

    def _usable_ids(self, ids: list[str]) -> list[str]:
        """``ids`` without the images already known to be unusable (and unchanged since)."""
        bad = self.unusable()
        keep = []
        for i in ids:
            try:
                if i in bad and bad[i].get("stat") == self._stat(i):
                    continue
                self._inside(super().get_image_uri(i), "image")
            except (OSError, UnsafeIdError, InvalidImageError) as err:
                self.mark_unusable(i, str(err))
                continue
            keep.append(i)
        return keep

    def get_unlabeled_images(self, label_tag=None, labels=None):
        return self._usable_ids(super().get_unlabeled_images(label_tag, labels))

    def get_labeled_images(self, label_tag=None, labels=None):
        return self._usable_ids(super().get_labeled_images(label_tag, labels))

    def final_cases(self) -> list[dict]:
        """``{"id", "image", "label"}`` of every CT with a ``final`` label (stored numbering), but
        those already known to be unusable: what retraining trains on and the quality gate
        validates on (:func:`contourcl.serving.retrain.usable_cases` reads and checks each)."""
        return [{"id": i, "image": self.get_image_uri(i), "label": self.get_label_uri(i, "final")}
                for i in self.get_labeled_images("final")]

    # -- the label history ------------------------------------------------------------------
    def _keep_in_history(self, path: str | Path, image_id: str, tag: str, why: str = "replaced") -> Path:
        """Copy a label file (whole, synced) to ``.contourcl/label-history/<tag>/`` under a name no
        other copy has; returns the copy."""
        folder = self._history_dir(tag)
        ext = self._to_id(os.path.basename(str(path)))[1]
        ns = time.time_ns()  # one reading: the seconds and their fraction from two readings could run backwards
        stamp = f"{time.strftime('%Y%m%d-%H%M%S', time.localtime(ns // 10**9))}.{ns % 10**9:09d}"
        suffix = "" if why == "replaced" else f".{why}"
        backup = folder / f"{image_id}.{stamp}{suffix}{ext}"
        n = 1
        while backup.exists():  # two copies in the same nanosecond (another clock, another process)
            backup = folder / f"{image_id}.{stamp}-{n}{suffix}{ext}"
            n += 1
        atomic_copy(path, backup)
        logger.info("%s %s label of %s kept as %s", why, tag, image_id, backup)
        return backup

    # -- images ---------------------------------------------------------------------------
    def add_image(self, image_id, image_filename, image_info):
        with http_errors("storing the image"):
            if image_id:
                check_id(image_id)
            else:
                image_id = check_id(self._to_id(os.path.basename(image_filename))[0])
            ext = self._to_id(os.path.basename(image_filename))[1]
            if image_id in self._datastore.objects:
                raise HTTPException(409, f"image {image_id!r} already exists; nothing was overwritten (remove it first)")
            check_plain_file(image_filename, "image", image_id, follow_links=False)
            read_ct(image_filename, image_id)
            with self._image_lock(image_id):
                return self._store_image(image_id, image_filename, ext, dict(image_info or {}))

    def _store_image(self, image_id: str, source: str, ext: str, info: dict) -> str:
        """Copy a checked image into the studies folder under a temporary name, sync it, check the
        copy, rename it into place and only then register it. Any failure removes the copy."""
        dest = Path(os.path.realpath(self._datastore.image_path())) / f"{image_id}{ext}"
        if os.path.lexists(dest):
            raise HTTPException(409, f"image {image_id!r} already exists as {dest.name} in the studies folder; nothing was overwritten")
        sha = sha256_file(source)
        with open(source, "rb") as src:
            tmp = write_temporary(dest, lambda out: shutil.copyfileobj(src, out, 1024 * 1024))
        try:
            fault("image-temp-written")
            if sha256_file(tmp) != sha:
                raise InvalidImageError(f"the copy of the image {image_id!r} differs from the upload: nothing stored")
            with self._model_lock:
                if image_id in self._datastore.objects or os.path.lexists(dest):
                    raise HTTPException(409, f"image {image_id!r} already exists; nothing was overwritten (remove it first)")
                os.replace(tmp, dest)
                fsync_dir(dest.parent)
                self._register_image(image_id, dest, ext, {**info, "ts": int(time.time()), "name": dest.name, "sha256": sha})
        finally:
            tmp.unlink(missing_ok=True)
        st = os.stat(dest)
        self._usable[image_id] = [st.st_mtime_ns, st.st_size]  # read_ct passed on these very bytes
        logger.info("image %s stored as %s", image_id, dest.name)
        return image_id

    def _register_image(self, image_id: str, dest: Path, ext: str, info: dict) -> None:
        """Add a just-renamed image to ``datastore_v2.json``; if that fails, remove the file again."""
        try:
            fault("image-renamed")
            self._datastore.objects[image_id] = ImageLabelModel(image=DataModel(info=info, ext=ext))
            self._update_datastore_file()
            fault("image-registered")
        except BaseException:
            self._datastore.objects.pop(image_id, None)
            dest.unlink(missing_ok=True)
            fsync_dir(dest.parent)
            with contextlib.suppress(OSError):  # on a full disk datastore_v2.json is still the old one
                self._update_datastore_file()
            raise

    def remove_image(self, image_id):
        """Remove an image and its labels; every label is first copied to the label history. The
        datastore file is written before any file is removed: if the disk refuses a copy or that
        write, nothing is removed (and the copies made are removed again)."""
        with http_errors("removing the image"):
            check_id(image_id)
            with self._image_lock(image_id), self._model_lock:
                obj = self._datastore.objects.get(image_id)
                if obj is None:
                    raise HTTPException(404, f"image {image_id!r} is not in the datastore; nothing was removed")
                labels = [LocalDatastore.get_label_uri(self, image_id, tag) for tag in obj.labels]
                image_path = super().get_image_uri(image_id)
                with self._kept_until_done(image_id, list(obj.labels)):
                    self._datastore.objects.pop(image_id)
                    try:
                        self._update_datastore_file()
                    except BaseException:
                        self._datastore.objects[image_id] = obj
                        raise
                for path in [*labels, image_path]:
                    if path:
                        Path(path).unlink(missing_ok=True)
                self._usable.pop(image_id, None)
        logger.info("image %s removed (its labels are kept in the label history)", image_id)

    @contextlib.contextmanager
    def _kept_until_done(self, image_id: str, tags: list[str]):
        """Copy the ``tags`` labels of ``image_id`` to the label history, then run the block; if the
        block (or a copy) fails, the copies are removed again: the labels are still in place."""
        kept = []
        try:
            for tag in tags:
                path = LocalDatastore.get_label_uri(self, image_id, tag)
                if path and os.path.isfile(path):
                    kept.append(self._keep_in_history(path, image_id, tag, why="removed"))
            fault("image-labels-kept")
            yield
        except BaseException:
            for copy_path in kept:
                copy_path.unlink(missing_ok=True)
            raise

    def get_image_uri(self, image_id):
        with http_errors():
            check_id(image_id)
            return self._inside(super().get_image_uri(image_id), "image")

    def get_image_info(self, image_id):
        with http_errors():
            check_id(image_id)
        return super().get_image_info(image_id)

    def update_image_info(self, image_id, info):
        with http_errors("updating the image info"):
            check_id(image_id)
            with self._model_lock:
                obj = self._datastore.objects.get(image_id)
                if obj is None:
                    raise HTTPException(404, f"image {image_id!r} is not in the datastore")
                before = copy.deepcopy(obj.image.info)
                obj.image.info.update(info)
                try:
                    self._update_datastore_file()
                except BaseException:
                    obj.image.info = before
                    raise

    # -- labels ---------------------------------------------------------------------------
    def get_label_uri(self, label_id, label_tag):
        with http_errors():
            check_id(label_id, "label id")
            check_id(label_tag, "label tag")
            return self._inside(super().get_label_uri(label_id, label_tag), "label")

    def get_label_info(self, label_id, label_tag):
        with http_errors():
            check_id(label_id, "label id")
            check_id(label_tag, "label tag")
        return super().get_label_info(label_id, label_tag)

    def update_label_info(self, label_id, label_tag, info):
        with http_errors("updating the label info"):
            check_id(label_id, "label id")
            check_id(label_tag, "label tag")
            with self._model_lock:
                label = self._datastore.label(label_id, label_tag)
                if label is None:
                    raise HTTPException(404, f"no {label_tag!r} label of image {label_id!r} in the datastore")
                before = copy.deepcopy(label.info)
                label.info.update(info)
                try:
                    self._update_datastore_file()
                except BaseException:
                    label.info = before
                    raise

    def remove_label(self, label_id, label_tag):
        """Remove a label, first copied to the label history; the datastore file is written first."""
        with http_errors("removing the label"):
            check_id(label_id, "label id")
            check_id(label_tag, "label tag")
            with self._image_lock(label_id), self._model_lock:
                obj = self._datastore.objects.get(label_id)
                if obj is None or label_tag not in obj.labels:
                    raise HTTPException(404, f"no {label_tag!r} label of image {label_id!r} in the datastore; nothing was removed")
                path = super().get_label_uri(label_id, label_tag)
                with self._kept_until_done(label_id, [label_tag]):
                    label = obj.labels.pop(label_tag)
                    try:
                        self._update_datastore_file()
                    except BaseException:
                        obj.labels[label_tag] = label
                        raise
                if path:
                    Path(path).unlink(missing_ok=True)

    def _checked_label(self, image_id: str, label_filename: str, label_tag: str, label_info: dict) -> tuple[np.ndarray, np.ndarray]:
        """The label in the stored numbering, and its image's affine; refused (422) unless it is a
        label map on its image's grid."""
        check_plain_file(label_filename, "label", "label", follow_links=False)
        image = read_volume(self.get_image_uri(image_id), "image", image_id)
        label_arr, label_affine = read_volume(label_filename, "label")
        check_label_geometry(image, (label_arr, label_affine), f"label for {image_id!r}")
        values = np.rint(label_arr).astype(np.int64)
        if values.min() < 0 or values.max() > 255:
            raise LabelMismatchError(f"label for {image_id!r} has values outside 0..255: not a label map")
        if "model" in label_info and label_tag != "final":  # a model's own output
            return from_model(values, label_info["model"]), image[1]
        return remap_by_name(values, label_info.get("label_info")), image[1]

    def save_label(self, image_id, label_filename, label_tag, label_info):
        label_info = dict(label_info or {})
        with http_errors("storing the label"):
            check_id(image_id)
            check_id(label_tag, "label tag")
            if image_id not in self._datastore.objects:
                raise HTTPException(404, f"image {image_id!r} is not in the datastore")
            stored, affine = self._checked_label(image_id, label_filename, label_tag, label_info)
            present = {name: int(v) for name, v in STORED_LABELS.items() if np.any(stored == v)}
            label_info["structures"] = list(present)
            label_info["label_info"] = stored_label_info(stored)  # what the stored voxels mean
            data = label_bytes(stored, affine)
            with self._image_lock(image_id):
                self._store_label(image_id, label_tag, data, label_info)
                logger.info("label for %s (%s): %s", image_id, label_tag, json.dumps(present))
                if label_tag == "final" and self.dicom_export and present:
                    # a DICOM-series image: the clinician's contours also as RTSTRUCT and SEG on the series
                    extra = self.export_final(image_id, stored, affine, label_info)
                    if extra:
                        self.update_label_info(image_id, label_tag, extra)
                if label_tag == "final":
                    self._tell_listeners(image_id)
        return image_id

    def _tell_listeners(self, image_id: str) -> None:
        """Call :attr:`final_label_listeners` with the just-stored final label; the label is stored
        already, so a listener's failure is logged, never raised."""
        path = super().get_label_uri(image_id, "final")
        for listener in self.final_label_listeners:
            try:
                listener(image_id, path)
            except Exception as err:  # noqa: BLE001
                logger.warning("final label of %s stored; a listener failed on it: %s", image_id, err)

    def _store_label(self, image_id: str, tag: str, data: bytes, info: dict) -> None:
        """Put ``data`` in place as the ``tag`` label of ``image_id`` with ``info``: both or neither.

        The new label is written and synced under a temporary name; the label it replaces is
        copied to the history; the journal entry (info + sha256) is written; the label is renamed
        into place and its info stored; the entry is removed. A failure before the rename changes
        nothing; one after it puts the old label back (kept under a second, temporary name).
        """
        label_dir = Path(os.path.realpath(self._datastore.label_path(tag)))
        dest = label_dir / f"{image_id}{LABEL_EXT}"
        sha = hashlib.sha256(data).hexdigest()
        info = {**info, "ts": int(time.time()), "name": dest.name, "sha256": sha}
        existing = super().get_label_uri(image_id, tag)
        existing = existing if existing and os.path.isfile(existing) else None
        pending = self._pending_dir() / f"{image_id}.{tag}.json"
        tmp = write_temporary(dest, lambda out: out.write(data))
        kept = old = None
        renamed = info_written = False
        with self._model_lock:
            obj = self._datastore.objects.get(image_id)
            before = copy.deepcopy(obj.labels.get(tag)) if obj is not None else None
        try:
            fault("label-temp-written")
            if existing:
                kept = self._keep_in_history(existing, image_id, tag)
            fault("label-history-kept")
            atomic_write_text(pending, json.dumps({"image": image_id, "tag": tag, "name": dest.name, "sha256": sha, "info": info}))
            fault("label-pending-written")
            with self._model_lock:
                if dest.exists():
                    old = self._second_name(dest)  # the label now in place, to put back if the info cannot be stored
                os.replace(tmp, dest)
                renamed = True
                fsync_dir(label_dir)
                fault("label-renamed")
                self._set_label_info(image_id, tag, info)
                info_written = True
                fault("label-info-written")
        except BaseException:
            tmp.unlink(missing_ok=True)
            if renamed and not self._put_back(dest, old, image_id, tag, before, info_written):
                raise  # the journal entry stays: the next start makes the info match the file
            if kept is not None:
                kept.unlink(missing_ok=True)  # the label it copied is (again) the one in place
            pending.unlink(missing_ok=True)
            raise
        finally:
            if old is not None:
                old.unlink(missing_ok=True)
        pending.unlink(missing_ok=True)
        fsync_dir(pending.parent)
        if existing and os.path.realpath(existing) != str(dest):  # the old label had another file type
            Path(existing).unlink(missing_ok=True)

    @staticmethod
    def _second_name(path: Path) -> Path:
        """A second (temporary) name for ``path``'s content: a hard link (no space needed, the file is
        never written again: labels are replaced by rename), or a copy where the file system has
        no hard links."""
        second = temporary_name(path)
        try:
            os.link(path, second)
        except OSError as err:
            if err.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.EMLINK, errno.EXDEV):
                raise
            try:
                shutil.copy2(path, second)
            except BaseException:
                second.unlink(missing_ok=True)
                raise
        return second

    def _set_label_info(self, image_id: str, tag: str, info: dict) -> None:
        """Store a label's info in ``datastore_v2.json``; the in-memory info is unchanged if that fails."""
        with self._model_lock:
            obj = self._datastore.objects.get(image_id)
            if obj is None:
                raise HTTPException(404, f"image {image_id!r} was removed while its label was saved")
            before = obj.labels.get(tag)
            obj.labels[tag] = DataModel(info=info, ext=LABEL_EXT)
            try:
                self._update_datastore_file()
            except BaseException:
                if before is None:
                    obj.labels.pop(tag, None)
                else:
                    obj.labels[tag] = before
                raise

    def _put_back(self, dest: Path, old: Path | None, image_id: str, tag: str, before: DataModel | None, info_written: bool) -> bool:
        """After the new label was renamed into place but its info could not be stored: the old label
        back in place (``old``, a second name of it), or no label if there was none, with its info
        ``before``, and ``datastore_v2.json`` as it was (written again only if the new info had
        reached it: a write the disk refused left it as it was). ``False`` if that failed too (logged)."""
        try:
            if old is not None:
                os.replace(old, dest)
            else:
                dest.unlink(missing_ok=True)
            fsync_dir(dest.parent)
            with self._model_lock:
                obj = self._datastore.objects.get(image_id)
                if obj is not None:
                    if before is None or old is None:
                        obj.labels.pop(tag, None)
                    else:
                        obj.labels[tag] = before
                if info_written:
                    self._update_datastore_file()
            return True
        except OSError as err:
            logger.error("the %s label of %s could not be put back after a failed save (%s); the next start of the "
                         "server makes its info match the file", tag, image_id, err)
            return False

    def export_final(self, image_id: str, stored: np.ndarray, affine: np.ndarray, label_info: dict) -> dict:
        """Write a just-stored ``final`` label of a DICOM-series image as RTSTRUCT and SEG
        (:func:`contourcl.serving.series.export_label`); returns what to add to its label info
        (``{"dicom": {kind: path}}``, or ``{}`` for an image that is not from a series). A failed
        export is logged: the label is stored already, and is not lost for it."""
        try:
            written = export_label(self._datastore_path, image_id, stored, affine, "final", "clinician-reviewed")
        except Exception as err:  # noqa: BLE001 - the label is stored; a failed export must not lose it
            logger.warning("label of %s stored, but its DICOM export failed: %s", image_id, err)
            return {}
        if not written:
            return {}
        logger.info("label of %s exported as DICOM: %s", image_id, written)
        return {"dicom": written}

    def refresh_studies(self, force: bool = False, wait: bool = False) -> None:
        """Look for new studies where the studies come from a server (see
        :class:`contourcl.serving.dicomweb.PacsDatastore`); nothing to do for a local folder,
        which MONAI Label watches."""
