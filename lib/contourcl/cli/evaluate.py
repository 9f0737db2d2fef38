"""``contourcl evaluate``: how well a model file contours labeled CTs (Dice, HD95, surface Dice)."""

from __future__ import annotations

import argparse
import json

from contourcl.data.datasets import dicom_cases, labeled_cases, only_ids
from contourcl.data.volumes import MIN_IMAGED_AREA_CM2
from contourcl.errors import InvalidImageError
from contourcl.evaluation import (
    DEFAULT_TOLERANCE_MM,
    METRICS,
    evaluate_model_file,
    evaluation_record,
    format_figure,
    prepare_cases,
    summarise,
)
from contourcl.models.checkpoint import read_meta
from contourcl.serving.config import default_largest_component


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="a model file (e.g. apps/radonc/model/oar.pt)")
    parser.add_argument("--data", required=True, help="labeled cases: a MONAI Label studies folder, OpenKBP's validation-pats, "
                        "or a folder of patient folders each holding a DICOM CT series and its RTSTRUCT")
    parser.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE_MM, help="surface Dice tolerance in mm (default %(default)s)")
    parser.add_argument("--max-cases", type=int, help="only the first N cases")
    parser.add_argument("--ids", help="only these cases (comma-separated ids), e.g. a model's validation cases")
    parser.add_argument("--json", help="also write the per-case figures to this file")
    parser.add_argument("--app", help="the app folder whose largest-component rules to use (default: the app shipped with the package)")
    parser.add_argument("--overlays", help="write one picture per structure to this folder: its best, median and worst case by Dice")
    parser.add_argument("--no-reference-check", action="store_true",
                        help="score every reference, also those the reference check sets aside (contourcl.data.reference_check)")


def table(summary: dict, structures: list[str], tolerance_mm: float) -> str:
    """A Markdown table, one row per structure and the mean: mean ± SE over patients."""
    def cell(x: dict, metric: str) -> str:
        return format_figure(x["mean"], x["se"], metric, x["missed"])

    lines = [f"| structure | Dice | HD95 (mm) | surface Dice ({tolerance_mm:g} mm) | patients |", "|---|---|---|---|---|"]
    for s in [*structures, "mean"]:
        lines.append(f"| {s} | " + " | ".join(cell(summary[(s, m)], m) for m in METRICS) + f" | {summary[(s, 'dice')]['patients']} |")
    return "\n".join(lines)


def overlays(model: str, cases: list[dict], prepared: list, per_case: dict, labels: dict, structures: list[str], folder: str) -> list:
    """Per structure, a picture of its best, median and worst case by Dice: the label map as scored
    (``labels``: :func:`contourcl.evaluation.evaluate_model_file`'s) over the reference as scored
    (``prepared``: :func:`contourcl.evaluation.prepare_cases`)."""
    from pathlib import Path

    import numpy as np

    from contourcl.data.volumes import read_nifti, to_ras
    from contourcl.plots import structure_overlays

    meta = read_meta(model)
    by_id = {c["id"]: c for c in cases}
    by_prepared = {c.id: c for c in prepared}
    Path(folder).mkdir(parents=True, exist_ok=True)
    shown: dict[str, tuple] = {}
    written = []
    for name in structures:
        scored = sorted((v[name]["dice"], cid) for cid, v in per_case.items() if not np.isnan(v[name]["dice"]))
        if not scored:
            continue
        picks = [("best", scored[-1]), ("median", scored[len(scored) // 2]), ("worst", scored[0])]
        rows = []
        for kind, (dice, cid) in picks:
            if cid not in shown:
                # the CT's own grid, shown in RAS order (the radiological view of contourcl.plots)
                ct, affine = read_nifti(by_id[cid]["image"])
                shown[cid] = tuple(to_ras(np.asarray(a), affine) for a in (ct, labels[cid], by_prepared[cid].reference))
            rows.append((f"{kind}: {cid}, Dice {dice:.2f}", *shown[cid]))
        written.append(structure_overlays(rows, name, meta.labels[name], Path(folder) / f"{Path(model).stem}-{name}.png"))
    return written


def run(args: argparse.Namespace) -> int:
    import tempfile

    with tempfile.TemporaryDirectory(prefix="contourcl-evaluate-") as tmp:
        return _run(args, tmp)


def _run(args: argparse.Namespace, tmp: str) -> int:
    meta = read_meta(args.model)
    try:
        cases = labeled_cases(args.data, meta.model)
    except InvalidImageError:  # no volume files: DICOM series with their RTSTRUCTs?
        cases = dicom_cases(args.data, meta.model, tmp)
    if args.ids:
        cases = only_ids(cases, args.ids, meta.model, args.data)
    cases = cases[: args.max_cases]
    if not cases:
        raise SystemExit(f"no labeled {meta.model} cases in {args.data}")
    prepared = prepare_cases(cases, meta, check_references=not args.no_reference_check)
    labels: dict = {}  # the label maps as scored, for --overlays (a few MB per CT)
    per_case = evaluate_model_file(args.model, prepared, args.tolerance, largest_component=default_largest_component(meta.model, args.app),
                                   labels=labels if args.overlays else None)
    structures = list(meta.labels)
    print(f"{args.model} ({meta.model}) on {len(cases)} cases of {args.data}; mean ± standard error over patients; "
          f"structures a case does not contour are skipped")
    unimaged = [c for c in prepared if c.unimaged_voxels]
    if unimaged:
        print(f"{sum(c.unimaged_voxels for c in unimaged)} reference voxels of {len(unimaged)} cases ({', '.join(c.id for c in unimaged)}) "
              f"lie on slices that do not image the patient (no connected piece of tissue of {MIN_IMAGED_AREA_CM2:g} cm²): "
              f"those slices are not scored")
    set_aside = {c.id: c.set_aside for c in prepared if c.set_aside}
    for cid, faults in set_aside.items():
        for name, reason in faults.items():
            print(f"{cid}: reference {name} set aside, not scored: {reason}")
    summary = summarise([per_case], structures)
    print(table(summary, structures, args.tolerance))
    if args.overlays:
        for path in overlays(args.model, cases, prepared, per_case, labels, structures, args.overlays):
            print(f"overlay: {path}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(evaluation_record(args.model, args.data, per_case, structures, args.tolerance, set_aside), f, indent=1)
    return 0
