"""The gate's figure is what ``contourcl evaluate`` (run as a user runs it) reports. The gate
in-process: ``tests/unit/test_gate.py``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from contourcl.serving.model_store import ModelStore
from contourcl.serving.retrain import gate_dice, retrain
from contourcl.testing import final_cases, tiny_model_file, write_gate_studies

pytestmark = pytest.mark.timeout(600)


def tiny_oar(path, seed=0):
    return tiny_model_file(path, "oar", seed=seed, dice=None, roi=(64, 64))


@pytest.fixture(scope="module")
def studies(tmp_path_factory):
    """Four labeled phantoms, one of them with NaN voxels written into the CT."""
    return write_gate_studies(tmp_path_factory.mktemp("studies"))


cases = final_cases


def test_gate_figure_is_what_contourcl_evaluate_reports_and_bad_cases_are_excluded(studies, tmp_path):
    store = ModelStore(tmp_path / "model", "oar")
    tiny_oar(store.served)
    entry = retrain("oar", cases(studies), store, {"max_epochs": 1, "train_batch_size": 8, "samples_per_volume": 8, "val_split": 0.3})

    assert entry["excluded"] and "case3" in entry["excluded"] and "NaN" in entry["excluded"]["case3"]
    assert "case3" not in entry["train_ids"] + entry["val_ids"]
    assert entry["gate_cases"] == len(entry["val_ids"]) == 1
    assert "fewer than 3" in entry["gate_note"]
    # the served model's figure in the history is the one `contourcl evaluate` gives on those cases
    served_v0 = store.root / store.entries()[0]["file"]
    out = tmp_path / "eval.json"
    exe = Path(sys.executable).parent / "contourcl"
    run = subprocess.run([str(exe), "evaluate", str(served_v0), "--data", str(studies), "--ids", ",".join(entry["val_ids"]), "--json", str(out)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    evaluated = json.loads(out.read_text())["mean"]["dice"]
    assert abs(entry["served_val_dice"] - evaluated) < 1e-6
    assert abs(store.entries()[0]["val_dice"] - evaluated) < 1e-6
    val = [c for c in cases(studies) if c["id"] in entry["val_ids"]]
    assert abs(gate_dice(store.root / entry["file"], val)[0] - entry["val_dice"]) < 1e-6
