"""A department's learning curve, replayed through the real server (``contourcl benchmark clinic``).

Patients arrive one after another. For each, the served model proposes through the real
``monailabel start_server`` (``POST /infer/<model>``), the "clinician" submits the department's
contours as the final label (``PUT /datastore/label``, as Slicer submits), the server records the
correction effort (:mod:`contourcl.serving.effort_record`), and after every ``every`` finals the
server retrains (``POST /train/<model>``: its own trainer, fixed validation cases and quality gate
decide what is served next). The replay waits for each retrain before the next patient, so the
order of events is the same on any machine.

Two arms per department, on the same patients in the same order:

- ``static``: the shipped model answers every patient (no retraining);
- ``learning``: the server retrains every ``every`` finals.

Two departments:

- ``openkbp``: the department contours as OpenKBP does (the reference of
  :func:`contourcl.data.datasets.read_scored_reference`: the slices that image the patient, the
  reference structures that pass the reference check);
- ``shifted``: a department whose convention differs from the training data in a stated,
  consistent way (:func:`shifted_convention`): parotids with a 5 mm margin (3D) and the spinal
  canal instead of the cord, drawn as the cord with a 5 mm margin in the axial plane, under the
  same name ``SpinalCord``. On OpenKBP's 3.9-4.9 mm pixels a 5 mm margin is one pixel in-plane.

The effort measure is the server's own (:func:`contourcl.effort.correction_effort`: added path
length at 2 mm). A structure counts for a patient when the department's final label contours it
(the partial labels of OpenKBP: a structure the department did not contour is no correction).
The comparison (:func:`compare_arms`) is paired by patient over the last ``last`` patients: the
ratio of summed added path length, learning over static, with a percentile bootstrap interval
over patients, Bonferroni-corrected for the number of comparisons (the structures and the total),
and Wilcoxon signed-rank p values with Holm's adjustment.
"""

from __future__ import annotations

import csv
import json
import logging
import shutil
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import requests
from scipy import ndimage

from contourcl.data.datasets import labeled_cases, read_scored_reference
from contourcl.data.labels import STORED_LABELS, from_model, model_labels
from contourcl.data.volumes import blank_slices, write_label
from contourcl.effort import axial_axis, voxel_sizes
from contourcl.files import atomic_write_text
from contourcl.serving.effort_record import EffortRecord

logger = logging.getLogger(__name__)

DEPARTMENTS = ("openkbp", "shifted")
ARMS = ("static", "learning")
#: the shifted department's margins (mm)
PAROTID_MARGIN_MM = 5.0
CANAL_MARGIN_MM = 5.0


# -- the departments' contours -------------------------------------------------------------------
def _grown(mask: np.ndarray, spacing: Sequence[float], margin_mm: float, axial: int | None = None) -> np.ndarray:
    """``mask`` with a margin of ``margin_mm``: in 3D, or in each slice across axis ``axial`` when given."""
    if not mask.any():
        return mask
    if axial is None:
        return ndimage.distance_transform_edt(~mask, sampling=spacing) <= margin_mm
    out = np.zeros_like(mask)
    plane = [s for i, s in enumerate(spacing) if i != axial]
    for z in np.flatnonzero(np.moveaxis(mask, axial, -1).any(axis=(0, 1))):
        index = [slice(None)] * 3
        index[axial] = z
        out[tuple(index)] = ndimage.distance_transform_edt(~mask[tuple(index)], sampling=plane) <= margin_mm
    return out


def shifted_convention(label: np.ndarray, affine: np.ndarray, labels: Mapping[str, int]) -> np.ndarray:
    """The shifted department's contours from OpenKBP's (``label`` in ``labels``' numbering):
    Parotid_R and Parotid_L grown by :data:`PAROTID_MARGIN_MM` in 3D, SpinalCord grown by
    :data:`CANAL_MARGIN_MM` in the axial plane (the spinal canal, under the cord's name). Margins
    grow into background only: no other structure loses a voxel."""
    spacing = tuple(float(s) for s in voxel_sizes(affine))
    out = np.asarray(label).copy()
    grow = [(name, PAROTID_MARGIN_MM, None) for name in ("Parotid_R", "Parotid_L")]
    grow.append(("SpinalCord", CANAL_MARGIN_MM, axial_axis(affine)))
    for name, margin, axis in grow:
        if name in labels:
            value = labels[name]
            out[_grown(label == value, spacing, margin, axis) & (out == 0)] = value
    return out


