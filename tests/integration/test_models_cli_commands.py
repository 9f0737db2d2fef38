"""``contourcl models``, ``contour`` and ``finetune`` started as a user starts them (about 8 s each on
2 cores). The rest: ``tests/unit/test_models_cli.py``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from contourcl.serving.model_store import ModelStore
from contourcl.testing import REPO, head_bias

CONTOURCL = str(Path(sys.executable).parent / "contourcl")
from contourcl.serving.testing import app_with_history
from contourcl.testing import run_contourcl

pytestmark = pytest.mark.timeout(180)


@pytest.fixture
def app(tmp_path):
    """A copy of the app folder whose oar model has a history: v0, v1 (published)."""
    return app_with_history(tmp_path / "some" / "where", tmp_path)


contourcl = run_contourcl


def test_list_and_restore_from_another_directory(app, tmp_path):
    run = contourcl("models", "oar", "--app", app, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    header, *lines = run.stdout.rstrip("\n").splitlines()
    assert header.startswith("oar: served oar.pt; encoder: "), header  # where the served encoder came from (issue 32)
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
