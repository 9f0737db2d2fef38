"""The click benchmark: contours after 0, 1, 2, 3, 5 and 10 simulated clicks per structure.

    python -m contourcl.training.refine.benchmark [--data DIR] [--refiner FILE] [--models oar,gtv]
        [--edit-radius gtv=40] [--reach gtv=25] [--clicks 0,1,2,3,5,10] [--out results/clicks] [--max-cases N] [--ids pt_1,...] [--seed 0]
        [--threads 2] [--tolerance 2.0] [--methods network,plain_edit,oracle] [--mask-prior P] [--no-progress]

For every validation case and model (``oar``, ``gtv``), every structure the reference contours
starts from the shipped model's automatic contour (:class:`contourcl.inference.Contourer`, the
served path); the simulated clinician (:func:`contourcl.refine.simulator.next_click`, seeded per
case and structure) clicks at the centre of the largest error region, and each method answers
with the structure's new mask, all clicks so far given each time:

- ``auto``: the automatic contour, unchanged (the first baseline);
- ``plain_edit``: :func:`contourcl.refine.plain_edit.plain_edit`, no network (the second);
- ``network``: the refinement network (:class:`contourcl.refine.refiner.Refiner`), with each
  model's edit radius and reach (``--edit-radius``, ``--reach``; :class:`contourcl.refine.encoding.ClickScope`;
  ``contourcl benchmark clicks`` gives the app's model configs', as the server answers;
  ``--mask-prior``: another weight of the current mask than the file's, to measure how the answer
  trades voxels fixed against voxels broken: a file is served with its own);
- ``oracle``: not a method a clinician has but a ceiling. Within the
  network's scope around the clicks so far (the same edit radius and reach), the mask becomes the
  reference: what a perfect editor that changes only near the clicks would reach
  (:func:`oracle_method`).

Scored with the project's one metric code (:func:`contourcl.evaluation.contour_metrics`: Dice,
surface Dice at ``--tolerance`` mm, HD95) on each CT's own grid against
:func:`contourcl.data.datasets.read_scored_reference`, on the slices that image the patient (the
clicks go there too). Writes to ``--out``: ``cases/<model>_<id>.json`` per case (a rerun skips
those done with the same settings: the model and refinement files' versions, the methods, clicks,
seed and tolerance; after a change of the code, delete ``cases/``), ``clicks.csv`` (every figure), ``clicks.md`` (tables: mean ± standard error
over patients, per structure and the patient-wise mean) and ``clicks.png`` (mean Dice and surface
Dice against clicks).
"""

from __future__ import annotations

import argparse
import csv
import json
import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path

import numpy as np
from scipy import ndimage

from contourcl.data.datasets import labeled_cases, openkbp_or_exit, read_scored_reference
from contourcl.data.labels import model_labels
from contourcl.data.volumes import blank_slices, read_nifti
from contourcl.effort import voxel_sizes
from contourcl.evaluation import METRICS, contour_metrics, format_figure, summarise
from contourcl.refine.encoding import click_maps, model_scopes
from contourcl.refine.simulator import next_click

CLICKS = (0, 1, 2, 3, 5, 10)
METHODS = ("auto", "plain_edit", "network", "oracle")
#: surface Dice tolerance of the click benchmark (mm), as issue 31 and the effort records use
TOLERANCE_MM = 2.0

#: method(ct, affine, mask, positive, negative) -> the structure's new mask
Method = Callable[[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray], np.ndarray]


def plain_edit_method() -> Method | None:
    """The plain edit (no network) as a :data:`Method`, or None while it is not there."""
    try:
        from contourcl.refine.plain_edit import plain_edit
    except ImportError:
        return None

    def method(ct: np.ndarray, affine: np.ndarray, mask: np.ndarray, positive: np.ndarray, negative: np.ndarray) -> np.ndarray:
        return plain_edit(mask, positive, negative, affine)

    return method


