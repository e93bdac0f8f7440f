"""One JAX CPU device per core, so a data-parallel step keeps every core busy.

XLA:CPU runs the LeNet++ step's small convolutions (batch 128, 28×28 and smaller) on its
thread pool but does not split them finely enough across threads: on the 2-core dev machine
the step used 1.37 cores on average (BENCHMARKS.md, train step). Split into one virtual CPU
device per core, the driver's data-parallel step (``--devices``, :mod:`mlx_jax.parallel`) runs
each device's half-batch concurrently, and the loss still sees the global batch — the same
result up to float rounding (tested in ``tests/multidevice``).

:func:`use_one_device_per_core` sets ``jax_num_cpu_devices`` to the number of CPUs this process
may run on. It must run before JAX creates its CPU backend; it leaves an explicit choice alone
(``JAX_NUM_CPU_DEVICES`` or ``--xla_force_host_platform_device_count`` in ``XLA_FLAGS``), and
``MLX_JAX_ONE_CPU_DEVICE=1`` opts out.
"""

from __future__ import annotations

import os

OPT_OUT_ENV = "MLX_JAX_ONE_CPU_DEVICE"
FORCE_FLAG = "--xla_force_host_platform_device_count"


def cpu_cores() -> int:
    """CPUs this process may run on (its affinity mask: a pinned campaign row gets its share)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def use_one_device_per_core(cores: int | None = None) -> int | None:
    """Asks JAX for ``cores`` CPU devices (default :func:`cpu_cores`). Returns the count set,
    or None when nothing was changed: opted out, the user chose a count, or JAX's backend
    already exists (its device count is fixed then)."""
    if os.environ.get(OPT_OUT_ENV) == "1" or "JAX_NUM_CPU_DEVICES" in os.environ:
        return None
    if FORCE_FLAG in os.environ.get("XLA_FLAGS", ""):
        return None
    import jax
    from jax._src import xla_bridge

    if xla_bridge.backends_are_initialized():
        return None
    count = cpu_cores() if cores is None else cores
    if count < 1:
        raise ValueError(f"cores must be >= 1, got {count}")
    jax.config.update("jax_num_cpu_devices", count)
    return count
