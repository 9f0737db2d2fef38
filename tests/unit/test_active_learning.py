"""Active learning off the request path: scores computed by a scoring method and stored on disk,
a strategy that only reads them, and a 404 for an unknown strategy."""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from pathlib import Path

import pytest
import torch
from fastapi import HTTPException
from monailabel.datastore.local import LocalDatastore

from contourcl.data.labels import model_labels
from contourcl.data.phantom import write_phantom
from contourcl.inference import Contourer, model_version
from contourcl.models.checkpoint import ModelMeta, save_model
from contourcl.models.networks import NetConfig, build_network
from contourcl.serving import scoring as scoring_module
from contourcl.serving.lifecycle import SERVER_PID_ENV
from contourcl.serving.scoring import UncertaintyScoring, read_scores, request_scoring, scores_path, write_scores
from contourcl.serving.strategy import UncertaintyStrategy

SHAPE = (48, 48, 16)
LABELED = ["case0", "case1"]
UNLABELED = ["case2", "case3", "case4"]


def tiny_oar_model(path: Path, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    net = build_network(NetConfig(out_channels=8, encoder="resnet10", width=8))
    return save_model(path, net, ModelMeta(model="oar", labels=model_labels("oar"), net=net.config.to_dict(), roi=(64, 64)))


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    """Five small phantoms (two labeled) and a tiny oar model, written once and copied per test."""
    root = tmp_path_factory.mktemp("al-template")
    for i, case in enumerate(LABELED + UNLABELED):
        write_phantom(root / "studies", case, i, with_label=case in LABELED, shape=SHAPE)
    tiny_oar_model(root / "model" / "oar.pt")
    return root


@pytest.fixture
def setup(template, tmp_path):
    shutil.copytree(template, tmp_path, dirs_exist_ok=True)
    studies, model = tmp_path / "studies", tmp_path / "model" / "oar.pt"
    contourer = Contourer(model)
    return {"studies": studies, "model": model, "contourer": contourer,
            "scoring": UncertaintyScoring(contourer, "oar", studies, passes=2, max_slices=8),
            "strategy": UncertaintyStrategy(contourer, "oar", studies)}


def datastore(studies: Path) -> LocalDatastore:
    # MONAI Label's plain local datastore: it lists every file, junk included (the app's
    # SafeDatastore may leave unusable images out, the scoring must cope either way)
    return LocalDatastore(str(studies), extensions=("*.nii.gz",), auto_reload=False)


@pytest.fixture(autouse=True)
def _no_server_pid(monkeypatch):
    # the app's tasks publish the "server" pid in the environment: undone after each test
    monkeypatch.setenv(SERVER_PID_ENV, "0")
    monkeypatch.delenv(SERVER_PID_ENV)


def test_scoring_stores_a_current_score_per_unlabeled_image_and_an_error_for_junk(setup):
    studies, model = setup["studies"], setup["model"]
    (studies / "junk_case.nii.gz").write_bytes(b"this is not a CT")
    ds = datastore(studies)
    assert sorted(ds.get_unlabeled_images()) == sorted(UNLABELED + ["junk_case"])

    result = setup["scoring"]({}, ds)
    assert result["scored"] == 3 and result["errors"] == 1, result

    path = studies / ".contourcl" / "scores" / "oar.json"
    assert path == scores_path(studies, "oar")
    data = json.loads(path.read_text())
    assert data["model"] == "oar"
    entries = data["images"]
    assert sorted(entries) == sorted(UNLABELED + ["junk_case"]), "labeled images are not scored"
    version = model_version(model)
    for case in UNLABELED:
        e = entries[case]
        st = os.stat(studies / f"{case}.nii.gz")
        assert e["version"] == version and e["mtime_ns"] == st.st_mtime_ns and e["size"] == st.st_size
        assert isinstance(e["score"], float) and math.isfinite(e["score"]) and e["score"] >= 0 and "error" not in e
    junk = entries["junk_case"]
    assert "score" not in junk and junk["version"] == version and "junk_case" in junk["error"]
    assert not list(path.parent.glob(".*.tmp")), "no temporary file is left behind"

    # a second run computes nothing: every entry is current
    again = setup["scoring"]({}, ds)
    assert again["scored"] == 0 and again["errors"] == 0 and again["unchanged"] == 4
    assert json.loads(path.read_text())["images"] == entries

    # a changed image file is scored again, alone
    st = os.stat(studies / "case3.nii.gz")
    os.utime(studies / "case3.nii.gz", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert setup["scoring"]({}, ds)["scored"] == 1
    assert json.loads(path.read_text())["images"]["case3"]["mtime_ns"] == st.st_mtime_ns + 10**9

    # a new model version makes every entry stale: everything is scored again
    tiny_oar_model(model, seed=1)
    assert sorted(setup["scoring"].pending(ds)) == sorted(UNLABELED + ["junk_case"])
    assert setup["scoring"]({}, ds)["scored"] == 3
    assert all(e["version"] == model_version(model) for e in read_scores(path)["images"].values())


def test_a_nan_score_is_recorded_as_an_error_and_the_others_are_scored(setup, monkeypatch):
    real = scoring_module.mc_dropout_entropy
    monkeypatch.setattr(scoring_module, "mc_dropout_entropy",
                        lambda c, uri, **kw: float("nan") if "case3" in str(uri) else real(c, uri, **kw))
    result = setup["scoring"]({}, datastore(setup["studies"]))
    assert result["scored"] == 2 and result["errors"] == 1
    entries = read_scores(scores_path(setup["studies"], "oar"))["images"]
    assert "not a finite number" in entries["case3"]["error"]
    assert all(math.isfinite(entries[c]["score"]) for c in ("case2", "case4"))
    json.loads(scores_path(setup["studies"], "oar").read_text())  # valid JSON: no NaN written


def test_strategy_picks_the_highest_current_score_and_skips_labeled_and_stale(setup):
    studies, model = setup["studies"], setup["model"]
    ds = datastore(studies)
    version = model_version(model)

    def entry(case, score, v=version):
        st = os.stat(studies / f"{case}.nii.gz")
        return {"version": v, "mtime_ns": st.st_mtime_ns, "size": st.st_size, "score": score}

    write_scores(scores_path(studies, "oar"), {"model": "oar", "images": {
        "case0": entry("case0", 9.0),  # labeled: never proposed
        "case2": entry("case2", 0.3),
        "case3": entry("case3", 0.7),
        "case4": entry("case4", 5.0, v="an-earlier-model"),  # stale: ignored
    }})
    t0 = time.perf_counter()
    result = setup["strategy"]({}, ds)
    elapsed = time.perf_counter() - t0
    assert result["id"] == "case3" and result["score"] == 0.7 and result["model_version"] == version
    assert result["scored"] == 2 and result["unscored"] == 1
    assert elapsed < 0.5, f"next sample took {elapsed:.3f} s"

    # from what the scoring method stored: the strategy agrees with the file
    setup["scoring"]({}, ds)
    entries = read_scores(scores_path(studies, "oar"))["images"]
    best = max(UNLABELED, key=lambda c: entries[c]["score"])
    assert setup["strategy"]({}, ds)["id"] == best


def test_strategy_falls_back_to_a_random_unlabeled_image_when_nothing_is_scored(setup, monkeypatch):
    studies = setup["studies"]
    ds = datastore(studies)
    # never computes anything on the request path
    monkeypatch.setattr(scoring_module, "mc_dropout_entropy", lambda *a, **k: pytest.fail("entropy computed on the request path"))
    result = setup["strategy"]({}, ds)
    assert result["id"] in UNLABELED and result["score"] is None
    assert "no unlabeled CT has an uncertainty score for the served oar model yet" in result["reason"]

    # scores of another model version do not count
    write_scores(scores_path(studies, "oar"), {"images": {c: {"version": "old", "mtime_ns": 0, "size": 0, "score": 1.0} for c in UNLABELED}})
    assert setup["strategy"]({}, ds)["score"] is None
    # a corrupt scores file is read as empty
    scores_path(studies, "oar").write_text("{not json")
    assert setup["strategy"]({}, ds)["score"] is None
    # no model file: still an answer, saying why
    setup["model"].unlink()
    result = setup["strategy"]({}, ds)
    assert result["id"] in UNLABELED and result["score"] is None and "no weights yet" in result["reason"]
    # nothing unlabeled: no sample
    for case in UNLABELED:
        (studies / f"{case}.nii.gz").unlink()
    assert setup["strategy"]({}, datastore(studies)) is None


def test_scoring_is_started_only_for_methods_with_work_and_not_twice(setup, monkeypatch):
    from monailabel.utils.async_tasks import utils as async_utils

    ds = datastore(setup["studies"])

    class FakeApp:
        _scoring_methods = {"oar_uncertainty": setup["scoring"]}
        started: list = []

        def datastore(self):
            return ds

        def async_scoring(self, method, params=None):
            self.started.append(method)

    app = FakeApp()
    monkeypatch.setitem(async_utils.background_tasks, "scoring", [])
    assert request_scoring(app) == ["oar_uncertainty"]  # three unscored images
    monkeypatch.setitem(async_utils.background_tasks, "scoring", [{"status": "RUNNING", "request": {"method": "oar_uncertainty"}}])
    assert request_scoring(app) == []  # already running: not queued again
    monkeypatch.setitem(async_utils.background_tasks, "scoring", [])
    setup["scoring"]({}, ds)
    assert request_scoring(app) == []  # nothing left to score


def test_unknown_strategy_is_a_404_naming_the_known_ones(setup, tmp_path, monkeypatch, app_sandbox):
    from fastapi import FastAPI
    from fastapi.testclient import TestClient
    from monailabel.endpoints import activelearning
    from monailabel.utils.others.class_utils import get_class_of_subclass_from_file

    app_dir, _ = app_sandbox(tmp_path, weights=(), studies=False)
    tiny_oar_model(app_dir / "model" / "oar.pt")
    app_class = get_class_of_subclass_from_file("main", str(app_dir / "main.py"), "MONAILabelApp")  # as MONAI Label loads main.py
    app = app_class(str(app_dir), str(setup["studies"]), {"models": "oar", "skip_trainers": "true"})
    app._auto_update_scoring = False  # no server to start scoring in
    assert set(app._strategies) == {"random", "oar_uncertainty"} and set(app._scoring_methods) == {"oar_uncertainty"}

    with pytest.raises(HTTPException) as err:
        app.next_sample({"strategy": "nosuch"})
    assert err.value.status_code == 404 and "'nosuch'" in err.value.detail and "oar_uncertainty" in err.value.detail

    # over HTTP, through MONAI Label's own endpoint
    server = FastAPI()
    server.include_router(activelearning.router)
    monkeypatch.setattr(activelearning, "app_instance", lambda: app)
    client = TestClient(server)
    r = client.post("/activelearning/nosuch", json={})
    assert r.status_code == 404 and "unknown active-learning strategy 'nosuch'" in r.json()["detail"]
    assert "random" in r.json()["detail"]
    t0 = time.perf_counter()
    r = client.post("/activelearning/oar_uncertainty", json={})
    elapsed = time.perf_counter() - t0
    assert r.status_code == 200 and r.json()["id"] in UNLABELED and r.json()["score"] is None and r.json()["path"].endswith(".nii.gz")
    assert elapsed < 1.0
