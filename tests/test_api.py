"""The public API is one consistent surface: one name, one type and one default per concept,
no module reaching into another's private names, and a light ``import mlx_jax``."""

from __future__ import annotations

import ast
import importlib.util
import inspect
import pathlib
import re
import subprocess
import sys
import typing

import jax
import pytest

import mlx_jax
from mlx_jax import blockwise, distances, losses, metrics, partial_fc, reductions, retrieval

PACKAGE = pathlib.Path(mlx_jax.__file__).parent

LOSS_FUNCTIONS = [getattr(losses, name) for name in losses.__all__ if name.endswith("_loss")] + [
    getattr(partial_fc, name) for name in partial_fc.__all__ if name.endswith("_loss")
]


def test_version_is_a_release_number():
    assert re.fullmatch(r"\d+\.\d+\.\d+", mlx_jax.__version__)


@pytest.mark.parametrize("loss", LOSS_FUNCTIONS, ids=lambda f: f.__name__)
def test_every_loss_takes_weights_and_reduction(loss):
    params = inspect.signature(loss).parameters
    hints = typing.get_type_hints(loss)
    for name, default, hint in [
        ("weights", None, jax.Array | None),
        ("reduction", "mean", reductions.Reduction),
    ]:
        assert params[name].kind is inspect.Parameter.KEYWORD_ONLY, name
        assert params[name].default == default, name
        assert hints[name] == hint, name
    if "balance" in params:
        assert params["balance"].default == "pairs"
        assert hints["balance"] == reductions.Balance


@pytest.mark.parametrize("loss", LOSS_FUNCTIONS, ids=lambda f: f.__name__)
def test_one_block_size_default(loss):
    params = inspect.signature(loss).parameters
    if "block_size" in params:
        assert params["block_size"].default == "auto"
        assert typing.get_type_hints(loss)["block_size"] == blockwise.BlockSize
    if "class_block_size" in params:
        assert params["class_block_size"].default is None


def _functions_with_metric():
    """Every public function with a ``metric=`` option (a ``metric`` parameter with a default;
    ``check_metric(metric, ...)`` validates one and has none)."""
    for module in (distances, metrics, retrieval):
        for name, fn in vars(module).items():
            if (
                name.startswith("_")
                or not inspect.isfunction(fn)
                or fn.__module__ != module.__name__
            ):
                continue
            param = inspect.signature(fn).parameters.get("metric")
            if param is not None and param.default is not inspect.Parameter.empty:
                yield f"{module.__name__}.{name}", fn
    yield "Gallery.create", retrieval.Gallery.create


METRIC_FUNCTIONS = dict(_functions_with_metric())


def test_metric_functions_are_found():
    # the test below must not pass vacuously
    assert {"mlx_jax.distances.pairwise_distances", "mlx_jax.metrics.roc_auc"} <= set(
        METRIC_FUNCTIONS
    )
    assert len(METRIC_FUNCTIONS) >= 10
    assert retrieval.Gallery.__dataclass_fields__["metric"].default == "euclidean"


@pytest.mark.parametrize("name", sorted(METRIC_FUNCTIONS))
def test_one_metric_type_and_default(name):
    fn = METRIC_FUNCTIONS[name]
    assert inspect.signature(fn).parameters["metric"].default == "euclidean"
    assert typing.get_type_hints(fn)["metric"] == distances.Metric


def _private_module(module: str, name: str) -> bool:
    """Whether ``from module import name`` imports a (package-internal) module."""
    try:
        return importlib.util.find_spec(f"{module}.{name}") is not None
    except ModuleNotFoundError:  # ``module`` is not a package
        return False


def _cross_module_private_uses(path: pathlib.Path) -> list[str]:
    """``from mlx_jax.x import _name`` of a non-module, and ``alias._name`` where ``alias`` is
    an imported mlx_jax module."""
    tree = ast.parse(path.read_text())
    aliases: set[str] = set()
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("mlx_jax"):
            for alias in node.names:
                bound = alias.asname or alias.name
                if _private_module(node.module, alias.name):
                    aliases.add(bound)
                elif alias.name.startswith("_"):
                    found.append(
                        f"{path.name}:{node.lineno}: from {node.module} import {alias.name}"
                    )
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("mlx_jax") and alias.asname:
                    aliases.add(alias.asname)
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id in aliases
            and node.attr.startswith("_")
            and not node.attr.startswith("__")
        ):
            found.append(f"{path.name}:{node.lineno}: {node.value.id}.{node.attr}")
    return found


def test_the_checker_finds_private_uses(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text(
        "from mlx_jax import _checks, metrics\n"
        "from mlx_jax.losses.margin_softmax import _cosines\n"
        "metrics._chunks\n_checks._shape_str\n_checks.choice\n"
    )
    assert len(_cross_module_private_uses(bad)) == 3


def test_no_module_uses_another_modules_private_names():
    found = [
        hit for path in sorted(PACKAGE.rglob("*.py")) for hit in _cross_module_private_uses(path)
    ]
    assert not found, found


def test_import_needs_no_optional_dependency():
    # ``import mlx_jax`` and ``import mlx_jax.losses`` must work where TFDS, matplotlib,
    # imageio, orbax and tqdm are not installed: make importing any of them fail.
    blocked = ["tensorflow_datasets", "matplotlib", "imageio", "orbax", "tqdm"]
    code = (
        "import sys\n"
        f"BLOCKED = {blocked!r}\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in BLOCKED:\n"
        "            raise ImportError(f'blocked: {name}')\n"
        "sys.meta_path.insert(0, Block())\n"
        "import mlx_jax, mlx_jax.losses, mlx_jax.metrics, mlx_jax.distances, mlx_jax.retrieval\n"
        "print(mlx_jax.__version__, len(mlx_jax.losses.__all__))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert mlx_jax.__version__ in result.stdout
