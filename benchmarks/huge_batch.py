"""Huge batches: blockwise batch-hard triplet and circle loss, forward+backward, wall time and
peak memory, against the dense form and pytorch-metric-learning (PML).

Every configuration runs in a **fresh subprocess** (``python -m benchmarks.huge_batch --worker``)
so its peak resident memory (``resource.getrusage(RUSAGE_SELF).ru_maxrss``, which includes the
inputs, JAX/torch themselves and the compiled program) is its own. The worker builds the inputs
(clustered float32 embeddings, ``--per-class`` samples per class, as ``benchmarks.losses``),
compiles ``jax.jit(value_and_grad(loss))``, runs it once untimed and then ``--repeats`` timed
calls (median reported). PML runs the same way in its own subprocess with its address space
capped by ``resource.setrlimit(RLIMIT_AS, --pml-cap-gb)``: it builds B×B matrices (B = 65,536:
16 GiB per float32 matrix), so it either fits or reports its error. Timings on a shared machine
are noisy; compare rows measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence

RESULTS_DIR = pathlib.Path(__file__).resolve().parent / "results"
REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
GIB = 1 << 30
TRIPLET_MARGIN = 0.2
CIRCLE_M, CIRCLE_GAMMA = 0.4, 80.0  # PML's CircleLoss defaults
LOSSES = ("triplet_batch_hard", "circle")


def _ours(loss: str, block_size: int | None):
    from mlx_jax.losses import circle_loss, triplet_loss

    if loss == "triplet_batch_hard":
        return lambda x, y: triplet_loss(
            x,
            y,
            margin=TRIPLET_MARGIN,
            mining="batch_hard",
            squared=False,
            reduction="mean_nonzero",
            block_size=block_size,
        )
    return lambda x, y: circle_loss(
        x, y, m=CIRCLE_M, gamma=CIRCLE_GAMMA, reduction="mean_nonzero", block_size=block_size
    )


def _problem(batch: int, dim: int, per_class: int, seed: int):
    from benchmarks.losses import make_problem

    problem = make_problem("pair", batch, dim, None, per_class, seed)
    return problem.x, problem.labels


def worker(config: dict) -> dict:
    """Runs one configuration in this (fresh) process; returns its measurements."""
    x_np, y_np = _problem(config["batch"], config["dim"], config["per_class"], config["seed"])
    times = []
    if config["side"] == "pml":
        cap = int(config["pml_cap_gb"] * GIB)
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
        import torch
        from pytorch_metric_learning import distances, losses, miners

        torch.set_num_threads(config["threads"])
        emb = torch.tensor(x_np, requires_grad=True)
        labels = torch.from_numpy(y_np.astype("int64"))
        if config["loss"] == "circle":
            loss_fn, miner = losses.CircleLoss(m=CIRCLE_M, gamma=CIRCLE_GAMMA), None
        else:
            lp = distances.LpDistance(normalize_embeddings=False)
            loss_fn = losses.TripletMarginLoss(margin=TRIPLET_MARGIN, distance=lp)
            miner = miners.BatchHardMiner(distance=lp)

        def call():
            emb.grad = None
            loss = loss_fn(emb, labels, miner(emb, labels)) if miner else loss_fn(emb, labels)
            loss.backward()
            return float(loss.detach())

    else:
        import jax
        import jax.numpy as jnp

        fn = _ours(config["loss"], config["block_size"])
        x, y = jnp.asarray(x_np), jnp.asarray(y_np)
        compiled = jax.jit(jax.value_and_grad(fn)).lower(x, y).compile()

        def call():
            value, grad = jax.block_until_ready(compiled(x, y))
            return float(value)

    value = call()
    for _ in range(config["repeats"]):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"loss_value": value, "seconds": statistics.median(times), "peak_rss": peak}


def run_config(config: dict, timeout: float) -> dict:
    """One configuration in a fresh subprocess; failures become an ``error`` string."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    command = [sys.executable, "-m", "benchmarks.huge_batch", "--worker", json.dumps(config)]
    try:
        proc = subprocess.run(
            command, capture_output=True, text=True, cwd=REPO_ROOT, env=env, timeout=timeout
        )
    except subprocess.TimeoutExpired:
        return {**config, "error": f"timed out after {timeout:.0f} s"}
    for line in proc.stdout.splitlines():
        if line.startswith("{"):
            return {**config, **json.loads(line)}
    tail = (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1]
    return {**config, "error": f"exit {proc.returncode}: {tail[:300]}"}


