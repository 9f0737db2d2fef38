"""Pretraining speed on the CPU: SIS region building and training steps per second per method.

Usage::

    python benchmarks/bench_pretrain.py --data ../shared/data/openkbp [--cases 3] [--steps 5] [--batch-size 8] [--workers 2]

Data: the first ``--cases`` CTs of ``--images DIR``, else of ``train-pats/`` in the OpenKBP folder
(``--data DIR`` or the environment variable ``CONTOURCL_OPENKBP``), else synthetic volumes. Prints Markdown tables:

- SIS: slices per second (slices that contain body; SLIC + region index), serial and with
  ``--workers`` processes, median of ``--repeats`` builds without cache;
- training: steps per second of the first stage of every registered method (SepaReg also its
  distillation stage) with the default encoder (ResNet-18, width 32) at 128 x 128, median of
  ``--steps`` timed steps after ``--warmup``; batches come from the method's own dataset
  in the main process (data preparation included).
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from contourcl.data.datasets import find_ct_images, openkbp_root
from contourcl.data.transforms import DEFAULT_SPACING
from contourcl.models.networks import ResNetEncoder
from contourcl.training.pretrain.base import PretrainConfig, RunContext, to_device
from contourcl.training.pretrain.separeg import PAPER_REGION_AREA_MM2, build_region_set
from contourcl.training.pretrain.trainer import available_methods, get_method
from contourcl.training.pretrain.volumes import load_volumes, write_synthetic_cts


def get_volumes(args, tmp: Path):
    """The CTs to time on (module docstring: ``--images``, OpenKBP, else synthetic), loaded and
    preprocessed as pretraining loads them; returns them, what they are, and the seconds taken."""
    openkbp = openkbp_root(args.data, required=False)
    if args.images or openkbp is not None:
        source = args.images or str(openkbp / "train-pats")
        paths = find_ct_images(source)[: args.cases]
        label = f"{len(paths)} case(s) of {source}"
    else:
        paths = write_synthetic_cts(tmp / "synthetic", args.cases, shape=(128, 128, 48))
        label = f"{len(paths)} synthetic 128x128x48 volume(s)"
    t = time.perf_counter()
    vols = load_volumes(paths, cache_dir=tmp / "cache", num_workers=args.workers)
    return vols, label, time.perf_counter() - t


def bench_sis(vols, workers: int, repeats: int, region_area_mm2: float | None = None) -> tuple[float, int, int]:
    """Slices per second of SepaReg's region building; ``region_area_mm2`` None: 32 per slice."""
    times, regions = [], 0
    options = {"pixel_mm": DEFAULT_SPACING, "region_area_mm2": region_area_mm2} if region_area_mm2 else {}
    for _ in range(repeats):
        t = time.perf_counter()
        rs = build_region_set(vols, num_workers=workers, **options)  # no cache_dir: built every time
        times.append(time.perf_counter() - t)
        regions = len(rs)
    slices = len({(int(c), int(z)) for c, z in zip(rs.index["case"], rs.index["slice"], strict=False)})
    return slices / statistics.median(times), slices, regions


def time_stage(stage, args) -> float:
    module = stage.module
    module.train()
    params = [p for p in module.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=1e-3, momentum=0.9)
    loader = torch.utils.data.DataLoader(stage.dataset, batch_size=stage.batch_size or args.batch_size, shuffle=True,
                                         drop_last=True, num_workers=0, collate_fn=stage.collate_fn)
    it = iter(loader)
    times = []
    start = time.perf_counter()
    for i in range(args.warmup + args.steps):
        if len(times) >= 2 and time.perf_counter() - start > args.budget:
            break
        t = time.perf_counter()
        try:
            batch = next(it)
        except StopIteration:
            it = iter(loader)
            batch = next(it)
        loss, _ = module(to_device(batch, torch.device("cpu")))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if i >= args.warmup:
            times.append(time.perf_counter() - t)
    return 1.0 / statistics.median(times)


