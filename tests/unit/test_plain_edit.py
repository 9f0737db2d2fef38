"""The plain edit (issue 31, the no-network baseline): a positive click adds a disk of the stated
radius on its axial slice only; a negative click removes exactly the connected piece under it
on its axial slice."""

from __future__ import annotations

import numpy as np
import pytest

from contourcl.refine.plain_edit import PLAIN_EDIT_RADIUS_MM, PlainEdit, plain_edit


def _expected_disk(shape, centre, sizes, axis, radius):
    idx = np.indices(shape).astype(float)
    plane = [a for a in range(3) if a != axis]
    d2 = sum(((idx[a] - centre[a]) * sizes[a]) ** 2 for a in plane)
    return (d2 <= radius ** 2) & (idx[axis] == centre[axis])


@pytest.mark.parametrize("affine, axis", [
    (np.diag([1.0, 2.0, 3.0, 1.0]), 2),  # non-square pixels, head-first
    (np.diag([-1.0, -1.5, -2.5, 1.0]), 2),  # LPS-like, feet-first
    (np.array([[1.0, 0, 0, 0], [0, 0, 2.0, 0], [0, 1.5, 0, 0], [0, 0, 0, 1]]), 1),  # slices along the second voxel axis
])
def test_a_positive_click_on_an_empty_mask_makes_a_disk_of_the_radius_on_its_slice_only(affine, axis):
    assert PLAIN_EDIT_RADIUS_MM == 5.0
    shape, centre = (30, 24, 20), (12, 10, 7)
    out = plain_edit(np.zeros(shape, bool), [centre], [], affine)
    sizes = np.linalg.norm(affine[:3, :3], axis=0)
    expected = _expected_disk(shape, centre, sizes, axis, 5.0)
    assert out[centre] and np.array_equal(out, expected)
    other = [a for a in range(3) if a != axis]
    assert set(np.flatnonzero(out.any(axis=tuple(other)))) == {centre[axis]}, "the disk lies on the click's slice only"
    # its extent in voxels is the radius over each in-plane voxel size
    for a in other:
        extent = np.flatnonzero(out.any(axis=tuple(b for b in range(3) if b != a)))
        assert extent.max() - centre[a] == int(5.0 // sizes[a])
    bigger = plain_edit(np.zeros(shape, bool), [centre], [], affine, radius_mm=8.0)
    assert np.array_equal(bigger, _expected_disk(shape, centre, sizes, axis, 8.0))


def test_a_negative_click_removes_exactly_the_piece_under_it_on_its_slice():
    mask = np.zeros((20, 20, 10), bool)
    mask[2:6, 2:6, 2:6] = True    # piece A
    mask[10:15, 10:15, 3:8] = True  # piece B, not touching A
    mask[15, 15, 5] = True          # touches B's corner only on the click's slice: a piece of its own
    mask[12, 15, 5] = True          # joined to B through an edge on the click's slice
    out = plain_edit(mask, [], [[12, 12, 5]], np.eye(4))
    expected = mask.copy()
    expected[10:15, 10:15, 5] = False
    expected[12, 15, 5] = False
    assert expected[15, 15, 5] and expected[12, 12, 4] and expected[12, 12, 6], "B's other slices are kept"
    assert np.array_equal(out, expected)
    assert np.array_equal(plain_edit(mask, [], [[0, 19, 0]], np.eye(4)), mask), "a click on background removes nothing"
    assert not np.array_equal(out, mask) and mask[12, 12, 5], "the input mask is not changed"
    # slices along the second voxel axis: the piece on that axis's slice
    along = np.array([[1.0, 0, 0, 0], [0, 0, 2.0, 0], [0, 1.5, 0, 0], [0, 0, 0, 1]])
    cut = plain_edit(mask, [], [[12, 12, 5]], along)
    assert not cut[10:15, 12, 3:8].any() and cut[10:15, 11, 3:8].all() and cut[10:15, 13, 3:8].all()


def test_disks_come_first_and_a_negative_voxel_is_always_background():
    mask = np.zeros((20, 20, 6), bool)
    out = plain_edit(mask, [[5, 5, 2], [15, 15, 2]], [[5, 5, 2]], np.eye(4))
    assert not out[5, 5, 2] and not out[:10].any(), "the disk under the negative click is removed"
    assert out[15, 15, 2]
    # as a refinement method
    method = PlainEdit(radius_mm=3.0)
    got = method(np.zeros(mask.shape), np.eye(4), mask, np.array([[15, 15, 2]]), np.zeros((0, 3), int))
    assert got.sum() == plain_edit(mask, [[15, 15, 2]], [], np.eye(4), 3.0).sum() and method.name == "plain edit"
