"""The refinement network: one 2D U-Net for every structure of every model.

It is the project's :class:`~contourcl.models.networks.ContourUNet` (ResNet encoder, MONAI's
U-Net decoder) with four input channels (eight with slice context), an axial slice each (:data:`INPUT_CHANNELS`):

1. the CT, windowed and scaled to [0, 1] as the shipped models' files say (their ``window``),
   on their in-plane grid (their ``spacing``: 3 x 3 mm);
2. the structure's current mask (0/1);
3. the positive and 4. the negative click maps (:mod:`contourcl.refine.encoding`);

and, in a network with slice context (:data:`CONTEXT_CHANNELS`, ``in_channels`` 8), the CT and
the current mask on the slices below and above (at the grid's first and last slice, that slice itself),
so that the network sees how the structure runs from slice to slice;

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
#: a network with slice context takes these after :data:`INPUT_CHANNELS`: the neighbouring slices
CONTEXT_CHANNELS = ("ct_below", "ct_above", "mask_below", "mask_above")
#: the logit the current mask adds (inside) or takes away (outside): the network learns corrections
MASK_PRIOR_LOGIT = 1.0  # small: a correction need not outweigh it by much (docs/models/refine.md)
#: the ``model`` a refinement model file names
REFINE_MODEL = "refine"
#: its ``labels``: one output, the structure being refined
REFINE_LABELS = {"structure": 1}


def input_channels(context: bool = False) -> tuple[str, ...]:
    """The refinement network's input channels, in order (with ``context``: the neighbouring slices too)."""
    return INPUT_CHANNELS + (CONTEXT_CHANNELS if context else ())


def has_context(network: ContourUNet) -> bool:
    """Whether ``network`` takes the neighbouring slices (:data:`CONTEXT_CHANNELS`)."""
    n = int(network.config.in_channels)
    if n not in (len(INPUT_CHANNELS), len(input_channels(True))):
        raise ValueError(f"a refinement network takes {len(INPUT_CHANNELS)} or {len(input_channels(True))} input channels, not {n}")
    return n == len(input_channels(True))


def refine_config(base: NetConfig | dict, context: bool = False) -> NetConfig:
    """The refinement network's configuration: ``base``'s encoder and decoder, the inputs of
    :func:`input_channels`, one output."""
    base = base if isinstance(base, NetConfig) else NetConfig(**base)
    return NetConfig(out_channels=1, encoder=base.encoder, width=base.width, in_channels=len(input_channels(context)),
                     dropout=base.dropout, decoder_channels=tuple(base.decoder_channels))


#: the one weight whose shape depends on the input channels (MONAI's decoder takes no input skip)
FIRST_CONV = "encoder.resnet.conv1.weight"


def with_context(network: ContourUNet) -> ContourUNet:
    """``network`` (a refinement network without slice context) taking the neighbouring slices
    too: the same weights, the new channels' first-convolution weights zero, so that it answers
    exactly as ``network`` until trained."""
    if has_context(network):
        return network
    wider = build_network(refine_config(network.config, context=True))
    state = {k: v.clone() for k, v in network.state_dict().items()}
    weight = torch.zeros_like(wider.state_dict()[FIRST_CONV])
    weight[:, : len(INPUT_CHANNELS)] = state[FIRST_CONV]
    state[FIRST_CONV] = weight
    wider.load_state_dict(state)
    return wider


def from_shipped(model_path: str, context: bool = False) -> tuple[ContourUNet, ModelMeta]:
    """A refinement network started from the model file at ``model_path`` (e.g. the shipped
    ``oar.pt``), and that file's meta (its preprocessing is the refinement network's); with
    ``context``, taking the neighbouring slices too (their weights zero)."""
    shipped, meta = load_model(model_path)
    if int(shipped.config.in_channels) != 1:
        raise ValueError(f"{model_path}: a network of {shipped.config.in_channels} input channels; start from a one-slice model")
    network = build_network(refine_config(shipped.config, context))
    source = shipped.state_dict()
    state = network.state_dict()
    for key, value in source.items():
        if key == FIRST_CONV:
            weight = torch.zeros_like(state[key])
            weight[:, :1] = value  # the CT channel's weights; mask, clicks and context start at zero
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
