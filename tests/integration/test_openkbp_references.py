"""The OpenKBP references :mod:`contourcl.data.reference_check` sets aside, read from the real
files (``CONTOURCL_OPENKBP``, else ``../shared/data/openkbp`` beside the repository; skipped
without them). The checks themselves: ``tests/unit/test_reference_check.py``.
"""

import pytest

from contourcl.data.datasets import labeled_cases, read_scored_reference
from contourcl.testing import openkbp_for_tests

KBP = openkbp_for_tests()
pytestmark = pytest.mark.skipif(KBP is None, reason="needs the OpenKBP data (CONTOURCL_OPENKBP, or ../shared/data/openkbp beside the repository)")


def test_openkbp_references_set_aside():
    """The OpenKBP references the checks set aside, read from the real files (the README lists them)."""
    cases = {c["id"]: c for c in labeled_cases(KBP / "validation-pats", "oar")}
    assert set(read_scored_reference(cases["pt_221"], "oar").set_aside) == {"Brainstem", "SpinalCord", "Parotid_R", "Parotid_L"}
    assert set(read_scored_reference(cases["pt_216"], "oar").set_aside) == {"SpinalCord", "Esophagus"}
    assert set(read_scored_reference(cases["pt_215"], "oar").set_aside) == {"SpinalCord"}
    assert read_scored_reference(cases["pt_201"], "oar").set_aside == {}
    train = {c["id"]: c for c in labeled_cases(KBP / "train-pats", "oar")}
    assert set(read_scored_reference(train["pt_67"], "oar").set_aside) == {"Esophagus"}
