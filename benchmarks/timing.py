"""Timing helpers shared by the benchmarks: the same cores for XLA and torch, and alternating
blocks of calls so that one library's idle threads do not steal the cores of the other.

* :func:`pin_threads` pins every thread of the process to the first N allowed CPUs *before*
  JAX creates its CPU client: XLA sizes its thread pool from the affinity mask (it has no flag
  for it). torch is told separately (``torch.set_num_threads``).
* :func:`timed_blocks` times the sides in alternating blocks with a pause after each block:
  torch's OpenMP threads keep spinning for a while after a call and would steal the cores from
  XLA's threads if the sides alternated call by call (see ``benchmarks/losses.py``).
"""

from __future__ import annotations

import os
import platform
import time
import warnings
from collections.abc import Callable
from typing import Any


def timed_blocks(
    sides: dict[str, Callable[[], Any]],
    repeats: int,
    block: int,
    pause: float,
    warmup: int,
    settle: int = 0,
) -> dict[str, list[float]]:
    """Seconds per call of each side, ``repeats`` each, in alternating blocks of ``block``
    timed calls with ``pause`` seconds of sleep after every block. ``warmup`` untimed calls per
    side come first, and ``settle`` untimed calls open every block."""
    for fn in sides.values():
        for _ in range(warmup):
            fn()
        time.sleep(pause)
    times: dict[str, list[float]] = {name: [] for name in sides}
    while any(len(t) < repeats for t in times.values()):
        for name, fn in sides.items():
            n = min(block, repeats - len(times[name]))
            if n <= 0:
                continue
            for _ in range(settle):
                fn()
            for _ in range(n):
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
            time.sleep(pause)
    return times


def backends_initialized() -> bool:
    """Whether JAX has created its backends (then XLA's thread pool already has its size)."""
    try:
        from jax._src import xla_bridge

        return bool(xla_bridge.backends_are_initialized())
    except (ImportError, AttributeError):
        return True  # unknown: assume the worst (only changes a warning)


def pin_threads(threads: int | None) -> int:
    """Pins every thread of this process to the first ``threads`` allowed CPUs (default: all
    of them) so XLA's pool — sized from the affinity mask when JAX's CPU client is created —
    and torch (set separately) use the same cores. Returns the number of threads."""
    allowed = sorted(os.sched_getaffinity(0))
    if threads is None or threads == len(allowed):
        return len(allowed)
    if not 1 <= threads <= len(allowed):
        raise ValueError(f"--threads must be in [1, {len(allowed)}], got {threads}")
    if backends_initialized():
        warnings.warn(
            "JAX's CPU backend already exists: XLA's thread pool keeps its size; its threads "
            f"are only confined to {threads} CPUs",
            stacklevel=2,
        )
    cpus = set(allowed[:threads])
    for task in os.listdir("/proc/self/task"):
        try:
            os.sched_setaffinity(int(task), cpus)
        except OSError:
            pass  # a thread that ended meanwhile
    return threads


def prepare_process(threads: int | None) -> int:
    """The set-up of a side-by-side benchmark process: pins it to ``threads`` cores before JAX
    starts (:func:`pin_threads`), gives torch the same count where it is installed, and makes
    glibc reuse freed memory as the experiments driver does (``experiments/allocator.py``).
    Returns the number of threads."""
    threads = pin_threads(threads)
    try:
        import torch

        torch.set_num_threads(threads)
    except ImportError:
        pass
    from experiments.allocator import reuse_freed_memory

    reuse_freed_memory()
    return threads


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), or what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"
