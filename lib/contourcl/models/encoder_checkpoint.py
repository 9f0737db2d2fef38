"""The pretraining checkpoint: an encoder's weights, its architecture and the run's ``meta``.

Pretraining (:mod:`contourcl.training.pretrain`) writes it with :func:`save_encoder`; this module
is the one place that parses it: :func:`load_encoder` initialises a U-Net's encoder from it,
:func:`read_encoder` rebuilds the encoder alone. It is read as data (``weights_only=True``), never
as code.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from contourcl.models.networks import STEM_KEYS, ContourUNet, EncoderConfig, ResNetEncoder

logger = logging.getLogger(__name__)


def save_encoder(encoder: ResNetEncoder, path: str | Path, **meta) -> None:
    """Write a pretraining checkpoint: the encoder's weights, its config and ``meta``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"encoder": encoder.state_dict(), "encoder_config": encoder.config.to_dict(), "meta": meta}, tmp)
    tmp.replace(path)


def _read(path: str | Path) -> dict:
    ckpt = torch.load(Path(path), map_location="cpu", weights_only=True)  # data only, never code
    if not isinstance(ckpt, dict) or "encoder" not in ckpt:
        raise ValueError(f"{path} is not a ContourCL pretraining checkpoint (no 'encoder' entry)")
    return ckpt


def input_mismatch(meta: dict, spacing, window) -> str | None:
    """How the images a checkpoint was pretrained on (its ``meta``'s in-plane ``spacing`` and HU
    ``window``) differ from a fine-tuning's, in words; None when they agree or the checkpoint does
    not say. An encoder pretrained at 4 mm sees organs a third larger at 3 mm."""
    parts = []
    for name, unit, have, want in (("in-plane spacing", "mm", meta.get("spacing"), spacing), ("window", "HU", meta.get("window"), window)):
        if have is not None and [round(float(v), 6) for v in have] != [round(float(v), 6) for v in want]:
            parts.append(f"{name} {list(map(float, have))} {unit} (here {list(map(float, want))})")
    return "; ".join(parts) if parts else None


def read_encoder(path: str | Path) -> tuple[ResNetEncoder, dict]:
    """The encoder of a pretraining checkpoint, rebuilt with the architecture it records, and its ``meta``."""
    ckpt = _read(path)
    cfg = EncoderConfig(**ckpt.get("encoder_config", {}))
    encoder = ResNetEncoder(cfg.encoder, cfg.width, cfg.in_channels, cfg.stem)
    encoder.load_state_dict(ckpt["encoder"])
    return encoder, ckpt.get("meta", {})


def inflate_first_conv(state: dict, channels: int) -> dict:
    """A 1-channel encoder's weights for ``channels`` input channels (neighbouring slices): the
    first convolution's kernel is repeated over the channels and divided by their number (the
    inflation of Carreira & Zisserman 2017, I3D, Sec. 2.5, here over slices instead of frames), so
    that a CT whose neighbouring slices equal the centre one gives exactly the 2D responses."""
    out = dict(state)
    for key, weight in state.items():
        if key.split("resnet.", 1)[-1] == "conv1.weight":
            out[key] = weight.repeat(1, channels, *([1] * (weight.ndim - 2))) / channels
    return out


def load_encoder(network: ContourUNet, path: str | Path) -> dict:
    """Initialise ``network``'s encoder from a pretraining checkpoint; returns its ``meta``.

    Raises ``ValueError`` when the checkpoint's encoder is not the network's (another depth,
    width or number of input channels), naming both; a 1-channel (2D) checkpoint initialises a
    2.5D network (neighbouring slices as channels) through :func:`inflate_first_conv`, recorded
    in the returned meta (``"inflated"``). A checkpoint whose encoder differs from the
    network's in its stem only (AGCL's small-patch stem, 3x3 stride 1 without max-pool, against
    the U-Net's 7x7 stride 2 with max-pool) transfers everything but the stem (``conv1``,
    ``bn1``), which keeps the network's initialisation; this is logged and recorded in the
    returned meta (``"not_transferred"``). Checkpoints written before the stem was recorded
    have the U-Net's stem.
    """
    ckpt = _read(path)
    want = EncoderConfig(network.config.encoder, network.config.width, network.config.in_channels).to_dict()
    have = {"stem": "imagenet", "in_channels": 1, **ckpt.get("encoder_config", {})}
    meta = dict(ckpt.get("meta", {}))
    if have["in_channels"] == 1 and want["in_channels"] > 1 and "conv1.weight" in (key.split("resnet.", 1)[-1] for key in ckpt["encoder"]):
        # 2.5D network, 2D pretraining: inflate the first convolution (see inflate_first_conv)
        ckpt["encoder"] = inflate_first_conv(ckpt["encoder"], want["in_channels"])
        have["in_channels"] = want["in_channels"]
        meta["inflated"] = f"conv1: 1 -> {want['in_channels']} input channels"
    if {k: v for k, v in have.items() if k != "stem"} != {k: v for k, v in want.items() if k != "stem"}:
        raise ValueError(f"{path} holds encoder {have}, but the network's encoder is {want}")
    if have["stem"] == want["stem"]:
        network.encoder.load_state_dict(ckpt["encoder"])
        return meta
    state = {k: v for k, v in ckpt["encoder"].items() if not k.startswith(STEM_KEYS)}
    skipped = sorted(k for k in ckpt["encoder"] if k.startswith(STEM_KEYS))
    missing, unexpected = network.encoder.load_state_dict(state, strict=False)
    if unexpected or any(not k.startswith(STEM_KEYS) for k in missing):
        raise ValueError(f"{path}: encoder weights do not fit beyond the stem (missing {missing}, unexpected {unexpected})")
    logger.warning(
        "%s: pretrained with the %r stem, the network has the %r stem: all but the stem transferred "
        "(%s keep the network's initialisation)", path, have["stem"], want["stem"], ", ".join(skipped),
    )
    meta["not_transferred"] = skipped
    return meta
