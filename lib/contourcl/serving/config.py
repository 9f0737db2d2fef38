"""A served model's facts: one :class:`ModelConfig` per file of the app's ``lib/configs/``.

As in MONAI Label's radiology app, each model of the app is a file in ``<app>/lib/configs/``
that holds a ``config = ModelConfig(...)``; the app's ``main.py`` finds them with
:func:`model_configs` (MONAI Label puts the app folder on ``sys.path`` while it loads ``main.py``,
in the server and in its training and scoring subprocesses). Commands run outside the server
read the same files with :func:`app_configs`.

A model file records its own largest-component rule when it was written with one
(:attr:`contourcl.models.checkpoint.ModelMeta.largest_component`); the config's rule is the
default for files that do not.
"""

from __future__ import annotations

import importlib
import pkgutil
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType


@dataclass(frozen=True)
class ModelConfig:
    """One model the app serves.

    ``structures`` (stored structure names, numbered from 1 in this order) makes a new model: it is
    registered in :data:`contourcl.data.labels.MODEL_LABELS` when the config is made. Without it
    the model must be one ContourCL knows (``oar``, ``gtv``).
    """

    name: str
    description: str
    #: keep only the largest connected component of each structure (an organ is one object; a
    #: target may be several), for model files that do not record the rule themselves
    largest_component: bool
    structures: tuple[str, ...] | None = None

    def __post_init__(self):
        from contourcl.data.labels import model_labels, register_model  # numpy: imported when a config is made, not by `contourcl models`

        if self.structures is not None:
            register_model(self.name, self.structures)
        model_labels(self.name)  # an unknown model is refused, naming the known ones
        if not isinstance(self.largest_component, bool):
            raise TypeError(f"{self.name}: largest_component must be True or False, not {self.largest_component!r}")


def model_configs(package: ModuleType) -> dict[str, ModelConfig]:
    """``{name: config}`` of the modules of ``package`` (an app's ``lib.configs``), each holding
    ``config = ModelConfig(...)``; in the order of :data:`~contourcl.data.labels.MODEL_LABELS`."""
    found: dict[str, ModelConfig] = {}
    for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda i: i.name):
        module = importlib.import_module(f"{package.__name__}.{info.name}")
        config = getattr(module, "config", None)
        if not isinstance(config, ModelConfig):
            raise TypeError(f"{module.__file__}: a model config file holds config = ModelConfig(...)")
        if config.name in found:
            raise ValueError(f"{module.__file__}: a second config of the model {config.name!r}")
        found[config.name] = config
    if not found:
        raise ValueError(f"no model config in {list(package.__path__)}: the app serves the models of lib/configs/*.py")
    from contourcl.data.labels import MODEL_LABELS

    order = list(MODEL_LABELS)  # the built-in models first, then those the configs registered
    return {name: found[name] for name in sorted(found, key=order.index)}


def app_configs(app_dir: str | Path) -> dict[str, ModelConfig]:
    """The configs of the app folder ``app_dir``, loaded as MONAI Label loads an app: the folder
    first on ``sys.path`` while its ``lib`` package is imported afresh."""
    app_dir = str(Path(app_dir).resolve())
    for name in [m for m in sys.modules if m == "lib" or m.startswith("lib.")]:
        del sys.modules[name]
    sys.path.insert(0, app_dir)
    try:
        return model_configs(importlib.import_module("lib.configs"))
    finally:
        sys.path.remove(app_dir)


def default_app() -> Path | None:
    """``apps/radonc`` of the repository the ``contourcl`` package is installed from, if any."""
    import contourcl

    app = Path(contourcl.__file__).resolve().parents[2] / "apps" / "radonc"  # <repo>/lib/contourcl/__init__.py
    return app if (app / "main.py").is_file() else None


def default_largest_component(model: str) -> bool:
    """The largest-component rule of ``model`` in the repository's app (:func:`default_app`), for
    model files that do not record one; ``True`` (the contourer's default) without that app."""
    app = default_app()
    configs = app_configs(app) if app is not None else {}
    return configs[model].largest_component if model in configs else True
