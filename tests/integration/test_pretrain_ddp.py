"""Pretraining under torchrun: two CPU processes, gloo. The framework in-process:
``tests/unit/test_pretrain_framework.py``.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import torch

from contourcl.models.encoder_checkpoint import load_encoder
from contourcl.models.networks import NetConfig, build_network
from contourcl.training.pretrain.volumes import write_synthetic_cts

torch.set_num_threads(1)

TINY = dict(encoder="resnet10", width=8, image_size=32, batch_size=4, num_workers=0, progress=False)
TINY_SIMSIAM = {"proj_hidden": 32, "pred_hidden": 32, "proj_dim": 16}


# ---------------------------------------------------------------------------------------------
# configuration and the methods' table


def test_ddp_two_cpu_processes(tmp_path):
    """torchrun, 2 processes, gloo: SepaReg (every stage, and k-means over gathered projections)."""
    write_synthetic_cts(tmp_path / "imgs", 2, shape=(40, 40, 4))
    out = tmp_path / "ddp.pt"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "contourcl.cli",
           "pretrain", "separeg", "--images", str(tmp_path / "imgs"), "--out", str(out), "--iterations", "3", "--batch-size", "4",
           "--encoder", "resnet10", "--width", "8", "--image-size", "32", "--num-workers", "0", "--device", "cpu",
           "--cache-dir", str(tmp_path / "cache"), "--no-progress", "--lr", "0.05",
           "--set", "proj_hidden=16", "--set", "pred_hidden=16", "--set", "proj_dim=8", "--set", "num_clusters=2",
           "--set", "budget=per-stage", "--set", "intra_iterations=2", "--set", "region_area_mm2=null"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    sums = dict(re.findall(r"rank (\d) encoder checksum (\S+)", proc.stderr))
    assert set(sums) == {"0", "1"} and sums["0"] == sums["1"]  # DDP kept the replicas identical
    meta = load_encoder(build_network(NetConfig(out_channels=8, encoder="resnet10", width=8)), out)
    assert meta["world_size"] == 2 and meta["iterations"] == 3 + 2 + 2 + 3  # inter, intra0, intra1, distill
    assert sum(meta["cluster_sizes"]) == meta["regions"]
