"""``contourcl models``: list a model's history (published and rejected retrains) or restore one.

The listing starts with the served file and where its encoder came from (random init, a
pretraining checkpoint with its method, steps, data and sha256, or retraining of an earlier file).

Which model folder: ``--model-dir PATH``, or ``--app PATH`` (the app folder with ``main.py``; its
``model/``, or ``model/NAME`` with ``--weights NAME``). With neither, the repository's
``apps/radonc`` next to the installed ``contourcl`` package (an editable install from ``lib/``),
so the command works from any directory.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from contourcl.ids import check_id
from contourcl.models.checkpoint import describe_encoder, encoder_of_file, trace_retrained
from contourcl.serving.config import check_model_name, resolve_app
from contourcl.serving.model_store import ModelStore


def resolve_model_dir(app: str | Path | None, model_dir: str | Path | None, weights: str | None = None) -> Path:
    """The model folder the command works on (see the module docstring)."""
    if model_dir is not None:
        if weights:
            raise ValueError("--weights goes with --app (or the default app), not with --model-dir")
        folder = Path(model_dir)
        if not folder.is_dir():
            raise FileNotFoundError(f"--model-dir {folder}: no such folder")
        return folder
    app = resolve_app(app)
    folder = app / "model"
    if weights:
        folder = folder / check_id(weights, "--weights")
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such model folder")
    return folder


def served_encoder(store: ModelStore, entries: list[dict]) -> str:
    """Where the served file's encoder came from, in words (issue 32; "" without a readable file)."""
    if not store.served.is_file():
        return ""
    try:
        encoder = trace_retrained(encoder_of_file(store.served), [store.root / e["file"] for e in entries])
    except Exception as err:  # noqa: BLE001 -- the listing must still show the history
        return f"unknown ({type(err).__name__}: {err})"
    return describe_encoder(encoder)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="a model of the app (oar, gtv, or one its lib/configs/ adds)")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--app", metavar="PATH", help="the app folder (with main.py) whose model/ to use; default: the repository's apps/radonc")
    where.add_argument("--model-dir", metavar="PATH", help="the model folder itself (instead of --app)")
    parser.add_argument("--weights", metavar="NAME", help="use the app's model/NAME (as the server's --conf weights NAME)")
    parser.add_argument("--restore", type=int, metavar="VERSION", help="serve this archived version again")


def run(args: argparse.Namespace) -> int:
    folder = resolve_model_dir(args.app, args.model_dir, args.weights)
    if args.model_dir is None:
        check_model_name(args.model, folder.parents[1] if args.weights else folder.parent)
    else:
        check_id(args.model, "model")
    store = ModelStore(folder, args.model)
    if args.restore is not None:
        versions = [e["version"] for e in store.entries()]
        if args.restore not in versions:
            raise ValueError(f"{args.model} has no archived version {args.restore} in {store.root}; versions: {versions or 'none (no retraining has run)'}")
        entry = store.restore(args.restore)
        print(f"{args.model}: now serving version {entry['version']} ({entry['file']}, validation Dice {entry.get('val_dice')}) as {store.served}")
        return 0
    entries = store.entries()
    encoder = served_encoder(store, entries)
    if encoder:
        print(f"{args.model}: served {store.served.name}; encoder: {encoder}")
    for e in entries:
        flag = "*" if e.get("served") else " "
        print(f"{flag} v{e['version']:04d}  {e['time']}  Dice {e.get('val_dice')!s:>8.8}  served-before {e.get('served_val_dice')!s:>8.8}  "
              f"{'published' if e.get('published') else 'rejected '}  {e.get('reason') or e.get('origin', '')}")
    if not entries:
        print(json.dumps({"served": str(store.served), "encoder": encoder or None, "history": "none yet (no retraining has run)"}))
    return 0
