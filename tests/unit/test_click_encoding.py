"""The click maps' geometry (issue 31): a click at voxel (i, j, k) lands at (i, j, k), as a disk in
the axial plane of the stated radius (mm) reaching the stated slices above and below, on an
oblique, a feet-first and a non-square CT whose axial axis is not the last voxel axis."""

from __future__ import annotations

import numpy as np
import pytest

from contourcl.effort import axial_axis, voxel_sizes
from contourcl.refine.encoding import CLICK_RADIUS_MM, CLICK_REACH_MM, click_maps, reach_slices


def _rotation(degrees: float) -> np.ndarray:
    a = np.deg2rad(degrees)
    return np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1.0]])


def _affine(columns: np.ndarray) -> np.ndarray:
    affine = np.eye(4)
    affine[:3, :3] = columns
    affine[:3, 3] = (-100.0, 20.0, 7.0)
    return affine


# voxel axes as world directions (columns), sizes in mm; axial axis first or second
OBLIQUE = _affine(_rotation(20) @ np.array([[0, 1.5, 0], [0, 0, 2.0], [2.5, 0, 0]]))  # axial axis 0, rotated in-plane
FEET_FIRST = _affine(np.array([[0, 1.2, 0], [0, 0, -1.2], [-3.0, 0, 0]]))  # axial axis 0, slices head to feet
NON_SQUARE = _affine(np.array([[1.0, 0, 0], [0, 0, 2.0], [0, -2.5, 0]]))  # axial axis 1 (feet-first too)
CASES = {"oblique": (OBLIQUE, (12, 40, 56)), "feet_first": (FEET_FIRST, (12, 40, 56)), "non_square": (NON_SQUARE, (40, 12, 56))}


@pytest.mark.parametrize("name", sorted(CASES))
def test_a_click_lands_on_its_voxel_as_an_axial_disk(name):
    affine, shape = CASES[name]
    axis = axial_axis(affine)
    assert axis != 2  # the axial axis is not last
    sizes = voxel_sizes(affine)
    point = tuple(s // 2 + 1 for s in shape)
    maps = click_maps([point], None, shape, affine)
    assert maps.shape == (2, *shape)
    assert not maps[1].any()  # no negative click: nothing in the negative channel
    pos = maps[0]
    assert np.unravel_index(np.argmax(pos), shape) == point
    assert pos[point] == pytest.approx(1.0)
    # the axial reach: CLICK_REACH_MM in slices above and below, nothing beyond
    reach = reach_slices(sizes[axis])
    assert reach == max(1, int(CLICK_REACH_MM // sizes[axis]))
    for dz in range(-reach - 2, reach + 3):
        at = list(point)
        at[axis] += dz
        if 0 <= at[axis] < shape[axis]:
            assert (pos[tuple(at)] > 0) == (abs(dz) <= reach), (dz, pos[tuple(at)])
    # on the click's slice: inside the radius (mm, with each axis' voxel size) and nowhere else
    grids = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    plane = [a for a in range(3) if a != axis]
    dist = np.sqrt(sum(((grids[a] - point[a]) * sizes[a]) ** 2 for a in plane))
    on_slice = grids[axis] == point[axis]
    assert (pos[on_slice & (dist > CLICK_RADIUS_MM + 1e-6)] == 0).all()
    assert (pos[on_slice & (dist <= CLICK_RADIUS_MM - 1e-6)] > 0).all()
    # every slice it reaches has its peak over the click's in-plane position
    lit = np.argwhere(pos > 0)
    for a in plane:
        assert set(lit[:, a]) <= set(range(point[a] - int(np.ceil(CLICK_RADIUS_MM / sizes[a])), point[a] + int(np.ceil(CLICK_RADIUS_MM / sizes[a])) + 1))


def test_positive_and_negative_clicks_go_to_their_channels():
    affine, shape = CASES["non_square"]
    maps = click_maps([(5, 6, 10)], [(30, 6, 40)], shape, affine)
    assert np.unravel_index(np.argmax(maps[0]), shape) == (5, 6, 10)
    assert np.unravel_index(np.argmax(maps[1]), shape) == (30, 6, 40)
    assert maps[0][30, 6, 40] == 0 and maps[1][5, 6, 10] == 0


def test_bad_clicks_are_refused():
    with pytest.raises(ValueError):
        click_maps([(1, 2)], None, (4, 4, 4), np.eye(4))


def test_a_models_click_scope_is_parsed_and_checked():
    """How far a model's clicks act: ``MODEL=MM`` options become each model's scope (the others
    keep the file's), and back; a malformed item, an unknown model or a reach that is not a
    positive number of mm is refused by name, in an option and in a model config."""
    import pytest

    from contourcl.refine.encoding import ClickScope, model_scopes, scope_options
    from contourcl.serving.config import ModelConfig

    scopes = model_scopes(["oar", "gtv"], edit_radius_mm="gtv=40", reach_mm=" gtv=25 ,")
    assert scopes == {"oar": ClickScope(), "gtv": ClickScope(40.0, 25.0)}
    assert scopes["gtv"].kwargs() == {"edit_radius_mm": 40.0, "reach_mm": 25.0}
    assert scope_options(scopes) == {"edit_radius_mm": "gtv=40", "reach_mm": "gtv=25"}
    with pytest.raises(ValueError, match="MODEL=MM"):
        model_scopes(["gtv"], reach_mm="gtv=far")
    with pytest.raises(ValueError, match="'liver' is not one of the models"):
        model_scopes(["oar", "gtv"], reach_mm="liver=10")
    with pytest.raises(ValueError, match="reach_mm must be a positive number of mm"):
        ClickScope(reach_mm=0)
    with pytest.raises(ValueError, match="gtv: edit_radius_mm must be a positive number of mm, not 'wide'"):
        ModelConfig(name="gtv", description="target", largest_component=False, edit_radius_mm="wide")
    with pytest.raises(ValueError, match="gtv: reach_mm must be"):
        ModelConfig(name="gtv", description="target", largest_component=False, click_reach_mm=-5.0)
