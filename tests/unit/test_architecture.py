"""Dependencies go one way: core <- training <- serving / cli.

The core (``contourcl`` minus ``serving``, ``cli`` and ``training``) never imports
``contourcl.training``, ``contourcl.serving`` or ``contourcl.cli``; ``contourcl.training`` never
imports ``contourcl.serving`` or ``contourcl.cli``. Every module's imports are read with ``ast``:
top-level ones, those inside functions, and ``importlib.import_module("...")`` of a literal name.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

from contourcl.testing import REPO

#: package -> its folder (setup.cfg's package_dir)
ROOTS = {"contourcl": REPO / "lib" / "contourcl", "contourcl.training": REPO / "training"}
#: layer -> the layers it must not import
FORBIDDEN = {"core": ("training", "serving", "cli"), "training": ("serving", "cli")}


def layer(module: str) -> str | None:
    """``core``, ``training``, ``serving`` or ``cli`` for a ``contourcl`` module; ``None`` otherwise."""
    if module != "contourcl" and not module.startswith("contourcl."):
        return None
    for name in ("training", "serving", "cli"):
        if module == f"contourcl.{name}" or module.startswith(f"contourcl.{name}."):
            return name
    return "core"


def modules() -> Iterator[tuple[str, Path]]:
    """``(module name, file)`` of every module of the ``contourcl`` packages."""
    for package, root in ROOTS.items():
        for path in sorted(root.rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            yield ".".join([package, *(p for p in parts if p != "__init__")]), path


def imports(module: str, source: str, is_package: bool = False) -> Iterator[tuple[str, int]]:
    """``(imported module, line)`` of every import in ``source``, wherever it is in the file.

    ``from X import Y`` gives ``X`` and ``X.Y`` (``Y`` may be a submodule); relative imports are
    resolved against ``module``.
    """
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = module.split(".") if is_package else module.split(".")[:-1]
                parent = parent[: len(parent) - (node.level - 1)]
                base = ".".join([*parent, *([node.module] if node.module else [])])
            yield base, node.lineno
            for alias in node.names:
                yield f"{base}.{alias.name}", node.lineno
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, (ast.Attribute, ast.Name))
            and (node.func.attr if isinstance(node.func, ast.Attribute) else node.func.id) in ("import_module", "__import__")
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            yield node.args[0].value, node.lineno


def violations(module: str, source: str, is_package: bool = False, where: str = "") -> list[str]:
    """One line per import of ``source`` that breaks the rule, naming the module, line and import."""
    mine = layer(module)
    out = []
    for target, line in imports(module, source, is_package):
        theirs = layer(target)
        if theirs in FORBIDDEN.get(mine, ()):
            out.append(f"{where or module}:{line}: {module} ({mine}) imports {target} ({theirs})")
    return sorted(set(out))


def test_every_module_is_checked():
    names = {name for name, _ in modules()}
    assert {"contourcl.inference", "contourcl.data.volumes", "contourcl.models.checkpoint",
            "contourcl.training.pretrain.trainer", "contourcl.training.finetune.engine",
            "contourcl.serving.retrain", "contourcl.cli"} <= names
    assert {layer(n) for n in names} == {"core", "training", "serving", "cli"}


def test_core_training_serving_cli_dependencies_go_one_way():
    found = []
    for name, path in modules():
        found += violations(name, path.read_text(encoding="utf-8"), path.name == "__init__.py", str(path.relative_to(REPO)))
    assert not found, "imports against core <- training <- serving/cli:\n" + "\n".join(found)


def test_the_check_sees_imports_inside_functions_relative_and_by_name():
    source = (
        "import contourcl.data.labels\n"
        "from contourcl.models import networks\n"
        "def f():\n"
        "    from contourcl.serving.retrain import retrain\n"
        "    import importlib\n"
        "    return importlib.import_module('contourcl.cli.models')\n"
        "from ..training.finetune import engine\n"
        "from contourcl import training\n"
    )
    found = violations("contourcl.data.volumes", source)
    assert found == sorted([
        "contourcl.data.volumes:4: contourcl.data.volumes (core) imports contourcl.serving.retrain (serving)",
        "contourcl.data.volumes:4: contourcl.data.volumes (core) imports contourcl.serving.retrain.retrain (serving)",
        "contourcl.data.volumes:6: contourcl.data.volumes (core) imports contourcl.cli.models (cli)",
        "contourcl.data.volumes:7: contourcl.data.volumes (core) imports contourcl.training.finetune (training)",
        "contourcl.data.volumes:7: contourcl.data.volumes (core) imports contourcl.training.finetune.engine (training)",
        "contourcl.data.volumes:8: contourcl.data.volumes (core) imports contourcl.training (training)",
    ])
    assert violations("contourcl.training.finetune.engine", source) == [
        "contourcl.training.finetune.engine:4: contourcl.training.finetune.engine (training) imports contourcl.serving.retrain (serving)",
        "contourcl.training.finetune.engine:4: contourcl.training.finetune.engine (training) imports contourcl.serving.retrain.retrain (serving)",
        "contourcl.training.finetune.engine:6: contourcl.training.finetune.engine (training) imports contourcl.cli.models (cli)",
    ]
    assert violations("contourcl.serving.app", source) == [] and violations("contourcl.cli.models", source) == []