def department_label(case: Mapping, model: str, department: str) -> tuple[np.ndarray, np.ndarray]:
    """The final label the ``department`` submits for ``case``, in the stored numbering, and its affine."""
    ref = read_scored_reference(case, model)
    label = ref.label
    if department == "shifted":
        label = blank_slices(shifted_convention(label, ref.affine, model_labels(model)), ref.imaged)[0]
    elif department != "openkbp":
        raise ValueError(f"unknown department {department!r} (known: {', '.join(DEPARTMENTS)})")
    return from_model(label, model), ref.affine


# -- one arm through the real server -------------------------------------------------------------
def _copy_app(app: Path, dest: Path, model: str) -> Path:
    """A copy of the app with only ``model``'s served weights and no history (the server writes there)."""
    weights = f"{model}.pt"

    def ignore(folder: str, names: list[str]) -> list[str]:
        skip = {"history", "__pycache__", "logs", "dicomweb-cache"}
        in_model = Path(folder).resolve() == (app / "model").resolve()
        return [n for n in names if n in skip or n.endswith(".tmp") or (in_model and n != weights and (n.endswith(".pt") or (Path(folder) / n).is_dir()))]

    shutil.copytree(app, dest, ignore=ignore)
    return dest


def _submit(url: str, image: str, stored: np.ndarray, affine: np.ndarray, folder: Path) -> None:
    path = write_label(folder / f"{image}.nii.gz", stored, affine)
    info = [{"name": name, "idx": value} for name, value in STORED_LABELS.items() if (stored == value).any()]
    with open(path, "rb") as f:
        r = requests.put(f"{url}/datastore/label", params={"image": image, "tag": "final"}, files={"label": (path.name, f)},
                         data={"params": json.dumps({"label_info": info})}, timeout=300)
    if r.status_code != 200:
        raise RuntimeError(f"the server refused the final label of {image}: {r.status_code} {r.text[:300]}")


def replay_arm(cases: Sequence[Mapping], app: Path, work: Path, model: str, department: str, every: int, request: Mapping,
               until: int | None = None, progress: bool = True) -> dict:
    """One arm: a fresh server on a copy of ``app`` and an empty studies folder; the patients of
    ``cases`` in order (propose, submit the department's label, retrain every ``every`` finals
    up to ``until`` finals, None: to the end; ``every`` 0: never). Returns the effort records
    (latest per image), the model history and timings."""
    from tqdm import tqdm

    from contourcl.testing import start_monailabel, stop_process, wait_for_training, wait_until_serving

    work.mkdir(parents=True, exist_ok=True)
    app_copy = _copy_app(app, work / "radonc", model)
    studies, finals = work / "studies", work / "finals"
    studies.mkdir()
    finals.mkdir()
    for case in cases:
        shutil.copyfile(case["image"], studies / f"{case['id']}.nii.gz")
    env = {"MONAI_LABEL_AUTH_ENABLE": None, "MONAI_LABEL_AUTO_UPDATE_SCORING": "false"}
    conf = {"models": model, "skip_scoring": "true", "skip_strategies": "true"}
    started = time.monotonic()
    proc, url = start_monailabel(app_copy, studies, conf, work / "server.log", cwd=work, env=env, new_session=True)
    retrains = []
    try:
        wait_until_serving(proc, url, work / "server.log", timeout=300)
        bar = tqdm(cases, desc=f"{department}/{'learning' if every else 'static'}", unit="patient", disable=not progress)
        for n, case in enumerate(bar, start=1):
            r = requests.post(f"{url}/infer/{model}", params={"image": case["id"]}, timeout=600)
            if r.status_code != 200:
                raise RuntimeError(f"infer {model} on {case['id']}: {r.status_code} {r.text[:300]}")
            stored, affine = department_label(case, model, department)
            _submit(url, case["id"], stored, affine, finals)
            if every and n % every == 0 and n < len(cases) and (until is None or n <= until):
                t0 = time.monotonic()
                r = requests.post(f"{url}/train/{model}", json=dict(request), timeout=60)
                if r.status_code != 200:
                    raise RuntimeError(f"train {model} after {n} finals: {r.status_code} {r.text[:300]}")
                status = wait_for_training(url, timeout=3600)
                retrains.append({"after": n, "status": status.get("status"), "seconds": round(time.monotonic() - t0, 1)})
                if status.get("status") != "DONE":
                    logger.warning("retrain after %d finals ended %s: %s", n, status.get("status"), status.get("details"))
    finally:
        stop_process(proc, timeout=30)
    history_file = app_copy / "model" / "history" / model / "history.json"
    history = json.loads(history_file.read_text()) if history_file.is_file() else []
    order = {case["id"]: n for n, case in enumerate(cases, start=1)}
    records = sorted((r for r in EffortRecord(studies).latest() if r.get("model") == model), key=lambda r: order.get(r["image"], 0))
    return {"department": department, "arm": "learning" if every else "static", "model": model, "every": every, "until": until,
            "request": dict(request),
            "patients": [c["id"] for c in cases], "records": records, "retrains": retrains, "history": history,
            "seconds": round(time.monotonic() - started, 1)}


