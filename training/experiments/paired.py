"""Paired comparison of a pretraining method against random initialisation.

Every method of the label-efficiency benchmark is fine-tuned on the *same* draws of labeled
cases and scored on the *same* validation patients, so its scores pair with random init's
draw by draw and patient by patient. For draws ``d = 1..D`` run by both and patients
``i = 1..N`` scored by both, with ``s_i^d`` a patient's mean Dice over the structures its
reference contours:

    delta_i^d = s_i^d(method) - s_i^d(random),    delta_i = mean_d delta_i^d,
    Delta = mean_i delta_i.

**The labeled draw is the unit** (issue 32). A claim about a method is a claim about a *new*
draw of labeled patients, and the draws are few (3 or 5): the statistics that count are over the
draws' mean differences ``m_d = mean_i delta_i^d``, not over patients.

- **Draw means** ``m_1..m_D``, each cell's evidence in full.
- **95 % t-interval over the draw means** (``mean(m) ± t_{0.975, D-1} sd(m) / sqrt(D)``) and the
  one-sample **t-test** of ``mean(m) = 0`` (two-sided, ``D - 1`` degrees of freedom).
- **Pretraining seeds** (``pretrain_seed`` in a run record; 0 when absent): a method pretrained
  with ``S`` seeds and fine-tuned on each draw has ``D x S`` units, crossed (every seed's encoder
  meets every draw). The standard error of the grand mean counts both sources, conservatively:
  ``se^2 = var(draw means over seeds) / D + var(seed means over draws) / S`` (each variance holds
  the residual once more, so it over-covers), with Satterthwaite's degrees of freedom. With one
  seed it is the t-interval over draws above.
- **Holm's step-down adjustment** of the t-test's p values over the cells of one table (Holm 1979),
  and the **corrected interval**: the t-interval at level ``1 - 0.05 / m`` for a table of ``m``
  cells (Bonferroni). A cell is **resolved** only when its corrected interval excludes zero (then
  its Holm p is below 0.05 too; Holm alone may reject a little more, and is not used to claim).
- The number of draws whose mean difference is positive ("draws better").

Kept for reference, not for claims: the percentile bootstrap that resamples draws and patients
(two-stage) and the Wilcoxon signed-rank p over the patients' mean differences (it treats the
draws as fixed: it answers "for these draws", which is not the question).
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
    p_holm: float = float("nan")  #: Holm-adjusted p of the Wilcoxon test (for these draws; kept for reference)
    #: each unit's mean difference, in order (a unit: a draw, or a draw and pretraining seed)
    draw_means: tuple[float, ...] = ()
    units: tuple[str, ...] = ()  #: "d0", or "d0-s1" with pretraining seeds
    pretrain_seeds: int = 1
    t_low: float = float("nan")  #: 95 % t-interval over the units (see the module docstring)
    t_high: float = float("nan")
    p_t: float = float("nan")  #: t-test of "no difference" over the units
    p_t_holm: float = float("nan")  #: ``p_t`` Holm-adjusted over the table
    corrected_low: float = float("nan")  #: the t-interval at level 1 - 0.05 / cells (Bonferroni)
    corrected_high: float = float("nan")
    corrected_level: float = float("nan")
    cells: int = 1  #: the cells of the table it is corrected over

    @property
    def resolved(self) -> bool:
        """The corrected interval excludes zero."""
        return bool(self.corrected_low > 0 or self.corrected_high < 0)


def run_unit(run: Mapping) -> tuple[int, int]:
    """``(draw, pretraining seed)`` of a run record (seed 0 when it records none)."""
    return int(run["draw"]), int(run.get("pretrain_seed", 0) or 0)


def unit_name(unit: tuple[int, int], seeds: int) -> str:
    return f"d{unit[0]}" if seeds <= 1 else f"d{unit[0]}-s{unit[1]}"


def patient_scores(run: Mapping, metric: str = "dice") -> dict[str, float]:
    """Each validation patient's mean ``metric`` over the structures it contours (``nan`` dropped)."""
    scores = {case: case_mean(per_structure, metric) for case, per_structure in run["cases"].items()}
    return {case: v for case, v in scores.items() if not np.isnan(v)}


def unit_differences(method_runs: Sequence[Mapping], baseline_runs: Sequence[Mapping],
                     metric: str = "dice") -> tuple[list[tuple[int, int]], np.ndarray]:
    """The units (``(draw, pretraining seed)``) and ``delta[u, i]``: each unit's run minus the
    baseline's run of the same draw (its pretraining seed, if any, is ignored: random init has
    none), over the patients scored in all of them."""
    base = {r["draw"]: patient_scores(r, metric) for r in baseline_runs}
    mine = {run_unit(r): patient_scores(r, metric) for r in method_runs}
    units = sorted(u for u in mine if u[0] in base)
    if not units:
        return [], np.zeros((0, 0))
    patients = sorted(set.intersection(*(set(base[u[0]]) & set(mine[u]) for u in units)))
    delta = np.array([[mine[u][p] - base[u[0]][p] for p in patients] for u in units], dtype=np.float64)
    return units, delta.reshape(len(units), len(patients))


def difference_matrix(method_runs: Sequence[Mapping], baseline_runs: Sequence[Mapping], metric: str = "dice") -> np.ndarray:
    """``delta[u, i]`` over the units both ran (draws, or draws and pretraining seeds) and the
    patients scored in all of them (:func:`unit_differences`)."""
    return unit_differences(method_runs, baseline_runs, metric)[1]


