"""Issue 32: every model file records where its encoder came from, and /info/ and ``contourcl
models`` say it (contourcl.models.checkpoint.encoder_provenance)."""

from __future__ import annotations

import argparse

import pytest
import torch

from contourcl.data.labels import model_labels
from contourcl.files import sha256_file
from contourcl.models.checkpoint import (
    ModelMeta,
    describe_encoder,
    encoder_of_file,
    encoder_provenance,
    read_meta,
    save_model,
    trace_retrained,
)
from contourcl.models.encoder_checkpoint import save_encoder
from contourcl.models.networks import NetConfig, ResNetEncoder, build_network
from contourcl.testing import REPO, tiny_model_file


def _save(path, **provenance):
    net = build_network(NetConfig(out_channels=8, encoder="resnet10", width=8))
    return save_model(path, net, ModelMeta(model="oar", labels=model_labels("oar"), net=net.config.to_dict(), provenance=provenance))


def test_each_origin_is_recorded_when_the_file_is_written(tmp_path):
    assert read_meta(_save(tmp_path / "a.pt", config={"init": None}, command="x")).provenance["encoder"] == {"source": "random"}

    ckpt = tmp_path / "pre.pt"
    save_encoder(ResNetEncoder("resnet10", 8), ckpt, method="separeg", iterations=300, num_cases=2,
                 config={"images": [str(tmp_path / "cts" / "a.nii.gz"), str(tmp_path / "cts" / "b.nii.gz")]})
    enc = read_meta(_save(tmp_path / "b.pt", config={"init": str(ckpt)})).provenance["encoder"]
    assert enc == {"source": "pretrained", "checkpoint": str(ckpt), "sha256": sha256_file(ckpt), "method": "separeg",
                   "steps": 300, "data": f"2 CTs under {tmp_path / 'cts'}"}
    assert describe_encoder(enc).startswith(f"separeg pretraining, 300 steps, 2 CTs under {tmp_path / 'cts'} (sha256 ")

    cont = read_meta(_save(tmp_path / "c.pt", started_from=str(tmp_path / "a.pt"))).provenance["encoder"]
    assert cont["source"] == "continued" and cont["from_encoder"] == {"source": "random"}
    assert describe_encoder(cont) == f"continued from {tmp_path / 'a.pt'} (sha256 {sha256_file(tmp_path / 'a.pt')[:12]}), whose encoder: random init"

    # the server's retraining (trained_on, no init): traced to the first file of the store that is not retrained
    retrained = encoder_of_file(_save(tmp_path / "d.pt", trained_on=["p1"]))
    assert retrained == {"source": "retrained", "from": "the model served before it"}
    traced = trace_retrained(retrained, [tmp_path / "d.pt", tmp_path / "b.pt"])
    assert traced["origin"]["method"] == "separeg" and traced["origin_file"] == "b.pt"
    assert describe_encoder(traced).startswith("retrained from the model served before it; first: separeg pretraining")


def test_files_written_before_the_record_say_it_from_what_they_hold():
    meta = ModelMeta(model="oar", labels={}, net={}, provenance={"config": {"init": "/gone/simclr.pt"}})
    assert encoder_provenance(meta) == {"source": "pretrained", "checkpoint": "/gone/simclr.pt"}
    assert encoder_provenance(ModelMeta(model="oar", labels={}, net={}, provenance={})) == {"source": "random"}


@pytest.mark.parametrize("name, source", [("oar.pt", "random"), ("gtv.pt", "random"),
                                          ("synthetic/oar.pt", "continued"), ("synthetic/gtv.pt", "continued")])
def test_the_shipped_files_record_their_encoder(name, source):
    """As the model cards say: the real-CT files from random init; the phantom files continued from
    earlier runs whose first started from random init."""
    enc = read_meta(REPO / "apps" / "radonc" / "model" / name).provenance["encoder"]
    assert enc["source"] == source
    assert source == "random" or enc["from_encoder"] == {"source": "random"}


def test_info_and_contourcl_models_name_the_encoder(tmp_path, capsys):
    from contourcl.cli.models import run
    from contourcl.serving.model_store import ModelStore
    from contourcl.serving.retrain import served_summary

    store = ModelStore(tmp_path, "gtv")
    tiny_model_file(store.served, "gtv", bias=0.0)
    summary = served_summary(store)
    assert summary["encoder"] == {"source": "random"} and summary["encoder_summary"] == "random init"
    # a retrained file published: the summary traces it to the first version
    cand = tiny_model_file(tmp_path / "cand.pt", "gtv", bias=1.0)
    ckpt = torch.load(cand, weights_only=True)
    ckpt["meta"]["provenance"] = {"trained_on": ["p1"]}  # as the server's retraining writes it, no record
    torch.save(ckpt, cand)
    store.consider(cand, 0.6, 0.5)
    summary = served_summary(store)
    assert summary["encoder"]["source"] == "retrained" and summary["encoder"]["origin"] == {"source": "random"}
    assert summary["encoder_summary"] == "retrained from the model served before it; first: random init"
    run(argparse.Namespace(model="gtv", app=None, model_dir=str(tmp_path), weights=None, restore=None))
    assert capsys.readouterr().out.splitlines()[0] == ("gtv: served gtv.pt; encoder: retrained from the model served "
                                                        "before it; first: random init")
