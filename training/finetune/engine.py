"""Supervised fine-tuning of the 2D U-Net: the engine behind retraining and ``contourcl finetune``.

Volumes are preprocessed once (:func:`contourcl.data.transforms.ct_preprocessing`) and cached in
memory; each epoch draws ``samples_per_volume`` axial slices per training case, centred on each
contoured structure and on background in equal shares. The loss is the marginal Dice + CE of
:mod:`contourcl.training.finetune.partial_label_loss`, so structures a case does not contour are not
trained as background. Validation scores what the app would serve: each validation CT is
contoured through :func:`contourcl.inference.contour` and scored on its own grid with the
retraining gate's Dice (:func:`contourcl.evaluation.mean_dice`); the epoch with the best Dice is
kept. Optional: an exponential moving average of the weights (``ema``), left-right flip
test-time augmentation chosen on the validation cases (``tta_flip=None``), warm-up before the
cosine schedule (MONAI's ``WarmupCosineSchedule``), and a resumable training state.

With ``voxel_siamese=True`` the loss is Dice + CE + lambda * the voxel-level Siamese feature
loss of :mod:`contourcl.training.finetune.voxel_siamese` (off by default). With
``deep_supervision=N`` the coarser decoder outputs are scored too
(:mod:`contourcl.training.finetune.deep_supervision`, off by default).

Mixed precision on CUDA; several GPUs with ``torchrun`` (one process per GPU, DDP); the CPU
otherwise.
"""

from __future__ import annotations

import copy
import ctypes
import gc
import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from monai.data import CacheDataset, DataLoader, Dataset, list_data_collate
from monai.optimizers import WarmupCosineSchedule
from monai.transforms import (
    ClassesToIndicesd,
    Compose,
    DeleteItemsd,
    EnsureTyped,
    RandAffined,
    RandCropByLabelClassesd,
    RandGaussianNoised,
    RandScaleIntensityd,
    SpatialPadd,
    SqueezeDimd,
)
from monai.utils import set_determinism
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import RandomSampler
from tqdm.auto import tqdm

from contourcl.data.labels import model_labels
from contourcl.data.transforms import (
    DEFAULT_SPACING,
    DEFAULT_WINDOW,
    LabelToModeld,
    SlabToChannelsd,
    StructurePresenced,
    ct_preprocessing,
)
from contourcl.errors import ConfigError
from contourcl.evaluation import EvaluationCase, evaluate_network, prepare_cases, summarise
from contourcl.models.checkpoint import ModelMeta, save_model
from contourcl.models.encoder_checkpoint import input_mismatch, load_encoder
from contourcl.models.networks import ContourUNet, NetConfig, build_network
from contourcl.training.distributed import init_distributed
from contourcl.training.finetune.deep_supervision import DeepSupervisedNet, PartialLabelDeepSupervisionLoss
from contourcl.training.finetune.partial_label_loss import PartialLabelDiceCELoss
from contourcl.training.finetune.voxel_siamese import DEFAULT_LAMBDA, VoxelSiameseNet, trusted_voxels

logger = logging.getLogger(__name__)

#: the least mean validation Dice flip test-time augmentation must add to be kept (``tta_flip=None``):
#: it runs the network twice, doubling the inference time every served request pays, so a gain
#: within the noise of the validation cases does not buy it
TTA_MIN_GAIN = 0.005


