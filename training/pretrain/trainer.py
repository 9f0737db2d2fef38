"""The generic pretraining loop behind ``contourcl pretrain METHOD``, and the table of methods.

It finds the CT images, loads them (cached, worker processes), builds the method (one of
:data:`METHODS`, :mod:`contourcl.training.pretrain.base`) around a fresh encoder and trains each
of its stages:

- one optimizer and schedule per stage: MONAI's ``WarmupCosineSchedule`` (linear warm-up, cosine
  decay to 0 at the stage's last step) or constant; mixed precision on CUDA, float32 on CPU;
- checkpoints of the whole training state (model, optimizer, schedule, AMP scaler, stage, step,
  RNG) in ``OUT.state.pt``; ``--resume`` continues with the same data order (:class:`SkipSampler`);
- DDP under ``torchrun`` (:func:`contourcl.training.distributed.init_distributed`), each process
  reading its share of every epoch, ``batch_size`` per process; progress bars and logs on rank 0;
- at the end, the output encoder written by :func:`contourcl.models.encoder_checkpoint.save_encoder`.

Example::

    contourcl pretrain separeg --images /data/openkbp/train-pats --out models/separeg.pt \\
        --config pretrain.yaml --iterations 20000
    torchrun --nproc_per_node 4 -m contourcl.cli pretrain simsiam --images ... --out ...
"""

from __future__ import annotations

import itertools
import logging
import random
import time
from typing import Any

import numpy as np
import torch
from monai.optimizers import WarmupCosineSchedule
from monai.utils import set_determinism
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, Sampler

from contourcl.data.datasets import find_ct_images
from contourcl.models.encoder_checkpoint import save_encoder
from contourcl.models.networks import RESNET_SPECS, ResNetEncoder
from contourcl.training.distributed import barrier, init_distributed, main_process_first
from contourcl.training.pretrain.agcl import AGCL
from contourcl.training.pretrain.base import ConfigError, PretrainConfig, PretrainMethod, RunContext, Stage, to_device
from contourcl.training.pretrain.polycl import PolyCLOrgan, PolyCLScan
from contourcl.training.pretrain.separeg import SepaRegMethod
from contourcl.training.pretrain.simclr import SimCLRMethod
from contourcl.training.pretrain.simsiam import SimSiamMethod
from contourcl.training.pretrain.volumes import load_volumes

logger = logging.getLogger(__name__)

STATE_FORMAT = "contourcl-pretrain-state"
#: settings that must not change between a run and its resumption
RESUME_LOCKED = ("method", "encoder", "width", "in_channels", "image_size", "spacing", "window", "options")


#: every pretraining method, by name (``contourcl pretrain NAME``); a new method is added here
METHODS: dict[str, type[PretrainMethod]] = {
    method.name: method for method in (SepaRegMethod, AGCL, PolyCLOrgan, PolyCLScan, SimSiamMethod, SimCLRMethod)
}


def available_methods() -> list[str]:
    return sorted(METHODS)


def get_method(name: str) -> type[PretrainMethod]:
    """The method class named ``name`` in :data:`METHODS`."""
    if name not in METHODS:
        raise ConfigError(f"unknown pretraining method {name!r}; available: {', '.join(sorted(METHODS))}")
    return METHODS[name]


class Interrupted(Exception):
    """Raised internally when ``stop_after`` steps are done (the state is saved)."""


# ----------------------------------------------------------------------------------------------
# device


def resolve_device(config: PretrainConfig, local_rank: int = 0) -> torch.device:
    if config.device:
        dev = torch.device(config.device)
        if dev.type == "cuda" and dev.index is None:
            dev = torch.device("cuda", local_rank)
        return dev
    return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")


# ----------------------------------------------------------------------------------------------
# pieces of the loop


def build_optimizer(name: str, params, lr: float, config: PretrainConfig) -> torch.optim.Optimizer:
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=config.momentum, weight_decay=config.weight_decay)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=config.weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=config.weight_decay)
    raise ConfigError(f"unknown optimizer {name!r}")


#: the attributes that give a WarmupCosineSchedule its shape (the rest of its state is the step)
SCHEDULE_SHAPE = ("warmup_steps", "t_total", "cycles", "end_lr", "warmup_multiplier")


