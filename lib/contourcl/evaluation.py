"""Contour quality on the image's own grid: Dice, HD95 (mm) and surface Dice (mm tolerance).

The three figures radiotherapy auto-contouring papers report, computed with MONAI's metric
classes (:class:`monai.metrics.DiceMetric`, :class:`~monai.metrics.HausdorffDistanceMetric`
with ``percentile=95``, :class:`~monai.metrics.SurfaceDiceMetric`, Nikolov et al. 2021) on the
label maps in the CT's voxel grid, with the CT's voxel spacing.

Conventions, per structure and case:

- a structure the reference does not contain is *not contoured* (OpenKBP's partial labels):
  every metric is ``nan`` and the structure is skipped for that case;
- a contoured structure the prediction misses gets Dice 0 and surface Dice 0; its HD95 is
  undefined and ``nan`` (counted as a miss by :func:`summarise`, never averaged as a number);
- only axial slices that image the patient are scored, the prediction's and the reference's
  alike (:func:`contourcl.data.volumes.imaged_slices`): many OpenKBP CTs hold values only in
  small islands around the drawn structures on the slices away from the treatment (the
  brainstem and spinal cord most). No clinical CT looks like that, and a score there measures
  the dataset's masking (the island gives the brainstem away; the cord's few voxels show
  nothing), not the model.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from monai.metrics import DiceMetric, HausdorffDistanceMetric, SurfaceDiceMetric
from monai.networks.utils import one_hot
from monai.transforms import Compose

from contourcl.models.checkpoint import ModelMeta

METRICS = ("dice", "hd95", "surface_dice")
#: surface Dice tolerance used unless one is given: about one in-plane voxel of OpenKBP (3.9-4.7 mm)
DEFAULT_TOLERANCE_MM = 4.0


def _crop(pred: np.ndarray, ref: np.ndarray, margin: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """Both maps cropped to the box around either's foreground (distances do not change)."""
    fg = np.argwhere((pred > 0) | (ref > 0))
    if fg.size == 0:
        return pred, ref
    lo = np.maximum(fg.min(0) - margin, 0)
    hi = fg.max(0) + margin + 1
    box = tuple(slice(a, b) for a, b in zip(lo, hi, strict=False))
    return pred[box], ref[box]


def contour_metrics(
    pred: np.ndarray,
    ref: np.ndarray,
    labels: Mapping[str, int],
    spacing: Sequence[float],
    tolerance_mm: float = DEFAULT_TOLERANCE_MM,
    metrics: Sequence[str] = METRICS,
) -> dict[str, dict[str, float]]:
    """``{structure: {"dice", "hd95", "surface_dice"}}`` of label map ``pred`` against ``ref``.

    ``pred`` and ``ref`` are integer label maps on the same grid, numbered as ``labels``
    (``{name: value}``, background 0); ``spacing`` is the grid's voxel size in mm. Metrics left
    out of ``metrics`` are ``nan`` (HD95 and surface Dice cost far more than Dice).
    """
    pred = np.asarray(pred)
    ref = np.asarray(ref)
    if pred.shape != ref.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from the reference's {ref.shape}")
    if len(spacing) != ref.ndim:
        raise ValueError(f"spacing {tuple(spacing)} does not match a {ref.ndim}D label map")
    names = list(labels)
    values = [int(labels[n]) for n in names]
    # renumber to 0..K in the order of ``labels``; anything else is background
    lut = np.zeros(max([int(pred.max()), int(ref.max()), *values]) + 1, dtype=np.int64)
    for k, v in enumerate(values, start=1):
        lut[v] = k
    p, r = _crop(lut[pred.astype(np.int64)], lut[ref.astype(np.int64)])
    n = len(names) + 1
    yp = one_hot(torch.as_tensor(p)[None, None], n)
    yr = one_hot(torch.as_tensor(r)[None, None], n)
    spacing = [float(s) for s in spacing]
    with warnings.catch_warnings():  # MONAI warns about empty masks; they are handled below
        warnings.simplefilter("ignore")
        dice = DiceMetric(include_background=False, reduction="none", ignore_empty=True)(yp, yr)[0]
        nan = torch.full((n - 1,), float("nan"))
        hd95 = HausdorffDistanceMetric(include_background=False, percentile=95, reduction="none")(yp, yr, spacing=spacing)[0] if "hd95" in metrics else nan
        nsd = SurfaceDiceMetric([float(tolerance_mm)] * (n - 1), include_background=False, reduction="none")(yp, yr, spacing=spacing)[0] if "surface_dice" in metrics else nan
    out = {}
    for k, name in enumerate(names):
        in_ref = bool((r == k + 1).any())
        in_pred = bool((p == k + 1).any())
        if not in_ref:
            out[name] = {m: float("nan") for m in METRICS}
            continue
        out[name] = {
            "dice": float(dice[k]),
            "hd95": float(hd95[k]) if in_pred else float("nan"),
            "surface_dice": (float(nsd[k]) if in_pred else 0.0) if "surface_dice" in metrics else float("nan"),
        }
    return out


