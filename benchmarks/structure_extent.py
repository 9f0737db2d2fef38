"""Where along the body axis a model's contour of one structure stops, against the reference's.

Usage::

    python benchmarks/structure_extent.py apps/radonc/model/oar.pt --data ../shared/data/openkbp/validation-pats \
        --structure SpinalCord [--short 10]

For every labeled case that contours the structure: the axial slices it spans in the reference
and in the served label map (:class:`contourcl.inference.Contourer`, the server's path), on the
CT's own grid, on the slices ``contourcl evaluate`` scores (those that image the patient). Prints
each case whose prediction spans more than ``--short`` fewer slices than the reference, and how
many cases do. A low Dice with a large HD95 can be a contour that is right
where it is drawn but stops early; this tells the two apart.
"""

from __future__ import annotations

import argparse
import logging

import numpy as np

from contourcl.data.datasets import labeled_cases
from contourcl.evaluation import prepare_cases
from contourcl.inference import Contourer
from contourcl.models.checkpoint import read_meta


def axial_range(mask: np.ndarray) -> tuple[int, int] | None:
    """First and last index along the last axis (axial slices in RAS) where ``mask`` is set."""
    z = np.nonzero(mask.any(axis=(0, 1)))[0]
    return (int(z[0]), int(z[-1])) if z.size else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model")
    parser.add_argument("--data", required=True)
    parser.add_argument("--structure", default="SpinalCord")
    parser.add_argument("--short", type=int, default=10, help="report predictions this many slices shorter or more")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    meta = read_meta(args.model)
    if args.structure not in meta.labels:
        raise SystemExit(f"{args.model} has no structure {args.structure!r} (it has {', '.join(meta.labels)})")
    value = meta.labels[args.structure]
    contourer = Contourer(args.model)
    rows = []
    for case in labeled_cases(args.data, meta.model):
        (prepared,) = prepare_cases([case], meta)  # as `contourcl evaluate` reads it: the CT's grid, the model's numbering
        ref = axial_range(prepared.reference == value)
        if ref is None:
            continue
        pred = axial_range(prepared.scored(contourer.predict(prepared.data, prepared.pre).label) == value)
        rows.append((prepared.id, ref, pred))
    missing = [(i, r, p) for i, r, p in rows if p is None or (r[1] - r[0]) - (p[1] - p[0]) > args.short]
    print(f"{args.structure}, {args.model} on {args.data}: {len(rows)} cases contour it; in {len(missing)} the prediction "
          f"spans more than {args.short} slices fewer than the reference (or is empty)")
    print("| case | reference slices | predicted slices | missed below | missed above |\n|---|---|---|---|---|")
    for case_id, r, p in missing:
        below = r[1] - r[0] + 1 if p is None else max(0, p[0] - r[0])
        above = 0 if p is None else max(0, r[1] - p[1])
        print(f"| {case_id} | {r[0]}-{r[1]} | {'-' if p is None else f'{p[0]}-{p[1]}'} | {below} | {above} |")


if __name__ == "__main__":
    main()
