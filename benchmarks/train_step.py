"""Training throughput of the experiments' LeNet++ step, side by side with a PyTorch twin.

Run ``python -m benchmarks.train_step --help`` for the flags. Default: losses ``xent`` and
``standalone``, batch 128, feature dimension 2, MNIST-shaped random data (28×28×1 in [0, 1],
10 classes).

What one timed step is
----------------------
* **ours**: the driver's own jitted train step, built by the driver's functions as ``python -m
  experiments.mnist`` builds it (``build_model``, ``build_optimizer``, ``initial_state``,
  ``make_train_step``; one device): the batch sliced from the epoch's device-resident batches
  (``epoch_batches``, gathered once per epoch), LeNet++ forward, loss, gradients, SGD (Nesterov
  momentum 0.9, weight decay 5e-4, global-norm clipping 5, warm-up + cosine schedule), the
  centers' α update for center losses, the divergence guard and the batch accuracy. Compiled
  ahead of time (the compile time is reported), the train state is donated as in the driver, and
  each call waits for the step's stats (``jax.block_until_ready``).
* **nnx pool** (``--nnx-pool``): the same step with ``nnx.max_pool`` instead of
  :func:`experiments.models.max_pool_2x2`, to compare the two pooling implementations in one
  run.
* **PyTorch**: the same network in ``torch.nn`` (NCHW), same parameter count (printed for both
  sides), same initial PReLU slope, same optimizer (``clip_grad_norm_`` 5, ``torch.optim.SGD``
  with momentum 0.9, Nesterov, weight decay 5e-4), same loss: cross-entropy of a linear
  classifier for ``xent``; for ``standalone`` intra + 0.1·inter (``mlx_jax``'s
  ``standalone_center_loss``, eps 1e-12) with centers updated by Wen et al.'s α rule
  (α = 0.5) outside autograd. The batch is gathered by ``index_select`` from one tensor of all
  images, and the step computes the batch accuracy and a finiteness check as ours does. Each
  call is synchronous (CPU).

Like the driver's ``main()``, the benchmark first asks glibc to reuse freed memory
(:mod:`experiments.allocator`; ``--default-malloc`` keeps glibc's defaults): process-wide, so
the PyTorch side runs under the same allocator settings.

Timing follows ``benchmarks/losses.py`` (:mod:`benchmarks.timing`): both libraries get the same
``--threads`` cores (the process is pinned before JAX starts; ``torch.set_num_threads``), the
sides run in alternating blocks of ``--block`` steps with a ``--pause`` after each block
(torch's OpenMP threads keep spinning after a call and would steal XLA's cores), ``--settle``
untimed steps open each block. Reported: images/s from the median step time, the p10–p90 range
of step times, CPU seconds of the process per step (all threads; torch's spinning threads count
too) and ``torch/ours`` ratios of images/s. On a busy machine the wall times of both sides
suffer (torch's more, its threads wait for each other at every layer); the CPU column shows the
work done.

Without torch (or with ``--no-torch``) only our columns are produced.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import platform
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from benchmarks.timing import cpu_model, pin_threads, timed_blocks
from experiments.allocator import reuse_freed_memory
from experiments.cpu_devices import use_one_device_per_core

RESULTS_DIR = pathlib.Path(__file__).resolve().parent / "results"
IMAGE_SHAPE = (28, 28, 1)
NUM_CLASSES = 10
STEPS_IN_DATA = 16  # distinct batches in the device-resident data (the step indexes them)

# --------------------------------------------------------------------------------------------
# Our side: the driver's step
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Side:
    """One timed side: a step runner and what the report needs about it."""

    name: str
    run: Callable[[], Any]
    params: int
    compile_s: float | None = None


def _data(batch: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Images [N, 28, 28, 1] in [0, 1], labels [N], and the index table [steps, batch]."""
    rng = np.random.default_rng(seed)
    n = batch * STEPS_IN_DATA
    images = rng.random((n, *IMAGE_SHAPE), dtype=np.float32)
    labels = rng.integers(0, NUM_CLASSES, n).astype(np.int32)
    order = rng.permutation(n).reshape(STEPS_IN_DATA, batch).astype(np.int32)
    return images, labels, order


