"""The gate's figure is what ``contourcl evaluate`` (run as a user runs it) reports. The gate
in-process: ``tests/unit/test_gate.py``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from contourcl.data.labels import model_labels
from contourcl.data.phantom import write_phantom
from contourcl.models.checkpoint import ModelMeta, save_model
from contourcl.models.networks import NetConfig, build_network
from contourcl.serving.model_store import ModelStore
from contourcl.serving.retrain import gate_dice, retrain

pytestmark = pytest.mark.timeout(600)


def tiny_oar(path, seed=0):
    torch.manual_seed(seed)
    net = build_network(NetConfig(out_channels=len(model_labels("oar")) + 1, encoder="resnet10", width=8))
    return save_model(path, net, ModelMeta(model="oar", labels=model_labels("oar"), net=net.config.to_dict(), roi=(64, 64)))


@pytest.fixture(scope="module")
def studies(tmp_path_factory):
    """Four labeled phantoms, one of them with NaN voxels written into the CT."""
    import nibabel as nib

    root = tmp_path_factory.mktemp("studies")
    for i in range(4):
        write_phantom(root, f"case{i}", i, shape=(64, 64, 16), spacing=(4.0, 4.0, 8.0))
    bad = root / "case3.nii.gz"
    img = nib.load(bad)
    ct = np.asarray(img.dataobj).astype(np.float32)
    ct[10:20, 10:20, 3] = np.nan
    nib.save(nib.Nifti1Image(ct, img.affine), str(bad))
    return root


def cases(root):
    return [{"id": p.name.removesuffix(".nii.gz"), "image": str(p), "label": str(root / "labels" / "final" / p.name)}
            for p in sorted(root.glob("*.nii.gz"))]


def test_gate_figure_is_what_contourcl_evaluate_reports_and_bad_cases_are_excluded(studies, tmp_path):
    store = ModelStore(tmp_path / "model", "oar")
    tiny_oar(store.served)
    entry = retrain("oar", cases(studies), store, {"max_epochs": 1, "train_batch_size": 8, "samples_per_volume": 8, "val_split": 0.3})

    assert entry["excluded"] and "case3" in entry["excluded"] and "NaN" in entry["excluded"]["case3"]
    assert "case3" not in entry["train_ids"] + entry["val_ids"]
    assert entry["gate_cases"] == len(entry["val_ids"]) == 1
    assert "fewer than 3" in entry["gate_note"]
    # the served model's figure in the history is the one `contourcl evaluate` gives on those cases
    served_v0 = store.root / store.entries()[0]["file"]
    out = tmp_path / "eval.json"
    exe = Path(sys.executable).parent / "contourcl"
    run = subprocess.run([str(exe), "evaluate", str(served_v0), "--data", str(studies), "--ids", ",".join(entry["val_ids"]), "--json", str(out)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    evaluated = json.loads(out.read_text())["mean"]["dice"]
    assert abs(entry["served_val_dice"] - evaluated) < 1e-6
    assert abs(store.entries()[0]["val_dice"] - evaluated) < 1e-6
    val = [c for c in cases(studies) if c["id"] in entry["val_ids"]]
    assert abs(gate_dice(store.root / entry["file"], val)[0] - entry["val_dice"]) < 1e-6
