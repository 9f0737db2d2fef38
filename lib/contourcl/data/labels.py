"""Structure names and label numbering.

The datastore keeps one label map per CT in the *stored* numbering below (the OARs, then the
target). Each model sees only its own structures, numbered from 1 in its own order. Slicer
numbers segments in its own order and sends their names in ``label_info``: values are always
mapped by name, never trusted as numbers (MONAILabel #565, #1856).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np

from contourcl.errors import UnknownLabelError, UnknownModelError

#: TG-263 names of the organs at risk, in the ``oar`` model's order.
OAR_NAMES: tuple[str, ...] = (
    "Brainstem",
    "SpinalCord",
    "Parotid_R",
    "Parotid_L",
    "Mandible",
    "Larynx",
    "Esophagus",
)
#: The tumour target of the ``gtv`` model. On OpenKBP this is PTV70, the closest real target.
GTV_NAME = "GTV"

#: Stored numbering: one label map per CT in the datastore.
STORED_LABELS: dict[str, int] = {**{n: i + 1 for i, n in enumerate(OAR_NAMES)}, GTV_NAME: len(OAR_NAMES) + 1}

#: Other names a client may send for a stored structure (case is ignored everywhere).
ALIASES: dict[str, str] = {"ptv70": GTV_NAME, "ptv_70": GTV_NAME, "tumor": GTV_NAME, "tumour": GTV_NAME}

#: Each model's structures, numbered from 1 (0 is background).
MODEL_LABELS: dict[str, dict[str, int]] = {
    "oar": {n: i + 1 for i, n in enumerate(OAR_NAMES)},
    "gtv": {GTV_NAME: 1},
}


def register_model(model: str, structures: Iterable[str]) -> dict[str, int]:
    """Add ``model`` contouring ``structures`` (stored structure names, numbered from 1 in this
    order) to :data:`MODEL_LABELS`; an app's model config does this for a model of its own.

    Registering a known model again with other structures is an error: a model file's numbering
    must never change under it.
    """
    names = [canonical_name(n) for n in structures]
    if not names or None in names or len(set(names)) != len(names):
        raise UnknownLabelError(f"model {model!r}: structures must be distinct stored structure names, not {list(structures)}")
    labels = {n: i + 1 for i, n in enumerate(names)}
    if model in MODEL_LABELS and MODEL_LABELS[model] != labels:
        raise UnknownModelError(f"model {model!r} already contours {MODEL_LABELS[model]}, not {labels}")
    MODEL_LABELS[model] = labels
    return dict(labels)


def model_labels(model: str) -> dict[str, int]:
    """The structures of ``model`` as ``{name: value}``; raises for an unknown model."""
    try:
        return dict(MODEL_LABELS[model])
    except KeyError:
        raise UnknownModelError(f"unknown model {model!r}; known models: {sorted(MODEL_LABELS)}") from None


def mirror_channels(labels: Mapping[str, int]) -> list[int]:
    """Output channel order of a model seen in a left-right mirror: ``*_R`` and ``*_L`` swap.

    ``labels`` is a model's ``{name: value}``; entry ``c`` of the result is the channel whose
    structure is channel ``c``'s mirror image (background and midline structures map to themselves).
    """
    order = list(range(max(labels.values(), default=0) + 1))
    for name, value in labels.items():
        for side, other in (("_R", "_L"), ("_L", "_R")):
            if name.endswith(side) and name[: -len(side)] + other in labels:
                order[value] = labels[name[: -len(side)] + other]
    return order


def canonical_name(name: str) -> str | None:
    """The stored structure that ``name`` means, ``None`` for background; raises if unknown."""
    key = str(name).strip().lower()
    if key in ("", "background", "bg"):
        return None
    for stored in STORED_LABELS:
        if stored.lower() == key:
            return stored
    if key in ALIASES:
        return ALIASES[key]
    raise UnknownLabelError(
        f"unknown structure name {name!r}; known: {list(STORED_LABELS)} (aliases {sorted(ALIASES)})"
    )


def values_in(label: np.ndarray) -> set[int]:
    """The distinct values of an integer label map.

    ``np.unique`` sorts every voxel: 13 s for a 512 x 512 x 150 int64 map on this machine
    (benchmarks/bench_dicomweb.py), where counting with ``np.bincount`` takes a fraction of a
    second; label values are small non-negative integers, so they are counted.
    """
    label = np.asarray(label)
    if label.size == 0:
        return set()
    if np.issubdtype(label.dtype, np.integer) or label.dtype == bool:
        lo, hi = int(label.min()), int(label.max())
        if lo >= 0 and hi < 1 << 16:
            return {int(v) for v in np.flatnonzero(np.bincount(label.ravel().astype(np.intp, copy=False), minlength=1))}
    return {int(v) if float(v).is_integer() else float(v) for v in np.unique(label)}


def remap_by_name(label: np.ndarray, label_info: Iterable[Mapping] | None) -> np.ndarray:
    """Renumber a client's label map into the stored numbering, by segment name.

    ``label_info`` is Slicer's list of ``{"name": ..., "idx": ...}``. Without it the values are
    taken to be in the stored numbering already. Unknown names, and voxel values that no entry
    names, are errors: guessing would put a contour on the wrong organ.
    """
    label = np.asarray(label)
    values = values_in(label) - {0}
    if label_info is None:
        unknown = values - set(STORED_LABELS.values())
        if unknown:
            raise UnknownLabelError(
                f"label values {sorted(unknown)} are not in the stored numbering {STORED_LABELS}; "
                "send label_info to map segments by name"
            )
        return label.astype(np.uint8)

    mapping: dict[int, int] = {}
    unknown_names = []
    if isinstance(label_info, (str, bytes)) or not isinstance(label_info, Iterable):
        raise UnknownLabelError(f"label_info must be a list of {{'name': ..., 'idx': ...}}, not {label_info!r}")
    for entry in label_info:
        if not isinstance(entry, Mapping):
            raise UnknownLabelError(f"label_info entry {entry!r} is not {{'name': ..., 'idx': ...}}")
        name, idx = entry.get("name"), _label_index(entry)
        if idx in mapping:
            raise UnknownLabelError(f"label_info gives value {idx} twice (again as {name!r}): each segment needs its own value")
        try:
            stored = canonical_name(name)
        except UnknownLabelError:
            unknown_names.append(name)
            continue
        mapping[idx] = 0 if stored is None else STORED_LABELS[stored]
    if unknown_names:
        raise UnknownLabelError(f"unknown structure names {unknown_names}; known: {list(STORED_LABELS)}")
    unnamed = values - set(mapping)
    if unnamed:
        raise UnknownLabelError(f"label values {sorted(unnamed)} have no entry in label_info {list(label_info)}")

    out = np.zeros(label.shape, dtype=np.uint8)
    for idx, stored_value in mapping.items():
        out[label == idx] = stored_value
    return out


def _label_index(entry: Mapping) -> int:
    """The voxel value of a ``label_info`` entry: an integer 0..255 (``3`` or ``3.0``), else an error."""
    idx = entry.get("idx")
    if idx is None:
        raise UnknownLabelError(f"label_info entry {dict(entry)!r} has no 'idx'")
    if isinstance(idx, bool) or not isinstance(idx, (int, float)) or float(idx) != int(idx) or not 0 <= int(idx) <= 255:
        raise UnknownLabelError(f"label_info entry {dict(entry)!r}: 'idx' must be an integer label value 0..255")
    return int(idx)


def stored_label_info(stored: np.ndarray) -> list[dict]:
    """Slicer's ``label_info`` of a stored label map: the structures it holds, in stored numbering."""
    present = values_in(stored) - {0}
    return [{"name": name, "idx": value} for name, value in STORED_LABELS.items() if value in present]


