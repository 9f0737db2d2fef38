"""MONAI Label glue: the tasks, datastore and app base that ``apps/radonc`` wires together.

Nothing here holds contouring logic; it adapts :mod:`contourcl` to MONAI Label's interfaces
(``InferTask``, ``TrainTask``, ``Strategy``, ``LocalDatastore``, ``MONAILabelApp``) and turns
ContourCL's input errors into HTTP errors that name the problem.
"""
