"""The refinement network: one 2D U-Net for every structure of every model.

It is the project's :class:`~contourcl.models.networks.ContourUNet` (ResNet encoder, MONAI's
U-Net decoder) with four input channels, an axial slice each (:data:`INPUT_CHANNELS`):

1. the CT, windowed and scaled to [0, 1] as the shipped models' files say (their ``window``),
   on their in-plane grid (their ``spacing``: 3 x 3 mm);
2. the structure's current mask (0/1);
3. the positive and 4. the negative click maps (:mod:`contourcl.refine.encoding`);

and one output: the logit of the structure's new mask on the slice, as a correction of the current
mask: :func:`refine_logits` adds ``MASK_PRIOR_LOGIT * (2 mask - 1)`` to the network's output, so a
network whose output is 0 returns the mask unchanged. It is started from a shipped
model file (:func:`from_shipped`): the encoder and decoder are that model's; the first
convolution takes four channels, the CT's weights copied and the other three channels' zero (so
that the untrained network is the shipped model's features of the CT); the one-channel head is
new and starts at zero (the untrained network returns the current mask). The model file is the project's (:mod:`contourcl.models.checkpoint`) with ``model``
``"refine"`` and ``labels`` ``{"structure": 1}``; its provenance holds the click encoding it was
trained with (``provenance["encoding"]``).
"""

from __future__ import annotations

import torch

from contourcl.models.checkpoint import ModelMeta, load_model
from contourcl.models.networks import ContourUNet, NetConfig, build_network
from contourcl.refine.encoding import CLICK_RADIUS_MM, CLICK_REACH_MM, EDIT_RADIUS_MM

#: the network's input channels, in order
INPUT_CHANNELS = ("ct", "mask", "positive", "negative")
#: the logit the current mask adds (inside) or takes away (outside): the network learns corrections
MASK_PRIOR_LOGIT = 1.0  # small: a correction need not outweigh it by much (docs/models/refine.md)
#: the ``model`` a refinement model file names
REFINE_MODEL = "refine"
#: its ``labels``: one output, the structure being refined
REFINE_LABELS = {"structure": 1}


def refine_config(base: NetConfig | dict) -> NetConfig:
    """The refinement network's configuration: ``base``'s encoder and decoder, four inputs, one output."""
    base = base if isinstance(base, NetConfig) else NetConfig(**base)
    return NetConfig(out_channels=1, encoder=base.encoder, width=base.width, in_channels=len(INPUT_CHANNELS),
                     dropout=base.dropout, decoder_channels=tuple(base.decoder_channels))


def from_shipped(model_path: str) -> tuple[ContourUNet, ModelMeta]:
    """A refinement network started from the model file at ``model_path`` (e.g. the shipped
    ``oar.pt``), and that file's meta (its preprocessing is the refinement network's)."""
    shipped, meta = load_model(model_path)
    if int(shipped.config.in_channels) != 1:
        raise ValueError(f"{model_path}: a network of {shipped.config.in_channels} input channels; start from a one-slice model")
    network = build_network(refine_config(shipped.config))
    source = shipped.state_dict()
    state = network.state_dict()
    conv1 = "encoder.resnet.conv1.weight"
    for key, value in source.items():
        if key == conv1:
            weight = torch.zeros_like(state[key])
            weight[:, :1] = value  # the CT channel's weights; mask and clicks start at zero
            state[key] = weight
        elif key.startswith(("encoder.", "decoder.")) and key in state and state[key].shape == value.shape:
            state[key] = value.clone()
    state["head.0.weight"] = torch.zeros_like(state["head.0.weight"])
    state["head.0.bias"] = torch.zeros_like(state["head.0.bias"])
    network.load_state_dict(state)
    return network, meta


def refine_logits(network: ContourUNet, inputs: torch.Tensor, prior: float = MASK_PRIOR_LOGIT) -> torch.Tensor:
    """The new mask's logits ``(N, H, W)`` for inputs ``(N, 4, H, W)``: the network's correction
    plus ``prior`` times the current mask (channel 1) in -1/+1."""
    return network(inputs)[:, 0].float() + prior * (2 * inputs[:, 1].float() - 1)


def refine_meta(network: ContourUNet, base: ModelMeta, provenance: dict | None = None, metrics: dict | None = None,
                radius_mm: float = CLICK_RADIUS_MM, reach_mm: float = CLICK_REACH_MM, edit_radius_mm: float | None = EDIT_RADIUS_MM) -> ModelMeta:
    """The model-file meta of a refinement ``network`` working on ``base``'s preprocessing."""
    return ModelMeta(
        model=REFINE_MODEL,
        labels=dict(REFINE_LABELS),
        net=network.config.to_dict(),
        spacing=tuple(base.spacing),
        window=tuple(base.window),
        roi=tuple(base.roi),
        metrics=dict(metrics or {}),
        provenance={"encoding": {"radius_mm": float(radius_mm), "reach_mm": float(reach_mm),
                                 "edit_radius_mm": None if edit_radius_mm is None else float(edit_radius_mm)}, "mask_prior_logit": MASK_PRIOR_LOGIT,
                    **(provenance or {})},
        largest_component=False,
        tta_flip=False,
    )
