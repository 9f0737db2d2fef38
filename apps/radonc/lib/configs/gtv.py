"""The ``gtv`` model: the tumour target."""

from contourcl.serving.config import ModelConfig

config = ModelConfig(
    name="gtv",
    description="Tumour target (trained on PTV70 where no GTV exists), 2D U-Net on axial slices",
    largest_component=False,  # a target may be multi-focal
    # a target's errors are whole regions, not borders: a click corrects within 40 mm in its plane
    # (not the refinement file's 20 mm) and 25 mm above and below (not 7.5 mm); measured in
    # docs/models/refine.md
    edit_radius_mm=40.0,
    click_reach_mm=25.0,
)
