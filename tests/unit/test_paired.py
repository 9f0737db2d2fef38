"""The paired comparison against random init (contourcl.training.experiments.paired), checked
against figures computed by hand, not with the module's own functions."""

from __future__ import annotations

import numpy as np
import pytest

from contourcl.training.experiments.paired import bootstrap_ci, compare, compare_all, draw_t_interval, holm


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
    # both draws +0.050: no spread, the interval is the point, resolved (bold)
    assert any(line.startswith("| separeg - separeg-grid | 1 | **+0.050 [+0.050, +0.050]**; +0.050 +0.050;")
               and line.endswith("2/2 |") for line in lines)
    assert not any("separeg-none" in line for line in lines)  # not run: no row
    assert ablation_markdown([r for r in runs if r["method"] == "separeg"], "oar") == []


def test_the_draw_is_the_unit_t_interval_by_hand():
    """Issue 32's audit: SimCLR at one labeled patient, five draw means; the t-interval over them by
    hand: mean 0.0422, sd 0.05399, t(0.975, 4) = 2.7764, half width 2.7764 x 0.05343 / sqrt(5)."""
    means = [0.003, 0.137, 0.032, 0.019, 0.020]
    mean, low, high, p = draw_t_interval({(d, 0): v for d, v in enumerate(means)})
    sd = float(np.std(means, ddof=1))
    assert sd == pytest.approx(0.053988, abs=1e-5)
    half = 2.776445 * sd / np.sqrt(5)
    assert (mean, low, high) == pytest.approx((0.0422, 0.0422 - half, 0.0422 + half), abs=1e-6)
    assert (round(low, 3), round(high, 3)) == (-0.025, 0.109)
    # t = 0.0422 / (sd / sqrt 5) = 1.766 on 4 degrees of freedom: two-sided p 0.155
    assert p == pytest.approx(0.1554, abs=1e-3)
    assert np.isnan(draw_t_interval({(0, 0): 0.1})[1]), "one draw: no interval"


def test_cells_are_corrected_over_the_table_and_resolved_only_outside_zero():
    # three patients; method "a" gains +0.030, +0.031, +0.032 in draws 0..2 on every patient, "b" gains
    # +0.10, -0.05, +0.02: a is resolved, b is not, and the correction is over the two cells
    runs = [_run("random", d, {f"p{i}": [0.5] for i in range(3)}) for d in range(3)]
    runs += [_run("a", d, {f"p{i}": [0.5 + g] for i in range(3)}) for d, g in enumerate((0.030, 0.031, 0.032))]
    runs += [_run("b", d, {f"p{i}": [0.5 + g] for i in range(3)}) for d, g in enumerate((0.10, -0.05, 0.02))]
    a, b = compare_all(runs, "oar", ["random", "a", "b"], [1])
    assert a.draw_means == pytest.approx((0.030, 0.031, 0.032)) and a.units == ("d0", "d1", "d2")
    assert a.cells == 2 and a.corrected_level == pytest.approx(0.975)
    # a: mean 0.031, sd 0.001, se 0.001/sqrt 3; t(1 - 0.025/2, 2) = 6.2053 (corrected), 4.3027 (95 %)
    se = 0.001 / np.sqrt(3)
    assert (a.corrected_low, a.corrected_high) == pytest.approx((0.031 - 6.2053 * se, 0.031 + 6.2053 * se), abs=1e-5)
    assert (a.t_low, a.t_high) == pytest.approx((0.031 - 4.3027 * se, 0.031 + 4.3027 * se), abs=1e-5)
    assert a.resolved and not b.resolved and b.corrected_low < 0 < b.corrected_high
    assert a.p_t_holm == pytest.approx(min(1.0, 2 * a.p_t)) and b.p_t_holm == pytest.approx(max(b.p_t, a.p_t_holm))
    # every patient gains in b's draws 0 and 2: for these draws the Wilcoxon test calls it, the draws do not
    assert b.p_wilcoxon < 0.3 and b.draws_better == 2


def test_pretraining_seeds_are_units_and_their_spread_counts():
    # two draws x two pretraining seeds; seed 1 is worse by 0.04 on both draws
    runs = [_run("random", d, {f"p{i}": [0.5] for i in range(2)}) for d in range(2)]
    for d, s, g in ((0, 0, 0.05), (1, 0, 0.03), (0, 1, 0.01), (1, 1, -0.01)):
        runs.append({**_run("x", d, {f"p{i}": [0.5 + g] for i in range(2)}), "pretrain_seed": s})
    c = compare(runs, "oar", "x", 1)
    assert c.units == ("d0-s0", "d0-s1", "d1-s0", "d1-s1") and c.pretrain_seeds == 2 and c.draws == 2
    assert c.difference == pytest.approx(0.02) and c.draws_better == 2
    # by draw: 0.03, 0.01 (var 2e-4); by seed: 0.04, 0.00 (var 8e-4); se^2 = 1e-4 + 4e-4;
    # Satterthwaite df = (5e-4)^2 / ((1e-4)^2 + (4e-4)^2) = 1.47
    _, low, high, _ = draw_t_interval({(0, 0): 0.05, (1, 0): 0.03, (0, 1): 0.01, (1, 1): -0.01})
    from scipy.stats import t
    half = t.ppf(0.975, 25e-8 / 17e-8) * np.sqrt(5e-4)
    assert (c.t_low, c.t_high) == pytest.approx((0.02 - half, 0.02 + half)) == (low, high)
    # the seeds' spread widens it: over the draws alone (seeds averaged) it would be 0.02 ± 12.7 x 0.01
    assert half > 12.7062 * 0.01


def test_rows_trained_under_an_older_rule_are_marked():
    """Issue 32, item 2: a record scored on every slice first (cases_every_slice) was trained before
    the masked-slice rule; where a table mixes rules, those rows are marked and the sizes named."""
    from contourcl.training.experiments.report import rule_marks

    runs = [_run(m, 0, {"p0": [0.5]}, n) for m in ("random", "x") for n in (1, 5)]
    assert rule_marks(runs, "oar")[0] == {}  # one rule: nothing marked
    runs[1]["cases_every_slice"] = runs[1]["cases"]  # random at 5: older
    marks, note = rule_marks(runs, "oar")
    assert marks == {"random": " †"} and "random at \\|X_tr\\| = 5:" in note[0] and "every slice" in note[0]


def test_rows_scored_through_another_path_are_marked():
    from contourcl.training.experiments.report import rule_marks

    runs = [_run(m, 0, {"p0": [0.5]}, n) for m in ("random", "x") for n in (1, 5)]
    runs[0].update(scored_path="probabilities interpolated onto the CT's grid", largest_component=False)
    marks, note = rule_marks(runs, "oar")
    assert marks == {"random": " ‡"} and "random at \\|X_tr\\| = 1:" in note[-2] and "largest component False" in note[-2]
