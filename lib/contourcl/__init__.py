"""ContourCL: auto-contouring of head-and-neck CT for radiotherapy.

Dependencies go one way: the core (:mod:`contourcl.data`, :mod:`contourcl.models`, inference,
evaluation, active learning) <- :mod:`contourcl.training` (pretraining, fine-tuning) <-
:mod:`contourcl.serving` (MONAI Label) and :mod:`contourcl.cli` (the ``contourcl`` command).
"""

__version__ = "0.1.0"
