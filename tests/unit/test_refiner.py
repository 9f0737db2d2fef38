"""The Refiner (issue 31): clicks in the image's own voxel order land where they were made on
oblique, feet-first and non-square grids whose axial axis is not last; only the slices the clicks
reach are recomputed (every other voxel is the input mask's); the untrained network returns the
mask; a model file keeps the encoding and the provenance."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from contourcl.effort import axial_axis, voxel_sizes
from contourcl.models.checkpoint import ModelMeta, read_meta, save_model
from contourcl.models.networks import NetConfig, build_network
from contourcl.refine.encoding import reach_slices
from contourcl.refine.network import MASK_PRIOR_LOGIT, from_shipped, refine_config, refine_meta
from contourcl.refine.refiner import WINDOW, Refiner, crop_window
from contourcl.testing import tiny_model_file


def _affine(columns) -> np.ndarray:
    affine = np.eye(4)
    affine[:3, :3] = columns
    affine[:3, 3] = (-100.0, 20.0, 7.0)
    return affine


_A = np.deg2rad(20)
_ROT = np.array([[np.cos(_A), -np.sin(_A), 0], [np.sin(_A), np.cos(_A), 0], [0, 0, 1.0]])
# the grids of test_click_encoding: axial axis 0 (oblique; feet-first) and 1 (non-square, feet-first)
CASES = {
    "oblique": (_affine(_ROT @ np.array([[0, 1.5, 0], [0, 0, 2.0], [2.5, 0, 0]])), (12, 40, 56)),
    "feet_first": (_affine(np.array([[0, 1.2, 0], [0, 0, -1.2], [-3.0, 0, 0]])), (12, 40, 56)),
    "non_square": (_affine(np.array([[1.0, 0, 0], [0, 0, 2.0], [0, -2.5, 0]])), (40, 12, 56)),
}


class PaintPositive(torch.nn.Module):
    """A stand-in network whose answer is "structure" where the positive click map is strong and
    "not structure" where the negative one is (whatever the current mask)."""

    def __init__(self):
        super().__init__()
        self.config = NetConfig(out_channels=1, in_channels=4, encoder="resnet10", width=8)

    def forward(self, x):
        return 40.0 * (x[:, 2:3] - 0.5) - 40.0 * x[:, 3:4]


def _meta(spacing=(3.0, 3.0)) -> ModelMeta:
    return ModelMeta(model="refine", labels={"structure": 1}, net={}, spacing=spacing, window=(-500.0, 800.0))


def _ct(shape, seed=0):
    return np.random.default_rng(seed).normal(0, 200, size=shape).astype(np.float32)


@pytest.mark.parametrize("name", sorted(CASES))
def test_a_click_is_answered_at_its_voxel_and_only_within_reach(name):
    affine, shape = CASES[name]
    axis = axial_axis(affine)
    refiner = Refiner(PaintPositive(), _meta(spacing=(1.5, 1.5)))
    point = np.array([[s // 2 + 1 for s in shape]])
    mask = np.zeros(shape, dtype=bool)
    out = refiner(_ct(shape), affine, mask, point, np.zeros((0, 3), np.int64))
    assert out.dtype == bool and out.shape == shape
    assert out[tuple(point[0])]
    reach = reach_slices(voxel_sizes(affine)[axis])
    changed = np.unique(np.argwhere(out)[:, axis])
    assert set(changed) <= set(range(point[0][axis] - reach, point[0][axis] + reach + 1))
    # the painted disk is centred on the click in every reached slice
    lit = np.argwhere(out)
    assert np.allclose(lit.mean(axis=0)[[a for a in range(3) if a != axis]], point[0][[a for a in range(3) if a != axis]], atol=0.6)


@pytest.mark.parametrize("name", sorted(CASES))
def test_only_the_reached_slices_change(name):
    affine, shape = CASES[name]
    axis = axial_axis(affine)
    rng = np.random.default_rng(1)
    mask = rng.random(shape) < 0.3
    refiner = Refiner(PaintPositive(), _meta(spacing=(1.5, 1.5)))
    pos = np.array([[3, 3, 3]])
    neg = np.array([[s - 3 for s in shape]])
    neg[0, axis] = 4  # both near one end of the axial axis: the slices beyond their reach stay
    out = refiner(_ct(shape), affine, mask, pos, neg)
    reach = reach_slices(voxel_sizes(affine)[axis])
    reached = set()
    for p in (pos[0], neg[0]):
        reached |= set(range(p[axis] - reach, p[axis] + reach + 1))
    others = [z for z in range(shape[axis]) if z not in reached]
    assert others
    assert np.array_equal(np.take(out, others, axis=axis), np.take(mask, others, axis=axis))
    assert not out[tuple(neg[0])] and out[tuple(pos[0])]
    assert not np.array_equal(out, mask)


def test_no_clicks_no_change_and_bad_clicks_refused():
    affine, shape = CASES["oblique"]
    mask = np.zeros(shape, dtype=bool)
    mask[4:8, 10:20, 10:30] = True
    refiner = Refiner(PaintPositive(), _meta())
    out = refiner(_ct(shape), affine, mask, np.zeros((0, 3)), None)
    assert np.array_equal(out, mask) and out is not mask
    with pytest.raises(ValueError, match="outside"):
        refiner(_ct(shape), affine, mask, np.array([[0, 0, shape[2]]]), None)
    with pytest.raises(ValueError):
        refiner(_ct(shape), affine, mask[:-1], np.array([[1, 1, 1]]), None)


def test_from_shipped_copies_the_ct_channel_and_starts_as_the_mask(tmp_path):
    shipped = tiny_model_file(tmp_path / "oar.pt", model="oar")
    network, meta = from_shipped(str(shipped))
    source = torch.load(shipped, weights_only=True)["state_dict"]
    conv = network.state_dict()["encoder.resnet.conv1.weight"]
    assert conv.shape[1] == 4
    assert torch.equal(conv[:, :1], source["encoder.resnet.conv1.weight"].float())
    assert not conv[:, 1:].any()
    # the untrained network returns the mask (zero head on the mask prior), here on the model's grid
    assert meta.spacing == (4.0, 4.0)
    affine = np.diag([4.0, 4.0, 2.5, 1.0])
    shape = (48, 40, 20)
    mask = np.zeros(shape, dtype=bool)
    mask[10:30, 12:28, 5:15] = True
    refiner = Refiner(network, refine_meta(network, meta))
    out = refiner(_ct(shape), affine, mask, np.array([[20, 20, 10]]), np.array([[11, 13, 6]]))
    assert np.array_equal(out, mask)


def test_model_file_round_trip_keeps_encoding_and_provenance(tmp_path):
    network = build_network(refine_config(NetConfig(out_channels=8, encoder="resnet10", width=8)))
    base = ModelMeta(model="oar", labels={}, net={}, spacing=(3.0, 3.0), window=(-400.0, 600.0))
    meta = refine_meta(network, base, {"steps": 12, "git_commit": "abc", "date": "2026-12-06"}, radius_mm=6.0, reach_mm=5.0)
    path = save_model(tmp_path / "refine.pt", network, meta, half=True)
    refiner = Refiner.from_file(path)
    assert (refiner.radius_mm, refiner.reach_mm, refiner.prior) == (6.0, 5.0, MASK_PRIOR_LOGIT)
    assert refiner.meta.window == (-400.0, 600.0)
    kept = read_meta(path).provenance
    assert kept["steps"] == 12 and kept["git_commit"] == "abc"
    with pytest.raises(ValueError, match="not a refinement"):
        Refiner.from_file(tiny_model_file(tmp_path / "gtv.pt"))


class AllStructure(torch.nn.Module):
    """A stand-in network whose answer is "structure" everywhere."""

    def __init__(self):
        super().__init__()
        self.config = NetConfig(out_channels=1, in_channels=4, encoder="resnet10", width=8)

    def forward(self, x):
        return torch.full_like(x[:, :1], 40.0)


def test_a_click_changes_the_mask_only_within_the_edit_radius():
    """A file's edit radius bounds what a click changes: within it of the click in its axial
    plane, on the slices it reaches; everywhere else the input mask, exactly (also on the reached
    slices). A file without one changes the whole reached slices."""
    affine, shape, click = np.diag([1.5, 1.5, 2.5, 1.0]), (40, 40, 12), np.array([[20, 20, 6]])
    mask = np.random.default_rng(2).random(shape) < 0.3
    meta = _meta(spacing=(1.5, 1.5))
    bounded = Refiner(AllStructure(), replace(meta, provenance={"encoding": {"edit_radius_mm": 6.0}}))
    out = bounded(_ct(shape), affine, mask, click, None)
    g = np.indices(shape)
    reach = reach_slices(2.5)
    region = ((((g[0] - 20) * 1.5) ** 2 + ((g[1] - 20) * 1.5) ** 2) <= 36.0) & (np.abs(g[2] - 6) <= reach)
    assert out[region].all(), "the network's answer within the radius"
    assert np.array_equal(out[~region], mask[~region]), "the input mask, exactly, beyond it"
    wider = bounded(_ct(shape), affine, mask, click, None, edit_radius_mm=9.0)  # a model's own radius (gtv's config)
    region9 = ((((g[0] - 20) * 1.5) ** 2 + ((g[1] - 20) * 1.5) ** 2) <= 81.0) & (np.abs(g[2] - 6) <= reach)
    assert wider[region9].all() and np.array_equal(wider[~region9], mask[~region9])
    whole = Refiner(AllStructure(), meta)(_ct(shape), affine, mask, click, None)
    assert whole[:, :, 6 - reach : 7 + reach].all() and np.array_equal(whole[:, :, : 6 - reach], mask[:, :, : 6 - reach])


def test_a_models_reach_bounds_the_slices_a_click_changes():
    """A model's own reach (``gtv``'s config: a target's errors span many slices) replaces the
    file's: the click changes the slices within it, and no other."""
    affine, shape, click = np.diag([1.5, 1.5, 2.5, 1.0]), (40, 40, 24), np.array([[20, 20, 12]])
    mask = np.zeros(shape, dtype=bool)
    refiner = Refiner(AllStructure(), replace(_meta(spacing=(1.5, 1.5)), provenance={"encoding": {"edit_radius_mm": 6.0}}))
    assert refiner.reach_mm == 7.5
    for reach_mm, slices in ((None, reach_slices(2.5)), (20.0, 8)):
        out = refiner(_ct(shape), affine, mask, click, None, reach_mm=reach_mm)
        changed = np.nonzero(out.any(axis=(0, 1)))[0]
        assert changed.tolist() == list(range(12 - slices, 13 + slices)), reach_mm


