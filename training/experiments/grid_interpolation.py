"""The served label map (probabilities averaged over neighbouring slices and interpolated onto the
CT's grid) against the earlier nearest network voxel's label, on a planning-CT-sized grid: how many voxels differ, and a picture.

    python -m contourcl.training.experiments.grid_interpolation --data ../shared/data/openkbp \
        [--model apps/radonc/model/oar.pt] [--png [docs/shipped/oar-grid-interpolation.png]]

The CT is OpenKBP's pt_1 (in the OpenKBP folder: ``--data DIR`` or the environment variable
``CONTOURCL_OPENKBP``) resampled to 512 x 512 x 150 (:func:`contourcl.testing.ct_sized_volume`,
as ``benchmarks/bench_serving.py`` times it). The nearest
label is the earlier serving path: each slice's own probabilities (no neighbour average), their
argmax and each structure's largest connected component on the network's 3 mm grid, then each CT
voxel given the label of its nearest network voxel.
Prints, per structure, the voxels of each label map and the Dice between them. ``--png`` alone
writes the picture to ``results/grid_interpolation/<model>-grid-interpolation.png``.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np

from contourcl.data.datasets import openkbp_or_exit
from contourcl.data.volumes import read_ras, to_ras
from contourcl.inference import Contourer, box_probabilities, contour, grid_mapping, label_on_model_grid
from contourcl.plots import contour_overlay
from contourcl.testing import BENCH_CT, ct_sized_volume
from contourcl.testing import SHIPPED_OAR as MODEL

#: where ``--png`` without a file writes (relative to the working folder, the repository root)
RESULTS = Path("results") / "grid_interpolation"


def nearest_label(network, meta, data: dict) -> np.ndarray:
    """The earlier path: labels on the network's grid, each CT voxel its nearest network voxel's."""
    image = data["image"]
    probs, box = box_probabilities(network, image, meta, averaged=False)
    grid = label_on_model_grid(probs, box, image.shape[1:], meta, largest_component=True)
    affine, shape = data["grid"]
    mapping = grid_mapping(np.asarray(image.affine, dtype=np.float64), affine, shape)
    padded = np.pad(np.asarray(grid[0]), 1)  # outside the network's grid: background
    index = [np.clip(np.rint(pos).astype(np.int64) + 1, 0, padded.shape[r] - 1) for r, pos in mapping]
    return padded.transpose(tuple(r for r, _ in mapping))[np.ix_(*index)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=MODEL)
    parser.add_argument("--png", type=Path, nargs="?", const=RESULTS, metavar="FILE",
                        help=f"write the picture here (alone: {RESULTS}/<model>-grid-interpolation.png)")
    parser.add_argument("--data", help="the OpenKBP folder (train-pats/, validation-pats/; default: $CONTOURCL_OPENKBP)")
    args = parser.parse_args()
    kbp = openkbp_or_exit(parser, args.data) / BENCH_CT
    if args.png == RESULTS:
        args.png = RESULTS / f"{args.model.stem}-grid-interpolation.png"
    with tempfile.TemporaryDirectory() as tmp:
        ct_path = ct_sized_volume(kbp, Path(tmp) / "ct512.nii.gz")
        contourer = Contourer(args.model)
        _, network, meta = contourer.model()
        data, pre = contourer.preprocess(ct_path, meta)
        served = contour(network, meta, data, pre, contourer.keeps_largest_component(meta))[0]
        nearest = nearest_label(network, meta, data)
        print(f"{args.model} on {kbp.parent.name} resampled to {'x'.join(map(str, served.shape))}")
        print("| structure | voxels, interpolated | voxels, nearest | Dice between them |\n|---|---|---|---|")
        for name, v in meta.labels.items():
            a, b = served == v, nearest == v
            dice = 2 * (a & b).sum() / max(1, a.sum() + b.sum())
            print(f"| {name} | {a.sum()} | {b.sum()} | {dice:.3f} |")
        if args.png:
            args.png.parent.mkdir(parents=True, exist_ok=True)
            affine = data["grid"][0]
            contour_overlay(read_ras(ct_path), to_ras(served, affine), meta.labels, args.png, truth=to_ras(nearest, affine), slices=3,
                            title=f"{meta.model} on a 512 x 512 x 150 grid",
                            styles=("probabilities interpolated (served)", "nearest 3 mm voxel (before)"))
            print(f"picture: {args.png}")


if __name__ == "__main__":
    main()
