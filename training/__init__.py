"""``contourcl.training``: contrastive pretraining of the encoder, fine-tuning of the models, and the experiments.

- :mod:`contourcl.training.pretrain`: the pretraining framework, its trainer and one module per method.
- :mod:`contourcl.training.finetune`: supervised fine-tuning of the 2D U-Net (the engine behind the
  app's retraining and ``contourcl finetune``), its losses and AGCL's fine-tuning variant.
- :mod:`contourcl.training.experiments`: the label-efficiency benchmark and its report.
"""
