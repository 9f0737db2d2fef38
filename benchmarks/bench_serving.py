"""Serving benchmarks on CPU: inference time and memory, and the retraining turnaround.

    CONTOURCL_OPENKBP=../shared/data/openkbp python benchmarks/bench_serving.py [--runs 5] [--skip-retrain] [--model FILE ...]

Prints, as a Markdown table, medians over ``--runs`` runs:

- inference wall time and peak resident memory (RSS) of the served ``oar`` model, each run in a
  fresh process (so the peak is that run's), for a 128^3 OpenKBP case (pt_1, read in place from
  the OpenKBP folder: ``--data DIR`` or ``CONTOURCL_OPENKBP``) and a 512 x 512 x 150 CT-sized
  volume (that case resampled to 0.98 mm in-plane and 150 slices, written to a temporary folder);
- the retrain turnaround: from submitting a label to the real server (``PUT
  /datastore/label``) to the first inference answered by the new model, for a 3-epoch update
  on 5 labeled synthetic cases.

``--model`` times other model files too (e.g. a candidate recipe's), one after the other in the
same conditions, so that their inference rows compare on a shared, noisy machine.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from contourcl.data.datasets import openkbp_or_exit
from contourcl.testing import BENCH_CT, REPO, ct_sized_volume, start_monailabel, stop_process, wait_until_serving
from contourcl.testing import SHIPPED_OAR as MODEL

_CHILD = r"""
import json, resource, sys, time
t0 = time.perf_counter()
from contourcl.inference import Contourer
c = Contourer(sys.argv[1])
c.model()
t1 = time.perf_counter()
p = c(sys.argv[2])
t2 = time.perf_counter()
print(json.dumps({"load_s": t1 - t0, "infer_s": t2 - t1, "timings": p.timings, "shape": list(p.label.shape),
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def bench_inference(image: Path, runs: int, model: Path = MODEL) -> dict:
    results = []
    for _ in range(runs):
        out = subprocess.run([sys.executable, "-c", _CHILD, str(model), str(image)], capture_output=True, text=True, check=True)
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
    return {
        "infer_s": statistics.median(r["infer_s"] for r in results),
        "peak_rss_mb": statistics.median(r["peak_rss_mb"] for r in results),
        "runs": len(results),
        "shape": results[0]["shape"],
    }


def bench_retrain(runs: int) -> dict:
    import nibabel as nib
    import requests

    from contourcl.data.phantom import make_dataset

    turnarounds = []
    for run in range(runs):
        root = Path(tempfile.mkdtemp(prefix="contourcl-bench-"))
        studies, app = root / "studies", root / "radonc"
        make_dataset(studies, 6, first_seed=200 + 10 * run, labeled=4)
        shutil.copytree(REPO / "apps" / "radonc", app, ignore=shutil.ignore_patterns("history", "__pycache__"))
        proc, url = start_monailabel(app, studies, {"models": "oar"}, root / "server.log", new_session=True)
        try:
            wait_until_serving(proc, url, root / "server.log")
            unlabeled = min({p.name[:-7] for p in studies.glob("*.nii.gz")} - {p.name[:-7] for p in (studies / "labels" / "final").glob("*.nii.gz")})
            before = requests.post(f"{url}/infer/oar", params={"image": unlabeled, "output": "json"}).json()["model_version"]
            # the fifth labeled case: the phantom's truth, submitted as a clinician would
            from contourcl.data.phantom import make_phantom

            seed = int(unlabeled.rsplit("_", 1)[1])
            img = nib.load(studies / f"{unlabeled}.nii.gz")
            label = make_phantom(seed, shape=img.shape, spacing=tuple(float(z) for z in img.header.get_zooms()))[1]
            nib.save(nib.Nifti1Image(label, img.affine), str(root / "label.nii.gz"))
            t0 = time.perf_counter()
            with open(root / "label.nii.gz", "rb") as f:
                requests.put(f"{url}/datastore/label", params={"image": unlabeled, "tag": "final"}, files={"label": f}).raise_for_status()
            requests.post(f"{url}/train/oar", json={"max_epochs": 3}).raise_for_status()
            while True:
                status = requests.get(f"{url}/train/").json()
                if status.get("status") not in ("SUBMITTED", "RUNNING"):
                    break
                time.sleep(0.5)
            version = requests.post(f"{url}/infer/oar", params={"image": unlabeled, "output": "json"}).json()["model_version"]
            t1 = time.perf_counter()
            entry = requests.get(f"{url}/info/").json()["train_stats"]["oar"]["history"][-1]
            turnarounds.append({"seconds": t1 - t0, "published": entry["published"], "new_model_served": version != before, "reason": entry["reason"]})
        finally:
            stop_process(proc)
            shutil.rmtree(root, ignore_errors=True)
    return {"turnaround_s": statistics.median(t["seconds"] for t in turnarounds), "runs": turnarounds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--retrain-runs", type=int, default=3)
    parser.add_argument("--skip-retrain", action="store_true")
    parser.add_argument("--model", type=Path, action="append", help="time this model file's inference (repeatable; default: the shipped oar.pt)")
    parser.add_argument("--data", help="the OpenKBP folder (train-pats/, validation-pats/; default: $CONTOURCL_OPENKBP)")
    args = parser.parse_args()
    kbp = openkbp_or_exit(parser, args.data) / BENCH_CT
    models = args.model or [MODEL]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        if kbp.is_file():
            big = ct_sized_volume(kbp, Path(tmp) / "ct512.nii.gz")
            for model in models:
                name = "" if model == MODEL else f" ({model})"
                for image, what in ((kbp, "OpenKBP pt_1 {}"), (big, "{} CT-sized")):
                    r = bench_inference(image, args.runs, model)
                    rows.append((f"inference{name}, " + what.format("x".join(map(str, r["shape"]))), f"{r['infer_s']:.2f} s",
                                 f"{r['peak_rss_mb']:.0f} MB", "<= 3 s, <= 3 GB"))
        else:
            print(f"(no OpenKBP case at {kbp}: inference rows skipped)")
    if not args.skip_retrain:
        r = bench_retrain(args.retrain_runs)
        served = all(t["new_model_served"] for t in r["runs"])
        rows.append(("retrain turnaround, 3 epochs, 5 labeled cases", f"{r['turnaround_s']:.1f} s", "-", f"<= 120 s (new model served in every run: {served})"))
        print(json.dumps(r["runs"], indent=1))
    print(f"\nmedians of {args.runs} inference runs / {args.retrain_runs} retrain runs, CPU threads: {os.cpu_count()}\n")
    print("| measurement | time | peak RSS | target |\n| --- | --- | --- | --- |")
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
