"""A request's clicks, in MONAI Label's own protocols, parsed and checked.

Two forms reach ``POST /infer/<model>`` (its ``params``); points are voxel indices ``[i, j, k]``
of the image as the server serves it (the array order in which nibabel reads the datastore file,
which is Slicer's IJK):

- **DeepEdit** (what Slicer's MONAI Label module sends for a ``deepedit`` model, and OHIF's point
  prompts): ``{"label": "<structure>", "<structure>": [[i, j, k], ...], "background": [[i, j, k], ...]}``.
  Slicer sends one list per label of the server (every model's, and ``background``), all the
  clicks placed so far, and names the segment being clicked in ``label``; OHIF sends the labels
  it has points for and no ``label``. The positive points of a structure are under its name, the
  negative points under ``background``.
- **DeepGrow**: ``{"label": "<structure>", "foreground": [...], "background": [...]}``: positive
  and negative points of the structure named in ``label``.

Which structures a request refines (:meth:`Clicks.targets`): the one named in ``label``; for
``"label": "background"`` (Slicer, a click on its *background* segment) each structure lying under
a negative point in the starting contour; with no ``label`` (OHIF) also each structure that has
positive points. Only those structures change (:func:`merge_structure`).

Every problem is an :class:`~contourcl.errors.InvalidClickError` (the server answers 422) naming
it: a point that is not three integers, a point outside the image, more than
:data:`MAX_POINTS` points, a ``label`` the model does not have.
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from contourcl.data.labels import canonical_name
from contourcl.errors import InvalidClickError, UnknownLabelError

#: The most points one request may carry (positive and negative, all structures together).
MAX_POINTS = 1000
#: The key of the negative points in both forms, and Slicer's name for its background segment.
BACKGROUND = "background"
#: The key of the positive points in DeepGrow's form.
FOREGROUND = "foreground"


@dataclass(frozen=True)
class Clicks:
    """The points of one request, in a model's structure names.

    ``label``: the structure named by the request (the model's spelling), ``"background"``, or
    ``None`` when the request names none; ``positive``: ``{structure: (N, 3) int64}``, only the
    structures with points; ``negative``: ``(M, 3) int64``.
    """

    form: str
    label: str | None
    positive: dict[str, np.ndarray] = field(default_factory=dict)
    negative: np.ndarray = field(default_factory=lambda: np.zeros((0, 3), np.int64))

    @property
    def count(self) -> int:
        return int(sum(len(p) for p in self.positive.values()) + len(self.negative))

    def positive_of(self, structure: str) -> np.ndarray:
        return self.positive.get(structure, np.zeros((0, 3), np.int64))

    def check_inside(self, shape: tuple[int, ...]) -> None:
        """Raise :class:`InvalidClickError` for a point outside an image of ``shape``."""
        shape = tuple(int(s) for s in shape)
        for key, points in [*self.positive.items(), (BACKGROUND, self.negative)]:
            outside = ((points < 0) | (points >= np.asarray(shape))).any(axis=1) if len(points) else np.zeros(0, bool)
            if outside.any():
                n = int(np.flatnonzero(outside)[0])
                raise InvalidClickError(
                    f"point {points[n].tolist()} of {key!r} is outside the image: voxel indices run from [0, 0, 0] to "
                    f"{[s - 1 for s in shape]} (shape {' x '.join(map(str, shape))})")

    def targets(self, start: np.ndarray, labels: Mapping[str, int]) -> list[str]:
        """The structures this request refines, in the model's order (see the module's docstring);
        ``start`` is the starting label map in the model's numbering."""
        if self.label is not None and self.label != BACKGROUND:
            return [self.label]
        chosen = set()
        if self.label is None:
            chosen |= {name for name, points in self.positive.items() if len(points)}
        if len(self.negative):
            hit = {int(v) for v in start[tuple(self.negative.T)]}
            chosen |= {name for name, value in labels.items() if value in hit}
        return [name for name in labels if name in chosen]


def _point(value, key: str, n: int) -> list[int]:
    ok = isinstance(value, (list, tuple)) and len(value) == 3
    coords = []
    for c in value if ok else ():
        if isinstance(c, bool) or not isinstance(c, numbers.Real) or not float(c).is_integer():
            ok = False
            break
        coords.append(int(c))
    if not ok:
        raise InvalidClickError(f"point {n + 1} of {key!r} ({value!r}) is not a voxel index: send three integers [i, j, k]")
    if any(abs(c) >= 2 ** 31 for c in coords):
        raise InvalidClickError(f"point {n + 1} of {key!r} ({value!r}) is outside the image: no image is that large")
    return coords


