"""The pretraining checkpoint: an encoder's weights, its architecture and the run's ``meta``.

Pretraining (:mod:`contourcl.training.pretrain`) writes it with :func:`save_encoder`; this module
is the one place that parses it: :func:`load_encoder` initialises a U-Net's encoder from it,
:func:`read_encoder` rebuilds the encoder alone. It is read as data (``weights_only=True``), never
as code.
"""

from __future__ import annotations

from pathlib import Path

import torch

from contourcl.models.networks import ContourUNet, EncoderConfig, ResNetEncoder


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


def read_encoder(path: str | Path) -> tuple[ResNetEncoder, dict]:
    """The encoder of a pretraining checkpoint, rebuilt with the architecture it records, and its ``meta``."""
    ckpt = _read(path)
    cfg = EncoderConfig(**ckpt.get("encoder_config", {}))
    encoder = ResNetEncoder(cfg.encoder, cfg.width, cfg.in_channels)
    encoder.load_state_dict(ckpt["encoder"])
    return encoder, ckpt.get("meta", {})


def load_encoder(network: ContourUNet, path: str | Path) -> dict:
    """Initialise ``network``'s encoder from a pretraining checkpoint; returns its ``meta``.

    Raises ``ValueError`` when the checkpoint's encoder is not the network's (another depth,
    width or number of input channels), naming both.
    """
    ckpt = _read(path)
    want = EncoderConfig(network.config.encoder, network.config.width, network.config.in_channels).to_dict()
    have = ckpt.get("encoder_config", {})
    if have != want:
        raise ValueError(f"{path} holds encoder {have}, but the network's encoder is {want}")
    network.encoder.load_state_dict(ckpt["encoder"])
    return ckpt.get("meta", {})
