"""ContourCL radonc: the MONAI Label app (wiring only; the logic is in ``contourcl``).

    monailabel start_server --app apps/radonc --studies /path/to/CTs --conf models all --host 127.0.0.1
    monailabel start_server --app apps/radonc --studies sample-data --conf models all --conf weights synthetic --host 127.0.0.1

The models are the files of ``lib/configs/`` (one per model, as in MONAI Label's radiology app):
a new file there is a new model. The default weights (``model/oar.pt``, ``model/gtv.pt``) are
trained on real head-and-neck CT (OpenKBP); ``model/synthetic/`` holds weights trained on the
synthetic phantoms of ``sample-data``.
"""

from monailabel.interfaces.app import MONAILabelApp

import lib.configs  # MONAI Label puts the app folder first on sys.path while it loads this file
from contourcl.serving import app
from contourcl.serving.config import model_configs


# MONAI Label instantiates the class of main.py that names MONAILabelApp among its own bases
class MyApp(app.ContourApp, MONAILabelApp):
    """Head-and-neck auto-contouring: the models of ``lib/configs/``."""

    configs = model_configs(lib.configs)
