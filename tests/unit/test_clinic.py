"""The clinic replay's pieces that need no server: the shifted department's convention and the
paired comparison of the two arms (``contourcl.serving.clinic``)."""

from __future__ import annotations

import numpy as np
import pytest

from contourcl.data.labels import model_labels
from contourcl.serving.clinic import compare_arms, counted, shifted_convention

OAR = model_labels("oar")


def test_the_shifted_convention_grows_parotids_in_3d_and_the_cord_in_plane():
    label = np.zeros((30, 30, 12), np.uint8)
    label[5:9, 5:9, 4:8] = OAR["Parotid_R"]
    label[20:22, 20:22, 2:10] = OAR["SpinalCord"]
    label[9:12, 5:9, 4:8] = OAR["Mandible"]  # touches the parotid: keeps every voxel
    affine = np.diag([4.0, 4.0, 2.5, 1.0])  # axial axis last; 5 mm: one pixel in-plane, two slices
    out = shifted_convention(label, affine, OAR)
    parotid = out == OAR["Parotid_R"]
    assert parotid[4, 6, 5] and parotid[6, 4, 5] and parotid[6, 6, 2] and parotid[6, 6, 9]
    assert not parotid[3, 6, 5] and not parotid[6, 6, 1], "a 5 mm margin: one 4 mm pixel, two 2.5 mm slices"
    assert (out[label == OAR["Mandible"]] == OAR["Mandible"]).all(), "a margin never takes another structure's voxel"
    cord = out == OAR["SpinalCord"]
    assert cord[19, 20, 5] and cord[22, 21, 5]
    assert not cord[20, 20, 1] and not cord[20, 20, 10], "the canal runs with the cord: no margin along the axial axis"
    assert (out[label == OAR["Brainstem"]] == label[label == OAR["Brainstem"]]).all()


def test_the_shifted_convention_follows_the_axial_axis_of_the_affine():
    label = np.zeros((12, 30, 30), np.uint8)
    label[2:10, 20:22, 20:22] = OAR["SpinalCord"]
    affine = np.array([[0, 0, 4.0, 0], [0, 4.0, 0, 0], [2.5, 0, 0, 0], [0, 0, 0, 1]])  # axial axis first
    cord = shifted_convention(label, affine, OAR) == OAR["SpinalCord"]
    assert cord[5, 19, 20] and not cord[1, 20, 20]


def _record(image: str, apl: dict[str, float], deleted=()) -> dict:
    structures = {n: {"added_path_length_mm": v, "change": "edited"} for n, v in apl.items()}
    structures.update({n: {"added_path_length_mm": 0.0, "change": "deleted"} for n in deleted})
    return {"image": image, "structures": structures}


def test_counted_leaves_out_what_the_department_did_not_contour():
    assert counted(_record("a", {"Brainstem": 3.0}, deleted=("Esophagus",))) == {"Brainstem": 3.0}


def test_compare_arms_pairs_the_last_patients():
    static = [_record(f"p{i}", {"Brainstem": 100.0, "Parotid_R": 50.0 + i}) for i in range(15)]
    learning = [_record(f"p{i}", {"Brainstem": 100.0 if i < 5 else 40.0, "Parotid_R": 50.0 + i}) for i in range(15)]
    rows = {r["structure"]: r for r in compare_arms(static, learning, last=10, reps=2000)}
    assert rows["Brainstem"]["patients"] == 10 and rows["Brainstem"]["ratio"] == pytest.approx(0.4)
    assert rows["Brainstem"]["ci_low"] == pytest.approx(0.4) and rows["Brainstem"]["ci_high"] == pytest.approx(0.4)
    assert rows["Parotid_R"]["ratio"] == pytest.approx(1.0) and rows["Parotid_R"]["p_holm"] == 1.0
    total_static = sum(100.0 + 50.0 + i for i in range(5, 15))
    total_learning = sum(40.0 + 50.0 + i for i in range(5, 15))
    assert rows["all structures"]["ratio"] == pytest.approx(total_learning / total_static)
    assert rows["all structures"]["level"] == pytest.approx(1 - 0.05 / 3), "Bonferroni over the 3 rows"
    assert rows["Brainstem"]["p_holm"] < 0.05
