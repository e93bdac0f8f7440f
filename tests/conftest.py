import os
import shutil
import tempfile

import hypothesis
import pytest

# Under pytest-xdist (-n N) each worker runs on its own share of the CPUs: XLA sizes its thread
# pool from the affinity mask, and N workers each spinning a pool over every core spent half the
# CPU time in the kernel. The whole mask is kept in ORIGINAL_CPUS_ENV for tests that need it.
ORIGINAL_CPUS_ENV = "MLX_JAX_TEST_ORIGINAL_CPUS"


def _pin_xdist_worker() -> None:
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    count = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if not worker.startswith("gw") or count < 2 or not hasattr(os, "sched_setaffinity"):
        return
    cpus = sorted(os.sched_getaffinity(0))
    os.environ.setdefault(ORIGINAL_CPUS_ENV, ",".join(map(str, cpus)))
    if len(cpus) < count:
        return
    share = len(cpus) // count
    index = int(worker[2:]) % count
    os.sched_setaffinity(0, cpus[index * share : (index + 1) * share])


_pin_xdist_worker()

# Most of a test that starts the experiments in a subprocess (a CLI run, a campaign row, a
# launched process) is XLA compiling the same LeNet++ programs again: a tiny one-epoch run took
# 26 s, 8.5 s with the programs in JAX's persistent compilation cache. One cache per test run,
# shared by the xdist workers and every process they start (they inherit the environment) and
# removed at the end. A size limit turns on JAX's file lock, so that concurrent processes never
# read a half-written entry; as each write then scans the folder, only programs that take
# 0.5 s or more to compile are kept (the models' steps, not the thousands of small loss tests).
# Set before the test modules import jax (it reads these at import). An existing
# JAX_COMPILATION_CACHE_DIR is used as it is.
_COMPILATION_CACHE_ENV = {
    "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0.5",
    "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
    "JAX_COMPILATION_CACHE_MAX_SIZE": str(8 << 30),
}
_created_cache_dir: str | None = None


def pytest_configure(config: pytest.Config) -> None:
    global _created_cache_dir
    if hasattr(config, "workerinput") or "JAX_COMPILATION_CACHE_DIR" in os.environ:
        return  # an xdist worker inherits the controller's cache
    _created_cache_dir = tempfile.mkdtemp(prefix="mlx_jax-tests-xla-cache-")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _created_cache_dir
    for name, value in _COMPILATION_CACHE_ENV.items():
        os.environ.setdefault(name, value)


def pytest_unconfigure(config: pytest.Config) -> None:
    if _created_cache_dir is not None:
        shutil.rmtree(_created_cache_dir, ignore_errors=True)


# JIT compilation makes first examples slow; deadlines would flake on a loaded 2-core machine.
hypothesis.settings.register_profile("default", deadline=None, max_examples=15)
hypothesis.settings.load_profile("default")


# tests/multidevice/ needs 8 virtual devices, fixed when jax initialises: it runs in its own
# process through tests/test_multidevice.py, never in this one.
collect_ignore = ["multidevice"]


@pytest.fixture
def all_cpus():
    """Runs the test on every CPU of the session, not its pytest-xdist worker's share (a test
    that pins processes to CPUs itself, e.g. ``campaign --jobs 2``)."""
    original = os.environ.get(ORIGINAL_CPUS_ENV)
    if not original or not hasattr(os, "sched_setaffinity"):
        yield
        return
    pinned = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {int(c) for c in original.split(",")})
    try:
        yield
    finally:
        os.sched_setaffinity(0, pinned)
