"""The label-efficiency benchmark: what each pretraining method buys with few labels.

``contourcl benchmark label-efficiency`` runs it: :func:`plan`, then :func:`run_benchmark`.

The seeds' experiment (SepaReg Table 2, AGCL, PolyCL), on OpenKBP head-and-neck CT:

1. **Pretrain** each method on the training cases' CTs, labels unused. The methods that need
   organ masks (AGCL's attention patches, PolyCL-O's organ presence) take them from a *coarse
   model*: the random-init model fine-tuned on the same draw of labeled cases, so they see no
   label beyond the ``|X_tr|`` cases of that draw. Their pretraining is therefore run once per
   draw; the label-free methods are pretrained once and shared by every draw and both models.
   AGCL for the single-structure ``gtv`` model contrasts the GTV against the OARs (issue 9: one
   class alone has no negative and SupCon collapses), so its coarse masks come from the ``oar``
   random-init model of the same ``|X_tr|`` and draw, then the ``gtv`` one: it sees the OAR
   labels of that draw's ``oar`` cases as well.
2. **Fine-tune** the ``oar`` model (seven OARs) and the ``gtv`` model (PTV70) with ``|X_tr|``
   = 1, 5 and 20 labeled training cases, several random draws each, for a fixed number of
   steps (no model selection: the last weights are evaluated).
3. **Evaluate** on the validation cases, never used for training or selection: Dice, HD95
   and surface Dice (:mod:`contourcl.evaluation`) on the CT's own grid, per structure, skipping
   the structures a case does not contour.
4. **Report** (:mod:`contourcl.training.experiments.report`): patient-wise mean ± standard
   error, a Markdown table, a CSV, Dice-vs-``|X_tr|`` plots and contour overlays.

Every run writes its result file under ``OUT/runs``; a second call skips what exists, so an
interrupted benchmark continues where it stopped. Independent runs go to ``--jobs`` worker
processes (``--threads`` each).

Two scales share the protocol (:data:`SCALES`): ``cpu`` (the default; small encoder, few
iterations, a 40-CT pretraining pool: about 1.5 h on 2 cores) and ``paper`` (the seeds'
ResNet-50, 128 x 128 inputs, 100k iterations, batch 32; for a GPU).

**Pretraining seeds** (issue 32): ``plan(..., pretrain_seeds=S)`` pretrains every method with
``S`` seeds (``seed``, ``seed + 1``, ...) and fine-tunes each seed's encoder on every draw of the
sizes in ``pretrain_seed_sizes`` (default: one labeled patient); the records say which
(``pretrain_seed``; seed 0 keeps the file names of a one-seed run, ``nNN-dD.json``, the others are
``nNN-dD-sK.json``), and the report counts the seed as a unit
(:func:`contourcl.training.experiments.paired.draw_t_interval`). Not yet run: 3 seeds of a
label-free method at one labeled patient are 2 more pretrainings and 2 x 5 more fine-tunings per
model beyond the table (about 25 min per model and method on 2 cores, from the runs' recorded
times; the mask-needing methods pretrain per draw: 10 more pretrainings).

Every pretraining method gets the same number of optimisation steps, ``Scale.pretrain_iterations``
in total ("100k iterations in total", SepaReg's Experimental Setup): the one-stage methods run
them in their one stage, SepaReg splits them over its stages (``budget="total"``,
:func:`contourcl.training.pretrain.separeg.stage_budget`). ``settings.json`` records each run's
planned steps.
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import logging
import multiprocessing as mp
import os
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from contourcl.data.datasets import labeled_cases
from contourcl.data.labels import model_labels
from contourcl.evaluation import DEFAULT_TOLERANCE_MM, evaluate_model_file, prepare_cases
from contourcl.models.checkpoint import read_meta

logger = logging.getLogger(__name__)

MODELS = ("oar", "gtv")


@dataclass(frozen=True)
class Scale:
    """The sizes of one benchmark scale (the protocol is the same at every scale)."""

    name: str
    encoder: str
    width: int
    image_size: int  #: pretraining input side (slices / regions)
    pretrain_iterations: int  #: per method, in total: every method gets the same budget (SepaReg splits it over its stages)
    pretrain_batch: int
    stage_options: dict = field(default_factory=dict)  #: per-method option overrides
    finetune_steps: int = 1000
    finetune_epochs: int = 10  #: the steps are split into this many epochs (BN recalibration, logs)
    finetune_batch: int = 8
    finetune_roi: int = 64  #: side of the training slices (centred on structures); inference uses whole slices
    samples_per_volume: int = 4
    lr: float = 5e-3
    #: weight of the voxel-level Siamese feature loss (see contourcl.training.finetune.voxel_siamese.DEFAULT_LAMBDA)
    voxel_siamese_lambda: float = 0.3
    pool: int | None = 40  #: training CTs used for pretraining (and to draw labeled cases from); None: all
    sizes: tuple[int, ...] = (1, 5, 20)
    #: random draws of labeled cases: one number for every size, or one per size (``sizes``' order;
    #: sizes beyond the tuple's end take its last number)
    draws: int | tuple[int, ...] = 2
    #: the rows run by default at this scale (None: :data:`DEFAULT_METHODS`)
    methods: tuple[str, ...] | None = None
    models: tuple[str, ...] | None = None  #: the models run by default (None: both)

    def draws_for(self, n: int) -> int:
        """How many draws of ``n`` labeled cases this scale runs."""
        if isinstance(self.draws, int):
            return self.draws
        return int(self.draws[min(self.sizes.index(n), len(self.draws) - 1)])  # sizes beyond: the last number


SCALES = {
    "cpu": Scale(
        name="cpu", encoder="resnet18", width=16, image_size=128, pretrain_iterations=300, pretrain_batch=16,
        finetune_steps=1000, finetune_batch=8, samples_per_volume=4, pool=40, draws=(5, 5, 3),
    ),
    # issue 9: the oar table meant to fit 10 minutes on one H100 with --jobs 4 (four rows,
    # |X_tr| 1 and 5, 3 draws: 8 pretrainings, 24 fine-tunings); a wider encoder and 13x the CPU
    # scale's pretraining samples (1000 steps of batch 64). Sized by estimate, not measured: no
    # GPU was lent to the sessions that wrote it.
    "gpu": Scale(
        name="gpu", encoder="resnet18", width=32, image_size=128, pretrain_iterations=1000, pretrain_batch=64,
        finetune_steps=600, finetune_epochs=6, finetune_batch=16, finetune_roi=96, samples_per_volume=4, lr=2e-3, pool=None,
        sizes=(1, 5), draws=3, methods=("random", "simclr", "separeg", "polycl-o"), models=("oar",),
    ),
    "paper": Scale(
        name="paper", encoder="resnet50", width=64, image_size=128, pretrain_iterations=100_000, pretrain_batch=32,
        finetune_steps=5000, finetune_epochs=25, finetune_batch=16, finetune_roi=128, samples_per_volume=8,
        lr=1e-3, pool=None, draws=3,
    ),
}


@dataclass(frozen=True)
class Method:
    """One row of the table: how the encoder is initialised and fine-tuned."""

    name: str
    pretrain: str | None = None  #: a ``contourcl pretrain`` method, or None (random init)
    needs_masks: bool = False  #: pretraining needs organ masks (taken from the draw's coarse model)
    voxel_siamese: bool = False  #: fine-tune with the voxel-level Siamese auxiliary loss
    options: tuple[tuple[str, object], ...] = ()  #: pretraining options of this row (``--set``)
    #: choose the voxel-Siamese lambda per draw on an inner split of its labeled cases (issue 32;
    #: :func:`contourcl.training.finetune.voxel_siamese.select_lambda`)
    select_lambda: bool = False
    #: AGCL's stage 3 (:mod:`contourcl.training.finetune.agcl_segmenter`): the frozen two-channel
    #: encoder, per-target ASPP heads on the draw's coarse masks, label fusion (:func:`agcl_task`)
    stage3: bool = False
    #: the row whose per-draw pretraining this one reads (one pretraining serves both rows)
    shares_pretraining: str | None = None


METHODS = {
    m.name: m
    for m in (
        Method("random"),
        Method("simclr", "simclr"),
        Method("simsiam", "simsiam"),
        Method("separeg", "separeg"),
        # AGCL's pretraining, then the whole U-Net fine-tuned from its single-channel encoder: not the
        # paper's stage 3 (frozen two-channel encoder, per-target ASPP heads, label fusion;
        # contourcl.training.finetune.agcl_segmenter), hence its own name (issue 32)
        Method("agcl-unet", "agcl", needs_masks=True),
        # AGCL as the paper builds it: its stage 3 on the same pretraining
        Method("agcl", "agcl", needs_masks=True, stage3=True, shares_pretraining="agcl-unet"),
        Method("polycl-o", "polycl-o", needs_masks=True),
        Method("polycl-s", "polycl-s"),
        Method("voxel-siamese", voxel_siamese=True),
        Method("voxel-siamese-inner", voxel_siamese=True, select_lambda=True),
        # SepaReg's separation ablation (the paper's Table 4): regular grid cells of the
        # superpixels' size, and the whole body slice as the one region
        Method("separeg-grid", "separeg", options=(("separation", "grid"),)),
        Method("separeg-none", "separeg", options=(("separation", "none"),)),
    )
}
#: the rows run unless --methods says otherwise (simsiam is SepaReg's first stage alone)
DEFAULT_METHODS = ("random", "simclr", "separeg", "agcl", "agcl-unet", "polycl-o", "polycl-s", "voxel-siamese")


# ----------------------------------------------------------------------------------- the data
def openkbp_splits(root: str | Path) -> tuple[Path, Path]:
    """``(train, validation)`` folders of the converted OpenKBP data."""
    root = Path(root)
    train, val = root / "train-pats", root / "validation-pats"
    for p in (train, val):
        if not p.is_dir():
            raise FileNotFoundError(f"{p} not found: --data must be the OpenKBP folder with train-pats/ and validation-pats/")
    return train, val


def _manifest(folder: Path) -> dict[str, dict]:
    f = folder / "manifest.json"
    if not f.is_file():
        return {}
    return {c["case"]: c for c in json.loads(f.read_text()).get("cases", [])}


def usable_cases(folder: Path, model: str) -> list[dict]:
    """Labeled cases for ``model``; for ``gtv``, only cases with a PTV70 (from the manifest)."""
    cases = labeled_cases(folder, model)
    manifest = _manifest(folder)
    if model == "gtv" and manifest:
        cases = [c for c in cases if manifest.get(c["id"], {}).get("has_target", True)]
    return cases


def pretraining_pool(train: Path, size: int | None, seed: int = 0) -> list[str]:
    """Case ids of the training CTs used for pretraining: a seeded random subset (or all)."""
    ids = sorted(c["id"] for c in labeled_cases(train, "oar"))
    if size is None or size >= len(ids):
        return ids
    rng = np.random.default_rng(seed)
    return sorted(rng.choice(ids, size=size, replace=False).tolist())


def draw_cases(cases: Sequence[dict], n: int, draw: int, seed: int = 0) -> list[dict]:
    """Draw ``draw`` of ``n`` labeled cases: reproducible, independent of the other sizes' draws."""
    if n > len(cases):
        raise ValueError(f"cannot draw {n} labeled cases from {len(cases)}")
    rng = np.random.default_rng([seed, n, draw])
    idx = rng.choice(len(cases), size=n, replace=False)
    return [cases[i] for i in sorted(idx)]


