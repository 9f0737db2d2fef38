import json
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from contourcl.data.labels import model_labels
from contourcl.errors import ContourCLError, InvalidModelError
from contourcl.files import sha256_file
from contourcl.models.checkpoint import (
    ModelMeta,
    check_model_file,
    load_model,
    read_meta,
    save_model,
)
from contourcl.models.networks import NetConfig, build_network
from contourcl.serving.lifecycle import TrainerBusyError
from contourcl.serving.model_store import (
    FOUND_SERVED,
    ModelBusyError,
    ModelStore,
    ModelStoreError,
    min_gate_cases_of,
)
from contourcl.serving.testing import check_store_consistent, model_archives
from contourcl.testing import REPO, head_bias
from contourcl.testing import tiny_model_file as make_tiny_model_file

pytestmark = pytest.mark.timeout(300)


def tiny_model_file(path, fill: float, dice: float = 0.5):
    return make_tiny_model_file(path, "gtv", bias=fill, dice=dice)




def test_model_file_round_trip_and_half_precision(tmp_path):
    tiny_model_file(tmp_path / "m.pt", 0.25)
    net, meta = load_model(tmp_path / "m.pt")
    assert meta.model == "gtv" and meta.labels == {"GTV": 1} and meta.metrics["val_dice"] == 0.5
    assert head_bias(tmp_path / "m.pt") == 0.25
    save_model(tmp_path / "h.pt", net, meta, half=True)
    assert (tmp_path / "h.pt").stat().st_size < 0.6 * (tmp_path / "m.pt").stat().st_size
    assert load_model(tmp_path / "h.pt")[0].head[0].bias.dtype == torch.float32
    with pytest.raises(ValueError, match="not a ContourCL model file"):
        torch.save({"model": {}}, tmp_path / "x.pt")
        read_meta(tmp_path / "x.pt")


def test_validation_cases_stay_fixed_across_retrains(tmp_path):
    store = ModelStore(tmp_path, "oar")
    first = store.validation_ids([f"c{i}" for i in range(10)], fraction=0.2)
    assert len(first) == 2
    grown = store.validation_ids([f"c{i}" for i in range(25)], fraction=0.2)
    # validation keeps its cases and grows back to the fraction from the new cases only: the
    # first 10 could have been trained on and never become validation cases
    assert set(first) < set(grown) and len(grown) == 5
    assert not (set(grown) - set(first)) & {f"c{i}" for i in range(10)}
    again = store.validation_ids([f"c{i}" for i in range(26)], fraction=0.2)
    assert again == grown  # 5 of 26 is the fraction: c25 goes to training
    gone = store.validation_ids([c for c in (f"c{i}" for i in range(26)) if c != first[0]], fraction=0.2)
    assert gone == [i for i in grown if i != first[0]]  # c0..c9 and c25 were seen: none replaces it
    assert ModelStore(tmp_path / "other", "oar").validation_ids(["only"]) == []


def test_a_served_model_is_replaced_only_on_enough_validation_cases(tmp_path):
    """A candidate gated on fewer than min_gate_cases (3 by default) does not replace the served
    model, however good its figure (one validation case decided OpenKBP's replay badly); a first
    model, with nothing served, is published with the gate's note."""
    first = ModelStore(tmp_path / "empty", "gtv")
    entry = first.consider(tiny_model_file(tmp_path / "first.pt", 0.5), 0.6, None, gate_cases=1)
    assert entry["published"] and head_bias(first.served) == 0.5
    store = ModelStore(tmp_path / "served", "gtv")
    tiny_model_file(store.served, 0.0, dice=0.5)
    few = store.consider(tiny_model_file(tmp_path / "few.pt", 1.0), 0.9, 0.5, gate_cases=2)
    assert not few["published"] and "fewer than 3" in few["reason"] and head_bias(store.served) == 0.0
    enough = store.consider(tiny_model_file(tmp_path / "enough.pt", 2.0), 0.6, 0.5, gate_cases=3)
    assert enough["published"] and head_bias(store.served) == 2.0
    lowered = ModelStore(tmp_path / "served", "gtv", min_gate_cases=1)
    one = lowered.consider(tiny_model_file(tmp_path / "one.pt", 3.0), 0.7, 0.6, gate_cases=1)
    assert one["published"] and head_bias(store.served) == 3.0
    assert min_gate_cases_of({}) == 3 and min_gate_cases_of({"min_gate_cases": "5"}) == 5
    for bad in ("0", "three", "-1"):
        with pytest.raises(ValueError, match="min_gate_cases"):
            min_gate_cases_of({"min_gate_cases": bad})