def build_scheduler(optimizer: torch.optim.Optimizer, iterations: int, warmup: int, schedule: str,
                    restart_cycles: int = 10) -> torch.optim.lr_scheduler.LRScheduler:
    """Linear warm-up over ``warmup`` steps, then cosine decay to 0 at ``iterations`` or, for
    ``schedule="constant"``, the base rate (a cosine of 0 cycles). ``"cosine-restarts"``: torch's
    ``CosineAnnealingWarmRestarts`` (SGDR), ``restart_cycles`` cycles of ``iterations //
    restart_cycles`` steps each, the rate back at its base at every restart (PolyCL: "cosine-annealing
    learn rate scheduler with warm restarts after every 10 epochs" of 100)."""
    if schedule == "cosine-restarts":
        if warmup:
            raise ConfigError("the cosine-restarts schedule has no warm-up: set warmup to 0")
        return torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(optimizer, T_0=max(1, iterations // max(1, restart_cycles)))
    return WarmupCosineSchedule(optimizer, warmup_steps=warmup, t_total=iterations, cycles=0.5 if schedule == "cosine" else 0.0)


def resume_scheduler(scheduler: WarmupCosineSchedule, state: dict) -> None:
    """Continue ``scheduler`` at the saved step; its shape stays this run's (``iterations``,
    ``warmup`` and ``schedule`` may change on resumption)."""
    shape = {k: getattr(scheduler, k) for k in SCHEDULE_SHAPE if hasattr(scheduler, k)}
    scheduler.load_state_dict(state)
    scheduler.__dict__.update(shape)


class SkipSampler(Sampler):
    """``base``'s indices without the first ``skip`` (to resume in the middle of an epoch)."""

    def __init__(self, base: Sampler, skip: int):
        self.base, self.skip = base, skip

    def __iter__(self):
        return itertools.islice(iter(self.base), self.skip, None)

    def __len__(self) -> int:
        return max(0, len(self.base) - self.skip)


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        try:
            torch.cuda.set_rng_state_all(state["cuda"])
        except (RuntimeError, IndexError):
            pass


def _unwrap(module: nn.Module) -> nn.Module:
    return module.module if isinstance(module, nn.parallel.DistributedDataParallel) else module


# ----------------------------------------------------------------------------------------------
# the trainer


class Trainer:
    """Trains a :class:`PretrainMethod` stage by stage; see the module docstring."""

    def __init__(self, config: PretrainConfig, resume: bool = False, stop_after: int | None = None):
        self.config = config
        self.resume = resume
        self.stop_after = stop_after  #: stop (state saved) after this many steps in this call
        self.rank, self.local_rank, self.world_size = init_distributed(config.device)
        self.device = resolve_device(config, self.local_rank)
        self.amp = bool(config.amp and self.device.type == "cuda")
        self.ctx = RunContext(config, self.device, self.rank, self.world_size, self.amp)
        self.history: dict[str, list[tuple[int, float]]] = {}
        self.steps_this_call = 0
        self.state: dict | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # -- data --------------------------------------------------------------------------------
    def load_volumes(self):
        paths = find_ct_images(self.config.images)
        if self.config.max_cases:
            paths = paths[: self.config.max_cases]
        logger.info("pretraining on %d CT volume(s) from %s", len(paths), ", ".join(self.config.images))
        with main_process_first():
            volumes = load_volumes(
                paths,
                self.config.spacing,
                self.config.window,
                cache_dir=self.config.resolved_cache_dir,
                num_workers=self.config.num_workers,
            )
        return volumes

    def loader(self, stage: Stage, stage_index: int, epoch: int, skip_batches: int, batch_size: int) -> DataLoader:
        sampler = DistributedSampler(
            stage.dataset,
            num_replicas=self.world_size,
            rank=self.rank,
            shuffle=True,
            seed=self.config.seed + 1000 * stage_index,
            drop_last=True,
        )
        sampler.set_epoch(epoch)
        if skip_batches:
            sampler = SkipSampler(sampler, skip_batches * batch_size)
        g = torch.Generator()
        g.manual_seed(self.config.seed * 1_000_003 + stage_index * 10_007 + epoch * 101 + self.rank)
        return DataLoader(
            stage.dataset,
            batch_size=batch_size,
            sampler=sampler,
            num_workers=self.config.num_workers,
            collate_fn=stage.collate_fn,
            drop_last=stage.drop_last,
            pin_memory=self.device.type == "cuda",
            generator=g,
            persistent_workers=False,
        )

    # -- checkpoints -------------------------------------------------------------------------
    def save_state(self, method: PretrainMethod, stage_index: int, stage_name: str, step: int, optimizer=None, scheduler=None, scaler=None):
        if not self.is_main:
            return
        state = {
            "format": STATE_FORMAT,
            "version": 1,
            "config": self.config.to_dict(),
            "method": method.state_dict(),
            "stage": stage_index,
            "stage_name": stage_name,
            "step": step,
            "optimizer": None if optimizer is None else optimizer.state_dict(),
            "scheduler": None if scheduler is None else scheduler.state_dict(),
            "scaler": None if scaler is None else scaler.state_dict(),
            "rng": rng_state(),
            "history": self.history,
            "time": time.time(),
        }
        path = self.config.state_path
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        torch.save(state, tmp)
        tmp.replace(path)

    def load_state(self, method: PretrainMethod) -> tuple[int, int]:
        path = self.config.state_path
        if not path.is_file():
            logger.warning("--resume: no training state at %s, starting from scratch", path)
            return 0, 0
        state = torch.load(path, map_location="cpu", weights_only=False)
        if state.get("format") != STATE_FORMAT:
            raise ConfigError(f"{path} is not a ContourCL pretraining state")
        old, new = state["config"], self.config.to_dict()
        changed = [k for k in RESUME_LOCKED if old.get(k) != new.get(k)]
        if changed:
            raise ConfigError(f"cannot resume {path}: setting(s) {changed} differ from the saved run ({ {k: old.get(k) for k in changed} })")
        method.load_state_dict(state["method"])
        self.history = {k: [tuple(x) for x in v] for k, v in state.get("history", {}).items()}
        self.state = state
        logger.info("resuming %s at stage %d (%s), step %d", path, state["stage"], state["stage_name"], state["step"])
        return int(state["stage"]), int(state["step"])

    # -- one stage ---------------------------------------------------------------------------
    def train_stage(self, method: PretrainMethod, stage: Stage, stage_index: int, start_step: int, resume_state: dict | None) -> None:
        cfg = self.config
        module = stage.module
        module.train()
        params = [p for p in module.parameters() if p.requires_grad]
        if not params:
            raise ConfigError(f"stage {stage.name!r} has no trainable parameters")
        batch_size = int(stage.batch_size or cfg.batch_size)
        per_rank = len(stage.dataset) // self.world_size
        if per_rank < 2:
            raise ConfigError(f"stage {stage.name!r}: {len(stage.dataset)} training items are too few")
        if per_rank < batch_size:
            logger.warning("stage %s: only %d items per process, batch size lowered from %d", stage.name, per_rank, batch_size)
            batch_size = per_rank
        lr = stage.lr if stage.lr is not None else method.resolve_lr(batch_size, self.world_size)
        opt_name = stage.optimizer or cfg.optimizer or method.default_optimizer
        optimizer = build_optimizer(opt_name, params, lr, cfg)
        scheduler = build_scheduler(optimizer, stage.iterations, cfg.warmup, cfg.schedule or method.default_schedule,
                                    method.restart_cycles)
        scaler = torch.amp.GradScaler("cuda", enabled=self.amp)
        if resume_state is not None and resume_state.get("optimizer") is not None:
            optimizer.load_state_dict(resume_state["optimizer"])
            resume_scheduler(scheduler, resume_state["scheduler"])
            if resume_state.get("scaler"):
                scaler.load_state_dict(resume_state["scaler"])
        if resume_state is not None and resume_state.get("rng") is not None:
            set_rng_state(resume_state["rng"])

        wrapped: nn.Module = module
        if self.world_size > 1:
            wrapped = nn.parallel.DistributedDataParallel(
                module,
                device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=stage.find_unused_parameters,
            )
        batches_per_epoch = per_rank // batch_size
        history = self.history.setdefault(stage.name, [])
        logger.info(
            "stage %d %s: %d iterations, %d items, batch %d x %d process(es), %s lr %.3g, %s%s",
            stage_index, stage.name, stage.iterations, len(stage.dataset), batch_size, self.world_size,
            opt_name, lr, self.device, " + AMP" if self.amp else "",
        )
        bar = None
        if self.is_main and cfg.progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=stage.iterations, initial=start_step, desc=f"{method.name}:{stage.name}", dynamic_ncols=True)

        step = start_step
        t0, ema = time.perf_counter(), None
        try:
            while step < stage.iterations:
                epoch, skip = divmod(step, batches_per_epoch)
                for batch in self.loader(stage, stage_index, epoch, skip, batch_size):
                    batch = to_device(batch, self.device)
                    with self.ctx.autocast():
                        loss, logs = wrapped(batch)
                    if not torch.isfinite(loss.detach()):
                        raise FloatingPointError(f"stage {stage.name}: loss is {loss.item()} at step {step}")
                    optimizer.zero_grad(set_to_none=True)
                    scaler.scale(loss).backward()
                    if cfg.grad_clip:
                        scaler.unscale_(optimizer)
                        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
                    scaler.step(optimizer)
                    scaler.update()
                    scheduler.step()
                    step += 1
                    self.steps_this_call += 1
                    value = float(logs.get("loss", loss.item()))
                    history.append((step, value))
                    ema = value if ema is None else 0.9 * ema + 0.1 * value
                    if bar is not None:
                        bar.update(1)
                        bar.set_postfix({k: f"{v:.4g}" for k, v in logs.items()}, refresh=False)
                    if self.is_main and (step % cfg.log_every == 0 or step == stage.iterations):
                        rate = (step - start_step) / max(1e-9, time.perf_counter() - t0)
                        extras = " ".join(f"{k}={v:.4g}" for k, v in logs.items() if k != "loss")
                        logger.info("%s step %d/%d loss %.4f (avg %.4f) %s lr %.3g %.2f it/s",
                                    stage.name, step, stage.iterations, value, ema, extras, scheduler.get_last_lr()[0], rate)
                    done = step >= stage.iterations
                    stop = self.stop_after is not None and self.steps_this_call >= self.stop_after
                    if done:
                        break
                    if stop or (cfg.checkpoint_every and step % cfg.checkpoint_every == 0):
                        self.save_state(method, stage_index, stage.name, step, optimizer, scheduler, scaler)
                    if stop:
                        raise Interrupted
        finally:
            if bar is not None:
                bar.close()
        _unwrap(wrapped).eval()

    # -- the whole run -----------------------------------------------------------------------
    def fit(self, volumes=None) -> dict[str, Any]:
        cfg = self.config
        set_determinism(cfg.seed)
        if cfg.encoder not in RESNET_SPECS:
            raise ConfigError(f"unknown encoder {cfg.encoder!r}; choose from {sorted(RESNET_SPECS)}")
        if volumes is None:
            volumes = self.load_volumes()
        method_cls = get_method(cfg.method)
        encoder = ResNetEncoder(cfg.encoder, cfg.width, cfg.in_channels)
        method = method_cls(encoder, cfg).to(self.device)
        start_stage, start_step = self.load_state(method) if self.resume else (0, 0)
        if self.state is not None:
            method.to(self.device)
        set_determinism(cfg.seed + 7919 * self.rank + start_stage * 31 + start_step)

        stage_names: list[str] = []
        try:
            for index, stage in enumerate(method.stages(volumes, self.ctx)):
                stage_names.append(stage.name)
                if index >= start_stage:
                    if self.stop_after is not None and self.steps_this_call >= self.stop_after:
                        raise Interrupted  # the state at this stage's start is saved already
                    resume_state = self.state if (index == start_stage and self.state is not None and start_step) else None
                    if index == start_stage and self.state is not None and not start_step:
                        set_rng_state(self.state["rng"])
                    self.train_stage(method, stage, index, start_step if index == start_stage else 0, resume_state)
                    self.save_state(method, index + 1, stage.name, 0)
                    barrier()
                if stage.on_end is not None:
                    stage.on_end()
        except Interrupted:
            logger.info("stopped after %d step(s); resume with --resume (state: %s)", self.steps_this_call, cfg.state_path)
            return {"out": None, "interrupted": True, "history": self.history, "state": str(cfg.state_path)}

        final = {name: self._final_loss(name) for name in stage_names}
        total = sum(len(self.history.get(n, [])) for n in stage_names)
        meta = {
            "method": cfg.method,
            "iterations": total,
            "planned_iterations": method_cls.planned_iterations(cfg),
            "stages": {n: {"iterations": len(self.history.get(n, [])), "final_loss": final[n]} for n in stage_names},
            "final_loss": final[stage_names[-1]] if stage_names else None,
            "image_size": cfg.image_size,
            "spacing": list(cfg.spacing),
            "window": list(cfg.window),
            "num_cases": len(volumes),
            "world_size": self.world_size,
            "config": cfg.to_dict(),
            **method.output_meta(),
        }
        out_encoder = method.output_encoder()
        checksum = float(sum(p.detach().double().sum().item() for p in out_encoder.parameters()))
        logger.info("rank %d encoder checksum %.10g", self.rank, checksum)
        if self.is_main:
            save_encoder(out_encoder.cpu(), cfg.out, **meta)
            logger.info("wrote %s (%s, %d steps, final loss %s)", cfg.out, cfg.method, total, meta["final_loss"])
        barrier()
        return {"out": cfg.out, "interrupted": False, "history": self.history, "meta": meta, "checksum": checksum, "method": method}

    def _final_loss(self, name: str, last: int = 20) -> float | None:
        values = [v for _, v in self.history.get(name, [])][-last:]
        return float(np.mean(values)) if values else None


def pretrain(config: PretrainConfig, resume: bool = False, stop_after: int | None = None, volumes=None) -> dict[str, Any]:
    """Run a pretraining; returns ``{"out", "history", "meta", ...}`` (see :class:`Trainer`)."""
    return Trainer(config, resume=resume, stop_after=stop_after).fit(volumes)
