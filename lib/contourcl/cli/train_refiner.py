"""``contourcl train-refiner``: train the click-refinement network by simulating a clinician on the
OpenKBP training patients (:mod:`contourcl.training.refine.train`; its options follow the command:
``contourcl train-refiner --help-options``)."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--help-options", action="store_true", help="the training's own options")
    parser.add_argument("options", nargs=argparse.REMAINDER, help="passed to python -m contourcl.training.refine.train")


def run(args: argparse.Namespace) -> int:
    from contourcl.training.refine.train import main

    return main(["--help"] if args.help_options else args.options)
