"""``contourcl.training``: contrastive pretraining of the encoder and fine-tuning of the models.

- :mod:`contourcl.training.finetune`: supervised fine-tuning of the 2D U-Net (the engine behind
  the app's retraining and ``contourcl finetune``), with partial-label loss.
- Pretraining methods, one module each (see the package listing).
"""
