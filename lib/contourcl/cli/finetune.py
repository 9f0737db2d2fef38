"""``contourcl finetune``: train the ``oar`` or ``gtv`` model into a model file the app serves."""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
from dataclasses import replace

from contourcl.data.datasets import labeled_cases
from contourcl.errors import ConfigError
from contourcl.models.checkpoint import load_model
from contourcl.plots import training_curves
from contourcl.serving.config import check_model_name
from contourcl.training.finetune.engine import FinetuneConfig, FinetuneResult, finetune, following, save_finetuned
from contourcl.training.finetune.refit import select_and_refit
from contourcl.training.recipes import load_recipe

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--recipe", help="a recipe: a shipped one by name (oar, gtv: the shipped weights' settings) or a .yaml file; "
                        "options given here win over it (contourcl.training.recipes)")
    parser.add_argument("--model", help="a model of the app (oar, gtv, or one its lib/configs/ adds); required unless the recipe names it")
    parser.add_argument("--app", help="the app folder whose models and rules to use (default: the app shipped with the package)")
    parser.add_argument("--data", required=True, help="a MONAI Label studies folder (labels/final) or OpenKBP's train-pats")
    parser.add_argument("--val-data", help="validation cases (same layouts); default: a fraction of --data")
    parser.add_argument("--val-fraction", type=float, default=0.2, help="without --val-data: this fraction of --data validates (0: none; the last epoch is kept)")
    parser.add_argument("--max-cases", type=int, help="use only this many training cases (drawn with --seed)")
    parser.add_argument("--out", required=True, help="model file to write (e.g. apps/radonc/model/oar.pt)")
    parser.add_argument("--init", help="pretraining checkpoint for the encoder (contourcl pretrain --out)")
    parser.add_argument("--start-from", help="continue from this model file (e.g. the shipped apps/radonc/model/oar.pt); its network and preprocessing are kept")
    parser.add_argument("--encoder", default="resnet18", choices=["resnet10", "resnet18", "resnet34", "resnet50"])
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=50)
    parser.add_argument("--steps-per-epoch", type=int, help="fixed optimisation steps per epoch, cases drawn with replacement (default: one pass over the cases)")
    parser.add_argument("--roi", type=int, default=128, help="side of the training slices, a multiple of 32 (default %(default)s)")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--samples-per-volume", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--voxel-siamese", action="store_true", help="add the voxel-level Siamese auxiliary loss")
    parser.add_argument("--voxel-siamese-lambda", type=float, default=0.3, help="weight of the feature loss (default %(default)s; the paper's 10 collapsed fine-tuning here)")
    parser.add_argument("--agcl-encoder", help="AGCL's fine-tuning variant: the 2-channel AGCL checkpoint (CKPT.2ch.pt of contourcl pretrain agcl); trains one ASPP head per structure on the frozen encoder")
    parser.add_argument("--coarse-model", help="with --agcl-encoder: the model file whose predictions are the coarse masks at validation (e.g. apps/radonc/model/oar.pt)")
    parser.add_argument("--spacing", type=float, help="in-plane voxel size the network works at, mm (default 4.0; finer costs (4/mm)^2 the compute)")
    parser.add_argument("--context", type=int, default=0,
                        help="2.5D: this many neighbouring slices on each side as input channels (default 0: 2D); a 2D pretraining checkpoint's first convolution is inflated")
    parser.add_argument("--deep-supervision", type=int, default=0, metavar="LEVELS",
                        help="deep supervision: a loss on this many coarser decoder outputs too, weighted 1/2, 1/4, ... (default 0: none; training only)")
    parser.add_argument("--ce-weight", type=float, default=0.1,
                        help="weight of the cross-entropy beside the Dice in the marginal loss (default %(default)s)")
    parser.add_argument("--half", action="store_true", help="store float16 weights (half the file size)")
    parser.add_argument("--val-interval", type=int, default=1, help="validate every this many epochs (default %(default)s)")
    parser.add_argument("--warmup-steps", type=int, default=0, help="linear learning-rate warm-up before the cosine decay (default %(default)s)")
    parser.add_argument("--ema", type=float, help="keep an exponential moving average of the weights with this decay (e.g. 0.999)")
    parser.add_argument("--tta-flip", choices=["off", "on", "auto"], default="off",
                        help="left-right flip test-time augmentation; auto: chosen on the validation cases (default %(default)s)")
    parser.add_argument("--refit", action="store_true",
                        help="choose epochs, average and flip on the validation split, then train again on every case with those choices "
                             "(resumable: the state is kept in OUT.state/; run the same command again to resume)")
    parser.add_argument("--state", help="resumable training state file (default with --refit: OUT.state/)")
    _DEFAULTS.update({a.dest: a.default for a in parser._actions if a.dest != "help"})


#: the options' defaults, to tell what the command line set from what a recipe may set
_DEFAULTS: dict = {}
#: what a recipe may not hold: they depend on the machine
_NOT_IN_RECIPES = ("data", "val_data", "out", "state", "recipe", "app")


