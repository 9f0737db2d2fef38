"""ContourCL radonc: the MONAI Label app (wiring only; the logic is in ``contourcl``).

    monailabel start_server --app apps/radonc --studies sample-data --conf models all
"""

from contourcl.serving.app import ContourApp


class MyApp(ContourApp):
    """Head-and-neck auto-contouring: ``oar`` and ``gtv`` models."""
