"""LeNet++'s convolutions one by one: each one's forward pass, input gradient and
weight gradient, XLA's kernels and oneDNN's (through XLA's FFI, :mod:`experiments.onednn_conv`,
where it can run) beside PyTorch, one process.

    python -m benchmarks.conv_layers --threads 1
    XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type= python -m benchmarks.conv_layers --threads 1

The six layers are LeNet++'s (5×5, padding 2, NHWC for XLA, NCHW for PyTorch): 28×28 1→32,
28×28 32→32, 14×14 32→64, 14×14 64→64, 7×7 64→128, 7×7 128→128, at ``--batch`` images (64:
one device's half of the driver's batch of 128 on two devices). Each operation is timed alone:
``fwd`` (the convolution), ``dx`` (its input gradient, the VJP for the input; PyTorch's
``torch.nn.grad.conv2d_input``) and ``dw`` (the weight gradient; ``conv2d_weight``); the first
layer has no ``dx`` (its input is the image). Before timing, each operation's result is checked
against PyTorch's. Timing as in :mod:`benchmarks.timing`: pinned to
``--threads`` cores, alternating blocks, median. Without torch only XLA's columns are printed.
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable, Sequence

import numpy as np

from benchmarks.timing import cpu_model, prepare_process, timed_blocks

LAYERS = [(28, 1, 32), (28, 32, 32), (14, 32, 64), (14, 64, 64), (7, 64, 128), (7, 128, 128)]
OPERATIONS = ("fwd", "dx", "dw")


KERNEL_NAMES = {"xla": "XLA", "onednn": "oneDNN"}


def jax_sides() -> list[str]:
    """The JAX convolutions to time: XLA's, and oneDNN's where it can run here."""
    from experiments import onednn_conv

    return onednn_conv.runnable_kernels()


def xla_operations(
    x: np.ndarray, w: np.ndarray, g: np.ndarray, kernels: str = "xla"
) -> dict[str, Callable[[], object]]:
    """Jitted forward, input gradient and weight gradient of one NHWC convolution, on XLA's
    kernels or (``kernels="onednn"``) on oneDNN's."""
    import jax
    import jax.numpy as jnp

    from experiments import onednn_conv

    def conv(x, w):
        if kernels == "onednn":
            return onednn_conv.conv_nhwc(x, w, 2)
        return jax.lax.conv_general_dilated(
            x, w, (1, 1), ((2, 2), (2, 2)), dimension_numbers=("NHWC", "HWIO", "NHWC")
        )

    jx, jw, jg = (jnp.asarray(a) for a in (x, w, g))
    fwd = jax.jit(conv)
    dx = jax.jit(lambda w, g: jax.vjp(lambda x: conv(x, w), jnp.zeros(x.shape))[1](g)[0])
    dw = jax.jit(lambda x, g: jax.vjp(lambda w: conv(x, w), jnp.zeros(w.shape))[1](g)[0])
    ops = {
        "fwd": lambda: jax.block_until_ready(fwd(jx, jw)),
        "dx": lambda: jax.block_until_ready(dx(jw, jg)),
        "dw": lambda: jax.block_until_ready(dw(jx, jg)),
    }
    return ops


def torch_operations(x: np.ndarray, w: np.ndarray, g: np.ndarray):
    """The same three operations in PyTorch (NCHW), or None without torch."""
    try:
        import torch
    except ImportError:
        return None
    tx = torch.tensor(x).permute(0, 3, 1, 2).contiguous()
    tw = torch.tensor(w).permute(3, 2, 0, 1).contiguous()
    tg = torch.tensor(g).permute(0, 3, 1, 2).contiguous()
    F, grad = torch.nn.functional, torch.nn.grad
    ops = {
        "fwd": lambda: F.conv2d(tx, tw, padding=2),
        "dx": lambda: grad.conv2d_input(tx.shape, tw, tg, padding=2),
        "dw": lambda: grad.conv2d_weight(tx, tw.shape, tg, padding=2),
    }
    return ops


