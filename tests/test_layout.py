"""The import map of the runtime packages: each folder on one floor, no dev-only dependencies.

Floors, bottom up: ``kernels/`` (the Triton kernels and their references) and ``weights/``
(checkpoint reading) import nothing of the other runtime folders above them; ``engine/`` (the
pipeline) imports both. Nothing in ``engine/``, ``kernels/`` or ``weights/`` imports the
scripts (``examples/``), the tests, or a framework that only the tests and scripts use
(torchvision, mmdetection, mmcv, mmengine, TensorFlow, Keras).

Every ``.py`` file is parsed with :mod:`ast`, so imports inside functions count too (a late
import still makes the folder depend on the other one), and so do ``importlib.import_module`` /
``__import__`` calls with a literal name. ``LAYOUT_ROOT=/path/to/checkout`` checks another tree.
"""

from __future__ import annotations

import ast
import os
from pathlib import Path

import pytest

ROOT = Path(os.environ.get("LAYOUT_ROOT") or Path(__file__).resolve().parents[1])
RUNTIME = ("engine", "kernels", "weights")
PROJECT = ("engine", "kernels", "weights", "examples", "tests", "tools")
#: frameworks the engine must never need at run time (the tests' oracles, the training script's)
DEV_ONLY = ("torchvision", "mmdet", "mmcv", "mmengine", "tensorflow", "keras")
#: folder -> project folders it must not import
FORBIDDEN = {
    "weights": ("engine", "examples", "tests", "tools"),
    "kernels": ("engine", "weights", "examples", "tests", "tools"),
    "engine": ("examples", "tests", "tools"),
}


def imported_modules(path: Path, root: Path) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in the file, at any depth, relative ones resolved."""
    package = path.relative_to(root).with_suffix("").parts[:-1]  # the file's own package
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = ".".join(package[: len(package) - node.level + 1])
                module = ".".join(p for p in (base, node.module) if p)
            else:
                module = node.module or ""
            # ``from weights import torchvision`` names the submodule weights.torchvision
            found += [(node.lineno, f"{module}.{alias.name}") for alias in node.names]
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            if name in ("import_module", "__import__") and isinstance(node.args[0].value, str):
                found.append((node.lineno, node.args[0].value))
    return found


def import_map(root: Path) -> dict[str, list[tuple[str, int, str]]]:
    """Runtime folder -> (file, line, module) of each import it makes."""
    result: dict[str, list[tuple[str, int, str]]] = {}
    for folder in RUNTIME:
        for path in sorted((root / folder).rglob("*.py")):
            rel = str(path.relative_to(root))
            result.setdefault(folder, []).extend((rel, line, mod) for line, mod in imported_modules(path, root))
    return result


def violations(root: Path) -> list[str]:
    """Every import that breaks the floors or pulls in a dev-only framework, as 'file:line imports module'."""
    bad = []
    for folder, imports in import_map(root).items():
        for rel, line, module in imports:
            top = module.split(".")[0]
            if top in FORBIDDEN[folder] or top in DEV_ONLY:
                bad.append(f"{rel}:{line} imports {module}")
    return bad


def test_runtime_folders_exist():
    for folder in RUNTIME:
        assert (ROOT / folder / "__init__.py").is_file(), f"{ROOT / folder} is not a package"


def test_import_map_has_no_upward_or_dev_only_imports():
    bad = violations(ROOT)
    assert not bad, "imports against the layout (README, ## Layout):\n" + "\n".join(bad)


def test_engine_depends_on_weights_and_kernels_only_downward():
    """The pipeline reads checkpoints through weights/ and runs kernels/; neither looks back up."""
    tops = {folder: {m.split(".")[0] for _, _, m in imports} for folder, imports in import_map(ROOT).items()}
    assert {"weights", "kernels"} <= tops["engine"]
    assert not tops["weights"] & {"engine"} and not tops["kernels"] & {"engine", "weights"}


@pytest.mark.parametrize(
    "source, expected",
    [
        ("import engine.config", ["engine.config"]),
        ("from engine.model import MaskRCNN", ["engine.model.MaskRCNN"]),
        ("def f():\n    from engine import Predictor\n", ["engine.Predictor"]),
        ("from . import errors", ["weights.errors"]),
        ("from ..engine import model", ["engine.model"]),
        ("import importlib\nimportlib.import_module('torchvision.ops')", ["importlib", "torchvision.ops"]),
    ],
)
def test_imports_are_found_at_any_depth(tmp_path, source, expected):
    path = tmp_path / "weights" / "probe.py"
    path.parent.mkdir()
    path.write_text(source)
    assert [m for _, m in imported_modules(path, tmp_path)] == expected