def ours_side(
    name: str,
    loss: str,
    batch: int,
    feat_dim: int,
    seed: int,
    *,
    nnx_pool: bool = False,
    devices: int = 1,
    conv: str = "xla",
) -> Side:
    """The driver's train step for ``loss``, compiled, data-parallel over ``devices`` CPU
    devices, with LeNet++'s convolutions on ``conv`` ("xla" or "onednn", the driver's
    ``--conv``); ``nnx_pool`` traces it with ``nnx.max_pool`` in LeNet++ instead of
    ``max_pool_2x2``."""
    import jax
    from flax import nnx

    from experiments import driver, models

    cfg = driver.Config(
        dataset="mnist",
        loss=loss,
        feat_dim=feat_dim,
        batch_size=batch,
        seed=seed,
        devices=devices,
        conv=conv,
    ).with_recipe()
    model = driver.build_model(cfg, IMAGE_SHAPE, NUM_CLASSES)
    optimizer = nnx.Optimizer(model, driver.build_optimizer(cfg, STEPS_IN_DATA), wrt=nnx.Param)
    model.train()
    graphdef, graph = nnx.split((model, optimizer))
    params = sum(int(p.size) for p in jax.tree.leaves(nnx.state(model, nnx.Param)))
    state = driver.place_on_devices(cfg, driver.initial_state(graph, cfg.objective))
    host_images, host_labels, order = _data(batch, seed)
    images = driver.epoch_batches(cfg, host_images, order)
    labels = driver.epoch_batches(cfg, host_labels, order)
    step = driver.make_train_step(cfg, graphdef)
    pool = models.max_pool_2x2
    if nnx_pool:
        models.max_pool_2x2 = lambda x: nnx.max_pool(x, (2, 2), (2, 2))
    try:
        start = time.perf_counter()
        compiled = step.lower(state, images, labels, 0).compile()
        compile_s = time.perf_counter() - start
    finally:
        models.max_pool_2x2 = pool
    box = {"state": state, "i": 0}

    def run():
        box["state"], stats = compiled(box["state"], images, labels, box["i"])
        box["i"] = (box["i"] + 1) % STEPS_IN_DATA
        return jax.block_until_ready(stats)

    return Side(name, run, params, compile_s)


# --------------------------------------------------------------------------------------------
# PyTorch twin
# --------------------------------------------------------------------------------------------


def torch_lenet(torch: Any, feat_dim: int, width: int = 32) -> Any:
    """LeNet++ of :mod:`experiments.models` as a ``torch.nn.Module`` (NCHW input)."""
    nn = torch.nn

    class LeNetPlusPlus(nn.Module):
        def __init__(self):
            super().__init__()
            channels = [1, width, width, 2 * width, 2 * width, 4 * width, 4 * width]
            layers: list[nn.Module] = []
            for i, (cin, cout) in enumerate(zip(channels[:-1], channels[1:], strict=True)):
                layers += [nn.Conv2d(cin, cout, 5, padding=2), nn.PReLU(init=0.25)]
                if i % 2 == 1:
                    layers.append(nn.MaxPool2d(2))
            self.features = nn.Sequential(*layers)
            self.embed = nn.Linear(channels[-1] * 3 * 3, feat_dim)
            self.embed_act = nn.PReLU(init=0.25)

        def forward(self, x):
            return self.embed_act(self.embed(self.features(x).flatten(1)))

    return LeNetPlusPlus()