# ----------------------------------------------------------------------------------- tasks
def _write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1, default=float))
    tmp.replace(path)


def pretrain_task(spec: dict) -> dict:
    """Pretrain one encoder (``spec``: a :class:`PretrainConfig` as a dict)."""
    from contourcl.training.pretrain.base import PretrainConfig
    from contourcl.training.pretrain.trainer import pretrain

    config = PretrainConfig.from_dict(spec["config"])
    result = pretrain(config)
    return {"out": result["out"], "final_loss": result["meta"].get("final_loss")}


#: how a run's ``cases`` are scored now: on the slices that image the patient
#: (:func:`contourcl.data.volumes.imaged_slices`), implausible references set aside
#: (:mod:`contourcl.data.reference_check`). ``--rescore`` brings older records to it
SCORED_ON = "imaged slices, reference check"
#: records scored on the imaged slices before the reference check: their other figures stand
IMAGED_SLICES_ONLY = "imaged slices"
#: the inference path of records made since issue 32 (``scored_path``): the served path, whose
#: probabilities are interpolated onto the CT's grid (docs/research/served-path.md, 2026-11-27).
#: Records without it were scored through the earlier nearest-label path, with the largest-component
#: rule their model file recorded (kept only when it recorded none: the scoring's default)
SCORING_PATH = "probabilities interpolated onto the CT's grid"
#: how a run is *trained* now (the record's ``rule``): on the slices that image the patient, the
#: rule of docs/research/openkbp-data.md, "Slices that do not image the patient". A record with
#: ``cases_every_slice`` was made by the code before it, which trained on every slice
TRAINING_RULE = "masked-slice rule"
#: the rule of the records made before it (issue 32, item 2: named in the tables)
OLDER_RULE = "every slice (before the masked-slice rule)"