def to_stored(label: np.ndarray, label_values: Mapping[int, int] | None = None) -> np.ndarray:
    """A label file's values in the stored numbering: ``label_values`` maps the file's values
    (``{file value: stored value}``, e.g. OpenKBP's target ``{1: 8}``); ``None``: already stored."""
    label = np.rint(np.asarray(label)).astype(np.int64)
    if not label_values:
        return label
    lut = np.zeros(max(int(label.max(initial=0)), *map(int, label_values)) + 1, dtype=np.int64)
    for value, stored in label_values.items():
        lut[int(value)] = int(stored)
    return lut[np.clip(label, 0, None)]


def to_model(stored: np.ndarray, model: str) -> np.ndarray:
    """Extract ``model``'s structures from a stored label map, numbered as the model numbers them."""
    labels = model_labels(model)
    lut = np.zeros(max(STORED_LABELS.values()) + 1, dtype=np.uint8)
    for name, value in labels.items():
        lut[STORED_LABELS[name]] = value
    stored = np.asarray(stored)
    if stored.size and (stored.min() < 0 or stored.max() >= lut.size):
        raise UnknownLabelError(f"stored label has values outside 0..{lut.size - 1}")
    return lut[stored.astype(np.int64)]


def from_model(pred: np.ndarray, model: str) -> np.ndarray:
    """Renumber a model's output into the stored numbering."""
    labels = model_labels(model)
    lut = np.zeros(len(labels) + 1, dtype=np.uint8)
    for name, value in labels.items():
        lut[value] = STORED_LABELS[name]
    pred = np.asarray(pred).astype(np.int64)
    extra = sorted(values_in(pred) - set(range(lut.size)))
    if extra:
        raise UnknownLabelError(f"label values {extra} are not outputs of the {model!r} model (its values: {labels})")
    return lut[pred]
