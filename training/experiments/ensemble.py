"""Several model files' probabilities averaged (an ensemble), against each file alone, scored
through the served path.

    python -m contourcl.training.experiments.ensemble MODEL MODEL [MODEL ...] --data ../shared/data/openkbp/train-pats \
        --ids <ids> [--json [PREFIX]]

Score it on cases none of the models trained on and that are not the final validation (the
`finetune --refit` selections' inner split: ``OUT.state/selected.pt`` of runs with the same
``--val-fraction`` and ``--seed``, and the ids of ``OUT.state/config.json``). Each case's
probabilities come from each file as served (:func:`contourcl.inference.box_probabilities`: the
body's box, the file's flip rule, each slice averaged with its neighbours); the ensemble is their
mean. Each label map is made and scored as ``contourcl evaluate`` does
(:func:`contourcl.inference.label_on_grid`, the first file's largest-component rule; Dice, HD95
and surface Dice at 4 mm on the slices that image the patient). ``--json PREFIX`` writes
``PREFIX-<k>.json`` per file and ``PREFIX-ensemble.json`` in ``contourcl evaluate --json``'s form,
for ``contourcl benchmark paired``; ``--json`` alone writes them to ``results/ensemble/`` (prefix
``results/ensemble/ensemble``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from tqdm import tqdm

from contourcl.data.datasets import labeled_cases
from contourcl.evaluation import evaluation_record, preparation, prepare_cases, summarise
from contourcl.inference import Contourer, box_probabilities, label_on_grid

#: where ``--json`` without a prefix writes (relative to the working folder, the repository root)
DEFAULT_PREFIX = Path("results") / "ensemble" / "ensemble"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+")
    parser.add_argument("--data", required=True)
    parser.add_argument("--ids", required=True, help="comma-separated case ids")
    parser.add_argument("--json", nargs="?", const=str(DEFAULT_PREFIX), metavar="PREFIX",
                        help=f"write PREFIX-<k>.json per file and PREFIX-ensemble.json (PREFIX: {DEFAULT_PREFIX} when left out)")
    args = parser.parse_args()
    if len(args.models) < 2:
        parser.error("give at least two model files")
    contourers = [Contourer(m) for m in args.models]
    loaded = [c.model()[1:] for c in contourers]
    meta = loaded[0][1]
    for path, (_, other) in zip(args.models, loaded, strict=False):
        if preparation(other) != preparation(meta) or dict(other.labels) != dict(meta.labels):
            raise SystemExit(f"{path}: prepared or numbered unlike {args.models[0]} ({preparation(other)} vs {preparation(meta)})")
    keep = contourers[0].keeps_largest_component(meta)
    ids = {i.strip() for i in args.ids.split(",") if i.strip()}
    cases = [c for c in labeled_cases(args.data, meta.model) if str(c["id"]) in ids]
    names = [*(f"{k}" for k in range(len(args.models))), "ensemble"]
    per_case: dict[str, dict] = {n: {} for n in names}
    set_aside = {}
    for case in tqdm(prepare_cases(cases, meta), desc="cases"):
        probs = []
        for network, m in loaded:
            p, box = box_probabilities(network, case.data["image"], m)
            probs.append(p)
        mean = sum(probs) / len(probs)
        for name, p in zip(names, [*probs, mean], strict=False):
            label = case.scored(label_on_grid(p, box, meta, case.data, case.pre, keep))
            per_case[name][case.id] = case.metrics(label, meta.labels)
        if case.set_aside:
            set_aside[case.id] = case.set_aside
    structures = list(meta.labels)
    summaries = {n: summarise([per_case[n]], structures) for n in names}
    print(f"on {len(cases)} cases of {args.data}; Dice, mean over patients")
    for k, path in enumerate(args.models):
        print(f"{k}: {path}")
    print("| structure | " + " | ".join(names) + " |")
    print("|---" * (len(names) + 1) + "|")
    for s in [*structures, "mean"]:
        print(f"| {s} | " + " | ".join(f"{summaries[n][(s, 'dice')]['mean']:.4f}" for n in names) + " |")
    print("| mean surface Dice | " + " | ".join(f"{summaries[n][('mean', 'surface_dice')]['mean']:.4f}" for n in names) + " |")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        for name in names:
            source = args.models[int(name)] if name != "ensemble" else " + ".join(args.models)
            with open(f"{args.json}-{name}.json", "w") as f:
                json.dump(evaluation_record(source, args.data, per_case[name], structures, set_aside=set_aside), f, indent=1)


if __name__ == "__main__":
    main()
