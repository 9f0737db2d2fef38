"""Slices that do not image the patient (OpenKBP's masked CTs) are neither scored nor trained on.

Many OpenKBP CTs hold values only in small islands around the drawn structures on the slices away
from the treatment; the README's "Shipped weights" says what that did to the figures.
"""

import json

import numpy as np
import pytest
from monai.transforms import Compose

from contourcl.data.datasets import labeled_cases, read_scored_reference
from contourcl.data.labels import model_labels
from contourcl.data.volumes import MIN_IMAGED_AREA_CM2, imaged_slices
from contourcl.evaluation import evaluate_model_file, prepare_cases
from contourcl.inference import Contourer
from contourcl.models.checkpoint import read_meta
from contourcl.testing import constant_oar_model, write_nifti
from contourcl.training.finetune.engine import FinetuneConfig, preprocessing

CORD = model_labels("oar")["SpinalCord"]


def test_imaged_slices_finds_the_axial_axis_and_measures_tissue_in_square_centimetres():
    # stored with the axial axis first: voxel axis 0 runs inferior-superior (3 mm), axes 1 and 2
    # are right-left (2.5 mm) and posterior-anterior (4 mm): one pixel is 10 mm² = 0.1 cm²
    affine = np.array([[0, -2.5, 0, 0], [0, 0, 4.0, 0], [3.0, 0, 0, 0], [0, 0, 0, 1]])
    ct = np.full((6, 60, 50), -1024, dtype=np.int16)
    ct[0] = 40  # 3000 pixels of tissue: 300 cm²
    ct[1, :20, :20] = 40  # 400 pixels: 40 cm², an island
    ct[2, :20, :26] = 40  # 520 pixels: 52 cm²
    ct[3, :20, :20] = 40  # two islands of 40 cm² (80 cm² in all, none of 50)
    ct[3, 30:50, 25:45] = 40
    ct[4, :20, :26] = -600  # below the tissue threshold (lung-like): no tissue
    ct[5, :2, :3] = 1000  # 6 pixels
    axis, imaged = imaged_slices(ct, affine)
    assert MIN_IMAGED_AREA_CM2 == 50.0  # the figures above straddle it
    assert axis == 0
    assert imaged.tolist() == [True, False, True, False, False, False]


def _masked_case(tmp_path):
    """A CT (3 mm in-plane, 2 mm slices) whose slices 0-3 image a 36 x 36-voxel body (117 cm²) and
    slices 4-5 only a 3 x 3 island (0.8 cm²), as OpenKBP stores slices away from the treatment,
    with a spinal cord drawn on every slice (the island itself on 4-5)."""
    affine = np.diag([3.0, 3.0, 2.0, 1.0])
    ct = np.full((48, 48, 6), -1024, dtype=np.int16)
    ct[6:42, 6:42, :4] = 30
    ct[20:23, 20:23, 4:] = 30
    lab = np.zeros(ct.shape, dtype=np.uint8)
    lab[18:24, 18:24, :4] = CORD
    lab[20:23, 20:23, 4:] = CORD
    studies = tmp_path / "studies"
    (studies / "labels" / "final").mkdir(parents=True)
    write_nifti(studies / "pt.nii.gz", ct, affine)
    write_nifti(studies / "labels" / "final" / "pt.nii.gz", lab, affine)
    return studies, ct, lab


def test_prepared_cases_are_scored_only_by_models_they_were_prepared_for(tmp_path):
    studies, _, _ = _masked_case(tmp_path)
    model = constant_oar_model(tmp_path / "oar.pt", CORD)
    (case,) = labeled_cases(studies, "oar")
    (prepared,) = prepare_cases([case], read_meta(model))
    raw = json.dumps(evaluate_model_file(model, [case], largest_component=False)[case["id"]])  # JSON: NaN marks skipped structures
    # prepared, raw, or both in one list: the same figures
    assert json.dumps(evaluate_model_file(model, [prepared], largest_component=False)[case["id"]]) == raw
    both = evaluate_model_file(model, [prepared, {**case, "id": "again"}], largest_component=False)
    assert json.dumps(both[case["id"]]) == json.dumps(both["again"]) == raw
    # a model at another spacing would contour a CT resampled for the first one: refused, naming the case
    coarse = constant_oar_model(tmp_path / "oar-4mm.pt", CORD, spacing=4.0)
    with pytest.raises(ValueError, match=r"pt: prepared for a model with .*3\.0.*oar-4mm\.pt needs .*4\.0"):
        evaluate_model_file(coarse, [prepared], largest_component=False)
    assert evaluate_model_file(coarse, [case], largest_component=False)[case["id"]]["SpinalCord"]["dice"] > 0


