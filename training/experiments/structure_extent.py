"""Where along the body axis a model's contour of one structure stops, against the reference's.

Usage::

    python -m contourcl.training.experiments.structure_extent apps/radonc/model/oar.pt \
        --data ../shared/data/openkbp/validation-pats --structure SpinalCord [--short 10]
    python -m contourcl.training.experiments.structure_extent apps/radonc/model/oar.pt \
        --data ../shared/data/openkbp/validation-pats --summary [--ids pt_1,pt_2]

For every labeled case that contours the structure: the axial slices it spans in the reference
and in the served label map (:class:`contourcl.inference.Contourer`, the server's path), on the
CT's own grid, on the slices ``contourcl evaluate`` scores (those that image the patient). Prints
each case whose prediction spans more than ``--short`` fewer slices than the reference, and how
many cases do. A low Dice with a large HD95 can be a contour that is right
where it is drawn but stops early; this tells the two apart.

``--summary``: for every structure, how much Dice the prediction loses along the body axis, on
slices beyond where the reference draws it. Beside the Dice as scored (``contourcl evaluate``'s):
the Dice of the same label map with each structure cut to the reference's slices (as if every
contour stopped where the reference stops; slices where the prediction stops short stay missed),
and the length along the body axis, in mm, of the reference (median and range over the cases) and
of the prediction (median). Patient-wise means as ``contourcl evaluate`` takes them. The cut
figure is not a model: it lends the prediction the reference's own extent, right or truncated.
"""

from __future__ import annotations

import argparse
import logging

import numpy as np

from contourcl.data.datasets import labeled_cases, only_ids
from contourcl.evaluation import prepare_cases, summarise
from contourcl.inference import Contourer
from contourcl.models.checkpoint import read_meta


def axial_range(mask: np.ndarray) -> tuple[int, int] | None:
    """First and last index along the last axis (axial slices in RAS) where ``mask`` is set."""
    z = np.nonzero(mask.any(axis=(0, 1)))[0]
    return (int(z[0]), int(z[-1])) if z.size else None


def cut_to_reference_extent(label: np.ndarray, reference: np.ndarray, values) -> np.ndarray:
    """``label`` with each structure in ``values`` kept only on the axial slices where
    ``reference`` draws it (structures the reference does not draw are left as they are)."""
    cut = label.copy()
    for value in values:
        extent = axial_range(reference == value)
        if extent is None:
            continue
        for block in (cut[..., : extent[0]], cut[..., extent[1] + 1:]):  # views: set in place
            block[block == value] = 0
    return cut


def extent_summary(contourer: Contourer, meta, cases: list[dict]) -> None:
    """Print ``--summary``'s table (module docstring)."""
    scored, cut, lengths = {}, {}, {name: ([], []) for name in meta.labels}
    for case in cases:
        (prepared,) = prepare_cases([case], meta)
        label = prepared.scored(contourer.predict(prepared.data, prepared.pre).label)
        scored[prepared.id] = prepared.metrics(label, meta.labels, metrics=("dice",))
        cut[prepared.id] = prepared.metrics(cut_to_reference_extent(label, prepared.reference, meta.labels.values()),
                                            meta.labels, metrics=("dice",))
        slice_mm = float(np.linalg.norm(prepared.data["grid"][0][:3, 2]))
        for name, value in meta.labels.items():
            ref, pred = axial_range(prepared.reference == value), axial_range(label == value)
            if ref is not None:
                lengths[name][0].append((ref[1] - ref[0] + 1) * slice_mm)
                lengths[name][1].append(0.0 if pred is None else (pred[1] - pred[0] + 1) * slice_mm)
    names = list(meta.labels)
    as_scored, as_cut = summarise([scored], names), summarise([cut], names)
    print(f"{len(cases)} cases: Dice as scored, and with each structure cut to the reference's slices (patient-wise means)")
    print("| structure | patients | Dice | Dice, cut to the reference's extent | difference "
          "| length, mm: reference, median [range] | prediction, median |")
    print("|---|---|---|---|---|---|---|")
    for name in [*names, "mean"]:
        a, b = as_scored[(name, "dice")], as_cut[(name, "dice")]
        ref, pred = lengths.get(name, ([], []))
        length = f"{np.median(ref):.0f} [{min(ref):.0f}-{max(ref):.0f}] | {np.median(pred):.0f}" if ref else " | "
        print(f"| {name} | {a['patients']} | {a['mean']:.3f} | {b['mean']:.3f} | {b['mean'] - a['mean']:+.3f} | {length} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model")
    parser.add_argument("--data", required=True, help="labeled cases (e.g. OpenKBP's validation-pats/)")
    parser.add_argument("--structure", default="SpinalCord")
    parser.add_argument("--short", type=int, default=10, help="report predictions this many slices shorter or more")
    parser.add_argument("--summary", action="store_true", help="every structure: the Dice its extent along the body axis costs")
    parser.add_argument("--ids", help="only these cases (comma-separated ids)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    meta = read_meta(args.model)
    cases = labeled_cases(args.data, meta.model)
    if args.ids:
        try:
            cases = only_ids(cases, args.ids, meta.model, args.data)
        except ValueError as err:
            raise SystemExit(str(err)) from None
    if args.summary:
        print(f"{args.model} on {args.data}")
        extent_summary(Contourer(args.model), meta, cases)
        return
    if args.structure not in meta.labels:
        raise SystemExit(f"{args.model} has no structure {args.structure!r} (it has {', '.join(meta.labels)})")
    value = meta.labels[args.structure]
    contourer = Contourer(args.model)
    rows = []
    for case in cases:
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