def _row(r: dict, dense_seconds: dict) -> str:
    side = "PML" if r["side"] == "pml" else "ours"
    form = "–" if r["side"] == "pml" else f"block {r['block_size']}" if r["block_size"] else "dense"
    if "error" in r:
        cells = [r["error"], "–", "–", "–"]
    else:
        dense = dense_seconds.get((r["loss"], r["batch"]))
        ratio = f"{r['seconds'] / dense:.2f}" if dense and r["block_size"] else "–"
        cells = [
            f"{r['seconds']:.3f}",
            ratio,
            f"{r['peak_rss'] / GIB:.2f}",
            f"{r['loss_value']:.6g}",
        ]
    return "| " + " | ".join([r["loss"], str(r["batch"]), side, form, *cells]) + " |"


def format_table(results: list[dict]) -> str:
    dense = {
        (r["loss"], r["batch"]): r["seconds"]
        for r in results
        if r["side"] == "ours" and not r["block_size"] and "error" not in r
    }
    head = "| loss | B | side | form | fwd+bwd s | / dense | peak RSS GiB | loss value |"
    lines = [head, "|---|---|---|---|---|---|---|---|"]
    return "\n".join(lines + [_row(r, dense) for r in results])


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.huge_batch",
        description="Blockwise batch-hard triplet and circle loss at huge batch sizes: "
        "fwd+bwd time and peak RSS per configuration (fresh subprocess each), the dense form "
        "at --compare-batch, and PML under a memory cap.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--losses", nargs="+", default=list(LOSSES), choices=LOSSES, help="losses")
    p.add_argument("--batch", type=int, default=65_536, help="huge batch size (blockwise)")
    p.add_argument(
        "--compare-batch",
        type=int,
        default=4096,
        help="batch size where blockwise and dense are both timed (0: skip)",
    )
    p.add_argument("--dim", type=int, default=128, help="embedding size D")
    p.add_argument("--block-size", type=int, default=1024, help="anchor rows per block")
    p.add_argument("--per-class", type=int, default=4, help="samples per class")
    p.add_argument("--repeats", type=int, default=3, help="timed calls per configuration")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads")
    p.add_argument("--pml", action=argparse.BooleanOptionalAction, default=True, help="run PML too")
    p.add_argument(
        "--pml-cap-gb", type=float, default=20.0, help="PML's address-space cap (RLIMIT_AS)"
    )
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds per configuration")
    p.add_argument("--seed", type=int, default=0, help="seed of the inputs")
    p.add_argument(
        "--out", type=pathlib.Path, default=RESULTS_DIR / "huge_batch.md", help="markdown report"
    )
    p.add_argument("--worker", help=argparse.SUPPRESS)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))), flush=True)
        return 0
    base = dict(dim=args.dim, per_class=args.per_class, seed=args.seed, repeats=args.repeats)
    base.update(threads=args.threads, pml_cap_gb=args.pml_cap_gb)
    configs = []
    for loss in args.losses:
        if args.compare_batch:
            for block in (None, args.block_size):
                configs.append(dict(base, loss=loss, batch=args.compare_batch, side="ours",
                                    block_size=block))  # fmt: skip
        configs.append(dict(base, loss=loss, batch=args.batch, side="ours",
                            block_size=args.block_size))  # fmt: skip
        if args.pml:
            configs.append(dict(base, loss=loss, batch=args.batch, side="pml", block_size=None))
    results = []
    for config in configs:
        results.append(run_config(config, args.timeout))
        print(_row(results[-1], {}), file=sys.stderr, flush=True)
    table = format_table(results)
    print(table)
    command = " ".join(["python -m benchmarks.huge_batch", *(argv or sys.argv[1:])])
    header = [
        "# Huge-batch losses: blockwise fwd+bwd, dense, PML",
        "",
        f"- command: `{command}`",
        f"- {time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime())} UTC; {os.cpu_count()} CPUs; "
        f"float32, D = {args.dim}, {args.per_class} per class; median of {args.repeats} calls "
        "after one untimed call, each configuration in a fresh process; peak RSS = ru_maxrss "
        f"(whole process); PML capped at {args.pml_cap_gb:g} GiB of address space",
        "",
        "",
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(header) + table + "\n")
    args.out.with_suffix(".json").write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
