"""The ``gtv`` model: the tumour target."""

from contourcl.serving.config import ModelConfig

config = ModelConfig(
    name="gtv",
    description="Tumour target (trained on PTV70 where no GTV exists), 2D U-Net on axial slices",
    largest_component=False,  # a target may be multi-focal
)
