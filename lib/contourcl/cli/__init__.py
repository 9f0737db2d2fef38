"""The ``contourcl`` command line.

Each subcommand is a thin module of this package, ``add_arguments(parser)`` and ``run(args)``
calling the library; this file only dispatches, and imports only the module of the command that
runs. A command's input error (``ValueError``, which includes
:class:`contourcl.errors.ContourCLError`, or ``FileNotFoundError``) is printed as one line,
``contourcl <command>: error: <message>``, with exit code 2 (its traceback with ``-v``); any other
exception keeps its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

#: subcommand -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "phantoms": ("contourcl.cli.phantoms", "write synthetic head-and-neck CT phantoms (a MONAI Label studies folder)"),
    "finetune": ("contourcl.cli.finetune", "fine-tune the oar or gtv model on labeled CT"),
    "pretrain": ("contourcl.cli.pretrain", "contrastive pretraining of the encoder on unlabeled CT"),
    "contour": ("contourcl.cli.contour", "contour one CT (a volume file or a DICOM series) with a model file: label map, RT Structure Set, overlay picture"),
    "import-rtstruct": ("contourcl.cli.import_rtstruct", "an RT Structure Set on its DICOM CT series as a ContourCL label map (ROI names mapped to structures)"),
    "evaluate": ("contourcl.cli.evaluate", "Dice, HD95 and surface Dice of a model file on labeled CTs"),
    "benchmark": ("contourcl.cli.benchmark", "benchmarks on real CT: label-efficiency, paired, clinic (a department's learning curve), clicks"),
    "train-refiner": ("contourcl.cli.train_refiner", "train the click-refinement network by simulating a clinician on OpenKBP"),
    "models": ("contourcl.cli.models", "list a served model's history, or restore an earlier version"),
    "effort": ("contourcl.cli.effort", "what the clinicians changed in the server's proposals, per model version (added path length, surface Dice)"),
}


def _chosen_command(argv: list[str]) -> str | None:
    """The subcommand named on the command line (the first word that is not an option), if known."""
    for word in argv:
        if word in ("-h", "--help"):
            return None
        if not word.startswith("-"):
            return word if word in COMMANDS else None
    return None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(prog="contourcl", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    modules = {}
    chosen = _chosen_command(argv)
    for name, (module_name, help_text) in COMMANDS.items():
        if chosen is not None and name != chosen:  # only the command that runs is imported (PyTorch is slow to load)
            sub.add_parser(name, help=help_text, description=help_text)
            continue
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as err:  # a subcommand whose module is not there yet
            if err.name != module_name:
                raise
            continue
        modules[name] = module
        module.add_arguments(sub.add_parser(name, help=help_text, description=help_text))
    # a command that hands its options on to a module of its own (``options``) takes those it does not know
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        if not isinstance(getattr(args, "options", None), list):
            parser.error(f"unrecognized arguments: {' '.join(unknown)}")
        args.options = unknown + args.options
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    try:
        return int(modules[args.command].run(args) or 0)
    except (ValueError, FileNotFoundError) as err:  # input errors (ContourCLError is a ValueError)
        logging.getLogger("contourcl.cli").debug("%s failed", args.command, exc_info=True)
        print(f"contourcl {args.command}: error: {err}", file=sys.stderr)
        return 2
