"""The shipped weights on real patients: OpenKBP validation CTs (``CONTOURCL_OPENKBP``, else
``../shared/data/openkbp`` beside the repository, as CI has them).

Skipped where the data are absent.
"""


import nibabel as nib
import numpy as np
import pytest

from contourcl.data.datasets import labeled_cases
from contourcl.evaluation import case_mean, evaluate_model_file
from contourcl.inference import Contourer
from contourcl.serving.config import app_configs
from contourcl.testing import REPO, openkbp_for_tests

OPENKBP = openkbp_for_tests()
APP = REPO / "apps" / "radonc"
MODELS = APP / "model"
pytestmark = pytest.mark.skipif(OPENKBP is None or not (OPENKBP / "validation-pats").is_dir(),
                                reason="needs the OpenKBP data (CONTOURCL_OPENKBP, or ../shared/data/openkbp beside the repository)")


def _case(model: str, case_id: str = "pt_201") -> dict:
    return next(c for c in labeled_cases(OPENKBP / "validation-pats", model) if c["id"] == case_id)


def test_shipped_oar_model_on_a_real_validation_patient():
    case = _case("oar")
    prediction = Contourer(MODELS / "oar.pt")(case["image"])
    ct = nib.load(case["image"])
    assert prediction.label.shape == ct.shape and np.allclose(prediction.affine, ct.affine, atol=1e-4)
    scores = evaluate_model_file(MODELS / "oar.pt", [case])[case["id"]]
    assert scores["Mandible"]["dice"] > 0.5  # the shipped weights: see README, Shipped weights
    assert case_mean(scores, "dice") > 0.4


def test_shipped_gtv_model_on_a_real_validation_patient():
    case = _case("gtv")
    scores = evaluate_model_file(MODELS / "gtv.pt", [case], largest_component=app_configs(APP)["gtv"].largest_component)[case["id"]]
    assert scores["GTV"]["dice"] > 0.3
