"""The segmentation network: a 2D U-Net on axial slices with a ResNet-family encoder.

The encoder is MONAI's :class:`~monai.networks.nets.ResNet` (basic blocks for ResNet-10/18/34,
bottlenecks for ResNet-50, as in SepaReg), read out at five scales; the decoder is MONAI's
:class:`~monai.networks.nets.flexible_unet.UNetDecoder`. ``width`` scales the channels: 64 is the
standard ResNet, the default 32 is a quarter of the parameters and fast on a CPU.

The encoder is the part that contrastive pretraining (:mod:`contourcl.training`) learns; its
checkpoint is read by :mod:`contourcl.models.encoder_checkpoint`.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field

import torch
from monai.networks.nets import ResNet
from monai.networks.nets.flexible_unet import SegmentationHead, UNetDecoder
from torch import nn

#: depth -> (block, layers)
RESNET_SPECS: dict[str, tuple[str, tuple[int, int, int, int]]] = {
    "resnet10": ("basic", (1, 1, 1, 1)),
    "resnet18": ("basic", (2, 2, 2, 2)),
    "resnet34": ("basic", (3, 4, 6, 3)),
    "resnet50": ("bottleneck", (3, 4, 6, 3)),
}


@dataclass
class NetConfig:
    """Everything needed to rebuild a network; stored in every checkpoint."""

    out_channels: int
    encoder: str = "resnet18"
    width: int = 32
    in_channels: int = 1
    dropout: float = 0.1
    decoder_channels: tuple[int, ...] = field(default=())

    def __post_init__(self):
        if self.encoder not in RESNET_SPECS:
            raise ValueError(f"unknown encoder {self.encoder!r}; choose from {sorted(RESNET_SPECS)}")
        if not self.decoder_channels:
            w = self.width
            self.decoder_channels = (4 * w, 2 * w, w, max(w // 2, 8), max(w // 4, 8))
        self.decoder_channels = tuple(int(c) for c in self.decoder_channels)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class EncoderConfig:
    """The encoder part of :class:`NetConfig`: what a pretraining checkpoint must match."""

    encoder: str = "resnet18"
    width: int = 32
    in_channels: int = 1
    #: ``"imagenet"``: 7x7 stride-2 conv + max-pool (the U-Net's); ``"small"``: 3x3 stride-1
    #: conv, no max-pool (AGCL's pretraining on small patches, :data:`STEMS`)
    stem: str = "imagenet"

    def to_dict(self) -> dict:
        return asdict(self)


#: encoder stems: (first conv kernel, its stride, max-pool)
STEMS = {"imagenet": (7, 2, True), "small": (3, 1, False)}
#: the stem's parameters in a ResNetEncoder's state dict
STEM_KEYS = ("resnet.conv1.", "resnet.bn1.")


class ResNetEncoder(nn.Module):
    """A 2D ResNet that returns its feature maps at strides 2, 4, 8, 16 and 32.

    (With ``stem="small"``, 3x3 stride-1 first conv and no max-pool, strides 1, 1, 2, 4, 8:
    for AGCL's pretraining on small patches only; the U-Net needs the ``"imagenet"`` stem.)

    ``forward`` returns the five maps (for the U-Net decoder); :meth:`pooled` returns the
    global-average-pooled last map, the representation that image- and region-level
    contrastive methods train.
    """

    def __init__(self, encoder: str = "resnet18", width: int = 32, in_channels: int = 1, stem: str = "imagenet"):
        super().__init__()
        if stem not in STEMS:
            raise ValueError(f"unknown stem {stem!r}; choose from {sorted(STEMS)}")
        kernel, stride, max_pool = STEMS[stem]
        self.config = EncoderConfig(encoder, width, in_channels, stem)
        block, layers = RESNET_SPECS[encoder]
        self.resnet = ResNet(
            block=block,
            layers=list(layers),
            block_inplanes=[width, 2 * width, 4 * width, 8 * width],
            spatial_dims=2,
            n_input_channels=in_channels,
            conv1_t_size=kernel,
            conv1_t_stride=stride,
            no_max_pool=not max_pool,
            feed_forward=False,
        )
        expansion = 4 if block == "bottleneck" else 1
        self.out_channels = (width, width * expansion, 2 * width * expansion, 4 * width * expansion, 8 * width * expansion)

    @property
    def feature_dim(self) -> int:
        return self.out_channels[-1]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        r = self.resnet
        f1 = r.act(r.bn1(r.conv1(x)))
        f2 = r.layer1(f1 if r.no_max_pool else r.maxpool(f1))
        f3 = r.layer2(f2)
        f4 = r.layer3(f3)
        f5 = r.layer4(f4)
        return [f1, f2, f3, f4, f5]

    def pooled(self, x: torch.Tensor) -> torch.Tensor:
        """Global feature vector ``(B, feature_dim)``."""
        return torch.flatten(self.resnet.avgpool(self.forward(x)[-1]), 1)


class ContourUNet(nn.Module):
    """2D U-Net with a :class:`ResNetEncoder`; logits at the input's resolution.

    Height and width must be multiples of 32 (the training crops and the sliding-window
    inference in :mod:`contourcl.inference` guarantee it).
    """

    def __init__(self, config: NetConfig):
        super().__init__()
        self.config = config
        self.encoder = ResNetEncoder(config.encoder, config.width, config.in_channels)
        self.decoder = UNetDecoder(
            spatial_dims=2,
            encoder_channels=(config.in_channels, *self.encoder.out_channels),
            decoder_channels=config.decoder_channels,
            act=("relu", {"inplace": True}),
            norm=("batch", {"eps": 1e-3, "momentum": 0.1}),
            dropout=config.dropout,
            bias=False,
            upsample="nontrainable",
            pre_conv="default",
            interp_mode="nearest",
            align_corners=None,
            is_pad=True,
        )
        self.head = SegmentationHead(2, config.decoder_channels[-1], config.out_channels, kernel_size=3, act=None)

    def decode(self, features: list[torch.Tensor]) -> torch.Tensor:
        """The last decoder layer's features (before the segmentation head)."""
        return self.decoder(features, 4)

    def decoder_outputs(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        """Every decoder block's output for encoder ``features``, coarsest (stride 16) first.

        Replays MONAI's ``UNetDecoder.forward`` (as :meth:`decode` calls it, 4 skip connections)
        block by block; the last output is exactly what :meth:`decode` returns.
        """
        skips = features[:-1][::-1]
        x = features[-1]
        outs = []
        for i, block in enumerate(self.decoder.blocks):
            x = block(x, skips[i] if i < 4 else None)
            outs.append(x)
        return outs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.decode(self.encoder(x)))


def build_network(config: NetConfig | dict) -> ContourUNet:
    """Build a :class:`ContourUNet` from a :class:`NetConfig` or its dict."""
    if isinstance(config, dict):
        config = NetConfig(**config)
    return ContourUNet(copy.deepcopy(config))
