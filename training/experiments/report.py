"""Tables, plots and overlays of ``contourcl benchmark label-efficiency`` (from its run files).

Aggregation, per model, method and ``|X_tr|``: a validation patient's score for a structure is
averaged over the draws of labeled cases; the patient's mean over structures counts only the
structures that patient's reference contours. The tables give the mean ± standard error over
patients (as the seeds' tables: it describes the spread over patients for these draws). The Dice
table adds each draw's mean and the 95 % t-interval over the draws' means, the labeled draw as
the unit; the paired tables are over draws too (:mod:`contourcl.training.experiments.paired`:
draw means, t-interval, Holm-adjusted t-test, the corrected interval that decides "resolved").

HD95 is undefined when the model misses a structure entirely; such cases are left out of the
HD95 mean and counted in the ``hd95_missed`` column (Dice and surface Dice count them as 0).
"""

from __future__ import annotations

import csv
import json
import logging
from collections import defaultdict
from dataclasses import asdict
from pathlib import Path

import numpy as np

from contourcl.data.datasets import read_scored_reference
from contourcl.data.labels import model_labels
from contourcl.data.volumes import read_nifti, to_ras
from contourcl.evaluation import METRICS, case_mean, format_figure, summarise
from contourcl.plots import _pyplot, contour_overlay
from contourcl.training.experiments.paired import PairedComparison, compare, compare_all, correct, draw_t_interval

logger = logging.getLogger(__name__)

METRIC_TITLES = {"dice": "Dice", "hd95": "HD95 (mm)", "surface_dice": "surface Dice"}


def load_runs(out: Path) -> list[dict]:
    runs = []
    for f in sorted((out / "runs").glob("*/*/*.json")):
        try:
            runs.append(json.loads(f.read_text()))
        except (OSError, json.JSONDecodeError):
            logger.warning("ignoring unreadable run file %s", f)
    return runs


def aggregate(runs: list[dict]) -> list[dict]:
    """One row per (model, method, n_labeled, structure or "mean", metric); see :func:`summarise`."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in runs:
        groups[(r["model"], r["method"], r["n_labeled"])].append(r)
    rows = []
    for (model, method, n), rs in sorted(groups.items()):
        structures = list(model_labels(model))
        summary = summarise([r["cases"] for r in rs], structures)
        for metric in METRICS:
            for s in ["mean", *structures]:
                x = summary[(s, metric)]
                rows.append({
                    "model": model, "method": method, "n_labeled": n, "structure": s, "metric": metric,
                    "mean": x["mean"], "se": x["se"], "patients": x["patients"], "draws": len(rs),
                    "draw_means": ";".join(f"{v:.4f}" for v in x["draw_means"]),
                    "hd95_missed": x["missed"] if metric == "hd95" else "",
                    "tolerance_mm": rs[0]["tolerance_mm"] if metric == "surface_dice" else "",
                })
    return rows


def _fmt(row: dict | None, metric: str) -> str:
    if row is None:
        return "-"
    return format_figure(row["mean"], row["se"], metric, row["hd95_missed"] or 0)


def _fmt_draws(row: dict | None) -> str:
    """Dice with its draws: ``mean ± se (patients); 95 % t over draws [low, high]; draws a b c``."""
    if row is None:
        return "-"
    text = _fmt(row, "dice")
    means = [float(v) for v in str(row.get("draw_means") or "").split(";") if v]
    if len(means) > 1:
        _, low, high, _ = draw_t_interval({(d, 0): v for d, v in enumerate(means)})
        text += f"; draws [{low:.3f}, {high:.3f}]"
    if means:
        text += ": " + " ".join(f"{v:.3f}" for v in means)
    return text


def _draws(scale: dict) -> str:
    draws = scale["draws"]
    if isinstance(draws, int):
        return f"{draws} draws of labeled cases per size"
    return "draws of labeled cases: " + ", ".join(f"{d} at \\|X_tr\\| = {n}" for n, d in zip(scale["sizes"], draws, strict=False))


def _paired_cell(c: PairedComparison | None) -> str:
    """``**Δ**`` (bold when resolved) ``[corrected interval]``; the draws' means; the 95 % t-interval;
    the t-test's p and its Holm adjustment; draws better."""
    if c is None:
        return "-"
    def bounds(low: float, high: float) -> str:
        return "[-]" if np.isnan(low) else f"[{low:+.3f}, {high:+.3f}]"
    head = f"{c.difference:+.3f} {bounds(c.corrected_low, c.corrected_high)}"
    if c.resolved:
        head = f"**{head}**"
    return (f"{head}; {' '.join(f'{m:+.3f}' for m in c.draw_means)}; 95 % {bounds(c.t_low, c.t_high)}; "
            f"p {c.p_t:.2g}, Holm {c.p_t_holm:.2g}; {c.draws_better}/{c.draws}")


