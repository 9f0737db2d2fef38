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
    assert seen == {"benchmark": ["--max-cases", "2", "--models", "oar"], "train": ["--work", "/tmp/w", "--minutes", "1"]}
    with pytest.raises(SystemExit):  # a command that takes no options of another module still refuses unknown ones
        main(["effort", "--studies", "x", "--bogus"])
