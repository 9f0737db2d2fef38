"""``contourcl benchmark label-efficiency``: pretraining methods against the number of labeled cases
(:mod:`contourcl.training.experiments.label_efficiency`); ``contourcl benchmark paired``: two model
files' ``contourcl evaluate --json`` figures on the same cases, paired by patient
(:func:`contourcl.training.experiments.paired.compare_evaluations`); ``contourcl benchmark clinic``: a
department's learning curve replayed through the real server (:mod:`contourcl.serving.clinic`);
``contourcl benchmark clicks``: Dice after simulated clicks (:mod:`contourcl.training.refine.benchmark`);
``contourcl benchmark pretrained-init``: the shipped recipe from pretraining checkpoints against random
init (:mod:`contourcl.training.experiments.pretrained_init`)."""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

from contourcl.cli.pretrain import parse_option
from contourcl.data.datasets import openkbp_root
from contourcl.evaluation import DEFAULT_TOLERANCE_MM
from contourcl.serving.config import default_largest_component
from contourcl.training.experiments.label_efficiency import (
    DEFAULT_METHODS,
    METHODS,
    MODELS,
    SCALES,
    Scale,
    plan,
    run_benchmark,
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="benchmark", required=True, metavar="BENCHMARK")
    p = sub.add_parser("label-efficiency", help="pretraining methods vs number of labeled cases, on OpenKBP")
    p.add_argument("--data", help="the OpenKBP folder (train-pats/, validation-pats/; default: $CONTOURCL_OPENKBP)")
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
    p.add_argument("--pretrain-seeds", type=int, default=1,
                   help="pretrain each method with this many seeds (each counted as a unit in the intervals; default %(default)s)")
    p.add_argument("--pretrain-seed-sizes", type=int, nargs="+", default=[1],
                   help="the numbers of labeled cases whose cells use the extra pretraining seeds (default: 1)")
    p.add_argument("--report-only", action="store_true", help="only rebuild the tables, plots and overlays from finished runs")
    p.add_argument("--rescore", action="store_true",
                   help="run nothing new: score the finished runs scored before the masked-slice rule again from their saved "
                        "models (resumable), then rebuild the report")
    q = sub.add_parser("paired", help="A minus B, paired by patient: two `contourcl evaluate --json` files of the same cases")
    q.add_argument("a", type=Path, help="evaluate --json of model A")
    q.add_argument("b", type=Path, help="evaluate --json of model B (the reference)")
    q.add_argument("--metric", choices=("dice", "surface_dice", "hd95"), default="dice")
    c = sub.add_parser("clinic", help="a department's learning curve: the validation patients in order through the real server, "
                                      "correction effort per patient, retraining every k finals")
    c.add_argument("--data", help="the OpenKBP folder (validation-pats/ is replayed; default: $CONTOURCL_OPENKBP)")
    c.add_argument("--out", default="results/clinic", help="results folder (finished arms are kept and not run again)")
    c.add_argument("--app", default="apps/radonc", help="the app whose served model starts the replay (copied; never changed)")
    c.add_argument("--model", default="oar", help="the model to replay (default %(default)s)")
    c.add_argument("--departments", nargs="+", choices=("openkbp", "shifted"), default=["openkbp", "shifted"])
    c.add_argument("--every", type=int, default=5, help="retrain after every K final labels (default %(default)s)")
    c.add_argument("--until", type=int, help="no retrain after N finals (default: retrain to the end)")
    c.add_argument("--max-epochs", type=int, help="the retrain request's max_epochs (default: the server's)")
    c.add_argument("--lr", type=float, help="the retrain request's lr (default: the server's)")
    c.add_argument("--limit", type=int, help="only the first N patients (a quick check)")
    c.add_argument("--last", type=int, default=10, help="patients compared at the end (default %(default)s)")
    c.add_argument("--work", help="where the servers' copies of the app and studies go (default: a temporary folder, removed)")
    c.add_argument("--report-only", action="store_true", help="only rebuild the table and plot from the finished arms")
    i = sub.add_parser("pretrained-init", help="the shipped recipe's first stage from random init and from pretraining checkpoints, "
                                              "paired by patient on its inner validation split (issue 32)")
    i.add_argument("--data", help="the OpenKBP folder (its train-pats/ is used; default: $CONTOURCL_OPENKBP)")
    i.add_argument("--encoder", action="append", default=[], metavar="NAME=CKPT",
                   help="a pretraining checkpoint (contourcl pretrain --out) and the arm's name; repeatable")
    i.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    i.add_argument("--out", default="results/pretrained-init", help="results folder (finished arms are kept and not run again)")
    i.add_argument("--jobs", type=int, default=1, help="arms trained at a time (default %(default)s)")
    i.add_argument("--threads", type=int, default=2, help="torch threads per arm (default %(default)s)")
    i.add_argument("--set", action="append", default=[], type=parse_option, metavar="KEY=VALUE",
                   help="a recipe option changed (e.g. epochs=1: a quick check)")
    i.add_argument("--report-only", action="store_true", help="only rebuild the report from the finished arms")
    k = sub.add_parser("clicks", help="Dice, surface Dice and HD95 after 0-10 simulated clicks per structure: the refinement "
                                      "network against the automatic contour and the plain edit")
    k.add_argument("--help-options", action="store_true", help="the benchmark's own options")
    k.add_argument("options", nargs=argparse.REMAINDER, help="passed to python -m contourcl.training.refine.benchmark")


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


