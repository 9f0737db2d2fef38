"""Click latency on a CPU: a click on a 512 x 512 x 150 CT beside the automatic contour of that CT.

    CONTOURCL_OPENKBP=../shared/data/openkbp python benchmarks/bench_clicks.py [--refiner FILE] [--runs 5] [--threads 2]

The CT is an OpenKBP case (``train-pats/pt_1``, :data:`contourcl.testing.BENCH_CT`) resampled to
512 x 512 x 150 (:func:`contourcl.testing.ct_sized_volume`, written to a temporary folder). Prints,
as a Markdown table, the median over ``--runs`` of:

- the automatic contour: :class:`contourcl.inference.Contourer` with the shipped ``oar`` model on
  the file (the model loaded once before; reading and preprocessing the file included);
- one click: :class:`contourcl.refine.refiner.Refiner` on the arrays in memory (what the server
  holds), the structure the left parotid of that automatic contour, one positive click per run at
  a different voxel near its edge (each run from the automatic contour: one click's answer).

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
from contourcl.testing import BENCH_CT, REPO, ct_sized_volume
from contourcl.testing import SHIPPED_OAR as MODEL


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", help="OpenKBP root (default: CONTOURCL_OPENKBP)")
    parser.add_argument("--refiner", default=str(REPO / "apps" / "radonc" / "model" / "refine.pt"))
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    root = openkbp_or_exit(parser, args.data)
    if Path(args.refiner).is_file():
        refiner, which = Refiner.from_file(args.refiner), args.refiner
    else:
        network, meta = from_shipped(str(MODEL))
        refiner, which = Refiner(network, refine_meta(network, meta)), f"untrained, from {MODEL.name} ({args.refiner} not found)"
    with tempfile.TemporaryDirectory() as tmp:
        path = ct_sized_volume(root / BENCH_CT, Path(tmp) / "ct512.nii.gz")
        contourer = Contourer(MODEL)
        contourer.model()
        auto_s, labels = [], None
        for _ in range(args.runs):
            t = time.perf_counter()
            prediction = contourer(path)
            auto_s.append(time.perf_counter() - t)
            labels = prediction
        ct, affine = read_nifti(path)
        ct = np.asarray(ct)
    mask = labels.label == labels.labels["Parotid_L"]
    inside = np.argwhere(mask)
    rng = np.random.default_rng(0)
    click_s, changed = [], []
    for _ in range(args.runs):
        point = inside[rng.integers(len(inside))] + rng.integers(-6, 7, size=3) * (1, 1, 0)
        point = np.clip(point, 0, np.asarray(ct.shape) - 1)
        t = time.perf_counter()
        out = refiner(ct, affine, mask, point[None], np.zeros((0, 3), np.int64))
        click_s.append(time.perf_counter() - t)
        changed.append(int((out != mask).sum()))
    load = os.getloadavg()[0]
    print(f"CT {ct.shape} ({np.round(np.linalg.norm(affine[:3, :3], axis=0), 2).tolist()} mm), {args.threads} torch threads, "
          f"load average {load:.1f}; refiner: {which}")
    print("| what | median (s) | runs (s) |")
    print("| --- | --- | --- |")
    print(f"| automatic contour (oar, Contourer on the file) | {statistics.median(auto_s):.2f} | {', '.join(f'{s:.2f}' for s in auto_s)} |")
    print(f"| one click (Refiner, Parotid_L) | {statistics.median(click_s):.2f} | {', '.join(f'{s:.2f}' for s in click_s)} |")
    print(f"voxels changed per click: {changed}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