def training_rule(record: Mapping) -> str:
    """The rule ``record``'s run was trained under: :data:`OLDER_RULE` when it was scored on every
    slice first (``cases_every_slice``: made before the masked-slice rule), else its ``rule``."""
    if "cases_every_slice" in record:
        return OLDER_RULE
    return str(record.get("rule", TRAINING_RULE))


def _score(spec: dict) -> tuple[dict, dict]:
    """A run's saved model scored on its validation cases, as ``contourcl evaluate`` scores it:
    the per-case figures, and the reference structures the check set aside (``{case: {structure:
    reason}}``, the cases with any)."""
    model_path = Path(spec["model_path"])
    prepared = prepare_cases(spec["validation"], read_meta(model_path), keep_preprocessed=True)
    metrics = evaluate_model_file(model_path, prepared, spec["tolerance_mm"])
    return metrics, {c.id: c.set_aside for c in prepared if c.set_aside}


def finetune_task(spec: dict) -> dict:
    """Fine-tune one model on one draw, save it, evaluate it on the validation cases."""
    from contourcl.training.finetune.engine import FinetuneConfig, finetune, save_finetuned

    cfg = FinetuneConfig(**spec["finetune"])
    if cfg.init and not Path(cfg.init).is_file():
        raise FileNotFoundError(f"pretrained encoder {cfg.init} is missing")
    selection = None
    if spec.get("select_lambda"):
        import dataclasses

        from contourcl.training.finetune.voxel_siamese import select_lambda

        selection = select_lambda(spec["train"], cfg, seed=spec["draw"])
        cfg = dataclasses.replace(cfg, voxel_siamese_lambda=selection["lambda"])
    result = finetune(spec["train"], [], cfg, progress=False)
    model_path = Path(spec["model_path"])
    model_path.parent.mkdir(parents=True, exist_ok=True)
    save_finetuned(model_path, cfg, result, method=spec["method"], train_cases=[c["id"] for c in spec["train"]])
    if Path(spec["result"]).is_file():
        # the result is kept; only the weights a later pretraining reads were remade (Task.also)
        return {"result": spec["result"]}
    t0 = time.perf_counter()
    metrics, set_aside = _score(spec)
    record = _record(spec, cfg, result.seconds, time.perf_counter() - t0, result.history, metrics, set_aside, model_path)
    if selection is not None:
        record["lambda_selection"] = selection
    _write_json(Path(spec["result"]), record)
    return {"result": spec["result"]}