_PREPROCESSED: dict[tuple, tuple] = {}  # per process: (image, spacing, window) -> Contourer.preprocess(...)


@dataclass
class EvaluationCase:
    """A labeled CT ready to be contoured and scored: preprocessed once, scored many times."""

    id: str
    data: dict  # Contourer.preprocess's image dict (with the CT's own grid)
    pre: Compose  # the invertible transforms that made it
    reference: np.ndarray  # the label on the CT's own grid, in the model's numbering, on imaged slices
    unimaged_voxels: int = 0  # reference voxels on the other slices (not scored)
    prepared_for: tuple = ()  # preparation(meta) of the models it was made for
    set_aside: dict = field(default_factory=dict)  # {structure: reason}: reference structures not scored (contourcl.data.reference_check)

    def scored(self, label: np.ndarray) -> np.ndarray:
        """A label map on the CT's own grid as it is scored: on the slices that image the patient
        (``data["imaged_slices"]``, :func:`contourcl.data.volumes.imaged_slices`)."""
        from contourcl.data.volumes import blank_slices

        return blank_slices(label, self.data["imaged_slices"])[0]

    def metrics(self, scored: np.ndarray, labels: Mapping[str, int], tolerance_mm: float = DEFAULT_TOLERANCE_MM,
                metrics: Sequence[str] = METRICS) -> dict[str, dict[str, float]]:
        """:func:`contour_metrics` of a label map made :meth:`scored` against the reference, with the
        CT's voxel spacing."""
        spacing = np.linalg.norm(self.data["grid"][0][:3, :3], axis=0)
        return contour_metrics(scored, self.reference, labels, spacing, tolerance_mm, metrics)


def preparation(meta: ModelMeta) -> tuple:
    """What an :class:`EvaluationCase` depends on in a model: its label numbering (the model kind),
    in-plane spacing and CT window. Models that agree on these score the same prepared cases."""
    return (meta.model, tuple(float(v) for v in meta.spacing), tuple(float(v) for v in meta.window))


def prepare_cases(cases: Sequence[Mapping], meta: ModelMeta, keep_preprocessed: bool = False,
                  check_references: bool = True) -> list[EvaluationCase]:
    """:class:`EvaluationCase` s of :func:`contourcl.data.datasets.labeled_cases` entries for models like ``meta``.

    The CT is preprocessed exactly as :class:`~contourcl.inference.Contourer` does; the reference
    is read on the CT's grid (an error names a label whose grid differs), renumbered to the
    model's numbering, its implausible structures set aside (:mod:`contourcl.data.reference_check`:
    not scored, named in :attr:`EvaluationCase.set_aside`) and kept on the slices that image the
    patient only. ``keep_preprocessed`` keeps the preprocessed CTs in this process for the next
    call (a benchmark evaluates many models on the same cases). ``check_references=False`` scores
    every reference, the implausible ones too (for figures comparable with scores made without
    the check).
    """
    from monai.transforms import LoadImage

    from contourcl.data.datasets import read_label
    from contourcl.data.labels import model_labels, to_model
    from contourcl.data.reference_check import checked_reference, needs_check
    from contourcl.data.volumes import blank_slices
    from contourcl.inference import preprocess_ct

    labels = model_labels(meta.model)
    check = check_references and needs_check(labels)
    out = []
    for case in cases:
        key = (str(case["image"]), tuple(meta.spacing), tuple(meta.window))
        cached = _PREPROCESSED.get(key)
        data, pre = cached or preprocess_ct(case["image"], meta, imaged=True, keep_hu=check)
        hu = data.pop("hu", None)  # the loaded CT: for the check below, never kept
        if keep_preprocessed and cached is None:
            _PREPROCESSED[key] = (data, pre)
        ref, ref_affine = read_label(case)
        affine, shape = data["grid"]
        if ref.shape != tuple(shape) or not np.allclose(ref_affine, affine, atol=1e-3):
            raise ValueError(f"{case['label']}: the label's grid differs from its CT's (shape {ref.shape} vs {tuple(shape)})")
        ref, faults = to_model(ref, meta.model), {}
        if check:
            if hu is None:  # preprocessed by an earlier call: the CT is read again
                hu = np.asarray(LoadImage(image_only=True)(str(case["image"])))
            ref, faults = checked_reference(hu, ref, affine, labels, data["imaged_slices"])
        ref, unimaged = blank_slices(ref, data["imaged_slices"])
        out.append(EvaluationCase(str(case["id"]), data, pre, ref, unimaged, preparation(meta), faults))
    return out