def test_worse_model_is_never_served_and_earlier_ones_can_be_restored(tmp_path):
    store = ModelStore(tmp_path, "gtv")
    tiny_model_file(store.served, 0.0, dice=0.5)  # the shipped model
    better = store.consider(tiny_model_file(tmp_path / "cand1.pt", 1.0), 0.6, 0.5)
    assert better["published"] and head_bias(store.served) == 1.0
    worse = store.consider(tiny_model_file(tmp_path / "cand2.pt", 2.0), 0.4, 0.6)
    assert not worse["published"] and "kept the served model" in worse["reason"]
    assert head_bias(store.served) == 1.0
    unvalidated = store.consider(tiny_model_file(tmp_path / "cand3.pt", 3.0), float("nan"), 0.6)
    assert not unvalidated["published"] and head_bias(store.served) == 1.0
    entries = store.entries()
    assert [e["version"] for e in entries] == [0, 1, 2, 3]
    assert [e["published"] for e in entries] == [True, True, False, False]
    assert store.served_entry()["version"] == 1
    store.restore(0)  # back to the shipped model
    assert head_bias(store.served) == 0.0 and store.served_entry()["version"] == 0
    assert json.loads((store.root / "history.json").read_text())[0]["origin"] == "served before first retrain"
    with pytest.raises(ValueError, match="no archived version 9"):
        store.restore(9)
    assert not list(tmp_path.glob(".*.tmp")), "no temporary file is left behind"


def test_info_summary_is_valid_json_for_a_model_without_validation_figures(tmp_path):
    from contourcl.serving.retrain import served_summary

    store = ModelStore(tmp_path, "gtv")
    tiny_model_file(store.served, 0.0, dice=float("nan"))  # trained without validation cases
    summary = served_summary(store)
    assert summary["val_dice"] is None
    json.dumps(summary, allow_nan=False)  # what MONAI Label's /info/ does with it


# -- the shipped weights -------------------------------------------------------------------------
SHIPPED = sorted(p for p in (REPO / "apps" / "radonc" / "model").rglob("*.pt") if "history" not in p.parts)  # not a local history
#: the click refinement network: not a contouring model, loaded by the refiner (contourcl.serving.infer.refiner_for)
REFINE = "refine.pt"


def test_every_shipped_model_file_passes_the_servers_model_check():
    contouring = [p for p in SHIPPED if p.name != REFINE]
    assert len(contouring) >= 4, contouring  # model/{oar,gtv}.pt and model/synthetic/{oar,gtv}.pt
    failed = {}
    for path in contouring:
        try:
            check_model_file(path, path.stem)
        except InvalidModelError as err:
            failed[str(path.relative_to(REPO))] = str(err)
    assert not failed, failed
    for path in (p for p in SHIPPED if p.name == REFINE):  # the server's refiner loads it, with its provenance
        from contourcl.serving.infer import refiner_for

        method = refiner_for(path.parent)
        assert method.name == "refinement network", f"{path}: the server would answer clicks with {method.name}"
        described = method.describe()
        assert described["steps"] > 0 and described["init"]["sha256"] and described["git_commit"], described


def test_half_precision_keeps_a_buffer_float16_cannot_hold_in_float32(tmp_path):
    net = build_network(NetConfig(out_channels=2, encoder="resnet10", width=8))
    bn = next(m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d))
    with torch.no_grad():
        bn.running_var[0] = 1e5  # above float16's 65504: would be stored as inf
    meta = ModelMeta(model="gtv", labels=model_labels("gtv"), net=net.config.to_dict())
    save_model(tmp_path / "h.pt", net, meta, half=True)
    check_model_file(tmp_path / "h.pt", "gtv")  # no inf: the file is servable
    state = torch.load(tmp_path / "h.pt", weights_only=True)["state_dict"]
    kept = [k for k, v in state.items() if v.dtype == torch.float32]
    assert len(kept) == 1 and kept[0].endswith("running_var"), kept
    assert sum(v.dtype == torch.float16 for v in state.values()) > 10  # the rest is still half


_archives = model_archives


_check_consistent = check_store_consistent


