"""A local datastore that checks what it is given before it stores anything.

On top of MONAI Label's ``LocalDatastore``:

- image ids and label tags must be safe file names (:func:`contourcl.ids.check_id`);
- an uploaded image must be a readable 3D volume, and may not replace an existing image;
- a label must be readable, lie on its image's grid (shape and affine), and its segments are
  renumbered by name (Slicer's ``label_info``) into the stored numbering
  (:func:`contourcl.labels.remap_by_name`);
- a ``final`` label that is replaced is first copied to ``.contourcl/label-history/``.

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

import nibabel as nib
import numpy as np
from fastapi import HTTPException
from monailabel.datastore.local import LocalDatastore

from contourcl.errors import LabelMismatchError
from contourcl.ids import check_id
from contourcl.labels import STORED_LABELS, from_model, remap_by_name
from contourcl.serving.errors import http_errors
from contourcl.volumes import check_label_geometry, read_volume

logger = logging.getLogger(__name__)


class SafeDatastore(LocalDatastore):
    """``LocalDatastore`` with input checks; see the module docstring."""

    def _history_dir(self, tag: str) -> Path:
        return Path(self._datastore_path) / ".contourcl" / "label-history" / tag

    # -- images ---------------------------------------------------------------------------
    def add_image(self, image_id, image_filename, image_info):
        with http_errors():
            if image_id:
                check_id(image_id)
            else:
                image_id = check_id(self._to_id(os.path.basename(image_filename))[0])
            if image_id in self._datastore.objects:
                raise HTTPException(409, f"image {image_id!r} already exists; nothing was overwritten (remove it first)")
            read_volume(image_filename, "image", name=image_id)
        return super().add_image(image_id, image_filename, image_info)

    def remove_image(self, image_id):
        with http_errors():
            check_id(image_id)
        return super().remove_image(image_id)

    def get_image_uri(self, image_id):
        with http_errors():
            check_id(image_id)
        return super().get_image_uri(image_id)

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
        return super().get_label_uri(label_id, label_tag)

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
            image = read_volume(self.get_image_uri(image_id), "image")
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
        existing = super().get_label_uri(image_id, label_tag)
        with tempfile.TemporaryDirectory(dir=self._datastore_path) as tmp:
            out = Path(tmp) / f"{image_id}.nii.gz"
            nii = nib.Nifti1Image(stored.astype(np.uint8), image[1])
            nii.set_qform(image[1], code=1)
            nii.set_sform(image[1], code=1)
            nib.save(nii, str(out))
            if existing and os.path.isfile(existing):
                backup = self._history_dir(label_tag) / f"{image_id}.{time.strftime('%Y%m%d-%H%M%S')}.{time.time_ns() % 10**9:09d}.nii.gz"
                backup.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(existing, backup)
                logger.info("previous %s label of %s kept as %s", label_tag, image_id, backup)
            logger.info("label for %s (%s): %s", image_id, label_tag, json.dumps(present))
            return super().save_label(image_id, str(out), label_tag, label_info)