def paired_legend(cells: int, level: float) -> str:
    return (f"Each cell: mean difference **[{100 * level:.1f} % t-interval over the draws' means, corrected for the "
            f"table's {cells} cells (Bonferroni)]**, in bold when it excludes zero (resolved); each draw's mean "
            "difference (with pretraining seeds: each draw and seed, `results.csv`); the uncorrected 95 % t-interval "
            "over the draws; the t-test's p over the draws and its Holm adjustment over the table; draws whose mean is "
            "higher. The labeled draw is the unit; `paired.csv` keeps the Wilcoxon p over patients and the bootstrap "
            "interval for reference (they hold for these draws only).")


def paired_markdown(comparisons: list[PairedComparison], model: str, methods: list[str], sizes: list[int],
                    marks: dict[str, str] | None = None) -> list[str]:
    """The paired table of one model (:mod:`contourcl.training.experiments.paired`)."""
    index = {(c.method, c.n_labeled): c for c in comparisons if c.model == model}
    if not index:
        return []
    first = next(iter(index.values()))
    n_pat = first.patients
    base = (marks or {}).get("random", "")
    lines = [f"**{model}: Dice difference to random init{base}, paired** ({n_pat} validation patients). "
             + paired_legend(first.cells, first.corrected_level), ""]
    lines.append("| pretraining | " + " | ".join(f"\\|X_tr\\| = {n}" for n in sizes) + " |")
    lines.append("|---|" + "---|" * len(sizes))
    for m in methods:
        if m != "random":
            lines.append(f"| {m}{(marks or {}).get(m, '')} | " + " | ".join(_paired_cell(index.get((m, n))) for n in sizes) + " |")
    return lines + [""]


#: SepaReg's separation ablation: superpixels against each other way of cutting slices
ABLATION = (("separeg", "separeg-grid"), ("separeg", "separeg-none"), ("separeg-grid", "separeg-none"))


def ablation_markdown(runs: list[dict], model: str) -> list[str]:
    """SepaReg's separation ablation, paired directly (where its rows were run)."""
    found = []
    for method, baseline in ABLATION:
        for n in sorted({r["n_labeled"] for r in runs if r["model"] == model and r["method"] == method}):
            c = compare(runs, model, method, n, baseline=baseline)
            if c is not None:
                found.append(c)
    if not found:
        return []
    found = correct(found)  # the ablation is its own table: corrected over its own cells
    lines = [f"| {c.method} - {c.baseline} | {c.n_labeled} | {_paired_cell(c)} |" for c in found]
    return [f"**{model}: SepaReg's separation ablation, paired** (the first minus the second). "
            + paired_legend(found[0].cells, found[0].corrected_level), "",
            "| comparison | \\|X_tr\\| | difference |", "|---|---|---|", *lines, ""]


def rule_marks(runs: list[dict], model: str) -> tuple[dict[str, str], list[str]]:
    """Issue 32, item 2: where one table's rows were trained under different rules
    (:func:`~contourcl.training.experiments.label_efficiency.training_rule`), a mark per row trained
    under the older rule and a note that says which rows and what rule; ``({}, [])`` when one rule."""
    from contourcl.training.experiments.label_efficiency import OLDER_RULE, training_rule

    rules: dict[str, set[str]] = defaultdict(set)
    older_sizes: dict[str, set[int]] = defaultdict(set)
    for r in runs:
        if r["model"] == model:
            rule = training_rule(r)
            rules[r["method"]].add(rule)
            if rule == OLDER_RULE:
                older_sizes[r["method"]].add(int(r["n_labeled"]))
    every = set().union(*rules.values()) if rules else set()
    # the scoring: records made since issue 32 name their inference path and largest-component rule
    scored: dict[str, set[int]] = defaultdict(set)
    for r in runs:
        if r["model"] == model and r.get("scored_path"):
            scored[r["method"]].add(int(r["n_labeled"]))
    mixed_scoring = bool(scored) and any(r["model"] == model and not r.get("scored_path") for r in runs)
    scoring_note = []
    if mixed_scoring:
        lc = sorted({str(r.get("largest_component")) for r in runs if r["model"] == model and r.get("scored_path")})
        where = "; ".join(f"{m} at \\|X_tr\\| = {', '.join(str(n) for n in sorted(ns))}" for m, ns in sorted(scored.items()))
        scoring_note = [f"**{model}: the rows are not scored alike.** ‡ {where}: scored through the served path "
                        f"(probabilities interpolated onto the CT's grid; largest component {', '.join(lc)}); every other run "
                        "through the earlier nearest-label path, with its model file's largest-component rule (the "
                        "largest component when the file records none). Compare their HD95 with care.", ""]
    if len(every) <= 1:
        rule = next(iter(every), "")
        marks = {m: " ‡" for m in scored} if mixed_scoring else {}
        return marks, ([f"**{model}**: every row trained under one rule: {rule}.", ""] if rule else []) + scoring_note
    older = sorted(older_sizes)
    which = "; ".join(f"{m} at \\|X_tr\\| = {', '.join(str(n) for n in sorted(older_sizes[m]))}" for m in older)
    marks = {m: " †" for m in older}
    for m in (scored if mixed_scoring else {}):
        marks[m] = marks.get(m, "") + " ‡"
    return (marks,
            [f"**{model}: the rows do not share one training rule.** † {which}: trained on {OLDER_RULE}; "
             f"every other run under the masked-slice rule. A difference between a † cell and another "
             "row's is partly a difference of code versions, not of methods.", ""] + scoring_note)