@dataclass
class FinetuneConfig:
    """Fine-tuning settings. The defaults are the app's retraining settings."""

    model: str = "oar"
    net: dict = field(default_factory=lambda: {"encoder": "resnet18", "width": 32})
    spacing: tuple[float, float] = DEFAULT_SPACING
    window: tuple[float, float] = DEFAULT_WINDOW
    roi: tuple[int, int] = (128, 128)
    max_epochs: int = 50
    #: optimisation steps per epoch; None: one pass over the training cases. Set it to train for a
    #: fixed number of steps whatever the number of cases (cases drawn with replacement)
    steps_per_epoch: int | None = None
    batch_size: int = 16
    samples_per_volume: int = 16
    lr: float = 1e-3
    weight_decay: float = 1e-4
    val_interval: int = 1
    amp: bool = True
    seed: int = 0
    num_workers: int = 0
    init: str | None = None  # a pretraining checkpoint for the encoder (contourcl pretrain --out)
    # weight of the cross-entropy next to the Dice. Measured on the synthetic phantoms (seven small
    # organs, ~0.4 % of a slice's voxels): with 1.0 the network collapsed to background for 300
    # steps, with 0.1 it reached a foreground Dice of 0.44 in 150 steps.
    ce_weight: float = 0.1
    voxel_siamese: bool = False  # voxel-level Siamese auxiliary loss (contourcl.training.finetune.voxel_siamese)
    voxel_siamese_lambda: float = DEFAULT_LAMBDA  # lambda of "Dice + lambda * feature loss" (see voxel_siamese)
    #: where its heads go: "encoder" (the paper's F_1..F_3) or "decoder" (a deviation, see voxel_siamese)
    voxel_siamese_placement: str = "encoder"
    #: the largest-component rule recorded in the model file (None: not recorded; validation then
    #: keeps the largest component, as the app's default does)
    largest_component: bool | None = None
    #: left-right flip test-time augmentation (:attr:`ModelMeta.tta_flip`): True/False, or None to
    #: choose it on the validation cases at the end (kept only if it gains :data:`TTA_MIN_GAIN`)
    tta_flip: bool | None = False
    #: decay of an exponential moving average of the weights (e.g. 0.999); None: no average. When
    #: set, validation scores the averaged weights, and the last raw weights are scored at the end
    ema: float | None = None
    #: linear learning-rate warm-up steps before the cosine decay (MONAI's WarmupCosineSchedule)
    warmup_steps: int = 0
    #: 2.5D input: this many neighbouring slices on each side as extra input channels
    #: (:func:`contourcl.data.transforms.neighbouring_slices`); 0: one slice (2D)
    context: int = 0
    #: deep supervision: auxiliary heads on this many decoder blocks before the last, their losses
    #: weighted 1/2, 1/4, ... (:mod:`contourcl.training.finetune.deep_supervision`); 0: none
    deep_supervision: int = 0

    def net_config(self) -> NetConfig:
        return NetConfig(out_channels=len(model_labels(self.model)) + 1, **{**self.net, "in_channels": 2 * self.context + 1})


def following(cfg: FinetuneConfig, meta: ModelMeta) -> FinetuneConfig:
    """``cfg`` with the network, 2.5D context and preprocessing of a model file (to continue
    training it: retraining, ``--start-from``), and its largest-component rule when it has one."""
    return replace(
        cfg, net={k: v for k, v in meta.net.items() if k not in ("out_channels", "in_channels")},
        context=(int(meta.net.get("in_channels", 1)) - 1) // 2, spacing=tuple(meta.spacing), window=tuple(meta.window),
        roi=tuple(meta.roi), largest_component=cfg.largest_component if meta.largest_component is None else meta.largest_component,
    )


@dataclass
class FinetuneResult:
    network: ContourUNet  # the best epoch's weights
    best_dice: float  # mean validation Dice over structures (nan without validation cases)
    best_epoch: int
    per_structure: dict[str, float]
    history: list[dict]
    seconds: float
    skipped: dict[str, int] = field(default_factory=dict)  # case id -> steps skipped (non-finite loss)
    tta_flip: bool = False  # whether the kept weights are served with flip test-time augmentation
    choices: dict = field(default_factory=dict)  # what validation compared at the end (EMA, flip TTA)


def return_freed_memory(collect: bool = True) -> bool:
    """Collect garbage (``collect``) and hand the C heap's free pages back to the operating system.

    Preprocessing a volume makes and frees several copies of it in the loading threads, and glibc
    keeps freed pages in each thread's arena instead of returning them: a finished stage's cache
    stayed resident while ``contourcl finetune --refit``'s next stage cached every volume again
    (peak 17.1 GB at 3 mm, 10.8 GB with this between the stages; ``benchmarks/finetune_memory.py``).
    ``malloc_trim`` returns those pages. Returns whether it could (glibc only; elsewhere only the
    garbage is collected).
    """
    if collect:
        gc.collect()
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    return bool(libc.malloc_trim(0))