# -- the comparison ------------------------------------------------------------------------------
def counted(record: Mapping) -> dict[str, float]:
    """``{structure: added path length}`` of the structures the department's final label contours."""
    return {name: s["added_path_length_mm"] for name, s in (record.get("structures") or {}).items() if s["change"] != "deleted"}


def _ratio_interval(a: np.ndarray, b: np.ndarray, level: float, reps: int, seed: int) -> tuple[float, float]:
    """Percentile bootstrap interval over patients of ``sum(a) / sum(b)``."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(a), size=(reps, len(a)))
    sa, sb = a[idx].sum(axis=1), b[idx].sum(axis=1)
    ratios = np.divide(sa, sb, out=np.full(reps, np.nan), where=sb > 0)
    alpha = (1 - level) / 2
    return float(np.nanquantile(ratios, alpha)), float(np.nanquantile(ratios, 1 - alpha))


def compare_arms(static: Sequence[Mapping], learning: Sequence[Mapping], last: int = 10, level: float = 0.95, reps: int = 10000,
                 seed: int = 0) -> list[dict]:
    """Learning against static on the last ``last`` patients both scored, paired by patient: per
    structure and in total (each patient's sum over the structures its final label contours),
    the summed added path length of each arm, their ratio (learning / static) with a bootstrap
    interval at ``level`` Bonferroni-corrected for the number of rows, and the Wilcoxon p
    (Holm-adjusted over the rows)."""
    from contourcl.training.experiments.paired import holm, wilcoxon_p

    before = {r["image"]: counted(r) for r in static}
    after = {r["image"]: counted(r) for r in learning}
    patients = [r["image"] for r in learning if r["image"] in before][-last:]
    names = list(dict.fromkeys(n for p in patients for n in before[p]))
    scopes = [*names, "all structures"]
    corrected = 1 - (1 - level) / len(scopes)
    rows = []
    for scope in scopes:
        pairs = [(sum(after[p].values()), sum(before[p].values())) if scope == "all structures" else (after[p][scope], before[p][scope])
                 for p in patients if scope == "all structures" or (scope in before[p] and scope in after[p])]
        a, b = (np.array(x, dtype=float) for x in zip(*pairs, strict=True)) if pairs else (np.zeros(0), np.zeros(0))
        ratio = float(a.sum() / b.sum()) if b.sum() > 0 else float("nan")
        low, high = _ratio_interval(a, b, corrected, reps, seed) if len(a) > 1 else (float("nan"), float("nan"))
        rows.append({"structure": scope, "patients": len(a), "static_mm": round(float(b.sum()), 1), "learning_mm": round(float(a.sum()), 1),
                     "ratio": ratio, "ci_low": low, "ci_high": high, "level": corrected, "p_wilcoxon": wilcoxon_p(a - b)})
    for row, p in zip(rows, holm([r["p_wilcoxon"] for r in rows]), strict=True):
        row["p_holm"] = p
    return rows


# -- the report ----------------------------------------------------------------------------------
def _arm_file(out: Path, department: str, arm: str) -> Path:
    return out / department / f"{arm}.json"


def effort_rows(arms: Sequence[Mapping]) -> list[dict]:
    """One row per arm, patient and counted structure (the CSV of the report)."""
    rows = []
    for arm in arms:
        for order, record in enumerate(arm["records"], start=1):
            for name, s in (record.get("structures") or {}).items():
                if s["change"] == "deleted":
                    continue
                rows.append({"department": arm["department"], "arm": arm["arm"], "order": order, "image": record["image"],
                             "model_version": record.get("model_version"), "structure": name, "change": s["change"],
                             "added_path_length_mm": s["added_path_length_mm"], "surface_dice": s["surface_dice"], "dice": s["dice"],
                             "changed_slices": s["changed_slices"]})
    return rows


def plot_curves(arms: Mapping[tuple[str, str], Mapping], out: Path) -> Path:
    """Total added path length per patient in arrival order, one panel per department: the static
    arm in grey, the learning arm coloured by the model version that proposed, retrains marked."""
    from contourcl.plots import _pyplot

    plt = _pyplot()
    departments = [d for d in DEPARTMENTS if any(k[0] == d for k in arms)]
    fig, axes = plt.subplots(len(departments), 1, figsize=(8, 3.4 * len(departments)), squeeze=False)
    for ax, department in zip(axes[:, 0], departments, strict=True):
        static, learning = arms.get((department, "static")), arms.get((department, "learning"))
        if static:
            totals = [sum(counted(r).values()) / 10 for r in static["records"]]
            ax.plot(range(1, len(totals) + 1), totals, color="0.6", marker="o", markersize=3, linewidth=1, label="shipped model, never retrained")
        if learning:
            versions = list(dict.fromkeys(str(r.get("model_version")) for r in learning["records"]))
            colours = {v: plt.cm.viridis(i / max(1, len(versions) - 1)) for i, v in enumerate(versions)}
            totals = [sum(counted(r).values()) / 10 for r in learning["records"]]
            ax.plot(range(1, len(totals) + 1), totals, color="tab:blue", linewidth=0.8, alpha=0.5)
            for i, r in enumerate(learning["records"], start=1):
                ax.scatter(i, totals[i - 1], color=colours[str(r.get("model_version"))], s=18, zorder=3)
            for retrain in learning["retrains"]:
                ax.axvline(retrain["after"] + 0.5, color="tab:red", linestyle=":", linewidth=1)
            ax.plot([], [], color="tab:blue", marker="o", markersize=4, label="retrained every "
                    f"{learning['every']} finals (colour: model version; dotted: a retrain)")
        ax.set_title(f"department '{department}': added path length per patient", fontsize=9)
        ax.set_xlabel("patients, in the order they arrived")
        ax.set_ylabel("added path length (cm)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out


def _fmt_ratio(row: Mapping) -> str:
    if not np.isfinite(row["ratio"]):
        return "-"
    ci = f" [{row['ci_low']:.2f}, {row['ci_high']:.2f}]" if np.isfinite(row["ci_low"]) else ""
    return f"{row['ratio']:.2f}{ci}"


def report(out: Path, last: int = 10) -> list[Path]:
    """``effort.csv``, ``summary.md`` and ``learning-curve.png`` in ``out`` from the finished arms."""
    arms = {}
    for department in DEPARTMENTS:
        for arm in ARMS:
            path = _arm_file(out, department, arm)
            if path.is_file():
                arms[(department, arm)] = json.loads(path.read_text())
    if not arms:
        raise FileNotFoundError(f"no finished arm in {out}: run `contourcl benchmark clinic` first")
    rows = effort_rows(list(arms.values()))
    with open(out / "effort.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["department"])
        writer.writeheader()
        writer.writerows(rows)
    lines = ["# A department's learning curve, replayed", "",
             "Made by `contourcl benchmark clinic` (see docs/operations/correction-effort.md). Added path length (APL) at 2 mm, "
             "summed over the structures each final label contours.", ""]
    for department in DEPARTMENTS:
        static, learning = arms.get((department, "static")), arms.get((department, "learning"))
        if not (static and learning):
            continue
        comparison = compare_arms(static["records"], learning["records"], last)
        n = comparison[-1]["patients"]
        retrained = [e for e in learning["history"] if e.get("origin") == "retrain"]
        served = [e for e in retrained if e.get("published")]
        until = f" up to {learning['until']} finals" if learning.get("until") else ""
        lines += [f"## Department `{department}`", "",
                  f"{len(learning['records'])} patients; retrained every {learning['every']} finals{until} with {learning['request'] or 'the server defaults'} "
                  f"({len(learning['retrains'])} retrains, {len(served)} published by the gate); wall time {learning['seconds'] / 60:.1f} min "
                  f"(learning) and {static['seconds'] / 60:.1f} min (static), on this machine.", "",
                  f"Last {n} patients, learning / static, paired by patient; interval: percentile bootstrap over patients at "
                  f"{100 * comparison[0]['level']:.1f} % (95 % Bonferroni-corrected for {len(comparison)} comparisons); p: Wilcoxon "
                  "signed-rank, Holm-adjusted.", "",
                  "| structure | patients | APL static (mm) | APL learning (mm) | ratio [interval] | change | p (Holm) |",
                  "|---|---|---|---|---|---|---|"]
        for row in comparison:
            change = f"{100 * (row['ratio'] - 1):+.0f} %" if np.isfinite(row["ratio"]) else "-"
            lines.append(f"| {row['structure']} | {row['patients']} | {row['static_mm']:.0f} | {row['learning_mm']:.0f} | {_fmt_ratio(row)} | "
                         f"{change} | {row['p_holm']:.2g} |")
        lines += ["", "| retrain after | published | gate Dice: served -> candidate | gate cases | seconds |", "|---|---|---|---|---|"]
        for retrain, entry in zip(learning["retrains"], retrained, strict=False):
            lines.append(f"| {retrain['after']} | {entry.get('published')} | {entry.get('served_val_dice', float('nan')):.3f} -> "
                         f"{entry.get('val_dice', float('nan')):.3f} | {entry.get('gate_cases')} | {retrain['seconds']:.0f} |")
        lines.append("")
    (out / "summary.md").write_text("\n".join(lines))
    return [out / "effort.csv", out / "summary.md", plot_curves(arms, out / "learning-curve.png")]


def run_clinic(data: Path, out: Path, app: Path, work: Path, model: str = "oar", departments: Sequence[str] = DEPARTMENTS,
               every: int = 5, request: Mapping | None = None, limit: int | None = None, last: int = 10,
               until: int | None = None) -> list[Path]:
    """Every arm of every department not finished in ``out`` (one JSON each), then the report."""
    cases = sorted(labeled_cases(data / "validation-pats", model), key=lambda c: c["id"])[:limit]
    if len(cases) < 2:
        raise FileNotFoundError(f"{data / 'validation-pats'}: fewer than 2 labeled {model} cases")
    for department in departments:
        for arm in ARMS:
            path = _arm_file(out, department, arm)
            if path.is_file():
                logger.info("%s/%s: done already (%s)", department, arm, path)
                continue
            arm_work = work / department / arm
            if arm_work.exists():
                shutil.rmtree(arm_work)
            result = replay_arm(cases, app, arm_work, model, department, every if arm == "learning" else 0, request or {}, until)
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(path, json.dumps(result, indent=1, sort_keys=True))
            logger.info("%s/%s: %d patients in %.0f s", department, arm, len(result["records"]), result["seconds"])
    return report(out, last)
