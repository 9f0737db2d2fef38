"""The ``contourcl`` command line.

Each subcommand lives in the module that does the work and exposes ``add_arguments(parser)``
and ``run(args)``; this file only dispatches.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

#: subcommand -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "phantoms": ("contourcl.phantom_cli", "write synthetic head-and-neck CT phantoms (a MONAI Label studies folder)"),
    "finetune": ("contourcl.training.finetune_cli", "fine-tune the oar or gtv model on labeled CT"),
    "pretrain": ("contourcl.training.pretrain", "contrastive pretraining of the encoder on unlabeled CT"),
    "contour": ("contourcl.contour_cli", "contour one CT with a model file (label map, optional overlay picture)"),
    "evaluate": ("contourcl.evaluate_cli", "Dice, HD95 and surface Dice of a model file on labeled CTs"),
    "benchmark": ("contourcl.training.label_efficiency", "benchmarks on real CT: label-efficiency (pretraining methods vs labeled cases, OpenKBP)"),
    "models": ("contourcl.models_cli", "list a served model's history, or restore an earlier version"),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="contourcl", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    modules = {}
    for name, (module_name, help_text) in COMMANDS.items():
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as err:  # a subcommand whose module is not there yet
            if err.name != module_name:
                raise
            continue
        modules[name] = module
        module.add_arguments(sub.add_parser(name, help=help_text, description=help_text))
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    return int(modules[args.command].run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