def _record(spec: dict, cfg, train_seconds: float, evaluate_seconds: float, history: list, metrics: dict, set_aside: dict,
            scored_model: Path) -> dict:
    """A run's result record (``scored_model``: the model file whose rules scored it)."""
    return {
        "model": cfg.model,
        "method": spec["method"],
        "n_labeled": len(spec["train"]),
        "draw": spec["draw"],
        "train_cases": [c["id"] for c in spec["train"]],
        "init": cfg.init,
        "model_path": str(spec["model_path"]),
        "tolerance_mm": spec["tolerance_mm"],
        "labels": model_labels(cfg.model),
        "seconds": {"finetune": train_seconds, "evaluate": evaluate_seconds},
        "history": history,
        "cases": metrics,
        "set_aside": set_aside,
        "scored_on": SCORED_ON,
        "pretrain_seed": spec.get("pretrain_seed", 0),
        "rule": TRAINING_RULE,
        "scored_path": SCORING_PATH,
        "largest_component": read_meta(scored_model).largest_component,
    }


#: AGCL's stage-3 heads are trained as the paper trains them: "Adam optimizer with batch size of 4
#: and learning rate of 10^-4" (appendix 6.2; AdamW without weight decay is Adam), for the table's steps
AGCL_HEADS = {"lr": 1e-4, "batch_size": 4, "weight_decay": 0.0}


def agcl_task(spec: dict) -> dict:
    """AGCL's stage 3 on one draw (:mod:`contourcl.training.finetune.agcl_segmenter`): the heads
    trained on the draw's cases over the frozen two-channel encoder of its AGCL pretraining, the
    draw's random-init model giving the coarse masks; scored through the served path."""
    from contourcl.training.finetune.agcl_segmenter import finetune_agcl, load_agcl, save_agcl, stage3_scores
    from contourcl.training.finetune.engine import FinetuneConfig

    cfg = FinetuneConfig(**spec["finetune"])
    for path in (spec["encoder_2ch"], spec["coarse_model"]):
        if not Path(path).is_file():
            raise FileNotFoundError(f"{path} is missing")
    model_path = Path(spec["model_path"])
    saved = load_agcl(model_path) if model_path.is_file() else None
    if saved is not None and (saved[1]["encoder_2ch"], saved[1]["coarse_model"]) == (str(spec["encoder_2ch"]), str(spec["coarse_model"])):
        result = saved[0]  # trained by an earlier call of this task (its record removed to score it again)
    else:
        result = finetune_agcl(spec["train"], [], spec["encoder_2ch"], spec["coarse_model"], cfg, progress=False)
        model_path.parent.mkdir(parents=True, exist_ok=True)
        save_agcl(model_path, cfg.model, result, spec["encoder_2ch"], spec["coarse_model"])
    t0 = time.perf_counter()
    metrics, set_aside = stage3_scores(result.segmenter, spec["coarse_model"], spec["validation"], cfg.roi[0], spec["tolerance_mm"])
    record = _record(spec, cfg, result.seconds, time.perf_counter() - t0, result.history, metrics, set_aside, Path(spec["coarse_model"]))
    record.update(stage=3, encoder_2ch=str(spec["encoder_2ch"]), coarse_model=str(spec["coarse_model"]), heads_optimiser=dict(AGCL_HEADS),
                  patch=cfg.roi[0])
    _write_json(Path(spec["result"]), record)
    return {"result": spec["result"]}