def torch_side(loss: str, batch: int, feat_dim: int, seed: int, torch: Any) -> Side:
    """LeNet++ and the step of ``loss`` in PyTorch (see the module docstring)."""
    nn = torch.nn
    torch.manual_seed(seed)

    net = torch_lenet(torch, feat_dim)
    classifier = nn.Linear(feat_dim, NUM_CLASSES) if loss == "xent" else None
    centers = torch.zeros(NUM_CLASSES, feat_dim)  # CenterStore: zeros, α rule
    params = list(net.parameters()) + ([] if classifier is None else list(classifier.parameters()))
    opt = torch.optim.SGD(params, lr=0.01, momentum=0.9, nesterov=True, weight_decay=5e-4)
    images, labels, order = _data(batch, seed)
    all_images = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))
    all_labels = torch.from_numpy(labels.astype(np.int64))
    index = [torch.from_numpy(row.astype(np.int64)) for row in order]
    box = {"i": 0}

    def loss_and_correct(f, y):
        if classifier is not None:
            logits = classifier(f)
            correct = (logits.argmax(1) == y).sum()
            return nn.functional.cross_entropy(logits, y), correct
        intra = ((f - centers[y]) ** 2).sum(1)
        squared = torch.cdist(f, f).square()
        different = y[:, None] != y[None, :]
        inter = -torch.where(different, torch.log(squared + 1e-12), 0.0).sum(1)
        correct = (torch.cdist(f, centers).argmin(1) == y).sum()
        return (intra + 0.1 * inter).mean(), correct

    def run():
        idx = index[box["i"]]
        box["i"] = (box["i"] + 1) % STEPS_IN_DATA
        x, y = all_images.index_select(0, idx), all_labels.index_select(0, idx)
        opt.zero_grad(set_to_none=True)
        f = net(x)
        value, correct = loss_and_correct(f, y)
        value.backward()
        nn.utils.clip_grad_norm_(params, 5.0)
        opt.step()
        if classifier is None:  # Wen et al.'s α rule, α = 0.5
            with torch.no_grad():
                f = f.detach()
                diff = torch.zeros_like(centers).index_add_(0, y, centers[y] - f)
                counts = torch.zeros(NUM_CLASSES).index_add_(0, y, torch.ones(len(y)))
                centers.sub_(0.5 * diff / (1.0 + counts[:, None]))
        return bool(torch.isfinite(value)), int(correct)

    return Side("PyTorch", run, sum(p.numel() for p in params))


# --------------------------------------------------------------------------------------------
# Running and reporting
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Result:
    loss: str
    side: str
    params: int
    compile_s: float | None
    times: list[float]
    cpu: list[float]
    batch: int

    @property
    def images_per_s(self) -> float:
        return self.batch / float(np.median(self.times))

    def percentile_ms(self, q: float) -> float:
        return float(np.percentile(self.times, q)) * 1e3


def measure(sides: list[Side], args: argparse.Namespace, loss: str) -> list[Result]:
    cpu: dict[str, list[float]] = {s.name: [] for s in sides}

    def with_cpu(side: Side) -> Callable[[], Any]:
        def call():
            start = time.process_time()
            side.run()
            cpu[side.name].append(time.process_time() - start)

        return call

    times = timed_blocks(
        {s.name: with_cpu(s) for s in sides},
        args.repeats,
        args.block,
        args.pause,
        args.warmup,
        args.settle,
    )
    return [
        Result(loss, s.name, s.params, s.compile_s, times[s.name], cpu[s.name], args.batch)
        for s in sides
    ]


