"""The simulated clinician on hand-made masks: the next click at the centre of the largest error
region, positive where missed and negative where over-drawn, seeded, None without an error."""

from __future__ import annotations

import numpy as np

from contourcl.refine.simulator import next_click


def _box(shape, lo, hi):
    m = np.zeros(shape, dtype=bool)
    m[tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))] = True
    return m


def test_no_error_no_click():
    ref = _box((20, 20, 10), (5, 5, 2), (10, 10, 6))
    assert next_click(ref.copy(), ref, (1.0, 1.0, 1.0)) is None


def test_missed_region_gets_a_positive_click_at_its_centre():
    ref = _box((30, 30, 12), (2, 2, 1), (25, 25, 11))
    mask = ref & ~_box(ref.shape, (3, 3, 2), (10, 10, 9))  # a 7 x 7 x 7 hole missed
    click = next_click(mask, ref, (1.0, 1.0, 1.0))
    assert click.positive and click.region_voxels == 7 ** 3
    assert click.point == (6, 6, 5)


def test_the_larger_region_wins_and_over_drawn_gives_a_negative_click():
    ref = _box((40, 40, 16), (5, 5, 2), (15, 15, 10))
    mask = ref.copy()
    mask[6:8, 6:8, 4:6] = False  # 8 voxels missed
    mask |= _box(ref.shape, (25, 25, 3), (34, 34, 12))  # a 9-voxel cube over-drawn, apart from the reference
    click = next_click(mask, ref, (1.0, 1.0, 1.0))
    assert not click.positive and click.region_voxels == 9 ** 3
    assert click.point == (29, 29, 7)
    mask[20:40, 20:40, :] = False  # the over-drawn cube erased: the missed piece is left
    click = next_click(mask, ref, (1.0, 1.0, 1.0))
    assert click.positive and click.region_voxels == 8


def test_distance_uses_the_voxel_spacing():
    # one region: a flat box (9 x 9 voxels, 3 slices) joined by a thin bridge to a tall thin one
    # (3 x 3 voxels, 11 slices); which centre is farthest from the edge depends on the slices' mm
    ref = np.zeros((30, 14, 14), dtype=bool)
    ref[2:11, 2:11, 5:8] = True  # flat: centre (6, 6, 6)
    ref[20:23, 5:8, 1:12] = True  # tall: centre (21, 6, 6)
    ref[11:20, 6, 6] = True  # the bridge
    mask = np.zeros_like(ref)
    assert next_click(mask, ref, (1.0, 1.0, 3.0)).point == (6, 6, 6)  # flat: 5 mm in-plane vs tall: 2 mm
    assert next_click(mask, ref, (1.0, 1.0, 0.25)).point == (21, 6, 6)  # flat: 0.5 mm in z vs tall: 1.5 mm


def test_ties_are_drawn_with_the_seed():
    ref = _box((20, 20, 3), (2, 2, 1), (12, 4, 2))  # a bar: many voxels equally far from its edge
    mask = np.zeros_like(ref)
    a = [next_click(mask, ref, (1.0, 1.0, 1.0), np.random.default_rng(7)).point for _ in range(3)]
    assert len(set(a)) == 1  # the same seed: the same click
    drawn = {next_click(mask, ref, (1.0, 1.0, 1.0), np.random.default_rng(s)).point for s in range(20)}
    assert len(drawn) > 1  # other seeds: other tied voxels


def test_errors_outside_the_valid_slices_are_ignored():
    ref = _box((20, 20, 10), (5, 5, 2), (10, 10, 8))
    mask = ref.copy()
    mask[:, :, 8:] = True  # over-drawn, but on slices that do not image the patient
    valid = np.zeros(10, dtype=bool)
    valid[:8] = True
    assert next_click(mask, ref, (1.0, 1.0, 1.0), valid=valid[None, None]) is None
    assert next_click(mask, ref, (1.0, 1.0, 1.0)) is not None


def test_the_benchmark_tells_a_boundary_error_from_a_gross_one():
    """The click benchmark's diagnosis of the automatic contour (training.refine.benchmark):
    a one-voxel shell on the reference's surface is all "near the surface"; a blob away from it none."""
    from contourcl.training.refine.benchmark import error_near_surface

    affine = np.diag([4.0, 4.0, 2.5, 1.0])
    ref = _box((30, 30, 10), (10, 10, 2), (20, 20, 8))
    shell = ref.copy()
    shell[9, 10:20, 2:8] = True  # over-drawn by one voxel on one side
    shell[19, 10:20, 4] = False  # and missed one row on the other
    assert error_near_surface(shell, ref, affine) == {"voxels": 70, "near_surface": 1.0}
    blob = ref | _box((30, 30, 10), (1, 1, 2), (5, 5, 8))
    assert error_near_surface(blob, ref, affine) == {"voxels": 96, "near_surface": 0.0}
    assert error_near_surface(ref, ref, affine) == {"voxels": 0, "near_surface": None}


