"""How much of each structure OpenKBP draws on slices that do not image the patient.

Usage::

    python -m contourcl.training.experiments.masked_slices --data ../shared/data/openkbp

``--data`` names the OpenKBP folder; without it, the environment variable ``CONTOURCL_OPENKBP``.

Per split (``train-pats``, ``validation-pats``): the cases with contours on such slices
(:func:`contourcl.data.volumes.imaged_slices`) and, per structure, the share of its voxels that lie
there and in how many cases. These voxels are neither trained on nor scored.
"""

from __future__ import annotations

import argparse

import numpy as np

from contourcl.data.datasets import labeled_cases, openkbp_or_exit, read_scored_reference
from contourcl.data.labels import model_labels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", help="the OpenKBP folder (train-pats/, validation-pats/; default: $CONTOURCL_OPENKBP)")
    args = parser.parse_args()
    root = openkbp_or_exit(parser, args.data)
    for split in ("train-pats", "validation-pats"):
        for model in ("oar", "gtv"):
            names = list(model_labels(model))
            total = np.zeros(len(names) + 1)
            masked = np.zeros(len(names) + 1)
            cases_with = np.zeros(len(names) + 1, dtype=int)
            any_case = 0
            for case in labeled_cases(root / split, model):
                reference = read_scored_reference(case, model)
                label, kept = reference.full, reference.label
                any_case += bool(np.any(label != kept))
                for k in range(1, len(names) + 1):
                    n_all, n_kept = np.count_nonzero(label == k), np.count_nonzero(kept == k)
                    total[k] += n_all
                    masked[k] += n_all - n_kept
                    cases_with[k] += n_all > n_kept
            print(f"{split}, {model}: {any_case} cases have contours on slices that do not image the patient")
            for k, name in enumerate(names, start=1):
                share = masked[k] / total[k] if total[k] else float("nan")
                print(f"  {name:12s} {share:6.1%} of its voxels, in {cases_with[k]} cases")


if __name__ == "__main__":
    main()