def oracle_method(edit_radius_mm: float | None, reach_mm: float):
    """The ceiling of an editor that changes only near the clicks: within ``edit_radius_mm`` of
    each click so far in its axial plane (``None``: the whole slices), on the slices within
    ``reach_mm`` of its slice (:func:`contourcl.refine.encoding.click_maps`' reach), the mask
    becomes ``reference``; elsewhere it stays. Called with the reference as a keyword
    (``uses_reference``), which no real method sees."""
    radius = 1e6 if edit_radius_mm is None else float(edit_radius_mm)

    def method(ct: np.ndarray, affine: np.ndarray, mask: np.ndarray, positive: np.ndarray, negative: np.ndarray,
               reference: np.ndarray) -> np.ndarray:
        points = np.concatenate([np.reshape(positive, (-1, 3)), np.reshape(negative, (-1, 3))])
        region = click_maps(points, None, mask.shape, affine, radius_mm=radius, reach_mm=reach_mm)[0] > 0
        return np.where(region, reference, mask)

    method.uses_reference = True
    return method


def valid_region(imaged: tuple[int, np.ndarray], shape: tuple[int, ...]) -> np.ndarray:
    """A bool array broadcastable to ``shape``: the slices that image the patient."""
    axis, kept = imaged
    view = [1, 1, 1]
    view[axis] = shape[axis]
    return np.asarray(kept, dtype=bool).reshape(view)


def click_series(method: Method, ct: np.ndarray, affine: np.ndarray, start: np.ndarray, reference: np.ndarray,
                 valid: np.ndarray, clicks: int, seed: int) -> tuple[list[np.ndarray], list[dict]]:
    """The masks after 0..``clicks`` simulated clicks with ``method`` and the clicks themselves.

    After a click that leaves no error the mask stays (a clinician stops clicking)."""
    if getattr(method, "uses_reference", False):  # the oracle ceiling (oracle_method)
        method = partial(method, reference=reference)
    spacing = voxel_sizes(affine)
    rng = np.random.default_rng(seed)
    mask = np.asarray(start, dtype=bool)
    masks, made = [mask], []
    pos: list[tuple[int, int, int]] = []
    neg: list[tuple[int, int, int]] = []
    for _ in range(clicks):
        click = next_click(mask, reference, spacing, rng, valid)
        if click is not None:
            (pos if click.positive else neg).append(click.point)
            made.append({"point": list(click.point), "positive": click.positive})
            mask = np.asarray(method(ct, affine, mask, np.asarray(pos, dtype=np.int64).reshape(-1, 3),
                                     np.asarray(neg, dtype=np.int64).reshape(-1, 3)), dtype=bool) & valid
        masks.append(mask)
    return masks, made


def structure_seed(seed: int, case: str, structure: str) -> int:
    """The simulator's seed for one case and structure (the same for every method)."""
    return int(np.random.SeedSequence([seed, *map(ord, f"{case}/{structure}")]).generate_state(1)[0])


def score(mask: np.ndarray, reference: np.ndarray, affine: np.ndarray, tolerance_mm: float, metrics: Sequence[str] = METRICS) -> dict[str, float]:
    return contour_metrics(mask.astype(np.uint8), reference.astype(np.uint8), {"s": 1}, voxel_sizes(affine), tolerance_mm, metrics)["s"]


def error_near_surface(start: np.ndarray, reference: np.ndarray, affine: np.ndarray) -> dict:
    """How the automatic contour ``start`` errs against ``reference``: the error voxels (missed and
    over-drawn) and the share of them within one in-plane voxel of the reference's surface (a
    one-voxel boundary disagreement, which a click at one point can hardly fix). ``{"voxels",
    "near_surface"}`` (``near_surface`` None when there is no error)."""
    error = start != reference
    n = int(error.sum())
    if not n:
        return {"voxels": 0, "near_surface": None}
    box = ndimage.find_objects((error | reference).astype(np.uint8))[0]
    box = tuple(slice(max(0, b.start - 2), b.stop + 2) for b in box)
    ref, err = reference[box], error[box]
    sizes = voxel_sizes(affine)
    one = float(max(sorted(sizes)[:2]))  # one in-plane voxel (the two smaller sizes)
    outside = ndimage.distance_transform_edt(~ref, sampling=sizes)  # over-drawn voxels: distance to the reference
    inside = ndimage.distance_transform_edt(ref, sampling=sizes)  # missed voxels: distance to its outside
    near = np.where(ref, inside, outside)[err] <= one + 1e-6
    return {"voxels": n, "near_surface": float(near.mean())}