def markdown(rows: list[dict], settings: dict, comparisons: list[PairedComparison] | None = None,
             runs: list[dict] | None = None) -> str:
    """The results as Markdown: per model, mean over structures per metric, the paired comparison
    against random init, and per structure Dice."""
    index = {(r["model"], r["method"], r["n_labeled"], r["structure"], r["metric"]): r for r in rows}
    models = [m for m in settings["models"] if any(r["model"] == m for r in rows)]
    sizes = sorted({r["n_labeled"] for r in rows})
    methods = [m for m in settings["methods"] if any(r["method"] == m for r in rows)]
    s = settings["scale"]
    lines = [
        f"Scale `{s['name']}`: encoder {s['encoder']} width {s['width']}; pretraining {s['pretrain_iterations']} steps per method in total, "
        f"batch {s['pretrain_batch']}, on {s['pool'] or 'all'} training CTs; fine-tuning {s['finetune_steps']} steps, batch "
        f"{s['finetune_batch']}; {_draws(s)}. Patient-wise mean ± standard error over the "
        f"validation cases; surface Dice at {settings['tolerance_mm']:g} mm. Structures a case does not contour are skipped.",
        "",
    ]
    for model in models:
        n_pat = index.get((model, methods[0], sizes[0], "mean", "dice"), {}).get("patients", "?")
        marks, note = rule_marks(runs or [], model)
        lines += note
        for metric in METRICS:
            lines += [f"**{model}: {METRIC_TITLES[metric]}, mean over structures** ({n_pat} validation patients)", ""]
            lines.append("| pretraining | " + " | ".join(f"\\|X_tr\\| = {n}" for n in sizes) + " |")
            lines.append("|---|" + "---|" * len(sizes))
            for m in methods:
                cell = _fmt_draws if metric == "dice" else (lambda row, metric=metric: _fmt(row, metric))
                lines.append(f"| {m}{marks.get(m, '')} | " + " | ".join(cell(index.get((model, m, n, "mean", metric))) for n in sizes) + " |")
            lines.append("")
            if metric == "dice":
                lines += ["Dice cells: mean ± standard error over patients; the 95 % t-interval over the draws' means "
                          "(the labeled draw as the unit); each draw's mean.", ""]
                lines += paired_markdown(comparisons or [], model, methods, sizes, marks)
                lines += ablation_markdown(runs or [], model)
        structures = list(model_labels(model))
        if len(structures) > 1:
            n = sizes[-1]
            lines += [f"**{model}: Dice per structure, \\|X_tr\\| = {n}** (in brackets: validation patients whose reference contours it)", ""]
            counts = [index.get((model, methods[0], n, st, "dice"), {}).get("patients", 0) for st in structures]
            lines.append("| pretraining | " + " | ".join(f"{st} ({c})" for st, c in zip(structures, counts, strict=False)) + " |")
            lines.append("|---|" + "---|" * len(structures))
            for m in methods:
                lines.append(f"| {m} | " + " | ".join(_fmt(index.get((model, m, n, st, "dice")), "dice") for st in structures) + " |")
            lines.append("")
    return "\n".join(lines)