def label_folder(vols, tmp: Path) -> Path | None:
    """For methods that need labels: ``tmp/labels/<case>.nii.gz`` links to OpenKBP's ``pt_*/oar.nii.gz``."""
    folder = tmp / "labels"
    folder.mkdir(exist_ok=True)
    for v in vols:
        oar = Path(v.path).parent / "oar.nii.gz"
        if oar.is_file() and not (folder / f"{v.case}.nii.gz").exists():
            (folder / f"{v.case}.nii.gz").symlink_to(oar)
    return folder if any(folder.iterdir()) else None


def bench_method(name: str, vols, args, cache: Path, options: dict | None = None) -> list[tuple[str, float]]:
    config = PretrainConfig(method=name, encoder=args.encoder, width=args.width, image_size=args.image_size,
                            batch_size=args.batch_size, num_workers=0, cache_dir=str(cache), iterations=100,
                            options=options or {})
    torch.manual_seed(0)
    method = get_method(name)(ResNetEncoder(args.encoder, args.width), config)
    ctx = RunContext(config, torch.device("cpu"))
    stages = method.stages(vols, ctx)
    first = next(stages)
    rows = [(f"{name} ({first.name})", time_stage(first, args))]
    if name == "separeg":  # the distillation stage, with made-up clusters
        method.clusters = np.arange(len(method.region_set)) % int(method.options["num_clusters"])
        method.region_key = method.region_set.key
        for stage in stages:
            if stage.name == "distill":
                rows.append((f"{name} ({stage.name})", time_stage(stage, args)))
                break
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", help="folder of CTs (default: OpenKBP train-pats if given, else synthetic)")
    p.add_argument("--data", help="the OpenKBP folder (train-pats/, validation-pats/; default: $CONTOURCL_OPENKBP)")
    p.add_argument("--cases", type=int, default=3)
    p.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1))
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--encoder", default="resnet18")
    p.add_argument("--width", type=int, default=32)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: stable figures on a shared machine)")
    p.add_argument("--budget", type=float, default=15.0, help="seconds per stage at most (fewer steps timed)")
    p.add_argument("--methods", nargs="*", help="default: every registered method")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        vols, label, load_s = get_volumes(args, tmp)
        load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
        print(f"# Pretraining benchmark (CPU, {args.threads} torch thread(s), {os.cpu_count()} core(s), load average {load} at start)\n")
        print(f"Data: {label}, loaded and preprocessed in {load_s:.1f} s; torch {torch.__version__}\n")

        print("## SIS region building (SLIC)\n")
        print("| regions | processes | slices/s | slices | regions |\n|---|---|---|---|---|")
        for what, area in ((f"{PAPER_REGION_AREA_MM2:.0f} mm^2 each (default)", PAPER_REGION_AREA_MM2), ("32 per slice (old)", None)):
            for workers in (0, args.workers):
                rate, slices, regions = bench_sis(vols, workers, args.repeats, area)
                print(f"| {what} | {max(1, workers)} | {rate:.1f} | {slices} | {regions} |")

        print(f"\n## Training steps/s ({args.encoder} width {args.width}, {args.image_size}x{args.image_size}, batch {args.batch_size}, "
              f"median of {args.steps} steps)\n")
        print("| method (stage) | steps/s | samples/s |\n|---|---|---|")
        for name in args.methods or available_methods():
            try:
                try:
                    rows = bench_method(name, vols, args, tmp / "cache")
                except Exception as err:  # noqa: BLE001 - a method that needs labels: give OpenKBP's OARs
                    labels = label_folder(vols, tmp) if "label" in str(err) else None
                    if labels is None or "labels" not in get_method(name).default_options:
                        raise
                    rows = [(f"{row}, OAR labels", rate) for row, rate in bench_method(name, vols, args, tmp / "cache", {"labels": str(labels)})]
                for row, rate in rows:
                    print(f"| {row} | {rate:.2f} | {rate * args.batch_size:.1f} |")
            except Exception as err:  # noqa: BLE001 - report and go on with the other methods
                print(f"| {name} | error: {type(err).__name__}: {str(err)[:80]} | |")
            sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
