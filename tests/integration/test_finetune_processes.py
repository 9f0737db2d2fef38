"""Fine-tuning as a user runs it: ``contourcl finetune`` on a studies folder, and under torchrun (two
CPU processes, gloo). The engine in-process: ``tests/unit/test_finetune.py``.
"""

import subprocess
import sys

from contourcl.models.checkpoint import load_model


def test_finetune_cli_on_a_studies_folder(tmp_path):
    from contourcl.data.phantom import make_dataset

    make_dataset(tmp_path / "studies", 3, first_seed=50, labeled=3, shape=(48, 48, 12))
    out = tmp_path / "gtv.pt"
    cmd = [sys.executable, "-m", "contourcl.cli", "finetune", "--model", "gtv", "--data", str(tmp_path / "studies"), "--out", str(out),
           "--encoder", "resnet10", "--width", "8", "--epochs", "1", "--samples-per-volume", "4", "--batch-size", "8", "--half",
           "--spacing", "3", "--context", "1"]
    subprocess.run(cmd, check=True, capture_output=True, timeout=300)
    net, meta = load_model(out)
    assert meta.model == "gtv" and meta.labels == {"GTV": 1} and len(meta.provenance["train_ids"]) == 2
    assert meta.spacing == (3.0, 3.0) and meta.net["in_channels"] == 3  # --spacing and --context reach the served file


def test_finetune_under_torchrun_two_cpu_processes(tmp_path):
    """DDP on gloo: two processes share the training cases, rank 0 validates and writes."""
    from contourcl.data.phantom import make_dataset

    make_dataset(tmp_path / "studies", 3, first_seed=60, labeled=3, shape=(48, 48, 12))
    out = tmp_path / "oar.pt"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "contourcl.cli", "finetune",
           "--model", "oar", "--data", str(tmp_path / "studies"), "--out", str(out), "--encoder", "resnet10", "--width", "8",
           "--epochs", "2", "--samples-per-volume", "4", "--batch-size", "4"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    net, meta = load_model(out)
    assert meta.model == "oar" and len(meta.provenance["train_ids"]) == 2 and "val_dice" in meta.metrics
