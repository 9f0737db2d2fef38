"""Reference contours that cannot be right are set aside: not trained on, not scored, named.

:mod:`contourcl.data.reference_check`; the README's "Shipped weights" says what it changes.
"""

import json

import numpy as np
from monai.transforms import Compose

from contourcl.cli import main as cli
from contourcl.data.datasets import labeled_cases, read_scored_reference
from contourcl.data.labels import model_labels
from contourcl.data.reference_check import MAX_TUBE_CM2, checked_reference, implausible_structures
from contourcl.evaluation import evaluate_model_file, prepare_cases, summarise
from contourcl.models.checkpoint import read_meta
from contourcl.testing import constant_oar_model, write_nifti
from contourcl.training.finetune.engine import FinetuneConfig, preprocessing

OAR = model_labels("oar")


def _neck(cord_side: int = 4, parotid_in_air: bool = False, esophagus_side: int = 0):
    """A 2 mm in-plane, 3 mm slice CT of a 40 x 40-voxel neck (64 cm²) on 6 slices, with a cord of
    ``cord_side``² voxels (4: 0.64 cm²), a right parotid (inside the neck, or half of it in the air
    beside it) and, when ``esophagus_side``, an oesophagus; the label in the ``oar`` numbering."""
    affine = np.diag([2.0, 2.0, 3.0, 1.0])
    ct = np.full((64, 64, 6), -1024, dtype=np.int16)
    ct[12:52, 12:52] = 40
    lab = np.zeros(ct.shape, dtype=np.uint8)
    lab[36:36 + cord_side, 30:30 + cord_side] = OAR["SpinalCord"]
    if parotid_in_air:
        lab[20:28, 4:16] = OAR["Parotid_R"]  # a third of it inside the neck
    else:
        lab[20:28, 14:22] = OAR["Parotid_R"]
    if esophagus_side:
        lab[28:28 + esophagus_side, 30:30 + esophagus_side] = OAR["Esophagus"]
    return ct, lab, affine


def test_plausible_references_are_kept_whole():
    ct, lab, affine = _neck(esophagus_side=6)  # cord 0.64 cm², oesophagus 1.44 cm²
    kept, faults = checked_reference(ct, lab, affine, OAR)
    assert faults == {}
    assert kept is lab


def test_a_tube_wider_than_a_cord_or_oesophagus_is_set_aside_alone():
    ct, lab, affine = _neck(cord_side=12, esophagus_side=6)  # a "cord" of 5.76 cm²: the back of the neck, not a cord
    assert 12 * 12 * 0.04 > MAX_TUBE_CM2 > 6 * 6 * 0.04
    kept, faults = checked_reference(ct, lab, affine, OAR)
    assert list(faults) == ["SpinalCord"]
    assert "median cross-section 5.8 cm²" in faults["SpinalCord"]
    assert not (kept == OAR["SpinalCord"]).any()
    assert ((kept == OAR["Parotid_R"]) == (lab == OAR["Parotid_R"])).all()  # the others untouched
    assert ((kept == OAR["Esophagus"]) == (lab == OAR["Esophagus"])).all()


def test_a_structure_set_whose_solid_organ_lies_in_air_is_set_aside_whole():
    ct, lab, affine = _neck(parotid_in_air=True)
    faults = implausible_structures(ct, lab, affine, OAR)
    assert set(faults) == {"SpinalCord", "Parotid_R"}  # the plausible cord too: the set was not drawn on this CT
    assert "Parotid_R is 67% air" in faults["SpinalCord"]
    kept, _ = checked_reference(ct, lab, affine, OAR)
    assert not kept.any()
    # air only on slices that do not image the patient (OpenKBP's masked slices) does not count
    ct, lab, affine = _neck()
    ct[..., 3:] = -1024
    lab[..., 3:][lab[..., 3:] == OAR["Parotid_R"]] = 0
    lab[20:28, 4:12, 3:] = OAR["Parotid_R"]
    assert implausible_structures(ct, lab, affine, OAR) == {}
    # the gtv target is not checked (a target's margin may reach into air)
    gtv = model_labels("gtv")
    assert checked_reference(ct, (lab > 0).astype(np.uint8), affine, gtv)[1] == {}


