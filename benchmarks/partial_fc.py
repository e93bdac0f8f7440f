"""Training steps of a class-sharded ArcFace/CosFace head (exact Partial FC) at a million classes.

``python -m benchmarks.partial_fc`` (see ``--help``) times one training step of the margin head

    loss, (dL/dx, dL/dW) = value_and_grad(loss)(x, labels, W);   W ← W − lr·dL/dW

with W [D, C] (default C = 1,000,000, D = 512, float32) sharded by class over ``--devices``
virtual CPU devices (:func:`mlx_jax.partial_fc.partial_fc_arcface_loss`), and the same step on
one device with the unsharded :func:`mlx_jax.losses.margin_softmax.arcface_loss` when it fits
``--max-gb``. The embeddings x [B, D] and labels are replicated (``--batch-sharded``: split along
B over the same axis and gathered inside, as insightface); dL/dx is returned, as a backbone would
need it. W is created shard by shard from host random numbers (never whole on one device in the
sharded mode; the same values in both modes), and the step donates W, so the update is in place.

Each mode runs in its own worker process (``JAX_NUM_CPU_DEVICES`` and ``XLA_FLAGS`` are set
there before jax is imported), one after the other, so peak RSS is per mode and two big
configurations never share the machine's memory.

Reported per mode:

* **step s**: median wall time of ``--steps`` timed steps after ``--warmup`` untimed ones
  (``jax.block_until_ready`` on the new W, loss and dL/dx). On a CPU host all virtual devices
  share the same cores, so the sharded step does the same arithmetic as the unsharded one: the
  point of this benchmark is the memory per device, not speed-up.
* **XLA MiB per device**: ``compiled.memory_analysis()`` of the step, which for an SPMD program
  describes one device's program: arguments (W shard, x, labels), outputs, temporaries, and the
  peak ``arguments + outputs − aliased (donated W) + temporaries``.
* **RSS GiB**: the worker's peak resident memory (``VmHWM``) during the steps, minus its RSS
  after importing jax: W, the batches, the compiled step and its buffers, for all devices of the
  process together (per device = /N on a CPU host). The high-water mark is reset after W is
  created (``/proc/self/clear_refs``); the peak while creating W is reported separately.
* **loss**: the loss of every step, each on a fresh random batch; the first step's loss is the
  same in both modes (same W, x, labels).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import pathlib
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from experiments.cpu_devices import virtual_devices_env

MIB = 2**20
GIB = 2**30
RESULTS = pathlib.Path(__file__).parent / "results"
INIT_BLOCK = 1 << 15  # columns of W drawn per random block (see run_mode's init_block)


# Not imported from benchmarks.losses: that module imports jax, and the workers must set the
# device count before jax starts.
def _proc_status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak_rss() -> None:
    """Resets the process's ``VmHWM`` to its current RSS (Linux; no-op elsewhere)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


# --------------------------------------------------------------------------------------------
# Worker: one mode, in its own process
# --------------------------------------------------------------------------------------------