def without_set_aside(cases: dict, set_aside: dict) -> dict:
    """Per-case figures with the structures the reference check sets aside (``{case: {structure:
    reason}}``) marked not contoured (``nan``), as :func:`_score` scores them now. The other
    structures' figures do not change: the contour and their references are the same."""
    return {cid: {name: ({m: float("nan") for m in figures} if name in set_aside.get(cid, {}) else figures)
                  for name, figures in per_structure.items()} for cid, per_structure in cases.items()}


def rescore(p: Plan, progress: bool = True) -> list[str]:
    """Bring the finished runs scored under older rules to :data:`SCORED_ON`.

    A record scored on the imaged slices (:data:`IMAGED_SLICES_ONLY`) only has the structures the
    reference check sets aside marked not contoured (:func:`without_set_aside`; which, and why, in
    ``set_aside``; the figures before are in the repository's history): no model runs. A record
    scored on every slice (no ``scored_on``) is scored again from its saved model (the old figures
    kept as ``cases_every_slice``). Each record is written when done, so a stopped call resumes. Returns
    the runs that could not be scored again (their model file is gone).
    """
    from contourcl.data.datasets import read_scored_reference

    todo = []
    for t in p.tasks:
        if t.fn is finetune_task and t.output.is_file():
            record = json.loads(t.output.read_text())
            if record.get("scored_on") != SCORED_ON:
                todo.append((t, record))
    set_aside: dict[tuple[str, str], dict] = {}  # (model, case id) -> {structure: reason}
    missing = []
    for t, record in tqdm(todo, desc="re-score", disable=not progress):
        t0 = time.perf_counter()
        if record.get("scored_on") == IMAGED_SLICES_ONLY:
            model = record["model"]
            for case in t.spec["validation"]:
                if (model, case["id"]) not in set_aside:
                    set_aside[(model, case["id"])] = read_scored_reference(case, model).set_aside
            faults = {cid: f for (m, cid), f in set_aside.items() if m == model and f and cid in record["cases"]}
            record["cases"] = without_set_aside(record["cases"], faults)
            record["set_aside"] = faults
        elif not Path(t.spec["model_path"]).is_file():
            missing.append(t.key)
            continue
        else:
            record["cases_every_slice"] = record["cases"]
            record["cases"], record["set_aside"] = _score(t.spec)
        record["scored_on"] = SCORED_ON
        record.setdefault("seconds", {})["rescore"] = time.perf_counter() - t0
        _write_json(t.output, record)
    if missing:
        logger.warning("%d run(s) could not be scored again, their model file is missing: %s", len(missing), ", ".join(missing))
    return missing


@dataclass
class Task:
    key: str
    fn: Callable[[dict], dict]
    spec: dict
    output: Path  #: the task is done when this file exists (and ``also``)
    deps: tuple[str, ...] = ()
    #: files later tasks read that are not kept with the results (a coarse model's weights):
    #: when one is missing, the task runs again to remake it, without rewriting ``output``
    also: tuple[Path, ...] = ()
    #: its output is read only by later tasks (a pretrained checkpoint), no result of the table:
    #: it runs only when an unfinished task needs it (:func:`needed`)
    intermediate: bool = False

    def finished(self) -> bool:
        return self.output.exists() and all(p.exists() for p in self.also)


def needed(tasks: Sequence[Task]) -> set[str]:
    """The keys of the tasks that must run: every missing result (the ``output`` of a task that is
    not ``intermediate``) and, transitively, every unfinished task one of them depends on.

    A checkpoint whose fine-tunings are all recorded, or a coarse model whose weights are gone
    but whose dependents are all finished, is not made again.
    """
    by_key = {t.key: t for t in tasks}
    todo = [t for t in tasks if not t.intermediate and not t.output.exists()]
    keys: set[str] = set()
    while todo:
        t = todo.pop()
        if t.key not in keys:
            keys.add(t.key)
            todo += [by_key[d] for d in t.deps if d in by_key and not by_key[d].finished()]
    return keys


