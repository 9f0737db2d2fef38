"""The figures behind :mod:`contourcl.data.reference_check`, for every OpenKBP patient.

Usage::

    python benchmarks/reference_check.py --data ../shared/data/openkbp

Per structure of the ``oar`` model, over the patients that contour it on the slices that image the
patient: the median and the largest share of air (solid organs) and median axial cross-section
(every structure), the largest among the structures kept, and then every structure the checks set
aside, with the reason. Set-aside structures are neither trained on nor scored.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from contourcl.data.datasets import labeled_cases, read_label
from contourcl.data.labels import model_labels, to_model
from contourcl.data.reference_check import SOLID, implausible_structures, structure_figures
from contourcl.data.volumes import imaged_slices, read_nifti


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="the OpenKBP folder (train-pats/, validation-pats/)")
    args = parser.parse_args()
    labels = model_labels("oar")
    figures: dict[str, list[tuple[float, float, str]]] = {name: [] for name in labels}
    set_aside: list[tuple[str, str, str]] = []
    for split in ("train-pats", "validation-pats"):
        for case in labeled_cases(Path(args.data) / split, "oar"):
            ct, affine = read_nifti(case["image"])
            ct = np.asarray(ct)
            label = to_model(read_label(case)[0], "oar")
            imaged = imaged_slices(ct, affine)
            faults = implausible_structures(ct, label, affine, labels, imaged)
            for name, f in structure_figures(ct, label, affine, labels, imaged).items():
                if name not in faults:
                    figures[name].append((f["air"], f["cross_section_cm2"], case["id"]))
            set_aside += [(f"{split}/{case['id']}", name, reason) for name, reason in faults.items()]
    print("| structure (kept) | patients | air: median / largest | cross-section cm²: median / largest |")
    print("|---|---|---|---|")
    for name, rows in figures.items():
        air, area = np.array([r[0] for r in rows]), np.array([r[1] for r in rows])
        air_cell = f"{np.median(air):.1%} / {air.max():.1%} ({rows[int(air.argmax())][2]})" if name in SOLID else "-"
        print(f"| {name} | {len(rows)} | {air_cell} | {np.median(area):.2f} / {area.max():.2f} ({rows[int(area.argmax())][2]}) |")
    print(f"\nset aside ({len(set_aside)} structures):")
    for case_id, name, reason in set_aside:
        print(f"- {case_id} {name}: {reason}")


if __name__ == "__main__":
    main()