def run_mode(args: argparse.Namespace, mode: str) -> dict[str, Any]:
    """Builds, compiles and times the step of ``mode`` ("sharded" or "unsharded")."""
    if "jax" in sys.modules:  # the device count is fixed when jax starts
        raise RuntimeError("run_mode must run in a fresh process (jax is already imported)")
    os.environ.update(virtual_devices_env(args.devices))
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, SingleDeviceSharding
    from jax.sharding import PartitionSpec as P

    from mlx_jax import partial_fc as pfc
    from mlx_jax.losses.margin_softmax import arcface_loss, cosface_loss

    rss_start = _proc_status_kib("VmRSS") * 1024
    batch, dim, classes = args.batch, args.dim, args.classes
    if mode == "sharded":
        mesh = jax.make_mesh((args.devices,), ("model",), axis_types=(jax.sharding.AxisType.Auto,))
        w_sharding = pfc.class_sharding(mesh, "model")
        rows = NamedSharding(mesh, P("model") if args.batch_sharded else P())
        columns = pfc.padded_num_classes(classes, args.devices)
        sharded_loss = {
            "arcface": pfc.partial_fc_arcface_loss,
            "cosface": pfc.partial_fc_cosface_loss,
        }

        def loss_fn(x, y, w, key):
            return sharded_loss[args.loss](
                x,
                y,
                w,
                mesh=mesh,
                num_classes=classes,
                batch_sharded=args.batch_sharded,
                sample_rate=args.sample_rate,
                key=key,
            )

    else:
        w_sharding = rows = SingleDeviceSharding(jax.devices()[0])
        columns = classes
        unsharded_loss = {"arcface": arcface_loss, "cosface": cosface_loss}

        def loss_fn(x, y, w, key):
            del key  # the unsharded loss is always exact
            return unsharded_loss[args.loss](x, y, w)

    def init_block(index) -> np.ndarray:
        """W[:, index] on the host: normal with Glorot's variance 2/(D + C) (the variance of
        mlx_jax.heads.ClassWeights' init), drawn in fixed blocks of columns so both modes get
        the same W; padding columns are 0. One slice at a time: W is never whole on the host
        (except as the single device's own array in the unsharded mode)."""
        start, stop, _ = index[1].indices(columns)
        std = np.sqrt(2.0 / (dim + classes))
        first, last = start // INIT_BLOCK, -(-stop // INIT_BLOCK)
        blocks = [
            np.random.default_rng([args.seed, b]).standard_normal((dim, INIT_BLOCK), np.float32)
            for b in range(first, last)
        ]
        out = np.concatenate(blocks, axis=1)[:, start - first * INIT_BLOCK :][:, : stop - start]
        out[:, max(classes - start, 0) :] = 0.0
        return out * np.float32(std)

    key_x, key_y, key_sample = jax.random.split(jax.random.key(args.seed), 3)
    num_steps = args.warmup + args.steps
    xs = jax.random.normal(key_x, (num_steps, batch, dim), jnp.float32)  # a fresh batch a step
    ys = jax.random.randint(key_y, (num_steps, batch), 0, classes, jnp.int32)
    batches = [(jax.device_put(xs[i], rows), jax.device_put(ys[i], rows)) for i in range(num_steps)]
    x, y = batches[0]

    def step(w, x, y, key):
        loss, (grad_x, grad_w) = jax.value_and_grad(loss_fn, argnums=(0, 2))(x, y, w, key)
        return w - args.lr * grad_w, loss, grad_x

    w_spec = jax.ShapeDtypeStruct((dim, columns), jnp.float32, sharding=w_sharding)
    start = time.perf_counter()
    compiled = (
        jax.jit(step, donate_argnums=0, out_shardings=(w_sharding, None, None))
        .lower(w_spec, x, y, key_sample)
        .compile()
    )
    compile_s = time.perf_counter() - start
    stats = compiled.memory_analysis()
    xla = {
        "argument": stats.argument_size_in_bytes,
        "output": stats.output_size_in_bytes,
        "alias": stats.alias_size_in_bytes,
        "temp": stats.temp_size_in_bytes,
    }
    xla["peak"] = xla["argument"] + xla["output"] - xla["alias"] + xla["temp"]
    result: dict[str, Any] = {
        "mode": mode,
        "devices": args.devices if mode == "sharded" else 1,
        "columns": columns,
        "compile_s": compile_s,
        "xla_bytes": xla,
    }
    if xla["peak"] * result["devices"] > args.max_gb * GIB:
        result["status"] = f"skipped: XLA needs {xla['peak'] / GIB:.2f} GiB > --max-gb"
        return result

    w = jax.make_array_from_callback((dim, columns), w_sharding, init_block)
    shard_shapes = {tuple(s.data.shape) for s in w.addressable_shards}
    rss_init_peak = _proc_status_kib("VmHWM") * 1024 - rss_start
    rss_before_steps = _proc_status_kib("VmRSS") * 1024 - rss_start
    _reset_peak_rss()
    losses, times = [], []
    for i, (x, y) in enumerate(batches):
        start = time.perf_counter()
        key = jax.random.fold_in(key_sample, i)  # the step's class sample (--sample-rate < 1)
        w, loss, grad_x = jax.block_until_ready(compiled(w, x, y, key))
        elapsed = time.perf_counter() - start
        losses.append(float(loss))
        if i >= args.warmup:
            times.append(elapsed)
    result.update(
        status="ok",
        w_shard_shape=sorted(shard_shapes),
        losses=losses,
        step_times_s=times,
        step_s=statistics.median(times),
        grad_x_finite=bool(jnp.all(jnp.isfinite(grad_x))),
        rss_init_peak_bytes=rss_init_peak,
        rss_before_steps_bytes=rss_before_steps,
        rss_peak_bytes=_proc_status_kib("VmHWM") * 1024 - rss_start,
    )
    return result


