"""``contourcl benchmark pretrained-init`` as a user runs it, on an OpenKBP-like folder of phantoms:
a tiny SimCLR checkpoint, the recipe's first stage shortened with ``--set``, both arms scored on the
inner validation patients and paired. Its parts: ``tests/unit/test_pretrained_init.py``."""

from __future__ import annotations

import json

from contourcl.models.checkpoint import encoder_provenance, read_meta
from contourcl.testing import run_contourcl, write_openkbp_like

QUICK = ["--set", "spacing=4", "--set", "encoder=resnet10", "--set", "width=8", "--set", "epochs=1", "--set", "steps-per-epoch=2", "--set", "val-interval=1",
         "--set", "roi=64", "--set", "batch-size=4", "--set", "samples-per-volume=2", "--set", "warmup-steps=0"]


def test_both_arms_train_score_and_pair_on_the_inner_split(tmp_path):
    data = write_openkbp_like(tmp_path / "openkbp")
    ckpt = tmp_path / "simclr.pt"
    made = run_contourcl("pretrain", "simclr", "--images", data / "train-pats", "--out", ckpt, "--iterations", "2", "--batch-size", "4",
                         "--encoder", "resnet10", "--width", "8", "--image-size", "64", "--num-workers", "0", "--device", "cpu",
                         "--no-progress", "--cache-dir", tmp_path / "cache", cwd=tmp_path, timeout=300)
    assert made.returncode == 0, made.stderr[-2000:]
    out = tmp_path / "results"
    argv = ["benchmark", "pretrained-init", "--data", data, "--encoder", f"simclr={ckpt}", "--models", "oar", "--out", out,
            "--threads", "1", *QUICK]
    done = run_contourcl(*argv, cwd=tmp_path, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    runs = {arm: json.loads((out / "runs" / f"oar-{arm}.json").read_text()) for arm in ("random", "simclr")}
    files = {arm: out / "models" / f"oar-{arm}.pt" for arm in runs}
    ids = read_meta(files["random"]).provenance["val_ids"]
    assert ids and read_meta(files["simclr"]).provenance["val_ids"] == ids  # the same inner split
    for arm, run in runs.items():
        assert sorted(run["cases"]) == sorted(ids) and run["inner_val_ids"] == ids  # scored on it, and only on it
        assert "--refit" not in read_meta(files[arm]).provenance["command"]
    assert encoder_provenance(read_meta(files["random"]))["source"] == "random"
    assert encoder_provenance(read_meta(files["simclr"]), read_files=True).get("method") == "simclr"
    result = json.loads((out / "results.json").read_text())
    (mean,) = [r for r in result["pairs"] if r["scope"] == "mean"]
    assert (mean["model"], mean["arm"], mean["level"]) == ("oar", "simclr", 0.95)
    assert mean["not_worse"] is (mean["ci_low"] >= -0.005)
    assert "| oar | simclr | mean |" in (out / "results.md").read_text()
    # a second call resumes: the finished arms are not run again, and a call for fewer arms keeps the others in the report
    stamps = {arm: (out / "runs" / f"oar-{arm}.json").stat().st_mtime_ns for arm in runs}
    again = run_contourcl(*argv, cwd=tmp_path, timeout=120)
    assert again.returncode == 0, again.stderr[-2000:]
    assert stamps == {arm: (out / "runs" / f"oar-{arm}.json").stat().st_mtime_ns for arm in runs}
    narrow = run_contourcl("benchmark", "pretrained-init", "--data", data, "--models", "oar", "--out", out, "--report-only", cwd=tmp_path, timeout=60)
    assert narrow.returncode == 0, narrow.stderr[-2000:]
    assert "| oar | simclr | mean |" in (out / "results.md").read_text()
    assert f"- oar/random, oar/simclr: `contourcl {' '.join(map(str, argv))}`" in (out / "results.md").read_text()  # the call that made them
    # the recipe's 3 mm against a checkpoint pretrained at 4 mm: refused before any training
    other = run_contourcl("benchmark", "pretrained-init", "--data", data, "--encoder", f"simclr={ckpt}", "--models", "oar",
                          "--out", tmp_path / "other", cwd=tmp_path, timeout=60)
    assert other.returncode != 0 and "pretrained on other images than the oar recipe trains on: in-plane spacing [4.0, 4.0] mm (here [3.0, 3.0])" in other.stderr
    assert not (tmp_path / "other" / "models").exists()
    missing = run_contourcl("benchmark", "pretrained-init", "--data", data, "--encoder", f"x={tmp_path / 'none.pt'}", "--out", out,
                            cwd=tmp_path, timeout=60)
    assert missing.returncode != 0 and "no such checkpoint" in missing.stderr