def test_a_served_model_missing_from_the_history_is_never_overwritten(tmp_path):
    """The issue's case: killed (by the old code) after publishing and before writing the
    history: the served file is v0003.pt, which the history does not name."""
    store = ModelStore(tmp_path, "gtv")
    tiny_model_file(store.served, 0.0)
    for i in (1, 2):
        store.consider(tiny_model_file(tmp_path / f"c{i}.pt", float(i)), 0.5 + i / 10, 0.4)
    b = tiny_model_file(tmp_path / "b.pt", 7.0)
    shutil.copyfile(b, store.root / "v0003.pt")
    shutil.copyfile(b, store.served)
    before = _archives(store)

    entry = store.consider(tiny_model_file(tmp_path / "upload.pt", 8.0), 0.1, 0.9)  # a worse upload
    assert entry["version"] == 4 and not entry["published"]
    assert (store.root / "v0003.pt").read_bytes() == b.read_bytes()
    assert store.served.read_bytes() == b.read_bytes() and store.served_entry()["version"] == 3
    _check_consistent(store, before)


def test_a_served_file_the_history_does_not_know_is_archived_at_start_up(tmp_path):
    store = ModelStore(tmp_path, "gtv")
    tiny_model_file(store.served, 0.0)
    store.consider(tiny_model_file(tmp_path / "c1.pt", 1.0), 0.5, 0.4)
    tiny_model_file(store.served, 5.0)  # copied in by hand
    notes = store.reconcile()
    entry = store.served_entry()
    assert entry["version"] == 2 and entry["origin"] == FOUND_SERVED and head_bias(store.root / entry["file"]) == 5.0
    assert any("not in the history" in n for n in notes) and sum(e["served"] for e in store.entries()) == 1
    assert store.reconcile() == []  # nothing left to fix


# -- the gate compares with what is served when it publishes ----------------------------------------
def test_candidate_is_gated_again_when_the_served_model_changed_meanwhile(tmp_path):
    """The issue's case: v0 served (0.414) when the retrain gated; v1 (0.563) restored meanwhile;
    the candidate (0.486) must not be published over v1."""
    store = ModelStore(tmp_path, "gtv")
    tiny_model_file(store.served, 0.0)
    store.consider(tiny_model_file(tmp_path / "v1.pt", 1.0), 0.563, 0.414)
    store.restore(0)
    gated_sha = sha256_file(store.served)  # the retrain gates against v0 ...
    store.restore(1)  # ... while v1 is restored
    figures = {sha256_file(store.root / "v0000.pt"): 0.414, sha256_file(store.root / "v0001.pt"): 0.563}
    asked = []

    def regate(path):
        asked.append(sha256_file(path))
        return figures[asked[-1]]

    candidate = tiny_model_file(tmp_path / "cand.pt", 2.0)
    entry = store.consider(candidate, 0.486, 0.414, served_sha=gated_sha, regate=regate)
    assert asked == [sha256_file(store.root / "v0001.pt")], "regated against the file served now"
    assert not entry["published"] and entry["served_val_dice"] == 0.563 and "gated again" in entry["reason"]
    assert store.served_entry()["version"] == 1 and head_bias(store.served) == 1.0

    better = store.consider(tiny_model_file(tmp_path / "cand2.pt", 3.0), 0.6, 0.414, served_sha=gated_sha, regate=regate)
    assert better["published"] and head_bias(store.served) == 3.0
    unchecked = store.consider(tiny_model_file(tmp_path / "cand3.pt", 4.0), 0.99, 0.414, served_sha=gated_sha)
    assert not unchecked["published"] and head_bias(store.served) == 3.0  # changed, and no way to gate it again


