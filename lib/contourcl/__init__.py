"""ContourCL: auto-contouring of head-and-neck CT for radiotherapy.

Data flows one way: CT and labels -> :mod:`contourcl.transforms` (preprocessing) ->
:mod:`contourcl.training` (pretraining, fine-tuning) -> :mod:`contourcl.serving` (MONAI Label).
"""

__version__ = "0.1.0"
