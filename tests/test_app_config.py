"""The app's ``--conf weights``: which model folder is served."""

from pathlib import Path

import pytest

from contourcl.errors import UnsafeIdError
from contourcl.serving.app import model_dir

APP = Path(__file__).resolve().parents[1] / "apps" / "radonc"


def test_default_weights_are_the_model_folder():
    assert model_dir(APP, {}) == APP / "model"
    assert model_dir(APP, {"weights": "openkbp"}) == APP / "model"
    assert (APP / "model" / "oar.pt").is_file() and (APP / "model" / "gtv.pt").is_file()


def test_synthetic_weights_for_the_sample_data_demo_ship_with_the_app():
    folder = model_dir(APP, {"weights": "synthetic"})
    assert folder == APP / "model" / "synthetic"
    assert (folder / "oar.pt").is_file() and (folder / "gtv.pt").is_file()


def test_unknown_or_unsafe_weights_are_refused_by_name():
    with pytest.raises(ValueError, match="'nope'.*synthetic"):
        model_dir(APP, {"weights": "nope"})
    with pytest.raises(UnsafeIdError, match="weights"):
        model_dir(APP, {"weights": "../../etc"})
