"""``contourcl models``: list a model's history (published and rejected retrains) or restore one."""

from __future__ import annotations

import argparse
import json

from contourcl.model_store import ModelStore


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model-dir", default="apps/radonc/model", help="the app's model folder")
    parser.add_argument("model", choices=["oar", "gtv"])
    parser.add_argument("--restore", type=int, metavar="VERSION", help="serve this archived version again")


def run(args: argparse.Namespace) -> int:
    store = ModelStore(args.model_dir, args.model)
    if args.restore is not None:
        entry = store.restore(args.restore)
        print(f"{args.model}: now serving version {entry['version']} ({entry['file']}, validation Dice {entry.get('val_dice')})")
        return 0
    for e in store.entries():
        flag = "*" if e.get("served") else " "
        print(f"{flag} v{e['version']:04d}  {e['time']}  Dice {e.get('val_dice')!s:>8.8}  served-before {e.get('served_val_dice')!s:>8.8}  "
              f"{'published' if e.get('published') else 'rejected '}  {e.get('reason') or e.get('origin', '')}")
    if not store.entries():
        print(json.dumps({"served": str(store.served), "history": "none yet (no retraining has run)"}))
    return 0
