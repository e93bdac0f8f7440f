"""Where a margin head's forward+backward time goes: its three matmuls and its passes over the
[B, C] logits, on XLA and in torch, beside the whole loss of both libraries, in one process.

    python -m benchmarks.head_parts --loss cosface --batch 1024 --dim 128 --classes 10000

Any implementation of a margin head (CosFace, ArcFace, SphereFace: ``mlx_jax.losses`` or PML)
needs three matmuls of the size of the logits per forward+backward pass: the cosines
cos = x̂·Ŵ ([B, D]×[D, C]), the input gradient ∂x̂ = G·Ŵᵀ and the weight gradient ∂Ŵ = x̂ᵀ·G,
with G [B, C] the gradient of the logits. The rest is elementwise work over the [B, C] logits
(the log-sum-exp and the softmax gradient G). Rows:

* ``loss fwd+bwd``: ours (``jax.jit(value_and_grad)`` w.r.t. x and W, as
  ``benchmarks.losses``) and PML's (``loss.backward()``), the same inputs and hyperparameters;
* the three matmuls alone, XLA (``jnp.matmul``, the precision the heads use) and torch
  (``torch.mm``, what PML runs), each as one jitted call on stored operands;
* ``log-sum-exp`` and ``softmax gradient``: the two elementwise passes of the forward and
  backward pass over a [B, C] logit matrix, on XLA.

The summary gives ours minus XLA's three matmuls (the elementwise share) and PML's time over
XLA's three matmuls: the largest PML/ours any head built on XLA's matmuls can reach.
Before timing, each XLA matmul is checked against torch's. Timing as in
:mod:`benchmarks.timing` (pinned cores, alternating blocks, median).
"""

from __future__ import annotations

import argparse
import pathlib
import statistics
import sys
import time
from collections.abc import Callable, Sequence

import numpy as np

from benchmarks.timing import cpu_model, prepare_process, timed_blocks

HEADS = ("cosface", "arcface", "sphereface")
MATMULS = ("x̂·Ŵ", "G·Ŵᵀ", "x̂ᵀ·G")
PASSES = ("log-sum-exp", "softmax gradient")


def _operands(batch: int, dim: int, classes: int, seed: int = 0):
    """x̂ [B, D] and Ŵ [D, C] (unit rows / columns) and a [B, C] logit gradient G, float32."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, dim), dtype=np.float32)
    w = rng.standard_normal((dim, classes), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    w /= np.linalg.norm(w, axis=0, keepdims=True)
    g = rng.standard_normal((batch, classes), dtype=np.float32) / classes
    return x, w, g


def xla_parts(x: np.ndarray, w: np.ndarray, g: np.ndarray) -> dict[str, Callable[[], object]]:
    """The three matmuls and the two [B, C] passes as jitted XLA calls."""
    import jax
    import jax.numpy as jnp

    from mlx_jax.distances import HIGHEST

    jx, jw, jg = (jnp.asarray(a) for a in (x, w, g))
    scale = 64.0

    def log_sum_exp(cosines):
        return jax.nn.logsumexp(scale * cosines, axis=1)

    def softmax_gradient(cosines, log_normalizer):
        return scale * jnp.exp(scale * cosines - log_normalizer[:, None])

    calls = {
        "x̂·Ŵ": (jax.jit(lambda a, b: jnp.matmul(a, b, precision=HIGHEST)), (jx, jw)),
        "G·Ŵᵀ": (jax.jit(lambda a, b: jnp.matmul(a, b.T, precision=HIGHEST)), (jg, jw)),
        "x̂ᵀ·G": (jax.jit(lambda a, b: jnp.matmul(a.T, b, precision=HIGHEST)), (jx, jg)),
        "log-sum-exp": (jax.jit(log_sum_exp), (jg,)),
        "softmax gradient": (jax.jit(softmax_gradient), (jg, log_sum_exp(jg))),
    }
    return {name: (lambda f=f, a=a: jax.block_until_ready(f(*a))) for name, (f, a) in calls.items()}


def torch_matmuls(x: np.ndarray, w: np.ndarray, g: np.ndarray):
    """The three matmuls in torch, or None without torch."""
    try:
        import torch
    except ImportError:
        return None
    tx, tw, tg = (torch.from_numpy(a) for a in (x, w, g))
    return {
        "x̂·Ŵ": lambda: torch.mm(tx, tw),
        "G·Ŵᵀ": lambda: torch.mm(tg, tw.T),
        "x̂ᵀ·G": lambda: torch.mm(tx.T, tg),
    }


def check_same_matmuls(ours: dict, theirs: dict) -> None:
    """XLA's and torch's matmuls compute the same arrays (so the times compare like with like)."""
    for name in MATMULS:
        a, b = np.asarray(ours[name]()), theirs[name]().numpy()
        error = float(np.max(np.abs(a - b))) / (float(np.max(np.abs(b))) or 1.0)
        if not error < 1e-4:
            raise AssertionError(f"{name}: XLA and torch differ by {error:.2e} (relative)")


def whole_losses(loss: str, batch: int, dim: int, classes: int) -> dict[str, Callable[[], object]]:
    """Ours and (where importable) PML's fwd+bwd of ``loss``, as ``benchmarks.losses`` runs them."""
    from benchmarks import losses as bench

    spec = next(s for s in bench.SPECS if s.name == loss)
    problem = bench.make_problem("head", batch, dim, classes, per_class=4, seed=0)
    step = bench.compile_step(bench.param_step(spec.head_loss), bench.device_args(spec, problem))
    sides = {"ours": step.run}
    pml, _ = bench.load_pml()
    if pml is not None:
        sides["PML"] = spec.pml_build(problem, pml)
    return sides


