"""ContourCL radonc: the MONAI Label app (wiring only; the logic is in ``contourcl``).

    monailabel start_server --app apps/radonc --studies /path/to/CTs --conf models all --host 127.0.0.1
    monailabel start_server --app apps/radonc --studies sample-data --conf models all --conf weights synthetic --host 127.0.0.1

The default weights (``model/oar.pt``, ``model/gtv.pt``) are trained on real head-and-neck CT
(OpenKBP); ``model/synthetic/`` holds weights trained on the synthetic phantoms of ``sample-data``.
"""

from contourcl.serving.app import ContourApp


class MyApp(ContourApp):
    """Head-and-neck auto-contouring: ``oar`` and ``gtv`` models."""