def _item(item: dict) -> dict:
    """A datalist entry: ``image``, ``label`` paths, ``id`` and, for a label file numbered otherwise
    than the stored numbering, its ``label_values`` (see :mod:`contourcl.data.datasets`)."""
    entry = {"image": str(item["image"]), "label": str(item["label"]), "id": item.get("id", Path(item["image"]).name)}
    if item.get("label_values"):
        entry["label_values"] = dict(item["label_values"])
    return entry


def preprocessing(cfg: FinetuneConfig) -> list:
    """Deterministic transforms: load, resample, window, renumber, record the contoured structures."""
    n_classes = len(model_labels(cfg.model)) + 1
    return [
        *ct_preprocessing("image", "label", cfg.spacing, cfg.window, blank_unimaged=True, check_reference=cfg.model),
        LabelToModeld("label", cfg.model),
        StructurePresenced("label", n_classes),
        SpatialPadd(keys=("image", "label"), spatial_size=(*cfg.roi, 2 * cfg.context + 1 if cfg.context else -1)),
        # the voxels of each class, found once and cached (searching the volume for every sampled
        # slice was most of a training step); background only inside the body (above the window's
        # lower bound), so that background slices are not air
        ClassesToIndicesd(keys="label", num_classes=n_classes, image_key="image", image_threshold=0.0),
        EnsureTyped(keys=("image", "label"), track_meta=False),
    ]


def augmentation(cfg: FinetuneConfig) -> list:
    """Random transforms: slice sampling and mild augmentation. No left-right flips: they
    would swap Parotid_R and Parotid_L."""
    return [
        # class-balanced slice sampling: each structure (and background) is the centre of an equal
        # share of the slices, so that small organs (cord, oesophagus) are seen as often as the
        # mandible; structures a case lacks get no share
        RandCropByLabelClassesd(
            keys=("image", "label"),
            label_key="label",
            spatial_size=(*cfg.roi, 2 * cfg.context + 1),  # a slab: the centre slice and its neighbours
            num_classes=len(model_labels(cfg.model)) + 1,
            num_samples=cfg.samples_per_volume,
            indices_key="label_cls_indices",
            allow_smaller=True,
            warn=False,
        ),
        DeleteItemsd(keys="label_cls_indices"),  # per-volume, not per sample: not collated
        SlabToChannelsd("image", "label") if cfg.context else SqueezeDimd(keys=("image", "label"), dim=-1),
        RandAffined(
            keys=("image", "label"),
            prob=0.5,
            rotate_range=(0.15,),
            scale_range=(0.1, 0.1),
            mode=("bilinear", "nearest"),
            padding_mode="zeros",
        ),
        RandScaleIntensityd(keys="image", factors=0.1, prob=0.5),
        RandGaussianNoised(keys="image", std=0.02, prob=0.3),
        # plain tensors: samples with and without the random affine carry different metadata,
        # which MONAI's collate cannot stack
        EnsureTyped(keys=("image", "label"), track_meta=False),
    ]


def validation_dice(network: ContourUNet, cases: Sequence[EvaluationCase], cfg: FinetuneConfig,
                    device: torch.device, tta_flip: bool | None = None) -> tuple[float, dict[str, float]]:
    """The gate's figure of ``network`` on ``cases``, through the served path.

    Each case is contoured as the app serves it (:func:`contourcl.evaluation.evaluate_network`:
    whole body-cropped slices, the largest-component rule, back on the CT's own grid) and scored
    with Dice on that grid; the mean is patient-wise over each case's contoured structures
    (:func:`contourcl.evaluation.mean_dice`), per structure over the cases that contour it.
    """
    meta = model_meta(cfg, network)
    if tta_flip is not None:
        meta.tta_flip = tta_flip
    was_training = network.training
    network.eval()
    scores = evaluate_network(network, meta, cases, cfg.largest_component is not False, metrics=("dice",), device=device)
    network.train(was_training)
    names = list(model_labels(cfg.model))
    summary = summarise([scores], names)
    per = {n: summary[(n, "dice")]["mean"] for n in names if summary[(n, "dice")]["patients"]}
    return summary[("mean", "dice")]["mean"], per


