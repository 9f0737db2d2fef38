"""``contourcl effort``: what the clinicians changed in the server's proposals, per model version.

Reads the effort record of a studies folder (``<studies>/.contourcl/effort/``, written by the
server: :mod:`contourcl.serving.effort_record`) and prints, per model, model version and structure,
the images corrected and the median [IQR] of the added path length (mm) and of the surface Dice:
the same figures ``GET /info/`` gives under ``"correction_effort"``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from contourcl.effort import summarise_effort


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--studies", required=True, help="the studies folder the server ran on (--studies of monailabel start_server)")
    parser.add_argument("--json", action="store_true", help="print every record instead (one per final label and model)")
    parser.add_argument("--plot", help="also draw the added path length of each corrected image over time, coloured by model version")


def _spread(figure: dict | None, digits: int) -> str:
    if not figure:
        return "-"
    return f"{figure['median']:.{digits}f} [{figure['iqr'][0]:.{digits}f}, {figure['iqr'][1]:.{digits}f}]"


def table(summary: dict) -> str:
    lines = ["| model | version | images | structure | added path length, mm: median [IQR] | surface Dice: median [IQR] |",
             "|---|---|---|---|---|---|"]
    for model, versions in summary.items():
        for version, row in versions.items():
            for name, figures in row["structures"].items():
                lines.append(f"| {model} | {version} | {row['images']} | {name} | {_spread(figures['added_path_length_mm'], 0)} | "
                             f"{_spread(figures['surface_dice'], 3)} |")
    return "\n".join(lines)


def plot(records: list[dict], out: str | Path) -> Path:
    """Total added path length per corrected image, in the order the finals came, by model version."""
    from contourcl.plots import _pyplot

    plt = _pyplot()
    rows = [r for r in records if r.get("structures") is not None]
    models = sorted({r["model"] for r in rows})
    fig, axes = plt.subplots(len(models) or 1, 1, figsize=(8, 3.2 * max(1, len(models))), squeeze=False)
    for ax, model in zip(axes[:, 0], models, strict=False):
        mine = [r for r in rows if r["model"] == model]
        versions = list(dict.fromkeys(str(r.get("model_version")) for r in mine))
        colours = {v: plt.cm.tab10(i % 10) for i, v in enumerate(versions)}
        for i, r in enumerate(mine):
            ax.scatter(i + 1, sum(s["added_path_length_mm"] for s in r["structures"].values()), color=colours[str(r.get("model_version"))])
            if i and str(r.get("model_version")) != str(mine[i - 1].get("model_version")):
                ax.axvline(i + 0.5, color="grey", linestyle=":", linewidth=1)  # a retrained model was served from here on
        for v in versions:
            ax.scatter([], [], color=colours[v], label=f"version {v}")
        ax.set_title(f"{model}: added path length per corrected image (dotted: a new model version)", fontsize=9)
        ax.set_xlabel("final labels, in the order they were submitted")
        ax.set_ylabel("added path length (mm)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return Path(out)


def run(args: argparse.Namespace) -> int:
    from contourcl.serving.effort_record import EffortRecord

    if not Path(args.studies).is_dir():
        raise FileNotFoundError(f"--studies {args.studies}: no such folder")
    record = EffortRecord(args.studies)
    if args.json:
        for row in record.records():
            print(json.dumps(row, sort_keys=True))
    else:
        latest = record.latest()
        print(f"{len([r for r in latest if r.get('structures') is not None])} corrected image(s) with a proposal, "
              f"{len([r for r in latest if r.get('structures') is None])} without; tolerance {record.tolerance_mm:g} mm (the latest final per image and model)")
        print(table(summarise_effort(latest)))
    if args.plot:
        print(f"plot: {plot(record.records(), args.plot)}")
    return 0