def evaluate_network(network: torch.nn.Module, meta: ModelMeta, cases: Sequence[EvaluationCase], largest_component: bool,
                     tolerance_mm: float = DEFAULT_TOLERANCE_MM, metrics: Sequence[str] = METRICS,
                     device: str | torch.device = "cpu", labels: dict[str, np.ndarray] | None = None,
                     ) -> dict[str, dict[str, dict[str, float]]]:
    """``{case id: contour_metrics(...)}`` of a network contouring ``cases`` through the served path
    (:func:`contourcl.inference.contour`) with ``meta``'s preprocessing and test-time rules, on the
    slices that image the patient. ``labels``, when given, receives each case's label map as
    scored (by case id), e.g. to draw it."""
    from contourcl.inference import contour

    out = {}
    for case in cases:
        label = case.scored(contour(network, meta, case.data, case.pre, largest_component, device)[0])
        if labels is not None:
            labels[case.id] = label
        out[case.id] = case.metrics(label, meta.labels, tolerance_mm, metrics)
    return out


def evaluate_model_file(model_path: str | Path, cases: Sequence[Mapping], tolerance_mm: float = DEFAULT_TOLERANCE_MM,
                        keep_preprocessed: bool = False, largest_component: bool = True,
                        labels: dict[str, np.ndarray] | None = None) -> dict[str, dict[str, dict[str, float]]]:
    """``{case id: contour_metrics(...)}`` of a model file on labeled ``cases`` (each CT's own grid).

    ``cases`` are :func:`contourcl.data.datasets.labeled_cases` entries, :class:`EvaluationCase` s
    :func:`prepare_cases` made for a model with this one's :func:`preparation` (another's is refused:
    its CT would be resampled to the wrong grid), or both. The model contours as the app does
    (:class:`~contourcl.inference.Contourer`, with the model file's largest-component rule;
    ``largest_component`` for a file that does not record one). ``labels``: as
    :func:`evaluate_network`.
    """
    from contourcl.inference import Contourer

    contourer = Contourer(model_path, largest_component=largest_component)
    _, network, meta = contourer.model()
    wanted = preparation(meta)
    other = [c for c in cases if isinstance(c, EvaluationCase) and c.prepared_for != wanted]
    if other:
        raise ValueError(f"{', '.join(c.id for c in other)}: prepared for a model with (model, spacing, window) "
                         f"{other[0].prepared_for}; {Path(model_path).name} needs {wanted}")
    raw = iter(prepare_cases([c for c in cases if not isinstance(c, EvaluationCase)], meta, keep_preprocessed))
    prepared = [c if isinstance(c, EvaluationCase) else next(raw) for c in cases]
    return evaluate_network(network, meta, prepared, contourer.keeps_largest_component(meta), tolerance_mm, device=contourer.device,
                            labels=labels)


