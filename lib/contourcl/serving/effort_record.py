"""What the server proposed, and what the clinician changed: the record behind correction effort.

Layout, under ``<studies>/.contourcl/effort/``::

    proposals/<model>/<image>.nii.gz      the last answer of <model> for <image> (the model's numbering)
    proposals/<model>/<image>.json        its model, model version, time and request parameters
    proposals/<model>/replaced/           earlier answers, kept: <image>.<time>.nii.gz and .json
    records.jsonl                         one line per final label and model, appended, never rewritten

:meth:`EffortRecord.keep_proposal` runs for every infer answer the server returns for a datastore
image (MONAI Label's ``original`` convention, per model: an image contoured by ``oar`` and by
``gtv`` has one proposal of each). :meth:`EffortRecord.score_final` runs for every final label
stored (Slicer, OHIF, the API, an imported RT Structure Set): for each model that proposed for the
image it appends the correction effort of every structure (:func:`contourcl.effort.correction_effort`)
against the answer that model gave, with the version that gave it; an image no model proposed
for is recorded with no figures, saying so. A label saved twice is scored twice; the latest counts.

Every file is written whole (:mod:`contourcl.files`); a record line that cannot be read (a torn
last line after a crash) is skipped with a log line, and scoring never stops a label from being
stored.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading
import time
from pathlib import Path

import numpy as np

from contourcl.data.labels import model_labels, to_model
from contourcl.data.volumes import read_nifti
from contourcl.effort import DEFAULT_EFFORT_TOLERANCE_MM, correction_effort
from contourcl.files import atomic_copy, atomic_write_text, fsync_dir
from contourcl.ids import check_id

logger = logging.getLogger(__name__)

#: request keys kept with a proposal, besides the clicks on each of the model's structures (Slicer's
#: DeepEdit form); the rest, e.g. uploaded file paths, say nothing about it
_KEPT_PARAMS = ("largest_component", "label", "foreground", "background")


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S")


class EffortRecord:
    """The proposals and the effort records of one studies folder."""

    def __init__(self, studies: str | Path, tolerance_mm: float = DEFAULT_EFFORT_TOLERANCE_MM):
        self.root = Path(studies) / ".contourcl" / "effort"
        self.records_file = self.root / "records.jsonl"
        self.tolerance_mm = float(tolerance_mm)
        self._lock = threading.Lock()
        self._read: tuple[tuple, list[dict]] = ((), [])  # (the record file's state, its records): /info/ reads it often

    # -- proposals ----------------------------------------------------------------------------
    def _proposal_paths(self, image_id: str, model: str) -> tuple[Path, Path]:
        folder = self.root / "proposals" / check_id(model, "model")
        return folder / f"{check_id(image_id)}.nii.gz", folder / f"{image_id}.json"

    def keep_proposal(self, image_id: str, model: str, label_file: str | Path, result: dict, request: dict) -> dict:
        """Keep ``label_file`` (``model``'s answer for ``image_id``, in its numbering) as that model's
        proposal for the image; an earlier one is moved to ``replaced/``. Returns what is kept."""
        label, meta_file = self._proposal_paths(image_id, model)
        meta = {"image": image_id, "model": model, "model_version": result.get("model_version"), "time": _now(),
                "params": {k: v for k, v in request.items() if k in _KEPT_PARAMS or k in model_labels(model)}}
        with self._lock:
            if label.is_file():
                self._retire(label, meta_file)
            atomic_copy(label_file, label, point="proposal-written")
            atomic_write_text(meta_file, json.dumps(meta, indent=1))
        return meta

    def _retire(self, label: Path, meta_file: Path) -> None:
        replaced = label.parent / "replaced"
        replaced.mkdir(parents=True, exist_ok=True)
        stamp = f"{time.strftime('%Y%m%d-%H%M%S')}.{time.time_ns() % 10**9:09d}"
        base = label.name.removesuffix(".nii.gz")
        os.replace(label, replaced / f"{base}.{stamp}.nii.gz")
        if meta_file.is_file():
            os.replace(meta_file, replaced / f"{base}.{stamp}.json")
        fsync_dir(replaced)

    def proposals(self, image_id: str) -> dict[str, tuple[Path, dict]]:
        """``{model: (label file, meta)}`` of the proposals kept for ``image_id``."""
        out = {}
        folder = self.root / "proposals"
        for model_dir in sorted(folder.iterdir()) if folder.is_dir() else []:
            label, meta_file = model_dir / f"{image_id}.nii.gz", model_dir / f"{image_id}.json"
            if label.is_file() and meta_file.is_file():
                try:
                    out[model_dir.name] = (label, json.loads(meta_file.read_text()))
                except (OSError, ValueError) as err:
                    logger.warning("proposal of %s for %s cannot be read (%s): not scored", model_dir.name, image_id, err)
        return out

    # -- scoring a final label ----------------------------------------------------------------
    def score_final(self, image_id: str, final_label: str | Path) -> list[dict]:
        """Append the correction effort of the final label of ``image_id`` (stored numbering) against
        each model's proposal; returns the records appended. Never raises: a failure is logged."""
        try:
            return self._score_final(image_id, Path(final_label))
        except Exception as err:  # noqa: BLE001 - the label is stored already; scoring it must not fail the save
            logger.warning("final label of %s stored, but its correction effort could not be recorded: %s", image_id, err)
            return []

    def _score_final(self, image_id: str, final_label: Path) -> list[dict]:
        final, affine = read_nifti(final_label)
        final = np.rint(np.asarray(final)).astype(np.int64)
        found = self.proposals(image_id)
        records = []
        for model, (label_file, meta) in found.items():
            proposed, proposed_affine = read_nifti(label_file)
            if proposed.shape != final.shape or not np.allclose(proposed_affine, affine, atol=1e-3):
                records.append(self._record(image_id, model, meta, None, "the proposal is not on the final label's grid: not scored"))
                continue
            structures = correction_effort(np.rint(proposed).astype(np.int64), to_model(final, model), model_labels(model), affine,
                                           self.tolerance_mm)
            records.append(self._record(image_id, model, meta, structures))
        if not found:
            records.append(self._record(image_id, None, {}, None, "no model proposed for this image: no effort figures"))
        for record in records:
            self._append(record)
        logger.info("correction effort of %s: %s", image_id, "; ".join(
            f"{r['model']}: {sum(s['added_path_length_mm'] for s in r['structures'].values()):.0f} mm added" if r.get("structures") else
            f"{r['model']}: {r.get('note')}" for r in records))
        return records

    def _record(self, image_id: str, model: str | None, meta: dict, structures: dict | None, note: str | None = None) -> dict:
        record = {"image": image_id, "model": model, "model_version": meta.get("model_version"), "proposed": meta.get("time"),
                  "time": _now(), "tolerance_mm": self.tolerance_mm, "structures": structures}
        if note:
            record["note"] = note
        return record

    def _append(self, record: dict) -> None:
        """One line at the end of the record, synced; a crash can at worst tear this line."""
        line = json.dumps(record, sort_keys=True, allow_nan=False) + "\n"
        self.root.mkdir(parents=True, exist_ok=True)
        with self._lock:
            fd = os.open(self.records_file, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                size = os.fstat(fd).st_size
                if size and os.pread(fd, 1, size - 1) != b"\n":
                    line = "\n" + line  # a line torn by a crash stays on its own, unreadable, and is skipped
                os.write(fd, line.encode())
                os.fsync(fd)
            finally:
                os.close(fd)

    # -- reading ------------------------------------------------------------------------------
    def records(self) -> list[dict]:
        """Every record, oldest first; lines that cannot be read are skipped and logged; a file that
        is not text at all is set aside (``records.jsonl.corrupt-<time>``) and a new one begun."""
        try:
            st = self.records_file.stat()
        except FileNotFoundError:
            return []
        state = (st.st_mtime_ns, st.st_size, st.st_ino)
        if self._read[0] == state:
            return list(self._read[1])
        try:
            text = self.records_file.read_text()
        except UnicodeDecodeError:
            aside = self.records_file.with_name(f"records.jsonl.corrupt-{time.strftime('%Y%m%d-%H%M%S')}")
            shutil.move(self.records_file, aside)
            logger.error("the effort record %s is not text: set aside as %s; a new record begins", self.records_file, aside)
            return []
        out = []
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                out.append(json.loads(line))
            except ValueError:
                logger.warning("effort record %s: line %d cannot be read (a write cut short?): skipped", self.records_file, number)
        self._read = (state, out)
        return list(out)

    def latest(self) -> list[dict]:
        """The records that count: the latest per image and model."""
        latest: dict[tuple, dict] = {}
        for record in self.records():
            latest[(record.get("image"), record.get("model"))] = record
        return list(latest.values())
