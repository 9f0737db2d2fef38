"""Training recipes as files: ``contourcl finetune --recipe oar`` (or ``--recipe PATH.yaml``).

A recipe is a YAML mapping of ``contourcl finetune`` options (their long names, ``-`` or ``_``)
to values; options given on the command line win over the recipe's. The data and the output file
are not part of a recipe (``--data``, ``--out``): they differ from machine to machine.

Three sets of training settings exist, each for its own job, and they differ on purpose:

=====================================  =====================================================  ==========================================
where                                  what it is for                                         its settings
=====================================  =====================================================  ==========================================
``oar.yaml``, ``gtv.yaml`` (here)      the shipped weights, trained from scratch on OpenKBP   3 mm, 96 px slices, 48 / 24 epochs of 250
                                                                                              steps, warm-up, EMA, deep supervision,
                                                                                              select-then-refit (hours on 2 cores)
``contourcl.serving.retrain.DEFAULTS``  the server's retraining on a department's corrections  10 epochs from the served model at its own
                                                                                              grid: about a minute on 2 cores, so a
                                                                                              clinician can retrain between patients
``FinetuneConfig`` (and the CLI's       a new model or an experiment, when nothing else is     the library's neutral starting point
defaults)                               given                                                  (50 epochs, one pass over the cases, 4 mm)
=====================================  =====================================================  ==========================================
"""

from __future__ import annotations

from pathlib import Path

import yaml

#: the folder of the recipes shipped with the package
RECIPES = Path(__file__).resolve().parent


def recipe_path(name_or_path: str | Path) -> Path:
    """A shipped recipe by name (``oar``), or a recipe file by path."""
    path = Path(name_or_path)
    if path.suffix not in (".yaml", ".yml"):
        path = RECIPES / f"{name_or_path}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in RECIPES.glob("*.yaml"))
        raise FileNotFoundError(f"no recipe {name_or_path!r}: give a .yaml file or one of {known}")
    return path


def load_recipe(name_or_path: str | Path) -> dict:
    """The options of a recipe, ``{dest: value}`` with ``-`` written ``_``."""
    path = recipe_path(name_or_path)
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a recipe is a mapping of finetune options to values")
    return {str(k).replace("-", "_"): v for k, v in data.items()}
