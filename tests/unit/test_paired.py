"""The paired comparison against random init (contourcl.training.experiments.paired), checked
against figures computed by hand, not with the module's own functions."""

from __future__ import annotations

import numpy as np
import pytest

from contourcl.training.experiments.paired import bootstrap_ci, compare, compare_all, holm


def _run(method: str, draw: int, scores: dict[str, list[float]], n: int = 1, model: str = "oar") -> dict:
    """A run file: each patient's Dice per structure (two structures, the second may be unscored)."""
    cases = {p: {"A": {"dice": v[0]}, "B": {"dice": v[1] if len(v) > 1 else float("nan")}} for p, v in scores.items()}
    return {"model": model, "method": method, "n_labeled": n, "draw": draw, "cases": cases}


def test_a_method_better_on_every_patient():
    # ten patients, the method is better by 0.01 ... 0.10 (distinct, so the exact test has no ties)
    base = {f"p{i}": [0.5, 0.3] for i in range(10)}
    mine = {f"p{i}": [0.5 + 0.02 * (i + 1), 0.3] for i in range(10)}  # case mean: +0.01 * (i + 1)
    runs = [_run("random", 0, base), _run("x", 0, mine)]
    c = compare(runs, "oar", "x", 1)
    assert c.difference == pytest.approx(0.055)  # mean of 0.01 ... 0.10
    # all ten signs positive: exact two-sided p = 2 / 2**10
    assert c.p_wilcoxon == pytest.approx(2 / 1024)
    assert c.patients == 10 and c.draws == 1 and c.draws_better == 1
    assert 0.01 < c.ci_low < 0.055 < c.ci_high < 0.10


def test_pairs_are_by_draw_and_patient():
    # draw 1 of the method is missing: only draw 0 pairs; patient p2 is unscored in the method's run
    base = [_run("random", 0, {"p0": [0.2], "p1": [0.4], "p2": [0.6]}), _run("random", 1, {"p0": [0.9], "p1": [0.9], "p2": [0.9]})]
    mine = [_run("x", 0, {"p0": [0.3], "p1": [0.6], "p2": [float("nan")]})]
    c = compare(base + mine, "oar", "x", 1)
    assert c.draws == 1 and c.patients == 2
    assert c.difference == pytest.approx((0.1 + 0.2) / 2)


def test_no_difference_gives_p_one_and_an_interval_around_zero():
    base = {f"p{i}": [0.4 + 0.01 * i] for i in range(8)}
    mine = {f"p{i}": [0.4 + 0.01 * i + (0.05 if i % 2 else -0.05)] for i in range(8)}
    c = compare([_run("random", 0, base), _run("x", 0, mine)], "oar", "x", 1)
    assert c.difference == pytest.approx(0.0, abs=1e-12)
    assert c.p_wilcoxon == pytest.approx(1.0)
    assert c.ci_low < 0 < c.ci_high


def test_the_interval_carries_the_variance_between_draws():
    # every patient gains exactly +0.1 in draw 0 and loses 0.1 in draw 1: no spread over patients,
    # all of it between draws, so an interval over patients alone would be the point 0
    delta = np.array([[0.1] * 20, [-0.1] * 20])
    low, high = bootstrap_ci(delta, reps=4000)
    assert low == pytest.approx(-0.1) and high == pytest.approx(0.1)


def test_holm_adjustment():
    # by hand: sorted 0.01, 0.02, 0.04 -> 3 x 0.01 = 0.03, 2 x 0.02 = 0.04, 1 x 0.04 = 0.04
    assert holm([0.04, 0.01, 0.02]) == pytest.approx([0.04, 0.03, 0.04])
    assert holm([0.5, 0.6]) == pytest.approx([1.0, 1.0])


def test_compare_all_skips_the_baseline_and_adjusts_over_the_table():
    base = {f"p{i}": [0.5] for i in range(6)}
    runs = [_run("random", 0, base, n) for n in (1, 5)]
    runs += [_run(m, 0, {f"p{i}": [0.5 + 0.01 * (i + 1) * k] for i in range(6)}, n)
             for k, m in ((1, "a"), (-1, "b")) for n in (1, 5)]
    found = compare_all(runs, "oar", ["random", "a", "b"], [1, 5])
    assert [(c.method, c.n_labeled) for c in found] == [("a", 1), ("b", 1), ("a", 5), ("b", 5)]
    raw = 2 / 2**6  # six patients, all one sign
    assert all(c.p_wilcoxon == pytest.approx(raw) for c in found)
    assert all(c.p_holm == pytest.approx(min(1.0, 4 * raw)) for c in found)
    assert [c.difference > 0 for c in found] == [True, False, True, False]


def test_the_separation_ablation_is_paired_directly():
    from contourcl.training.experiments.report import ablation_markdown

    runs = [_run(m, d, {f"p{i}": [0.3 + k + 0.001 * i] for i in range(6)}) for d in range(2)
            for m, k in (("separeg", 0.05), ("separeg-grid", 0.0))]
    lines = ablation_markdown(runs, "oar")
    assert any(line.startswith("| separeg - separeg-grid | 1 | +0.050 [+0.050, +0.050]") and line.endswith("2/2 |") for line in lines)
    assert not any("separeg-none" in line for line in lines)  # not run: no row
    assert ablation_markdown([r for r in runs if r["method"] == "separeg"], "oar") == []
