import os

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
