"""Decision rules on a model's probabilities, scored through the served path: averaging each
slice's probabilities with its neighbours' (none, 1-2-1, or 1-1-1 as served) and, on top of the
served average, each structure's weight on its probability (a bias for or against it; for a
one-target model, its threshold).

    python -m contourcl.training.experiments.decision_rules MODEL --data ../shared/data/openkbp/train-pats --ids <ids>

Score it on cases the model did not train on and that are not the final validation (the `finetune
--refit` selection's inner split: ``OUT.state/selected.pt`` and the ids of ``OUT.state/config.json``).
Each case's probabilities are computed once, without the average; each rule then changes them, and the label map is made
and scored as ``contourcl evaluate`` does (``contourcl.inference.label_on_grid``, Dice and surface Dice
at 4 mm on the slices that image the patient). The weights are chosen structure by structure (one
pass, each structure's own Dice): an optimistic figure, meant to show whether a rule is worth having.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from tqdm import tqdm

from contourcl.data.datasets import labeled_cases
from contourcl.evaluation import case_mean, prepare_cases
from contourcl.inference import Contourer, box_probabilities, label_on_grid, neighbour_average

WEIGHTS = (0.5, 0.7, 1.4, 2.0, 3.0)
SMOOTHING = {"none (each slice its own)": (0.0, 1.0, 0.0), "1-2-1": (1.0, 2.0, 1.0), "1-1-1 (served)": (1.0, 1.0, 1.0)}


def scores(cases, meta, keep: bool, rule) -> dict:
    """``{case id: contour_metrics}`` of the label maps of ``rule(probs)`` for every case (``keep``:
    the model's largest-component rule)."""
    out = {}
    for case, probs, box in cases:
        label = case.scored(label_on_grid(rule(probs), box, meta, case.data, case.pre, keep))
        out[case.id] = case.metrics(label, meta.labels, metrics=("dice", "surface_dice"))
    return out


def weighted(weights: np.ndarray):
    """The rule multiplying each channel by its weight (the probabilities renormalised)."""
    w = torch.as_tensor(weights, dtype=torch.float32)[:, None, None, None]
    return lambda p: (p * w) / (p * w).sum(dim=0, keepdim=True)


def structure_dice(result: dict, name: str) -> float:
    return float(np.nanmean([r[name]["dice"] for r in result.values()]))


def summary(result: dict) -> str:
    return (f"{np.nanmean([case_mean(r, 'dice') for r in result.values()]):.4f} | "
            f"{np.nanmean([case_mean(r, 'surface_dice') for r in result.values()]):.4f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--data", required=True, help="labeled cases (e.g. OpenKBP's train-pats/)")
    parser.add_argument("--ids", required=True, help="comma-separated case ids")
    args = parser.parse_args()
    contourer = Contourer(args.model)
    _, network, meta = contourer.model()
    keep = contourer.keeps_largest_component(meta)
    ids = set(args.ids.split(","))
    prepared = prepare_cases([c for c in labeled_cases(args.data, meta.model) if str(c["id"]) in ids], meta)
    raw = [(c, *box_probabilities(network, c.data["image"], meta, averaged=False)) for c in tqdm(prepared, desc="probabilities")]
    names = list(meta.labels)
    print(f"{args.model} on {len(raw)} cases of {args.data}\n")
    print("| rule | mean Dice | mean surface Dice |\n|---|---|---|")
    for name, kernel in SMOOTHING.items():
        # the rule is used up before the loop moves on, so it sees this kernel
        print(f"| slices averaged {name} | {summary(scores(raw, meta, keep, lambda p: neighbour_average(p, kernel)))} |")  # noqa: B023
    cases = [(c, neighbour_average(p), box) for c, p, box in raw]
    served = scores(cases, meta, keep, lambda p: p)
    weights = np.ones(len(names) + 1)
    rows = []
    for k, name in enumerate(tqdm(names, desc="weights"), start=1):
        best = (structure_dice(served, name), 1.0)
        for w in WEIGHTS:
            trial = weights.copy()
            trial[k] = w
            dice = structure_dice(scores(cases, meta, keep, weighted(trial)), name)
            best = max(best, (dice, w))
        weights[k] = best[1]
        rows.append(f"| {name} | {structure_dice(served, name):.4f} | {best[1]:g} | {best[0]:.4f} |")
    print(f"| served, each structure's best weight ({', '.join(f'{n} {w:g}' for n, w in zip(names, weights[1:], strict=False))}) | "
          f"{summary(scores(cases, meta, keep, weighted(weights)))} |\n")
    print("| structure | Dice as served | best weight (of 1, " + ", ".join(map(str, WEIGHTS)) + ") | Dice with it |\n|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
