"""Finding labeled CT cases on disk.

Two layouts are understood:

- a MONAI Label studies folder: ``DIR/<id>.nii.gz`` with ``DIR/labels/final/<id>.nii.gz`` in the
  stored numbering (:data:`contourcl.data.labels.STORED_LABELS`), as ``sample-data/``;
- OpenKBP as converted (``DIR/pt_*/ct.nii.gz`` with ``oar.nii.gz``, OARs in the stored
  numbering, and ``target.nii.gz``, 1 = PTV70, the ``gtv`` target); :func:`openkbp_root` finds
  its root folder (``train-pats/``, ``validation-pats/``).

Each case is a dict ``{"id", "image", "label"}`` that
:func:`contourcl.training.finetune.engine.finetune` takes. A label file not in the stored
numbering (OpenKBP's target) says how its values map into it (``"label_values"``); it is
renumbered once, when read (:func:`read_label`, :class:`contourcl.data.transforms.LabelToModeld`),
so everything after reading sees the stored numbering.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import NamedTuple

import numpy as np

from contourcl.data.labels import GTV_NAME, STORED_LABELS, model_labels, to_model, to_stored
from contourcl.errors import DataNotFoundError, InvalidImageError

IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd")
#: names that mark a label/structure file, never an image
LABEL_WORDS = ("label", "mask", "seg", "oar", "target", "gtv", "ptv", "ctv", "struct", "dose", "possible")
#: file names of the CT inside a per-case folder (OpenKBP: pt_*/ct.nii.gz)
CASE_IMAGE_NAMES = ("ct", "image", "img", "ct_image")
#: the environment variable naming the OpenKBP root folder (holding train-pats/, validation-pats/)
OPENKBP_ENV = "CONTOURCL_OPENKBP"


def openkbp_root(given: str | os.PathLike | None = None, option: str = "--data", required: bool = True) -> Path | None:
    """The OpenKBP root folder (``train-pats/``, ``validation-pats/``): ``given`` (a script's
    ``option``) when set, else the environment variable ``CONTOURCL_OPENKBP``.

    The one place that knows where OpenKBP lies, so that no script hard-codes a machine's path.
    With neither, a :class:`~contourcl.errors.DataNotFoundError` names both (``required``), or
    None (a caller with a fallback, e.g. synthetic volumes). A folder that does not exist is an
    error either way: a mistyped path must not pass for absent data.
    """
    value = given if given not in (None, "") else os.environ.get(OPENKBP_ENV) or None
    if value is None:
        if not required:
            return None
        raise DataNotFoundError(f"the OpenKBP data are needed: give {option} or set {OPENKBP_ENV} to the OpenKBP folder "
                                "(the one holding train-pats/ and validation-pats/)")
    root = Path(value)
    if not root.is_dir():
        source = option if given not in (None, "") else OPENKBP_ENV
        raise DataNotFoundError(f"{source}: no folder {root} (the OpenKBP folder holding train-pats/ and validation-pats/)")
    return root


def openkbp_or_exit(parser, given: str | os.PathLike | None, option: str = "--data") -> Path:
    """:func:`openkbp_root` for a script's ``argparse`` ``parser``: missing data are its usage
    error (the message names the option and the environment variable; exit code 2)."""
    try:
        return openkbp_root(given, option)
    except DataNotFoundError as err:
        parser.error(str(err))


def _strip_suffix(name: str) -> str:
    for suffix in IMAGE_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def is_image_file(path: Path) -> bool:
    return path.is_file() and path.name.lower().endswith(IMAGE_SUFFIXES) and not path.name.startswith(".")


def is_label_name(path: Path) -> bool:
    stem = _strip_suffix(path.name).lower()
    return any(word in stem for word in LABEL_WORDS)


def find_ct_images(sources: str | os.PathLike | Iterable[str | os.PathLike]) -> list[Path]:
    """CT files named by ``sources``: files, flat folders of images, or folders of case folders.

    A folder contributes its own image files (label-like names such as ``oar``, ``target``,
    ``*_label`` and subfolders such as ``labels/`` are skipped) and, for each subfolder,
    its ``ct.nii.gz`` (or ``image.nii.gz``; the OpenKBP layout ``pt_*/ct.nii.gz``).
    """
    if isinstance(sources, (str, os.PathLike)):
        sources = [sources]
    found: list[Path] = []
    for source in sources:
        p = Path(source)
        if p.is_file():
            found.append(p)
            continue
        if not p.is_dir():
            raise InvalidImageError(f"{p} is neither an image file nor a folder")
        entries = sorted(p.iterdir())
        found += [f for f in entries if is_image_file(f) and not is_label_name(f)]
        for sub in entries:
            if not sub.is_dir() or sub.name.startswith(".") or "label" in sub.name.lower():
                continue
            for name in CASE_IMAGE_NAMES:
                hits = [sub / (name + s) for s in IMAGE_SUFFIXES if (sub / (name + s)).is_file()]
                if hits:
                    found.append(hits[0])
                    break
    unique = list(dict.fromkeys(found))
    if not unique:
        raise InvalidImageError(f"no CT images found in {[str(s) for s in sources]}")
    return unique


def case_id(path: Path) -> str:
    """``pt_1`` for ``.../pt_1/ct.nii.gz``, ``case01`` for ``.../case01.nii.gz``."""
    stem = _strip_suffix(path.name)
    return path.parent.name if stem.lower() in CASE_IMAGE_NAMES else stem


def labeled_cases(folder: str | Path, model: str) -> list[dict]:
    """The cases of ``folder`` that have a label file usable by ``model``."""
    model_labels(model)  # raises for an unknown model
    cases = []
    for image in find_ct_images(folder):
        extra = {}
        if image.name == "ct.nii.gz":  # OpenKBP
            label = image.parent / ("oar.nii.gz" if model == "oar" else "target.nii.gz")
            if model != "oar":  # target.nii.gz: 1 = PTV70, the stored GTV
                extra = {"label_values": {1: STORED_LABELS[GTV_NAME]}}
        else:
            label = Path(folder) / "labels" / "final" / image.name
        if label.is_file():
            cases.append({"id": case_id(image), "image": str(image), "label": str(label), **extra})
    return cases


def only_ids(cases: list[dict], ids: str, model: str, folder: str | Path) -> list[dict]:
    """The :func:`labeled_cases` entries whose id is in ``ids`` (comma-separated, as ``--ids``
    takes them), in their order; a ValueError names the ids ``folder`` has no labeled case of."""
    wanted = {i.strip() for i in ids.split(",") if i.strip()}
    missing = sorted(wanted - {c["id"] for c in cases})
    if missing:
        raise ValueError(f"--ids: no labeled {model} case {missing} in {folder}")
    return [c for c in cases if c["id"] in wanted]


def read_label(case: Mapping) -> tuple[np.ndarray, np.ndarray]:
    """A case's label map in the stored numbering, and its affine (as nibabel reads it)."""
    from contourcl.data.volumes import read_nifti

    label, affine = read_nifti(case["label"])
    return to_stored(np.asarray(label), case.get("label_values")), affine


