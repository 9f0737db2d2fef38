"""Contrastive pretraining of the encoder: the framework, the trainer and one module per method."""