def test_retrain_gates_against_the_model_served_when_it_publishes(tmp_path, monkeypatch):
    """retrain() end to end, with the training and the gate's figures faked: a restore while it
    trains makes it gate the candidate against the restored model."""
    from contourcl.serving import retrain as rt

    store = ModelStore(tmp_path, "gtv")
    tiny_model_file(store.served, 0.0)
    store.consider(tiny_model_file(tmp_path / "v1.pt", 1.0), 0.563, 0.414)
    store.restore(0)
    candidate = tiny_model_file(tmp_path / "cand.pt", 2.0)
    figures = {sha256_file(store.root / "v0000.pt"): 0.414, sha256_file(store.root / "v0001.pt"): 0.563, sha256_file(candidate): 0.486}

    def fake_finetune(train, val, cfg, start_from=None, progress=False):
        store.restore(1)  # a clinician restores v1 while the retrain trains
        return types.SimpleNamespace(best_epoch=1, skipped=[], seconds=0.0)

    monkeypatch.setattr(rt, "usable_cases", lambda cases: (cases, {}))
    monkeypatch.setattr(rt, "contoured_cases", lambda model, cases: cases)
    monkeypatch.setattr(rt, "finetune", fake_finetune)
    monkeypatch.setattr(rt, "save_finetuned", lambda path, *a, **k: shutil.copyfile(candidate, path) and Path(path))
    monkeypatch.setattr(rt, "gate_dice", lambda path, val, lc=True: (figures[sha256_file(path)], {}))
    cases = [{"id": f"c{i}", "image": "-", "label": "-"} for i in range(4)]
    entry = rt.retrain("gtv", cases, store, {"max_epochs": 1})
    assert entry["served_val_dice"] == 0.563 and not entry["published"], entry["reason"]
    assert store.served_entry()["version"] == 1 and head_bias(store.served) == 1.0


