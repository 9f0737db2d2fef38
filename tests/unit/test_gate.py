"""The quality gate scores what is served, and a model file from outside is data, never code."""

from __future__ import annotations

import pickle

import pytest
import torch

from contourcl.errors import InvalidModelError
from contourcl.models.checkpoint import FORMAT, check_model_file
from contourcl.serving.model_store import ModelStore
from contourcl.serving.retrain import consider_model_file
from contourcl.testing import CodePayload, final_cases, tiny_model_file, write_gate_studies

pytestmark = pytest.mark.timeout(600)


def tiny_oar(path, seed=0):
    return tiny_model_file(path, "oar", seed=seed, dice=None, roi=(64, 64))


@pytest.fixture(scope="module")
def studies(tmp_path_factory):
    """Four labeled phantoms, one of them with NaN voxels written into the CT."""
    return write_gate_studies(tmp_path_factory.mktemp("studies"))


cases = final_cases


def test_a_model_file_that_runs_code_is_refused_unrun(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    torch.save({"format": FORMAT, "meta": CodePayload(marker), "state_dict": {}}, evil)
    with pytest.raises(InvalidModelError, match="not a ContourCL model file"):
        check_model_file(evil, "oar")
    evil.write_bytes(pickle.dumps(CodePayload(marker)))
    with pytest.raises(InvalidModelError):
        check_model_file(evil, "oar")
    assert not marker.exists()


def test_model_file_checks_name_the_problem(tmp_path):
    tiny_oar(tmp_path / "oar.pt")
    assert check_model_file(tmp_path / "oar.pt", "oar").model == "oar"
    with pytest.raises(InvalidModelError, match="is a 'oar' model, not 'gtv'"):
        check_model_file(tmp_path / "oar.pt", "gtv")
    ckpt = torch.load(tmp_path / "oar.pt", weights_only=True)
    ckpt["state_dict"] = {k: v[..., :1] if v.ndim == 4 else v for k, v in ckpt["state_dict"].items()}
    torch.save(ckpt, tmp_path / "cut.pt")
    with pytest.raises(InvalidModelError, match="do not fit"):
        check_model_file(tmp_path / "cut.pt", "oar")
    ckpt = torch.load(tmp_path / "oar.pt", weights_only=True)
    ckpt["meta"]["labels"] = {"Liver": 1}
    torch.save(ckpt, tmp_path / "liver.pt")
    with pytest.raises(InvalidModelError, match="contours"):
        check_model_file(tmp_path / "liver.pt", "oar")


def test_uploaded_model_goes_through_the_gate_and_the_history(studies, tmp_path):
    store = ModelStore(tmp_path / "model", "oar", min_gate_cases=1)  # three phantoms: one validation case
    tiny_oar(store.served, seed=0)
    served_bytes = store.served.read_bytes()
    labeled = cases(studies)

    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a model")
    with pytest.raises(InvalidModelError):
        consider_model_file("oar", junk, store, labeled, origin="upload")
    assert store.entries() == [] and store.served.read_bytes() == served_bytes  # nothing archived or served

    candidate = tiny_oar(tmp_path / "candidate.pt", seed=1)
    entry = consider_model_file("oar", candidate, store, labeled, origin="upload")
    assert entry["origin"] == "upload" and entry["gate_cases"] >= 1
    assert "case3" in entry["excluded"]
    if entry["val_dice"] >= entry["served_val_dice"]:
        assert entry["published"] and store.served.read_bytes() == candidate.read_bytes()
    else:
        assert not entry["published"] and store.served.read_bytes() == served_bytes
    assert [e["version"] for e in store.entries()] == [0, 1]

    # withdrawing keeps the file in the history; restoring serves it again
    served_now = store.served.read_bytes()
    kept = store.withdraw()
    assert not store.served.exists() and (store.root / kept["file"]).read_bytes() == served_now
    store.restore(kept["version"])
    assert store.served.read_bytes() == served_now
