"""``contourcl pretrain METHOD``: contrastive pretraining of the encoder on unlabeled CT.

Settings come from ``--config FILE`` (YAML or JSON), overridden by the options given; the run is
:func:`contourcl.training.pretrain.trainer.pretrain`. Under ``torchrun`` (DDP) the process group
is closed at the end.
"""

from __future__ import annotations

import argparse
from typing import Any

from contourcl.models.networks import RESNET_SPECS
from contourcl.training.distributed import close_distributed, is_main_process
from contourcl.training.pretrain.base import ConfigError, PretrainConfig, merge_settings, read_config_file
from contourcl.training.pretrain.trainer import available_methods, get_method, pretrain


def parse_option(text: str) -> tuple[str, Any]:
    """A ``--set KEY=VALUE`` option (here and in ``contourcl benchmark pretrained-init``): the key
    with ``-`` written ``_``, the value read as YAML (``3`` a number, ``true`` a flag)."""
    import yaml

    if "=" not in text:
        raise argparse.ArgumentTypeError(f"--set expects KEY=VALUE, not {text!r}")
    key, value = text.split("=", 1)
    return key.strip().replace("-", "_"), yaml.safe_load(value)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("method", nargs="?", metavar="METHOD", help=f"pretraining method: {', '.join(available_methods())}")
    parser.add_argument("--images", nargs="+", metavar="DIR", help="CT images: files, folders of *.nii.gz, or folders of case folders (OpenKBP pt_*/ct.nii.gz)")
    parser.add_argument("--out", metavar="CKPT", help="encoder checkpoint to write (the training state goes to CKPT.state.pt)")
    parser.add_argument("--config", metavar="FILE", help="YAML/JSON file of settings (command-line options win)")
    parser.add_argument("--iterations", type=int, help="optimisation steps of the whole run (SepaReg splits them over its stages)")
    parser.add_argument("--batch-size", type=int, help="batch size per process")
    parser.add_argument("--encoder", choices=sorted(RESNET_SPECS), help="encoder depth (default resnet18)")
    parser.add_argument("--width", type=int, help="encoder width (64: standard ResNet; default 32)")
    parser.add_argument("--image-size", type=int, help="side of the square inputs (default 128)")
    parser.add_argument("--spacing", type=float, metavar="MM",
                        help="in-plane voxel size of the inputs (default 4; the fine-tuning that loads the encoder should see the same: 3 for the shipped recipes)")
    parser.add_argument("--lr", type=float, help="learning rate (default: the method's)")
    parser.add_argument("--optimizer", choices=["sgd", "adam", "adamw"])
    parser.add_argument("--checkpoint-every", type=int, help="steps between training-state checkpoints")
    parser.add_argument("--log-every", type=int)
    parser.add_argument("--num-workers", type=int, help="data loading / preprocessing processes")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--device", help="cuda, cuda:1 or cpu (default: cuda when available)")
    parser.add_argument("--no-amp", dest="amp", action="store_const", const=False, help="no mixed precision on CUDA")
    parser.add_argument("--cache-dir", help="cache of preprocessed volumes and region sets (default ~/.cache/contourcl)")
    parser.add_argument("--max-cases", type=int, help="use only the first N images")
    parser.add_argument("--resume", action="store_true", help="continue the run whose state is CKPT.state.pt")
    parser.add_argument("--stop-after", type=int, metavar="N", help="stop (state saved) after N steps in this call")
    parser.add_argument("--no-progress", dest="progress", action="store_const", const=False, help="no progress bars")
    parser.add_argument("--set", dest="options", action="append", type=parse_option, default=None, metavar="KEY=VALUE",
                        help="method option, e.g. --set num_clusters=5 --set region_mode=resize (repeatable)")


def config_from_args(args: argparse.Namespace) -> PretrainConfig:
    base: dict = read_config_file(args.config) if getattr(args, "config", None) else {}
    overrides = {
        "method": args.method,
        "images": args.images,
        "out": args.out,
        "iterations": args.iterations,
        "batch_size": args.batch_size,
        "encoder": args.encoder,
        "width": args.width,
        "image_size": args.image_size,
        "spacing": (args.spacing, args.spacing) if args.spacing else None,
        "lr": args.lr,
        "optimizer": args.optimizer,
        "checkpoint_every": args.checkpoint_every,
        "log_every": args.log_every,
        "num_workers": args.num_workers,
        "seed": args.seed,
        "device": args.device,
        "amp": args.amp,
        "cache_dir": args.cache_dir,
        "max_cases": args.max_cases,
        "progress": args.progress,
        "options": dict(args.options) if args.options else None,
    }
    merged = merge_settings(base, overrides)
    if not merged.get("method"):
        raise ConfigError("name a METHOD (or 'method:' in the config file)")
    if not merged.get("images"):
        raise ConfigError("--images is required (or 'images:' in the config file)")
    if not merged.get("out"):
        raise ConfigError("--out is required (or 'out:' in the config file)")
    config = PretrainConfig.from_dict(merged)
    get_method(config.method)  # a clear error for an unknown method before loading anything
    return config


def run(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    try:
        result = pretrain(config, resume=args.resume, stop_after=args.stop_after)
        main = is_main_process()  # asked before leaving the group: every process is rank 0 after
    finally:
        close_distributed()
    if result.get("interrupted"):
        return 0
    if main and result.get("meta"):
        print(f"{config.method}: wrote {result['out']} ({result['meta']['iterations']} steps, final loss {result['meta']['final_loss']:.4f})")
    return 0
