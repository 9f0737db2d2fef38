"""Clicks in MONAI Label's protocols (issue 31, items 1 and 6): Slicer's DeepEdit form and
DeepGrow's form are read in the model's structure names; each bad input is refused naming the
problem; only the refined structure changes in a label map."""

from __future__ import annotations

import numpy as np
import pytest

from contourcl.clicks import MAX_POINTS, merge_structure, parse_clicks
from contourcl.data.labels import model_labels
from contourcl.errors import ContourCLError, InvalidClickError

OAR = model_labels("oar")


def test_slicers_deepedit_form():
    # as Slicer's module sends it: one list per label of the server (gtv's too), the clicked segment in "label"
    params = {"label": "Parotid_L", "Brainstem": [], "SpinalCord": [[1, 2, 3]], "Parotid_L": [[10, 11, 12], [4, 5, 6]],
              "GTV": [[7, 7, 7]], "background": [[20, 21, 22]], "largest_component": True}
    clicks = parse_clicks(params, "oar", OAR)
    assert clicks.form == "deepedit" and clicks.label == "Parotid_L"
    assert clicks.positive_of("Parotid_L").tolist() == [[10, 11, 12], [4, 5, 6]]
    assert "GTV" not in clicks.positive and clicks.negative.tolist() == [[20, 21, 22]]
    start = np.zeros((30, 30, 30), np.uint8)
    assert clicks.targets(start, OAR) == ["Parotid_L"], "only the structure named in label is refined"
    # names as a client may spell them; integral floats are integers
    clicks = parse_clicks({"label": "parotid_l", "parotid_l": [[1.0, 2, 3]]}, "oar", OAR)
    assert clicks.label == "Parotid_L" and clicks.positive_of("Parotid_L").tolist() == [[1, 2, 3]]


def test_deepgrow_form():
    clicks = parse_clicks({"label": "GTV", "foreground": [[1, 2, 3]], "background": [[4, 5, 6], [7, 8, 9]]}, "gtv", model_labels("gtv"))
    assert clicks.form == "deepgrow" and clicks.label == "GTV" and clicks.count == 3
    assert clicks.positive_of("GTV").tolist() == [[1, 2, 3]] and clicks.negative.tolist() == [[4, 5, 6], [7, 8, 9]]


def test_no_points_asks_for_the_automatic_contour():
    assert parse_clicks({}, "oar", OAR) is None
    assert parse_clicks({"largest_component": True}, "oar", OAR) is None
    assert parse_clicks({"label": "Mandible", "Mandible": [], "background": []}, "oar", OAR) is None
    assert parse_clicks({"label": "GTV", "foreground": [], "background": []}, "gtv", model_labels("gtv")) is None


def test_background_and_unnamed_requests_refine_the_structures_clicked():
    start = np.zeros((10, 10, 10), np.uint8)
    start[0:3, 0:3, 0:3] = OAR["Mandible"]
    start[6:9, 6:9, 6:9] = OAR["Larynx"]
    # Slicer: a click on its background segment: the structure under it
    clicks = parse_clicks({"label": "background", "Brainstem": [[5, 5, 5]], "background": [[1, 1, 1]]}, "oar", OAR)
    assert clicks.targets(start, OAR) == ["Mandible"]
    # OHIF: no label; the structures with points and those under a negative point
    clicks = parse_clicks({"Brainstem": [[5, 5, 5]], "background": [[7, 7, 7]]}, "oar", OAR)
    assert clicks.label is None and clicks.targets(start, OAR) == ["Brainstem", "Larynx"]


@pytest.mark.parametrize("params, words", [
    ({"label": "Liver", "Liver": [[1, 2, 3]]}, ["'Liver'", "no such structure", "Brainstem"]),
    ({"label": "GTV", "GTV": [[1, 2, 3]]}, ["'GTV'", "no such structure"]),  # gtv's, not oar's
    ({"label": "Liver"}, ["'Liver'", "no such structure"]),  # refused with no point too
    ({"label": 3, "Mandible": [[1, 2, 3]]}, ["label must name"]),
    ({"label": "Mandible", "Mandible": [[1.5, 2, 3]]}, ["[1.5, 2, 3]", "'Mandible'", "three integers"]),
    ({"label": "Mandible", "Mandible": [["1", 2, 3]]}, ["'Mandible'", "three integers"]),
    ({"label": "Mandible", "Mandible": [[True, 2, 3]]}, ["three integers"]),
    ({"label": "Mandible", "Mandible": [[1, 2]]}, ["[1, 2]", "three integers"]),
    ({"label": "Mandible", "Mandible": [1, 2, 3]}, ["one point"]),
    ({"label": "Mandible", "Mandible": "1,2,3"}, ["must be a list"]),
    ({"label": "Mandible", "background": [[1, 2, float("nan")]]}, ["'background'", "three integers"]),
    ({"label": "Mandible", "Mandible": [[1, 2, 3]] * (MAX_POINTS + 1)}, [str(MAX_POINTS + 1), "at most 1000"]),
    ({"label": "Mandible", "Mandible": [[1, 2, 3]] * 600, "background": [[1, 2, 3]] * 401}, ["1001 points", "at most 1000"]),
    ({"foreground": [[1, 2, 3]]}, ["need a label"]),
    ({"label": "Mandible", "Mandible": [[10 ** 30, 2, 3]]}, ["outside the image"]),
])
def test_bad_clicks_are_refused_naming_the_problem(params, words):
    with pytest.raises(InvalidClickError) as err:
        parse_clicks(params, "oar", OAR)
    assert isinstance(err.value, ContourCLError)  # answered 422 by the server
    for word in words:
        assert word in str(err.value), (word, str(err.value))


def test_a_point_outside_the_image_is_refused():
    clicks = parse_clicks({"label": "Mandible", "Mandible": [[0, 0, 0], [39, 29, 19]], "background": [[5, 30, 2]]}, "oar", OAR)
    with pytest.raises(InvalidClickError, match=r"point \[5, 30, 2\] of 'background' is outside the image.*40 x 30 x 20"):
        clicks.check_inside((40, 30, 20))
    clicks = parse_clicks({"label": "Mandible", "Mandible": [[-1, 0, 0]]}, "oar", OAR)
    with pytest.raises(InvalidClickError, match=r"\[-1, 0, 0\] of 'Mandible' is outside"):
        clicks.check_inside((40, 30, 20))
    parse_clicks({"label": "Mandible", "Mandible": [[39, 29, 19]]}, "oar", OAR).check_inside((40, 30, 20))


def test_only_the_refined_structure_changes():
    rng = np.random.default_rng(0)
    start = rng.integers(0, 4, size=(12, 12, 6)).astype(np.uint8)
    wanted = rng.random(start.shape) < 0.5
    out = merge_structure(start, start, 2, wanted)
    others = (start != 2) & (start != 0)
    assert np.array_equal(out[others], start[others]), "no other structure's voxel changes"
    assert np.array_equal(out == 2, wanted & ((start == 0) | (start == 2))), "it takes only background and its own voxels"
    assert np.array_equal(out[(start == 0) & ~wanted], start[(start == 0) & ~wanted])
