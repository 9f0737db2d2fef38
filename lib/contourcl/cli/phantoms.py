"""``contourcl phantoms``: write synthetic head-and-neck phantoms as a MONAI Label studies folder."""

from __future__ import annotations

import argparse

from contourcl.data.phantom import make_dataset


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="studies folder to write")
    parser.add_argument("--n", type=int, default=6, help="number of cases")
    parser.add_argument("--first-seed", type=int, default=0, help="seed of the first case (case i uses first_seed + i)")
    parser.add_argument("--labeled", type=int, help="how many cases get a final label (default: all)")


def run(args: argparse.Namespace) -> int:
    make_dataset(args.out, args.n, first_seed=args.first_seed, labeled=args.labeled)
    return 0
