"""The correction-effort measures on hand-made contours whose path lengths are known."""

from __future__ import annotations

import math

import numpy as np
import pytest

from contourcl.effort import added_path_length, axial_axis, correction_effort

CORNER = math.sqrt(0.5)  # a marching-squares corner cut of a binary mask, in pixels


def square(shape=(30, 30), at=(5, 5), side=10) -> np.ndarray:
    mask = np.zeros(shape, bool)
    mask[at[0]:at[0] + side, at[1]:at[1] + side] = True
    return mask


def test_a_square_drawn_from_nothing_adds_its_whole_outline():
    # a 10 x 10 pixel square: four sides of 9 between the outer pixels' centres, four corner cuts
    assert added_path_length(np.zeros((30, 30), bool), square(), (1.0, 1.0), 2.0) == pytest.approx(36 + 4 * CORNER, abs=1e-6)
    assert added_path_length(np.zeros((30, 30), bool), square(), (2.0, 2.0), 2.0) == pytest.approx(2 * (36 + 4 * CORNER), abs=1e-6)
    assert added_path_length(square(), square(), (1.0, 1.0), 0.1) == 0.0
    assert added_path_length(square(), np.zeros((30, 30), bool), (1.0, 1.0), 0.1) == 0.0  # erasing draws nothing


def test_a_square_shifted_by_one_voxel():
    """Shifted one pixel along the first axis, tolerance 0.1 mm: both sides across the shift are
    new (9 + 9), the far corner cuts (2 x 0.707), the new ends of the two sides along the shift
    beyond 0.1 mm of the old corner (2 x (1 - 0.1 * sqrt 2)) and the near corner cuts beyond 0.1 mm
    of the old sides (2 x 0.4 * sqrt 2)."""
    expected = 9 + 9 + 2 * CORNER + 2 * (1 - 0.1 * math.sqrt(2)) + 2 * 0.4 * math.sqrt(2)
    got = added_path_length(square(), square(at=(6, 5)), (1.0, 1.0), 0.1)
    assert got == pytest.approx(expected, abs=0.02)
    # within a tolerance wider than the shift, nothing was drawn
    assert added_path_length(square(), square(at=(6, 5)), (1.0, 1.0), 1.01) == 0.0
    # with 3 mm pixels along the shift, the shift is 3 mm: a 2 mm tolerance keeps the two 9 mm sides
    # across it, but within 1.5 mm (= 2 mm - half a 1 mm pixel) of each end, and little else
    anisotropic = added_path_length(square(), square(at=(6, 5)), (3.0, 1.0), 2.0)
    assert 2 * (9 - 2 * 1.5) <= anisotropic < added_path_length(np.zeros((30, 30), bool), square(at=(6, 5)), (3.0, 1.0), 2.0) / 2


def test_a_circle_with_a_notch():
    """A disc of radius 20 px; the clinician cuts a notch 4 px wide and 10 px deep into it. At a
    1 mm tolerance the added path is the notch's two walls and its floor, less what lies within
    1 mm of the old circle: about 2 x (10 - 1) + 4 = 22 mm, and nothing elsewhere."""
    y, x = np.mgrid[:60, :60]
    disc = (y - 30) ** 2 + (x - 30) ** 2 <= 20**2
    notched = disc.copy()
    notched[:20, 28:32] = False  # from the top edge (row 10) down to row 19
    got = added_path_length(disc, notched, (1.0, 1.0), 1.0)
    assert 19 <= got <= 24, got
    assert added_path_length(notched, disc, (1.0, 1.0), 1.0) < 6  # filling the notch back: only the arc over it


def test_correction_effort_per_structure_on_the_images_grid():
    affine = np.diag([1.0, 1.0, 3.0, 1.0])
    proposed = np.zeros((30, 30, 6), np.uint8)
    proposed[..., 1:4][square()] = 1  # kept as it is
    proposed[..., 1:5][square(at=(5, 18), side=6)] = 2  # edited on one slice
    proposed[..., 2][square(at=(18, 5), side=5)] = 3  # deleted
    final = proposed.copy()
    final[..., 4][square(at=(5, 18), side=6)] = 0
    final[..., 4][square(at=(6, 18), side=6)] = 2
    final[final == 3] = 0
    final[..., 0][square(at=(18, 18), side=4)] = 4  # added
    labels = {"Brainstem": 1, "SpinalCord": 2, "Parotid_R": 3, "Parotid_L": 4, "Mandible": 5}
    effort = correction_effort(proposed, final, labels, affine)
    assert set(effort) == {"Brainstem", "SpinalCord", "Parotid_R", "Parotid_L"}  # Mandible in neither
    assert effort["Brainstem"] == {"dice": 1.0, "surface_dice": 1.0, "added_path_length_mm": 0.0, "changed_slices": 0, "change": "unchanged"}
    cord = effort["SpinalCord"]
    assert cord["change"] == "edited" and cord["changed_slices"] == 1 and 0 < cord["dice"] < 1
    assert cord["added_path_length_mm"] == pytest.approx(added_path_length(proposed[..., 4] == 2, final[..., 4] == 2, (1.0, 1.0), 2.0), abs=0.01)
    assert effort["Parotid_R"] == {"dice": None, "surface_dice": None, "added_path_length_mm": 0.0, "changed_slices": 1, "change": "deleted"}
    added = effort["Parotid_L"]
    assert added["change"] == "added" and added["dice"] == 0.0 and added["added_path_length_mm"] == pytest.approx(12 + 4 * CORNER, abs=0.01)  # rounded to 0.01 mm


def test_the_axial_axis_follows_the_affine():
    assert axial_axis(np.diag([1.0, 1.0, 3.0, 1.0])) == 2
    # a series stored with slices along the first voxel axis (sagittal-like storage of an axial stack)
    assert axial_axis(np.array([[0, 0, 1, 0], [0, 1, 0, 0], [2.5, 0, 0, 0], [0, 0, 0, 1.0]])) == 0
    proposed = np.zeros((6, 30, 30), np.uint8)
    proposed[2][square()] = 1
    effort = correction_effort(proposed, np.zeros_like(proposed), {"Brainstem": 1},
                               np.array([[0, 0, 1, 0], [0, 1, 0, 0], [2.5, 0, 0, 0], [0, 0, 0, 1.0]]))
    assert effort["Brainstem"]["changed_slices"] == 1 and effort["Brainstem"]["change"] == "deleted"
