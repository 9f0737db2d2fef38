"""How much a clinician changed a proposed contour: the correction effort of one structure.

Validation Dice answers how close a model comes to a reference; it says little about the time a
clinician spends editing (Sherer et al. 2021, Radiother Oncol 160:185). Clinical studies of
auto-contouring measure the edit itself (Vaassen et al. 2020, Phys Imaging Radiat Oncol 13:1):

- **added path length** (APL, mm): on each axial slice, the length of the final contour that does
  not lie within ``tolerance_mm`` of the proposed contour, summed over slices (Vaassen et al.,
  section 2.3: the contour a clinician had to draw). Contours are the iso-lines at 0.5 of each
  slice's mask (:func:`skimage.measure.find_contours`, marching squares, sub-voxel), lengths in mm
  with the slice's pixel spacing; each piece of the final contour counts when its distance to the
  nearest point of the proposed contour exceeds the tolerance. Removing a wrong contour adds no
  path (nothing is drawn); a slice with no proposed contour adds the whole final contour.
- **surface Dice** at ``tolerance_mm`` (Nikolov et al. 2021) and volumetric **Dice**, from the
  project's one metric code (:func:`contourcl.evaluation.contour_metrics`), the final label as
  the reference;
- **changed slices**: the axial slices on which the structure's mask differs by at least one voxel;
- **change**: ``unchanged`` (identical masks), ``edited``, ``added`` (only in the final label) or
  ``deleted`` (only in the proposal).

All on the image's own grid: the label maps are the image's voxel arrays, ``affine`` its
voxel-to-world matrix. The axial axis is the voxel axis that runs closest to the patient's
head-foot direction.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from scipy.spatial import cKDTree
from skimage.measure import find_contours

from contourcl.evaluation import contour_metrics

#: the tolerance of surface Dice and the added path length unless one is given (mm)
DEFAULT_EFFORT_TOLERANCE_MM = 2.0
#: the final contour is cut into pieces no longer than this fraction of the tolerance
_PIECE = 0.05


def voxel_sizes(affine: np.ndarray) -> np.ndarray:
    """The length in mm of one step along each voxel axis of ``affine``."""
    return np.linalg.norm(np.asarray(affine, dtype=np.float64)[:3, :3], axis=0)


def axial_axis(affine: np.ndarray) -> int:
    """The voxel axis of ``affine`` that runs closest to the world's head-foot (z) direction."""
    directions = np.asarray(affine, dtype=float)[:3, :3]
    directions = directions / np.linalg.norm(directions, axis=0)
    return int(np.argmax(np.abs(directions[2])))


def _polylines(mask: np.ndarray, pixel_mm: tuple[float, float]) -> list[np.ndarray]:
    """The 0.5 iso-lines of a 2D mask as point arrays in mm (padded so contours close at the edge)."""
    if not mask.any():
        return []
    padded = np.pad(mask.astype(np.float32), 1)
    return [(line - 1.0) * np.asarray(pixel_mm) for line in find_contours(padded, 0.5)]


def _pieces(lines: list[np.ndarray], step: float) -> tuple[np.ndarray, np.ndarray]:
    """Midpoints and lengths of the polylines cut into pieces no longer than ``step`` mm."""
    mids, lengths = [], []
    for line in lines:
        a, b = line[:-1], line[1:]
        seg = np.linalg.norm(b - a, axis=1)
        n = np.maximum(1, np.ceil(seg / step)).astype(int)
        for k in range(int(n.max()) if len(n) else 0):
            use = n > k
            t = (k + 0.5) / n[use]
            mids.append(a[use] + (b[use] - a[use]) * t[:, None])
            lengths.append(seg[use] / n[use])
    if not mids:
        return np.zeros((0, 2)), np.zeros(0)
    return np.concatenate(mids), np.concatenate(lengths)


def _points(lines: list[np.ndarray], step: float) -> np.ndarray:
    """Points along the polylines, no farther apart than ``step`` mm (their vertices included)."""
    mids, _ = _pieces(lines, step)
    return np.concatenate([mids, *lines]) if lines else mids


def added_path_length(proposed: np.ndarray, final: np.ndarray, pixel_mm: tuple[float, float], tolerance_mm: float) -> float:
    """Added path length (mm) of one slice: the final contour farther than ``tolerance_mm`` from the
    proposed one. ``proposed`` and ``final`` are 2D masks, ``pixel_mm`` their pixel size per axis."""
    final_lines = _polylines(final, pixel_mm)
    if not final_lines:
        return 0.0
    step = max(_PIECE * tolerance_mm, 1e-3)
    mids, lengths = _pieces(final_lines, step)
    proposed_lines = _polylines(proposed, pixel_mm)
    if not proposed_lines:
        return float(lengths.sum())
    # the proposed contour sampled at a fraction of the tolerance: a distance is off by at most step / 2
    distance, _ = cKDTree(_points(proposed_lines, step)).query(mids)
    return float(lengths[distance > tolerance_mm].sum())


