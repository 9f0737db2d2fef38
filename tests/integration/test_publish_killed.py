"""A publish killed (SIGKILL, in a subprocess) at each of its steps loses no model. The store
in-process: ``tests/unit/test_model_store.py``.
"""

import os
import signal
import subprocess
import sys

import pytest
import torch

from contourcl.data.labels import model_labels
from contourcl.files import FAULTS_ENV
from contourcl.models.checkpoint import (
    ModelMeta,
    save_model,
)
from contourcl.models.networks import NetConfig, build_network
from contourcl.serving.model_store import (
    ModelStore,
    sha256_of,
)

pytestmark = pytest.mark.timeout(300)


def tiny_model_file(path, fill: float, dice: float = 0.5):
    net = build_network(NetConfig(out_channels=2, encoder="resnet10", width=8))
    with torch.no_grad():
        net.head[0].bias.fill_(fill)
    meta = ModelMeta(model="gtv", labels=model_labels("gtv"), net=net.config.to_dict(), metrics={"val_dice": dice})
    return save_model(path, net, meta)


def _archives(store) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(store.root.glob("v*.pt"))}


def _check_consistent(store, before: dict[str, bytes]) -> None:
    """The served file is recorded by sha256, no archive was overwritten, every archive has an
    entry, and every entry can be restored."""
    served = store.served_entry()
    assert served is not None and served["sha256"] == sha256_of(store.served)
    after = _archives(store)
    assert all(after[name] == data for name, data in before.items()), "an archived file was overwritten"
    entries = store.entries()
    assert sorted(e["file"] for e in entries) == sorted(after), "every archived file has exactly one entry"
    assert len({e["version"] for e in entries}) == len(entries), "a version number was used twice"
    for e in entries:
        assert store.restore(e["version"])["version"] == e["version"]
        assert store.served.read_bytes() == (store.root / e["file"]).read_bytes()
        assert store.served_entry()["version"] == e["version"]


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