def _points(value, key: str) -> np.ndarray:
    if value is None:
        return np.zeros((0, 3), np.int64)
    if not isinstance(value, (list, tuple)):
        raise InvalidClickError(f"{key!r} must be a list of points [[i, j, k], ...], not {type(value).__name__}")
    if len(value) > MAX_POINTS:
        raise InvalidClickError(f"{key!r} has {len(value)} points; a request may carry at most {MAX_POINTS}")
    if len(value) == 3 and all(isinstance(c, numbers.Real) and not isinstance(c, bool) for c in value):
        raise InvalidClickError(f"{key!r} must be a list of points [[i, j, k], ...]: {list(value)!r} is one point, send [{list(value)!r}]")
    return np.asarray([_point(p, key, n) for n, p in enumerate(value)], np.int64).reshape(-1, 3)


def _structure(name, labels: Mapping[str, int]) -> str | None:
    """The model's structure that ``name`` means (case and aliases ignored), else ``None``."""
    try:
        stored = canonical_name(name)
    except UnknownLabelError:
        return None
    by_stored = {canonical_name(n): n for n in labels}
    return by_stored.get(stored) if stored else None


def _label(params: Mapping, model: str, labels: Mapping[str, int]) -> str | None:
    if "label" not in params or params["label"] in (None, ""):
        return None
    name = params["label"]
    if not isinstance(name, str):
        raise InvalidClickError(f"label must name a structure of {model!r} ({list(labels)}), not {name!r}")
    if name.strip().lower() == BACKGROUND:
        return BACKGROUND
    found = _structure(name, labels)
    if found is None:
        raise InvalidClickError(f"label {name!r}: model {model!r} has no such structure; it contours {list(labels)}")
    return found


def parse_clicks(params: Mapping, model: str, labels: Mapping[str, int]) -> Clicks | None:
    """The clicks of an infer request's ``params`` for ``model`` (structures ``labels``: ``{name:
    value}``), or ``None`` when it carries no point (an automatic contour is asked for).

    Raises :class:`InvalidClickError` for a ``label`` the model does not have (also when no point
    is sent), a point that is not three integers, and more than :data:`MAX_POINTS` points. Whether
    the points lie inside the image is :meth:`Clicks.check_inside`'s (it needs the image).
    Lists under names that are not the model's structures (Slicer sends every label of the
    server: the other model's too) are not read.
    """
    label = _label(params, model, labels)
    negative = _points(params.get(BACKGROUND), BACKGROUND)
    positive: dict[str, np.ndarray] = {}
    if FOREGROUND in params:
        form = "deepgrow"
        points = _points(params[FOREGROUND], FOREGROUND)
        if len(points) or len(negative):
            if label is None or label == BACKGROUND:
                raise InvalidClickError(f"foreground/background points need a label naming the structure: one of {list(labels)}")
        if len(points):
            positive[label] = points
    else:
        form = "deepedit"
        for key, value in params.items():
            if key in ("label", BACKGROUND) or not isinstance(key, str):
                continue
            name = _structure(key, labels)
            if name is None:
                continue
            points = _points(value, key)
            if len(points):
                positive[name] = np.concatenate([positive[name], points]) if name in positive else points
    total = sum(len(p) for p in positive.values()) + len(negative)
    if total > MAX_POINTS:
        raise InvalidClickError(f"the request has {total} points; a request may carry at most {MAX_POINTS}")
    if total == 0:
        return None
    return Clicks(form=form, label=label, positive=positive, negative=negative)


def bounding_box(mask: np.ndarray) -> tuple[slice, ...] | None:
    """The smallest box holding every voxel of ``mask``; ``None`` for an empty mask."""
    box = []
    for axis in range(mask.ndim):
        hit = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
        if not len(hit):
            return None
        box.append(slice(int(hit[0]), int(hit[-1]) + 1))
    return tuple(box)


def merge_structure(current: np.ndarray, start: np.ndarray, value: int, mask: np.ndarray) -> np.ndarray:
    """``current`` with structure ``value`` replaced by ``mask`` where that is allowed: the
    structure keeps only voxels of ``mask``, and takes only voxels that are background in both
    ``current`` and ``start`` (the starting label map) or were its own; every other voxel is
    unchanged. ``current`` is not modified."""
    mask = np.asarray(mask, dtype=bool)
    if mask.shape != current.shape:
        raise ValueError(f"the refined mask has shape {mask.shape}, the label map {current.shape}")
    out = current.copy()
    own = start == value
    box = bounding_box(own != mask)
    if box is None:
        return out
    o, s, c, m, w = out[box], start[box], current[box], mask[box], own[box]  # views: o writes into out
    o[w & ~m] = 0
    o[m & (w | ((s == 0) & (c == 0)))] = value
    return out
