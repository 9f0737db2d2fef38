import json

import pytest
import torch

from contourcl.data.labels import model_labels
from contourcl.models.checkpoint import ModelMeta, load_model, read_meta, save_model
from contourcl.models.networks import NetConfig, build_network
from contourcl.serving.model_store import ModelStore


def tiny_model_file(path, fill: float, dice: float = 0.5):
    net = build_network(NetConfig(out_channels=2, encoder="resnet10", width=8))
    with torch.no_grad():
        net.head[0].bias.fill_(fill)
    meta = ModelMeta(model="gtv", labels=model_labels("gtv"), net=net.config.to_dict(), metrics={"val_dice": dice})
    return save_model(path, net, meta)


def head_bias(path):
    return float(load_model(path)[0].head[0].bias[0])


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
    assert grown == first  # new cases go to training; validation does not move
    gone = store.validation_ids([c for c in (f"c{i}" for i in range(25)) if c != first[0]], fraction=0.2)
    assert gone == first[1:]
    assert ModelStore(tmp_path / "other", "oar").validation_ids(["only"]) == []


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
