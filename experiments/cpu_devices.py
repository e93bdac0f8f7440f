"""One JAX CPU device per core, so a data-parallel step keeps every core busy.

XLA:CPU runs the LeNet++ step's small convolutions (batch 128, 28×28 and smaller) on its
thread pool but does not split them finely enough to fill every core. Split into one virtual
CPU device per core, the driver's data-parallel step (``--devices``, :mod:`mlx_jax.parallel`)
runs each device's share of the batch concurrently, and the loss still sees the global batch —
the same result up to float rounding (tested in ``tests/multidevice``).

:func:`use_one_device_per_core` sets ``jax_num_cpu_devices`` to the number of CPUs this process
may run on. It must run before JAX creates its CPU backend; it leaves an explicit choice alone
(``JAX_NUM_CPU_DEVICES`` or ``--xla_force_host_platform_device_count`` in ``XLA_FLAGS``), and
``MLX_JAX_ONE_CPU_DEVICE=1`` opts out. :mod:`experiments.tuning` calls it for the CLI.

Devices on one CPU share its cores, so a device that the OS starves (another job, a loaded
host) reaches a collective late, and XLA:CPU aborts the whole process (SIGABRT, no Python
exception) when a collective waits 40 s past its 20 s "stuck" warning.
:func:`tolerate_slow_collectives` raises that limit to ten minutes: a slow device is late by
seconds (a LeNet++ step takes well under one), while a hung one never arrives. After such an
abort, ``python -m experiments.campaign`` restarts the row from its newest checkpoint
(``--retries``); a lone run continues with ``--resume``. A process stopped (SIGSTOP) for longer
than the limit in a collective aborts too when continued. History: docs/notes.md.
"""

from __future__ import annotations

import os

OPT_OUT_ENV = "MLX_JAX_ONE_CPU_DEVICE"
FORCE_FLAG = "--xla_force_host_platform_device_count"
TERMINATE_FLAG = "--xla_cpu_collective_call_terminate_timeout_seconds"
# A device late by ten minutes is hung, not slow; XLA's default (40 s after the warning) is too
# short for a device the OS starves beside other jobs.
COLLECTIVE_TERMINATE_SECONDS = 600


def cpu_cores() -> int:
    """CPUs this process may run on (its affinity mask: a pinned campaign row gets its share)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def use_one_device_per_core(cores: int | None = None) -> int | None:
    """Asks JAX for ``cores`` CPU devices (default :func:`cpu_cores`). Returns the count set,
    or None when nothing was changed: opted out, the user chose a count, or JAX's backend
    already exists (its device count is fixed then). Also calls
    :func:`tolerate_slow_collectives`, whatever the device count's source."""
    if cores is not None and cores < 1:
        raise ValueError(f"cores must be >= 1, got {cores}")
    if _backend_exists():
        return None
    tolerate_slow_collectives()
    if os.environ.get(OPT_OUT_ENV) == "1" or "JAX_NUM_CPU_DEVICES" in os.environ:
        return None
    if FORCE_FLAG in os.environ.get("XLA_FLAGS", ""):
        return None
    import jax

    count = cpu_cores() if cores is None else cores
    jax.config.update("jax_num_cpu_devices", count)
    return count


def tolerate_slow_collectives(seconds: int = COLLECTIVE_TERMINATE_SECONDS) -> bool:
    """Lets a CPU collective wait ``seconds`` (after XLA's stuck warning) before XLA aborts the
    process, by adding ``--xla_cpu_collective_call_terminate_timeout_seconds`` to ``XLA_FLAGS``.
    Must run before JAX creates its CPU backend (XLA reads the flags then). Returns whether it
    set the flag: not when the backend exists or ``XLA_FLAGS`` already names it."""
    if seconds < 1:
        raise ValueError(f"seconds must be >= 1, got {seconds}")
    flags = os.environ.get("XLA_FLAGS", "")
    if TERMINATE_FLAG in flags or _backend_exists():
        return False
    os.environ["XLA_FLAGS"] = f"{flags} {TERMINATE_FLAG}={seconds}".strip()
    return True


def virtual_devices_env(devices: int, base: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for a child process with ``devices`` virtual CPU devices (tests, benchmark
    workers): ``base`` (default ``os.environ``) with the device count set both ways JAX reads
    it, CPU only, and the collective timeout of :func:`tolerate_slow_collectives` unless
    ``XLA_FLAGS`` already sets one."""
    if devices < 1:
        raise ValueError(f"devices must be >= 1, got {devices}")
    env = dict(os.environ if base is None else base)
    flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith(FORCE_FLAG)]
    flags.append(f"{FORCE_FLAG}={devices}")
    if not any(f.startswith(TERMINATE_FLAG) for f in flags):
        flags.append(f"{TERMINATE_FLAG}={COLLECTIVE_TERMINATE_SECONDS}")
    env.update(JAX_NUM_CPU_DEVICES=str(devices), XLA_FLAGS=" ".join(flags), JAX_PLATFORMS="cpu")
    return env


def _backend_exists() -> bool:
    from jax._src import xla_bridge

    return xla_bridge.backends_are_initialized()