def test_an_upload_is_refused_while_the_model_trains(tmp_path):
    from contourcl.serving.retrain import consider_model_file

    store = ModelStore(tmp_path, "gtv")
    tiny_model_file(store.served, 0.0)
    lock = store.root / "train.lock"  # RetrainTask.lock(): where a trainer of gtv holds its TrainLock
    holder = subprocess.Popen([sys.executable, "-c", HOLD_TRAIN_LOCK, str(lock)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(TrainerBusyError, match=rf"being retrained.*pid {holder.pid}") as err:
            consider_model_file("gtv", tiny_model_file(tmp_path / "up.pt", 1.0), store, [], origin="upload")
        assert isinstance(err.value, ContourCLError)  # answered as a client error, not a 500
    finally:
        holder.kill()
        holder.wait()
    assert store.entries() == [] and head_bias(store.served) == 0.0  # nothing archived, nothing served changed
    entry = consider_model_file("gtv", tiny_model_file(tmp_path / "up.pt", 1.0), store, [], origin="upload")
    assert entry["version"] == 1  # accepted once the trainer is gone (not published: no validation case)


HOLD_TRAIN_LOCK = """
import sys, time
from contourcl.serving.lifecycle import TrainLock
TrainLock(sys.argv[1], "the gtv model").acquire()
print("locked", flush=True)
time.sleep(60)
"""


def test_changes_of_one_model_wait_for_each_other(tmp_path):
    first, second = ModelStore(tmp_path, "gtv"), ModelStore(tmp_path, "gtv")
    with first.locked(), first.locked(), pytest.raises(ModelBusyError, match="model.lock"), second.locked(timeout=0.3):  # re-entrant in one thread
        pass
    with second.locked(timeout=0.3):
        pass


# -- broken files never stop the server ---------------------------------------------------------------
def test_an_unreadable_history_is_moved_aside_and_rebuilt(tmp_path):
    from contourcl.serving.retrain import served_summary

    store = ModelStore(tmp_path, "gtv")
    tiny_model_file(store.served, 0.0, dice=0.4)
    store.consider(tiny_model_file(tmp_path / "c1.pt", 1.0, dice=0.6), 0.6, 0.4)
    store.consider(tiny_model_file(tmp_path / "c2.pt", 2.0, dice=0.3), 0.3, 0.6)
    history = store.root / "history.json"
    history.write_bytes(history.read_bytes()[:40])  # truncated

    entries = store.entries()
    assert [e["version"] for e in entries] == [0, 1, 2] and [e["served"] for e in entries] == [False, True, False]
    assert [e["val_dice"] for e in entries] == [0.4, 0.6, 0.3]  # from the files' own metadata
    aside = list(store.root.glob("history.json.corrupt-*"))
    assert len(aside) == 1 and aside[0].stat().st_size == 40
    summary = served_summary(store)
    assert summary["version"] == 1 and "history.json" in summary["warning"] and aside[0].name in summary["warning"]
    json.dumps(summary, allow_nan=False)
    assert store.withdraw()["version"] == 1 and store.restore(1)["version"] == 1
    history.write_text('{"not": "a list"}')
    assert [e["version"] for e in store.entries()] == [0, 1, 2] and len(list(store.root.glob("history.json.corrupt-*"))) == 2


def test_a_broken_served_model_is_reported_not_raised(tmp_path):
    from contourcl.serving.retrain import served_summary

    store = ModelStore(tmp_path, "gtv")
    tiny_model_file(store.served, 0.0)
    store.consider(tiny_model_file(tmp_path / "c1.pt", 1.0), 0.6, 0.4)
    store.served.write_bytes(store.served.read_bytes()[:5000])  # truncated (a full disk)

    summary = served_summary(store)
    assert str(store.served) in summary["warning"] and "--restore" in summary["warning"]
    json.dumps(summary, allow_nan=False)
    from contourcl.serving.infer import ContourInferTask, ServedModelError

    task = ContourInferTask("gtv", store.served, "GTV")
    assert not task.is_valid() and str(store.served) in task.unavailable_reason()
    assert not task.contourer.is_available()  # the uncertainty scoring skips it
    with pytest.raises(ServedModelError, match="PUT /model/gtv"):
        task({"image": str(tmp_path / "ct.nii.gz")})
    store.restore(1)
    assert task.is_valid() and "warning" not in served_summary(store)


@pytest.mark.parametrize("bad", ["../../outside.pt", "v0001.pt.bak", "/etc/hostname", "truncated"])
def test_restore_refuses_a_file_that_is_not_a_good_archive(tmp_path, bad):
    store = ModelStore(tmp_path, "gtv")
    tiny_model_file(store.served, 0.0)
    store.consider(tiny_model_file(tmp_path / "c1.pt", 1.0), 0.6, 0.4)
    entries = store.entries()
    if bad == "truncated":
        archive = store.root / "v0000.pt"
        archive.write_bytes(archive.read_bytes()[:3000])
        entries[0].pop("sha256", None)  # an archive from before the history recorded its sha256
    else:
        if not Path(bad).is_absolute():  # a valid model file there: only its name is wrong
            tiny_model_file(store.root / bad, 9.0)
        entries[0]["file"] = bad
    (store.root / "history.json").write_text(json.dumps(entries))
    served = store.served.read_bytes()
    with pytest.raises(ModelStoreError, match="nothing was changed|not an archived file"):
        store.restore(0)
    assert store.served.read_bytes() == served and store.served_entry()["version"] == 1


def test_a_busy_model_answers_409():
    """An upload or withdrawal while the model trains is a conflict, not bad input (serving.errors)."""
    from fastapi import HTTPException

    from contourcl.serving.errors import http_errors
    from contourcl.serving.model_store import ModelBusyError

    with pytest.raises(HTTPException) as caught, http_errors():
        raise ModelBusyError("another trainer of the oar model is running (pid 1)")
    assert caught.value.status_code == 409 and "pid 1" in caught.value.detail


def test_an_image_removed_while_training_is_named_in_the_history(tmp_path, monkeypatch):
    from contourcl.serving import retrain as rt

    store = ModelStore(tmp_path / "model", "gtv")
    tiny_model_file(store.served, 0.0)
    images = []
    for i in range(4):
        images.append(tmp_path / f"c{i}.nii.gz")
        images[-1].write_bytes(b"x")
    candidate = tiny_model_file(tmp_path / "cand.pt", 2.0)

    def fake_finetune(train, val, cfg, start_from=None, progress=False):
        Path(train[0]["image"]).unlink()  # DELETE /datastore/image while the retrain trains
        return types.SimpleNamespace(best_epoch=1, skipped=[], seconds=0.0)

    monkeypatch.setattr(rt, "usable_cases", lambda cases: (cases, {}))
    monkeypatch.setattr(rt, "contoured_cases", lambda model, cases: cases)
    monkeypatch.setattr(rt, "finetune", fake_finetune)
    monkeypatch.setattr(rt, "save_finetuned", lambda path, *a, **k: shutil.copyfile(candidate, path) and Path(path))
    monkeypatch.setattr(rt, "gate_dice", lambda path, val, lc=True: (0.5, {}))
    cases = [{"id": f"c{i}", "image": str(images[i]), "label": "-"} for i in range(4)]
    entry = rt.retrain("gtv", cases, store, {"max_epochs": 1})
    removed = [c["id"] for c in cases if not Path(c["image"]).exists()]
    assert len(removed) == 1 and entry["removed_during_training"] == removed
    assert store.entries()[-1]["removed_during_training"] == removed
