"""What one voxel of disagreement costs each structure's Dice on a dataset's own grid.

Usage::

    python -m contourcl.training.experiments.voxel_shift --data ../shared/data/openkbp/validation-pats --model oar

Per structure, over the cases that contour it (on the slices that are scored,
:func:`contourcl.data.volumes.imaged_slices`): the reference's Dice against itself moved by one
voxel in-plane (the mean over the four directions), moved by one slice, and grown or shrunk by
one voxel in-plane; beside them the structure's median cross-section (voxels and cm² per slice).
All through :func:`contourcl.evaluation.contour_metrics`, the metric ``contourcl evaluate``
reports. On OpenKBP's 3.9-5.4 mm pixels a structure a few voxels across loses much of its Dice to
a contour that is one voxel (one pixel, about 4 mm) off everywhere.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from scipy import ndimage

from contourcl.data.datasets import labeled_cases, read_scored_reference
from contourcl.data.labels import model_labels
from contourcl.evaluation import contour_metrics


def shifted(mask: np.ndarray, axis: int, step: int) -> np.ndarray:
    """``mask`` moved by ``step`` voxels along ``axis`` (what leaves the grid is lost)."""
    return ndimage.shift(mask, [step if a == axis else 0 for a in range(mask.ndim)], order=0, cval=False)


def dice(pred: np.ndarray, ref: np.ndarray, spacing) -> float:
    return contour_metrics(pred.astype(np.uint8), ref.astype(np.uint8), {"s": 1}, spacing, metrics=("dice",))["s"]["dice"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="labeled CTs (OpenKBP's validation-pats, a studies folder)")
    parser.add_argument("--model", default="oar", choices=("oar", "gtv"))
    args = parser.parse_args()
    names = list(model_labels(args.model))
    rows: dict[str, dict[str, list[float]]] = {n: {k: [] for k in ("xy", "z", "grow", "shrink", "vox", "cm2")} for n in names}
    for case in labeled_cases(Path(args.data), args.model):
        reference = read_scored_reference(case, args.model)
        label = reference.label
        spacing = np.linalg.norm(reference.affine[:3, :3], axis=0)  # as contourcl.evaluation
        z = reference.imaged[0]
        plane = [a for a in range(3) if a != z]
        ball = np.zeros((3, 3, 3), bool)
        ball[1, 1, 1] = True
        for a in plane:
            ball[tuple(slice(None) if b == a else 1 for b in range(3))] = True  # in-plane 4-neighbourhood
        for k, name in enumerate(names, start=1):
            ref = label == k
            if not ref.any():
                continue
            r = rows[name]
            r["xy"].append(np.mean([dice(shifted(ref, a, s), ref, spacing) for a in plane for s in (-1, 1)]))
            r["z"].append(np.mean([dice(shifted(ref, z, s), ref, spacing) for s in (-1, 1)]))
            r["grow"].append(dice(ndimage.binary_dilation(ref, ball), ref, spacing))
            r["shrink"].append(dice(ndimage.binary_erosion(ref, ball), ref, spacing))
            per_slice = np.moveaxis(ref, z, 0).reshape(ref.shape[z], -1).sum(1)
            area = np.median(per_slice[per_slice > 0])
            r["vox"].append(area)
            r["cm2"].append(area * spacing[plane[0]] * spacing[plane[1]] / 100)
    print(f"{args.data} ({args.model}): the reference's Dice against itself changed by one voxel; median over cases")
    print("| structure | cases | moved 1 voxel in-plane | moved 1 slice | grown 1 voxel | shrunk 1 voxel | cross-section (voxels / cm²) |")
    print("|---|---|---|---|---|---|---|")
    for name in names:
        r = rows[name]
        if not r["xy"]:
            continue
        med = {k: float(np.median(v)) for k, v in r.items()}
        print(f"| {name} | {len(r['xy'])} | {med['xy']:.2f} | {med['z']:.2f} | {med['grow']:.2f} | {med['shrink']:.2f} | {med['vox']:.0f} / {med['cm2']:.1f} |")


if __name__ == "__main__":
    main()
