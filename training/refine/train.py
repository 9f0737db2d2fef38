"""Train the click refinement network by simulating a clinician, on OpenKBP's training patients.

    python -m contourcl.training.refine.train --work DIR [--data DIR] [--out apps/radonc/model/refine.pt]
        [--steps 2000] [--minutes M] [--batch-episodes 4] [--slices 4] [--lr 1e-3] [--mask-prior P] [--edit-radius 20]
        [--reach 7.5] [--model-edit-radius gtv=40] [--model-reach gtv=25] [--context] [--init FILE] [--seed 0] [--threads 2] [--device cpu|cuda] [--holdout 5] [--eval-every 250] [--max-cases N] [--no-progress]

``--work`` (outside the repository) keeps the cached cases (:mod:`.cache`: the CT, references and
the shipped models' automatic contours on the network's grid, computed once), the training state
(``state.pt``: written every ``--eval-every`` steps and at the end; a rerun resumes after its
last step, each step's draws seeded by ``--seed`` and the step) and the log (``history.jsonl``).

Each step draws ``--batch-episodes`` episodes. An episode: a training case, a model (``oar`` or
``gtv``, the ``gtv`` structure being PTV70) and a structure its reference contours (the others are
not contoured, not background: never trained on), in a 96 x 96 pixel window around it; a start
(half the time the shipped model's automatic contour, otherwise the reference perturbed: dilated,
eroded, shifted, a piece removed); then 1-5 rounds of: the simulated clinician's click at the
centre of the largest error region (:func:`contourcl.refine.simulator.next_click`), and, but for
the last round, the network's own answer on the slices the clicks reach (``--reach`` mm above
and below), kept within ``--edit-radius`` mm of the clicks as the served
:class:`~contourcl.refine.refiner.Refiner` keeps it; a model's own scope
(``--model-edit-radius``, ``--model-reach``: its app config's, :class:`~contourcl.refine.encoding.ClickScope`;
``contourcl train-refiner`` fills them from the app) replaces the file's for its episodes and in
the held-out figure, as the server applies it. ``--init``: continue from a refinement file (its
weights; the schedule starts anew). ``--context``: the network sees the CT and the current mask on
the slices below and above each slice too (:data:`contourcl.refine.network.CONTEXT_CHANNELS`; a
file without them continues with their weights at zero). The loss (BCE + Dice) is on ``--slices`` of the slices the clicks reach (half of them the last
click's), against the reference, where the clicks may change the mask (the rest is the current
mask by construction). The network's output is added to ``--mask-prior`` times the current mask
in -1/+1 (:func:`contourcl.refine.network.refine_logits`). ``--cases`` held out of the training run: ``--holdout`` training patients
(``validation-pats`` are never used); every ``--eval-every`` steps the mean Dice after 3
simulated clicks per structure on them, from the automatic contour through the served path
(:class:`contourcl.refine.refiner.Refiner`), is measured; the best is kept and written to
``--out`` (atomically) only if it beats both the plain edit's (:mod:`contourcl.refine.plain_edit`)
and the automatic contour's on those cases by :data:`GATE_MIN_GAIN`: clicks that do not pay are
not shipped.

CPU by default (``--threads`` torch threads); on a GPU (``--device cuda``) mixed precision.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import subprocess
import time
from collections.abc import Sequence
from functools import partial
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

from contourcl.data.datasets import labeled_cases, openkbp_or_exit
from contourcl.files import atomic_copy, sha256_file
from contourcl.models.checkpoint import load_model, save_model
from contourcl.refine.encoding import CLICK_REACH_MM, EDIT_RADIUS_MM, ClickScope, axial_maps, edit_region, model_scopes
from contourcl.refine.network import (
    MASK_PRIOR_LOGIT,
    from_shipped,
    has_context,
    refine_logits,
    refine_meta,
    with_context,
)
from contourcl.refine.refiner import WINDOW as CROP
from contourcl.refine.refiner import Refiner, neighbours, reached_slices, run_network
from contourcl.refine.simulator import next_click
from contourcl.training.refine.benchmark import plain_edit_method, run_case
from contourcl.training.refine.cache import MODELS, build_cache, load_case

logger = logging.getLogger(__name__)

#: share of episodes on the gtv model's one structure (PTV70); the rest on oar's seven
GTV_SHARE = 0.35
#: share of episodes starting from the automatic contour (the rest: a perturbed reference)
AUTO_SHARE = 0.5
#: the held-out figure: mean Dice after this many clicks per structure
GATE_CLICKS = 3
#: the Dice the network must gain after GATE_CLICKS clicks over the better of the plain edit and the automatic contour
GATE_MIN_GAIN = 0.01


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=Path(__file__).resolve().parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def held_out(ids: Sequence[str], n: int, seed: int = 0) -> list[str]:
    """``n`` of ``ids`` (sorted, drawn with ``seed``): the cases the training run never sees."""
    ids = sorted(ids)
    rng = np.random.default_rng(seed + 31)
    return sorted(rng.choice(ids, size=min(n, len(ids)), replace=False).tolist()) if n else []


def perturb(ref: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The reference mask ``(h, w, D)`` with an error a model could make: dilated, eroded, shifted,
    a piece removed (one or two of them)."""
    mask = ref.copy()
    for kind in rng.choice(["dilate", "erode", "shift", "piece"], size=int(rng.integers(1, 3)), replace=False):
        if kind == "dilate":
            n = int(rng.integers(1, 4))
            mask = ndimage.binary_dilation(mask, structure=np.ones((3, 3, 1), bool), iterations=n)
        elif kind == "erode":
            n = int(rng.integers(1, 3))
            eroded = ndimage.binary_erosion(mask, structure=np.ones((3, 3, 1), bool), iterations=n)
            mask = eroded if eroded.any() else mask
        elif kind == "shift":
            shift = (int(rng.integers(-4, 5)), int(rng.integers(-4, 5)), int(rng.integers(-2, 3)))
            mask = np.roll(mask, shift, axis=(0, 1, 2))
        else:  # a piece removed: the slices above or below a level, or a ball
            zs = np.nonzero(mask.any(axis=(0, 1)))[0]
            if len(zs) > 2:
                cut = int(rng.integers(zs[0] + 1, zs[-1] + 1))
                if rng.random() < 0.5:
                    span = int(rng.integers(1, max(2, (zs[-1] - zs[0]) // 2)))
                    lo, hi = (cut, cut + span) if rng.random() < 0.5 else (cut - span, cut)
                    mask[:, :, max(0, lo):max(0, hi)] = False
                else:
                    pts = np.argwhere(mask)
                    c = pts[rng.integers(len(pts))]
                    r = float(rng.uniform(3, 8))
                    g = np.ogrid[: mask.shape[0], : mask.shape[1], : mask.shape[2]]
                    mask &= ((g[0] - c[0]) ** 2 + (g[1] - c[1]) ** 2 + (3 * (g[2] - c[2])) ** 2) > r * r
    return mask


class Episodes:
    """Draws training episodes from the cached cases (held in memory)."""

    def __init__(self, paths: Sequence[Path]):
        self.cases = [load_case(p) for p in paths]
        self.pairs = {m: [(i, int(v)) for i, c in enumerate(self.cases) for v in c[f"{m}_present"]] for m in MODELS}

    def draw(self, rng: np.random.Generator) -> dict:
        model = "gtv" if rng.random() < GTV_SHARE and self.pairs["gtv"] else "oar"
        i, value = self.pairs[model][int(rng.integers(len(self.pairs[model])))]
        case = self.cases[i]
        ref_full = case[f"{model}_ref"] == value
        pts = np.argwhere(ref_full)
        centre = (pts.min(0) + pts.max(0)) // 2
        h, w, _ = ref_full.shape
        box = []
        for c, n in zip(centre[:2], (h, w), strict=True):
            lo = int(np.clip(c - CROP // 2 + rng.integers(-12, 13), 0, max(0, n - CROP)))
            box.append(slice(lo, lo + CROP))
        image = case["image"][box[0], box[1]].astype(np.float32)
        ref = ref_full[box[0], box[1]]
        start = (case[f"{model}_auto"][box[0], box[1]] == value) if rng.random() < AUTO_SHARE else perturb(ref, rng)
        if rng.random() < 0.5:  # left-right mirror: one structure at a time, nothing to swap
            image, ref, start = image[::-1], ref[::-1], start[::-1]
        pad = [(0, CROP - image.shape[0]), (0, CROP - image.shape[1]), (0, 0)]
        image, ref, start = (np.pad(np.ascontiguousarray(a), pad) for a in (image, ref, start))
        return {"image": image, "ref": ref, "mask": start & case["imaged"][None, None], "spacing": case["spacing"],
                "valid": case["imaged"][None, None, :], "model": model}


def episode_inputs(ep: dict, mask: np.ndarray, pos: list, neg: list, zs: np.ndarray, reach_mm: float = CLICK_REACH_MM,
                   context: bool = False) -> torch.Tensor:
    """The network's input ``(len(zs), C, h, w)`` of an episode's slices ``zs`` (C: 4, or 8 with
    slice ``context``, :func:`contourcl.refine.network.input_channels`)."""
    shape, pixel, slice_mm = ep["image"].shape, ep["spacing"][:2], float(ep["spacing"][2])
    maps = [axial_maps(np.asarray(p, dtype=np.float64).reshape(-1, 3), shape, pixel, slice_mm, slices=zs, reach_mm=reach_mm)
            for p in (pos, neg)]
    extra = []
    if context:
        below, above = neighbours(zs, shape[2])
        extra = [ep["image"][:, :, below], ep["image"][:, :, above], mask[:, :, below].astype(np.float32), mask[:, :, above].astype(np.float32)]
    stack = np.stack([ep["image"][:, :, zs], mask[:, :, zs].astype(np.float32), *maps, *extra])  # (C, h, w, n), float32
    return torch.from_numpy(np.ascontiguousarray(stack.transpose(3, 0, 1, 2)))


def episode_region(ep: dict, points: list, zs: np.ndarray, edit_radius_mm: float | None, reach_mm: float = CLICK_REACH_MM) -> np.ndarray:
    """Where the clicks ``points`` may change an episode's mask on its slices ``zs``: ``(h, w, len(zs))``."""
    shape = ep["image"].shape
    if edit_radius_mm is None:
        return np.ones((*shape[:2], len(zs)), dtype=bool)
    return edit_region(np.asarray(points, dtype=np.float64).reshape(-1, 3), shape, ep["spacing"][:2], float(ep["spacing"][2]),
                       slices=zs, radius_mm=edit_radius_mm, reach_mm=reach_mm)


def play(network: torch.nn.Module, ep: dict, rng: np.random.Generator, slices: int, device: torch.device,
         prior: float = MASK_PRIOR_LOGIT, edit_radius_mm: float | None = EDIT_RADIUS_MM,
         reach_mm: float = CLICK_REACH_MM) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """Run an episode's clicks and the network's answers (on the slices within ``reach_mm`` of a
    click, kept within ``edit_radius_mm`` of the clicks, as the served :class:`Refiner` keeps them);
    the training slices' inputs, targets and where the loss counts (where the clicks may change the
    mask)."""
    rounds = int(rng.integers(1, 6))
    context = has_context(network)
    mask, pos, neg = ep["mask"].copy(), [], []
    last = None
    for r in range(rounds):
        click = next_click(mask, ep["ref"], ep["spacing"], rng, ep["valid"])
        if click is None:
            break
        (pos if click.positive else neg).append(click.point)
        last = click.point
        if r < rounds - 1:
            zs = reached_slices(np.asarray(pos + neg), mask.shape[2], float(ep["spacing"][2]), reach_mm)
            probs = run_network(network, episode_inputs(ep, mask, pos, neg, zs, reach_mm, context), device=device, prior=prior)
            region = episode_region(ep, pos + neg, zs, edit_radius_mm, reach_mm)
            new = np.where(region, (probs.numpy() > 0.5).transpose(1, 2, 0), mask[:, :, zs])
            mask[:, :, zs] = new & ep["valid"][0, 0, zs]
    if last is None:
        return None
    depth, slice_mm = mask.shape[2], float(ep["spacing"][2])
    mine = reached_slices(np.asarray([last]), depth, slice_mm, reach_mm)
    every = reached_slices(np.asarray(pos + neg), depth, slice_mm, reach_mm)
    half = min(len(mine), (slices + 1) // 2)
    chosen = list(rng.choice(mine, size=half, replace=False))
    rest = [z for z in every if z not in chosen]
    chosen += list(rng.choice(rest, size=min(len(rest), slices - half), replace=False)) if rest else []
    zs = np.asarray(sorted(int(z) for z in chosen))
    target = torch.from_numpy(np.ascontiguousarray(ep["ref"][:, :, zs].transpose(2, 0, 1).astype(np.float32)))
    weight = torch.from_numpy(np.ascontiguousarray(episode_region(ep, pos + neg, zs, edit_radius_mm, reach_mm).transpose(2, 0, 1).astype(np.float32)))
    return episode_inputs(ep, mask, pos, neg, zs, reach_mm, context), target, weight


def loss_fn(logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """BCE + soft Dice over the batch's slices, counted where ``weight`` is 1 (everywhere without)."""
    weight = torch.ones_like(target) if weight is None else weight
    bce = (torch.nn.functional.binary_cross_entropy_with_logits(logits, target, reduction="none") * weight).sum() / weight.sum().clamp(min=1)
    p = torch.sigmoid(logits) * weight
    t = target * weight
    dice = 1 - (2 * (p * t).sum() + 1) / (p.sum() + t.sum() + 1)
    return bce + dice


def gate_figures(network, meta, cases: Sequence[tuple[str, dict]], contourers, methods_extra: dict, seed: int,
                 scopes: dict[str, ClickScope] | None = None) -> dict:
    """Mean Dice after :data:`GATE_CLICKS` clicks per structure on the held-out cases (and after 0),
    the network answering each model's clicks with its ``scopes`` (default: the file's):
    ``{method: {"dice": mean over structures, "n": structures}}``."""
    was = network.training
    refiner = Refiner(network, meta)
    methods = {"network": refiner, **methods_extra}
    values: dict[str, list[float]] = {m: [] for m in ["auto", *methods]}
    for model, case in cases:
        scope = (scopes or {}).get(model, ClickScope())
        per_model = {**methods, "network": partial(refiner, **scope.kwargs())}
        record = run_case(case, model, per_model, contourers[model], (0, GATE_CLICKS), seed, metrics=("dice",))
        for per in record["structures"].values():
            values["auto"].append(per["auto"]["0"]["dice"])
            for m in methods:
                values[m].append(per[m][str(GATE_CLICKS)]["dice"])
    network.train(was)
    return {m: {"dice": float(np.mean(v)) if v else float("nan"), "n": len(v)} for m, v in values.items()}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m contourcl.training.refine.train", description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", required=True, help="work folder outside the repository (cache, state, log)")
    parser.add_argument("--data", help="OpenKBP root (default: CONTOURCL_OPENKBP); only train-pats is read")
    parser.add_argument("--model-dir", default="apps/radonc/model", help="where the shipped oar.pt and gtv.pt are")
    parser.add_argument("--out", default="apps/radonc/model/refine.pt", help="written only if the held-out gate passes")
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--minutes", type=float, help="stop after this much training time (then evaluate and save)")
    parser.add_argument("--batch-episodes", type=int, default=4)
    parser.add_argument("--slices", type=int, default=4, help="training slices per episode")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--mask-prior", type=float, default=MASK_PRIOR_LOGIT,
                        help="the logit the current mask adds (inside) or takes away (outside); the file records it")
    parser.add_argument("--edit-radius", type=float, default=EDIT_RADIUS_MM,
                        help="mm around a click where the network may change the mask (0: the whole slices it reaches)")
    parser.add_argument("--reach", type=float, default=CLICK_REACH_MM, help="mm above and below its slice a click reaches (the file's)")
    parser.add_argument("--model-edit-radius", default="", metavar="MODEL=MM,...", help="a model's own edit radius (its app config's)")
    parser.add_argument("--model-reach", default="", metavar="MODEL=MM,...", help="a model's own reach (its app config's)")
    parser.add_argument("--context", action="store_true", help="the network sees the CT and the mask on the neighbouring slices too")
    parser.add_argument("--init", help="a refinement model file to continue from (default: the shipped oar.pt's encoder and decoder)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--holdout", type=int, default=5)
    parser.add_argument("--eval-every", type=int, default=250)
    parser.add_argument("--max-cases", type=int, help="train on the first N cached cases only (for a quick check)")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    from tqdm.auto import tqdm

    from contourcl.inference import Contourer

    wall0 = time.time()
    device = torch.device(args.device)
    root = openkbp_or_exit(parser, args.data)
    train_dir = root / "train-pats"
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    by_id: dict[str, dict[str, dict]] = {}
    for model in MODELS:
        for c in labeled_cases(train_dir, model):
            by_id.setdefault(c["id"], {})[model] = c
    ids = sorted(i for i, c in by_id.items() if set(c) == set(MODELS))
    gate_ids = held_out(ids, args.holdout, args.seed)
    train_ids = [i for i in ids if i not in gate_ids][: args.max_cases]
    model_files = {m: Path(args.model_dir) / f"{m}.pt" for m in MODELS}
    build_cache({i: by_id[i] for i in train_ids}, work, model_files, progress=not args.no_progress)
    episodes = Episodes([work / "cache" / f"{i}.npz" for i in train_ids])
    logger.info("%d training cases (%s oar, %s gtv structure-cases); held out: %s", len(train_ids), len(episodes.pairs["oar"]),
                len(episodes.pairs["gtv"]), gate_ids)

    network, base = from_shipped(str(model_files["oar"]), context=args.context)
    if args.init:
        started, _ = load_model(args.init)
        if args.context:  # a file without slice context continues with the new channels at zero
            started = with_context(started)
        if tuple(started.state_dict()) != tuple(network.state_dict()):
            parser.error(f"--init {args.init}: not a refinement network of the shipped model's architecture")
        network.load_state_dict(started.state_dict())
    network = network.to(device).train()
    optimizer = torch.optim.AdamW(network.parameters(), lr=args.lr, weight_decay=1e-4)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=args.lr, total_steps=args.steps, pct_start=0.05)
    use_amp = device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    state_path, history_path = work / "state.pt", work / "history.jsonl"
    step, best, spent = 0, {"dice": -1.0, "step": 0}, 0.0
    if state_path.is_file():
        state = torch.load(state_path, map_location="cpu", weights_only=True)
        network.load_state_dict(state["network"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        step, best, spent = int(state["step"]), dict(state["best"]), float(state["seconds"])
        logger.info("resumed after step %d (%.0f s trained)", step, spent)

    gate_cases = [(m, by_id[i][m]) for i in gate_ids for m in MODELS]
    edit_radius = args.edit_radius if args.edit_radius > 0 else None
    try:
        scopes = model_scopes(MODELS, edit_radius_mm=args.model_edit_radius, reach_mm=args.model_reach)
    except ValueError as e:
        parser.error(f"--model-edit-radius/--model-reach {e}")
    # each model's episodes: its own scope where it has one, else the file's
    episode_scope = {m: (edit_radius if s.edit_radius_mm is None else s.edit_radius_mm, args.reach if s.reach_mm is None else s.reach_mm)
                     for m, s in scopes.items()}
    gate_meta = refine_meta(network, base, {"mask_prior_logit": args.mask_prior}, reach_mm=args.reach,
                            edit_radius_mm=edit_radius)  # what the gate's Refiner reads
    contourers = {m: Contourer(p) for m, p in model_files.items()}
    plain = plain_edit_method()
    baseline = {}
    if gate_cases and plain is not None:
        baseline = gate_figures(network, gate_meta, gate_cases, contourers, {"plain_edit": plain}, args.seed, scopes)
        logger.info("held out, Dice after %d clicks: plain edit %.4f, automatic %.4f", GATE_CLICKS, baseline["plain_edit"]["dice"], baseline["auto"]["dice"])

    def provenance() -> dict:
        return {"mask_prior_logit": args.mask_prior, "edit_radius_mm": edit_radius, "reach_mm": args.reach,
                "model_scopes": {m: s.kwargs() for m, s in scopes.items()}, "data": str(train_dir), "train_ids": train_ids, "held_out_ids": gate_ids, "steps": step, "seconds_trained": round(spent, 1),
                "slice_context": bool(args.context), "episodes_per_step": args.batch_episodes, "slices_per_episode": args.slices, "lr": args.lr, "seed": args.seed,
                "device": str(device), "threads": args.threads, "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
                "git_commit": git_commit(), "init": {"file": str(args.init or model_files["oar"]), "sha256": sha256_file(args.init or model_files["oar"])},
                "auto_contours": {m: sha256_file(p) for m, p in model_files.items()},
                "command": "python -m contourcl.training.refine.train " + " ".join(argv if argv is not None else __import__("sys").argv[1:])}

    def checkpoint(figures: dict | None) -> None:
        nonlocal best
        if figures is not None and figures["network"]["dice"] > best["dice"]:
            best = {"dice": figures["network"]["dice"], "step": step}
            save_model(work / "best.pt", network, refine_meta(network, base, provenance(), {"held_out": figures, "baseline": baseline},
                                                              reach_mm=args.reach, edit_radius_mm=edit_radius), half=True)
        torch.save({"network": network.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    "step": step, "best": best, "seconds": spent}, work / ".state.tmp")
        os.replace(work / ".state.tmp", state_path)

    bar = tqdm(total=args.steps, initial=step, desc="refine", unit="step", disable=args.no_progress)
    losses: list[float] = []
    while step < args.steps and (args.minutes is None or spent < args.minutes * 60):
        t0 = time.time()
        rng = np.random.default_rng([args.seed, step])
        inputs, targets, weights = [], [], []
        network.eval()
        while len(inputs) < args.batch_episodes:
            ep = episodes.draw(rng)
            played = play(network, ep, rng, args.slices, device, args.mask_prior, *episode_scope[ep["model"]])
            if played is not None:
                inputs.append(played[0])
                targets.append(played[1])
                weights.append(played[2])
        network.train()
        x, y, wt = torch.cat(inputs).to(device), torch.cat(targets).to(device), torch.cat(weights).to(device)
        with torch.autocast(device.type, enabled=use_amp):
            logits = refine_logits(network, x, args.mask_prior)
        loss = loss_fn(logits, y, wt)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        step += 1
        spent += time.time() - t0
        losses.append(float(loss.detach()))
        bar.update(1)
        bar.set_postfix(loss=f"{np.mean(losses[-50:]):.3f}")
        record = {"step": step, "loss": losses[-1], "seconds": round(spent, 2)}
        figures = None
        if gate_cases and (step % args.eval_every == 0 or step == args.steps):
            figures = gate_figures(network, gate_meta, gate_cases, contourers, {}, args.seed, scopes)
            record["held_out"] = figures
            logger.info("step %d: loss (last 50) %.4f; held out Dice after %d clicks %.4f (automatic %.4f)", step,
                        np.mean(losses[-50:]), GATE_CLICKS, figures["network"]["dice"], figures["auto"]["dice"])
        with open(history_path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if figures is not None:
            checkpoint(figures)
    bar.close()
    if gate_cases and step % args.eval_every and step != args.steps:  # stopped by --minutes between evaluations
        figures = gate_figures(network, gate_meta, gate_cases, contourers, {}, args.seed, scopes)
        logger.info("step %d: held out Dice after %d clicks %.4f", step, GATE_CLICKS, figures["network"]["dice"])
        checkpoint(figures)
    else:
        checkpoint(None)
    verdict = {"best": best, "plain_edit": baseline.get("plain_edit"), "wall_seconds": round(time.time() - wall0, 1), "steps": step}
    if not baseline:
        verdict["written"] = False
        verdict["why"] = "no plain edit to compare with (contourcl.refine.plain_edit missing) or no held-out cases"
    else:
        # clicks must pay: better than the plain edit and than the automatic contour with no click
        bar = max(baseline["plain_edit"]["dice"], baseline["auto"]["dice"]) + GATE_MIN_GAIN
        if best["dice"] >= bar and (work / "best.pt").is_file():
            atomic_copy(work / "best.pt", args.out)
            verdict["written"] = str(args.out)
        else:
            verdict["written"] = False
            verdict["why"] = (f"held-out Dice after {GATE_CLICKS} clicks {best['dice']:.4f} is below {bar:.4f}: the better of the plain "
                              f"edit's {baseline['plain_edit']['dice']:.4f} and the automatic contour's {baseline['auto']['dice']:.4f}, "
                              f"plus {GATE_MIN_GAIN}")
    (work / "verdict.json").write_text(json.dumps(verdict, indent=1))
    logger.info("done: %s", verdict)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
