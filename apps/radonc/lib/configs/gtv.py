"""The ``gtv`` model: the tumour target."""

from contourcl.serving.config import ModelConfig

config = ModelConfig(
    name="gtv",
    description="Tumour target (trained on PTV70 where no GTV exists), 2D U-Net on axial slices",
    largest_component=False,  # a target may be multi-focal
    # a click corrects a region of the target's scale (its errors are whole regions, not borders):
    # 40 mm, not the refinement file's 20 mm; measured in docs/models/refine.md
    edit_radius_mm=40.0,
)