def draw_t_interval(unit_means: Mapping[tuple[int, int], float], level: float = 0.95) -> tuple[float, float, float, float]:
    """``(mean, low, high, p)``: the t-interval at ``level`` and the two-sided t-test of zero over
    the units' mean differences, draws and pretraining seeds crossed (see the module docstring).

    ``nan`` bounds (and p) where the spread cannot be estimated (one draw)."""
    from scipy.stats import t as student_t

    units = list(unit_means)
    draws = sorted({d for d, _ in units})
    seeds = sorted({s for _, s in units})
    grid = {u: float(v) for u, v in unit_means.items()}
    mean = float(np.mean(list(grid.values())))
    by_draw = np.array([np.mean([grid[(d, s)] for s in seeds if (d, s) in grid]) for d in draws])
    by_seed = np.array([np.mean([grid[(d, s)] for d in draws if (d, s) in grid]) for s in seeds])
    parts, dfs = [], []
    if len(draws) > 1:
        parts.append(by_draw.var(ddof=1) / len(draws))
        dfs.append(len(draws) - 1)
    if len(seeds) > 1:
        parts.append(by_seed.var(ddof=1) / len(seeds))
        dfs.append(len(seeds) - 1)
    if not parts:
        return mean, float("nan"), float("nan"), float("nan")
    var = float(sum(parts))
    if var == 0.0:
        return mean, mean, mean, (1.0 if mean == 0 else 0.0)
    df = var**2 / sum(a**2 / k for a, k in zip(parts, dfs, strict=True))  # Satterthwaite
    se = var**0.5
    half = float(student_t.ppf(0.5 + level / 2.0, df)) * se
    p = float(2.0 * student_t.sf(abs(mean) / se, df))
    return mean, mean - half, mean + half, p


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
    units, delta = unit_differences([r for r in pick if r["method"] == method], [r for r in pick if r["method"] == baseline], metric)
    if delta.size == 0:
        return None
    per_patient = delta.mean(axis=0)
    low, high = bootstrap_ci(delta, reps, seed=seed)
    unit_means = delta.mean(axis=1)
    _, t_low, t_high, p_t = draw_t_interval(dict(zip(units, unit_means, strict=True)))
    seeds = len({s for _, s in units})
    draws = sorted({d for d, _ in units})
    by_draw = [float(np.mean([m for u, m in zip(units, unit_means, strict=True) if u[0] == d])) for d in draws]
    return PairedComparison(
        model=model, method=method, baseline=baseline, n_labeled=n_labeled, difference=float(per_patient.mean()),
        ci_low=low, ci_high=high, p_wilcoxon=wilcoxon_p(per_patient), patients=delta.shape[1], draws=len(draws),
        draws_better=int(sum(m > 0 for m in by_draw)), draw_means=tuple(float(m) for m in unit_means),
        units=tuple(unit_name(u, seeds) for u in units), pretrain_seeds=seeds, t_low=t_low, t_high=t_high, p_t=p_t,
    )


def correct(comparisons: Sequence[PairedComparison], alpha: float = 0.05) -> list[PairedComparison]:
    """The cells of one table corrected together: Holm on the t-tests' p values (and, for
    reference, on the Wilcoxon p values), and each cell's t-interval at level ``1 - alpha / m``."""
    m = len(comparisons)
    if not m:
        return []
    holm_t = holm([1.0 if np.isnan(c.p_t) else c.p_t for c in comparisons])
    holm_w = holm([c.p_wilcoxon for c in comparisons])
    level = 1.0 - alpha / m
    out = []
    for c, pt, pw in zip(comparisons, holm_t, holm_w, strict=True):
        units = [tuple(int(x[1:]) for x in u.split("-")) for u in c.units]
        units = [(u[0], u[1] if len(u) > 1 else 0) for u in units]
        _, low, high, _ = draw_t_interval(dict(zip(units, c.draw_means, strict=True)), level)
        out.append(PairedComparison(**{**c.__dict__, "p_holm": pw, "p_t_holm": pt, "corrected_low": low, "corrected_high": high,
                                       "corrected_level": level, "cells": m}))
    return out


def compare_all(runs: Sequence[Mapping], model: str, methods: Sequence[str], sizes: Sequence[int], baseline: str = "random",
                metric: str = "dice", reps: int = 10000) -> list[PairedComparison]:
    """Every method against ``baseline`` at every size, corrected over them all (:func:`correct`)."""
    found = [c for n in sizes for m in methods if m != baseline
             for c in [compare(runs, model, m, n, baseline, metric, reps)] if c is not None]
    return correct(found)


def compare_evaluations(a: Mapping, b: Mapping, metric: str = "dice", reps: int = 10000, seed: int = 0, level: float = 0.95) -> list[dict]:
    """Two model files scored on the same cases (``contourcl evaluate --json``), paired by patient.

    One row for the mean over structures (``"mean"``, each patient's :func:`patient_scores`) and one
    per structure, over the patients both score: ``a`` minus ``b``, its bootstrap interval at
    ``level`` over patients (one draw: :func:`bootstrap_ci`), the Wilcoxon signed-rank p and the number of patients.
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
        low, high = bootstrap_ci(delta, reps, level=level, seed=seed)
        rows.append({"scope": scope, "difference": float(delta.mean()), "ci_low": low, "ci_high": high,
                     "p_wilcoxon": wilcoxon_p(delta[0]), "patients": int(delta.shape[1])})
    return rows