def evaluation_record(model: str, data: str, per_case: Mapping[str, Mapping[str, Mapping[str, float]]], structures: Sequence[str],
                      tolerance_mm: float = DEFAULT_TOLERANCE_MM, set_aside: Mapping[str, Mapping[str, str]] | None = None) -> dict:
    """What ``contourcl evaluate --json`` writes (and ``contourcl benchmark paired`` reads): the
    model and data, each case's figures, their patient-wise means, and the reference structures
    set aside per case."""
    summary = summarise([per_case], structures)
    return {"model": str(model), "data": str(data), "tolerance_mm": tolerance_mm,
            "mean": {m: summary[("mean", m)]["mean"] for m in METRICS}, "cases": dict(per_case), "set_aside": dict(set_aside or {})}


def mean_dice(scores: Mapping[str, Mapping[str, Mapping[str, float]]], structures: Sequence[str]) -> float:
    """The one summary figure: patient-wise mean of each case's mean Dice over its contoured
    structures (what the gate compares and ``contourcl evaluate --json`` prints as ``mean``)."""
    return summarise([scores], structures)[("mean", "dice")]["mean"]


def case_mean(per_structure: Mapping[str, Mapping[str, float]], metric: str) -> float:
    """Mean of ``metric`` over the structures the case contours (``nan`` if none)."""
    vals = [s[metric] for s in per_structure.values() if not np.isnan(s[metric])]
    return float(np.mean(vals)) if vals else float("nan")


def mean_se(values: Sequence[float]) -> tuple[float, float, int]:
    """Mean, standard error of the mean (sample SD / sqrt(n)) and n, ignoring ``nan``."""
    v = np.asarray([x for x in values if not np.isnan(x)], dtype=np.float64)
    if v.size == 0:
        return float("nan"), float("nan"), 0
    se = float(v.std(ddof=1) / np.sqrt(v.size)) if v.size > 1 else float("nan")
    return float(v.mean()), se, int(v.size)


def format_figure(mean: float, se: float, metric: str, missed: int = 0) -> str:
    """``"0.532 ± 0.025"`` (HD95: one decimal, and the count of missed structures), ``"-"`` if none."""
    miss = f" ({missed} missed)" if metric == "hd95" and missed else ""
    if np.isnan(mean):
        return f"-{miss}"
    digits = 1 if metric == "hd95" else 3
    se_text = "" if np.isnan(se) else f" ± {se:.{digits}f}"
    return f"{mean:.{digits}f}{se_text}{miss}"


def summarise(draws: Sequence[Mapping[str, Mapping[str, Mapping[str, float]]]], structures: Sequence[str]) -> dict[tuple[str, str], dict]:
    """Patient-wise summary of one or more evaluations of the same cases.

    ``draws`` holds one ``{case: {structure: {metric: value}}}`` per trained model (e.g. per
    random draw of training cases). A patient's value for a structure is averaged over the draws;
    the patient's ``"mean"`` is the mean over the structures its reference contours. Returns
    ``{(structure or "mean", metric): {"mean", "se", "patients", "missed", "draw_means"}}``:
    mean ± standard error over patients; ``missed`` counts (patient, draw) pairs whose HD95 is
    undefined because the structure was not predicted at all; ``draw_means`` the per-draw means
    over patients of the ``"mean"`` rows.
    """
    cases = sorted(set().union(*(d.keys() for d in draws))) if draws else []
    out = {}
    for metric in METRICS:
        values: dict[str, dict[str, list[float]]] = {c: {s: [] for s in ["mean", *structures]} for c in cases}
        missed = dict.fromkeys(["mean", *structures], 0)
        draw_means = []
        for d in draws:
            scores = []
            for c in cases:
                per = d.get(c)
                if per is None:
                    continue
                for s in structures:
                    v = per[s][metric]
                    if not np.isnan(v):
                        values[c][s].append(v)
                    elif metric == "hd95" and not np.isnan(per[s]["dice"]):
                        missed[s] += 1
                        missed["mean"] += 1
                m = case_mean(per, metric)
                if not np.isnan(m):
                    values[c]["mean"].append(m)
                    scores.append(m)
            if scores:
                draw_means.append(float(np.mean(scores)))
        for s in ["mean", *structures]:
            mean, se, n = mean_se([float(np.mean(values[c][s])) for c in cases if values[c][s]])
            out[(s, metric)] = {"mean": mean, "se": se, "patients": n, "missed": missed[s],
                                "draw_means": draw_means if s == "mean" else []}
    return out
