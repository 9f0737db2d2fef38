"""A local datastore that checks what it is given before it stores anything.

On top of MONAI Label's ``LocalDatastore``:

- image ids and label tags must be safe file names (:func:`contourcl.ids.check_id`), and a
  file (e.g. a symlink) whose real path leaves the studies folder is never served;
- an uploaded image must be a CT (:func:`contourcl.data.volumes.read_ct`: header within
  :data:`~contourcl.data.volumes.CT_BOUNDS` before any voxel is read, finite, not constant), and may
  not replace an existing image;
- a file put into the studies folder by hand that is not a usable CT is found when first used
  (:meth:`SafeDatastore.check_image`), recorded with its reason in ``.contourcl/unusable.json``
  and left out of next-sample and training;
- a label must be readable, lie on its image's grid (shape and affine), and its segments are
  renumbered by name (Slicer's ``label_info``) into the stored numbering
  (:func:`contourcl.data.labels.remap_by_name`), and the stored ``label_info`` describes the stored
  voxels, not the client's numbering;
- a ``final`` label that is replaced is first copied to ``.contourcl/label-history/``;
- a ``final`` label of an image that came from a DICOM series is also written as an RTSTRUCT and a
  SEG on the series' grid (:func:`contourcl.serving.series.export_label`; a DICOMweb PACS as the
  studies also gets them: :mod:`contourcl.serving.dicomweb`).

Nothing is written until every check has passed.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from fastapi import HTTPException
from monailabel.datastore.local import LocalDatastore

from contourcl.data.labels import STORED_LABELS, from_model, remap_by_name, stored_label_info
from contourcl.data.volumes import check_label_geometry, read_ct, read_volume, write_label
from contourcl.errors import InvalidImageError, LabelMismatchError, UnsafeIdError
from contourcl.files import atomic_write_text
from contourcl.ids import check_id
from contourcl.serving.errors import http_errors
from contourcl.serving.series import export_label

logger = logging.getLogger(__name__)


class SafeDatastore(LocalDatastore):
    """``LocalDatastore`` with input checks; see the module docstring."""

    def __init__(self, *args, dicom_export: bool = True, **kwargs):
        self._usable: dict[str, list[int]] = {}  # image id -> the file state found to be a usable CT
        self.dicom_export = dicom_export  # final labels of DICOM-series images also as RTSTRUCT + SEG
        super().__init__(*args, **kwargs)

    def _history_dir(self, tag: str) -> Path:
        return Path(self._datastore_path) / ".contourcl" / "label-history" / tag

    # -- files stay inside the studies folder ---------------------------------------------
    def _inside(self, path: str | None, what: str) -> str | None:
        """``path`` if its real path (symlinks followed) lies inside the studies folder."""
        if path and os.path.lexists(path):
            root = os.path.realpath(self._datastore_path)
            if os.path.commonpath([root, os.path.realpath(path)]) != root:
                raise UnsafeIdError(f"{what} {os.path.basename(path)!r} points outside the studies folder: refused")
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
            except (OSError, UnsafeIdError) as err:
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

    # -- images ---------------------------------------------------------------------------
    def add_image(self, image_id, image_filename, image_info):
        with http_errors():
            if image_id:
                check_id(image_id)
            else:
                image_id = check_id(self._to_id(os.path.basename(image_filename))[0])
            if image_id in self._datastore.objects:
                raise HTTPException(409, f"image {image_id!r} already exists; nothing was overwritten (remove it first)")
            read_ct(image_filename, image_id)
        return super().add_image(image_id, image_filename, image_info)

    def remove_image(self, image_id):
        with http_errors():
            check_id(image_id)
        return super().remove_image(image_id)

    def get_image_uri(self, image_id):
        with http_errors():
            check_id(image_id)
            return self._inside(super().get_image_uri(image_id), "image")

    def get_image_info(self, image_id):
        with http_errors():
            check_id(image_id)
        return super().get_image_info(image_id)

    def update_image_info(self, image_id, info):
        with http_errors():
            check_id(image_id)
        return super().update_image_info(image_id, info)

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
        with http_errors():
            check_id(label_id, "label id")
            check_id(label_tag, "label tag")
        return super().update_label_info(label_id, label_tag, info)

    def remove_label(self, label_id, label_tag):
        with http_errors():
            check_id(label_id, "label id")
            check_id(label_tag, "label tag")
        return super().remove_label(label_id, label_tag)

    def save_label(self, image_id, label_filename, label_tag, label_info):
        label_info = dict(label_info or {})
        with http_errors():
            check_id(image_id)
            check_id(label_tag, "label tag")
            if image_id not in self._datastore.objects:
                raise HTTPException(404, f"image {image_id!r} is not in the datastore")
            image = read_volume(self.get_image_uri(image_id), "image", image_id)
            label_arr, label_affine = read_volume(label_filename, "label")
            check_label_geometry(image, (label_arr, label_affine), f"label for {image_id!r}")
            values = np.rint(label_arr).astype(np.int64)
            if values.min() < 0 or values.max() > 255:
                raise LabelMismatchError(f"label for {image_id!r} has values outside 0..255: not a label map")
            if "model" in label_info and label_tag != "final":  # a model's own output
                stored = from_model(values, label_info["model"])
            else:
                stored = remap_by_name(values, label_info.get("label_info"))

        present = {name: int(v) for name, v in STORED_LABELS.items() if np.any(stored == v)}
        label_info["structures"] = list(present)
        label_info["label_info"] = stored_label_info(stored)  # what the stored voxels mean
        existing = super().get_label_uri(image_id, label_tag)
        with tempfile.TemporaryDirectory(dir=self._datastore_path) as tmp:
            out = Path(tmp) / f"{image_id}.nii.gz"
            write_label(out, stored, image[1])
            if existing and os.path.isfile(existing):
                backup = self._history_dir(label_tag) / f"{image_id}.{time.strftime('%Y%m%d-%H%M%S')}.{time.time_ns() % 10**9:09d}.nii.gz"
                backup.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(existing, backup)
                logger.info("previous %s label of %s kept as %s", label_tag, image_id, backup)
            logger.info("label for %s (%s): %s", image_id, label_tag, json.dumps(present))
            saved = super().save_label(image_id, str(out), label_tag, label_info)
        if label_tag == "final" and self.dicom_export and present:
            # a DICOM-series image: the clinician's contours also as RTSTRUCT and SEG on the series
            extra = self.export_final(image_id, stored, image[1], label_info)
            if extra:
                super().update_label_info(image_id, label_tag, {**label_info, **extra})
        return saved

    def export_final(self, image_id: str, stored: np.ndarray, affine: np.ndarray, label_info: dict) -> dict:
        """Write a just-stored ``final`` label of a DICOM-series image as RTSTRUCT and SEG
        (:func:`contourcl.serving.series.export_label`); returns what to add to its label info
        (``{"dicom": {kind: path}}``, or ``{}`` for an image that is not from a series). A failed
        export is logged: the label is stored already, and is not lost for it."""
        try:
            written = export_label(self._datastore_path, image_id, stored, affine, "final", "clinician-reviewed")
        except Exception as err:  # the label is stored; a failed export must not lose it
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
