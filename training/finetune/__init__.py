"""Supervised fine-tuning of the segmentation models: the engine, its losses, AGCL's variant."""
