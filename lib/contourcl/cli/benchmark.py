"""``contourcl benchmark label-efficiency``: pretraining methods against the number of labeled cases
(:mod:`contourcl.training.experiments.label_efficiency`)."""

from __future__ import annotations

import argparse
from dataclasses import replace

from contourcl.evaluation import DEFAULT_TOLERANCE_MM
from contourcl.serving.config import default_largest_component
from contourcl.training.experiments.label_efficiency import DEFAULT_METHODS, METHODS, MODELS, SCALES, Scale, plan, run_benchmark


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="benchmark", required=True, metavar="BENCHMARK")
    p = sub.add_parser("label-efficiency", help="pretraining methods vs number of labeled cases, on OpenKBP")
    p.add_argument("--data", default="../shared/data/openkbp", help="the OpenKBP folder (train-pats/, validation-pats/)")
    p.add_argument("--out", default="results/label-efficiency", help="results folder (runs are resumed from it)")
    p.add_argument("--scale", choices=sorted(SCALES), default="cpu", help="cpu (default, 2 cores), gpu (the oar table in minutes on one GPU) or paper (the seeds' sizes, GPU)")
    p.add_argument("--models", nargs="+", choices=MODELS, help="default: the scale's (both for cpu and paper)")
    p.add_argument("--methods", nargs="+", choices=sorted(METHODS), help=f"default: the scale's ({' '.join(DEFAULT_METHODS)} for cpu and paper)")
    p.add_argument("--sizes", nargs="+", type=int, help="numbers of labeled cases (default: the scale's, 1 5 20 for cpu)")
    p.add_argument("--draws", nargs="+", type=int,
                   help="random draws of the labeled cases: one number for every size, or one per size (default: the scale's, 5 5 3 for cpu)")
    p.add_argument("--pool", type=int, help="training CTs for pretraining (default: the scale's; 0: all)")
    p.add_argument("--pretrain-iterations", type=int, help="override the scale's pretraining steps (per method, in total)")
    p.add_argument("--finetune-steps", type=int, help="override the scale's fine-tuning steps")
    p.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE_MM, help="surface Dice tolerance in mm (default %(default)s)")
    p.add_argument("--jobs", type=int, default=None, help="runs in parallel (default: CPU cores on CPU, 1 on a GPU)")
    p.add_argument("--threads", type=int, default=None, help="torch threads per run (default: cores / jobs)")
    p.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--report-only", action="store_true", help="only rebuild the tables, plots and overlays from finished runs")


def scale_from_args(args: argparse.Namespace) -> Scale:
    s = SCALES[args.scale]
    overrides = {}
    if args.sizes:
        overrides["sizes"] = tuple(args.sizes)
        if not args.draws and not isinstance(s.draws, int):  # the scale's draws for the sizes it knows
            overrides["draws"] = tuple(s.draws_for(n) if n in s.sizes else max(s.draws) for n in args.sizes)
    if args.draws:
        sizes = overrides.get("sizes", s.sizes)
        if len(args.draws) not in (1, len(sizes)):
            raise SystemExit(f"--draws: give one number, or one per size ({len(sizes)})")
        overrides["draws"] = args.draws[0] if len(args.draws) == 1 else tuple(args.draws)
    if args.pool is not None:
        overrides["pool"] = args.pool or None
    if args.pretrain_iterations:
        overrides["pretrain_iterations"] = args.pretrain_iterations
    if args.finetune_steps:
        overrides["finetune_steps"] = args.finetune_steps
    return replace(s, **overrides)


def run(args: argparse.Namespace) -> int:
    scale = scale_from_args(args)
    models = args.models or list(scale.models or MODELS)
    methods = args.methods or list(scale.methods or DEFAULT_METHODS)
    rules = {m: default_largest_component(m) for m in models}
    p = plan(args.data, args.out, scale, models, methods, args.tolerance, args.seed, args.device, rules)
    paths, failed = run_benchmark(p, args.jobs, args.threads, args.report_only)
    print("\n".join(str(x) for x in paths))
    if failed:
        print(f"{len(failed)} run(s) failed or were skipped: {', '.join(failed)}")
        return 1
    return 0