def test_the_metric_scores_only_slices_that_image_the_patient(tmp_path):
    studies, ct, lab = _masked_case(tmp_path)
    model = constant_oar_model(tmp_path / "oar.pt", CORD)  # SpinalCord everywhere
    (case,) = labeled_cases(studies, "oar")
    (prepared,) = prepare_cases([case], read_meta(model))
    assert prepared.unimaged_voxels == 2 * 9  # the cord on the two island slices
    assert (prepared.reference[..., 4:] == 0).all() and (prepared.reference[..., :4] == lab[..., :4]).all()

    # Dice by hand on the served label map, slices 0-3 only
    served_label = Contourer(model, largest_component=False)(case["image"]).label
    served = served_label == CORD
    assert served[..., 4:].any()  # the model draws on the island slices too: they must not count
    ref = lab == CORD
    p, r = served[..., :4], ref[..., :4]
    expected = 2 * np.logical_and(p, r).sum() / (p.sum() + r.sum())
    everywhere = 2 * np.logical_and(served, ref).sum() / (served.sum() + ref.sum())
    assert abs(expected - everywhere) > 0.1 * expected  # scoring every slice would give another figure
    labels = {}
    scores = evaluate_model_file(model, [case], largest_component=False, labels=labels)[case["id"]]
    assert abs(scores["SpinalCord"]["dice"] - expected) < 1e-6
    # the label map kept for pictures (evaluate --overlays) is the one scored
    assert (labels[case["id"]][..., :4] == served_label[..., :4]).all() and (labels[case["id"]][..., 4:] == 0).all()

    # the reference read from the files (benchmarks, the report's overlays) is the one scored
    reference = read_scored_reference(case, "oar")
    assert (reference.label == prepared.reference).all() and (reference.full == lab).all()
    assert reference.imaged[0] == 2 and reference.imaged[1].tolist() == [True] * 4 + [False] * 2
    # a caller that has read the CT already passes it in (the report's overlays): it is the one used
    affine = np.diag([3.0, 3.0, 2.0, 1.0])
    again = read_scored_reference(case, "oar", ct=(ct, affine))
    assert (again.label == reference.label).all() and again.imaged[1].tolist() == reference.imaged[1].tolist()
    emptied = ct.copy()
    emptied[..., 3] = -1024
    assert read_scored_reference(case, "oar", ct=(emptied, affine)).imaged[1].tolist() == [True] * 3 + [False] * 3


def test_training_labels_are_background_on_slices_that_do_not_image_the_patient(tmp_path):
    studies, ct, lab = _masked_case(tmp_path)
    (case,) = labeled_cases(studies, "oar")
    cfg = FinetuneConfig(model="oar", spacing=(3.0, 3.0), roi=(48, 48))
    out = Compose(preprocessing(cfg))({"image": case["image"], "label": case["label"]})
    label = np.asarray(out["label"][0])
    assert label.shape == ct.shape  # 3 mm in-plane, RAS already: the grid is the file's
    assert (label[..., 4:] == 0).all()
    assert (label[..., :4] == lab[..., :4]).all()
    assert out["present"][CORD] == 1.0  # still contoured where it can be seen


def test_agcl_pretraining_takes_no_anchor_from_slices_that_do_not_image_the_patient(tmp_path):
    from contourcl.data.labels import STORED_LABELS
    from contourcl.training.pretrain.agcl import _load_label_file
    from contourcl.training.pretrain.base import PretrainConfig

    studies, ct, lab = _masked_case(tmp_path)
    (case,) = labeled_cases(studies, "oar")
    stored = _load_label_file(case["image"], case["label"], PretrainConfig(spacing=(3.0, 3.0)), "oar")
    assert stored.shape == ct.shape
    assert (stored[..., 4:] == 0).all()  # the island slices hold no structure to contrast
    assert ((stored[..., :4] == STORED_LABELS["SpinalCord"]) == (lab[..., :4] == CORD)).all()
