"""Start a multi-process run on this machine: P processes, each with its own CPU devices.

    python -m experiments.launch --processes 2 mnist --loss triplet --epochs 2
    python -m experiments.launch --processes 2 --devices-per-process 2 fashion_mnist --loss cent

Runs ``python -m experiments.DATASET FLAGS --coordinator-address 127.0.0.1:PORT
--num-processes P --process-id I`` for I = 0..P-1 (a free port; ``--port`` to choose), each
with ``--devices-per-process`` CPU devices (``JAX_NUM_CPU_DEVICES``) and, when the machine has
at least P CPUs, pinned to its share of them (XLA sizes its thread pool from the affinity).
Together they train one model on one global batch (:mod:`experiments.distributed`). Process 0's
output comes through as is; the others' lines (warnings, errors) are prefixed ``[process I]``.

When a process ends with an error or is killed, the launcher stops the others (SIGTERM, then
SIGKILL after ``--grace`` seconds: they would otherwise wait in a collective for the dead one),
names the process and how it ended, and prints the command that resumes the run from its newest
checkpoint. Ctrl-C or SIGTERM is passed on to every process. The exit code is the failing
process's (128 + N for signal N), else 0.

On several hosts, run the same driver command on each host with ``--coordinator-address``
(process 0's host and a free port), ``--num-processes`` and its own ``--process-id`` (or the
``JAX_*`` variables of :mod:`experiments.distributed`), and a ``--workdir`` on a file system
every host sees.
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence

from experiments.cli import RESUME_COMMAND_ENV
from experiments.config import DATASETS

DEFAULT_GRACE_SECONDS = 10.0


def free_port() -> int:
    """A TCP port free on this host now (the OS's choice)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def process_argv(dataset: str, flags: Sequence[str], port: int, processes: int, index: int):
    """The driver command line of process ``index``."""
    return [
        sys.executable,
        "-m",
        f"experiments.{dataset}",
        *flags,
        "--coordinator-address",
        f"127.0.0.1:{port}",
        "--num-processes",
        str(processes),
        "--process-id",
        str(index),
    ]


def cpu_shares(processes: int) -> list[set[int] | None]:
    """Each process's CPUs: an even split of this process's CPUs when there are at least as
    many as processes, else no pinning (None)."""
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    if len(cpus) < processes:
        return [None] * processes
    per = len(cpus) // processes
    return [set(cpus[i * per : (i + 1) * per]) for i in range(processes)]


def _relay(stream, prefix: str) -> None:
    for line in iter(stream.readline, b""):
        sys.stderr.write(prefix + line.decode(errors="replace"))
        sys.stderr.flush()


def how_it_ended(code: int) -> str:
    """ "was killed by SIGKILL" for -9, "stopped by SIGTERM" for 143, "exited with code 4"."""
    if code < 0:
        return f"was killed by {_signal_name(-code)}"
    if code > 128 and code - 128 in (signal.SIGINT, signal.SIGTERM):
        return f"stopped by {_signal_name(code - 128)}"
    return f"exited with code {code}"


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def exit_code(code: int) -> int:
    """A child's return code as a shell exit code (128 + N for a death by signal N)."""
    return 128 - code if code < 0 else code


def launch(
    dataset: str,
    flags: Sequence[str],
    *,
    processes: int,
    devices_per_process: int,
    port: int | None = None,
    grace: float = DEFAULT_GRACE_SECONDS,
    resume_hint: str | None = None,
) -> int:
    """Runs the P processes to the end; returns the exit code (see the module docstring)."""
    port = free_port() if port is None else port
    env = {**os.environ, "JAX_NUM_CPU_DEVICES": str(devices_per_process)}
    if resume_hint:  # what the processes print after a stop: the launcher's command
        env[RESUME_COMMAND_ENV] = resume_hint
    for variable in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        env.pop(variable, None)  # the flags say it; a stale variable must not disagree
    shares = cpu_shares(processes)
    children: list[subprocess.Popen] = []
    relays = []
    for index in range(processes):
        argv = process_argv(dataset, flags, port, processes, index)
        pin = shares[index]
        child = subprocess.Popen(
            argv,
            env=env,
            stderr=None if index == 0 else subprocess.PIPE,
            stdout=None if index == 0 else subprocess.PIPE,
            preexec_fn=(lambda cpus=pin: os.sched_setaffinity(0, cpus)) if pin else None,
            # Their own session: a terminal's Ctrl-C reaches the launcher alone, which passes
            # it on once (a second SIGINT would stop them at once, not at a safe point).
            start_new_session=True,
        )
        children.append(child)
        if index:
            for stream in (child.stdout, child.stderr):
                relay = threading.Thread(
                    target=_relay, args=(stream, f"[process {index}] "), daemon=True
                )
                relay.start()
                relays.append(relay)

    requested: list[int] = []

    def forward(signum, frame):
        requested.append(signum)
        for child in children:
            if child.poll() is None:
                child.send_signal(signum)

    previous = {
        s: signal.signal(s, forward)
        for s in (signal.SIGINT, signal.SIGTERM)
        if signal.getsignal(s) is not signal.SIG_IGN
    }
    try:
        failed = _wait(children, grace)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        for relay in relays:
            relay.join(timeout=5)
    if failed is None:
        return 0
    index, code = failed
    resume = resume_hint or "the same command and --resume"
    if requested:
        name = _signal_name(requested[0])
        print(
            f"stopped by {name} (passed on to every process); continue with: {resume}",
            file=sys.stderr,
            flush=True,
        )
        return 128 + requested[0]
    print(
        f"error: process {index} (pid {children[index].pid}) {how_it_ended(code)}; stopped the "
        f"other {processes - 1} process(es). The run continues from its newest checkpoint "
        f"with: {resume}",
        file=sys.stderr,
        flush=True,
    )
    return exit_code(code)


def _wait(children: list[subprocess.Popen], grace: float) -> tuple[int, int] | None:
    """Waits for every child; at the first that fails, stops the rest. Returns (index, return
    code) of the first failure, or None when all exited 0."""
    while True:
        codes = [child.poll() for child in children]
        failed = [(i, c) for i, c in enumerate(codes) if c not in (None, 0)]
        if failed:
            first = failed[0]
            _stop(children, grace)
            return first
        if all(c == 0 for c in codes):
            return None
        time.sleep(0.2)


def _stop(children: list[subprocess.Popen], grace: float) -> None:
    """SIGTERM to every running child, SIGKILL to those still running after ``grace`` s."""
    for child in children:
        if child.poll() is None:
            child.terminate()
    deadline = time.monotonic() + grace
    for child in children:
        try:
            child.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m experiments.launch",
        description=__doc__.split("\n\n")[0],
        epilog="Everything after DATASET goes to the driver: python -m experiments.DATASET "
        "--help lists it.",
    )
    parser.add_argument("--processes", type=int, default=2, help="processes (default: 2)")
    parser.add_argument(
        "--devices-per-process",
        type=int,
        default=2,
        help="CPU devices per process (JAX_NUM_CPU_DEVICES; default: 2)",
    )
    parser.add_argument("--port", type=int, default=None, help="coordinator port (default: free)")
    parser.add_argument(
        "--grace",
        type=float,
        default=DEFAULT_GRACE_SECONDS,
        help="seconds the other processes get to stop after one fails, before SIGKILL "
        f"(default: {DEFAULT_GRACE_SECONDS:g})",
    )
    parser.add_argument("dataset", choices=DATASETS, help="the driver to run")
    parser.add_argument("flags", nargs=argparse.REMAINDER, help="the driver's flags")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    for name in ("processes", "devices_per_process"):
        if getattr(args, name) < 1:
            print(f"error: --{name.replace('_', '-')} must be >= 1", file=sys.stderr)
            return 2
    own = {"--coordinator-address", "--num-processes", "--process-id"}
    clash = [f for f in args.flags if f.split("=")[0] in own]
    if clash:
        print(f"error: the launcher sets {', '.join(sorted(own))}; drop {clash}", file=sys.stderr)
        return 2
    kept = [a for a in argv if a != "--resume" and not a.startswith("--resume=")]
    hint = shlex.join(["python", "-m", "experiments.launch", *kept, "--resume"])
    return launch(
        args.dataset,
        args.flags,
        processes=args.processes,
        devices_per_process=args.devices_per_process,
        port=args.port,
        grace=args.grace,
        resume_hint=hint,
    )


if __name__ == "__main__":
    sys.exit(main())
