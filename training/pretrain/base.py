"""The pretraining framework: configuration, the method protocol and stages.

A pretraining method is a :class:`PretrainMethod` (an ``nn.Module``) with a ``name``, listed in
:data:`contourcl.training.pretrain.trainer.METHODS`. The generic loop in
:mod:`contourcl.training.pretrain.trainer` builds it around a fresh
:class:`~contourcl.models.networks.ResNetEncoder`, asks it for its training :class:`Stage` s and
trains each one; at the end it saves :meth:`PretrainMethod.output_encoder` as the checkpoint that
the app's U-Net loads (:func:`contourcl.models.encoder_checkpoint.load_encoder`). A one-stage
method writes two methods (see :class:`PretrainMethod`); a multi-stage one overrides
:meth:`PretrainMethod.stages`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn
from torch.utils.data import Dataset

from contourcl.data.transforms import DEFAULT_SPACING, DEFAULT_WINDOW
from contourcl.errors import ConfigError
from contourcl.models.networks import ResNetEncoder

__all__ = [
    "ConfigError",
    "PretrainConfig",
    "PretrainMethod",
    "RunContext",
    "Stage",
]


def default_cache_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "contourcl")


#: learning-rate schedules of a stage: cosine decay to 0 (after ``warmup``), the base rate, or
#: cosine annealing with warm restarts (torch's ``CosineAnnealingWarmRestarts``, SGDR)
SCHEDULES = ("cosine", "constant", "cosine-restarts")


@dataclass
class PretrainConfig:
    """Every setting of a pretraining run; read from a YAML/JSON file, overridden on the command line.

    ``lr`` and ``optimizer`` left at ``None`` take the method's defaults
    (:attr:`PretrainMethod.default_lr`, :attr:`PretrainMethod.default_optimizer`). ``options``
    holds method-specific settings; each method declares the ones it knows, with their defaults,
    in :attr:`PretrainMethod.default_options`.
    """

    method: str = "simsiam"
    images: list[str] = field(default_factory=list)  #: CT files or folders of them
    out: str = "pretrained.pt"  #: the encoder checkpoint written at the end
    encoder: str = "resnet18"
    width: int = 32
    in_channels: int = 1
    spacing: tuple[float, float] = DEFAULT_SPACING  #: in-plane mm, as the app's models
    window: tuple[float, float] = DEFAULT_WINDOW  #: HU window mapped to [0, 1]
    image_size: int = 128  #: side of the square inputs (slices, regions, patches)
    batch_size: int = 32  #: per process (DDP: per GPU)
    iterations: int = 10000  #: optimisation steps of the whole run; a multi-stage method splits them (PretrainMethod.planned_iterations)
    lr: float | None = None
    optimizer: str | None = None  #: sgd | adam | adamw
    momentum: float = 0.9
    weight_decay: float = 1e-4
    #: cosine | constant | cosine-restarts (per stage); None: the method's (PretrainMethod.default_schedule)
    schedule: str | None = None
    warmup: int = 0  #: linear warm-up steps
    grad_clip: float | None = None
    checkpoint_every: int = 1000  #: steps between training-state checkpoints (0: only at stage ends)
    log_every: int = 50
    num_workers: int = 2  #: DataLoader and preprocessing worker processes
    seed: int = 0
    amp: bool = True  #: mixed precision, used on CUDA only
    device: str | None = None  #: None: cuda when there is one, else cpu
    cache_dir: str | None = None  #: preprocessed volumes and region sets; None: ~/.cache/contourcl
    max_cases: int | None = None  #: use only the first N images (quick runs)
    progress: bool = True  #: tqdm progress bars (rank 0)
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        if isinstance(self.images, (str, os.PathLike)):
            self.images = [self.images]
        self.images = [str(p) for p in self.images]
        self.out = str(self.out)
        self.spacing = tuple(float(s) for s in self.spacing)
        self.window = tuple(float(w) for w in self.window)
        self.options = dict(self.options or {})
        if self.optimizer is not None and self.optimizer not in ("sgd", "adam", "adamw"):
            raise ConfigError(f"optimizer must be sgd, adam or adamw, not {self.optimizer!r}")
        if self.schedule not in (None, *SCHEDULES):
            raise ConfigError(f"schedule must be one of {SCHEDULES}, not {self.schedule!r}")
        for name in ("batch_size", "iterations", "image_size", "width"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"{name} must be positive")

    @property
    def resolved_cache_dir(self) -> Path:
        return Path(self.cache_dir or default_cache_dir())

    @property
    def state_path(self) -> Path:
        """Where the periodic training state (for ``--resume``) is written: next to ``out``."""
        return Path(self.out + ".state.pt")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["spacing"], d["window"] = list(self.spacing), list(self.window)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> PretrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown pretraining setting(s) {unknown}; known: {sorted(known)}")
        return cls(**d)

    @classmethod
    def from_file(cls, path: str | Path, **overrides) -> PretrainConfig:
        """Read a ``.yaml``/``.yml``/``.json`` file; ``overrides`` that are not ``None`` win.

        An ``options`` override is merged into the file's options, not substituted.
        """
        d = read_config_file(path)
        return cls.from_dict(merge_settings(d, overrides))

    def replace(self, **overrides) -> PretrainConfig:
        return self.from_dict(merge_settings(self.to_dict(), overrides))


def read_config_file(path: str | Path) -> dict:
    path = Path(path)
    text = path.read_text()
    if path.suffix.lower() == ".json":
        d = json.loads(text)
    else:
        import yaml

        d = yaml.safe_load(text) or {}
    if not isinstance(d, dict):
        raise ConfigError(f"{path}: a pretraining config must be a mapping of settings")
    # a config may group the settings under "pretrain:" (one file for several commands)
    if set(d) == {"pretrain"} or ("pretrain" in d and isinstance(d["pretrain"], dict) and "method" not in d):
        d = d["pretrain"]
    return dict(d)


def merge_settings(base: dict, overrides: dict) -> dict:
    out = dict(base)
    for key, value in overrides.items():
        if value is None:
            continue
        if key == "options":
            out["options"] = {**(out.get("options") or {}), **value}
        else:
            out[key] = value
    return out


# ----------------------------------------------------------------------------------------------
# run context and stages


@dataclass
class RunContext:
    """What the trainer tells a method about the run (passed to :meth:`PretrainMethod.stages`)."""

    config: PretrainConfig
    device: torch.device
    rank: int = 0
    world_size: int = 1
    amp: bool = False  #: autocast is on (CUDA + config.amp)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def autocast(self):
        """The autocast context the training steps run in (for a method's own inference loops)."""
        if self.amp:
            return torch.autocast(device_type=self.device.type, dtype=torch.float16)
        return contextlib.nullcontext()

    def to_device(self, batch: Any) -> Any:
        return to_device(batch, self.device)


def to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


@dataclass
class Stage:
    """One optimisation phase of a method.

    ``module(batch)`` must return ``(loss, logs)``; all its parameters with ``requires_grad``
    are optimised (one fresh optimizer and schedule per stage) and it is wrapped in DDP when
    the run is distributed. A module that holds frozen teachers keeps them in eval mode by
    overriding ``train()``. ``batch_size``/``lr``/``optimizer`` of ``None`` take the config's.
    ``on_end`` runs (on every rank) after the stage's last step, also when a resumed run
    skips the stage.
    """

    name: str
    module: nn.Module
    dataset: Dataset
    iterations: int
    batch_size: int | None = None
    lr: float | None = None
    optimizer: str | None = None
    collate_fn: Callable | None = None
    drop_last: bool = True
    on_end: Callable[[], None] | None = None
    #: DDP's flag, for modules that leave some trainable parameters unused in a step
    find_unused_parameters: bool = False


# ----------------------------------------------------------------------------------------------
# the method protocol


class PretrainMethod(nn.Module):
    """Base class of the pretraining methods.

    ``encoder`` is the network being pretrained (a :class:`~contourcl.models.networks.ResNetEncoder`
    built from the config); the trainer saves :meth:`output_encoder` at the end. ``forward``
    is :meth:`loss`, so that DDP sees the computation.

    A one-stage method (SimSiam, SimCLR, ...) only writes two methods::

        class MyMethod(PretrainMethod):
            name = "mymethod"                        # and MyMethod added to trainer.METHODS
            default_options = {"temperature": 0.1}

            def build_dataset(self, volumes):       # -> torch Dataset; items are collated by default_collate
                ...

            def loss(self, batch):                   # batch already on the device
                ...
                return loss, {"loss": loss.item()}
    """

    #: the method's name: ``contourcl pretrain NAME`` (the trainer's :data:`~contourcl.training.pretrain.trainer.METHODS`)
    name: ClassVar[str] = ""
    #: method-specific settings (``config.options``) and their defaults
    default_options: ClassVar[dict[str, Any]] = {}
    default_lr: ClassVar[float] = 0.05
    default_optimizer: ClassVar[str] = "sgd"
    #: the learning-rate schedule when the config names none (:data:`SCHEDULES`)
    default_schedule: ClassVar[str] = "cosine"
    #: ``cosine-restarts``: cosine cycles per stage (the period is the stage's steps / cycles)
    restart_cycles: ClassVar[int] = 10
    #: when set, the default lr is ``default_lr * global batch / lr_reference_batch`` (SimSiam's rule)
    lr_reference_batch: ClassVar[int | None] = None

    def __init__(self, encoder: ResNetEncoder, config: PretrainConfig):
        super().__init__()
        self.encoder = encoder
        self.config = config
        unknown = sorted(set(config.options) - set(self.default_options))
        if unknown:
            raise ConfigError(
                f"method {self.name!r} has no option(s) {unknown}; its options: {self.default_options or 'none'}"
            )
        self.options: dict[str, Any] = {**self.default_options, **config.options}

    def resolve_lr(self, batch_size: int | None = None, world_size: int = 1) -> float:
        """The learning rate: ``config.lr`` if given, else the method's default (batch-scaled)."""
        if self.config.lr is not None:
            return float(self.config.lr)
        lr = float(self.default_lr)
        if self.lr_reference_batch:
            lr *= (batch_size or self.config.batch_size) * world_size / self.lr_reference_batch
        return lr

    def make_encoder(self) -> ResNetEncoder:
        """A fresh encoder of the configured architecture (for extra models, e.g. teachers)."""
        return ResNetEncoder(self.config.encoder, self.config.width, self.config.in_channels)

    # one-stage methods implement these two ------------------------------------------------
    def build_dataset(self, volumes: Sequence) -> Dataset:
        """The training set built from ``volumes`` (:class:`contourcl.training.pretrain.volumes.Volume`)."""
        raise NotImplementedError

    def loss(self, batch: Any) -> tuple[torch.Tensor, dict[str, float]]:
        """``(loss, logs)`` of one batch (already on the device)."""
        raise NotImplementedError

    def forward(self, batch: Any) -> tuple[torch.Tensor, dict[str, float]]:
        return self.loss(batch)

    # multi-stage methods override these ---------------------------------------------------
    def stages(self, volumes: Sequence, ctx: RunContext) -> Iterator[Stage]:
        """The stages to train, in order (a generator).

        A multi-stage method (SepaReg: inter-organ SimSiam -> k-means -> K intra-organ models ->
        distillation) overrides this: code after a ``yield`` runs once that stage has been trained,
        so a stage can use the results of the previous ones. Each stage has its own module (whose
        ``forward(batch)`` returns ``(loss, logs)`` and whose trainable parameters get a fresh
        optimizer), dataset and number of iterations; ``config.iterations`` is the budget of the
        whole run, which the method splits over its stages (:meth:`planned_iterations` states the
        split). When a run is resumed, the stages already
        finished are yielded again but not retrained; state that a stage computed (e.g. cluster
        assignments) must therefore live in the method's ``state_dict`` (buffers or
        ``get_extra_state``) and the generator must skip recomputing it when it is already there.
        """
        yield Stage("main", self, self.build_dataset(volumes), self.config.iterations)

    @classmethod
    def planned_iterations(cls, config: PretrainConfig) -> dict[str, int]:
        """Steps ``config`` will run, per stage or group of stages, without building anything.

        The steps run must sum to ``config.iterations`` (one budget per method, whatever its
        stages), unless a method's option says otherwise (SepaReg's ``budget=per-stage``).
        """
        return {"main": int(config.iterations)}

    # output -------------------------------------------------------------------------------
    def output_encoder(self) -> ResNetEncoder:
        """The encoder saved at the end (SepaReg: the distilled student)."""
        return self.encoder

    def output_meta(self) -> dict[str, Any]:
        """Extra entries for the checkpoint's ``meta``."""
        return {}