def measure(args: argparse.Namespace) -> dict[str, dict[str, float]]:
    """Median ms of every part: {"xla": {part: ms}, "torch": {...}, "loss": {ours/PML: ms}}."""
    x, w, g = _operands(args.batch, args.dim, args.classes)
    ours = xla_parts(x, w, g)
    sides = {f"xla {k}": f for k, f in ours.items()}
    theirs = torch_matmuls(x, w, g)
    if theirs is not None:
        check_same_matmuls(ours, theirs)
        sides.update({f"torch {k}": f for k, f in theirs.items()})
    losses = whole_losses(args.loss, args.batch, args.dim, args.classes)
    sides.update({f"loss {k}": f for k, f in losses.items()})
    times = timed_blocks(sides, args.repeats, args.block, args.pause, warmup=2, settle=1)
    result: dict[str, dict[str, float]] = {"xla": {}, "torch": {}, "loss": {}}
    for name, t in times.items():
        group, part = name.split(" ", 1)
        result[group][part] = statistics.median(t) * 1e3
    return result


def report(result: dict[str, dict[str, float]]) -> str:
    """The parts table and the bound it implies."""
    xla, torch_ms, loss = result["xla"], result["torch"], result["loss"]
    lines = ["| part | XLA ms | torch ms |", "|---|---|---|"]
    lines.append(f"| loss fwd+bwd | {loss['ours']:.2f} (ours) | {_ms(loss.get('PML'))} (PML) |")
    for name in MATMULS:
        lines.append(f"| matmul {name} | {xla[name]:.2f} | {_ms(torch_ms.get(name))} |")
    matmuls = sum(xla[name] for name in MATMULS)
    torch_matmuls_ms = sum(torch_ms.values()) if torch_ms else None
    lines.append(f"| three matmuls | {matmuls:.2f} | {_ms(torch_matmuls_ms)} |")
    for name in PASSES:
        lines.append(f"| pass: {name} | {xla[name]:.2f} | – |")
    lines.append("")
    lines.append(
        f"ours − XLA's three matmuls: {loss['ours'] - matmuls:.2f} ms "
        f"({loss['ours'] / matmuls:.2f}× the matmuls)"
    )
    if "PML" in loss:
        lines.append(
            f"PML/ours {loss['PML'] / loss['ours']:.2f}; PML / XLA's three matmuls "
            f"{loss['PML'] / matmuls:.2f} (the most PML/ours a head on XLA's matmuls can reach)"
        )
    return "\n".join(lines)


def _ms(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}"


TARGET = 1.15  # the loss's fwd+bwd within this many times its three matmuls, side by side


def summary_table(results: dict[tuple[str, int], dict[str, dict[str, float]]]) -> str:
    """One line per (head, C): ours, the three matmuls, their ratio against :data:`TARGET`."""
    lines = [
        f"| head | C | ours ms | three matmuls ms | ours / matmuls (target ≤ {TARGET}) "
        "| PML ms | PML / ours |",
        "|---|---|---|---|---|---|---|",
    ]
    for (loss, classes), result in results.items():
        ours = result["loss"]["ours"]
        matmuls = sum(result["xla"][name] for name in MATMULS)
        ratio = ours / matmuls
        verdict = "met" if ratio <= TARGET else "missed"
        pml = result["loss"].get("PML")
        lines.append(
            f"| {loss} | {classes:,} | {ours:.2f} | {matmuls:.2f} | {ratio:.2f} ({verdict}) | "
            f"{_ms(pml)} | {'–' if pml is None else f'{pml / ours:.2f}'} |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.head_parts",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--loss", nargs="+", choices=HEADS, default=["cosface"], help="heads (default: cosface)"
    )
    p.add_argument("--batch", type=int, default=1024, help="B (default: 1024)")
    p.add_argument("--dim", type=int, default=128, help="D (default: 128)")
    p.add_argument(
        "--classes", type=int, nargs="+", default=[10_000], help="C values (default: 10000)"
    )
    p.add_argument("--threads", type=int, default=None, help="cores (default: all)")
    p.add_argument("--repeats", type=int, default=20, help="timed calls per part (default: 20)")
    p.add_argument("--block", type=int, default=5, help="calls per block (default: 5)")
    p.add_argument("--pause", type=float, default=0.2, help="sleep after a block (default: 0.2)")
    p.add_argument(
        "--out", default=None, help="also write the report (markdown) to this file (default: no)"
    )
    args = p.parse_args(argv)
    if min(args.batch, args.dim, *args.classes, args.repeats, args.block) < 1:
        p.error("--batch, --dim, --classes, --repeats and --block must be >= 1")
    threads = prepare_process(args.threads)  # before JAX creates its CPU client
    results: dict[tuple[str, int], dict[str, dict[str, float]]] = {}
    sections = []
    for classes in args.classes:
        for loss in args.loss:
            config = argparse.Namespace(**{**vars(args), "loss": loss, "classes": classes})
            results[(loss, classes)] = measure(config)
            section = f"### {loss}, B = {args.batch}, D = {args.dim}, C = {classes:,}\n\n"
            section += report(results[(loss, classes)])
            print(section, flush=True)
            sections.append(section)
    summary = summary_table(results)
    print(summary)
    if args.out:
        command = " ".join(["python -m benchmarks.head_parts", *(argv or sys.argv[1:])])
        header = (
            f"# Margin heads against their three matmuls\n\n- command: `{command}`\n"
            f"- machine: {cpu_model()}; {threads} threads\n"
            f"- {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; float32; median of "
            f"{args.repeats} calls per part, alternating blocks of {args.block}\n\n"
        )
        text = header + summary + "\n\n" + "\n\n".join(sections) + "\n"
        pathlib.Path(args.out).write_text(text)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
