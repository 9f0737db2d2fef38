"""A served model's facts: one :class:`ModelConfig` per file of the app's ``lib/configs/``.

As in MONAI Label's radiology app, each model of the app is a file in ``<app>/lib/configs/``
that holds a ``config = ModelConfig(...)``; the app's ``main.py`` finds them with
:func:`model_configs` (MONAI Label puts the app folder on ``sys.path`` while it loads ``main.py``,
in the server and in its training and scoring subprocesses). Commands run outside the server
read the same files with :func:`app_configs`, by path. Loading an app registers its models
(:func:`register`); building a config registers nothing.

A model file records its own largest-component rule when it was written with one
(:attr:`contourcl.models.checkpoint.ModelMeta.largest_component`); the config's rule is the
default for files that do not.
"""

from __future__ import annotations

import importlib
import importlib.util
import pkgutil
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType


@dataclass(frozen=True)
class ModelConfig:
    """One model the app serves: data only; :func:`register` makes it known.

    ``structures`` (stored structure names, numbered from 1 in this order) makes a new model.
    Without it the model must be one ContourCL knows (``oar``, ``gtv``).
    """

    name: str
    description: str
    #: keep only the largest connected component of each structure (an organ is one object; a
    #: target may be several), for model files that do not record the rule themselves
    largest_component: bool
    structures: tuple[str, ...] | None = None
    #: how far from a click (mm, in its axial plane) the refinement network may change this
    #: model's structures; ``None``: the refinement file's (20 mm, what it was trained with)
    edit_radius_mm: float | None = None
    #: how far above and below its slice (mm) a click of this model acts; ``None``: the file's (7.5 mm)
    click_reach_mm: float | None = None

    def __post_init__(self):
        if not isinstance(self.largest_component, bool):
            raise TypeError(f"{self.name}: largest_component must be True or False, not {self.largest_component!r}")
        try:
            self.click_scope  # noqa: B018 (validates)
        except ValueError as e:
            raise ValueError(f"{self.name}: {e}") from None

    @property
    def click_scope(self):
        """How far this model's clicks act (:class:`contourcl.refine.encoding.ClickScope`)."""
        from contourcl.refine.encoding import ClickScope  # numpy: not at `contourcl models`' import

        return ClickScope(self.edit_radius_mm, self.click_reach_mm)


def register(config: ModelConfig) -> ModelConfig:
    """Make ``config``'s model known to the label registry
    (:func:`contourcl.data.labels.register_model` for a model of new structures); an unknown model
    without structures is refused, naming the known ones."""
    from contourcl.data.labels import (  # numpy: imported when an app is loaded, not by `contourcl models`
        model_labels,
        register_model,
    )

    if config.structures is not None:
        register_model(config.name, config.structures)
    model_labels(config.name)
    return config


def _collect(modules: list[ModuleType], where: str) -> dict[str, ModelConfig]:
    """``{name: config}`` of config modules, each registered, in the registry's order."""
    found: dict[str, ModelConfig] = {}
    for module in modules:
        config = getattr(module, "config", None)
        if not isinstance(config, ModelConfig):
            raise TypeError(f"{module.__file__}: a model config file holds config = ModelConfig(...)")
        if config.name in found:
            raise ValueError(f"{module.__file__}: a second config of the model {config.name!r}")
        found[config.name] = register(config)
    if not found:
        raise ValueError(f"no model config in {where}: the app serves the models of lib/configs/*.py")
    from contourcl.data.labels import MODEL_LABELS

    order = list(MODEL_LABELS)  # the built-in models first, then those the configs registered
    return {name: found[name] for name in sorted(found, key=order.index)}


def model_configs(package: ModuleType) -> dict[str, ModelConfig]:
    """``{name: config}`` of the modules of ``package`` (an app's ``lib.configs``, as MONAI Label
    imports it in the server), each holding ``config = ModelConfig(...)``, registered."""
    names = sorted(info.name for info in pkgutil.iter_modules(package.__path__))
    return _collect([importlib.import_module(f"{package.__name__}.{name}") for name in names], str(list(package.__path__)))


def app_configs(app_dir: str | Path) -> dict[str, ModelConfig]:
    """The configs of the app folder ``app_dir`` for commands run outside the server: each file of
    ``lib/configs/`` is run from its path, without touching ``sys.path`` or ``sys.modules``."""
    folder = Path(app_dir).resolve() / "lib" / "configs"
    if not folder.is_dir():
        raise FileNotFoundError(f"{app_dir}: not a ContourCL app folder (no lib/configs/)")
    modules = []
    for file in sorted(folder.glob("*.py")):
        if file.name.startswith("_"):
            continue
        spec = importlib.util.spec_from_file_location(f"contourcl_app_config_{file.stem}", file)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        modules.append(module)
    return _collect(modules, str(folder))


def default_app() -> Path | None:
    """``apps/radonc`` of the repository the ``contourcl`` package is installed from, if any."""
    import contourcl

    app = Path(contourcl.__file__).resolve().parents[2] / "apps" / "radonc"  # <repo>/lib/contourcl/__init__.py
    return app if (app / "main.py").is_file() else None


def resolve_app(app: str | Path | None) -> Path:
    """The app folder a command works with: ``app``, or the app shipped with the package."""
    if app is None:
        app = default_app()
        if app is None:
            raise FileNotFoundError("no app folder: pass --app PATH (the app folder with main.py, e.g. apps/radonc); "
                                    "the contourcl package is not installed from a repository with apps/radonc")
    app = Path(app)
    if not (app / "main.py").is_file():
        raise FileNotFoundError(f"--app {app}: not a MONAI Label app folder (no main.py)")
    return app


def check_model_name(model: str, app: str | Path | None = None) -> ModelConfig:
    """``model``'s config in the app (``--model`` of the commands), or an error naming the app's models."""
    configs = app_configs(resolve_app(app))
    if model not in configs:
        raise ValueError(f"unknown model {model!r}; the app serves {list(configs)}")
    return configs[model]


def default_largest_component(model: str, app: str | Path | None = None) -> bool:
    """The largest-component rule of ``model`` in the app (default: :func:`default_app`), for
    model files that do not record one; ``True`` (the contourer's default) without that app."""
    app = Path(app) if app is not None else default_app()
    configs = app_configs(app) if app is not None else {}
    return configs[model].largest_component if model in configs else True
