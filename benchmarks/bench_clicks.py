"""Click latency on a CPU: a click on a 512 x 512 x 150 CT beside the automatic contour of that CT.

    CONTOURCL_OPENKBP=../shared/data/openkbp python benchmarks/bench_clicks.py [--model oar|gtv] [--refiner FILE] [--runs 5] [--threads 2]

The CT is an OpenKBP case (``train-pats/pt_1``, :data:`contourcl.testing.BENCH_CT`) resampled to
512 x 512 x 150 (:func:`contourcl.testing.ct_sized_volume`, written to a temporary folder). Prints,
as a Markdown table, the median over ``--runs`` of:

- the automatic contour: :class:`contourcl.inference.Contourer` with the shipped ``--model`` on
  the file (the model loaded once before; reading and preprocessing the file included);
- one click: :class:`contourcl.refine.refiner.Refiner` on the arrays in memory (what the server
  holds), the structure the left parotid (``oar``) or the target (``gtv``) of that automatic
  contour, one positive click per run at a different voxel near its edge (each run from the
  automatic contour: one click's answer), with the model's click scope from the app's config
  (``gtv``: 40 mm, 25 mm above and below), as the server answers;
- three clicks: the answer to a third click, all three sent (as Slicer sends them), at voxels
  drawn the same way.

``--refiner``: the refinement model file (default ``apps/radonc/model/refine.pt``; when there is
none, a network started from the shipped ``oar`` file, untrained: the same computation, so the
same time). Issue 31's bound: at most 1 s per click (median of 5, 2 cores).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from contourcl.data.datasets import openkbp_or_exit
from contourcl.data.volumes import read_nifti
from contourcl.inference import Contourer
from contourcl.refine.network import from_shipped, refine_meta
from contourcl.refine.refiner import Refiner
from contourcl.serving.config import app_configs
from contourcl.testing import BENCH_CT, REPO, ct_sized_volume

STRUCTURE = {"oar": "Parotid_L", "gtv": "GTV"}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", help="OpenKBP root (default: CONTOURCL_OPENKBP)")
    parser.add_argument("--refiner", default=str(REPO / "apps" / "radonc" / "model" / "refine.pt"))
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--model", choices=sorted(STRUCTURE), default="oar")
    args = parser.parse_args(argv)
    app = REPO / "apps" / "radonc"
    model = app / "model" / f"{args.model}.pt"
    scope = app_configs(app)[args.model].click_scope
    torch.set_num_threads(args.threads)
    root = openkbp_or_exit(parser, args.data)
    if Path(args.refiner).is_file():
        refiner, which = Refiner.from_file(args.refiner), args.refiner
    else:
        network, meta = from_shipped(str(app / "model" / "oar.pt"))
        refiner, which = Refiner(network, refine_meta(network, meta)), f"untrained, from oar.pt ({args.refiner} not found)"
    with tempfile.TemporaryDirectory() as tmp:
        path = ct_sized_volume(root / BENCH_CT, Path(tmp) / "ct512.nii.gz")
        contourer = Contourer(model)
        contourer.model()
        auto_s, labels = [], None
        for _ in range(args.runs):
            t = time.perf_counter()
            prediction = contourer(path)
            auto_s.append(time.perf_counter() - t)
            labels = prediction
        ct, affine = read_nifti(path)
        ct = np.asarray(ct)
    mask = labels.label == labels.labels[STRUCTURE[args.model]]
    inside = np.argwhere(mask)
    rng = np.random.default_rng(0)
    times: dict[int, list[float]] = {1: [], 3: []}
    changed = []
    for _ in range(args.runs):
        for n in times:
            points = inside[rng.integers(len(inside), size=n)] + rng.integers(-6, 7, size=(n, 3)) * (1, 1, 0)
            points = np.clip(points, 0, np.asarray(ct.shape) - 1)
            t = time.perf_counter()
            out = refiner(ct, affine, mask, points, np.zeros((0, 3), np.int64), **scope.kwargs())
            times[n].append(time.perf_counter() - t)
            if n == 1:
                changed.append(int((out != mask).sum()))
    load = os.getloadavg()[0]
    print(f"CT {ct.shape} ({np.round(np.linalg.norm(affine[:3, :3], axis=0), 2).tolist()} mm), {args.threads} torch threads, "
          f"load average {load:.1f}; refiner: {which}; {args.model}'s click scope: {scope}")
    print("| what | median (s) | runs (s) |")
    print("| --- | --- | --- |")
    print(f"| automatic contour ({args.model}, Contourer on the file) | {statistics.median(auto_s):.2f} | {', '.join(f'{s:.2f}' for s in auto_s)} |")
    for n, runs in times.items():
        what = "one click" if n == 1 else f"{n} clicks (the answer to the last)"
        print(f"| {what} (Refiner, {STRUCTURE[args.model]}) | {statistics.median(runs):.2f} | {', '.join(f'{s:.2f}' for s in runs)} |")
    print(f"voxels changed per click: {changed}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
