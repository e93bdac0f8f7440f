"""Process-level tuning of the experiments: the one place that changes the process, opt-out.

The command line (:mod:`experiments.cli`) calls :func:`apply` before JAX starts. None of it
changes what a run computes; each part makes the CPU run faster or sturdier:

- **malloc** (:mod:`experiments.allocator`): glibc keeps XLA:CPU's per-step scratch block
  mapped between steps instead of unmapping and faulting it back in every step.
- **one CPU device per core** (:mod:`experiments.cpu_devices`): the data-parallel step runs
  one shard per core, as XLA:CPU alone keeps fewer than all cores busy in LeNet++'s small
  convolutions. Results equal the one-device run up to float rounding.
- **collective timeout**: XLA:CPU may wait ten minutes (not ~60 s) for a device the OS
  starves before it aborts the process.
- **oneDNN convolutions**: ``--conv auto`` runs LeNet++'s convolutions on oneDNN where the
  ``onednn`` extra and a C++ compiler are present (:mod:`experiments.onednn_conv`), else on
  XLA's own kernels (same math).

Opt out with ``--no-process-tuning`` or ``MLX_JAX_NO_PROCESS_TUNING=1``: glibc's and JAX's
defaults, and XLA's convolutions for ``--conv auto``. The parts have their own switches too
(``MLX_JAX_DEFAULT_MALLOC=1``, ``MLX_JAX_ONE_CPU_DEVICE=1`` or ``JAX_NUM_CPU_DEVICES``, an
explicit timeout in ``XLA_FLAGS``, ``--conv xla``). Measurements: BENCHMARKS.md (train step).
"""

from __future__ import annotations

import os

from experiments.allocator import reuse_freed_memory
from experiments.cpu_devices import use_one_device_per_core

OPT_OUT_ENV = "MLX_JAX_NO_PROCESS_TUNING"


def enabled(requested: bool = True) -> bool:
    """Whether tuning applies: requested (``--process-tuning``) and not opted out by env."""
    return requested and os.environ.get(OPT_OUT_ENV) != "1"


def apply(requested: bool = True) -> dict[str, object]:
    """Applies the tuning above (before JAX creates its backend); returns what was set:
    ``{"malloc": bool, "cpu_devices": int | None}``. Does nothing when not :func:`enabled`."""
    if not enabled(requested):
        return {"malloc": False, "cpu_devices": None}
    return {"malloc": reuse_freed_memory(), "cpu_devices": use_one_device_per_core()}
