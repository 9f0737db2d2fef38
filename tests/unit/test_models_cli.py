"""``contourcl models`` from any working directory: list, restore, and one-line errors (exit 2)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from contourcl.cli.models import resolve_model_dir
from contourcl.serving.config import default_app
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


def test_unknown_version_is_one_line_listing_the_versions_with_exit_2(app, tmp_path):
    run = contourcl("models", "oar", "--model-dir", app / "model", "--restore", "7", cwd=tmp_path)
    assert run.returncode == 2
    errors = [line for line in run.stderr.splitlines() if "error" in line.lower()]
    assert errors == ["contourcl models: error: oar has no archived version 7 in "
                      f"{app / 'model' / 'history' / 'oar'}; versions: [0, 1]"]
    assert "Traceback" not in run.stderr
    assert head_bias(app / "model" / "oar.pt") == 1.0, "nothing was changed"


def test_where_the_model_folder_comes_from(app, tmp_path):
    # in process (no subprocess): the resolution rules
    assert resolve_model_dir(app, None) == app / "model"
    assert resolve_model_dir(None, app / "model") == app / "model"
    (app / "model" / "synthetic").mkdir(exist_ok=True)
    assert resolve_model_dir(app, None, "synthetic") == app / "model" / "synthetic"
    assert default_app() == REPO / "apps" / "radonc"  # the repository this package is installed from
    assert resolve_model_dir(None, None) == REPO / "apps" / "radonc" / "model"
    with pytest.raises(FileNotFoundError, match="no main.py"):
        resolve_model_dir(tmp_path, None)
    with pytest.raises(ValueError, match="not allowed"):
        resolve_model_dir(app, None, "../x")
    with pytest.raises(FileNotFoundError, match="no such model folder"):
        resolve_model_dir(app, None, "nope")


def test_no_app_found_asks_for_app(monkeypatch):
    from contourcl.serving import config

    monkeypatch.setattr(config, "default_app", lambda: None)
    with pytest.raises(FileNotFoundError, match="pass --app PATH"):
        resolve_model_dir(None, None)


def test_reading_an_apps_configs_leaves_sys_path_and_modules_alone(app):
    import sys

    from contourcl.serving.config import ModelConfig, app_configs

    path, modules = list(sys.path), set(sys.modules)
    configs = app_configs(app)
    assert list(configs) == ["oar", "gtv"] and all(isinstance(c, ModelConfig) for c in configs.values())
    assert sys.path == path
    assert not [m for m in set(sys.modules) - modules if m == "lib" or m.startswith(("lib.", "contourcl_app_config"))]