def format_table(results: list[Result]) -> str:
    head = [
        "loss",
        "side",
        "images/s",
        "ms/step (median)",
        "p10–p90 ms",
        "CPU ms/step",
        "PyTorch/side",
        "compile s",
        "parameters",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    torch_ips = {r.loss: r.images_per_s for r in results if r.side == "PyTorch"}
    for r in results:
        ratio = torch_ips.get(r.loss)
        cells = [
            r.loss,
            r.side,
            f"{r.images_per_s:.0f}",
            f"{r.percentile_ms(50):.1f}",
            f"{r.percentile_ms(10):.1f}–{r.percentile_ms(90):.1f}",
            f"{float(np.median(r.cpu)) * 1e3:.0f}",
            "–" if ratio is None or r.side == "PyTorch" else f"{ratio / r.images_per_s:.2f}",
            "–" if r.compile_s is None else f"{r.compile_s:.1f}",
            f"{r.params:,}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def markdown_report(meta: dict[str, Any], table: str) -> str:
    return "\n".join(
        [
            "# LeNet++ train step: mlx_jax experiments driver vs PyTorch",
            "",
            f"- command: `{meta['command']}`",
            f"- machine: {meta['machine']}; {meta['threads']} threads for XLA and torch; "
            f"load average before the run {meta['loadavg']}; glibc malloc "
            + (
                "tuned as by the driver (`experiments/allocator.py`)"
                if meta["malloc_tuned"]
                else "defaults"
            ),
            f"- versions: Python {meta['python']}, jax {meta['jax']}, flax {meta['flax']}, "
            f"torch {meta['torch']}",
            f"- {meta['date_utc']} UTC; batch {meta['batch']}, feature dim {meta['feat_dim']}, "
            f"28×28×1 random images, 10 classes, float32; median of {meta['repeats']} steps per "
            f"side in blocks of {meta['block']} with {meta['pause_s']} s pauses, "
            f"{meta['warmup']} warm-up steps per side, {meta['settle']} untimed step(s) "
            "opening each block",
            "- PyTorch/side: PyTorch's images/s over the side's (< 1: the side is faster). "
            "CPU ms/step: CPU time of the process per step, all threads. "
            "See `python -m benchmarks.train_step --help`.",
            "",
            table,
            "",
        ]
    )


DESCRIPTION = """\
Images/s of the experiments' LeNet++ train step (the driver's jitted step) and of the same
network and step in PyTorch, timed in the same process in alternating blocks."""


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    pass


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.train_step",
        description=DESCRIPTION,
        epilog=__doc__.split("What one timed step is", 1)[1].split("\n", 2)[2],
        formatter_class=_HelpFormatter,
    )
    p.add_argument(
        "--losses",
        nargs="+",
        default=["xent", "standalone"],
        choices=["xent", "standalone"],
        help="objectives of the driver (the PyTorch twin implements these two)",
    )
    p.add_argument("--batch", type=int, default=128, help="batch size (seed 001: 128)")
    p.add_argument("--feat-dim", type=int, default=2, help="embedding dimension")
    p.add_argument(
        "--threads", type=int, default=None, help="cores for both libraries (default: all)"
    )
    p.add_argument("--repeats", type=int, default=30, help="timed steps per side")
    p.add_argument("--block", type=int, default=5, help="steps per block before switching side")
    p.add_argument("--pause", type=float, default=0.5, help="seconds of sleep after each block")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per side first")
    p.add_argument("--settle", type=int, default=1, help="untimed steps opening each block")
    p.add_argument("--seed", type=int, default=0, help="data and initialisation seed")
    p.add_argument(
        "--devices",
        type=int,
        nargs="+",
        default=None,
        help="time our step data-parallel over each of these CPU device counts (default: 1 and "
        "one device per --threads core, as the driver runs; experiments/cpu_devices.py)",
    )
    p.add_argument(
        "--convs",
        nargs="+",
        default=None,
        choices=["xla", "onednn"],
        help="LeNet++ convolution kernels to time our step with (the driver's --conv; "
        "default: xla, and onednn where it can run: experiments/onednn_conv.py)",
    )
    p.add_argument("--no-torch", action="store_true", help="time only our step")
    p.add_argument(
        "--nnx-pool",
        action="store_true",
        help="also time our step with nnx.max_pool in LeNet++ (the step before max_pool_2x2)",
    )
    p.add_argument(
        "--default-malloc",
        action="store_true",
        help="keep glibc's malloc defaults (the driver's main() changes them so XLA reuses its "
        "step's scratch memory: experiments/allocator.py)",
    )
    p.add_argument(
        "--out",
        type=pathlib.Path,
        default=RESULTS_DIR / "train_step.md",
        help="markdown report (a .json with every step time is written beside it)",
    )
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = build_parser()
    args = p.parse_args(argv)
    if min(args.batch, args.feat_dim, args.repeats, args.block) < 1:
        p.error("--batch, --feat-dim, --repeats and --block must be >= 1")
    if args.devices is not None and min(args.devices) < 1:
        p.error("--devices must be >= 1")
    if args.devices is not None and any(args.batch % n for n in args.devices):
        p.error(f"--batch ({args.batch}) must be divisible by every --devices count")
    if min(args.warmup, args.settle, args.pause) < 0:
        p.error("--warmup, --settle and --pause must be >= 0")
    try:
        threads = pin_threads(args.threads)  # before JAX creates its CPU client
    except ValueError as error:
        p.error(str(error))
    # as the driver's main() does, before JAX starts; torch's side runs under it too
    malloc_tuned = False if args.default_malloc else reuse_freed_memory()
    # default: one device, and one per core as the driver runs (where that divides the batch)
    default_counts = [n for n in (1, threads) if args.batch % n == 0]
    device_counts = sorted(set(args.devices or default_counts))
    use_one_device_per_core(threads if args.devices is None else max(device_counts))
    import jax

    if args.devices is None:  # JAX may have started earlier in the process with fewer
        device_counts = [n for n in device_counts if n <= jax.local_device_count()]
    elif max(device_counts) > jax.local_device_count():
        p.error(f"--devices: JAX has only {jax.local_device_count()} CPU devices")
    from experiments import onednn_conv

    onednn_missing = onednn_conv.unavailable_reason()
    if args.convs is not None and "onednn" in args.convs and onednn_missing:
        p.error(f"--convs onednn cannot run here: {onednn_missing}")
    convs = args.convs or onednn_conv.runnable_kernels()
    loadavg = " ".join(f"{v:.2f}" for v in os.getloadavg())
    torch = None
    if not args.no_torch:
        try:
            import torch
        except ImportError as error:
            print(f"torch not importable ({error}): timing ours only", file=sys.stderr)
        else:
            torch.set_num_threads(threads)
    import flax
    import jax

    results: list[Result] = []
    for loss in args.losses:
        sides = [
            ours_side(
                ("ours" if n == 1 else f"ours, {n} devices") + f", {conv}",
                loss,
                args.batch,
                args.feat_dim,
                args.seed,
                devices=n,
                conv=conv,
            )
            for conv in convs
            for n in device_counts
        ]
        if args.nnx_pool:
            sides.append(
                ours_side(
                    "ours, nnx.max_pool", loss, args.batch, args.feat_dim, args.seed, nnx_pool=True
                )
            )
        if torch is not None:
            sides.append(torch_side(loss, args.batch, args.feat_dim, args.seed, torch))
        print(
            f"{loss}: parameters " + ", ".join(f"{s.name} {s.params:,}" for s in sides),
            flush=True,
        )
        for r in measure(sides, args, loss):
            results.append(r)
            print(
                f"  {r.side:20s} {r.images_per_s:7.0f} images/s  "
                f"{r.percentile_ms(50):7.1f} ms/step  CPU {np.median(r.cpu) * 1e3:6.0f} ms"
                + ("" if r.compile_s is None else f"  compile {r.compile_s:.1f} s"),
                flush=True,
            )
    meta = {
        "command": " ".join(["python -m benchmarks.train_step", *argv]),
        "date_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
        "machine": f"{cpu_model()}, {os.cpu_count()} CPUs, {platform.platform()}",
        "loadavg": loadavg,
        "threads": threads,
        "malloc_tuned": malloc_tuned,
        "python": platform.python_version(),
        "jax": jax.__version__,
        "flax": flax.__version__,
        "torch": None if torch is None else torch.__version__,
        "devices": device_counts,
        "batch": args.batch,
        "feat_dim": args.feat_dim,
        "repeats": args.repeats,
        "block": args.block,
        "pause_s": args.pause,
        "warmup": args.warmup,
        "settle": args.settle,
    }
    table = format_table(results)
    print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(markdown_report(meta, table))
    rows = [dataclasses.asdict(r) | {"images_per_s": r.images_per_s} for r in results]
    args.out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print(f"wrote {args.out} and {args.out.with_suffix('.json')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