def _init_worker(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def run_tasks(tasks: Sequence[Task], jobs: int = 1, threads: int = 1, progress: bool = True) -> list[str]:
    """Run ``tasks`` in dependency order, ``jobs`` at a time; returns the keys that failed.

    Only the :func:`needed` tasks run: finished ones and unneeded intermediate ones are skipped;
    a failed task's dependents are not run.
    """
    wanted = needed(tasks)
    done = {t.key for t in tasks if t.key not in wanted}
    failed: list[str] = []
    pending = [t for t in tasks if t.key in wanted]
    bar = tqdm(total=len(tasks), initial=len(done), desc="label-efficiency", unit="run", disable=not progress)

    blocked_keys: set[str] = set()

    def blocked(t: Task) -> bool:
        return any(d in failed or d in blocked_keys for d in t.deps)

    executor = None
    if jobs > 1:
        executor = cf.ProcessPoolExecutor(jobs, mp_context=mp.get_context("spawn"), initializer=_init_worker, initargs=(threads,))
    else:
        _init_worker(threads)
    running: dict[cf.Future, Task] = {}
    try:
        while pending or running:
            for t in list(pending):
                if blocked(t):
                    pending.remove(t)
                    blocked_keys.add(t.key)
                    logger.error("skipped %s: a run it needs failed", t.key)
                    continue
                if all(d in done for d in t.deps) and (executor is None or len(running) < jobs):
                    pending.remove(t)
                    if executor is None:
                        _run_inline(t, done, failed)
                        bar.update(1)
                    else:
                        running[executor.submit(t.fn, t.spec)] = t
            if not running:
                if pending and not any(all(d in done for d in t.deps) for t in pending):
                    break  # nothing can start: dependencies missing from the graph
                continue
            finished, _ = cf.wait(running, return_when=cf.FIRST_COMPLETED)
            for fut in finished:
                t = running.pop(fut)
                try:
                    fut.result()
                    done.add(t.key)
                    logger.info("done %s", t.key)
                except Exception:  # noqa: BLE001 - one failed run must not stop the others
                    logger.exception("run %s failed", t.key)
                    failed.append(t.key)
                bar.update(1)
    finally:
        if executor is not None:
            executor.shutdown(cancel_futures=True)
        bar.close()
    return failed + sorted(blocked_keys)


def _run_inline(t: Task, done: set, failed: list) -> None:
    try:
        t.fn(t.spec)
        done.add(t.key)
    except Exception:  # noqa: BLE001
        logger.exception("run %s failed", t.key)
        failed.append(t.key)


# ----------------------------------------------------------------------------------- the plan
@dataclass
class Plan:
    """Everything one benchmark call does (see :func:`plan`)."""

    out: Path
    scale: Scale
    models: tuple[str, ...]
    methods: tuple[str, ...]
    tolerance_mm: float
    seed: int = 0
    device: str | None = None
    #: per model, the largest-component rule its model files record (the app's model config)
    largest_component: dict[str, bool] = field(default_factory=dict)
    tasks: list[Task] = field(default_factory=list)
    validation: dict[str, list[dict]] = field(default_factory=dict)
    pretrain_seeds: int = 1  #: pretraining seeds per method (issue 32; see the module docstring)
    pretrain_seed_sizes: tuple[int, ...] = (1,)  #: the sizes whose draws every seed's encoder is fine-tuned on

    def settings(self) -> dict:
        out = {
            "scale": asdict(self.scale), "models": list(self.models), "methods": list(self.methods),
            "tolerance_mm": self.tolerance_mm, "seed": self.seed, "pretrain_steps": self.pretrain_steps(),
        }
        if self.pretrain_seeds > 1:
            out.update(pretrain_seeds=self.pretrain_seeds, pretrain_seed_sizes=list(self.pretrain_seed_sizes))
        return out

    def pretrain_steps(self) -> dict[str, dict[str, int]]:
        """Per pretraining run, the steps its method plans per stage (or group of stages)."""
        from contourcl.training.pretrain.base import PretrainConfig
        from contourcl.training.pretrain.trainer import get_method

        out = {}
        for t in self.tasks:
            if t.fn is pretrain_task:
                config = PretrainConfig.from_dict(t.spec["config"])
                out[t.key.removeprefix("pretrain/")] = get_method(config.method).planned_iterations(config)
        return out


def _pretrain_config(plan: Plan, method: str, images: list[str], out: Path, options: dict | None = None, seed: int = 0) -> dict:
    s = plan.scale
    return {
        "method": method, "images": images, "out": str(out), "encoder": s.encoder, "width": s.width,
        "image_size": s.image_size, "batch_size": s.pretrain_batch, "iterations": s.pretrain_iterations,
        "checkpoint_every": 0, "log_every": 100, "num_workers": 0, "seed": plan.seed + seed, "device": plan.device,
        "cache_dir": str(plan.out / "cache"), "progress": False,
        "options": {**s.stage_options.get(method, {}), **(options or {})},
    }


def _finetune_config(plan: Plan, model: str, method: Method, init: str | None, draw: int) -> dict:
    s = plan.scale
    return {
        "model": model, "net": {"encoder": s.encoder, "width": s.width}, "max_epochs": s.finetune_epochs,
        "steps_per_epoch": max(1, s.finetune_steps // s.finetune_epochs), "batch_size": s.finetune_batch,
        "roi": (s.finetune_roi, s.finetune_roi),
        "samples_per_volume": s.samples_per_volume, "lr": s.lr, "seed": plan.seed + draw, "init": init,
        "voxel_siamese": method.voxel_siamese, "voxel_siamese_lambda": s.voxel_siamese_lambda,
        "largest_component": plan.largest_component.get(model),
    }


def _seed_tag(k: int) -> str:
    """File and task suffix of pretraining seed ``k`` (none for seed 0: a one-seed run's names)."""
    return f"-s{k}" if k else ""


def _add_finetune(p: Plan, model: str, name: str, method: Method, n: int, draw: int, k: int, cases: list[dict],
                  coarse: Path, tag: str, pool_images: list[str]) -> None:
    """The fine-tuning run of one row, draw and pretraining seed ``k`` (and its pretraining, when
    the row's pretraining needs the draw's masks)."""
    st = _seed_tag(k)
    deps: tuple[str, ...] = ()
    init = None
    if method.pretrain and method.needs_masks:
        if "random" not in p.methods:
            raise ValueError(f"{name} takes its organ masks from the random-init model: keep 'random' in --methods")
        owner = method.shares_pretraining or name
        ckpt = p.out / "pretrain" / f"{owner}-{model}-n{n:02d}-d{draw}{st}.pt"
        targets = list(model_labels(model)) if model == "oar" else ["GTV"]
        options = {"coarse_model": str(coarse), ("targets" if method.pretrain == "agcl" else "organs"): targets}
        pre_deps: tuple[str, ...] = (f"finetune/random/{tag}",)
        if method.pretrain == "agcl" and model != "oar":
            # AGCL on a single structure needs negatives (issue 9): the OARs,
            # from the oar model of the same draw, then the target's own model
            if "oar" not in p.models:
                raise ValueError(f"agcl on the {model} model contrasts it against the OARs: keep 'oar' in --models")
            oar_coarse = p.out / "models" / f"oar-random-n{n:02d}-d{draw}.pt"
            options["coarse_model"] = [str(oar_coarse), str(coarse)]
            options["negatives"] = list(model_labels("oar"))
            pre_deps = (f"finetune/random/oar/n{n:02d}-d{draw}", *pre_deps)
        key = f"pretrain/{owner}/{tag}{st}"
        if not any(t.key == key for t in p.tasks):  # a row sharing it may have planned it
            p.tasks.append(Task(key, pretrain_task, {"config": _pretrain_config(p, method.pretrain, pool_images, ckpt, options, k)},
                                ckpt, deps=pre_deps, intermediate=True))
        deps, init = (key,), str(ckpt)
    elif method.pretrain:
        ckpt = p.out / "pretrain" / f"{name}{st}.pt"
        deps, init = (f"pretrain/{name}{st}",), str(ckpt)
    result = p.out / "runs" / model / name / f"n{n:02d}-d{draw}{st}.json"
    spec = {
        "method": name, "draw": draw, "train": cases, "validation": p.validation[model],
        "finetune": _finetune_config(p, model, method, init, draw),
        "model_path": str(p.out / "models" / f"{model}-{name}-n{n:02d}-d{draw}{st}.pt"),
        "result": str(result), "tolerance_mm": p.tolerance_mm, "pretrain_seed": k,
        "select_lambda": method.select_lambda,
    }
    if method.stage3:
        from contourcl.training.pretrain.agcl import two_channel_path

        spec.update(encoder_2ch=str(two_channel_path(ckpt)), coarse_model=str(coarse),
                    model_path=str(p.out / "models" / f"{model}-{name}-n{n:02d}-d{draw}{st}.agcl.pt"))
        spec["finetune"].update(AGCL_HEADS, init=spec["encoder_2ch"])  # the record names the encoder the heads sit on
        p.tasks.append(Task(f"finetune/{name}/{tag}{st}", agcl_task, spec, result, (*deps, f"finetune/random/{tag}")))
        return
    needed = (Path(spec["model_path"]),) if name == "random" and any(METHODS[m].needs_masks for m in p.methods) else ()
    p.tasks.append(Task(f"finetune/{name}/{tag}{st}", finetune_task, spec, result, deps, also=needed))


def plan(data: str | Path, out: str | Path, scale: Scale, models: Sequence[str] = MODELS, methods: Sequence[str] = DEFAULT_METHODS,
         tolerance_mm: float = DEFAULT_TOLERANCE_MM, seed: int = 0, device: str | None = None,
         largest_component: Mapping[str, bool] | None = None, pretrain_seeds: int = 1,
         pretrain_seed_sizes: Sequence[int] = (1,)) -> Plan:
    """The runs of one benchmark, with their dependencies (nothing is run).

    ``largest_component``: per model, the rule its model files record (the app's model config).
    ``pretrain_seeds``: pretrain each method with this many seeds; the extra seeds' encoders are
    fine-tuned on the draws of ``pretrain_seed_sizes`` (see the module docstring).
    """
    if pretrain_seeds < 1:
        raise ValueError(f"pretrain_seeds must be at least 1, not {pretrain_seeds}")
    for m in models:
        model_labels(m)
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; known: {sorted(METHODS)}")
    train, val = openkbp_splits(data)
    p = Plan(Path(out), scale, tuple(models), tuple(methods), float(tolerance_mm), seed, device, dict(largest_component or {}),
             pretrain_seeds=int(pretrain_seeds), pretrain_seed_sizes=tuple(int(n) for n in pretrain_seed_sizes))
    pool = set(pretraining_pool(train, scale.pool, seed))
    pool_images = sorted(c["image"] for c in labeled_cases(train, "oar") if c["id"] in pool)
    # label-free pretraining: once, shared by every draw and model
    for name in p.methods:
        method = METHODS[name]
        if method.pretrain and not method.needs_masks:
            for k in range(p.pretrain_seeds):
                ckpt = p.out / "pretrain" / f"{name}{_seed_tag(k)}.pt"
                p.tasks.append(Task(f"pretrain/{name}{_seed_tag(k)}", pretrain_task,
                                    {"config": _pretrain_config(p, method.pretrain, pool_images, ckpt, dict(method.options), k)}, ckpt,
                                    intermediate=True))
    for model in p.models:
        labeled = [c for c in usable_cases(train, model) if c["id"] in pool]
        p.validation[model] = usable_cases(val, model)
        for n in scale.sizes:
            for draw in range(scale.draws_for(n)):
                cases = draw_cases(labeled, n, draw, seed)
                tag = f"{model}/n{n:02d}-d{draw}"
                coarse = p.out / "models" / f"{model}-random-n{n:02d}-d{draw}.pt"
                for name in p.methods:
                    method = METHODS[name]
                    seeds = range(p.pretrain_seeds if method.pretrain and n in p.pretrain_seed_sizes else 1)
                    for k in seeds:
                        _add_finetune(p, model, name, method, n, draw, k, cases, coarse, tag, pool_images)
    # the random-init runs first (the mask-needing pretrainings wait for them), then the label-free
    # pretrainings, then size by size (smallest first) and draw by draw, each draw's pretrainings
    # before its fine-tunings: a benchmark stopped early has whole draws of its smallest sizes
    p.tasks.sort(key=_order)
    return p


def _order(t: Task) -> tuple:
    tag = re.search(r"/n(\d+)-d(\d+)(?:-s\d+)?$", t.key)
    size, draw = (int(tag[1]), int(tag[2])) if tag else (0, 0)
    return (not t.key.startswith("finetune/random/"), size, draw, not t.key.startswith("pretrain/"))


# ----------------------------------------------------------------------------------- running it
def run_benchmark(p: Plan, jobs: int | None = None, threads: int | None = None, report_only: bool = False,
                  rescore_runs: bool = False) -> tuple[list[Path], list[str]]:
    """Run the plan's unfinished runs and write the report; returns ``(written files, failed runs)``.

    ``jobs`` runs at a time (default: the CPU cores on CPU, 1 on a GPU) with ``threads`` torch
    threads each (default: cores / jobs); ``report_only`` runs nothing and rebuilds the report;
    ``rescore_runs`` runs nothing new but scores the finished runs scored before the masked-slice
    rule again (:func:`rescore`; the runs it cannot score are returned as failed).
    """
    import torch

    from contourcl.training.experiments.report import write_report

    p.out.mkdir(parents=True, exist_ok=True)
    settings = p.settings()
    settings_file = p.out / "settings.json"
    if settings_file.is_file() and json.loads(settings_file.read_text()) != json.loads(json.dumps(settings)):
        logger.warning("%s holds runs made with other settings; runs that exist are kept, delete the folder to start over", p.out)
    _write_json(settings_file, settings)
    failed: list[str] = []
    if rescore_runs:
        failed = rescore(p)
    elif not report_only:
        cores = os.cpu_count() or 1
        gpu = (p.device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
        jobs = jobs or (1 if gpu else max(1, cores))
        threads = threads or max(1, cores // jobs)
        logger.info("%d runs (%d done or not needed), %d at a time with %d thread(s) each, in %s",
                    len(p.tasks), len(p.tasks) - len(needed(p.tasks)), jobs, threads, p.out)
        t0 = time.perf_counter()
        failed = run_tasks(p.tasks, jobs, threads)
        logger.info("runs finished in %.1f min", (time.perf_counter() - t0) / 60)
    return write_report(p), failed
