"""The experiments' train step on one process and on several (jax.distributed), side by side.

    python -m benchmarks.multi_process --layouts 1x2 2x1 2x2 --loss triplet --limit 12800

Each layout ``PxN`` (P processes × N CPU devices each) trains the same run: ``python -m
experiments.fashion_mnist`` for one process (``JAX_NUM_CPU_DEVICES=N``), ``python -m
experiments.launch --processes P --devices-per-process N fashion_mnist`` for several, 2 epochs
on the first ``--limit`` training images at batch 128, into a fresh workdir. The time of a step
is epoch 2's training time over its steps (epoch 1 includes compilation); the report also gives
each layout's epoch-2 loss: the same global batches and math, so the layouts differ only by
float summation order — which a semi-hard miner amplifies over hundreds of steps (exactness
itself is tested in tests/test_multiprocess.py).

Every layout uses the same cores: a 2×1 layout pins each process to one core (the launcher),
so it costs what the processes' collectives (gloo over localhost) add over the one-process
shard_map. Prints a markdown table and writes it (with command, machine and date) to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence

from benchmarks.timing import cpu_model

ROOT = pathlib.Path(__file__).resolve().parents[1]


def parse_layout(text: str) -> tuple[int, int]:
    """ "2x1" -> (2 processes, 1 device each)."""
    try:
        processes, devices = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"a layout is PxN (e.g. 2x1), got {text!r}") from None
    if processes < 1 or devices < 1:
        raise argparse.ArgumentTypeError(f"a layout needs P, N >= 1, got {text!r}")
    return processes, devices


def layout_command(
    processes: int, devices: int, workdir: pathlib.Path, flags: Sequence[str]
) -> tuple[list[str], dict[str, str]]:
    """The command and environment that train ``flags`` in layout ``processes``×``devices``."""
    env = {**os.environ, "JAX_NUM_CPU_DEVICES": str(devices)}
    run = ["--workdir", str(workdir), *flags]
    if processes == 1:
        return [sys.executable, "-m", "experiments.fashion_mnist", *run], env
    launcher = [sys.executable, "-m", "experiments.launch", "--processes", str(processes)]
    return [*launcher, "--devices-per-process", str(devices), "fashion_mnist", *run], env


def step_ms(workdir: pathlib.Path) -> tuple[float, float, int]:
    """(ms per step of the last epoch, its loss, its steps) from the run's metrics.jsonl."""
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    last, before = rows[-1], rows[-2] if len(rows) > 1 else {"step": 0}
    steps = last["step"] - before["step"]
    return 1e3 * last["train_seconds"] / steps, last["loss"], steps


def measure(
    layouts: Sequence[tuple[int, int]], flags: Sequence[str], root: pathlib.Path
) -> list[dict]:
    """Trains every layout in turn; one result dict per layout."""
    results = []
    for processes, devices in layouts:
        workdir = root / f"{processes}x{devices}"
        argv, env = layout_command(processes, devices, workdir, flags)
        started = time.time()
        done = subprocess.run(argv, env=env, cwd=ROOT, capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(
                f"layout {processes}x{devices} failed ({done.returncode}):\n{done.stderr[-3000:]}"
            )
        ms, loss, steps = step_ms(workdir)
        results.append(
            {
                "processes": processes,
                "devices_per_process": devices,
                "ms_per_step": ms,
                "loss": loss,
                "steps": steps,
                "wall_s": time.time() - started,
            }
        )
        print(f"{processes}x{devices}: {ms:.1f} ms/step, loss {loss:.6f}", flush=True)
    return results


def table(results: Sequence[dict]) -> str:
    base = results[0]["ms_per_step"]
    lines = [
        "| processes × devices | ms / step | vs first | epoch-2 loss |",
        "|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['processes']} × {r['devices_per_process']} | {r['ms_per_step']:.1f} | "
            f"{r['ms_per_step'] / base:.2f} | {r['loss']:.6f} |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.multi_process",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--layouts",
        nargs="+",
        type=parse_layout,
        default=[(1, 2), (2, 1), (2, 2)],
        help="PxN layouts, the first is the baseline (default: 1x2 2x1 2x2)",
    )
    p.add_argument("--loss", default="triplet", help="--loss of the runs (default: triplet)")
    p.add_argument("--limit", type=int, default=12800, help="training images (default: 12800)")
    p.add_argument(
        "--driver-args",
        default="",
        help="more driver flags, written with '=': --driver-args='--data-dir DIR'",
    )
    p.add_argument("--out", default=None, help="markdown report path (default: none)")
    args = p.parse_args(argv)
    flags = ["--loss", args.loss, "--epochs", "2", "--limit", str(args.limit), "--quiet"]
    flags += ["--eval-examples", "500", "--eval-train-limit", "500", *args.driver_args.split()]
    with tempfile.TemporaryDirectory() as tmp:
        results = measure(args.layouts, flags, pathlib.Path(tmp))
    text = table(results)
    print(text)
    if args.out:
        command = " ".join(["python -m benchmarks.multi_process", *(argv or sys.argv[1:])])
        header = (
            f"# Train step: one process and several\n\n- command: `{command}`\n"
            f"- machine: {cpu_model()}, {os.cpu_count()} CPUs\n"
            f"- {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; driver flags: "
            f"`{' '.join(flags)}`; ms / step = epoch 2's training time over its steps\n\n"
        )
        out = pathlib.Path(args.out)
        out.write_text(header + text + "\n")
        out.with_suffix(".json").write_text(json.dumps(results, indent=2))
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