def test_the_window_the_network_answers_on_holds_every_click_region():
    """The network runs on a window around the region clicks may change, not the whole slice: the
    window holds the region (with context), is at least the training windows' size and a multiple
    of 32, and lies inside the slice; on a slice no larger, the whole slice."""
    region = np.zeros((300, 260), dtype=bool)
    for box in ((slice(0, 10), slice(250, 260)), (slice(140, 150), slice(100, 105)), (slice(290, 300), slice(0, 4))):
        one = np.zeros_like(region)
        one[box] = True
        rows, cols = crop_window(one)
        for w, n, hit in ((rows, 300, box[0]), (cols, 260, box[1])):
            assert 0 <= w.start and w.stop <= n and w.start <= hit.start and hit.stop <= w.stop
            assert (w.stop - w.start) >= WINDOW and (w.stop - w.start) % 32 == 0
    both = np.zeros_like(region)
    both[5, 5] = both[280, 250] = True
    assert crop_window(both) == (slice(0, 300), slice(0, 260)), "regions far apart: the whole slice"
    assert crop_window(np.ones((80, 90), dtype=bool)) == (slice(0, 80), slice(0, 90))


def test_clicks_far_apart_on_a_large_slice_are_all_answered():
    """Two clicks at opposite corners of a 512-pixel slice: the network's window holds both edit
    regions, and both are answered (what a window too small would lose)."""
    affine, shape = np.diag([0.9, 0.9, 2.5, 1.0]), (512, 512, 5)
    mask = np.zeros(shape, dtype=bool)
    clicks = np.array([[30, 30, 2], [480, 470, 2]])
    refiner = Refiner(AllStructure(), replace(_meta(spacing=(3.0, 3.0)), provenance={"encoding": {"edit_radius_mm": 12.0}}))
    out = refiner(_ct(shape), affine, mask, clicks, None)
    for y, x, z in clicks:
        assert out[y - 5 : y + 6, x - 5 : x + 6, z].all(), (y, x)
    assert not out[200:300, 200:300].any()


def test_an_edit_radius_smaller_than_a_pixel_changes_nothing():
    """An edit region that holds no pixel of the network's grid (a radius far under a pixel, the
    click between pixels): the mask comes back unchanged, not an error."""
    affine, shape = np.diag([1.0, 1.0, 2.5, 1.0]), (40, 40, 6)
    mask = np.random.default_rng(3).random(shape) < 0.3
    network = build_network(refine_config(NetConfig(out_channels=8, encoder="resnet10", width=8)))  # convolutions: no empty input
    refiner = Refiner(network, _meta(spacing=(3.0, 3.0)))
    out = refiner(_ct(shape), affine, mask, np.array([[20, 20, 3]]), None, edit_radius_mm=0.01)
    assert np.array_equal(out, mask)
