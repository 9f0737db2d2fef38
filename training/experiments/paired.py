"""Paired comparison of a pretraining method against random initialisation.

Every method of the label-efficiency benchmark is fine-tuned on the *same* draws of labeled
cases and scored on the *same* validation patients, so its scores pair with random init's
draw by draw and patient by patient. For draws ``d = 1..D`` run by both and patients
``i = 1..N`` scored by both, with ``s_i^d`` a patient's mean Dice over the structures its
reference contours:

    delta_i^d = s_i^d(method) - s_i^d(random),    delta_i = mean_d delta_i^d,
    Delta = mean_i delta_i.

- **95 % confidence interval**: percentile bootstrap that resamples the draws *and* the
  patients with replacement (two-stage), so that the variance between draws of labeled
  cases, as large as the variance between patients at ``|X_tr| = 1``, is in the interval.
- **Wilcoxon signed-rank test** on the ``delta_i`` (``scipy.stats.wilcoxon``, two-sided): do
  patients tend to score higher with the method? It treats the draws as fixed, so it answers
  for these draws; the bootstrap interval is the statement about draws in general.
- **Holm's step-down adjustment** of the p values over all comparisons of one model (Holm
  1979), because a table tests many methods and sizes at once.
- The number of draws whose mean difference is positive ("draws better").
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from contourcl.evaluation import case_mean


@dataclass(frozen=True)
class PairedComparison:
    """``method`` minus ``baseline`` on one model and ``|X_tr|`` (see the module docstring)."""

    model: str
    method: str
    baseline: str
    n_labeled: int
    difference: float  #: Delta
    ci_low: float
    ci_high: float
    p_wilcoxon: float
    patients: int
    draws: int
    draws_better: int
    p_holm: float = float("nan")


def patient_scores(run: Mapping, metric: str = "dice") -> dict[str, float]:
    """Each validation patient's mean ``metric`` over the structures it contours (``nan`` dropped)."""
    scores = {case: case_mean(per_structure, metric) for case, per_structure in run["cases"].items()}
    return {case: v for case, v in scores.items() if not np.isnan(v)}


def difference_matrix(method_runs: Sequence[Mapping], baseline_runs: Sequence[Mapping], metric: str = "dice") -> np.ndarray:
    """``delta[d, i]`` over the draws both ran and the patients scored in all of them."""
    base = {r["draw"]: patient_scores(r, metric) for r in baseline_runs}
    mine = {r["draw"]: patient_scores(r, metric) for r in method_runs}
    draws = sorted(set(base) & set(mine))
    if not draws:
        return np.zeros((0, 0))
    patients = sorted(set.intersection(*(set(base[d]) & set(mine[d]) for d in draws)))
    return np.array([[mine[d][p] - base[d][p] for p in patients] for d in draws], dtype=np.float64).reshape(len(draws), len(patients))


def bootstrap_ci(delta: np.ndarray, reps: int = 10000, level: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile interval of ``Delta`` resampling draws (rows) and patients (columns)."""
    d, n = delta.shape
    rng = np.random.default_rng(seed)
    rows = rng.integers(0, d, size=(reps, d))
    cols = rng.integers(0, n, size=(reps, n))
    # mean over a resampled grid = mean over the resampled rows of each row's mean over the resampled columns
    stats = np.empty(reps)
    for k in range(reps):
        stats[k] = delta[rows[k]][:, cols[k]].mean()
    alpha = (1.0 - level) / 2.0
    return float(np.quantile(stats, alpha)), float(np.quantile(stats, 1.0 - alpha))


def wilcoxon_p(per_patient: np.ndarray) -> float:
    """Two-sided Wilcoxon signed-rank p of the per-patient differences (1.0 when all are zero)."""
    from scipy.stats import wilcoxon

    if per_patient.size == 0 or not np.any(per_patient != 0):
        return 1.0
    return float(wilcoxon(per_patient).pvalue)


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p values, in the input's order."""
    p = np.asarray(p_values, dtype=np.float64)
    m = p.size
    order = np.argsort(p)
    adjusted = np.empty(m)
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p[i]))
        adjusted[i] = running
    return adjusted.tolist()


def compare(runs: Sequence[Mapping], model: str, method: str, n_labeled: int, baseline: str = "random",
            metric: str = "dice", reps: int = 10000, seed: int = 0) -> PairedComparison | None:
    """``method`` against ``baseline`` (None when they share no draw and patient)."""
    pick = [r for r in runs if r["model"] == model and r["n_labeled"] == n_labeled]
    delta = difference_matrix([r for r in pick if r["method"] == method], [r for r in pick if r["method"] == baseline], metric)
    if delta.size == 0:
        return None
    per_patient = delta.mean(axis=0)
    low, high = bootstrap_ci(delta, reps, seed=seed)
    return PairedComparison(
        model=model, method=method, baseline=baseline, n_labeled=n_labeled, difference=float(per_patient.mean()),
        ci_low=low, ci_high=high, p_wilcoxon=wilcoxon_p(per_patient), patients=delta.shape[1], draws=delta.shape[0],
        draws_better=int((delta.mean(axis=1) > 0).sum()),
    )


def compare_all(runs: Sequence[Mapping], model: str, methods: Sequence[str], sizes: Sequence[int], baseline: str = "random",
                metric: str = "dice", reps: int = 10000) -> list[PairedComparison]:
    """Every method against ``baseline`` at every size, with Holm-adjusted p values over them all."""
    found = [c for n in sizes for m in methods if m != baseline
             for c in [compare(runs, model, m, n, baseline, metric, reps)] if c is not None]
    adjusted = holm([c.p_wilcoxon for c in found]) if found else []
    return [PairedComparison(**{**c.__dict__, "p_holm": p}) for c, p in zip(found, adjusted, strict=False)]


def compare_evaluations(a: Mapping, b: Mapping, metric: str = "dice", reps: int = 10000, seed: int = 0) -> list[dict]:
    """Two model files scored on the same cases (``contourcl evaluate --json``), paired by patient.

    One row for the mean over structures (``"mean"``, each patient's :func:`patient_scores`) and one
    per structure, over the patients both score: ``a`` minus ``b``, its 95 % bootstrap interval over
    patients (one draw: :func:`bootstrap_ci`), the Wilcoxon signed-rank p and the number of patients.
    This is how two recipes are compared on an inner validation split.
    """
    structures = list(dict.fromkeys(s for run in (a, b) for case in run["cases"].values() for s in case))  # first-seen order
    rows = []
    for scope in ["mean", *structures]:
        def only(run: Mapping, scope: str = scope) -> dict:
            if scope == "mean":
                return {"draw": 0, "cases": run["cases"]}
            return {"draw": 0, "cases": {c: {scope: v[scope]} for c, v in run["cases"].items() if scope in v}}

        delta = difference_matrix([only(a)], [only(b)], metric)
        if delta.size == 0:
            continue
        low, high = bootstrap_ci(delta, reps, seed=seed)
        rows.append({"scope": scope, "difference": float(delta.mean()), "ci_low": low, "ci_high": high,
                     "p_wilcoxon": wilcoxon_p(delta[0]), "patients": int(delta.shape[1])})
    return rows