def click_changes(masks: Sequence[np.ndarray], reference: np.ndarray) -> list[list[int]]:
    """What each click did: ``[fixed, broken]`` voxels per step of ``masks`` (a click series), fixed
    where the mask came to agree with ``reference``, broken where it stopped agreeing."""
    out = []
    for before, after in zip(masks[:-1], masks[1:], strict=True):
        was, now = before == reference, after == reference
        out.append([int((now & ~was).sum()), int((was & ~now).sum())])
    return out


def run_case(case: dict, model: str, methods: dict[str, Method], contourer, counts: Sequence[int] = CLICKS, seed: int = 0,
             tolerance_mm: float = TOLERANCE_MM, metrics: Sequence[str] = METRICS) -> dict:
    """One case and model: ``{"case", "model", "seconds", "structures": {name: {method: {clicks: figures}}}, "clicks"}``."""
    t0 = time.perf_counter()
    ct, affine = read_nifti(case["image"])
    ct = np.asarray(ct)
    ref = read_scored_reference(case, model, ct=(ct, affine))
    valid = valid_region(ref.imaged, ct.shape)
    auto = blank_slices(contourer(case["image"]).label, ref.imaged)[0]
    out = {"case": case["id"], "model": model, "structures": {}, "clicks": {}, "method_seconds": {}}
    most = max(counts)
    for name, value in model_labels(model).items():
        reference = ref.label == value
        if not reference.any():
            continue  # not contoured: not background
        start = auto == value
        out.setdefault("errors", {})[name] = error_near_surface(start, reference, affine)
        per: dict[str, dict] = {}
        first = score(start, reference, affine, tolerance_mm, metrics)
        per["auto"] = {str(n): first for n in counts}
        for label, method in methods.items():
            t = time.perf_counter()
            masks, made = click_series(method, ct, affine, start, reference, valid, most, structure_seed(seed, case["id"], name))
            out["method_seconds"][label] = out["method_seconds"].get(label, 0.0) + time.perf_counter() - t
            per[label] = {str(n): (first if n == 0 else score(masks[n], reference, affine, tolerance_mm, metrics)) for n in counts}
            out["clicks"][f"{name}/{label}"] = made
            out.setdefault("changes", {})[f"{name}/{label}"] = click_changes(masks[: len(made) + 1], reference)
        out["structures"][name] = per
    out["seconds"] = time.perf_counter() - t0
    return out


def summary_rows(records: Sequence[dict], model: str, methods: Sequence[str], counts: Sequence[int]) -> dict:
    """``{(method, clicks): summarise(...)}`` over ``records`` of one model."""
    names = list(model_labels(model))
    out = {}
    for method in methods:
        for n in counts:
            scores = {}
            for r in records:
                if r["model"] != model:
                    continue
                per = {}
                for s in names:
                    fig = r["structures"].get(s, {}).get(method, {}).get(str(n))
                    per[s] = fig if fig is not None else dict.fromkeys(METRICS, float("nan"))
                scores[r["case"]] = per
            if scores:
                out[(method, n)] = summarise([scores], names)
    return out


