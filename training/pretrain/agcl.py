"""AGCL: attention-guided supervised contrastive pretraining (Lee et al.).

- Stage 1, a coarse segmentation of each CT's targets, read from a label file (MONAI Label's
  ``labels/final`` or ``labels/original``) or predicted by a model (option ``coarse_model``):
  :func:`load_coarse_labels`, also used by PolyCL-O for organ presence.
- Stage 2, contrastive pretraining (``contourcl pretrain agcl``): for every slice and target, a
  2D patch centred on the target (:func:`extract_patch`) with the target's mask as a second input
  channel; two views with one augmentation applied to image and mask alike (:class:`PairedAugment`);
  a 2-channel :class:`~contourcl.models.networks.ResNetEncoder` and a projection MLP
  Linear(d, d)-ReLU-Linear(d, 256) (SupCon's and SimCLR's, as the authors' code) trained with the
  modal-target supervised contrastive loss (Eq. 3, :mod:`contourcl.training.pretrain.supcon`),
  labels ``modality * n_targets + target`` (option ``modalities``; one modality when unknown),
  ``T = 0.1``.
- Stage 3, the fine-tuning variant: :mod:`contourcl.training.finetune.agcl_segmenter`.

The checkpoint at ``--out`` has 1 input channel, for the app's U-Net: the first convolution keeps
the image channel's weights (:func:`to_single_channel`; what an all-zero mask computes). The
2-channel one, for stage 3, is written next to it (:func:`two_channel_path`: ``X.pt`` -> ``X.2ch.pt``).

Deviations from the paper and choices, each with its reason:

- Encoder stem (issue 9), option ``stem``: default ``"small"`` (3x3 stride 1, no max-pool, as the
  authors' code MASILab/DCC_CL), not the appendix's ImageNet stem (``"imagenet"``): on 32 px
  patches the ImageNet stem leaves a 1 x 1 map at layer 4, the small one 4 x 4.
  The app's U-Net keeps the ImageNet stem (its decoder needs strides 2 to 32), so ``conv1`` and
  ``bn1`` are not transferred (logged by :func:`contourcl.models.encoder_checkpoint.load_encoder`)
  and layers 1-4 see inputs at 4 times their pretraining stride; the 2-channel checkpoint keeps the
  small stem.
- A single target (e.g. ``["GTV"]``) is contrasted against other structures as extra classes
  (option ``negatives``, default: the seven OARs not among the targets, masks from
  ``coarse_model``, which may list several models, later ones winning): with one class there is
  no negative (Sec. 3.2, the denominator of Eq. 2/3), and SupCon is minimised by collapsing every
  embedding to one point.
- Data whose patches fall in fewer than two classes is refused (:class:`ConfigError`) and a batch
  of one class skipped (zero loss, no gradient): the same collapse.
- ``flip`` (off by default): the authors' code flips, the paper (crop, rotation +-30 deg, scaling
  0.3 to 0.7) does not, and a left-right flip turns a right parotid into a left one.

- Optimiser and budget (issue 32): the paper trains "with stochastic gradient descent (SGD)
  optimizer for 5 epochs with a batch size of 4 and learning rate of 5x10^-4" over "more than
  400k patches" (appendix 6.2). Here: Adam at 1e-3 (:attr:`AGCL.default_lr`), the config's batch
  (16 in the label-efficiency benchmark) and the benchmark's step budget, equal for every method
  (300 or 3000 steps, not the paper's ~500k). No measured reason was recorded for Adam when it was
  written, and SGD at 5e-4 was not compared; it is kept so that the tables' rows stay what ran.
  The paper's setting: ``optimizer="sgd"``, ``lr=5e-4``, ``batch_size=4`` in the config.
- Patch sampling (issue 32): the paper extracts "30 2D patches for each target in each axial
  slices" at random within the attention region; here one patch per target and slice, centred on
  the target's bounding box (:func:`extract_patch`), and every read crops it anew at random (scale
  0.3-0.7) and rotates it (:class:`PairedAugment`), so the positions vary from step to step. The
  reason: with a fixed step budget, 30 stored patches per target would not add samples seen, only
  the variety of their positions, which the random crop gives too. Not measured against the
  paper's sampling.
- In the label-efficiency tables the row ``agcl-unet`` (named ``agcl`` until issue 32) is not
  AGCL's stage 3: it loads the 1-channel checkpoint into the app's U-Net (the mask channel
  dropped: the encoder then sees the all-zero mask it never saw in pretraining; the stem not
  transferred) and fine-tunes the whole U-Net. The paper's stage 3 (frozen 2-channel encoder,
  per-target ASPP heads, label fusion) is :mod:`contourcl.training.finetune.agcl_segmenter`, not
  evaluated in the tables yet.

(measured feature-map sizes and collapse losses: docs/design-notes.md)
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from monai.transforms import Compose, RandFlipd, RandRotated, RandScaleCropd, Resized
from torch.utils.data import Dataset

from contourcl.data import labels as label_names
from contourcl.models.encoder_checkpoint import save_encoder
from contourcl.models.networks import ResNetEncoder
from contourcl.training.pretrain.base import ConfigError, PretrainConfig, PretrainMethod, RunContext, Stage
from contourcl.training.pretrain.heads import mlp_head
from contourcl.training.pretrain.supcon import SupConLoss, modal_target_labels

logger = logging.getLogger(__name__)

__all__ = [
    "AGCL",
    "AGCLPatchDataset",
    "PairedAugment",
    "UNKNOWN_MODALITY",
    "extract_patch",
    "find_label_file",
    "load_coarse_labels",
    "read_modalities",
    "to_single_channel",
    "two_channel_path",
]

UNKNOWN_MODALITY = "unknown"


# =============================================================================== coarse labels
def find_label_file(image_path: str | Path, labels: str | Path | None = None) -> Path | None:
    """The label file of ``image_path``, or ``None``.

    ``labels`` a folder: ``labels/<image file name>`` (then ``labels/<case>.nii.gz``). ``None``:
    the MONAI Label studies layout, ``<image folder>/labels/final/<name>`` (clinicians' labels),
    then ``labels/original/<name>`` (the served model's predictions).
    """
    image_path = Path(image_path)
    name = image_path.name
    if labels is not None:
        folder = Path(labels)
        stem = name.split(".")[0]
        for candidate in (folder / name, folder / f"{stem}.nii.gz", folder / f"{image_path.parent.name}.nii.gz"):
            if candidate.is_file():
                return candidate
        return None
    for tag in ("final", "original"):
        candidate = image_path.parent / "labels" / tag / name
        if candidate.is_file():
            return candidate
    return None


def _load_label_file(image_path: str, label_path: Path, config: PretrainConfig, numbering: str) -> np.ndarray:
    """A label map on the grid of the preprocessed image, in the stored numbering; background on
    the slices that do not image the patient (no anchors from OpenKBP's masked islands)."""
    from contourcl.data.transforms import ct_preprocessing

    data = Compose(ct_preprocessing("image", "label", config.spacing, config.window, blank_unimaged=True))(
        {"image": str(image_path), "label": str(label_path)}
    )
    lab = np.rint(np.asarray(data["label"].detach().cpu().numpy()[0])).astype(np.int64)
    if numbering == "stored":
        return lab.astype(np.uint8)
    return label_names.from_model(lab, numbering)  # a model's numbering (e.g. "oar") -> stored


def _predict_coarse(image: np.ndarray, model_path: str, config: PretrainConfig, device: torch.device) -> np.ndarray:
    """Coarse segmentation of a preprocessed volume ``(H, W, D)`` by a model file, stored numbering."""
    from contourcl.inference import slice_probabilities, whole_slice_roi
    from contourcl.models.checkpoint import load_model

    network, meta = load_model(model_path, device)
    if tuple(meta.spacing) != tuple(config.spacing):
        raise ConfigError(
            f"coarse model {model_path} works at {tuple(meta.spacing)} mm, the pretraining at "
            f"{tuple(config.spacing)} mm: set the pretraining spacing to the model's"
        )
    x = torch.as_tensor(np.asarray(image, dtype=np.float32))
    if tuple(meta.window) != tuple(config.window):  # re-window: [0, 1] in config.window -> model window
        hu = x * (config.window[1] - config.window[0]) + config.window[0]
        x = ((hu - meta.window[0]) / (meta.window[1] - meta.window[0])).clamp(0, 1)
    probs = slice_probabilities(network, x[None, None], roi=whole_slice_roi(x.shape[:2]), device=device)
    pred = probs.argmax(1)[0].cpu().numpy()
    return label_names.from_model(pred, meta.model)


def load_coarse_labels(
    volumes: Sequence, config: PretrainConfig, options: Mapping[str, Any], device: torch.device | None = None
) -> list[np.ndarray | None]:
    """A coarse segmentation (stored numbering, the volume's grid) for each volume, or ``None``.

    Options read: ``coarse_model`` (a model file: predict with it; wins over label files),
    ``labels`` (a folder of label files; default: the MONAI Label layout next to each image),
    ``label_numbering`` (``"stored"``, the datastore's, or a model's name such as ``"oar"``).
    """
    model_path = options.get("coarse_model")
    model_paths = [model_path] if isinstance(model_path, (str, Path)) else list(model_path or [])
    out: list[np.ndarray | None] = []
    for vol in volumes:
        if model_paths:
            merged = None
            for mp in model_paths:  # several models (e.g. oar, then gtv): later ones win where they predict
                pred = _predict_coarse(vol.image, str(mp), config, device or torch.device("cpu"))
                merged = pred if merged is None else np.where(pred > 0, pred, merged).astype(pred.dtype)
            out.append(merged)
            continue
        path = find_label_file(vol.path, options.get("labels")) if vol.path else None
        if path is None:
            out.append(None)
            continue
        lab = _load_label_file(vol.path, path, config, options.get("label_numbering", "stored"))
        if lab.shape != tuple(vol.image.shape):
            raise ConfigError(f"label {path} has shape {lab.shape} after preprocessing, its CT {vol.image.shape}")
        out.append(lab)
    return out


def read_modalities(spec: str | Path | Mapping[str, str] | None) -> dict[str, str]:
    """Per-case modality (scanner or contrast phase): a mapping or a JSON file of one; ``{}`` if none."""
    if spec is None:
        return {}
    if isinstance(spec, Mapping):
        return {str(k): str(v) for k, v in spec.items()}
    d = json.loads(Path(spec).read_text())
    if not isinstance(d, dict):
        raise ConfigError(f"{spec}: modalities must be a JSON object {{case: modality}}")
    return {str(k): str(v) for k, v in d.items()}


def _case_modality(vol, table: Mapping[str, str]) -> str:
    keys = [vol.case, vol.case.split("#")[0]]
    if vol.path:
        p = Path(vol.path)
        keys += [str(p), p.name, p.name.split(".")[0]]
    for k in keys:
        if k in table:
            return table[k]
    return UNKNOWN_MODALITY


# =============================================================================== patches
def extract_patch(image: np.ndarray | torch.Tensor, mask: np.ndarray | torch.Tensor, size: int) -> torch.Tensor:
    """The ``(2, size, size)`` patch [image, mask] centred on ``mask``'s bounding box (zero-padded)."""
    img = torch.as_tensor(np.asarray(image, dtype=np.float32))
    msk = torch.as_tensor(np.asarray(mask)).bool()
    ys, xs = torch.nonzero(msk, as_tuple=True)
    if ys.numel() == 0:
        raise ValueError("empty mask: no target to centre the patch on")
    cy = (int(ys.min()) + int(ys.max()) + 1) // 2
    cx = (int(xs.min()) + int(xs.max()) + 1) // 2
    stacked = torch.stack([img, msk.float()])
    padded = F.pad(stacked, (size, size, size, size))
    y0, x0 = cy - size // 2 + size, cx - size // 2 + size
    return padded[:, y0 : y0 + size, x0 : x0 + size].contiguous()


class PairedAugment:
    """One random augmentation applied to an image and its mask alike (MONAI dictionary transforms).

    Random resized crop (side ``sqrt`` of ``crop_scale``, i.e. an area fraction of about 0.3 to
    0.7, aspect ratio free) resized back to ``size``, rotation within ``+-rotation`` degrees,
    optional flips. Image: bilinear; mask: nearest (``nearest-exact`` for the resize: torch's
    plain ``nearest`` shifts by up to half a pixel against bilinear), so it stays binary. ``__call__`` takes and
    returns a ``(2, H, W)`` tensor [image, mask].
    """

    def __init__(self, size: int, crop_scale: Sequence[float] = (0.3, 0.7), rotation: float = 30.0, flip: bool = False):
        lo, hi = (math.sqrt(float(s)) for s in crop_scale)
        keys = ("image", "mask")
        transforms = [
            RandScaleCropd(keys, roi_scale=lo, max_roi_scale=hi, random_center=True, random_size=True),
            Resized(keys, spatial_size=(size, size), mode=("bilinear", "nearest-exact")),
            RandRotated(keys, range_x=math.radians(rotation), prob=1.0, mode=("bilinear", "nearest"), padding_mode="zeros"),
        ]
        if flip:
            transforms += [RandFlipd(keys, prob=0.5, spatial_axis=0), RandFlipd(keys, prob=0.5, spatial_axis=1)]
        self.transform = Compose(transforms)

    def set_random_state(self, seed: int) -> None:
        self.transform.set_random_state(seed=seed)

    def __call__(self, patch: torch.Tensor) -> torch.Tensor:
        out = self.transform({"image": patch[:1], "mask": patch[1:2]})
        img = torch.as_tensor(out["image"]).float()
        msk = (torch.as_tensor(out["mask"]) > 0.5).float()
        return torch.cat([img, msk]).as_subclass(torch.Tensor)


class AGCLPatchDataset(Dataset):
    """Target-centred patches of the slices of labeled volumes, two augmented views each.

    ``labels[i]`` is volume ``i``'s coarse segmentation (stored numbering) or ``None`` (volume
    skipped). Item: ``{"views": (2, 2, size, size), "label": modality * n_targets + target}``;
    ``index`` rows are ``(volume, slice, target)``. ``targets`` are stored structure names.
    """

    def __init__(
        self,
        volumes: Sequence,
        labels: Sequence[np.ndarray | None],
        targets: Sequence[str],
        modalities: Mapping[str, str] | None = None,
        size: int = 32,
        min_pixels: int = 4,
        augment: PairedAugment | None = None,
    ):
        self.volumes = list(volumes)
        self.labels = list(labels)
        self.targets = list(targets)
        self.values = [label_names.STORED_LABELS[label_names.canonical_name(t)] for t in self.targets]
        self.size = size
        self.augment = augment or PairedAugment(size)
        names = sorted({_case_modality(v, modalities or {}) for v, lab in zip(self.volumes, self.labels, strict=False) if lab is not None})
        self.modality_names = names or [UNKNOWN_MODALITY]
        self.case_modality = [
            self.modality_names.index(_case_modality(v, modalities or {})) if lab is not None else -1
            for v, lab in zip(self.volumes, self.labels, strict=False)
        ]
        rows = []
        for vi, lab in enumerate(self.labels):
            if lab is None:
                continue
            for ti, value in enumerate(self.values):
                counts = (lab == value).reshape(-1, lab.shape[-1]).sum(axis=0)
                rows += [(vi, int(z), ti) for z in np.flatnonzero(counts >= min_pixels)]
        if not rows:
            raise ConfigError(
                "AGCL found no target in the coarse segmentations: give label files (option 'labels') "
                "or a coarse model (option 'coarse_model')"
            )
        self.index = np.asarray(rows, dtype=np.int64)
        classes = {(self.case_modality[vi], ti) for vi, _, ti in rows}
        if len(classes) < 2:
            (mod, ti), = classes
            raise ConfigError(
                f"AGCL: every patch is of one class ({self.targets[ti]!r}, modality "
                f"{self.modality_names[mod]!r}): every pair is a positive and there is no negative, so "
                "the supervised contrastive loss is minimised by collapsing all embeddings to one point. "
                "Contrast the target against other structures (option 'negatives', e.g. the OARs, with "
                "a coarse segmentation that holds them) or give several modalities"
            )
        self.n_classes_present = len(classes)

    @property
    def n_targets(self) -> int:
        return len(self.targets)

    def __len__(self) -> int:
        return len(self.index)

    def patch(self, i: int) -> torch.Tensor:
        vi, z, ti = (int(v) for v in self.index[i])
        image = self.volumes[vi].image[..., z]
        mask = self.labels[vi][..., z] == self.values[ti]
        return extract_patch(image, mask, self.size)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        vi, _, ti = (int(v) for v in self.index[i])
        patch = self.patch(i)
        # MONAI's transforms keep their own RandomState, copied into each DataLoader worker:
        # reseed it from torch's generator, which the DataLoader seeds per worker.
        self.augment.set_random_state(int(torch.randint(0, 2**31 - 1, (1,))))
        views = torch.stack([self.augment(patch), self.augment(patch)])
        label = modal_target_labels(torch.tensor(self.case_modality[vi]), torch.tensor(ti), self.n_targets)
        return {"views": views, "label": label}


# =============================================================================== channels
def to_single_channel(encoder: ResNetEncoder) -> ResNetEncoder:
    """A 1-channel copy of a 2-channel (image, mask) AGCL encoder: the image channel's weights.

    Equivalent to the 2-channel encoder fed an all-zero mask channel.
    """
    cfg = encoder.config
    if cfg.in_channels == 1:
        return encoder
    out = ResNetEncoder(cfg.encoder, cfg.width, 1, cfg.stem)
    state = {k: v.detach().clone() for k, v in encoder.state_dict().items()}
    state["resnet.conv1.weight"] = state["resnet.conv1.weight"][:, :1].contiguous()
    out.load_state_dict(state)
    return out.to(next(encoder.parameters()).device)


def two_channel_path(out: str | Path) -> Path:
    """Where the 2-channel AGCL checkpoint goes next to the 1-channel ``out``: ``X.pt`` -> ``X.2ch.pt``."""
    out = Path(out)
    return out.with_name(f"{out.stem}.2ch{out.suffix or '.pt'}")


# =============================================================================== the method
class AGCL(PretrainMethod):
    """AGCL pretraining (Lee et al.): target-centred 2-channel patches, modal-target SupCon (Eq. 3).

    Options:
        targets: stored structure names (default: the ``oar`` model's seven OARs).
        labels / label_numbering / coarse_model: where the coarse segmentation comes from
            (:func:`load_coarse_labels`).
        modalities: ``{case or file name: modality}`` or a JSON file of it; a single modality
            when not given.
        patch_size: patch side in pixels at the model spacing (32 = 128 mm at 4 mm, about the
            paper's field of view of 128 px at 0.8 mm); ``config.image_size`` is not used, so
            that the encoder sees the fine-tuning scale.
        min_pixels: smallest target area in a slice for a patch.
        temperature: 0.1 (the paper). reduction: ``"sum"`` over anchors (Eq. 3) or ``"mean"``.
        crop_scale / rotation / flip: the paired augmentation (:class:`PairedAugment`).
        proj_dim: the projection's output (256, the paper's).
        negatives: structures whose patches are extra classes, contrasted against the targets
            (``None``: the OARs not among the targets when there is a single target, else none;
            ``[]``: none). A single class in the data is refused (see the module docstring).
        stem: ``"small"`` (3x3 stride 1, no max-pool: the authors' code, the default) or
            ``"imagenet"`` (7x7 stride 2 + max-pool, the U-Net's; see the module docstring).
    """

    name = "agcl"
    default_options = {
        "targets": list(label_names.OAR_NAMES),
        "labels": None,
        "label_numbering": "stored",
        "coarse_model": None,
        "modalities": None,
        "patch_size": 32,
        "min_pixels": 4,
        "temperature": 0.1,
        "reduction": "sum",
        "crop_scale": [0.3, 0.7],
        "rotation": 30.0,
        "flip": False,
        "proj_dim": 256,
        "negatives": None,
        "stem": "small",
    }
    default_lr = 1e-3
    default_optimizer = "adam"

    def __init__(self, encoder: ResNetEncoder, config: PretrainConfig):
        super().__init__(encoder, config)
        stem = str(self.options["stem"])
        if encoder.config.in_channels != 2 or encoder.config.stem != stem:  # an (image, mask) encoder, AGCL's stem
            encoder = ResNetEncoder(config.encoder, config.width, 2, stem).to(next(encoder.parameters()).device)
            self.encoder = encoder
        d = encoder.feature_dim
        self.projection = mlp_head([d, d, int(self.options["proj_dim"])], batch_norm=False)
        self.criterion = SupConLoss(float(self.options["temperature"]), str(self.options["reduction"]))
        self.modality_names: list[str] = []

    def class_names(self) -> list[str]:
        """The contrasted classes: the targets, then the negatives (other structures)."""
        targets = list(self.options["targets"])
        negatives = self.options["negatives"]
        if negatives is None:
            negatives = [n for n in label_names.OAR_NAMES if n not in targets] if len(targets) == 1 else []
        return targets + [n for n in negatives if n not in targets]

    def build_dataset(self, volumes: Sequence, device: torch.device | None = None) -> AGCLPatchDataset:
        o = self.options
        labels = load_coarse_labels(volumes, self.config, o, device)
        missing = [v.case for v, lab in zip(volumes, labels, strict=False) if lab is None]
        if missing:
            logger.warning("AGCL: no coarse segmentation for %d case(s), skipped: %s", len(missing), missing[:10])
        ds = AGCLPatchDataset(
            volumes,
            labels,
            self.class_names(),
            read_modalities(o["modalities"]),
            size=int(o["patch_size"]),
            min_pixels=int(o["min_pixels"]),
            augment=PairedAugment(int(o["patch_size"]), o["crop_scale"], float(o["rotation"]), bool(o["flip"])),
        )
        self.modality_names = ds.modality_names
        logger.info("AGCL: %d patches, %d targets, modalities %s", len(ds), ds.n_targets, ds.modality_names)
        return ds

    def stages(self, volumes: Sequence, ctx: RunContext):
        yield Stage(
            "main", self, self.build_dataset(volumes, ctx.device), self.config.iterations,
            on_end=lambda: self.save_two_channel() if ctx.is_main else None,
        )

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.projection(self.encoder.pooled(x))

    def loss(self, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        views = batch["views"]  # (B, 2 views, 2 channels, P, P)
        z = self.embed(views.flatten(0, 1))  # rows 2k, 2k+1: the two views of patch k
        labels = batch["label"].repeat_interleave(2)
        if bool((labels == labels[0]).all()):
            # one class: no negative, the loss would only pull everything together (collapse)
            logger.debug("AGCL: a batch of a single class skipped (no negative to contrast)")
            loss = z.sum() * 0.0
            return loss, {"loss": 0.0, "single_class_batch": 1.0}
        loss = self.criterion(z.float(), labels)
        return loss, {"loss": float(loss.detach())}

    def save_two_channel(self, path: str | Path | None = None) -> Path:
        """Write the 2-channel encoder (for the fine-tuning variant's segmenter); default :func:`two_channel_path`."""
        path = Path(path) if path is not None else two_channel_path(self.config.out)
        save_encoder(self.encoder, path, **self._meta(channels=2))
        return path

    def _meta(self, channels: int) -> dict[str, Any]:
        return {
            "method": "agcl",
            "input_channels": ["image", "target mask"][:channels],
            "targets": list(self.options["targets"]),
            "contrasted_classes": self.class_names(),
            "modalities": list(self.modality_names),
            "stem": self.encoder.config.stem,
            "two_channel_checkpoint": str(two_channel_path(self.config.out)),
        }

    def output_encoder(self) -> ResNetEncoder:
        """The 1-channel encoder (first conv: image channel) that the app's U-Net loads."""
        return to_single_channel(self.encoder)

    def output_meta(self) -> dict[str, Any]:
        return {**self._meta(channels=1), "conversion": "first conv: image channel kept"}
