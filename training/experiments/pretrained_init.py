"""Served models that start from pretraining, or the measured reason why not (issue 32, item 6).

For each model (``oar``, ``gtv``) the shipped recipe's first stage (``training/recipes/<model>.yaml``
without its refit: train on the inner training split, choose the epoch, the moving average and
flip TTA on the inner validation split) is trained once from random initialisation and once from
each pretraining checkpoint, with the same split and seed. Each file is scored on the inner
validation patients through the served path (``contourcl evaluate``, the one metric), and each
checkpoint's file is paired with random init's by patient
(:func:`contourcl.training.experiments.paired.compare_evaluations`; the unit is the patient: one
split, one seed).

**The decision rule** (issue 32): a checkpoint is *not worse* than random init when the lower end
of the paired interval of the mean Dice is at or above ``NOT_WORSE`` (-0.005). The interval is
corrected for the comparisons made (Bonferroni: level ``1 - 0.05 / m`` for ``m`` checkpoint-model
pairs). Only a checkpoint not worse is refitted on every training patient (``contourcl finetune
--recipe MODEL --init CKPT``) and shipped; otherwise the shipped files stay random init and the
report shows the numbers.

Layout of ``out`` (``contourcl benchmark pretrained-init``):

- ``models/<model>-<arm>.pt``: the stage-1 file of each arm (``random`` or a checkpoint's name),
  its resumable state beside it (``.state``); not kept in the repository;
- ``runs/<model>-<arm>.json``: its ``contourcl evaluate --json`` figures on the inner validation
  patients, with the arm, the checkpoint and the wall time (an arm with this file is done);
- ``results.md``, ``results.json``: the pairs and their verdicts.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from contourcl.files import atomic_write_text
from contourcl.models.encoder_checkpoint import input_mismatch, read_encoder
from contourcl.training.experiments.paired import compare_evaluations
from contourcl.training.recipes import load_recipe

logger = logging.getLogger(__name__)

MODELS = ("oar", "gtv")
#: the arm without a checkpoint
RANDOM = "random"
#: the least paired difference (mean Dice, lower end of the corrected interval) that is "not worse"
NOT_WORSE = -0.005


def recipe_options(model: str, overrides: Mapping[str, object] | None = None) -> dict:
    """The shipped recipe's options of ``model``, ``overrides`` winning."""
    return {**load_recipe(model), **(overrides or {})}


def stage1_argv(model: str, data: Path, out: Path, init: str | None = None, overrides: Mapping[str, object] | None = None) -> list[str]:
    """``contourcl finetune`` arguments of the shipped recipe's first stage: the recipe's options
    (``overrides`` win) without ``refit``, on ``data``, writing ``out`` with its state beside it."""
    options = recipe_options(model, overrides)
    options.pop("refit", None)
    argv = ["finetune"]
    for key, value in options.items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            argv.append(flag)
        elif value is not False and value is not None:  # 0 is a value (the seed), not an absent flag
            argv += [flag, str(value)]
    argv += ["--data", str(data), "--out", str(out), "--state", str(out) + ".state"]
    if init:
        argv += ["--init", str(init)]
    return argv


def recipe_input(model: str, overrides: Mapping[str, object] | None = None) -> tuple[tuple[float, float], tuple[float, float]]:
    """The in-plane spacing (mm) and HU window the recipe's networks see."""
    from contourcl.training.finetune.engine import FinetuneConfig

    spacing = recipe_options(model, overrides).get("spacing")
    cfg = FinetuneConfig(model=model)
    return ((float(spacing), float(spacing)) if spacing else tuple(cfg.spacing)), tuple(cfg.window)


def finished(model_file: Path) -> bool:
    """Whether ``model_file`` is a stage-1 file whose training ran to its end (a file written while
    training records ``interrupted_at_epoch``)."""
    from contourcl.models.checkpoint import read_meta

    return model_file.is_file() and "interrupted_at_epoch" not in read_meta(model_file).provenance


def _contourcl(argv: Sequence[str], log: Path, threads: int) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    with log.open("a") as f:
        done = subprocess.run([sys.executable, "-m", "contourcl.cli", *argv], stdout=f, stderr=subprocess.STDOUT, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"contourcl {argv[0]} failed (exit {done.returncode}); its log: {log}")