# --------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------


def _run_worker(argv: Sequence[str], mode: str, devices: int) -> dict[str, Any]:
    command = [sys.executable, "-m", "benchmarks.partial_fc", *argv, "--worker", mode]
    done = subprocess.run(
        command, env=virtual_devices_env(devices), capture_output=True, text=True, check=False
    )
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        tail = (done.stdout + done.stderr)[-3000:]
        return {"mode": mode, "status": f"worker failed (exit {done.returncode})", "log": tail}
    return json.loads(lines[-1])


def _mib(value: float | None) -> str:
    return "–" if value is None else f"{value / MIB:,.1f}"


def format_report(args: argparse.Namespace, argv: Sequence[str], rows: list[dict]) -> str:
    lines = [
        "# Partial FC (exact, class-sharded margin head): training step at many classes",
        "",
        f"- command: `python -m benchmarks.partial_fc {' '.join(argv)}`".rstrip(),
        f"- machine: {platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}; "
        f"{args.devices} virtual CPU devices (`JAX_NUM_CPU_DEVICES`) sharing those cores",
        f"- versions: Python {platform.python_version()}, jax {importlib.metadata.version('jax')}",
        f"- {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}; loss `{args.loss}` "
        f"(s = 64, insightface defaults), B = {args.batch}, D = {args.dim}, "
        f"C = {args.classes:,}, float32, SGD lr = {args.lr}; sharded sample rate "
        f"{args.sample_rate:g}{' (exact)' if args.sample_rate == 1 else ''}; batch "
        f"{'sharded over the class axis and gathered' if args.batch_sharded else 'replicated'}; "
        f"median of {args.steps} steps after {args.warmup} warm-up step(s)",
        "- step: `value_and_grad` w.r.t. embeddings and W, then `W - lr·dW` (W donated). "
        "XLA MiB: `compiled.memory_analysis()` of one device's program; peak = arguments + "
        "outputs − aliased + temporaries. RSS: the worker process's peak during the steps "
        "(and, separately, while creating W) above its RSS after importing jax, all devices "
        "together. Each step gets a fresh random batch. "
        "See `python -m benchmarks.partial_fc --help`.",
        "",
        "| mode | devices | W per device | step s | compile s | XLA args MiB | XLA temps MiB "
        "| XLA peak MiB per device | RSS GiB steps (process) | RSS GiB steps per device "
        "| RSS GiB creating W | losses |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        xla = r.get("xla_bytes", {})
        devices = r.get("devices", 1)
        ok = r.get("status") == "ok"
        rss = r.get("rss_peak_bytes") if ok else None
        shard = r.get("w_shard_shape", [[args.dim, r.get("columns", 0) // devices]])[0]
        cells = [
            r["mode"],
            str(devices),
            f"[{shard[0]}, {shard[1]:,}]",
            f"{r['step_s']:.3g}" if ok else "–",
            f"{r['compile_s']:.1f}" if "compile_s" in r else "–",
            _mib(xla.get("argument")),
            _mib(xla.get("temp")),
            _mib(xla.get("peak")),
            "–" if rss is None else f"{rss / GIB:.2f}",
            "–" if rss is None else f"{rss / devices / GIB:.2f}",
            f"{r['rss_init_peak_bytes'] / GIB:.2f}" if ok else "–",
            ", ".join(f"{v:.3f}" for v in r.get("losses", [])) or r.get("status", ""),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "On a CPU host every virtual device lives in the same RAM, so the process totals of the "
        "two modes are alike; what sharding divides is each device's part (XLA's per-device "
        "peak), which is what bounds C on accelerators. RSS also counts what XLA's analysis "
        "leaves out (the runtime, thread stacks, allocator slack, the batches).",
    ]
    failed = [r for r in rows if "log" in r]
    for r in failed:
        lines += ["", f"{r['mode']} worker log:", "```", r["log"], "```"]
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.partial_fc",
        description=__doc__,
        formatter_class=type(
            "Formatter",
            (argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter),
            {},
        ),
    )
    p.add_argument("--classes", type=int, default=1_000_000, help="C, number of classes")
    p.add_argument("--dim", type=int, default=512, help="D, embedding dimension")
    p.add_argument("--batch", type=int, default=256, help="B, global batch")
    p.add_argument("--devices", type=int, default=8, help="virtual CPU devices (class shards)")
    p.add_argument("--loss", choices=("arcface", "cosface"), default="arcface")
    p.add_argument("--lr", type=float, default=0.1, help="SGD learning rate of W")
    p.add_argument("--steps", type=int, default=3, help="timed steps (median)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--sample-rate",
        type=float,
        default=1.0,
        help="Partial FC's r for the sharded mode: 1 is exact; r < 1 samples r·C/N classes per "
        "device (then the two modes' losses differ)",
    )
    p.add_argument(
        "--batch-sharded",
        action="store_true",
        help="split x and labels along B over the class axis (gathered inside)",
    )
    p.add_argument(
        "--unsharded",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also run the single-device step with the unsharded loss (skipped above --max-gb)",
    )
    p.add_argument(
        "--max-gb",
        type=float,
        default=10.0,
        help="skip a mode whose XLA peak (all devices) exceeds this many GiB",
    )
    p.add_argument("--out", type=pathlib.Path, default=RESULTS / "partial_fc.md")
    p.add_argument("--worker", choices=("sharded", "unsharded"), help=argparse.SUPPRESS)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if min(args.classes, args.dim, args.batch, args.devices, args.steps) < 1:
        parser.error("--classes, --dim, --batch, --devices and --steps must be >= 1")
    if not 0.0 < args.sample_rate <= 1.0:
        parser.error("--sample-rate must be in (0, 1]")
    if args.batch_sharded and args.batch % args.devices:
        parser.error("--batch must be divisible by --devices with --batch-sharded")
    if args.worker:
        print(json.dumps(run_mode(args, args.worker)), flush=True)
        return 0
    modes = ["sharded", "unsharded"] if args.unsharded else ["sharded"]
    rows = []
    for mode in modes:
        print(f"running {mode} ...", file=sys.stderr, flush=True)
        rows.append(_run_worker(argv, mode, args.devices))
        print(json.dumps({k: v for k, v in rows[-1].items() if k != "log"}), file=sys.stderr)
    report = format_report(args, argv, rows)
    print(report)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(report)
    args.out.with_suffix(".json").write_text(json.dumps(rows, indent=1) + "\n")
    return (
        0 if all(r.get("status") == "ok" or "skipped" in r.get("status", "") for r in rows) else 1
    )


if __name__ == "__main__":
    sys.exit(main())
