"""The app's configuration: ``--conf weights`` (which model folder is served) and the models of
``lib/configs/`` (one file per model, found as MONAI Label loads the app)."""

import sys
from pathlib import Path

import pytest

from contourcl.errors import UnknownModelError, UnsafeIdError
from contourcl.serving.app import _models, model_dir
from contourcl.serving.config import app_configs
from contourcl.testing import REPO

APP = REPO / "apps" / "radonc"


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


# ------------------------------------------------------------------------------- lib/configs
def load_app_class(app_dir):
    """The app class of ``app_dir/main.py``, found and loaded the way MONAI Label does."""
    from monailabel.utils.others.class_utils import get_class_of_subclass_from_file

    return get_class_of_subclass_from_file("main", str(Path(app_dir) / "main.py"), "MONAILabelApp")


def test_the_app_serves_the_models_of_its_config_files():
    from contourcl.serving.app import ContourApp

    app_class = load_app_class(APP)
    assert issubclass(app_class, ContourApp) and app_class is not ContourApp
    configs = app_class.configs
    assert list(configs) == ["oar", "gtv"]
    assert (configs["oar"].largest_component, configs["gtv"].largest_component) == (True, False)
    assert (configs["oar"].edit_radius_mm, configs["gtv"].edit_radius_mm) == (None, 40.0)  # a target's clicks edit wider
    assert (configs["oar"].click_reach_mm, configs["gtv"].click_reach_mm) == (None, 25.0)  # and reach further
    assert "Organs at risk" in configs["oar"].description and "Tumour target" in configs["gtv"].description
    assert app_configs(APP) == configs  # what commands run outside the server read


def test_a_config_file_is_a_model(tmp_path, monkeypatch, app_sandbox):
    monkeypatch.setattr(sys, "path", list(sys.path))  # MONAI Label leaves the app folder there when loading fails
    app_dir, _ = app_sandbox(tmp_path, weights=(), studies=False)
    (app_dir / "lib" / "configs" / "gtv.py").unlink()
    configs = load_app_class(app_dir).configs
    assert list(configs) == ["oar"]
    with pytest.raises(ValueError, match=r"unknown model\(s\) \['gtv'\]; known: \['oar'\]"):
        _models({"models": "gtv"}, configs)
    (app_dir / "lib" / "configs" / "gtv.py").write_text((APP / "lib" / "configs" / "gtv.py").read_text())
    assert list(load_app_class(app_dir).configs) == ["oar", "gtv"]
    (app_dir / "lib" / "configs" / "liver.py").write_text(
        "from contourcl.serving.config import ModelConfig\nconfig = ModelConfig(name='liver', description='x', largest_component=True)\n")
    with pytest.raises(UnknownModelError, match="liver"):
        load_app_class(app_dir)


def test_the_model_file_rule_wins_over_the_config_default(tmp_path):
    from contourcl.data.labels import model_labels
    from contourcl.inference import Contourer
    from contourcl.models.checkpoint import ModelMeta, read_meta, save_model
    from contourcl.models.networks import NetConfig, build_network

    net = build_network(NetConfig(out_channels=2, encoder="resnet10", width=8))
    for rule in (None, True, False):
        path = save_model(tmp_path / f"gtv-{rule}.pt", net, ModelMeta(model="gtv", labels=model_labels("gtv"), net=net.config.to_dict(), largest_component=rule))
        meta = read_meta(path)
        assert meta.largest_component is rule
        for default in (True, False):
            contourer = Contourer(path, largest_component=default)
            assert contourer.keeps_largest_component(meta) is (default if rule is None else rule)
            assert contourer.keeps_largest_component(meta, override=not default) is (not default)


def test_a_new_model_is_one_config_file(tmp_path, monkeypatch, app_sandbox):
    """A model of new structures is added where a MONAI Label user expects it: one config file
    naming its structures; its model files are then checked against them like oar's."""
    from contourcl.data import labels
    from contourcl.errors import InvalidModelError
    from contourcl.models.checkpoint import ModelMeta, check_model_file, save_model
    from contourcl.models.networks import NetConfig, build_network

    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.setattr(labels, "MODEL_LABELS", dict(labels.MODEL_LABELS))  # the registry is restored afterwards
    app_dir, _ = app_sandbox(tmp_path, weights=(), studies=False)
    (app_dir / "lib" / "configs" / "parotids.py").write_text(
        "from contourcl.serving.config import ModelConfig\n"
        "config = ModelConfig(name='parotids', description='both parotid glands', largest_component=True,\n"
        "                     structures=('Parotid_L', 'parotid_r'))\n")
    configs = load_app_class(app_dir).configs
    assert list(configs) == ["oar", "gtv", "parotids"]
    assert labels.model_labels("parotids") == {"Parotid_L": 1, "Parotid_R": 2}
    net = build_network(NetConfig(out_channels=3, encoder="resnet10", width=8))
    path = save_model(tmp_path / "parotids.pt", net, ModelMeta(model="parotids", labels={"Parotid_L": 1, "Parotid_R": 2}, net=net.config.to_dict()))
    assert check_model_file(path, "parotids").model == "parotids"
    with pytest.raises(InvalidModelError, match="contours"):
        save_model(path, net, ModelMeta(model="parotids", labels={"Parotid_R": 1, "Parotid_L": 2}, net=net.config.to_dict()))
        check_model_file(path, "parotids")
    # an unknown structure name, or oar redefined, is refused by name
    with pytest.raises(Exception, match="Thyroid"):
        labels.register_model("thyroid", ["Thyroid"])
    with pytest.raises(UnknownModelError, match="already contours"):
        labels.register_model("oar", ["Mandible"])