def plot_dice(rows: list[dict], model: str, methods: list[str], out: Path) -> Path:
    """Mean Dice (± SE) against the number of labeled cases, one line per method."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for m in methods:
        pts = sorted((r["n_labeled"], r["mean"], r["se"]) for r in rows
                     if r["model"] == model and r["method"] == m and r["structure"] == "mean" and r["metric"] == "dice")
        if not pts:
            continue
        n, mean, se = (np.array(v, dtype=float) for v in zip(*pts, strict=False))
        ax.errorbar(n, mean, yerr=np.nan_to_num(se), marker="o", capsize=3, label=m, linestyle="--" if m == "random" else "-")
    ax.set_xscale("log")
    sizes = sorted({r["n_labeled"] for r in rows if r["model"] == model})
    ax.set_xticks(sizes, [str(s) for s in sizes])
    ax.set_xlabel("labeled training cases |X_tr|")
    ax.set_ylabel("validation Dice (mean over structures)")
    ax.set_title(f"{model}: label efficiency on OpenKBP")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out


def model_file(run: dict, out: Path) -> Path:
    """The model file of ``run``: where its record says, or else under ``out/models/`` by the same name.

    A record holds the path its run wrote, relative to the folder the benchmark ran in or absolute;
    a results folder moved, copied or run in another working copy still finds its models there.
    """
    recorded = Path(run["model_path"])
    return recorded if recorded.is_file() else out / "models" / recorded.name


def overlays(runs: list[dict], rows: list[dict], model: str, results: Path, validation: list[dict], cases: int = 2,
             largest_component: bool = True) -> list[Path]:
    """Contours of the best method and of random init (largest |X_tr|, draw 0) on a few validation cases,
    written into ``results/overlays/`` (``largest_component``: the rule for model files that do not record one)."""
    from contourcl.inference import Contourer

    n = max((r["n_labeled"] for r in runs if r["model"] == model), default=None)
    if n is None:
        return []
    drawn = {r["method"] for r in runs if "stage" not in r}  # AGCL's stage 3 is no model file the app contours with
    means = {r["method"]: r["mean"] for r in rows
             if r["model"] == model and r["n_labeled"] == n and r["structure"] == "mean" and r["metric"] == "dice" and r["method"] in drawn}
    best = max(means, key=lambda m: -np.inf if np.isnan(means[m]) else means[m])
    written = []
    for method in dict.fromkeys([best, "random"]):
        run = next((r for r in runs if r["model"] == model and r["method"] == method and r["n_labeled"] == n and r["draw"] == 0), None)
        model_path = model_file(run, results) if run is not None else None
        if model_path is None or not model_path.is_file():
            continue
        contourer = Contourer(model_path, largest_component=largest_component)
        for case_id in sorted(run["cases"])[:cases]:
            case = next((item for item in validation if item["id"] == case_id), None)
            if case is None:
                continue
            pred = contourer(case["image"])
            ct, affine = read_nifti(case["image"])
            lab = to_ras(pred.label, pred.affine)
            reference = read_scored_reference(case, model, ct=(ct, affine))  # as scored: on the slices that image the patient
            truth = to_ras(reference.label, reference.affine)
            dice = case_mean(run["cases"][case_id], "dice")
            path = results / "overlays" / f"{model}-{method}-n{n}-{case_id}.png"
            contour_overlay(np.asarray(to_ras(ct, affine)), np.asarray(lab), pred.labels, path, truth=truth,
                            title=f"{model}, {method}, |X_tr|={n}, {case_id}: Dice {dice:.2f}")
            written.append(path)
    return written


def write_report(plan) -> list[Path]:
    """Write results.csv, results.md, a Dice plot per model and overlays into ``plan.out``."""
    out = plan.out
    runs = load_runs(out)
    if not runs:
        logger.warning("no finished runs in %s", out)
        return []
    rows = aggregate(runs)
    written = []
    csv_path = out / "results.csv"
    with csv_path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    written.append(csv_path)
    comparisons = [c for model in plan.models
                   for c in compare_all(runs, model, list(plan.methods), sorted({r["n_labeled"] for r in runs if r["model"] == model}))]
    if comparisons:
        paired_csv = out / "paired.csv"
        with paired_csv.open("w", newline="") as f:
            fields = [*asdict(comparisons[0]), "resolved"]
            w = csv.DictWriter(f, fieldnames=fields)
            w.writeheader()
            for c in comparisons:
                row = asdict(c)
                row["draw_means"] = ";".join(f"{m:.4f}" for m in c.draw_means)
                row["units"] = ";".join(c.units)
                w.writerow({**row, "resolved": c.resolved})
        written.append(paired_csv)
    md = out / "results.md"
    md.write_text(markdown(rows, plan.settings(), comparisons, runs) + "\n")
    written.append(md)
    for model in plan.models:
        if any(r["model"] == model for r in rows):
            written.append(plot_dice(rows, model, list(plan.methods), out / f"dice-vs-labeled-{model}.png"))
            (out / "overlays").mkdir(exist_ok=True)
            written += overlays(runs, rows, model, out, plan.validation.get(model, []),
                                largest_component=plan.largest_component.get(model, True))
    return written