def check_same_results(sides: dict[str, Callable[[], object]]) -> None:
    """Every JAX side computes PyTorch's arrays (its NCHW / OIHW moved to NHWC / HWIO), so the
    timings compare like with like."""
    to_xla_layout = {"fwd": (0, 2, 3, 1), "dx": (0, 2, 3, 1), "dw": (2, 3, 1, 0)}
    for op, axes in to_xla_layout.items():
        for kernels, name in KERNEL_NAMES.items():
            if f"{kernels} {op}" not in sides:
                continue
            ours = np.asarray(sides[f"{kernels} {op}"]())
            theirs = sides[f"torch {op}"]().numpy().transpose(axes)
            scale = float(np.max(np.abs(theirs))) or 1.0
            error = float(np.max(np.abs(ours - theirs))) / scale
            if not error < 1e-4:
                raise AssertionError(f"{op}: {name} and PyTorch differ by {error:.2e} (relative)")


def measure(batch: int, repeats: int, block: int, pause: float) -> list[dict]:
    """One row per layer and operation: XLA ms, oneDNN ms (where it runs) and (with torch)
    PyTorch ms, medians."""
    rows = []
    kernels = jax_sides()
    rng = np.random.default_rng(0)
    for side, c_in, c_out in LAYERS:
        x = rng.standard_normal((batch, side, side, c_in), dtype=np.float32)
        w = rng.standard_normal((5, 5, c_in, c_out), dtype=np.float32) * 0.05
        g = rng.standard_normal((batch, side, side, c_out), dtype=np.float32)
        ops = OPERATIONS if c_in > 1 else ("fwd", "dw")  # the image needs no gradient
        sides = {
            f"{side_name} {k}": f
            for side_name in kernels
            for k, f in xla_operations(x, w, g, side_name).items()
            if k in ops
        }
        theirs = torch_operations(x, w, g)
        if theirs is not None:
            sides.update({f"torch {k}": f for k, f in theirs.items() if k in ops})
        if theirs is not None:
            check_same_results(sides)
        times = timed_blocks(sides, repeats, block, pause, warmup=2)
        for op in OPERATIONS:
            if f"xla {op}" not in times:
                continue
            row = {"layer": f"{side}×{side} {c_in}→{c_out}", "op": op}
            for side_name in kernels:
                row[f"{side_name}_ms"] = statistics.median(times[f"{side_name} {op}"]) * 1e3
            if theirs is not None:
                row["torch_ms"] = statistics.median(times[f"torch {op}"]) * 1e3
            rows.append(row)
    return rows


def table(rows: list[dict]) -> str:
    ours = [k for k in KERNEL_NAMES if f"{k}_ms" in rows[0]]
    with_torch = "torch_ms" in rows[0]
    head = ["layer", "op", *(f"{KERNEL_NAMES[k]} ms" for k in ours)]
    if with_torch:
        head += ["PyTorch ms", *(f"{KERNEL_NAMES[k]}/PyTorch" for k in ours)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    totals = {k: sum(r[f"{k}_ms"] for r in rows) for k in [*ours, "torch"] if f"{k}_ms" in rows[0]}
    for r in [*rows, {"layer": "all", "op": "all", **{f"{k}_ms": v for k, v in totals.items()}}]:
        cells = [r["layer"], r["op"], *(f"{r[f'{k}_ms']:.2f}" for k in ours)]
        if with_torch:
            ratios = (f"{r[f'{k}_ms'] / r['torch_ms']:.2f}" for k in ours)
            cells += [f"{r['torch_ms']:.2f}", *ratios]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.conv_layers",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--batch", type=int, default=64, help="images per call (default: 64)")
    p.add_argument("--threads", type=int, default=None, help="cores (default: all)")
    p.add_argument("--repeats", type=int, default=16, help="timed calls per side (default: 16)")
    p.add_argument("--block", type=int, default=4, help="calls per block (default: 4)")
    p.add_argument("--pause", type=float, default=0.05, help="sleep after a block (default: 0.05)")
    args = p.parse_args(argv)
    if args.batch < 1 or args.repeats < 1 or args.block < 1:
        p.error("--batch, --repeats and --block must be >= 1")
    threads = prepare_process(args.threads)  # before JAX creates its CPU client
    print(f"{cpu_model()}; {threads} threads; batch {args.batch}")
    print(table(measure(args.batch, args.repeats, args.block, args.pause)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
