"""Multi-process runs on ``jax.distributed``: one process per host (or several on one host).

Every process runs the same command with its own ``--process-id``; together they form one
global mesh over every process's devices (:func:`mlx_jax.parallel.data_mesh`), and the driver's
step is the single-process data-parallel step on that mesh: the loss sees the global batch
(all-gathered over every device of every process), replicated gradients and the centers' α rule
are summed over all devices, so a run on P processes × N devices computes what one process on
P·N devices computes, up to float summation order.

What each process does (:mod:`experiments.driver`):

* it reads the dataset itself (a shared or copied ``--data-dir``), derives every epoch's batch
  order from (seed, epoch) like the others, and sends only its own devices' rows of each
  global batch to its devices (``jax.make_array_from_callback``): the data is sharded by
  process, not replicated;
* it evaluates on its local devices (the same numbers on every process; no collective, so a
  slow evaluation never trips a collective timeout);
* every process takes part in the orbax checkpoint save and restore (orbax writes the
  replicated state once, from process 0) — the workdir must be one folder every process sees
  (a shared file system across hosts); only process 0 writes metrics, plots and summaries, and
  prints the per-epoch lines.

Where the settings come from: ``--coordinator-address HOST:PORT``, ``--num-processes P`` and
``--process-id I``, or the environment variables ``JAX_COORDINATOR_ADDRESS``,
``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID`` (a flag wins). None of them: one process.
On CPU the collectives between processes run on gloo (``jax_cpu_collectives_implementation``).
:mod:`experiments.launch` starts P local processes with these flags and stops all of them when
one fails.

A process that dies (killed, out of memory, a crashed host) leaves the others waiting in a
collective. The launcher sees the exit and stops the rest at once; across hosts, JAX's
coordination service notices the missing heartbeats after ``HEARTBEAT_SECONDS`` and ends the
survivors with an error. Continue with ``--resume`` from the newest checkpoint: the resumed
run is exact (the batch order, augmentation keys and train state are functions of the seed,
epoch and step).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from typing import Any

import numpy as np

from experiments.config import ConfigError

ENV = {
    "coordinator_address": "JAX_COORDINATOR_ADDRESS",
    "num_processes": "JAX_NUM_PROCESSES",
    "process_id": "JAX_PROCESS_ID",
}
# Seconds without a heartbeat after which the coordination service declares a process dead and
# ends the others (JAX's default is 100 s; a step here takes well under one).
HEARTBEAT_SECONDS = 30


@dataclasses.dataclass(frozen=True)
class ProcessGrid:
    """Where this process sits: ``coordinator_address`` (process 0's HOST:PORT),
    ``num_processes`` and ``process_id`` in [0, num_processes)."""

    coordinator_address: str | None = None
    num_processes: int = 1
    process_id: int = 0

    @property
    def multi_process(self) -> bool:
        return self.num_processes > 1


def process_grid(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    environ: dict[str, str] | None = None,
) -> ProcessGrid:
    """The grid from the flags, falling back to ``JAX_COORDINATOR_ADDRESS``,
    ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID``.

    Raises:
      ConfigError: naming the flag (and its variable) when the settings are incomplete or out
        of range.
    """
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {
        "coordinator_address": coordinator_address,
        "num_processes": num_processes,
        "process_id": process_id,
    }
    for key, variable in ENV.items():
        if values[key] is None and environ.get(variable):
            raw = environ[variable]
            if key == "coordinator_address":
                values[key] = raw
                continue
            try:
                values[key] = int(raw)
            except ValueError:
                raise ConfigError(f"{variable} must be an integer, got {raw!r}") from None
    address, count, index = (values[k] for k in ENV)
    if address is None and count in (None, 1) and index in (None, 0):
        return ProcessGrid()
    if count is None or count < 1:
        raise ConfigError(
            f"--num-processes ({ENV['num_processes']}) must be an integer >= 1 for a "
            f"multi-process run, got {count!r}"
        )
    if index is None or not 0 <= index < count:
        raise ConfigError(
            f"--process-id ({ENV['process_id']}) must be in [0, {count}) for "
            f"--num-processes {count}, got {index!r}"
        )
    if count > 1 and not address:
        raise ConfigError(
            f"--coordinator-address ({ENV['coordinator_address']}) is needed for "
            f"--num-processes {count}: process 0's HOST:PORT, the same for every process"
        )
    if address and (":" not in address or not address.rsplit(":", 1)[1].isdigit()):
        raise ConfigError(f"--coordinator-address must be HOST:PORT, got {address!r}")
    return ProcessGrid(address, count, index)


def initialize(grid: ProcessGrid) -> bool:
    """Joins the process grid (``jax.distributed.initialize``) before JAX starts its backend;
    returns whether it did (False for one process). On CPU, collectives between processes use
    gloo."""
    if not grid.multi_process:
        return False
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=grid.coordinator_address,
        num_processes=grid.num_processes,
        process_id=grid.process_id,
        heartbeat_timeout_seconds=HEARTBEAT_SECONDS,
    )
    return True


def is_primary() -> bool:
    """Whether this is process 0, the one that writes the run's files and prints its lines."""
    import jax

    return jax.process_index() == 0


def local_copy(tree: Any) -> Any:
    """This process's copy of a replicated pytree: each array's first addressable shard (a
    replicated global array spans other processes' devices, which a local computation
    cannot read). Arrays already on this process alone come back unchanged."""
    import jax

    def local(leaf):
        if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
            if not leaf.is_fully_replicated:
                raise ValueError(f"local_copy needs replicated arrays, got {leaf.sharding}")
            return leaf.addressable_data(0)
        return leaf

    return jax.tree.map(local, tree)


class StopRequested(KeyboardInterrupt):
    """A stop every process takes at the same point, requested by signal ``signum`` on at
    least one of them (:func:`agreed_stop`)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def agreed_stop(requested: Callable[[], int | None]) -> Callable[[], None]:
    """A ``check_stop`` for a multi-process run: raises :class:`StopRequested` on every
    process once any process's ``requested()`` names a signal, and on none before.

    Why: a process that stopped on its own signal left the others waiting in the next step's
    collective for it. The check is itself a collective (the processes' signal numbers
    gathered), so every process must call it at the same points of the run, as the driver
    does. One process: no collective."""
    import jax

    def check() -> None:
        mine = requested() or 0
        if jax.process_count() == 1:
            signums = [mine]
        else:
            from jax.experimental import multihost_utils

            signums = np.asarray(multihost_utils.process_allgather(np.int32(mine))).ravel()
        first = next((int(s) for s in signums if s), 0)
        if first:
            raise StopRequested(first)

    return check


def barrier(name: str) -> None:
    """Waits until every process reaches the barrier ``name`` (nothing for one process)."""
    import jax

    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)
