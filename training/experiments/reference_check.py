"""The figures behind :mod:`contourcl.data.reference_check`, for every OpenKBP patient.

Usage::

    python -m contourcl.training.experiments.reference_check --data ../shared/data/openkbp \
        [--overlays [docs/reference-check] --model apps/radonc/model/oar.pt]

``--data`` names the OpenKBP folder; without it, the environment variable ``CONTOURCL_OPENKBP``.

Per structure of the ``oar`` model, over the patients that contour it on the slices that image the
patient: the median and the largest share of air (solid organs) and median axial cross-section
(every structure), the largest among the structures kept, and then every structure the checks set
aside, with the reason. Set-aside structures are neither trained on nor scored. ``--overlays``:
per structure, a picture of each set-aside reference (dashed) with ``--model``'s contour (solid);
``--overlays`` alone writes them to ``results/reference_check/overlays/``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from contourcl.data.datasets import labeled_cases, openkbp_or_exit, read_label
from contourcl.data.labels import model_labels, to_model
from contourcl.data.reference_check import MAX_AIR_FRACTION, SOLID, structure_figures
from contourcl.data.reference_check import faults as reference_faults
from contourcl.data.volumes import imaged_slices, read_nifti, to_ras

#: where ``--overlays`` without a folder writes (relative to the working folder, the repository root)
OVERLAYS = Path("results") / "reference_check" / "overlays"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", help="the OpenKBP folder (train-pats/, validation-pats/; default: $CONTOURCL_OPENKBP)")
    parser.add_argument("--overlays", nargs="?", const=str(OVERLAYS), metavar="DIR",
                        help=f"write a picture per structure of its set-aside references to this folder (alone: {OVERLAYS})")
    parser.add_argument("--model", default="apps/radonc/model/oar.pt", help="the model whose contours the pictures show")
    args = parser.parse_args()
    root = openkbp_or_exit(parser, args.data)
    labels = model_labels("oar")
    figures: dict[str, list[tuple[float, float, str]]] = {name: [] for name in labels}
    set_aside: list[tuple[str, str, str]] = []
    pictures: dict[str, list] = {}  # structure -> overlay rows
    for split in ("train-pats", "validation-pats"):
        for case in labeled_cases(root / split, "oar"):
            ct, affine = read_nifti(case["image"])
            ct = np.asarray(ct)
            label = to_model(read_label(case)[0], "oar")
            imaged = imaged_slices(ct, affine)
            figs = structure_figures(ct, label, affine, labels, imaged)
            faults = reference_faults(figs)
            for name, f in figs.items():
                if name not in faults:
                    figures[name].append((f["air"], f["cross_section_cm2"], case["id"]))
            set_aside += [(f"{split}/{case['id']}", name, reason) for name, reason in faults.items()]
            if args.overlays and faults:
                from contourcl.inference import Contourer

                contour = Contourer(args.model)(case["image"]).label
                # a structure set not drawn on its CT is shown by the organs found in air
                shown = [n for n in faults if n in SOLID and figs[n]["air"] > MAX_AIR_FRACTION] or list(faults)
                for name in shown:
                    pictures.setdefault(name, []).append((f"{case['id']} ({split.split('-')[0]})",
                                                      *(to_ras(a, affine) for a in (ct, contour, label))))
    print("| structure (kept) | patients | air: median / largest | cross-section cm²: median / largest |")
    print("|---|---|---|---|")
    for name, rows in figures.items():
        air, area = np.array([r[0] for r in rows]), np.array([r[1] for r in rows])
        air_cell = f"{np.median(air):.1%} / {air.max():.1%} ({rows[int(air.argmax())][2]})" if name in SOLID else "-"
        print(f"| {name} | {len(rows)} | {air_cell} | {np.median(area):.2f} / {area.max():.2f} ({rows[int(area.argmax())][2]}) |")
    print(f"\nset aside ({len(set_aside)} structures):")
    for case_id, name, reason in set_aside:
        print(f"- {case_id} {name}: {reason}")
    if args.overlays:
        from contourcl.plots import structure_overlays

        Path(args.overlays).mkdir(parents=True, exist_ok=True)
        for name, structure_rows in pictures.items():
            print(structure_overlays(structure_rows, f"{name} set aside", labels[name], Path(args.overlays) / f"{name}.png"))


if __name__ == "__main__":
    main()
