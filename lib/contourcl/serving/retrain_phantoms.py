"""How far retraining adapts a served model to the sample data's phantoms, epoch by epoch.

Usage::

    python -m contourcl.serving.retrain_phantoms --model apps/radonc/model/oar.pt --epochs 4

What ``tests/integration/test_app_e2e.py`` does through the server, without it: the sample data's three
labeled phantoms plus one more, labeled with its truth (as the test submits it), retrained with
:func:`contourcl.serving.retrain.retrain` from ``--model`` (the app's retraining, its quality
gate and model store). Each of the three unlabeled phantoms is the newly labeled one in turn; the
store puts it in validation. Prints the gate's Dice of the served model, every epoch's validation
Dice and the candidate's gate Dice. ``--reinit-head`` re-initialises the output layer first (the
end-to-end test's setup before 2026-11-27).

A model-quality analysis of the serving layer's retraining, not a timing: it lives here rather than
in ``contourcl.training.experiments`` (where the other analyses are) because
``contourcl.training`` must not import ``contourcl.serving`` (``tests/unit/test_architecture.py``).
"""

from __future__ import annotations

import argparse
import logging
import shutil
import tempfile
from pathlib import Path

import nibabel as nib
import torch

from contourcl.data.datasets import labeled_cases
from contourcl.data.phantom import make_phantom
from contourcl.models.checkpoint import load_model, save_model
from contourcl.serving.model_store import ModelStore
from contourcl.serving.retrain import retrain
from contourcl.testing import REPO


def run(model_file: Path, new_case: str, request: dict, reinit_head: bool) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        studies = Path(tmp) / "studies"
        shutil.copytree(REPO / "sample-data", studies, ignore=shutil.ignore_patterns("datastore_v2.json", ".lock", "README.md", ".contourcl"))
        image = nib.load(studies / f"{new_case}.nii.gz")
        spacing = tuple(float(z) for z in image.header.get_zooms())
        truth = make_phantom(int(new_case.rsplit("_", 1)[1]), shape=image.shape, spacing=spacing)[1]
        nib.save(nib.Nifti1Image(truth, image.affine), str(studies / "labels" / "final" / f"{new_case}.nii.gz"))
        store = ModelStore(Path(tmp) / "model", "oar", min_gate_cases=1)  # as the test's server: one validation phantom
        store.served.parent.mkdir(parents=True)
        network, meta = load_model(model_file)
        if reinit_head:
            torch.manual_seed(0)
            network.head[0].reset_parameters()
        save_model(store.served, network, meta)
        return retrain("oar", labeled_cases(studies, "oar"), store, request)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, action="append", required=True, help="an oar model file (repeatable)")
    parser.add_argument("--epochs", type=int, default=4, help="max_epochs of the retraining request (the test's: 4)")
    parser.add_argument("--lr", type=float, default=1e-3, help="lr of the retraining request (the test's: 1e-3)")
    parser.add_argument("--reinit-head", action="store_true", help="re-initialise the output layer before retraining")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="    %(message)s")
    logging.getLogger("contourcl.serving.retrain").setLevel(logging.WARNING)
    request = {"max_epochs": args.epochs, "lr": args.lr, "samples_per_volume": 16}
    print(f"request {request}{', output layer re-initialised' if args.reinit_head else ''}")
    for model_file in args.model:
        for new_case in ("synthetic_hn_003", "synthetic_hn_004", "synthetic_hn_005"):
            print(f"{model_file}  validation: {new_case}")
            entry = run(model_file, new_case, request, args.reinit_head)
            print(f"  served {entry['served_val_dice']:.3f}  candidate {entry['val_dice']:.3f} (epoch {entry['best_epoch']})  "
                  f"published {entry['published']}  {entry['seconds']:.0f} s")


if __name__ == "__main__":
    main()