def _studies(tmp_path, ct, lab, affine, name="pt"):
    studies = tmp_path / "studies"
    (studies / "labels" / "final").mkdir(parents=True, exist_ok=True)
    write_nifti(studies / f"{name}.nii.gz", ct, affine)
    write_nifti(studies / "labels" / "final" / f"{name}.nii.gz", lab, affine)  # oar numbering is the stored one for OARs
    return studies


def test_set_aside_structures_are_not_trained_on(tmp_path):
    ct, lab, affine = _neck(cord_side=12, esophagus_side=6)
    (case,) = labeled_cases(_studies(tmp_path, ct, lab, affine), "oar")
    out = Compose(preprocessing(FinetuneConfig(model="oar", spacing=(2.0, 2.0), roi=(64, 64))))(dict(case))
    label = np.asarray(out["label"][0])
    assert not (label == OAR["SpinalCord"]).any()
    assert out["present"][OAR["SpinalCord"]] == 0.0  # not contoured: the partial-label loss does not train it
    assert out["present"][OAR["Esophagus"]] == 1.0 and out["present"][OAR["Parotid_R"]] == 1.0


def test_set_aside_structures_are_not_scored_and_are_named(tmp_path, capsys):
    ct, lab, affine = _neck(cord_side=12, esophagus_side=6)
    studies = _studies(tmp_path, ct, lab, affine)
    ct2, lab2, _ = _neck(parotid_in_air=True)
    _studies(tmp_path, ct2, lab2, affine, name="unregistered")
    model = constant_oar_model(tmp_path / "oar.pt", OAR["SpinalCord"], spacing=2.0)  # draws SpinalCord everywhere
    cases = labeled_cases(studies, "oar")
    prepared = {c.id: c for c in prepare_cases(cases, read_meta(model))}
    assert list(prepared["pt"].set_aside) == ["SpinalCord"]
    assert set(prepared["unregistered"].set_aside) == {"SpinalCord", "Parotid_R"}
    scores = evaluate_model_file(model, cases, largest_component=False)
    assert np.isnan(scores["pt"]["SpinalCord"]["dice"])  # not scored (it would score about 0.1)
    assert scores["pt"]["Esophagus"]["dice"] == 0.0  # the kept structures are
    assert all(np.isnan(v["dice"]) for v in scores["unregistered"].values())
    summary = summarise([scores], list(OAR))
    assert summary[("mean", "dice")]["patients"] == 1  # a patient with nothing left to score does not count
    # the file-reading path (benchmarks, the report) sets the same structures aside
    for c in cases:
        assert read_scored_reference(c, "oar").set_aside == prepared[c["id"]].set_aside
    assert cli(["evaluate", str(model), "--data", str(studies), "--json", str(tmp_path / "e.json")]) == 0
    printed = capsys.readouterr().out
    assert "pt: reference SpinalCord set aside, not scored: median cross-section 5.8 cm²" in printed
    assert "unregistered: reference Parotid_R set aside, not scored: not drawn on this CT" in printed
    # --no-reference-check scores them all, as the figures made before the check were
    assert cli(["evaluate", str(model), "--data", str(studies), "--no-reference-check", "--json", str(tmp_path / "all.json")]) == 0
    assert "set aside" not in capsys.readouterr().out
    every = json.loads((tmp_path / "all.json").read_text())
    assert 0.0 < every["cases"]["pt"]["SpinalCord"]["dice"] < 0.5 and every["set_aside"] == {}
    assert every["cases"]["unregistered"]["SpinalCord"]["dice"] > 0.0
