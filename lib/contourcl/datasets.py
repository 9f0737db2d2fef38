"""Finding labeled CT cases on disk.

Two layouts are understood:

- a MONAI Label studies folder: ``DIR/<id>.nii.gz`` with ``DIR/labels/final/<id>.nii.gz`` in the
  stored numbering (:data:`contourcl.labels.STORED_LABELS`), as ``sample-data/``;
- OpenKBP as converted in ``../shared/data/openkbp``: ``DIR/pt_*/ct.nii.gz`` with
  ``oar.nii.gz`` (OARs, stored numbering) and ``target.nii.gz`` (1 = PTV70, the ``gtv`` target).

Each case is a dict ``{"id", "image", "label", "numbering"}`` that
:func:`contourcl.training.finetune.finetune` takes.
"""

from __future__ import annotations

from pathlib import Path

from contourcl.labels import model_labels

_EXTS = (".nii.gz", ".nii", ".nrrd")


def _stem(path: Path) -> str:
    for ext in _EXTS:
        if path.name.endswith(ext):
            return path.name[: -len(ext)]
    return path.stem


def studies(folder: str | Path) -> list[Path]:
    """The CT images of a studies folder (either layout), sorted by id."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"no such folder: {folder}")
    kbp = sorted(folder.glob("*/ct.nii.gz"))
    if kbp:
        return sorted(kbp, key=lambda p: _natural(p.parent.name))
    return sorted((p for ext in _EXTS for p in folder.glob(f"*{ext}")), key=lambda p: _natural(_stem(p)))


def _natural(name: str):
    return [int(t) if t.isdigit() else t for t in __import__("re").split(r"(\d+)", name)]


def labeled_cases(folder: str | Path, model: str) -> list[dict]:
    """The cases of ``folder`` that have a label file usable by ``model``."""
    model_labels(model)  # raises for an unknown model
    cases = []
    for image in studies(folder):
        if image.name == "ct.nii.gz":  # OpenKBP
            label = image.parent / ("oar.nii.gz" if model == "oar" else "target.nii.gz")
            numbering = "stored" if model == "oar" else "model"
            case_id = image.parent.name
        else:
            case_id = _stem(image)
            label = Path(folder) / "labels" / "final" / image.name
            numbering = "stored"
        if label.is_file():
            cases.append({"id": case_id, "image": str(image), "label": str(label), "numbering": numbering})
    return cases
