"""The networks and the files that hold them: the served model file and the pretraining checkpoint."""
