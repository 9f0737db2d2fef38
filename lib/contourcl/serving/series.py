"""DICOM CT series in a local studies folder: read in as images, contours written back as DICOM.

A clinic exports CTs as folders of DICOM files. :func:`ingest_series` finds every CT series in
the studies folder's subfolders and writes each once as ``<studies>/<id>.nii.gz`` (MONAI Label's
datastore serves files), remembering in ``.contourcl/series.json`` which series each image came
from; it is written again only when the series' files change. A series that cannot be a CT
(tilted gantry, gaps, mixed geometry, another modality) is left out with its reason, logged and
listed (:func:`refused_series`), never guessed at. An RTSTRUCT beside a series (an approved
plan's structure set) becomes the image's final label when it has none: a clinic's archive is
training data.

:func:`export_label` writes a ``final`` label of such an image as a DICOM RT Structure Set and a
DICOM Segmentation on the series' own grid, into ``.contourcl/dicom/<id>/`` (not into the series
folder: a SEG there would read as a second image series): what a treatment planning system
imports.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path

from contourcl.data.dicom_series import list_series, read_series_geometry, write_nifti_from_series
from contourcl.data.labels import STORED_LABELS
from contourcl.data.rtstruct import write_rtstruct
from contourcl.data.seg import write_seg
from contourcl.errors import ContourCLError
from contourcl.files import atomic_write_text

logger = logging.getLogger(__name__)

#: folders of the studies folder that hold no series of the clinic's (MONAI Label's and ours)
SKIP = {"labels", ".contourcl", "model", "logs"}


def _registry(studies: Path) -> Path:
    return studies / ".contourcl" / "series.json"


def _read(studies: Path) -> dict:
    try:
        return json.loads(_registry(studies).read_text())
    except (OSError, ValueError):
        return {"images": {}, "refused": {}}


def _write(studies: Path, registry: dict) -> None:
    atomic_write_text(_registry(studies), json.dumps(registry, indent=1, sort_keys=True))


def read_registry(studies: str | Path) -> dict:
    """The studies folder's registry of series images (``{"images": {id: entry}, "refused": {...}}``)."""
    return _read(Path(studies))


def write_registry(studies: str | Path, registry: dict) -> None:
    """Replace the registry (atomically: a reader sees the old or the new one)."""
    _write(Path(studies), registry)


def convert_series(studies: str | Path, image_id: str, folder: str | Path, series_uid: str, state: str, **extra) -> dict:
    """Write the series ``series_uid`` under ``folder`` (inside ``studies``) as ``<studies>/<image_id>.nii.gz``
    (atomically) and return its registry entry (``folder`` relative to ``studies``, ``series_uid``,
    ``state``, ``time`` and ``extra``); the caller stores the entry. Raises what the series reader
    raises for a series that is not a usable CT."""
    studies, folder = Path(studies), Path(folder)
    tmp = studies / ".contourcl" / f".{image_id}.{os.getpid()}.{time.time_ns()}.nii.gz"
    tmp.parent.mkdir(parents=True, exist_ok=True)
    try:
        write_nifti_from_series(folder, tmp, series_uid)
        os.replace(tmp, studies / f"{image_id}.nii.gz")
    finally:
        tmp.unlink(missing_ok=True)
    return {"folder": str(folder.relative_to(studies)), "series_uid": series_uid, "state": state,
            "time": time.strftime("%Y-%m-%dT%H:%M:%S"), **extra}