def paired(args: argparse.Namespace) -> int:
    from contourcl.training.experiments.paired import compare_evaluations

    runs = []
    for path in (args.a, args.b):
        try:
            runs.append(json.loads(path.read_text()))
        except (OSError, ValueError) as err:
            raise SystemExit(f"cannot read {path} as `contourcl evaluate --json` output: {err}") from err
        if not isinstance(runs[-1], dict) or not isinstance(runs[-1].get("cases"), dict):
            raise SystemExit(f"{path} is not `contourcl evaluate --json` output (no per-case figures)")
    rows = compare_evaluations(*runs, metric=args.metric)
    if not rows:
        raise SystemExit(f"{args.a} and {args.b} share no scored case")
    print(f"{args.metric}: A = {runs[0].get('model', args.a)}, B = {runs[1].get('model', args.b)}; "
          "A - B paired by patient, 95 % bootstrap interval over patients, Wilcoxon signed-rank p")
    print("| structure | A - B | 95 % CI | Wilcoxon p | patients |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['scope']} | {r['difference']:+.3f} | [{r['ci_low']:+.3f}, {r['ci_high']:+.3f}] | {r['p_wilcoxon']:.2g} | {r['patients']} |")
    return 0


def pretrained_init(args: argparse.Namespace) -> int:
    import sys

    from contourcl.training.experiments.pretrained_init import run_benchmark as run_arms

    encoders = {}
    for item in args.encoder:
        name, sep, path = (part.strip() for part in item.partition("="))
        if not sep or not name or not path:
            raise SystemExit(f"--encoder {item!r}: write NAME=CKPT")
        if not Path(path).is_file():
            raise SystemExit(f"--encoder {name}={path}: no such checkpoint")
        encoders[name] = path
    overrides = dict(args.set)  # (key, value) pairs, parsed as contourcl pretrain's --set
    command = "contourcl " + " ".join(sys.argv[1:])
    try:
        path = run_arms(openkbp_root(args.data), Path(args.out), encoders, args.models, args.jobs, args.threads, overrides, command,
                        args.report_only)
    except ValueError as err:
        raise SystemExit(str(err)) from err
    print(path.read_text())
    return 0


def clinic(args: argparse.Namespace) -> int:
    import tempfile

    from contourcl.serving.clinic import report, run_clinic

    out = Path(args.out)
    if args.report_only:
        paths = report(out, args.last)
    else:
        request = {k: v for k, v in (("max_epochs", args.max_epochs), ("lr", args.lr)) if v is not None}
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="contourcl-clinic-") as tmp:
            work = Path(args.work) if args.work else Path(tmp)
            paths = run_clinic(openkbp_root(args.data), out, Path(args.app), work, args.model, args.departments, args.every, request,
                               args.limit, args.last, args.until)
    print("\n".join(str(p) for p in paths))
    return 0


def with_config_scopes(options: list[str], flags: dict[str, str]) -> list[str]:
    """``options`` with how far each model's clicks act, from the app's model configs as the server
    reads them (:class:`contourcl.refine.encoding.ClickScope`), for each field's option in
    ``flags`` (``{"edit_radius_mm": "--edit-radius", ...}``) not already given."""
    from contourcl.refine.encoding import scope_options
    from contourcl.serving.config import app_configs, resolve_app

    texts = scope_options({name: c.click_scope for name, c in app_configs(resolve_app(None)).items()})
    out = list(options)
    for field, flag in flags.items():
        if field in texts and not any(o == flag or o.startswith(flag + "=") for o in options):
            out += [flag, texts[field]]
    return out


def clicks_options(options: list[str]) -> list[str]:
    """The click benchmark's options, with each model's edit radius and reach from the app's model
    configs (``--edit-radius``, ``--reach``) unless given."""
    return with_config_scopes(options, {"edit_radius_mm": "--edit-radius", "reach_mm": "--reach"})


def run(args: argparse.Namespace) -> int:
    if args.benchmark == "paired":
        return paired(args)
    if args.benchmark == "clinic":
        return clinic(args)
    if args.benchmark == "clicks":
        from contourcl.training.refine.benchmark import main

        return main(["--help"] if args.help_options else clicks_options(args.options))
    if args.benchmark == "pretrained-init":
        return pretrained_init(args)
    scale = scale_from_args(args)
    models = args.models or list(scale.models or MODELS)
    methods = args.methods or list(scale.methods or DEFAULT_METHODS)
    rules = {m: default_largest_component(m) for m in models}
    p = plan(str(openkbp_root(args.data)), args.out, scale, models, methods, args.tolerance, args.seed, args.device, rules,
             args.pretrain_seeds, tuple(args.pretrain_seed_sizes))
    paths, failed = run_benchmark(p, args.jobs, args.threads, args.report_only, args.rescore)
    print("\n".join(str(x) for x in paths))
    if failed:
        print(f"{len(failed)} run(s) failed or were skipped: {', '.join(failed)}")
        return 1
    return 0
