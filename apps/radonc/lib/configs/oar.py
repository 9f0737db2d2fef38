"""The ``oar`` model: the organs at risk of the head and neck."""

from contourcl.serving.config import ModelConfig

config = ModelConfig(
    name="oar",
    description="Organs at risk of the head and neck (TG-263 names), 2D U-Net on axial slices",
    largest_component=True,  # each organ is one object
)
