"""``contourcl train-refiner``: train the click-refinement network by simulating a clinician on the
OpenKBP training patients (:mod:`contourcl.training.refine.train`; its options follow the command:
``contourcl train-refiner --help-options``), each model's clicks with the scope its app config
gives them (``--model-edit-radius``, ``--model-reach``) unless given."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--help-options", action="store_true", help="the training's own options")
    parser.add_argument("options", nargs=argparse.REMAINDER, help="passed to python -m contourcl.training.refine.train")


def run(args: argparse.Namespace) -> int:
    from contourcl.cli.benchmark import with_config_scopes
    from contourcl.training.refine.train import main

    if args.help_options:
        return main(["--help"])
    # each model's clicks trained as the server answers them: its app config's scope
    return main(with_config_scopes(args.options, {"edit_radius_mm": "--model-edit-radius", "reach_mm": "--model-reach"}))