def apply_recipe(args: argparse.Namespace) -> argparse.Namespace:
    """``args`` with ``--recipe``'s options filled in where the command line left the default."""
    if not args.recipe:
        return args
    recipe = load_recipe(args.recipe)
    unknown = sorted(k for k in recipe if k not in _DEFAULTS or k in _NOT_IN_RECIPES)
    if unknown:
        raise ValueError(f"recipe {args.recipe}: {unknown} are not recipe options (the data and output files go on the command line)")
    for key, value in recipe.items():
        if getattr(args, key) == _DEFAULTS[key]:
            setattr(args, key, value)
    return args


def run(args: argparse.Namespace) -> int:
    args = apply_recipe(args)
    if not args.model:
        raise ValueError("--model is required (or a --recipe that names it)")
    config = check_model_name(args.model, args.app)  # the app's models (and any it adds) are known from here on
    cases = labeled_cases(args.data, args.model)
    if args.val_data:
        train, val = cases, labeled_cases(args.val_data, args.model)
    else:
        shuffled = cases[:]
        random.Random(args.seed).shuffle(shuffled)
        n_val = max(1, round(args.val_fraction * len(cases))) if len(cases) > 1 and args.val_fraction > 0 else 0
        val, train = shuffled[:n_val], shuffled[n_val:]
    if args.max_cases:
        train = sorted(random.Random(args.seed).sample(train, min(args.max_cases, len(train))), key=lambda c: c["id"])
    logger.info("%s: %d training cases, %d validation cases", args.model, len(train), len(val))
    cfg = replace(
        FinetuneConfig(model=args.model), net={"encoder": args.encoder, "width": args.width}, max_epochs=args.epochs,
        steps_per_epoch=args.steps_per_epoch, roi=(args.roi, args.roi),
        lr=args.lr, batch_size=args.batch_size, samples_per_volume=args.samples_per_volume, seed=args.seed, init=args.init,
        voxel_siamese=args.voxel_siamese, voxel_siamese_lambda=args.voxel_siamese_lambda,
        largest_component=config.largest_component, val_interval=args.val_interval, warmup_steps=args.warmup_steps,
        ema=args.ema, tta_flip={"off": False, "on": True, "auto": None}[args.tta_flip], context=args.context,
        deep_supervision=args.deep_supervision, ce_weight=args.ce_weight,
    )
    if args.spacing:
        cfg = replace(cfg, spacing=(args.spacing, args.spacing))
    provenance = dict(
        data=str(args.data), train_ids=[c["id"] for c in train], val_ids=[c["id"] for c in val],
        command="contourcl finetune " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if v not in (None, False) and k not in ("command", "verbose")),
    )
    best = {"dice": -1.0}

    def keep_best(record: dict, network) -> None:
        """Write the model file whenever validation improves, so an interrupted run leaves its best."""
        if record.get("val_dice", -1.0) > best["dice"]:
            best["dice"] = record["val_dice"]
            partial = FinetuneResult(network, record["val_dice"], record["epoch"], record["per_structure"], [], 0.0)
            save_finetuned(args.out, cfg, partial, half=args.half, **provenance, interrupted_at_epoch=record["epoch"])

    if args.agcl_encoder:
        return _run_agcl(args, train, val, cfg)
    if args.refit:
        if args.start_from:
            raise ConfigError("--refit trains a new network; it cannot --start-from a model file")
        summary = select_and_refit(train, val, cfg, args.out, args.state or str(args.out) + ".state", half=args.half, **provenance)
        curve = training_curves(summary.pop("history"), str(args.out) + ".curves.png", title=f"{args.model}: selection on {len(train)} cases, {len(val)} held out")
        print(json.dumps({**summary, "curves": str(curve)}, indent=1))
        return 0
    start = None
    if args.start_from:
        start, meta = load_model(args.start_from)
        if meta.model != args.model:
            raise SystemExit(f"--start-from {args.start_from} is a {meta.model} model, not {args.model}")
        cfg = following(cfg, meta)
        provenance["started_from"] = str(args.start_from)
    result = finetune(train, val, cfg, start_from=start, on_epoch=keep_best, state_path=args.state)
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun only the first process writes
        return 0
    save_finetuned(args.out, cfg, result, half=args.half, **provenance)
    curve = training_curves(result.history, str(args.out) + ".curves.png", title=f"{args.model}: {len(train)} training cases")
    print(json.dumps({"out": args.out, "val_dice": result.best_dice, "best_epoch": result.best_epoch, "per_structure": result.per_structure,
                      "tta_flip": result.tta_flip, "choices": result.choices, "seconds": round(result.seconds, 1), "curves": str(curve)}, indent=1))
    return 0


def _run_agcl(args: argparse.Namespace, train: list[dict], val: list[dict], cfg: FinetuneConfig) -> int:
    """``--agcl-encoder``: AGCL's frozen-encoder, per-structure ASPP variant (not served by the app)."""
    from contourcl.training.finetune.agcl_segmenter import finetune_agcl, save_agcl

    if not args.coarse_model:
        raise SystemExit("--agcl-encoder needs --coarse-model (the model whose predictions give the coarse masks)")
    result = finetune_agcl(train, val, args.agcl_encoder, args.coarse_model, cfg)
    save_agcl(args.out, args.model, result, args.agcl_encoder, args.coarse_model)
    print(json.dumps({"out": args.out, "per_structure": result.val_dice, "seconds": round(result.seconds, 1)}, indent=1))
    return 0