def run_arm(model: str, arm: str, init: str | None, data: Path, out: Path, threads: int = 2,
            overrides: Mapping[str, object] | None = None, command: str = "") -> Path:
    """One arm: the stage-1 file (trained, or resumed, unless finished), then its figures on the
    inner validation patients. Returns ``runs/<model>-<arm>.json``, which records ``command`` (the
    call that made it, printed by :func:`report`)."""
    from contourcl.models.checkpoint import read_meta

    record = out / "runs" / f"{model}-{arm}.json"
    if record.is_file():
        return record
    for sub in ("models", "runs", "logs"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    model_file = out / "models" / f"{model}-{arm}.pt"
    log = out / "logs" / f"{model}-{arm}.log"
    t0 = time.perf_counter()
    if not finished(model_file):
        logger.info("%s/%s: stage 1 of the shipped recipe (log %s)", model, arm, log)
        _contourcl(stage1_argv(model, data / "train-pats", model_file, init, overrides), log, threads)
    seconds = time.perf_counter() - t0
    ids = read_meta(model_file).provenance["val_ids"]
    figures = out / "runs" / f".{model}-{arm}.evaluate.json"
    _contourcl(["evaluate", str(model_file), "--data", str(data / "train-pats"), "--ids", ",".join(ids), "--json", str(figures)], log, threads)
    result = json.loads(figures.read_text())
    result.update(arm=arm, init=init, inner_val_ids=ids, seconds_this_call=round(seconds, 1), command=command)
    atomic_write_text(record, json.dumps(result, indent=1))
    figures.unlink()
    return record


def compare(runs: Mapping[str, Mapping[str, dict]], alpha: float = 0.05) -> list[dict]:
    """Every checkpoint arm against ``random`` per model (``runs``: model -> arm -> run record), its
    interval corrected for all the pairs made (Bonferroni), and the verdict of :data:`NOT_WORSE`."""
    pairs = [(m, a) for m, arms in runs.items() for a in arms if a != RANDOM and RANDOM in arms]
    level = 1.0 - alpha / max(1, len(pairs))
    rows = []
    for model, arm in pairs:
        for row in compare_evaluations(runs[model][arm], runs[model][RANDOM], level=level):
            row.update(model=model, arm=arm, level=level)
            if row["scope"] == "mean":
                row["not_worse"] = bool(row["ci_low"] >= NOT_WORSE)
            rows.append(row)
    return rows


def arm_commands(runs: Mapping[str, Mapping[str, dict]]) -> dict[str, list[tuple[str, str]]]:
    """The call that made each arm (``command`` -> ``[(model, arm), ...]``), in the runs' order; an
    arm whose record predates recording it under ``""``."""
    made: dict[str, list[tuple[str, str]]] = {}
    for model, arms in runs.items():
        for arm, run in arms.items():
            made.setdefault(run.get("command") or "", []).append((model, arm))
    return made


def report(out: Path, runs: Mapping[str, Mapping[str, dict]], command: str) -> Path:
    """``results.md`` and ``results.json`` of the pairs; each arm under the call that made it
    (``command`` is this call's, kept in ``results.json``)."""
    from contourcl.evaluation import summarise

    rows = compare(runs)
    lines = ["# Served models from pretraining (issue 32, item 6)", "", "Made by:", ""]
    for made_by, arms in arm_commands(runs).items():
        names = ", ".join(f"{model}/{arm}" for model, arm in arms)
        if made_by:
            lines.append(f"- {names}: `{made_by}`")
        else:
            unsaid = "its record does not say (made before records kept their command)"
            if all(arm == RANDOM for _, arm in arms):
                unsaid += "; every call for its model trains it the same way (no checkpoint, the recipe's split and seed)"
            lines.append(f"- {names}: {unsaid}")
    lines += [
        "",
        "The shipped recipe's first stage (its inner split and seed, no refit) from random init and from each "
        "pretraining checkpoint, scored on the inner validation patients through the served path. "
        f"A checkpoint is **not worse** when the lower end of the paired interval of the mean Dice is at or above {NOT_WORSE}; "
        "the intervals are percentile bootstraps over patients at the level corrected for the pairs made (Bonferroni).", "",
        "| model | arm | encoder | mean Dice (± s.e. over patients) | patients |",
        "| --- | --- | --- | --- | --- |",
    ]
    for model, arms in runs.items():
        for arm, run in arms.items():
            s = summarise([run["cases"]], sorted({k for c in run["cases"].values() for k in c}))[("mean", "dice")]
            lines.append(f"| {model} | {arm} | {run.get('init') or 'random init'} | {s['mean']:.3f} ± {s['se']:.3f} | {s['patients']} |")
    lines += ["", "| model | arm - random | structure | difference | interval | level | Wilcoxon p | patients | verdict |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        verdict = ("**not worse**" if r["not_worse"] else "worse or not shown") if r["scope"] == "mean" else ""
        lines.append(f"| {r['model']} | {r['arm']} | {r['scope']} | {r['difference']:+.3f} | [{r['ci_low']:+.3f}, {r['ci_high']:+.3f}] | "
                     f"{100 * r['level']:.2f} % | {r['p_wilcoxon']:.2g} | {r['patients']} | {verdict} |")
    atomic_write_text(out / "results.md", "\n".join(lines) + "\n")
    atomic_write_text(out / "results.json", json.dumps({"command": command, "not_worse_at": NOT_WORSE, "pairs": rows}, indent=1))
    return out / "results.md"


def run_benchmark(data: Path, out: Path, encoders: Mapping[str, str], models: Sequence[str] = MODELS, jobs: int = 1, threads: int = 2,
                  overrides: Mapping[str, object] | None = None, command: str = "", report_only: bool = False) -> Path:
    """Every model's random arm and one arm per checkpoint in ``encoders`` (name -> file), ``jobs``
    at a time, then the report."""
    arms = {RANDOM: None, **encoders}
    if RANDOM in encoders:
        raise ValueError(f"{RANDOM!r} is the arm without a checkpoint: name the checkpoint otherwise")
    for name, path in encoders.items():
        meta = read_encoder(path)[1]  # once per checkpoint
        for model in models:
            mismatch = input_mismatch(meta, *recipe_input(model, overrides))
            if mismatch:
                raise ValueError(f"--encoder {name}={path} was pretrained on other images than the {model} recipe trains on: {mismatch}")
    if not report_only:
        tasks = [(m, a, init) for m in models for a, init in arms.items()]
        with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
            for f in [pool.submit(run_arm, m, a, init, data, out, threads, overrides, command) for m, a, init in tasks]:
                f.result()
    return report(out, finished_runs(out), command)


def finished_runs(out: Path) -> dict[str, dict[str, dict]]:
    """Every finished arm in ``out`` (model -> arm -> run record), this call's or an earlier one's:
    a call for one model or checkpoint does not narrow the report."""
    runs: dict[str, dict[str, dict]] = {}
    for model in MODELS:
        for path in sorted((out / "runs").glob(f"{model}-*.json")):
            run = json.loads(path.read_text())
            runs.setdefault(model, {})[run["arm"]] = run
    return {m: dict(sorted(arms.items(), key=lambda a: a[0] != RANDOM)) for m, arms in runs.items()}
