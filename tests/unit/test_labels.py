import numpy as np
import pytest

from contourcl.data.labels import (
    OAR_NAMES,
    STORED_LABELS,
    from_model,
    model_labels,
    remap_by_name,
    stored_label_info,
    to_model,
)
from contourcl.errors import UnknownLabelError, UnknownModelError


def test_oar_names_are_tg263_in_model_order():
    assert list(model_labels("oar")) == ["Brainstem", "SpinalCord", "Parotid_R", "Parotid_L", "Mandible", "Larynx", "Esophagus"]
    assert list(model_labels("oar").values()) == list(range(1, 8))
    assert model_labels("gtv") == {"GTV": 1}
    assert len(set(STORED_LABELS.values())) == len(OAR_NAMES) + 1


def test_unknown_model_is_named():
    with pytest.raises(UnknownModelError, match="'liver'"):
        model_labels("liver")


def test_remap_by_name_follows_slicer_segment_order():
    # Slicer numbered Parotid_L 1, Brainstem 2, GTV 3 (its own order)
    label = np.array([[0, 1], [2, 3]])
    info = [{"name": "Parotid_L", "idx": 1}, {"name": "brainstem", "idx": 2}, {"name": "PTV70", "idx": 3}]
    out = remap_by_name(label, info)
    assert out.tolist() == [[0, STORED_LABELS["Parotid_L"]], [STORED_LABELS["Brainstem"], STORED_LABELS["GTV"]]]


def test_remap_rejects_unknown_names_and_unnamed_values():
    with pytest.raises(UnknownLabelError, match="Liver"):
        remap_by_name(np.array([0, 1]), [{"name": "Liver", "idx": 1}])
    with pytest.raises(UnknownLabelError, match=r"\[2\]"):
        remap_by_name(np.array([0, 1, 2]), [{"name": "Mandible", "idx": 1}])
    with pytest.raises(UnknownLabelError, match=r"\[9\]"):
        remap_by_name(np.array([0, 9]), None)


def test_to_model_and_back():
    stored = np.array([0, 1, 2, 3, 4, 5, 6, 7, 8])
    assert to_model(stored, "oar").tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 0]
    assert to_model(stored, "gtv").tolist() == [0, 0, 0, 0, 0, 0, 0, 0, 1]
    assert from_model(np.array([0, 1]), "gtv").tolist() == [0, STORED_LABELS["GTV"]]
    assert from_model(to_model(stored, "oar"), "oar").tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 0]


def test_label_info_that_cannot_be_meant_is_refused_naming_the_problem():
    label = np.array([[0, 1], [2, 1]], dtype=np.uint8)
    with pytest.raises(UnknownLabelError, match="value 1 twice"):
        remap_by_name(label, [{"name": "Brainstem", "idx": 1}, {"name": "SpinalCord", "idx": 1}, {"name": "Mandible", "idx": 2}])
    for idx in ("1", 1.5, None, True, -1, 300):
        with pytest.raises(UnknownLabelError, match="idx"):
            remap_by_name(label, [{"name": "Brainstem", "idx": idx}, {"name": "Mandible", "idx": 2}])
    with pytest.raises(UnknownLabelError, match="label_info"):
        remap_by_name(label, "Brainstem")
    with pytest.raises(UnknownLabelError, match=r"\[2\] are not outputs of the 'gtv' model"):
        from_model(np.array([0, 1, 2]), "gtv")
    stored = remap_by_name(label, [{"name": "Mandible", "idx": 1}, {"name": "ptv70", "idx": 2.0}])
    assert stored_label_info(stored) == [{"name": "Mandible", "idx": 5}, {"name": "GTV", "idx": 8}]