def test_the_server_check_over_every_patient_counts_only_structures_below_the_bar():
    """check_gain: the mean gain after 3 clicks of the structures whose automatic Dice is below 0.9,
    and an interval that resamples patients."""
    from contourcl.training.refine.benchmark import check_gain

    def record(case, structures):
        return {"model": "oar", "case": case, "structures": {
            name: {"auto": {"0": {"dice": before}}, "network": {"3": {"dice": after}}} for name, (before, after) in structures.items()}}

    records = [record("a", {"Brainstem": (0.5, 0.7), "Mandible": (0.95, 0.5)}),  # Mandible is above the bar: not counted
               record("b", {"Brainstem": (0.6, 0.7), "Larynx": (0.4, 0.4)})]
    c = check_gain(records, "oar")
    assert c["structures"] == 3 and c["patients"] == 2
    assert abs(c["gain"] - (0.2 + 0.1 + 0.0) / 3) < 1e-9
    assert c["low"] <= c["gain"] <= c["high"]
    assert check_gain(records, "gtv") is None


def test_the_oracle_ceiling_fixes_only_within_the_clicks_scope():
    """The benchmark's ``oracle`` (a ceiling, not a method): the mask becomes the reference within
    the edit radius of a click on the slices it reaches, and stays the input everywhere else."""
    from contourcl.training.refine.benchmark import click_series, oracle_method

    affine = np.diag([4.0, 4.0, 2.5, 1.0])  # 20 mm = 5 pixels; a 5 mm reach = 2 slices each way
    ref = _box((40, 40, 12), (5, 5, 0), (35, 35, 12))
    start = np.zeros_like(ref)  # all missed: the first click goes to the centre of the box
    oracle = oracle_method(20.0, 5.0)
    new = oracle(None, affine, start, np.array([[20, 20, 6]]), np.zeros((0, 3), int), reference=ref)
    assert new[20, 20, 6] and new[25, 20, 6] and new[20, 15, 4] and new[20, 20, 8]
    assert not new[26, 20, 6] and not new[20, 20, 9] and not new[20, 20, 3]  # 6 pixels away; 3 slices away
    assert not (new & ~ref).any()
    wide = oracle_method(None, 5.0)(None, affine, start, np.array([[20, 20, 6]]), np.zeros((0, 3), int), reference=ref)
    assert (wide[:, :, 4:9] == ref[:, :, 4:9]).all() and not wide[:, :, :4].any()  # None: the whole reached slices
    masks, made = click_series(oracle, None, affine, start, ref, np.ones(ref.shape, bool), 3, seed=0)
    assert [m.sum() for m in masks] == sorted(m.sum() for m in masks) and len(made) == 3  # never worse, click by click
    assert (masks[3] == ref).sum() > (masks[1] == ref).sum()


def test_what_a_click_does_counts_fixed_and_broken_voxels():
    """The benchmark's record of each click: voxels it fixes and breaks against the reference, and
    the table over every click made."""
    from contourcl.training.refine.benchmark import change_lines, click_changes

    ref = _box((10, 10, 4), (2, 2, 0), (6, 6, 4))
    start = np.zeros_like(ref)
    first = start | _box((10, 10, 4), (2, 2, 0), (6, 6, 2))  # fixes 32
    second = (first & ~_box((10, 10, 4), (2, 2, 0), (3, 6, 1))) | _box((10, 10, 4), (7, 7, 0), (9, 9, 1))  # breaks 4 + 4
    assert click_changes([start, first, second], ref) == [[32, 0], [0, 8]]
    records = [{"model": "oar", "changes": {"Brainstem/network": [[32, 0], [0, 8]], "Brainstem/plain_edit": [[1, 3]]}}]
    table = "\n".join(change_lines(records, ["oar"], ["network", "plain_edit"]))
    assert "| oar | network | 2 | 16.0 | 4.0 | 50% |" in table
    assert "| oar | plain_edit | 1 | 1.0 | 3.0 | 100% |" in table
