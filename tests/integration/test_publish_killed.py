"""A publish killed (SIGKILL, in a subprocess) at each of its steps loses no model. The store
in-process: ``tests/unit/test_model_store.py``.
"""

import os
import signal
import subprocess
import sys

import pytest

from contourcl.files import FAULTS_ENV
from contourcl.serving.model_store import (
    ModelStore,
)
from contourcl.serving.testing import check_store_consistent, model_archives
from contourcl.testing import tiny_model_file as make_tiny_model_file

pytestmark = pytest.mark.timeout(300)


def tiny_model_file(path, fill: float, dice: float = 0.5):
    return make_tiny_model_file(path, "gtv", bias=fill, dice=dice)


_archives = model_archives


_check_consistent = check_store_consistent


# -- publishing survives a kill at every step -----------------------------------------------------
PUBLISH = """
import sys
from pathlib import Path
from contourcl.serving.model_store import ModelStore
store = ModelStore(sys.argv[1], "gtv")
store.consider(Path(sys.argv[2]), 0.9, 0.5)
"""


@pytest.mark.parametrize("point", ["model-archived", "model-history-written", "model-published"])
def test_a_publish_killed_at_each_step_loses_no_model(tmp_path, point):
    store = ModelStore(tmp_path, "gtv")
    tiny_model_file(store.served, 0.0)  # the shipped model
    store.consider(tiny_model_file(tmp_path / "c1.pt", 1.0), 0.5, 0.4)  # v0 (shipped), v1 served
    before, served_before = _archives(store), store.served.read_bytes()
    candidate = tiny_model_file(tmp_path / "c2.pt", 2.0)

    script = tmp_path / "publish.py"
    script.write_text(PUBLISH)
    env = {**os.environ, FAULTS_ENV: f"{point}=kill"}
    run = subprocess.run([sys.executable, str(script), str(tmp_path), str(candidate)], env=env, capture_output=True, text=True, timeout=120, check=False)
    assert run.returncode == -signal.SIGKILL, f"not killed at {point}: rc {run.returncode}\n{run.stderr[-2000:]}"

    assert store.served.read_bytes() == (candidate.read_bytes() if point == "model-published" else served_before)
    notes = ModelStore(tmp_path, "gtv").reconcile()  # what the server does at start-up
    assert bool(notes) == (point == "model-archived" or point == "model-history-written"), notes
    assert store.served_entry()["version"] == (2 if point == "model-published" else 1)
    _check_consistent(store, before)
    # the next publish takes a new number, above the interrupted one, and overwrites nothing
    kept = _archives(store)
    entry = store.consider(tiny_model_file(tmp_path / "c3.pt", 3.0), 0.95, 0.5)
    assert entry["version"] == 3 and entry["published"]
    _check_consistent(store, kept)