class ScoredReference(NamedTuple):
    """A case's reference as it is scored (:func:`read_scored_reference`)."""

    label: np.ndarray  # in the model's numbering, background on the slices that do not image the patient
    full: np.ndarray  # in the model's numbering, every slice
    imaged: tuple[int, np.ndarray]  # :func:`contourcl.data.volumes.imaged_slices` of the case's CT
    affine: np.ndarray  # the CT's (and the label's) affine
    set_aside: dict  # {structure: reason} of the reference structures set aside (contourcl.data.reference_check)


def read_scored_reference(case: Mapping, model: str, ct: tuple[np.ndarray, np.ndarray] | None = None) -> ScoredReference:
    """A labeled case's reference in ``model``'s numbering on the slices that image the patient,
    its implausible structures set aside (:mod:`contourcl.data.reference_check`), on the CT's own
    grid: the label ``contourcl evaluate`` scores against, read from the files
    (:func:`contourcl.evaluation.prepare_cases` does the same while preprocessing).
    ``ct``: the case's CT as :func:`~contourcl.data.volumes.read_nifti` returns it, when the
    caller has read it already (it is read from ``case["image"]`` otherwise)."""
    from contourcl.data.reference_check import checked_reference
    from contourcl.data.volumes import blank_slices, imaged_slices, read_nifti

    ct, affine = read_nifti(case["image"]) if ct is None else ct
    imaged = imaged_slices(np.asarray(ct), affine)
    full, faults = checked_reference(np.asarray(ct), to_model(read_label(case)[0], model), affine, model_labels(model), imaged)
    return ScoredReference(blank_slices(full, imaged)[0], full, imaged, np.asarray(affine), faults)


def dicom_cases(folder: str | Path, model: str, workdir: str | Path) -> list[dict]:
    """Labeled cases from DICOM: one subfolder per patient with a CT series and its RTSTRUCT.

    Each patient's series is written as ``<workdir>/<subfolder>.nii.gz`` and its RTSTRUCT,
    rasterised on the series' grid with ROI names mapped through the alias table
    (:func:`contourcl.data.rtstruct.read_rtstruct`), as ``<workdir>/labels/final/<subfolder>.nii.gz``
    in the stored numbering; the cases are then those of :func:`labeled_cases` on ``workdir``. A
    subfolder without a CT series or an RTSTRUCT is skipped; one with several RTSTRUCTs is an error
    naming them (which one is the reference must not be guessed).
    """
    from contourcl.data.dicom_series import read_series_geometry, write_nifti_from_series
    from contourcl.data.rtstruct import find_structure_sets, read_rtstruct
    from contourcl.data.volumes import write_label

    folder, workdir = Path(folder), Path(workdir)
    (workdir / "labels" / "final").mkdir(parents=True, exist_ok=True)
    for sub in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
        structure_sets = find_structure_sets(sub)
        if not structure_sets:
            continue
        if len(structure_sets) > 1:
            raise InvalidImageError(f"{sub.name}: several RTSTRUCTs {[p.name for p in structure_sets]}: keep the one to evaluate against")
        geometry = read_series_geometry(sub)
        label, _, _ = read_rtstruct(structure_sets[0], sub, STORED_LABELS)
        write_nifti_from_series(sub, workdir / f"{sub.name}.nii.gz")
        write_label(workdir / "labels" / "final" / f"{sub.name}.nii.gz", label, geometry.affine)
    return labeled_cases(workdir, model)
