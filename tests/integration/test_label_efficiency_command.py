"""``contourcl benchmark label-efficiency`` end to end on an OpenKBP-like folder of phantoms (about 45
s on 2 cores). Its parts in-process: ``tests/unit/test_label_efficiency.py``.
"""

from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pytest

from contourcl.testing import write_openkbp_like
from contourcl.training.experiments import label_efficiency as le


# ------------------------------------------------------------------------------ end to end
@pytest.fixture(scope="module")
def openkbp_like(tmp_path_factory):
    return write_openkbp_like(tmp_path_factory.mktemp("openkbp"))


def test_benchmark_command_end_to_end(openkbp_like, tmp_path):
    from contourcl.cli import main

    out = tmp_path / "results"
    argv = ["benchmark", "label-efficiency", "--data", str(openkbp_like), "--out", str(out),
            "--methods", "random", "simclr", "voxel-siamese", "--sizes", "1", "2", "--draws", "1", "--pool", "0",
            "--pretrain-iterations", "2", "--finetune-steps", "4", "--jobs", "1", "--threads", "1"]
    assert main(argv) == 0
    rows = list(csv.DictReader((out / "results.csv").open()))
    for model in ("oar", "gtv"):
        for method in ("random", "simclr", "voxel-siamese"):
            for n in ("1", "2"):
                r = [x for x in rows if (x["model"], x["method"], x["n_labeled"], x["structure"], x["metric"]) == (model, method, n, "mean", "dice")]
                assert len(r) == 1 and 0.0 <= float(r[0]["mean"]) <= 1.0 and r[0]["patients"] in ("1", "2")
    run = json.loads((out / "runs" / "oar" / "simclr" / "n02-d0.json").read_text())
    assert run["init"].endswith("simclr.pt") and len(run["train_cases"]) == 2
    assert set(run["cases"]) == {"pt_10", "pt_11"}  # evaluated on the validation cases only
    assert set(run["cases"]["pt_10"]) == {"Brainstem", "SpinalCord", "Parotid_R", "Parotid_L", "Mandible", "Larynx", "Esophagus"}
    # the reference check's set-aside structures: named in the record, not scored
    assert list(run["set_aside"]) == ["pt_11"] and list(run["set_aside"]["pt_11"]) == ["SpinalCord"]
    assert "median cross-section" in run["set_aside"]["pt_11"]["SpinalCord"]
    assert np.isnan(run["cases"]["pt_11"]["SpinalCord"]["dice"]) and not np.isnan(run["cases"]["pt_10"]["SpinalCord"]["dice"])
    md = (out / "results.md").read_text()
    assert "| simclr |" in md and "surface Dice at 4 mm" in md
    assert (out / "dice-vs-labeled-oar.png").stat().st_size > 0
    assert list((out / "overlays").glob("oar-*.png"))
    # the results folder moved elsewhere (another working copy): its report is rebuilt with the overlays
    moved = tmp_path / "elsewhere" / "results"
    shutil.copytree(out, moved)
    shutil.rmtree(moved / "overlays")
    (out / "models").rename(out / "models-away")  # the paths the records hold no longer exist
    assert main([str(moved) if a == str(out) else a for a in argv] + ["--report-only"]) == 0
    assert sorted(p.name for p in (moved / "overlays").glob("oar-*.png")) == sorted(p.name for p in (out / "overlays").glob("oar-*.png"))
    (out / "models-away").rename(out / "models")
    shutil.rmtree(moved)
    # a second call resumes: nothing is redone
    stamp = (out / "runs" / "oar" / "random" / "n01-d0.json").stat().st_mtime_ns
    assert main(argv) == 0
    assert (out / "runs" / "oar" / "random" / "n01-d0.json").stat().st_mtime_ns == stamp
    # --rescore scores runs recorded before the masked-slice rule again, from their saved models
    record_path = out / "runs" / "oar" / "simclr" / "n01-d0.json"
    current = json.loads(record_path.read_text())
    assert current["scored_on"] == le.SCORED_ON
    # a run scored on the imaged slices before the reference check needs no model: the check is
    # applied to its figures (pt_11's cord is set aside, as the fresh record already has it)
    checked_path = out / "runs" / "oar" / "voxel-siamese" / "n01-d0.json"
    checked = json.loads(checked_path.read_text())
    checked_path.write_text(json.dumps({**checked, "scored_on": le.IMAGED_SLICES_ONLY}))
    (out / "models" / "oar-voxel-siamese-n01-d0.pt").unlink()
    old = {**current, "cases": {cid: {s: {**m, "dice": -1.0} for s, m in per.items()} for cid, per in current["cases"].items()}}
    del old["scored_on"], old["set_aside"]  # as recorded before either rule
    record_path.write_text(json.dumps(old))
    (out / "models" / "gtv-simclr-n01-d0.pt").unlink()  # a run whose model is gone cannot be scored again
    gone = out / "runs" / "gtv" / "simclr" / "n01-d0.json"
    gone.write_text(json.dumps({k: v for k, v in json.loads(gone.read_text()).items() if k != "scored_on"}))
    assert main(argv + ["--rescore"]) == 1  # says which run it could not score
    again = json.loads(record_path.read_text())
    assert again["scored_on"] == le.SCORED_ON
    upgraded = json.loads(checked_path.read_text())
    assert upgraded["scored_on"] == le.SCORED_ON
    assert json.dumps(upgraded["cases"], sort_keys=True) == json.dumps(checked["cases"], sort_keys=True)
    assert upgraded["set_aside"] == checked["set_aside"] and list(upgraded["set_aside"]) == ["pt_11"]
    assert json.dumps(again["cases"], sort_keys=True) == json.dumps(current["cases"], sort_keys=True)
    assert json.dumps(again["cases_every_slice"], sort_keys=True) == json.dumps(old["cases"], sort_keys=True)
    assert again["set_aside"] == current["set_aside"]  # scored again from its model: the check's findings recorded
    assert (out / "runs" / "oar" / "random" / "n01-d0.json").stat().st_mtime_ns == stamp  # already scored so: untouched
    # the command that states a model's figures, on the same validation cases
    import subprocess
    import sys
    from pathlib import Path

    cli = Path(sys.executable).parent / "contourcl"
    res = subprocess.run([str(cli), "evaluate", str(out / "models" / "oar-random-n02-d0.pt"), "--data", str(openkbp_like / "validation-pats"),
                          "--json", str(tmp_path / "eval.json")], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert "| Mandible |" in res.stdout and "| mean |" in res.stdout
    per_case = json.loads((tmp_path / "eval.json").read_text())["cases"]
    # the same figures as the benchmark's run (compared as JSON: NaN marks skipped structures)
    assert json.dumps(per_case, sort_keys=True) == json.dumps(run_random_n2(out)["cases"], sort_keys=True)


def run_random_n2(out):
    return json.loads((out / "runs" / "oar" / "random" / "n02-d0.json").read_text())


def test_the_agcl_row_runs_the_papers_stage_3_end_to_end(openkbp_like, tmp_path):
    """AGCL's stage 3 as a table row: the heads trained over the shared pretraining's two-channel
    encoder, the draw's random-init model giving the coarse masks, scored through the served path
    on every structure the validation cases contour."""
    from contourcl.cli import main

    out = tmp_path / "results"
    argv = ["benchmark", "label-efficiency", "--data", str(openkbp_like), "--out", str(out), "--models", "oar",
            "--methods", "random", "agcl", "--sizes", "2", "--draws", "1", "--pool", "0",
            "--pretrain-iterations", "2", "--finetune-steps", "4", "--jobs", "1", "--threads", "1"]
    assert main(argv) == 0
    run = json.loads((out / "runs" / "oar" / "agcl" / "n02-d0.json").read_text())
    assert run["stage"] == 3 and run["heads_optimiser"] == {"lr": 1e-4, "batch_size": 4, "weight_decay": 0.0}
    assert run["coarse_model"].endswith("oar-random-n02-d0.pt") and run["encoder_2ch"].endswith("agcl-unet-oar-n02-d0.2ch.pt")
    random_run = json.loads((out / "runs" / "oar" / "random" / "n02-d0.json").read_text())
    assert len(run["history"]) == len(random_run["history"]), "the table's epochs"
    assert run["scored_path"] == le.SCORING_PATH
    assert set(run["cases"]) == {"pt_10", "pt_11"}
    def scored(record):
        return {(c, s): m["dice"] for c, per in record["cases"].items() for s, m in per.items() if not np.isnan(m["dice"])}

    assert set(scored(run)) == set(scored(random_run)), "the structures every row scores (the check's set-aside ones not)"
    assert len(scored(run)) >= 8 and all(0.0 <= d <= 1.0 for d in scored(run).values())
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert any((r["method"], r["structure"], r["metric"]) == ("agcl", "mean", "dice") for r in rows)
    assert "| agcl |" in (out / "results.md").read_text()
