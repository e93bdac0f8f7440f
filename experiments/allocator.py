"""Keep XLA:CPU's per-step scratch memory mapped between train steps (glibc only).

Every call of a compiled XLA:CPU program allocates its temporaries as one block (134 MB for
the LeNet++ step at batch 128) and frees it at the end. XLA runs the program on its own
worker threads, whose glibc malloc arenas cannot hold a block over 64 MB, so glibc maps it
with ``mmap`` and unmaps it after every step: the next step faults 32,800 fresh zeroed pages
back in (the cost, per step, is in docs/notes.md).

:func:`reuse_freed_memory` asks glibc (``mallopt``) to serve every thread from the main arena,
to take large blocks from the heap rather than ``mmap``, and not to give freed heap memory back
to the OS below 1 GiB, so the block is reused from step to step. It must run before JAX starts
its CPU backend (the worker threads pick their arena at their first allocation). The cost is
that memory freed by the process stays mapped (the resident size keeps its peak), which a
training process reaches anyway in its first step. Set ``MLX_JAX_DEFAULT_MALLOC=1`` to leave
glibc's defaults alone.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

OPT_OUT_ENV = "MLX_JAX_DEFAULT_MALLOC"
# glibc's mallopt parameters (malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
M_ARENA_MAX = -8
TRIM_THRESHOLD_BYTES = 1 << 30


def reuse_freed_memory() -> bool:
    """Applies the settings above; True when glibc accepted all of them. A no-op (False) off
    Linux/glibc or with ``MLX_JAX_DEFAULT_MALLOC=1``."""
    if os.environ.get(OPT_OUT_ENV) == "1" or not sys.platform.startswith("linux"):
        return False
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (e.g. musl has no mallopt)
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    settings = [(M_ARENA_MAX, 1), (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES)]
    return all(mallopt(param, value) == 1 for param, value in settings)