def _change(in_proposed: bool, in_final: bool, identical: bool) -> str:
    if identical:
        return "unchanged"
    if in_final and not in_proposed:
        return "added"
    if in_proposed and not in_final:
        return "deleted"
    return "edited"


def structure_effort(proposed: np.ndarray, final: np.ndarray, spacing: tuple[float, float, float], axis: int,
                     tolerance_mm: float) -> dict:
    """APL, changed slices and the kind of change of one structure (``proposed``, ``final``: 3D masks)."""
    pixel_mm = tuple(float(s) for i, s in enumerate(spacing) if i != axis)
    p = np.moveaxis(proposed, axis, -1)
    f = np.moveaxis(final, axis, -1)
    differs = np.any(p != f, axis=(0, 1))
    apl = sum(added_path_length(p[..., z], f[..., z], pixel_mm, tolerance_mm) for z in np.flatnonzero(differs))
    return {
        "added_path_length_mm": round(float(apl), 2),
        "changed_slices": int(differs.sum()),
        "change": _change(bool(p.any()), bool(f.any()), not differs.any()),
    }


def correction_effort(proposed: np.ndarray, final: np.ndarray, labels: Mapping[str, int], affine: np.ndarray,
                      tolerance_mm: float = DEFAULT_EFFORT_TOLERANCE_MM) -> dict[str, dict]:
    """``{structure: {"dice", "surface_dice", "added_path_length_mm", "changed_slices", "change"}}``
    of the final label map against the proposed one, both on the image's grid and numbered as
    ``labels`` (``{name: value}``). A structure in neither map is left out; one the final label
    does not hold has ``dice`` and ``surface_dice`` ``None`` (nothing to compare with)."""
    proposed, final = np.asarray(proposed), np.asarray(final)
    if proposed.shape != final.shape:
        raise ValueError(f"the proposal's grid {proposed.shape} differs from the final label's {final.shape}")
    spacing = tuple(float(s) for s in voxel_sizes(affine))
    axis = axial_axis(affine)
    present = {name: v for name, v in labels.items() if (proposed == v).any() or (final == v).any()}
    overlap = contour_metrics(proposed, final, present, spacing, tolerance_mm, metrics=("dice", "surface_dice")) if present else {}
    out = {}
    for name, value in present.items():
        figures = overlap[name]
        out[name] = {
            "dice": None if np.isnan(figures["dice"]) else round(float(figures["dice"]), 4),
            "surface_dice": None if np.isnan(figures["surface_dice"]) else round(float(figures["surface_dice"]), 4),
            **structure_effort(proposed == value, final == value, spacing, axis, tolerance_mm),
        }
    return out


def _spread(values: list[float]) -> dict | None:
    """Median and inter-quartile range of ``values`` (``None`` for none)."""
    if not values:
        return None
    q1, median, q3 = (float(v) for v in np.percentile(values, [25, 50, 75]))
    return {"median": round(median, 3), "iqr": [round(q1, 3), round(q3, 3)], "n": len(values)}


def summarise_effort(records: list[dict]) -> dict[str, dict[str, dict]]:
    """``{model: {model_version: {"images", "structures": {name: {"added_path_length_mm",
    "surface_dice"}}}}}`` over effort records (:mod:`contourcl.serving.effort_record`): how many
    images the clinicians corrected after that version proposed, and the median and IQR of each
    structure's added path length and surface Dice. Records without figures are left out."""
    grouped: dict[str, dict[str, list[dict]]] = {}
    for record in records:
        if record.get("model") and record.get("structures") is not None:
            grouped.setdefault(record["model"], {}).setdefault(str(record.get("model_version")), []).append(record)
    out: dict[str, dict[str, dict]] = {}
    for model, versions in grouped.items():
        for version, rows in versions.items():
            names = list(dict.fromkeys(name for row in rows for name in row["structures"]))
            out.setdefault(model, {})[version] = {
                "images": len({row["image"] for row in rows}),
                "structures": {name: {
                    "added_path_length_mm": _spread([row["structures"][name]["added_path_length_mm"] for row in rows if name in row["structures"]]),
                    "surface_dice": _spread([row["structures"][name]["surface_dice"] for row in rows
                                             if name in row["structures"] and row["structures"][name]["surface_dice"] is not None]),
                } for name in names},
            }
    return out
