"""The effort record's bad input (issue 30, item 5), without a server: a final label with no
proposal, a proposal from a model version since replaced, a removed image, a corrupt record file."""

from __future__ import annotations

import json

import numpy as np

from contourcl.data.labels import STORED_LABELS
from contourcl.effort import summarise_effort
from contourcl.serving.effort_record import EffortRecord
from contourcl.testing import write_nifti

AFFINE = np.diag([4.0, 4.0, 3.0, 1.0])


def _proposal(tmp_path, name: str, value: int, box) -> str:
    label = np.zeros((24, 24, 6), np.uint8)
    label[box] = value
    return write_nifti(tmp_path / name, label, AFFINE)


def _final(tmp_path, name: str, structures: dict) -> str:
    label = np.zeros((24, 24, 6), np.uint8)
    for structure, box in structures.items():
        label[box] = STORED_LABELS[structure]
    return write_nifti(tmp_path / name, label, AFFINE)


def test_each_final_is_scored_against_the_version_that_proposed(tmp_path):
    record = EffortRecord(tmp_path / "studies")
    box = np.s_[5:15, 5:15, 1:4]
    record.keep_proposal("ct1", "oar", _proposal(tmp_path, "v1.nii.gz", 1, box), {"model_version": "v1"}, {})
    clicks = {"label": "Brainstem", "Brainstem": [[6, 6, 2]], "background": [[1, 1, 1]], "image": "/tmp/x.nii.gz"}
    kept = record.keep_proposal("ct1", "oar", _proposal(tmp_path, "v2.nii.gz", 1, np.s_[6:16, 5:15, 1:4]), {"model_version": "v2"}, clicks)
    assert kept["params"] == {"label": "Brainstem", "Brainstem": [[6, 6, 2]], "background": [[1, 1, 1]]}, "the clicks, in Slicer's form"
    replaced = list((tmp_path / "studies" / ".contourcl" / "effort" / "proposals" / "oar" / "replaced").glob("ct1.*.json"))
    assert [json.loads(p.read_text())["model_version"] for p in replaced] == ["v1"], "the replaced answer is kept"
    # the served file changes to v3 after the answer: the final is scored against v2, which answered
    (scored,) = record.score_final("ct1", _final(tmp_path, "final.nii.gz", {"Brainstem": box}))
    assert scored["model_version"] == "v2"
    brainstem = scored["structures"]["Brainstem"]
    assert brainstem["change"] == "edited" and brainstem["added_path_length_mm"] > 0 and brainstem["changed_slices"] == 3
    # saved twice: both kept, the latest counts
    record.score_final("ct1", _final(tmp_path, "final2.nii.gz", {"Brainstem": np.s_[6:16, 5:15, 1:4]}))
    assert len(record.records()) == 2
    (latest,) = record.latest()
    assert latest["structures"]["Brainstem"]["change"] == "unchanged" and latest["structures"]["Brainstem"]["dice"] == 1.0


def test_a_final_without_a_proposal_is_recorded_without_figures(tmp_path):
    record = EffortRecord(tmp_path / "studies")
    (scored,) = record.score_final("ct9", _final(tmp_path, "final.nii.gz", {"Mandible": np.s_[2:8, 2:8, 0:2]}))
    assert scored["structures"] is None and "no model proposed" in scored["note"]
    assert summarise_effort(record.latest()) == {}


def test_records_of_a_removed_image_still_summarise(tmp_path):
    studies = tmp_path / "studies"
    record = EffortRecord(studies)
    box = np.s_[5:15, 5:15, 1:4]
    record.keep_proposal("gone", "oar", _proposal(tmp_path, "p.nii.gz", 1, box), {"model_version": "v1"}, {})
    record.score_final("gone", _final(tmp_path, "final.nii.gz", {"Brainstem": box}))
    (tmp_path / "p.nii.gz").unlink()  # the image and its files are removed from the datastore
    summary = summarise_effort(EffortRecord(studies).latest())
    assert summary["oar"]["v1"]["images"] == 1


def test_a_corrupt_record_file_is_set_aside_and_saving_goes_on(tmp_path, caplog):
    studies = tmp_path / "studies"
    record = EffortRecord(studies)
    record.records_file.parent.mkdir(parents=True)
    record.records_file.write_bytes(b"\xff\xfe\x00garbage\x80")
    assert record.records() == []
    aside = list(record.records_file.parent.glob("records.jsonl.corrupt-*"))
    assert len(aside) == 1 and aside[0].read_bytes() == b"\xff\xfe\x00garbage\x80"
    assert "set aside" in caplog.text
    record.score_final("ct1", _final(tmp_path, "final.nii.gz", {"Mandible": np.s_[2:8, 2:8, 0:2]}))
    assert len(record.records()) == 1
