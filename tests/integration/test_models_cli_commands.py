"""``contourcl models``, ``contour`` and ``finetune`` started as a user starts them (about 8 s each on
2 cores). The rest: ``tests/unit/test_models_cli.py``.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from contourcl.data.labels import model_labels
from contourcl.models.checkpoint import ModelMeta, load_model, save_model
from contourcl.models.networks import NetConfig, build_network
from contourcl.serving.model_store import ModelStore
from contourcl.testing import REPO

CONTOURCL = str(Path(sys.executable).parent / "contourcl")
pytestmark = pytest.mark.timeout(180)


def tiny_model(path: Path, bias: float) -> Path:
    net = build_network(NetConfig(out_channels=8, encoder="resnet10", width=8))
    with torch.no_grad():
        net.head[0].bias.fill_(bias)
    return save_model(path, net, ModelMeta(model="oar", labels=model_labels("oar"), net=net.config.to_dict(), metrics={"val_dice": 0.5}))


def head_bias(path: Path) -> float:
    return float(load_model(path)[0].head[0].bias[0])


@pytest.fixture
def app(tmp_path, app_sandbox):
    """A copy of the app folder whose oar model has a history: v0 (the shipped one), v1 (published)."""
    app, _ = app_sandbox(tmp_path / "some" / "where", weights=(), studies=False)
    store = ModelStore(app / "model", "oar")
    tiny_model(store.served, 0.0)
    store.consider(tiny_model(tmp_path / "cand.pt", 1.0), 0.6, 0.5)
    assert head_bias(store.served) == 1.0
    return app


def contourcl(*args, cwd):
    return subprocess.run([CONTOURCL, *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=120)


def test_list_and_restore_from_another_directory(app, tmp_path):
    run = contourcl("models", "oar", "--app", app, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    lines = run.stdout.rstrip("\n").splitlines()
    assert len(lines) == 2 and lines[0].startswith("  v0000") and lines[1].startswith("* v0001") and "published" in lines[1]

    run = contourcl("models", "oar", "--app", app, "--restore", "0", cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert "now serving version 0" in run.stdout
    assert head_bias(app / "model" / "oar.pt") == 0.0
    assert ModelStore(app / "model", "oar").served_entry()["version"] == 0


def test_contour_works_from_an_empty_folder_with_no_model_given(tmp_path):
    """Issue 29: the CLI finds the app shipped with the package; nothing is relative to the cwd."""
    work = tmp_path / "empty"
    work.mkdir()
    run = contourcl("contour", REPO / "sample-data" / "synthetic_hn_003.nii.gz", "--out", "pred.nii.gz", cwd=work)
    assert run.returncode == 0, run.stderr[-2000:]
    assert (work / "pred.nii.gz").stat().st_size > 0
    assert '"Mandible"' in run.stdout  # the oar model answered


def test_unknown_models_are_named_from_the_apps_registry(app, tmp_path):
    run = contourcl("models", "liver", "--app", app, cwd=tmp_path)
    assert run.returncode == 2 and "unknown model 'liver'; the app serves ['oar', 'gtv']" in run.stderr, run.stderr
    run = contourcl("finetune", "--model", "liver", "--data", tmp_path, "--out", tmp_path / "x.pt", cwd=tmp_path)
    assert run.returncode == 2 and "the app serves ['oar', 'gtv']" in run.stderr, run.stderr