def _fingerprint(files) -> str:
    """The series' state: its files' names, sizes and modification times."""
    h = hashlib.sha256()
    for f in sorted(map(str, files)):
        st = os.stat(f)
        h.update(f"{f}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def _image_id(folder: Path, index: int, count: int) -> str:
    """A safe image id from the folder name (and the series' rank when a folder holds several)."""
    base = "".join(c if c.isalnum() or c in "-_." else "_" for c in folder.name).strip("._") or "series"
    return base if count == 1 else f"{base}_{index + 1}"


def ingest_series(studies: str | Path) -> dict[str, str]:
    """Make every CT series under ``studies``' subfolders a datastore image; ``{image id: series folder}``."""
    studies = Path(studies)
    registry = _read(studies)
    images, refused = registry.setdefault("images", {}), {}
    folders = registry.setdefault("folders", {})  # folder name -> its files' state when last ingested
    found: dict[str, str] = {}
    for folder in sorted(p for p in studies.iterdir() if p.is_dir() and p.name not in SKIP and not p.name.startswith(".")):
        # a folder whose files have not changed since it was ingested is not read again (every
        # start of the server and of its training and scoring processes comes through here)
        folder_state = _fingerprint(p for p in folder.rglob("*") if p.is_file())
        known = folders.get(folder.name, {})
        if known.get("state") == folder_state and all((studies / f"{i}.nii.gz").is_file() for i in known.get("images", [])):
            found.update({i: images[i]["folder"] for i in known.get("images", []) if i in images})
            refused.update(known.get("refused", {}))
            continue
        refused_before = set(refused)
        found_before = set(found)
        _ingest_folder(studies, folder, images, refused, found)
        folders[folder.name] = {"state": folder_state, "images": sorted(set(found) - found_before),
                                "refused": {k: v for k, v in refused.items() if k not in refused_before}}
    for what, reason in refused.items():
        logger.warning("DICOM series %s left out: %s", what, reason)
    registry["refused"] = refused
    _write(studies, registry)
    return found


def _ingest_folder(studies: Path, folder: Path, images: dict, refused: dict, found: dict) -> None:
    """:func:`ingest_series` for one patient folder: convert its new or changed CT series, name
    the refused ones, take a final label from an RTSTRUCT beside a series without one."""
    try:
        series = [s for s in list_series(folder)]
    except (ContourCLError, OSError) as err:
        refused[folder.name] = str(err)
        return
    cts = [s for s in series if s.modality == "CT"]
    for s in series:
        if s.modality not in ("CT", "SEG", "RTSTRUCT"):
            refused[f"{folder.name}:{s.series_uid}"] = f"a {s.modality or 'non-CT'} series, not a CT"
    for index, s in enumerate(cts):
        image_id = _image_id(folder, index, len(cts))
        out = studies / f"{image_id}.nii.gz"
        state = _fingerprint(s.files)
        entry = images.get(image_id, {})
        if out.is_file() and entry.get("series_uid") == s.series_uid and entry.get("state") == state:
            found[image_id] = entry["folder"]
            _label_from_rtstruct(studies, folder, image_id, s.series_uid, entry, refused)  # an RTSTRUCT added since
            continue
        if out.is_file() and image_id not in images:
            refused[f"{folder.name}:{s.series_uid}"] = f"{out.name} already exists and is not from this series: not overwritten"
            continue
        try:
            images[image_id] = convert_series(studies, image_id, folder, s.series_uid, state)
        except (ContourCLError, OSError, ValueError) as err:
            refused[f"{folder.name}:{s.series_uid}"] = str(err)
            continue
        found[image_id] = images[image_id]["folder"]
        logger.info("DICOM series %s (%d files) -> image %s", folder.name, len(s.files), image_id)
        _label_from_rtstruct(studies, folder, image_id, s.series_uid, images[image_id], refused)



def _label_from_rtstruct(studies: Path, folder: Path, image_id: str, series_uid: str, entry: dict, refused: dict) -> None:
    """An approved plan's structure set beside the series becomes the image's final label.

    Only when the image has no final label yet (a clinician's submission is never replaced), and
    only from an RTSTRUCT in the series' frame of reference (several: the newest file). ROI names
    are mapped through the alias table; unmapped ones are recorded, not guessed.
    """
    from contourcl.data.rtstruct import find_structure_sets, read_rtstruct
    from contourcl.data.volumes import write_label

    final = studies / "labels" / "final" / f"{image_id}.nii.gz"
    if final.exists():
        return
    candidates = []
    for path in find_structure_sets(folder):
        try:
            label, mapped, unmapped = read_rtstruct(path, folder, STORED_LABELS, series_uid=series_uid)
        except (ContourCLError, OSError, ValueError) as err:
            logger.info("RTSTRUCT %s not used for %s: %s", path.name, image_id, err)
            continue
        if mapped:
            candidates.append((os.stat(path).st_mtime_ns, path, label, mapped, unmapped))
    if not candidates:
        return
    _, path, label, mapped, unmapped = max(candidates, key=lambda c: c[0])
    final.parent.mkdir(parents=True, exist_ok=True)
    write_label(final, label, read_series_geometry(folder, series_uid).affine)
    entry["label_from"] = {"rtstruct": str(path.relative_to(studies)), "mapped": mapped, "unmapped": unmapped}
    if unmapped:
        refused[f"{folder.name}:{path.name}"] = f"ROI names not mapped to a structure (left out of the label): {unmapped}"
    logger.info("final label of %s from its RTSTRUCT %s: %s", image_id, path.name, sorted(set(mapped.values())))


def refused_series(studies: str | Path) -> dict[str, str]:
    """``{folder[:series uid]: reason}`` of the series the last :func:`ingest_series` left out."""
    return dict(_read(Path(studies)).get("refused", {}))


def series_of(studies: str | Path, image_id: str) -> tuple[Path, str] | None:
    """The series folder and SeriesInstanceUID an image came from, ``None`` for other images."""
    entry = _read(Path(studies)).get("images", {}).get(image_id)
    if not entry:
        return None
    return Path(studies) / entry["folder"], entry["series_uid"]


def export_label(studies: str | Path, image_id: str, label, affine, tag: str, description: str) -> dict[str, str]:
    """Write a stored-numbering label of a series image as RTSTRUCT and SEG; ``{kind: path}``.

    Nothing is written for an image that did not come from a series. Files are named by the
    label's tag and time, so an earlier export is never overwritten.
    """
    source = series_of(studies, image_id)
    if source is None:
        return {}
    folder, series_uid = source
    geometry = read_series_geometry(folder, series_uid)
    out_dir = Path(studies) / ".contourcl" / "dicom" / image_id
    stamp = f"{time.strftime('%Y%m%d-%H%M%S')}-{time.time_ns() // 1000 % 10**6:06d}"  # two saves in a second: two files
    written = {}
    # a clinician's final label started from the model and was corrected by hand
    # what a viewer's series list shows: a final label is the clinician's, not the model's
    common = dict(geometry=geometry, algorithm_name="ContourCL", algorithm_version=description,
                  generation_algorithm="SEMIAUTOMATIC" if tag == "final" else "AUTOMATIC",
                  series_description=f"ContourCL {tag} ({description})"[:64])
    written["rtstruct"] = str(write_rtstruct(label, affine, STORED_LABELS, None, out_dir / f"RTSTRUCT_{tag}_{stamp}.dcm",
                                             structure_set_label=f"ContourCL {tag}"[:16], **common))
    seg = write_seg(label, affine, STORED_LABELS, None, out_dir / f"SEG_{tag}_{stamp}.dcm", **common)
    if seg is not None:
        written["seg"] = str(seg)
    return written