def recalibrate_batchnorm(network: ContourUNet, batches: Sequence[torch.Tensor], device: torch.device) -> None:
    """Recompute every batch-norm layer's running statistics on ``batches`` (precise BN).

    Early in fine-tuning the activations' scale changes quickly and the running averages lag
    far behind (measured here: running variance 6 where the batches had 14 after 12 steps),
    so the network in eval mode predicts nothing. Averaging the statistics of a few training
    batches with the current weights (Wu & Johnson 2021, "Rethinking batch in BatchNorm",
    "precise BN") fixes the eval-mode network without changing a weight.
    """
    norms = [m for m in network.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if not norms or not batches:
        return
    saved = [(m.momentum, m.training) for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the batches below
        m.train()
    with torch.no_grad():
        for x in batches:
            network(x.to(device))
    for m, (momentum, training) in zip(norms, saved, strict=False):
        m.momentum = momentum
        m.train(training)


def _distributed() -> tuple[int, int, int]:
    """(rank, local_rank, world_size) when launched by torchrun, else (0, 0, 1)."""
    return init_distributed()


def finetune(
    train_items: Sequence[dict],
    val_items: Sequence[dict],
    cfg: FinetuneConfig,
    start_from: ContourUNet | None = None,
    device: str | None = None,
    progress: bool = True,
    on_epoch: Callable[[dict, ContourUNet], None] | None = None,
    state_path: str | Path | None = None,
) -> FinetuneResult:
    """Fine-tune on ``train_items``; keep the epoch with the best validation Dice on ``val_items``.

    ``start_from`` continues from an existing network (the served model, for retraining);
    otherwise a new network is built and its encoder initialised from ``cfg.init`` if given.
    Validation scores what the app would serve (:func:`validation_dice`). ``on_epoch(record,
    network)`` is called after every epoch with the weights validation scored (e.g. to save the
    best so far). Without validation cases, the last epoch is kept and ``best_dice`` is nan.

    ``state_path``: the training state (weights, average, optimiser, schedule, best so far) is
    written there after every epoch, and a run finds it and resumes after its last finished
    epoch. Each epoch's random draws are seeded from ``cfg.seed`` and the epoch number, so a
    resumed run trains as the uninterrupted one would (with ``num_workers=0``).
    """
    t_start = time.perf_counter()
    if not train_items:
        raise ValueError("no training cases: fine-tuning needs at least one labeled CT")
    rank, local_rank, world = _distributed()
    if device is None:
        device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    set_determinism(cfg.seed + rank)

    if start_from is not None:
        network = copy.deepcopy(start_from)
    else:
        network = build_network(cfg.net_config())
        if cfg.init:
            info = load_encoder(network, cfg.init)
            logger.info("encoder initialised from %s (%s)", cfg.init, info.get("method", "?"))
            mismatch = input_mismatch(info, cfg.spacing, cfg.window)
            if mismatch:
                logger.warning("%s was pretrained on other images than these: %s", cfg.init, mismatch)
    if cfg.voxel_siamese and cfg.context:
        raise ConfigError("the voxel-level Siamese loss is implemented for 2D input only: use context 0 with it")
    if cfg.voxel_siamese and cfg.deep_supervision:
        raise ConfigError("the voxel-level Siamese loss and deep supervision are not combined: choose one")
    network = network.to(dev).train()
    # with the voxel-Siamese loss or deep supervision, heads train beside the U-Net; only the U-Net is kept
    trainable: torch.nn.Module = network
    if cfg.voxel_siamese:
        trainable = VoxelSiameseNet(network, placement=cfg.voxel_siamese_placement).to(dev).train()
    elif cfg.deep_supervision:
        trainable = DeepSupervisedNet(network, cfg.deep_supervision).to(dev).train()
    model_for_step: torch.nn.Module = trainable
    if world > 1:
        model_for_step = torch.nn.parallel.DistributedDataParallel(trainable, device_ids=[local_rank] if dev.type == "cuda" else None)
    # exponential moving average of the U-Net's weights and batch-norm statistics
    ema = AveragedModel(network, multi_avg_fn=get_ema_multi_avg_fn(cfg.ema), use_buffers=True) if cfg.ema else None
    scored = ema.module if ema is not None else network  # the weights validation scores and keeps

    pre = preprocessing(cfg)
    train_items = [_item(i) for i in train_items][rank::world]
    val_items = [_item(i) for i in val_items]
    train_cache = CacheDataset(train_items, Compose(pre), num_workers=min(2, len(train_items)), progress=progress and rank == 0)
    train_ds = Dataset(train_cache, Compose(augmentation(cfg)))
    volumes_per_batch = max(1, cfg.batch_size // cfg.samples_per_volume)
    sampler = None
    if cfg.steps_per_epoch:
        sampler = RandomSampler(train_ds, replacement=True, num_samples=cfg.steps_per_epoch * volumes_per_batch)
    loader = DataLoader(
        train_ds, batch_size=volumes_per_batch, shuffle=sampler is None, sampler=sampler,
        num_workers=cfg.num_workers, collate_fn=list_data_collate,
    )
    val_cases = prepare_cases(val_items, model_meta(cfg, network)) if val_items and rank == 0 else []
    return_freed_memory()  # the loading threads' freed copies of each volume

    loss_fn = PartialLabelDiceCELoss(lambda_ce=cfg.ce_weight)
    deep_loss_fn = PartialLabelDeepSupervisionLoss(loss_fn, weight_mode="exp")
    optimizer = torch.optim.AdamW(trainable.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps = cfg.max_epochs * len(loader)
    scheduler = WarmupCosineSchedule(optimizer, warmup_steps=cfg.warmup_steps, t_total=steps)
    use_amp = cfg.amp and dev.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)

    best = (-math.inf, -1, {}, copy.deepcopy(scored.state_dict()))
    history: list[dict] = []
    skipped: dict[str, int] = {}  # case id -> training steps skipped for a non-finite loss
    first_epoch = 1
    state_path = Path(state_path) if state_path else None
    if state_path is not None and state_path.is_file():
        state = torch.load(state_path, map_location="cpu", weights_only=True)
        trainable.load_state_dict(state["trainable"])
        if ema is not None:
            ema.load_state_dict(state["ema"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        best = (state["best"]["dice"], state["best"]["epoch"], state["best"]["per_structure"], state["best"]["weights"])
        history, skipped, first_epoch = state["history"], state["skipped"], state["epoch"] + 1
        logger.info("resumed from %s after epoch %d", state_path, state["epoch"])

    bar = tqdm(range(first_epoch, cfg.max_epochs + 1), desc=f"fine-tune {cfg.model}", disable=not progress or rank != 0, unit="epoch",
               initial=first_epoch - 1, total=cfg.max_epochs)
    for epoch in bar:
        recent: list[torch.Tensor] = []  # the epoch's last training batches, for recalibrate_batchnorm
        epoch_seed = cfg.seed + rank + 7919 * epoch
        set_determinism(epoch_seed)
        train_ds.transform.set_random_state(seed=epoch_seed % 2**32)
        losses = []
        for batch in loader:
            image = batch["image"].to(dev)
            label = batch["label"].to(dev)
            present = batch["present"].to(dev)
            feature_loss = None
            with torch.autocast(dev.type, enabled=use_amp):
                if cfg.voxel_siamese:
                    logits, feature_loss = model_for_step(image, label, trusted_voxels(label, present))
                else:
                    logits = model_for_step(image)
            if cfg.deep_supervision:  # logits: the full-resolution output, then the auxiliary ones
                loss = deep_loss_fn(logits, label, present)
            else:
                loss = loss_fn(logits.float(), label, present)
            if feature_loss is not None:
                loss = loss + cfg.voxel_siamese_lambda * feature_loss
            if not bool(torch.isfinite(loss)):
                # a case that gives a non-finite loss is named and its step skipped: it must not
                # sink the run (the weights would become NaN and every later step with them)
                for case in batch.get("id", ["?"]):
                    skipped[str(case)] = skipped.get(str(case), 0) + 1
                logger.warning("non-finite loss on %s: step skipped", sorted(set(map(str, batch.get("id", ["?"])))))
                optimizer.zero_grad(set_to_none=True)
                continue
            recent = (recent + [batch["image"]])[-8:]
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            if ema is not None:
                ema.update_parameters(network)
            losses.append(float(loss.detach()))
        record = {"epoch": epoch, "loss": float(np.mean(losses)) if losses else float("nan"), "lr": float(scheduler.get_last_lr()[0])}
        recalibrate_batchnorm(network, recent, dev)
        if ema is not None:
            recalibrate_batchnorm(scored, recent, dev)
        if val_cases and (epoch % cfg.val_interval == 0 or epoch == cfg.max_epochs):
            mean, per = validation_dice(scored, val_cases, cfg, dev, tta_flip=bool(cfg.tta_flip))
            record.update(val_dice=mean, per_structure=per)
            if mean > best[0]:
                best = (mean, epoch, per, copy.deepcopy(scored.state_dict()))
        history.append(record)
        if rank == 0:
            bar.set_postfix(loss=f"{record['loss']:.3f}", dice=f"{record.get('val_dice', float('nan')):.3f}")
            logger.info("epoch %d/%d  loss %.4f  val Dice %s", epoch, cfg.max_epochs, record["loss"], f"{record['val_dice']:.4f}" if "val_dice" in record else "-")
            if state_path is not None:
                _save_state(state_path, epoch=epoch, trainable=trainable.state_dict(), ema=ema.state_dict() if ema is not None else {},
                            optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(), scaler=scaler.state_dict(),
                            best={"dice": best[0], "epoch": best[1], "per_structure": best[2], "weights": best[3]},
                            history=history, skipped=skipped)
        if on_epoch and rank == 0:
            on_epoch(record, scored)
    choices: dict = {}
    if not val_cases:
        best = (float("nan"), cfg.max_epochs, {}, copy.deepcopy(scored.state_dict()))
    elif ema is not None:
        # measured, not assumed: the last raw weights against the kept average
        raw = validation_dice(network, val_cases, cfg, dev, tta_flip=bool(cfg.tta_flip))
        choices["raw_last_epoch"] = raw[0]
        choices["ema_best_epoch"] = best[0]
        if raw[0] > best[0]:
            best = (raw[0], cfg.max_epochs, raw[1], copy.deepcopy(network.state_dict()))
            choices["kept"] = "raw"
        else:
            choices["kept"] = "ema"
    network.load_state_dict(best[3])
    network.eval()
    tta = bool(cfg.tta_flip)
    if val_cases and cfg.tta_flip is None:
        flipped = validation_dice(network, val_cases, cfg, dev, tta_flip=True)
        choices["tta_flip"] = {"off": best[0], "on": flipped[0]}
        tta = flipped[0] >= best[0] + TTA_MIN_GAIN
        if tta:
            best = (flipped[0], best[1], flipped[1], best[3])
    if choices:
        logger.info("validation choices: %s", choices)
    return FinetuneResult(network.cpu(), best[0], best[1], best[2], history, time.perf_counter() - t_start, skipped, tta, choices)


def _save_state(path: Path, **state) -> None:
    """Write the resumable training state atomically (tensors and plain containers only)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def evaluate(network: ContourUNet, items: Sequence[dict], cfg: FinetuneConfig, device: str | None = None) -> tuple[float, dict[str, float]]:
    """Mean and per-structure Dice of ``network`` on ``items`` (the validation protocol)."""
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cases = prepare_cases([_item(i) for i in items], model_meta(cfg, network))
    return validation_dice(network.to(dev), cases, cfg, dev)


def model_meta(cfg: FinetuneConfig, network: ContourUNet, result: FinetuneResult | None = None, **provenance) -> ModelMeta:
    """The :class:`ModelMeta` for a network fine-tuned with ``cfg``."""
    metrics = {}
    if result is not None:
        # no validation cases: no figure (NaN is not valid JSON, and /info/ reports these)
        val = result.best_dice if math.isfinite(result.best_dice) else None
        metrics = {"val_dice": val, "per_structure": result.per_structure, "best_epoch": result.best_epoch, "choices": result.choices}
    return ModelMeta(
        model=cfg.model,
        labels=model_labels(cfg.model),
        net=network.config.to_dict(),
        spacing=tuple(cfg.spacing),
        window=tuple(cfg.window),
        roi=tuple(cfg.roi),
        metrics=metrics,
        provenance={"config": {k: v for k, v in asdict(cfg).items()}, **provenance},
        largest_component=cfg.largest_component,
        tta_flip=bool(result.tta_flip if result is not None else cfg.tta_flip),
    )


def save_finetuned(path: str | Path, cfg: FinetuneConfig, result: FinetuneResult, half: bool = False, **provenance) -> Path:
    """Write the fine-tuned network as a model file the app serves."""
    return save_model(path, result.network, model_meta(cfg, result.network, result, **provenance), half=half)
