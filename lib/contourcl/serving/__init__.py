"""Serving with MONAI Label: the app base, tasks and datastore that ``apps/radonc`` wires together,
the served models' store and their retraining behind the quality gate.

It adapts :mod:`contourcl` to MONAI Label's interfaces (``InferTask``, ``TrainTask``, ``Strategy``,
``LocalDatastore``, ``MONAILabelApp``) and turns ContourCL's input errors into HTTP errors that
name the problem.
"""
