"""`pip install mlx_jax` is the library alone: its core dependencies are jax, flax, optax, chex
and numpy, and every library module imports with the experiments' extras absent (an import-time
audit in a fresh interpreter where those packages cannot be imported)."""

from __future__ import annotations

import pathlib
import re
import subprocess
import sys
import tomllib

import mlx_jax

ROOT = pathlib.Path(__file__).resolve().parent.parent
CORE = {"jax", "flax", "optax", "chex", "numpy"}
EXTRAS_ONLY = [  # what `pip install mlx_jax` must not need
    "tensorflow_datasets",
    "tensorflow",
    "orbax",
    "matplotlib",
    "imageio",
    "PIL",
    "tqdm",
    "sklearn",
    "torch",
]
NEED_EXTRAS = {"mlx_jax.data", "mlx_jax.viz"}  # the experiments' data and plots


def project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def requirement_name(requirement: str) -> str:
    return re.split(r"[<>=!~;\[ ]", requirement, maxsplit=1)[0].strip().lower()


def test_core_dependencies_are_the_library_ones_and_the_extras_hold_the_rest():
    assert {requirement_name(r) for r in project()["dependencies"]} == CORE
    experiments = {requirement_name(r) for r in project()["optional-dependencies"]["experiments"]}
    for needed in ("tensorflow-datasets", "orbax-checkpoint", "matplotlib", "imageio", "tqdm"):
        assert needed in experiments, needed


def library_modules() -> list[str]:
    package = ROOT / "mlx_jax"
    names = []
    for path in sorted(package.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


AUDIT = """
import importlib, importlib.abc, sys

BLOCKED = set({blocked!r})

class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {{name!r}} (blocked by the audit)")
        return None

sys.meta_path.insert(0, Block())
for name in {modules!r}:
    importlib.import_module(name)
for name in {need_extras!r}:
    try:
        importlib.import_module(name)
    except ImportError as error:
        assert "pip install 'mlx_jax[experiments]'" in str(error), (name, str(error))
    else:
        raise AssertionError(name + " imported without its extra")
loaded = sorted({{m.split(".")[0] for m in sys.modules}} & BLOCKED)
assert not loaded, loaded
import jax.numpy as jnp
from mlx_jax import losses
x = jnp.ones((4, 2)); y = jnp.array([0, 0, 1, 1])
print("loss", float(losses.triplet_loss(x, y)))
"""


def test_every_library_module_imports_without_the_experiments_extras():
    modules = [m for m in library_modules() if m not in NEED_EXTRAS]
    assert "mlx_jax.losses" in modules and "mlx_jax.metrics" in modules
    script = AUDIT.format(blocked=EXTRAS_ONLY, modules=modules, need_extras=sorted(NEED_EXTRAS))
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.startswith("loss ")


def test_the_version_is_one_string_read_by_the_build():
    assert re.fullmatch(r"\d+\.\d+\.\d+", mlx_jax.__version__)
    assert project()["dynamic"] == ["version"]
    toml = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert toml["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "mlx_jax.__version__"}
