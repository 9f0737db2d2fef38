"""Which method answers clicks on the server (``contourcl.serving.infer.refiner_for``): the
refinement network when the model folder holds a usable ``refine.pt``, else the plain edit."""

from __future__ import annotations

import logging

from contourcl.models.checkpoint import ModelMeta, save_model
from contourcl.models.networks import NetConfig, build_network
from contourcl.refine.network import refine_config, refine_meta
from contourcl.serving.infer import refiner_for


def _refine_file(path):
    network = build_network(refine_config(NetConfig(out_channels=8, encoder="resnet10", width=8)))
    base = ModelMeta(model="oar", labels={}, net={}, spacing=(3.0, 3.0), window=(-400.0, 600.0))
    return save_model(path, network, refine_meta(network, base, {"steps": 12, "git_commit": "abc", "date": "2026-12-06"}), half=True)


def test_no_refinement_network_the_plain_edit_answers(tmp_path):
    assert refiner_for(tmp_path).name == "plain edit"


def test_a_shipped_refinement_network_answers_and_says_where_it_came_from(tmp_path):
    _refine_file(tmp_path / "refine.pt")
    method = refiner_for(tmp_path)
    assert method.name == "refinement network"
    described = method.describe()
    assert described["steps"] == 12 and described["git_commit"] == "abc" and described["file"] == "refine.pt"
    assert refiner_for(tmp_path) is method, "loaded once per file state"


def test_a_broken_refinement_file_falls_back_to_the_plain_edit(tmp_path, caplog):
    (tmp_path / "refine.pt").write_bytes(b"not a model")
    with caplog.at_level(logging.WARNING):
        assert refiner_for(tmp_path).name == "plain edit"
    assert "cannot be used" in caplog.text


def test_the_click_commands_hand_their_options_on(monkeypatch):
    import pytest

    import contourcl.training.refine.benchmark as clicks_benchmark
    import contourcl.training.refine.train as refine_train
    from contourcl.cli import main

    seen = {}
    monkeypatch.setattr(clicks_benchmark, "main", lambda argv: seen.setdefault("benchmark", argv) and 0)
    monkeypatch.setattr(refine_train, "main", lambda argv: seen.setdefault("train", argv) and 0)
    main(["benchmark", "clicks", "--max-cases", "2", "--models", "oar"])
    main(["train-refiner", "--work", "/tmp/w", "--minutes", "1"])
    # the benchmark and the training get each model's click scope from the app's configs, as the server reads them
    assert seen == {"benchmark": ["--max-cases", "2", "--models", "oar", "--edit-radius", "gtv=40", "--reach", "gtv=25"],
                    "train": ["--work", "/tmp/w", "--minutes", "1", "--model-edit-radius", "gtv=40", "--model-reach", "gtv=25"]}
    seen.clear()
    main(["benchmark", "clicks", "--edit-radius", "gtv=30"])
    main(["train-refiner", "--model-reach=gtv=10"])
    assert seen["benchmark"] == ["--edit-radius", "gtv=30", "--reach", "gtv=25"], "one given is kept"
    assert seen["train"] == ["--model-reach=gtv=10", "--model-edit-radius", "gtv=40"]
    with pytest.raises(SystemExit):  # a command that takes no options of another module still refuses unknown ones
        main(["effort", "--studies", "x", "--bogus"])


def test_a_models_clicks_get_its_configured_scope(tmp_path, monkeypatch, blob_files):
    """The task hands the method its model config's click scope (``gtv``: 40 mm in-plane, 25 mm
    above and below in the shipped app), and ``/info/`` names it beside the file's own."""
    from contourcl.clicks import parse_clicks
    from contourcl.data.labels import model_labels
    from contourcl.refine.encoding import ClickScope
    from contourcl.serving import infer
    from contourcl.serving.config import app_configs
    from contourcl.testing import REPO, tiny_model_file

    seen = []

    class Recorder:
        name = "recorder"

        def __call__(self, ct, affine, mask, positive, negative, edit_radius_mm=None, reach_mm=None):
            seen.append((edit_radius_mm, reach_mm))
            return mask

    import nibabel as nib
    import numpy as np

    ct_file, _, affine = blob_files
    start = np.zeros(nib.load(ct_file).shape, np.uint8)
    start[15:25, 15:25, 3:5] = 1  # gtv's numbering
    label_file = str(tmp_path / "start.nii.gz")
    nib.save(nib.Nifti1Image(start, affine), label_file)
    monkeypatch.setattr(infer, "refiner_for", lambda folder: Recorder())
    scope = app_configs(REPO / "apps" / "radonc")["gtv"].click_scope
    assert scope == ClickScope(40.0, 25.0)
    labels = model_labels("gtv")
    tiny_model_file(tmp_path / "gtv.pt", "gtv")
    for configured in (scope, None):
        task = infer.ContourInferTask("gtv", tmp_path / "gtv.pt", "gtv", False, click_scope=configured)
        request = {"image": ct_file, "_label_upload": label_file, "label": "GTV", "GTV": [[20, 20, 4]]}
        task.refine(request, parse_clicks(request, "gtv", labels), labels)
    assert seen == [(40.0, 25.0), (None, None)]
    _refine_file(tmp_path / "refine.pt")
    method = refiner_for(tmp_path)
    assert (method.describe()["edit_radius_mm"], method.describe()["reach_mm"]) == (20.0, 7.5)
    assert (method.describe(**scope.kwargs())["edit_radius_mm"], method.describe(**scope.kwargs())["reach_mm"]) == (40.0, 25.0)