def write_outputs(records: Sequence[dict], out: Path, models: Sequence[str], methods: Sequence[str], counts: Sequence[int],
                  command: str, tolerance_mm: float) -> None:
    """``clicks.csv``, ``clicks.md`` and ``clicks.png`` in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "clicks.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["model", "case", "structure", "method", "clicks", *METRICS])
        for r in records:
            for s, per in r["structures"].items():
                for method, figs in per.items():
                    for n, fig in figs.items():
                        w.writerow([r["model"], r["case"], s, method, n, *(f"{fig[m]:.4f}" for m in METRICS)])
    lines = [f"# Click benchmark ({len({r['case'] for r in records})} patients)", "", f"`{command}`", "",
             f"Mean ± standard error over patients; surface Dice at {tolerance_mm:g} mm; HD95 in mm "
             "(a structure a method misses has none: counted as missed). `auto`: the automatic contour; "
             "`plain_edit`: no network; `network`: the refinement network"
             + ("; `oracle`: the mask set to the reference within the network's scope around the clicks (a ceiling, "
                "not a method)" if "oracle" in methods else "") + ".", ""]
    summaries = {m: summary_rows(records, m, methods, counts) for m in models}
    lines += error_lines(records, models)
    lines += change_lines(records, models, [m for m in methods if m != "auto"])
    if "network" in methods and 3 in counts:
        lines += check_lines(records, models, [m for m in ("network", "oracle") if m in methods])
    for model in models:
        summary = summaries[model]
        if not summary:
            continue
        for metric in METRICS:
            lines += [f"## {model}: {metric.replace('_', ' ')}", "",
                      "| structure | method | " + " | ".join(f"{n} clicks" for n in counts) + " |",
                      "| --- | --- |" + " --- |" * len(counts)]
            for s in ["mean", *model_labels(model)]:
                for method in methods:
                    cells = []
                    for n in counts:
                        fig = summary.get((method, n), {}).get((s, metric))
                        cells.append(format_figure(fig["mean"], fig["se"], metric, fig["missed"]) if fig and fig["patients"] else "-")
                    if any(c != "-" for c in cells):
                        lines.append(f"| {s} | {method} | " + " | ".join(cells) + " |")
            lines.append("")
    (out / "clicks.md").write_text("\n".join(lines) + "\n")
    plot(summaries, out / "clicks.png", methods, counts)


def check_gain(records: Sequence[dict], model: str, below: float = 0.9, clicks: int = 3, method: str = "network",
               resamples: int = 2000, seed: int = 0) -> dict | None:
    """Issue 31's server check over every patient: the mean Dice gain after ``clicks`` clicks of the
    structures whose automatic Dice is below ``below`` (the mean over those structures, as
    ``benchmarks/bench_clicks_server.py`` reports it), with a 95 % percentile bootstrap interval
    that resamples patients (a patient's structures move together). ``None`` without such a structure."""
    per_patient = []
    for r in records:
        if r["model"] != model:
            continue
        gains = [per[method][str(clicks)]["dice"] - per["auto"]["0"]["dice"] for per in r["structures"].values()
                 if method in per and str(clicks) in per[method] and per["auto"]["0"]["dice"] < below]
        if gains:
            per_patient.append(gains)
    if not per_patient:
        return None
    def mean(groups):
        return float(np.mean([g for group in groups for g in group]))
    rng = np.random.default_rng(seed)
    boot = [mean([per_patient[i] for i in rng.integers(0, len(per_patient), len(per_patient))]) for _ in range(resamples)]
    low, high = np.percentile(boot, [2.5, 97.5])
    return {"gain": mean(per_patient), "low": float(low), "high": float(high), "patients": len(per_patient),
            "structures": sum(len(g) for g in per_patient)}


def check_lines(records: Sequence[dict], models: Sequence[str], methods: Sequence[str] = ("network",)) -> list[str]:
    """Issue 31's server check (>= +0.08 after 3 clicks) over every patient of the benchmark, for
    the network (and the oracle's ceiling, where it ran)."""
    lines = ["## Issue 31's check over every patient", "",
             "Mean Dice gain after 3 clicks of the structures whose automatic Dice is below 0.9 (the server "
             "check's figure, `benchmarks/bench_clicks_server.py`, there on 5 CTs), with a 95 % bootstrap interval "
             "over patients; issue 31 asks at least +0.08.", "",
             "| model | method | gain | 95 % interval | structures | patients |", "| --- | --- | --- | --- | --- | --- |"]
    for model in models:
        for method in methods:
            c = check_gain(records, model, method=method)
            if c:
                lines.append(f"| {model} | {method} | {c['gain']:+.3f} | [{c['low']:+.3f}, {c['high']:+.3f}] | {c['structures']} | {c['patients']} |")
    return [*lines, ""]


def error_lines(records: Sequence[dict], models: Sequence[str]) -> list[str]:
    """A table of how the automatic contours err: per structure, the mean over patients of the
    share of error voxels within one voxel of the reference's surface."""
    lines = ["## How the automatic contours err", "",
             "Share of the automatic contour's error voxels (missed or over-drawn) within one in-plane voxel of the "
             "reference's surface: a boundary disagreement of one voxel, which a click at one point can hardly fix "
             "(mean over patients, and the patients).", "", "| model | structure | near the surface | patients |", "| --- | --- | --- | --- |"]
    for model in models:
        for s in model_labels(model):
            shares = [r["errors"][s]["near_surface"] for r in records if r["model"] == model and r.get("errors", {}).get(s, {}).get("near_surface") is not None]
            if shares:
                lines.append(f"| {model} | {s} | {np.mean(shares):.2f} | {len(shares)} |")
    return [*lines, ""]


def change_lines(records: Sequence[dict], models: Sequence[str], methods: Sequence[str]) -> list[str]:
    """A table of what a click does: voxels it fixes and breaks, mean over every click made (every
    patient, structure and click; the simulated clinician stops once a structure has no error)."""
    lines = ["## What a click does", "",
             "Voxels a click fixes (come to agree with the reference) and breaks (stop agreeing), mean over every click "
             "made; the share of clicks that break more than they fix.", "",
             "| model | method | clicks | fixed | broken | breaks more than it fixes |", "| --- | --- | --- | --- | --- | --- |"]
    for model in models:
        for method in methods:
            steps = np.asarray([step for r in records if r["model"] == model
                                for key, per in r.get("changes", {}).items() if key.rsplit("/", 1)[1] == method
                                for step in per], dtype=float).reshape(-1, 2)
            if len(steps):
                lines.append(f"| {model} | {method} | {len(steps)} | {steps[:, 0].mean():.1f} | {steps[:, 1].mean():.1f} | "
                             f"{float((steps[:, 1] > steps[:, 0]).mean()):.0%} |")
    return [*lines, ""]


def plot(summaries: dict, path: Path, methods: Sequence[str], counts: Sequence[int]) -> Path:
    """Mean Dice and surface Dice against clicks, a panel per model and metric."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = [m for m, s in summaries.items() if s]
    fig, axes = plt.subplots(1, 2 * max(1, len(models)), figsize=(4.2 * 2 * max(1, len(models)), 3.4), squeeze=False)
    colours = {"auto": "tab:gray", "plain_edit": "tab:orange", "network": "tab:blue", "oracle": "tab:green"}
    for i, model in enumerate(models):
        for j, metric in enumerate(("dice", "surface_dice")):
            ax = axes[0][2 * i + j]
            for method in methods:
                pts = [(n, summaries[model][(method, n)][("mean", metric)]) for n in counts if (method, n) in summaries[model]]
                if pts:
                    xs, figs = zip(*pts, strict=True)
                    ax.errorbar(xs, [f["mean"] for f in figs], yerr=[0 if np.isnan(f["se"]) else f["se"] for f in figs],
                                label=method, color=colours.get(method), marker="o", ms=3, capsize=2)
            ax.set_xlabel("simulated clicks per structure")
            ax.set_ylabel(f"mean {metric.replace('_', ' ')}")
            ax.set_ylim(0, 1)
            ax.set_title(model, fontsize=10)
            ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m contourcl.training.refine.benchmark", description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", help="the validation cases (default: <OpenKBP>/validation-pats, CONTOURCL_OPENKBP)")
    parser.add_argument("--refiner", default="apps/radonc/model/refine.pt", help="the refinement model file")
    parser.add_argument("--model-dir", default="apps/radonc/model", help="where oar.pt and gtv.pt are")
    parser.add_argument("--reach", default="", metavar="MODEL=MM,...",
                        help="how far above and below its slice a model's clicks act (default: the refinement file's)")
    parser.add_argument("--edit-radius", default="", metavar="MODEL=MM,...",
                        help="each model's edit radius for the network (mm; a model not named: the file's); "
                             "`contourcl benchmark clicks` fills it from the app's model configs, as the server reads them")
    parser.add_argument("--models", default="oar,gtv")
    parser.add_argument("--methods", default="network,plain_edit,oracle",
                        help="besides auto: network, plain_edit, oracle (a ceiling: the reference within the network's scope)")
    parser.add_argument("--clicks", default=",".join(map(str, CLICKS)))
    parser.add_argument("--out", default="results/clicks")
    parser.add_argument("--max-cases", type=int)
    parser.add_argument("--ids", help="comma-separated case ids")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tolerance", type=float, default=TOLERANCE_MM, help="surface Dice tolerance (mm)")
    parser.add_argument("--mask-prior", type=float, metavar="P",
                        help="the network's current-mask logit instead of the file's (a measurement; the server uses the file's)")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)

    import torch
    from tqdm.auto import tqdm

    from contourcl.inference import Contourer, model_version
    from contourcl.refine.refiner import Refiner

    torch.set_num_threads(args.threads)
    data = Path(args.data) if args.data else openkbp_or_exit(parser, None) / "validation-pats"
    counts = sorted({int(c) for c in args.clicks.split(",")})
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    methods = list(dict.fromkeys(m.strip() for m in args.methods.split(",") if m.strip()))
    for name in methods:
        if name not in METHODS[1:]:
            parser.error(f"unknown method {name!r}")
    refiner = Refiner.from_file(args.refiner) if {"network", "oracle"} & set(methods) else None
    if refiner is not None and args.mask_prior is not None:
        refiner.prior = float(args.mask_prior)
    plain = plain_edit_method() if "plain_edit" in methods else None
    if "plain_edit" in methods and plain is None:
        parser.error("contourcl.refine.plain_edit is not there yet: leave plain_edit out of --methods")
    out = Path(args.out)
    (out / "cases").mkdir(parents=True, exist_ok=True)
    todo = []
    for model in models:
        cases = labeled_cases(data, model)
        if args.ids:
            wanted = {i.strip() for i in args.ids.split(",")}
            cases = [c for c in cases if c["id"] in wanted]
        if args.max_cases:
            cases = cases[: args.max_cases]
        todo += [(model, c) for c in cases]
    contourers = {m: Contourer(Path(args.model_dir) / f"{m}.pt") for m in models}
    try:
        scopes = model_scopes(models, edit_radius_mm=args.edit_radius, reach_mm=args.reach)  # None fields: the file's
    except ValueError as e:
        parser.error(f"--edit-radius/--reach {e}")

    def scoped(model: str) -> dict[str, Method]:
        """Each method for ``model``: the network and the oracle with the model's click scope."""
        kwargs = scopes[model].kwargs()
        made = {"network": lambda: partial(refiner, **kwargs), "oracle": lambda: oracle_method(*refiner.scope(**kwargs)),
                "plain_edit": lambda: plain}
        return {name: made[name]() for name in methods}

    per_model = {m: scoped(m) for m in models}
    settings = {"models": {m: model_version(Path(args.model_dir) / f"{m}.pt") for m in models}, "methods": sorted(methods),
                "refiner": model_version(Path(args.refiner)) if refiner is not None else None,
                "mask_prior": refiner.prior if refiner is not None else None, "clicks": counts,
                "seed": args.seed, "tolerance": args.tolerance, "scope": {m: sc.kwargs() for m, sc in scopes.items()}}
    records = []
    t0 = time.perf_counter()
    for model, case in tqdm(todo, desc="clicks", unit="case", disable=args.no_progress):
        path = out / "cases" / f"{model}_{case['id']}.json"
        if path.is_file():
            done = json.loads(path.read_text())
            if done.get("settings") == settings:
                records.append(done)
                continue
        record = {**run_case(case, model, per_model[model], contourers[model], counts, args.seed, args.tolerance), "settings": settings}
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(record))
        tmp.replace(path)
        records.append(record)
    command = "python -m contourcl.training.refine.benchmark " + " ".join(argv if argv is not None else __import__("sys").argv[1:])
    write_outputs(records, out, models, ["auto", *methods], counts, command, args.tolerance)
    print(f"{len(records)} case-model pairs in {time.perf_counter() - t0:.0f} s; wrote {out / 'clicks.md'}, clicks.csv, clicks.png")
    print((out / "clicks.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
