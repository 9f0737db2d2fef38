"""A broken model file or model history never stops the real server (issue 28, item 7).

One real ``monailabel start_server`` (127.0.0.1, a free port, ``--conf weights synthetic``, background
scoring on, as a user starts it) on a copy of the app where

- the served ``oar`` model, ``model/synthetic/oar.pt``, is truncated (a full disk while it was
  written by hand): before, the start-up scoring's ``/info/`` raised and the server did not start
  ("Application startup failed");
- the ``gtv`` history, ``model/synthetic/history/gtv/history.json``, is truncated: before,
  ``/info/``, next sample, ``PUT /model`` and ``DELETE /model`` answered 500.

The server must start; ``/info/`` answers 200 naming both broken files and what to do, ``oar`` is not
offered as a model and an ``oar`` inference is refused naming the file (not a 500); next sample
answers for every strategy; ``PUT /model/gtv`` and ``DELETE /model/gtv`` answer (not 500) on a
history truncated again while the server runs. About 40-60 s here.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import requests

from contourcl.testing import REPO, start_monailabel, stop_process, wait_until_serving

pytestmark = pytest.mark.timeout(300)


def _history(gtv: Path) -> str:
    """A valid history of one entry: the served synthetic gtv model as version 0."""
    return json.dumps([{"version": 0, "file": "v0000.pt", "time": "2026-01-01T00:00:00", "origin": "served before first retrain",
                        "val_dice": 0.5, "published": True, "served": True}], indent=1)


@pytest.fixture(scope="module")
def broken(tmp_path_factory, app_sandbox):
    root = tmp_path_factory.mktemp("model-faults")
    studies = root / "studies"
    studies.mkdir()
    for name in ("synthetic_hn_003.nii.gz", "synthetic_hn_004.nii.gz"):  # two unlabeled CTs
        shutil.copyfile(REPO / "sample-data" / name, studies / name)
    app, _ = app_sandbox(root, weights=None, studies=False)  # the studies: two CTs of the sample data
    models = app / "model" / "synthetic"
    oar = models / "oar.pt"
    oar.write_bytes(oar.read_bytes()[:100_000])
    history = models / "history" / "gtv"
    history.mkdir(parents=True)
    shutil.copyfile(models / "gtv.pt", history / "v0000.pt")
    (history / "history.json").write_text(_history(models / "gtv.pt")[:60])

    proc, url = start_monailabel(app, studies, {"models": "all", "weights": "synthetic"}, root / "server.log", cwd=root, new_session=True)
    try:
        wait_until_serving(proc, url, root / "server.log", timeout=240)
        yield {"url": url, "models": models, "history": history, "log": root / "server.log"}
    finally:
        stop_process(proc)


def test_server_starts_and_names_the_broken_files(broken):
    url, models, history = broken["url"], broken["models"], broken["history"]
    r = requests.get(f"{url}/info/", timeout=60)
    assert r.status_code == 200, r.text[-2000:]
    info = r.json()
    oar = info["train_stats"]["oar"]
    assert str(models / "oar.pt") in oar["warning"] and "--restore" in oar["warning"] and "PUT /model/oar" in oar["warning"]
    assert "oar" not in info["models"] and "gtv" in info["models"]
    gtv = info["train_stats"]["gtv"]
    assert "history.json" in gtv["warning"] and "corrupt-" in gtv["warning"], gtv
    assert gtv["version"] == 0 and [e["version"] for e in gtv["history"]] == [0]  # rebuilt from v0000.pt
    assert len(list(history.glob("history.json.corrupt-*"))) == 1

    for strategy in ("random", "oar_uncertainty", "gtv_uncertainty"):
        r = requests.post(f"{url}/activelearning/{strategy}", timeout=60)
        assert r.status_code == 200 and r.json().get("id", "").startswith("synthetic_hn_"), (strategy, r.status_code, r.text[-1000:])

    r = requests.post(f"{url}/infer/oar", params={"image": "synthetic_hn_003"}, timeout=120)
    assert r.status_code == 503 and "oar.pt" in r.text and "missing" not in r.text, (r.status_code, r.text[-1000:])
    assert "--restore" in r.text or "PUT /model" in r.text, "it says what to do"


def test_uploads_and_withdrawals_answer_on_a_broken_history(broken):
    url, models, history = broken["url"], broken["models"], broken["history"]
    (history / "history.json").write_text(_history(models / "gtv.pt")[:60])  # broken again while the server runs
    with open(models / "gtv.pt", "rb") as f:
        r = requests.put(f"{url}/model/gtv", files={"file": ("gtv.pt", f)}, timeout=120)
    # no final label, so no validation case: kept in the history, not published (409), never a 500
    assert r.status_code == 409 and "not published" in r.text, (r.status_code, r.text[-1000:])

    served = (models / "gtv.pt").read_bytes()
    (history / "history.json").write_text(_history(models / "gtv.pt")[:60])
    r = requests.delete(f"{url}/model/gtv", timeout=60)
    assert r.status_code == 200, (r.status_code, r.text[-1000:])
    kept = history / f"v{r.json()['kept_as_version']:04d}.pt"  # v0000.pt or the upload's v0001.pt: the same bytes
    assert not (models / "gtv.pt").exists() and kept.read_bytes() == served
    assert requests.get(f"{url}/info/", timeout=60).status_code == 200
