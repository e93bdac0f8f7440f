"""Forward+backward time and memory of mlx_jax's losses, side by side with
pytorch-metric-learning (PML) in the same process.

Run ``python -m benchmarks.losses --help`` for the flags. Default: every loss at
B ∈ {256, 1024, 4096}, D ∈ {128, 512}, C = 10,000 classes for class heads and centers.

What one timed call is
----------------------
* **ours**: ``jax.jit(value_and_grad(loss))`` compiled ahead of time, called on device-resident
  float32 inputs and waited for with ``jax.block_until_ready``. Gradients are taken w.r.t. the
  embeddings and, for class heads (CosFace, ArcFace, SphereFace) and trained centers
  (standalone, triplet-center), w.r.t. the class weights W [D, C] / centers [C, D]. For
  ``center`` (Wen et al.'s α rule) one call is the loss, its gradient w.r.t. the embeddings and
  the α update of the centers (``mlx_jax.centers.update_centers``, α = 0.5).
* **PML**: float32 tensors with ``requires_grad`` (and PML's ``W`` parameter), the miner when
  the loss has one, the loss, ``loss.backward()`` (synchronous on CPU). Gradients are reset to
  ``None`` before each call.
* **floor**: one jitted forward matmul at default precision: ``x @ x.T`` ([B, D] × [D, B],
  2·B²·D flops) for the pair losses, ``x @ W`` ([B, D] × [D, C]) for the class heads and
  ``x @ centers.T`` for the center losses. A fused fwd+bwd needs at least two such matmuls
  for the pair losses (x·xᵀ and G·x) and three for the class heads (x·W, G·Wᵀ and xᵀ·G), so
  ``ours/floor`` ≈ 2 (pairs) or ≈ 3 (heads) is the matmul bound.
  ``--block-size dense|auto|N`` passes ``block_size`` to the pair losses (default: the losses'
  own default, ``"auto"``: :func:`mlx_jax.blockwise.auto_block_size`).
  ``--class-block-size N`` times the class heads with ``class_block_size=N``
  (:mod:`mlx_jax.losses.class_blocks`: no [B, C] array, one more matmul to recompute each
  block's cosines in the backward pass, so ≈ 4).
  Center loss + α update does no matmul at all (a gather and a segment sum): its floor is only a
  reference at the same operand sizes.

Times are medians over ``--repeats`` calls per side after ``--warmup`` untimed calls. The sides
(ours, floor, PML) run in alternating **blocks** of ``--block`` calls with a ``--pause`` of sleep
after each block — not call by call: torch's OpenMP threads keep spinning for a while after each
call and would steal the cores from XLA's threads. The first call after a pause wakes the
library's sleeping threads and is slower for both libraries, so ``--settle`` untimed calls
(default 1) open every block. The JSON keeps every timed call; a side whose calls spread more
than 3× (p90/p10) is marked †: on a loaded machine torch's OpenMP threads wait for scheduler
ticks and whole blocks of calls slow down, so run the benchmark on an otherwise idle machine.
Compile time (trace + lower + compile of the jitted
step) is reported separately.

Allocator
---------
Like the experiments driver, the benchmark first asks glibc to reuse freed memory
(:mod:`experiments.allocator`; ``--default-malloc`` keeps glibc's defaults), process-wide, so
both libraries run under it. Without it glibc unmaps large freed buffers and the next call
faults them in again, and how often depends on glibc's adaptive mmap threshold, i.e. on what
ran earlier in the process, so the same configuration's time would depend on the configurations
run before it (see BENCHMARKS.md).

Threads
-------
``--threads N`` (default: every CPU this process may run on) gives both libraries the same N
cores: the process (all its threads) is pinned to the first N CPUs with ``os.sched_setaffinity``
before JAX creates its CPU client — XLA sizes its Eigen thread pool from the CPUs in the affinity
mask, and XLA has no flag for it — and ``torch.set_num_threads(N)``. If JAX's backend already
exists (JAX used earlier in the process) its pool keeps its size, but its threads still only run
on the N pinned CPUs; a warning says so.

Memory
------
* **ours MiB (XLA)**: XLA's compiled memory analysis of the step, temporaries + outputs (the
  inputs are not counted); exact buffer sizes, no measurement noise.
* **ours / PML MiB (RSS)** (``--rss``, default on): peak resident memory *above the inputs*
  during one call (the largest of 3 calls), measured in one separate worker process for all
  configurations: the worker runs with glibc's ``MALLOC_MMAP_THRESHOLD_=65536`` (every buffer
  ≥ 64 KiB is its own mapping, returned to the OS on free, so freed memory is not silently
  reused), resets the high-water mark (``/proc/self/clear_refs``) and reports ``VmHWM`` minus
  the ``VmRSS`` before the call. It is a separate process so the allocator setting does not
  change the timings. torch has no CPU allocator statistics, hence RSS for PML; the same method
  is used for ours so the two columns compare. Includes the gradients (outputs) and any library
  workspace; small configurations (buffers < 64 KiB) read ~0.

Configurations whose memory would exceed ``--max-gb`` are skipped with the reason in the table:
ours from XLA's analysis before running anything, PML from a rough formula per loss
(``LossSpec.pml_bytes``; e.g. PML's semi-hard triplet miner builds a B×B×B uint8 tensor for
B³ < 2³¹ and loops over anchors above that).

Without torch or PML (or with ``--no-pml``) only our columns are produced.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import gc
import json
import math
import os
import pathlib
import platform
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.timing import cpu_model, pin_threads, timed_blocks
from experiments.allocator import reuse_freed_memory
from mlx_jax import centers as centers_lib
from mlx_jax import losses as L

RESULTS_DIR = pathlib.Path(__file__).resolve().parent / "results"
REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
DEFAULT_BATCHES = (256, 1024, 4096)
DEFAULT_DIMS = (128, 512)
DEFAULT_CLASSES = (10_000,)
MIB = 1 << 20
# A side whose p90/p10 call time exceeds this is marked † in the table: on a loaded machine
# torch's timings turn bimodal (fast blocks and blocks many times slower).
NOISY_SPREAD = 3.0
NOISY_NOTE = (
    "† the timed calls of that side spread more than 3× (p90/p10): the machine was probably "
    "busy; the per-call times are in the JSON"
)
GIB = 1 << 30

# --------------------------------------------------------------------------------------------
# Hyperparameters shared by both sides (chosen once, passed explicitly to both)
# --------------------------------------------------------------------------------------------
TRIPLET_MARGIN = 0.2
CIRCLE_M, CIRCLE_GAMMA = 0.4, 80.0  # PML's CircleLoss defaults
ARCFACE_MARGIN_RAD, ARCFACE_SCALE = 0.5, 64.0
COSFACE_MARGIN, COSFACE_SCALE = 0.35, 64.0
SPHEREFACE_MARGIN = 4
CENTER_ALPHA = 0.5


# --------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Problem:
    """One benchmark input, float32 NumPy, identical for both libraries.

    ``params`` is W [D, C·K] for class heads (K columns per class), the centers [C, D] for center
    losses, None for pair losses; ``paired`` is the second view [B, D] of two-view losses.
    """

    x: np.ndarray
    labels: np.ndarray
    params: np.ndarray | None
    paired: np.ndarray | None = None


def make_problem(
    kind: str,
    batch: int,
    dim: int,
    classes: int | None,
    per_class: int,
    seed: int,
    columns_per_class: int = 1,
) -> Problem:
    """Clustered embeddings: ``per_class`` samples per class (the last class may be smaller),
    x = 0.6·μ_y + 0.4·noise with μ, noise ~ N(0, I/D), so distances are O(1): margins are
    violated by some pairs/triplets and not by others, as in training.

    Class weights W (heads, [D, C]) and centers ([C, D]) are N(0, I/D), the batch classes'
    ones half aligned with their μ (0.5·μ + 0.5·noise): the target cosine is ≈ 0.6, so margin
    losses are O(1) as mid-training. (With W = μ every sample is classified with a huge margin,
    the loss is ~1e-5 and float32 cannot compute it to 1e-4 on either side.) The batch's classes
    are a random subset of the C classes (or wrap around when B / per_class > C). Heads with
    K > 1 columns per class (sub-centers) get K perturbed copies of each class's column.
    Two-view losses get a second view 0.8·x + 0.2·noise of the same scale.
    """
    rng = np.random.default_rng(seed)
    n_local = -(-batch // per_class)
    local = rng.permutation(np.arange(batch) // per_class)
    scale = np.float32(1.0 / math.sqrt(dim))
    means = rng.standard_normal((n_local, dim), dtype=np.float32) * scale
    noise = rng.standard_normal((batch, dim), dtype=np.float32) * scale
    x = (0.6 * means[local] + 0.4 * noise).astype(np.float32)
    if kind == "pair":
        return Problem(x, local.astype(np.int32), None)
    if kind in ("views", "view_stats"):
        noise = rng.standard_normal((batch, dim), dtype=np.float32) * scale
        paired = (0.8 * x + 0.2 * noise).astype(np.float32)
        return Problem(x, local.astype(np.int32), None, paired)
    assert classes is not None
    if n_local <= classes:
        ids = rng.choice(classes, size=n_local, replace=False)
    else:
        ids = np.arange(n_local) % classes
    labels = ids[local].astype(np.int32)
    params = rng.standard_normal((classes, dim), dtype=np.float32) * scale
    params[ids] = 0.5 * means + 0.5 * params[ids]
    if kind == "head":
        if columns_per_class > 1:  # class-major: column c·K + k
            copies = np.repeat(params, columns_per_class, axis=0)
            noise = rng.standard_normal(copies.shape, dtype=np.float32) * scale
            params = (0.8 * copies + 0.2 * noise).astype(np.float32)
        params = np.ascontiguousarray(params.T)  # W [D, C·K]
    return Problem(x, labels, params)


# --------------------------------------------------------------------------------------------
# Our side: jitted steps

BlockSizeArg = int | str | None  # --block-size: None (the losses' default), "dense", "auto", N


def _block_size_arg(text: str) -> int | str:
    if text in ("dense", "auto"):
        return text
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected 'dense', 'auto' or an int >= 1, got {text!r}")
    return value


def block_size_options(block_size: BlockSizeArg) -> dict[str, Any]:
    """The ``block_size`` keyword for a pair loss: none (the losses' default, ``"auto"``) for None,
    ``block_size=None`` (dense) for ``"dense"``, else the value as given."""
    if block_size is None:
        return {}
    return {"block_size": None if block_size == "dense" else block_size}


# --------------------------------------------------------------------------------------------


def _pair_step(loss: Callable[..., jax.Array]) -> Callable[..., Any]:
    def step(x: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
        return jax.value_and_grad(lambda e: loss(e, labels))(x)

    return step


def _views_step(loss: Callable[..., jax.Array]) -> Callable[..., Any]:
    """Loss and gradients w.r.t. both views (two-view losses have no labels)."""

    def step(x: jax.Array, paired: jax.Array) -> tuple[jax.Array, Any]:
        return jax.value_and_grad(loss, argnums=(0, 1))(x, paired)

    return step


def param_step(loss: Callable[..., jax.Array]) -> Callable[..., Any]:
    """Loss and gradients w.r.t. (embeddings, W or centers)."""

    def step(x: jax.Array, params: jax.Array, labels: jax.Array):
        return jax.value_and_grad(lambda e, p: loss(e, labels, p), argnums=(0, 1))(x, params)

    return step


def _center_alpha_step(x: jax.Array, centers: jax.Array, labels: jax.Array):
    """Center loss, its gradient w.r.t. the embeddings, and the α update of the centers."""
    value, grad = jax.value_and_grad(lambda e: L.center_loss(e, labels, centers))(x)
    return value, grad, centers_lib.update_centers(centers, x, labels, CENTER_ALPHA)


# --------------------------------------------------------------------------------------------
# PML side
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Torch:
    """torch and the PML modules, imported lazily (both are optional)."""

    torch: Any
    losses: Any
    miners: Any
    distances: Any
    reducers: Any
    version: str
    pml_version: str


def load_pml() -> tuple[Torch | None, str]:
    """(modules, "") or (None, why not)."""
    try:
        import pytorch_metric_learning as pml
        import torch
        from pytorch_metric_learning import distances, losses, miners, reducers
    except ImportError as error:
        return None, f"torch/pytorch-metric-learning not importable ({error})"
    return Torch(torch, losses, miners, distances, reducers, torch.__version__, pml.__version__), ""


PmlCall = Callable[[], Any]


def _pml_pair(make_loss, make_miner=None) -> Callable[[Problem, Torch], PmlCall]:
    def build(problem: Problem, t: Torch) -> PmlCall:
        emb = t.torch.tensor(problem.x, requires_grad=True)
        labels = t.torch.from_numpy(problem.labels.astype(np.int64))
        loss_fn = make_loss(t)
        miner = make_miner(t) if make_miner is not None else None

        def call():
            emb.grad = None
            if miner is None:
                loss = loss_fn(emb, labels)
            else:
                loss = loss_fn(emb, labels, miner(emb, labels))
            loss.backward()
            return loss

        return call

    return build


def _pml_head(
    loss_class: str,
    *,
    param: str = "W",
    transpose: bool = False,
    columns_per_class: int = 1,
    reducer: str | None = "MeanReducer",
    **options: float,
) -> Callable[[Problem, Torch], PmlCall]:
    """PML's ``losses.<loss_class>`` (with ``reducer``, None: PML's default), its parameter
    ``param`` copied from our W [D, C·K] (transposed to [C, D] for PML's proxies)."""

    def build(problem: Problem, t: Torch) -> PmlCall:
        assert problem.params is not None
        dim, columns = problem.params.shape
        extra = {} if reducer is None else {"reducer": getattr(t.reducers, reducer)()}
        with warnings.catch_warnings():  # PML's SphereFace init trips a NumPy 2 deprecation
            warnings.simplefilter("ignore", DeprecationWarning)
            loss_fn = getattr(t.losses, loss_class)(
                num_classes=columns // columns_per_class,
                embedding_size=dim,
                **extra,
                **options,
            )
        weights = getattr(loss_fn, param)
        values = problem.params.T if transpose else problem.params
        weights.data = t.torch.from_numpy(np.ascontiguousarray(values))
        emb = t.torch.tensor(problem.x, requires_grad=True)
        labels = t.torch.from_numpy(problem.labels.astype(np.int64))

        def call():
            emb.grad = None
            weights.grad = None
            loss = loss_fn(emb, labels)
            loss.backward()
            return loss

        return call

    return build


def _pml_views(make_loss) -> Callable[[Problem, Torch], PmlCall]:
    """PML's two-view loss ``loss(emb, ref_emb=...)``, gradients w.r.t. both views."""

    def build(problem: Problem, t: Torch) -> PmlCall:
        emb = t.torch.tensor(problem.x, requires_grad=True)
        ref = t.torch.tensor(problem.paired, requires_grad=True)
        loss_fn = make_loss(t)

        def call():
            emb.grad = ref.grad = None
            loss = loss_fn(emb, ref_emb=ref)
            loss.backward()
            return loss

        return call

    return build


def _lp(t: Torch):
    return t.distances.LpDistance(normalize_embeddings=False)


# Rough upper estimates of PML's peak memory in bytes (batch, dim, classes) → bytes, read off
# its code (PML 2.9): the guard for --max-gb, not a measurement (that is the RSS column).
def _pml_pairs_bytes(batch: int) -> float:
    # B×B distances, uint8 masks, int64 index pairs for all B² negatives (16 B/pair), gathered
    # distances, losses and their gradients.
    return 45.0 * batch * batch


def _pml_semihard_bytes(batch: int, per_class: int) -> float:
    triplets = batch * (per_class - 1) * (batch - per_class)
    cube = batch**3 if batch**3 < 2**31 - 1 else 0  # vectorized miner: a B×B×B uint8 tensor
    return cube + 100.0 * triplets + 30.0 * batch * batch


def _pml_pos_neg_bytes(batch: int, per_class: int) -> float:
    # GenericPairLoss subclasses that compare every positive pair with every negative pair
    # (NT-Xent, lifted structure, tuplet margin) build [P, N] float and bool tensors:
    # P = B·(k − 1) positive and N = B·(B − k) negative pairs, ~12 bytes per entry.
    return 12.0 * batch * (per_class - 1) * batch * (batch - per_class)


def _pml_head_bytes(batch: int, dim: int, classes: int, per_class: int) -> float:
    # ~12 float32 [B, C] tensors (cosines, float mask, logits, softmax, their gradients) + W grad.
    return 48.0 * batch * classes + 8.0 * dim * classes


# --------------------------------------------------------------------------------------------
# The losses
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LossSpec:
    """One benchmarked loss: our step, PML's equivalent (None: ours only) and its floor."""

    name: str
    # "pair" (labels only), "head" (W [D, C·K]), "center" (centers [C, D]), "views" and
    # "view_stats" (two views [B, D], no labels; the second kind works on batch statistics)
    kind: str
    ours: str  # how ours is called (for the report)
    step: Callable[..., Any] | None = None  # center losses; pair losses and heads derive theirs
    pml: str | None = None
    pml_build: Callable[[Problem, Torch], PmlCall] | None = None
    pml_bytes: Callable[[int, int, int, int], float] | None = None  # (B, D, C, per_class)
    head_loss: Callable[..., jax.Array] | None = None  # class heads: loss(x, y, W, **options)
    pair_loss: Callable[..., jax.Array] | None = None  # pair losses: loss(x, y, **options)
    view_loss: Callable[..., jax.Array] | None = None  # two-view losses: loss(x, x2, **options)
    columns_per_class: int = 1  # heads: K columns of W per class (class-major)
    unit_inputs: bool = (
        False  # both sides get L2-normalized embeddings (where PML's math differs off the sphere)
    )
    class_blocks: bool = True  # heads: takes class_block_size=

    def step_for(
        self, class_block_size: int | None, block_size: BlockSizeArg = None
    ) -> Callable[..., Any]:
        """Our step; class heads with ``class_block_size`` visit the classes in blocks, pair
        losses get ``block_size`` (see :func:`block_size_options`)."""
        if self.pair_loss is not None:
            return _pair_step(functools.partial(self.pair_loss, **block_size_options(block_size)))
        if self.view_loss is not None:
            options = {} if self.kind == "view_stats" else block_size_options(block_size)
            return _views_step(functools.partial(self.view_loss, **options))
        if self.head_loss is not None:
            options = {"class_block_size": class_block_size} if self.class_blocks else {}
            return param_step(functools.partial(self.head_loss, **options))
        assert self.step is not None, f"{self.name}: give step, pair_loss or head_loss"
        return self.step

    @property
    def floor(self) -> str:
        return {
            "pair": "x @ x.T",
            "head": "x @ W",
            "center": "x @ centers.T",
            "views": "x @ y.T",
            "view_stats": "x.T @ y",
        }[self.kind]


def _cosface(x, y, w, **options):
    return L.cosface_loss(x, y, w, scale=COSFACE_SCALE, margin=COSFACE_MARGIN, **options)


def _arcface(x, y, w, **options):
    return L.arcface_loss(
        x, y, w, scale=ARCFACE_SCALE, margin=ARCFACE_MARGIN_RAD, boundary="monotonic", **options
    )


def _sphereface(x, y, w, **options):
    return L.sphereface_loss(
        x, y, w, margin=SPHEREFACE_MARGIN, annealing_lambda=0.0, scale=None, **options
    )


def _contrastive(x, y, **options):
    return L.contrastive_loss(
        x,
        y,
        squared=False,
        pos_margin=0.0,
        neg_margin=1.0,
        balance="pos_neg",
        reduction="mean_nonzero",
        **options,
    )


def _triplet(mining: str):
    def loss(x, y, **options):
        return L.triplet_loss(
            x,
            y,
            margin=TRIPLET_MARGIN,
            mining=mining,
            squared=False,
            reduction="mean_nonzero",
            **options,
        )

    return loss


def _circle(x, y, **options):
    return L.circle_loss(x, y, m=CIRCLE_M, gamma=CIRCLE_GAMMA, reduction="mean_nonzero", **options)


def _pml_reduced(loss_class: str, reducer: str | None = None, **options: Any):
    """PML pair loss ``loss_class(**options)`` with ``reducer`` (None: its default), on
    unnormalized Euclidean distances where the loss takes a distance."""

    def make(t: Torch):
        extra = {} if reducer is None else {"reducer": getattr(t.reducers, reducer)()}
        return getattr(t.losses, loss_class)(**extra, **options)

    return make


def _pml_lp(loss_class: str, reducer: str | None = None, **options: Any):
    def make(t: Torch):
        return _pml_reduced(loss_class, reducer, distance=_lp(t), **options)(t)

    return make


def _pair_spec(
    name: str, ours: str, loss: Callable[..., jax.Array], pml: str | None, make_pml=None, **kw
) -> LossSpec:
    """A pair loss; PML's side (if any) built by ``make_pml(t)`` with the same B² estimate."""
    return LossSpec(
        name=name,
        kind="pair",
        ours=ours,
        pair_loss=loss,
        pml=pml,
        pml_build=None if make_pml is None else _pml_pair(make_pml, kw.pop("make_miner", None)),
        pml_bytes=None
        if make_pml is None
        else kw.pop("pml_bytes", lambda b, d, c, k: _pml_pairs_bytes(b)),
        **kw,
    )


MARGIN_BETA = 1.2  # Wu et al. 2017's initial β, PML's default


BREADTH_SPECS: tuple[LossSpec, ...] = (
    _pair_spec(
        "multi_similarity",
        "multi_similarity_loss(mining='multi_similarity')",
        lambda x, y, **o: L.multi_similarity_loss(x, y, mining="multi_similarity", **o),
        "MultiSimilarityLoss() + MultiSimilarityMiner()",
        _pml_reduced("MultiSimilarityLoss"),
        make_miner=lambda t: t.miners.MultiSimilarityMiner(),
    ),
    _pair_spec(
        "ntxent",
        "ntxent_loss(reduction='mean_nonzero')",
        lambda x, y, **o: L.ntxent_loss(x, y, reduction="mean_nonzero", **o),
        "NTXentLoss()",
        _pml_reduced("NTXentLoss"),
        pml_bytes=lambda b, d, c, k: _pml_pos_neg_bytes(b, k),
    ),
    _pair_spec(
        "supcon",
        "supcon_loss()",
        L.supcon_loss,
        "SupConLoss()",
        _pml_reduced("SupConLoss"),
    ),
    _pair_spec(
        "lifted_structure",
        "lifted_structure_loss()",
        L.lifted_structure_loss,
        "LiftedStructureLoss(), LpDistance(normalize=False)",
        _pml_lp("LiftedStructureLoss"),
        pml_bytes=lambda b, d, c, k: _pml_pos_neg_bytes(b, k),
    ),
    _pair_spec(
        "generalized_lifted_structure",
        "generalized_lifted_structure_loss()",
        L.generalized_lifted_structure_loss,
        "GeneralizedLiftedStructureLoss(), LpDistance(normalize=False)",
        _pml_lp("GeneralizedLiftedStructureLoss"),
    ),
    _pair_spec(
        "margin",
        f"margin_loss(β = {MARGIN_BETA}, reduction='mean_nonzero')",
        lambda x, y, **o: L.margin_loss(
            x, y, jnp.float32(MARGIN_BETA), reduction="mean_nonzero", **o
        ),
        "MarginLoss()",
        _pml_reduced("MarginLoss"),
        pml_bytes=lambda b, d, c, k: _pml_semihard_bytes(b, k),
    ),
    _pair_spec(
        "tuplet_margin",
        "tuplet_margin_loss()",
        L.tuplet_margin_loss,
        "TupletMarginLoss(), MeanReducer",
        _pml_reduced("TupletMarginLoss", "MeanReducer"),
        pml_bytes=lambda b, d, c, k: _pml_pos_neg_bytes(b, k),
    ),
    _pair_spec(
        "npairs",
        "npairs_loss()",
        L.npairs_loss,
        "NPairsLoss()",
        _pml_reduced("NPairsLoss"),
    ),
    _pair_spec(
        "angular",
        "angular_loss()",
        L.angular_loss,
        "AngularLoss() (unit inputs: PML leaves negatives unnormalized)",
        _pml_reduced("AngularLoss"),
        unit_inputs=True,
        pml_bytes=lambda b, d, c, k: _pml_semihard_bytes(b, k),
    ),
    _pair_spec(
        "fast_ap",
        "fast_ap_loss()",
        L.fast_ap_loss,
        "FastAPLoss()",
        _pml_reduced("FastAPLoss"),
        pml_bytes=lambda b, d, c, k: 30.0 * _pml_pairs_bytes(b),  # B×B×bins tensors
    ),
    LossSpec(
        name="clip",
        kind="views",
        ours="clip_loss()",
        view_loss=L.clip_loss,
    ),
    LossSpec(
        name="siglip",
        kind="views",
        ours="siglip_loss()",
        view_loss=L.siglip_loss,
    ),
    LossSpec(
        name="vicreg",
        kind="view_stats",
        ours="vicreg_loss(variance_weight=12.5) (PML halves the variance term)",
        view_loss=lambda a, b: L.vicreg_loss(a, b, variance_weight=12.5),
        pml="VICRegLoss()",
        pml_build=_pml_views(lambda t: t.losses.VICRegLoss()),
        pml_bytes=lambda b, d, c, k: 40.0 * (b * d + d * d),
    ),
    LossSpec(
        name="barlow_twins",
        kind="view_stats",
        ours="barlow_twins_loss()",
        view_loss=L.barlow_twins_loss,
    ),
    LossSpec(
        name="proxy_anchor",
        kind="head",
        ours="proxy_anchor_loss()",
        head_loss=L.proxy_anchor_loss,
        class_blocks=False,
        pml="ProxyAnchorLoss() (proxies [C, D])",
        pml_build=_pml_head("ProxyAnchorLoss", param="proxies", transpose=True, reducer=None),
        pml_bytes=_pml_head_bytes,
    ),
    LossSpec(
        name="proxy_nca",
        kind="head",
        ours="proxy_nca_loss()",
        head_loss=L.proxy_nca_loss,
        pml="ProxyNCALoss() (proxies [C, D])",
        pml_build=_pml_head("ProxyNCALoss", param="proxies", transpose=True, reducer=None),
        pml_bytes=_pml_head_bytes,
    ),
    LossSpec(
        name="normalized_softmax",
        kind="head",
        ours="normalized_softmax_loss()",
        head_loss=L.normalized_softmax_loss,
        pml="NormalizedSoftmaxLoss()",
        pml_build=_pml_head("NormalizedSoftmaxLoss", reducer=None),
        pml_bytes=_pml_head_bytes,
    ),
    LossSpec(
        name="large_margin_softmax",
        kind="head",
        ours="large_margin_softmax_loss()",
        head_loss=L.large_margin_softmax_loss,
        pml="LargeMarginSoftmaxLoss(), MeanReducer",
        pml_build=_pml_head("LargeMarginSoftmaxLoss"),
        pml_bytes=_pml_head_bytes,
    ),
    LossSpec(
        name="sub_center_arcface",
        kind="head",
        ours="sub_center_arcface_loss(sub_centers=3)",
        head_loss=L.sub_center_arcface_loss,
        columns_per_class=3,
        pml="SubCenterArcFaceLoss(margin=28.6479 degrees), MeanReducer",
        pml_build=_pml_head(
            "SubCenterArcFaceLoss", columns_per_class=3, margin=math.degrees(0.5), scale=64.0
        ),
        pml_bytes=lambda b, d, c, k: _pml_head_bytes(b, d, 3 * c, k),
    ),
    LossSpec(
        name="soft_triple",
        kind="head",
        ours="soft_triple_loss(centers_per_class=10, tau=0) (PML's default has no regularizer)",
        head_loss=functools.partial(L.soft_triple_loss, centers_per_class=10, tau=0.0),
        columns_per_class=10,
        pml="SoftTripleLoss() (fc [D, C·10])",
        pml_build=_pml_head("SoftTripleLoss", param="fc", columns_per_class=10, reducer=None),
        pml_bytes=lambda b, d, c, k: _pml_head_bytes(b, d, 10 * c, k),
    ),
)


SPECS: tuple[LossSpec, ...] = (
    LossSpec(
        name="contrastive",
        kind="pair",
        ours="contrastive_loss(squared=False, pos_margin=0, neg_margin=1, balance='pos_neg', "
        "reduction='mean_nonzero')",
        pair_loss=_contrastive,
        pml="ContrastiveLoss(pos_margin=0, neg_margin=1, distance=LpDistance(normalize=False))",
        pml_build=_pml_pair(
            lambda t: t.losses.ContrastiveLoss(pos_margin=0.0, neg_margin=1.0, distance=_lp(t))
        ),
        pml_bytes=lambda b, d, c, k: _pml_pairs_bytes(b),
    ),
    LossSpec(
        name="triplet_batch_hard",
        kind="pair",
        ours=f"triplet_loss(margin={TRIPLET_MARGIN}, mining='batch_hard', squared=False, "
        "reduction='mean_nonzero')",
        pair_loss=_triplet("batch_hard"),
        pml=f"TripletMarginLoss(margin={TRIPLET_MARGIN}) + BatchHardMiner, "
        "LpDistance(normalize=False)",
        pml_build=_pml_pair(
            lambda t: t.losses.TripletMarginLoss(margin=TRIPLET_MARGIN, distance=_lp(t)),
            lambda t: t.miners.BatchHardMiner(distance=_lp(t)),
        ),
        pml_bytes=lambda b, d, c, k: _pml_pairs_bytes(b),
    ),
    LossSpec(
        name="triplet_semihard_band",
        kind="pair",
        ours=f"triplet_loss(margin={TRIPLET_MARGIN}, mining='semihard_band', squared=False, "
        "reduction='mean_nonzero')",
        pair_loss=_triplet("semihard_band"),
        pml=f"TripletMarginLoss(margin={TRIPLET_MARGIN}) + TripletMarginMiner(margin="
        f"{TRIPLET_MARGIN}, type_of_triplets='semihard'), LpDistance(normalize=False)",
        pml_build=_pml_pair(
            lambda t: t.losses.TripletMarginLoss(margin=TRIPLET_MARGIN, distance=_lp(t)),
            lambda t: t.miners.TripletMarginMiner(
                margin=TRIPLET_MARGIN, type_of_triplets="semihard", distance=_lp(t)
            ),
        ),
        pml_bytes=lambda b, d, c, k: _pml_semihard_bytes(b, k),
    ),
    LossSpec(
        name="circle",
        kind="pair",
        ours=f"circle_loss(m={CIRCLE_M}, gamma={CIRCLE_GAMMA:g}, reduction='mean_nonzero')",
        pair_loss=_circle,
        pml=f"CircleLoss(m={CIRCLE_M}, gamma={CIRCLE_GAMMA:g})",
        pml_build=_pml_pair(lambda t: t.losses.CircleLoss(m=CIRCLE_M, gamma=CIRCLE_GAMMA)),
        pml_bytes=lambda b, d, c, k: 2.0 * _pml_pairs_bytes(b),
    ),
    LossSpec(
        name="cosface",
        kind="head",
        ours=f"cosface_loss(scale={COSFACE_SCALE:g}, margin={COSFACE_MARGIN})",
        head_loss=_cosface,
        pml=f"CosFaceLoss(margin={COSFACE_MARGIN}, scale={COSFACE_SCALE:g}, MeanReducer)",
        pml_build=_pml_head("CosFaceLoss", margin=COSFACE_MARGIN, scale=COSFACE_SCALE),
        pml_bytes=_pml_head_bytes,
    ),
    LossSpec(
        name="arcface",
        kind="head",
        ours=f"arcface_loss(scale={ARCFACE_SCALE:g}, margin={ARCFACE_MARGIN_RAD} rad)",
        head_loss=_arcface,
        pml=f"ArcFaceLoss(margin={math.degrees(ARCFACE_MARGIN_RAD):.4f} degrees, "
        f"scale={ARCFACE_SCALE:g}, MeanReducer)",
        pml_build=_pml_head(
            "ArcFaceLoss", margin=math.degrees(ARCFACE_MARGIN_RAD), scale=ARCFACE_SCALE
        ),
        pml_bytes=_pml_head_bytes,
    ),
    LossSpec(
        name="sphereface",
        kind="head",
        ours=f"sphereface_loss(margin={SPHEREFACE_MARGIN}, annealing_lambda=0, scale=None)",
        head_loss=_sphereface,
        pml=f"SphereFaceLoss(margin={SPHEREFACE_MARGIN}, scale=1, MeanReducer)",
        pml_build=_pml_head("SphereFaceLoss", margin=SPHEREFACE_MARGIN, scale=1),
        pml_bytes=_pml_head_bytes,
    ),
    LossSpec(
        name="center",
        kind="center",
        ours=f"center_loss, grad w.r.t. x, update_centers(alpha={CENTER_ALPHA})",
        step=_center_alpha_step,
    ),
    LossSpec(
        name="standalone_center",
        kind="center",
        ours="standalone_center_loss(), grads w.r.t. x and centers",
        step=param_step(lambda x, y, c: L.standalone_center_loss(x, y, c)),
    ),
    LossSpec(
        name="triplet_center",
        kind="center",
        ours="triplet_center_loss() (default margin), grads w.r.t. x and centers",
        step=param_step(lambda x, y, c: L.triplet_center_loss(x, y, c)),
    ),
)
SPECS = SPECS + BREADTH_SPECS
LOSS_GROUPS = {"breadth": tuple(s.name for s in BREADTH_SPECS)}  # --losses shorthands


def expand_losses(names: Sequence[str]) -> list[str]:
    """``--losses`` with each group name (``LOSS_GROUPS``) replaced by its losses, in order."""
    return [n for name in names for n in LOSS_GROUPS.get(name, (name,))]


SPEC_BY_NAME = {spec.name: spec for spec in SPECS}


# --------------------------------------------------------------------------------------------
# Compiling and timing
# --------------------------------------------------------------------------------------------


def device_args(spec: LossSpec, problem: Problem) -> tuple[jax.Array, ...]:
    x = jnp.asarray(problem.x)
    labels = jnp.asarray(problem.labels)
    if spec.kind == "pair":
        return (x, labels)
    if spec.kind in ("views", "view_stats"):
        return (x, jnp.asarray(problem.paired))
    return (x, jnp.asarray(problem.params), labels)


def _floor_fn(kind: str) -> Callable[..., jax.Array]:
    if kind == "pair":
        return lambda x: x @ x.T
    if kind == "head":
        return lambda x, w: x @ w
    if kind == "views":
        return lambda x, y: x @ y.T
    if kind == "view_stats":
        return lambda x, y: x.T @ y
    return lambda x, c: x @ c.T


@dataclasses.dataclass
class Compiled:
    """Our compiled step with its inputs, compile time and XLA's memory analysis."""

    run: Callable[[], Any]
    compile_s: float
    memory: dict[str, int]

    @property
    def needed_bytes(self) -> int:
        """Arguments + outputs + temporaries: what one call holds at most."""
        m = self.memory
        return m.get("argument", 0) + m.get("output", 0) + m.get("temp", 0) - m.get("alias", 0)

    @property
    def work_bytes(self) -> int:
        """Outputs + temporaries (the inputs not counted), comparable to the RSS column."""
        return self.memory.get("output", 0) + self.memory.get("temp", 0)


def _memory_dict(compiled: Any) -> dict[str, int]:
    try:
        stats = compiled.memory_analysis()
    except Exception:  # not every backend or version implements it
        return {}
    if stats is None:
        return {}
    out = {}
    for key in ("argument", "output", "temp", "alias", "generated_code"):
        value = getattr(stats, f"{key}_size_in_bytes", None)
        if value is not None:
            out[key] = int(value)
    peak = getattr(stats, "peak_memory_in_bytes", None)
    if peak:
        out["peak"] = int(peak)
    return out


def compile_step(fn: Callable[..., Any], args: Sequence[jax.Array]) -> Compiled:
    """jit + lower + compile ahead of time (the compile time), then a runner that blocks."""
    start = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    compile_s = time.perf_counter() - start

    def run():
        return jax.block_until_ready(compiled(*args))

    return Compiled(run, compile_s, _memory_dict(compiled))


# --------------------------------------------------------------------------------------------
# One configuration
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Row:
    """Results for one (loss, B, D, C). Times in ms (medians), memory in bytes."""

    loss: str
    batch: int
    dim: int
    classes: int | None
    floor: str
    ours_status: str = "ok"
    ours_ms: float | None = None
    ours_compile_s: float | None = None
    ours_xla_bytes: int | None = None
    ours_xla_memory: dict[str, int] = dataclasses.field(default_factory=dict)
    floor_ms: float | None = None
    pml_status: str = "absent"
    pml_ms: float | None = None
    ours_loss: float | None = None
    pml_loss: float | None = None
    ours_rss_bytes: int | None = None
    pml_rss_bytes: int | None = None
    ours_times_ms: list[float] = dataclasses.field(default_factory=list)
    floor_times_ms: list[float] = dataclasses.field(default_factory=list)
    pml_times_ms: list[float] = dataclasses.field(default_factory=list)

    @property
    def pml_over_ours(self) -> float | None:
        if self.pml_ms is None or not self.ours_ms:
            return None
        return self.pml_ms / self.ours_ms

    @property
    def ours_over_floor(self) -> float | None:
        if self.ours_ms is None or not self.floor_ms:
            return None
        return self.ours_ms / self.floor_ms

    @property
    def loss_rel_diff(self) -> float | None:
        if self.ours_loss is None or self.pml_loss is None:
            return None
        return abs(self.ours_loss - self.pml_loss) / max(abs(self.pml_loss), 1e-30)

    def spread(self, side: str) -> float | None:
        """p90 / p10 of a side's timed calls ("ours", "floor" or "pml"); None without calls."""
        times = getattr(self, f"{side}_times_ms")
        if not times:
            return None
        low, high = np.quantile(times, [0.1, 0.9])
        return float(high / low) if low > 0 else math.inf

    def noisy(self, side: str) -> bool:
        spread = self.spread(side)
        return spread is not None and spread > NOISY_SPREAD

    def to_json(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["pml_over_ours"] = self.pml_over_ours
        out["ours_over_floor"] = self.ours_over_floor
        out["loss_rel_diff"] = self.loss_rel_diff
        for side in ("ours", "floor", "pml"):
            out[f"{side}_spread"] = self.spread(side)
        return out


def _median_ms(times: list[float]) -> float:
    return 1e3 * statistics.median(times)


def spec_problem(
    spec: LossSpec, batch: int, dim: int, classes: int | None, per_class: int, seed: int
) -> Problem:
    """The inputs of ``spec`` (:func:`make_problem`, unit rows where ``spec.unit_inputs``)."""
    problem = make_problem(spec.kind, batch, dim, classes, per_class, seed, spec.columns_per_class)
    if not spec.unit_inputs:
        return problem
    unit = problem.x / np.linalg.norm(problem.x, axis=1, keepdims=True)
    return dataclasses.replace(problem, x=unit.astype(np.float32))


def bench_one(
    spec: LossSpec,
    batch: int,
    dim: int,
    classes: int | None,
    args: argparse.Namespace,
    t: Torch | None,
    pml_reason: str,
) -> Row:
    """Compiles, checks the memory guard, and times ours, the floor and PML in blocks."""
    row = Row(spec.name, batch, dim, classes, spec.floor)
    problem = spec_problem(spec, batch, dim, classes, args.per_class, args.seed)
    limit = args.max_gb * GIB
    arrays = device_args(spec, problem)
    ours = compile_step(spec.step_for(args.class_block_size, args.block_size), arrays)
    row.ours_compile_s = ours.compile_s
    row.ours_xla_memory = ours.memory
    row.ours_xla_bytes = ours.work_bytes if ours.memory else None
    sides: dict[str, Callable[[], Any]] = {}
    if ours.memory and ours.needed_bytes > limit:
        row.ours_status = f"skipped: XLA needs {ours.needed_bytes / GIB:.1f} GiB > --max-gb"
    else:
        sides["ours"] = ours.run
        row.ours_loss = float(ours.run()[0])
    floor_args = arrays[:1] if spec.kind == "pair" else arrays[:2]
    floor = compile_step(_floor_fn(spec.kind), floor_args)
    if floor.needed_bytes <= limit:
        sides["floor"] = floor.run

    if spec.pml_build is None:
        row.pml_status = "no PML equivalent"
    elif t is None:
        row.pml_status = pml_reason
    else:
        assert spec.pml_bytes is not None
        estimate = spec.pml_bytes(batch, dim, classes or 0, args.per_class)
        if estimate > limit:
            row.pml_status = f"skipped: estimated {estimate / GIB:.1f} GiB > --max-gb"
        else:
            call = spec.pml_build(problem, t)
            start = time.perf_counter()
            row.pml_loss = float(call().detach())
            first_s = time.perf_counter() - start
            row.pml_status = "ok"
            if first_s > args.slow_call_s:
                # Minutes per call at B = 1024 for PML's per-pair Python loops: one more call
                # is the measurement (its median of one), marked in the table.
                start = time.perf_counter()
                call()
                row.pml_times_ms = [1e3 * (time.perf_counter() - start)]
                row.pml_ms = row.pml_times_ms[0]
            else:
                sides["pml"] = call

    times = timed_blocks(sides, args.repeats, args.block, args.pause, args.warmup, args.settle)
    if "ours" in times:
        row.ours_times_ms = [1e3 * s for s in times["ours"]]
        row.ours_ms = _median_ms(times["ours"])
    if "floor" in times:
        row.floor_times_ms = [1e3 * s for s in times["floor"]]
        row.floor_ms = _median_ms(times["floor"])
    if "pml" in times:
        row.pml_times_ms = [1e3 * s for s in times["pml"]]
        row.pml_ms = _median_ms(times["pml"])
    return row


# --------------------------------------------------------------------------------------------
# Peak RSS, in a worker process
# --------------------------------------------------------------------------------------------


def _proc_status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _peak_rss_delta(fn: Callable[[], Any], calls: int = 3) -> int:
    """Peak RSS above the RSS before the call while ``fn`` runs (its result is dropped), in
    bytes; the largest of ``calls`` calls (memory freed meanwhile, e.g. by a late garbage
    collection of the previous configuration, can only make one call read low)."""
    peak = 0
    for _ in range(calls):
        gc.collect()
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
        before = _proc_status_kib("VmRSS")
        fn()
        peak = max(peak, 1024 * (_proc_status_kib("VmHWM") - before))
    return peak


def rss_worker() -> None:
    """Reads a JSON job on stdin, prints one JSON line per configuration (peak RSS deltas).

    Started by :func:`measure_rss` with ``MALLOC_MMAP_THRESHOLD_`` set; not a CLI of its own.
    """
    job = json.load(sys.stdin)
    pin_threads(job["threads"])
    t, _ = load_pml() if job["pml"] else (None, "")
    if t is not None:
        t.torch.set_num_threads(job["threads"])
    for config in job["configs"]:
        spec = SPEC_BY_NAME[config["loss"]]
        problem = spec_problem(
            spec, config["batch"], config["dim"], config["classes"], job["per_class"], job["seed"]
        )
        out: dict[str, Any] = {"index": config["index"]}
        if config["ours"]:
            step = spec.step_for(job["class_block_size"], job["block_size"])
            ours = compile_step(step, device_args(spec, problem))
            ours.run()
            out["ours"] = _peak_rss_delta(ours.run)
            del ours
        if config["pml"] and t is not None and spec.pml_build is not None:
            call = spec.pml_build(problem, t)
            call()
            out["pml"] = _peak_rss_delta(call)
            del call
        gc.collect()
        print(json.dumps(out), flush=True)


def measure_rss(rows: list[Row], args: argparse.Namespace, threads: int, with_pml: bool) -> str:
    """Fills ``*_rss_bytes`` of ``rows`` from one worker process; returns "" or why not."""
    if not pathlib.Path("/proc/self/clear_refs").exists():
        return "no /proc/self/clear_refs (Linux only)"
    configs = [
        {
            "index": i,
            "loss": r.loss,
            "batch": r.batch,
            "dim": r.dim,
            "classes": r.classes,
            "ours": r.ours_status == "ok",
            "pml": r.pml_status == "ok",
        }
        for i, r in enumerate(rows)
    ]
    job = {
        "configs": configs,
        "threads": threads,
        "per_class": args.per_class,
        "class_block_size": args.class_block_size,
        "block_size": args.block_size,
        "seed": args.seed,
        "pml": with_pml,
    }
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    proc = subprocess.run(
        [sys.executable, "-c", "from benchmarks.losses import rss_worker; rss_worker()"],
        input=json.dumps(job),
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        env=env,
        check=False,
    )
    for line in proc.stdout.splitlines():
        if line.startswith("{"):
            result = json.loads(line)
            row = rows[result["index"]]
            row.ours_rss_bytes = result.get("ours")
            row.pml_rss_bytes = result.get("pml")
    if proc.returncode != 0:
        return f"RSS worker failed (exit {proc.returncode}): {proc.stderr.strip()[-500:]}"
    return ""


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------


def _fmt(value: float | None, spec: str) -> str:
    return "–" if value is None or not math.isfinite(value) else format(value, spec)


def _mib(value: int | None) -> str:
    return "–" if value is None else f"{value / MIB:.1f}"


def _ms(row: Row, side: str, value: float | None, spec: str) -> str:
    """A median time, marked † when that side's calls were noisy."""
    return _fmt(value, spec) + (" †" if row.noisy(side) else "")


def format_table(rows: list[Row], with_pml: bool, with_rss: bool) -> str:
    """The markdown table (one row per configuration)."""
    head = ["loss", "B", "D", "C", "ours ms"]
    if with_pml:
        head += ["PML ms", "PML/ours"]
    head += ["floor", "floor ms", "ours/floor", "ours compile s", "ours MiB (XLA)"]
    if with_rss:
        head += ["ours MiB (RSS)"] + (["PML MiB (RSS)"] if with_pml else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for r in rows:
        ours_ms = _ms(r, "ours", r.ours_ms, ".2f") if r.ours_status == "ok" else r.ours_status
        cells = [r.loss, str(r.batch), str(r.dim), "–" if r.classes is None else str(r.classes)]
        cells.append(ours_ms)
        if with_pml:
            pml_ms = _ms(r, "pml", r.pml_ms, ".2f") if r.pml_status == "ok" else r.pml_status
            if r.pml_status == "ok" and len(r.pml_times_ms) == 1:
                pml_ms += "¹"  # one call: slower than --slow-call-s
            cells += [pml_ms, _fmt(r.pml_over_ours, ".2f")]
        cells += [
            f"`{r.floor}`",
            _ms(r, "floor", r.floor_ms, ".3f"),
            _fmt(r.ours_over_floor, ".2f"),
            _fmt(r.ours_compile_s, ".2f"),
            _mib(r.ours_xla_bytes),
        ]
        if with_rss:
            cells.append(_mib(r.ours_rss_bytes))
            if with_pml:
                cells.append(_mib(r.pml_rss_bytes))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def metadata(
    args: argparse.Namespace, argv: Sequence[str], threads: int, t: Torch | None
) -> dict[str, Any]:
    """Machine, versions, command and settings for the report."""
    return {
        "command": " ".join(["python -m benchmarks.losses", *argv]),
        "date_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
        "machine": f"{cpu_model()}, {os.cpu_count()} CPUs, {platform.platform()}",
        "threads": threads,
        "python": platform.python_version(),
        "jax": jax.__version__,
        "numpy": np.__version__,
        "torch": None if t is None else t.version,
        "pytorch_metric_learning": None if t is None else t.pml_version,
        "dtype": "float32",
        "per_class": args.per_class,
        "repeats": args.repeats,
        "block": args.block,
        "pause_s": args.pause,
        "warmup": args.warmup,
        "settle": args.settle,
        "max_gb": args.max_gb,
        "seed": args.seed,
        "malloc_tuned": getattr(args, "malloc_tuned", False),
        "class_block_size": args.class_block_size,
        "block_size": args.block_size or "the losses' default ('auto')",
        "losses": {
            s.name: {"ours": s.ours, "pml": s.pml, "floor": s.floor}
            for s in SPECS
            if s.name in args.losses
        },
    }


def markdown_report(meta: dict[str, Any], table: str, notes: list[str]) -> str:
    lines = [
        "# Loss benchmarks: mlx_jax vs pytorch-metric-learning",
        "",
        f"- command: `{meta['command']}`",
        f"- machine: {meta['machine']}; {meta['threads']} threads for XLA and torch",
        f"- versions: Python {meta['python']}, jax {meta['jax']}, numpy {meta['numpy']}, "
        f"torch {meta['torch']}, PML {meta['pytorch_metric_learning']}",
        f"- {meta['date_utc']} UTC; float32; {meta['per_class']} samples per class; median of "
        f"{meta['repeats']} fwd+bwd calls per side, blocks of {meta['block']} with "
        f"{meta['pause_s']} s pauses, {meta['warmup']} warm-up calls per side and "
        f"{meta['settle']} untimed call(s) opening each block; glibc malloc "
        + (
            "set to reuse freed memory (experiments/allocator.py)"
            if meta["malloc_tuned"]
            else "defaults"
        ),
        "- floor: one forward matmul (`x @ x.T`, `x @ W` or `x @ centers.T`); fwd+bwd needs "
        "≥ 2 of them. ours MiB (XLA): temporaries + outputs from XLA's memory analysis; "
        "MiB (RSS): peak resident memory above the inputs during one call (worker process). "
        "See `python -m benchmarks.losses --help`.",
        *(f"- note: {n}" for n in notes),
        "",
        table,
        "",
        "Configurations:",
        "",
        *(
            f"- `{name}`: ours `{c['ours']}`" + (f"; PML `{c['pml']}`" if c["pml"] else "")
            for name, c in meta["losses"].items()
        ),
        "",
    ]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


DESCRIPTION = """\
Time forward+backward of mlx_jax's losses (jitted value_and_grad) and of the same losses in
pytorch-metric-learning (PML), in one process with the same threads; plus the matmul floor,
compile time and peak memory. Prints a markdown table, writes it with the setup to --out and
JSON (every timed call included) next to it.
"""
EPILOG = """\
columns:
  ours ms / PML ms   median time of one forward+backward call (gradients w.r.t. the
                     embeddings and W / centers; center: loss grad + alpha update)
  floor ms           one jitted forward matmul: x @ x.T for pair losses, x @ W for class
                     heads, x @ centers.T for center losses; fwd+bwd needs >= 2 of them
  ours compile s     trace + lower + compile of the jitted step (not in ours ms)
  ours MiB (XLA)     XLA's compiled memory analysis: temporaries + outputs
  ... MiB (RSS)      peak resident memory above the inputs during one call, measured in a
                     worker process with MALLOC_MMAP_THRESHOLD_=65536 (--rss)
Timing runs ours, floor and PML in alternating blocks (--block calls, then --pause s of
sleep), never call by call: the libraries' threads steal each other's cores otherwise.
--threads gives XLA and torch the same CPUs and thread count.
"""


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows defaults and keeps the epilog's layout."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.losses",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=_HelpFormatter,
    )
    p.add_argument(
        "--losses",
        nargs="+",
        default=[s.name for s in SPECS],
        choices=[s.name for s in SPECS] + list(LOSS_GROUPS),
        metavar="LOSS",
        help="losses to run, from: "
        + ", ".join(s.name for s in SPECS)
        + "; 'breadth' names the last "
        + str(len(BREADTH_SPECS)),
    )
    p.add_argument(
        "--batch", nargs="+", type=int, default=list(DEFAULT_BATCHES), help="batch sizes B"
    )
    p.add_argument(
        "--dim", nargs="+", type=int, default=list(DEFAULT_DIMS), help="embedding sizes D"
    )
    p.add_argument(
        "--classes",
        nargs="+",
        type=int,
        default=list(DEFAULT_CLASSES),
        help="numbers of classes C for class heads (W is [D, C]) and center losses (centers "
        "[C, D]); pair losses ignore it",
    )
    p.add_argument(
        "--class-block-size",
        type=int,
        default=None,
        help="class heads: pass class_block_size (visit the classes in blocks of this many, "
        "no [B, C] array; mlx_jax.losses.class_blocks); default: the dense form",
    )
    p.add_argument(
        "--block-size",
        type=_block_size_arg,
        default=None,
        help="pair losses: block_size to pass ('dense' = None, 'auto', or rows per block; "
        "mlx_jax.blockwise); default: the losses' own default ('auto')",
    )
    p.add_argument(
        "--per-class",
        type=int,
        default=4,
        help="samples per class in a batch (labels: B / per-class classes)",
    )
    p.add_argument("--repeats", type=int, default=20, help="timed calls per side (median)")
    p.add_argument("--block", type=int, default=5, help="calls per block before switching side")
    p.add_argument(
        "--pause",
        type=float,
        default=0.2,
        help="seconds of sleep after every block (lets torch's OpenMP threads stop spinning)",
    )
    p.add_argument("--warmup", type=int, default=2, help="untimed calls per side first")
    p.add_argument(
        "--settle",
        type=int,
        default=1,
        help="untimed calls at the start of every block: the first call after a pause pays "
        "for waking the library's sleeping threads; 0 times every call",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="threads for both XLA and torch: pins the process to the first N allowed CPUs "
        "(XLA sizes its pool from them) and sets torch.set_num_threads(N); default: all "
        "allowed CPUs",
    )
    p.add_argument(
        "--slow-call-s",
        type=float,
        default=5.0,
        help="a PML call slower than this many seconds (its first, untimed one) is timed once, "
        "alone, instead of --repeats times in blocks (marked ¹ in the table)",
    )
    p.add_argument(
        "--max-gb",
        type=float,
        default=8.0,
        help="skip a side of a configuration whose memory would exceed this many GiB (ours: "
        "XLA's analysis; PML: a rough estimate per loss)",
    )
    p.add_argument(
        "--rss",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="measure peak RSS of one call of each side in a worker process (adds one "
        "compile per configuration)",
    )
    p.add_argument(
        "--pml",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="time PML too (when torch and pytorch-metric-learning are importable)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the random inputs")
    p.add_argument(
        "--default-malloc",
        action="store_true",
        help="keep glibc's malloc defaults (default: experiments/allocator.py's setting, so "
        "that large freed buffers are reused instead of unmapped and faulted in again, "
        "whose cost depends on what ran before in the process)",
    )
    p.add_argument(
        "--out",
        type=pathlib.Path,
        default=RESULTS_DIR / "losses.md",
        help="markdown report path; the JSON goes next to it with the suffix .json",
    )
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    return p


def _check_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    for name in ("batch", "dim", "classes"):
        if any(v < 1 for v in getattr(args, name)):
            p.error(f"--{name} values must be >= 1")
    if any(c < 2 for c in args.classes):
        p.error("--classes values must be >= 2 (triplet-center needs another class)")
    if args.class_block_size is not None and args.class_block_size < 1:
        p.error("--class-block-size must be >= 1")
    if args.per_class < 2:
        p.error("--per-class must be >= 2 (pair losses need positives)")
    if any(b < 2 * args.per_class for b in args.batch):
        p.error("every --batch must hold at least two classes (>= 2 × --per-class)")
    if min(args.repeats, args.block) < 1 or min(args.warmup, args.settle, args.pause) < 0:
        p.error("--repeats and --block must be >= 1, --warmup, --settle and --pause >= 0")


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    args.losses = expand_losses(args.losses)
    _check_args(parser, args)
    try:
        threads = pin_threads(args.threads)
    except ValueError as error:
        parser.error(str(error))
    # Before JAX starts its threads; process-wide, so PML runs under the same allocator.
    args.malloc_tuned = False if args.default_malloc else reuse_freed_memory()
    t, pml_reason = load_pml() if args.pml else (None, "disabled by --no-pml")
    if t is not None:
        t.torch.set_num_threads(threads)
    notes = [] if t is not None else [f"PML columns omitted: {pml_reason}"]

    def log(message: str) -> None:
        if not args.quiet:
            print(message, file=sys.stderr, flush=True)

    rows: list[Row] = []
    for spec in SPECS:
        if spec.name not in args.losses:
            continue
        for batch in args.batch:
            for dim in args.dim:
                labelled_classes = spec.kind in ("head", "center")
                for classes in args.classes if labelled_classes else [None]:
                    row = bench_one(spec, batch, dim, classes, args, t, pml_reason)
                    rows.append(row)
                    log(
                        f"{spec.name} B={batch} D={dim} C={classes}: ours "
                        f"{_fmt(row.ours_ms, '.2f')} ms ({row.ours_status}), PML "
                        f"{_fmt(row.pml_ms, '.2f')} ms ({row.pml_status}), floor "
                        f"{_fmt(row.floor_ms, '.3f')} ms, compile {row.ours_compile_s:.2f} s"
                    )
                    diff = row.loss_rel_diff
                    if diff is not None and diff > 1e-4:
                        log(f"  warning: losses differ: ours {row.ours_loss}, PML {row.pml_loss}")
    if args.rss:
        log("measuring peak RSS in a worker process ...")
        problem = measure_rss(rows, args, threads, with_pml=t is not None)
        if problem:
            notes.append(problem)
            log(problem)

    if any(r.noisy(side) for r in rows for side in ("ours", "floor", "pml")):
        notes.append(NOISY_NOTE)
    if any(r.pml_status == "ok" and len(r.pml_times_ms) == 1 for r in rows):
        notes.append(
            f"¹ one timed PML call: its first call took more than --slow-call-s "
            f"({args.slow_call_s:g} s), so it was timed once, alone"
        )
    meta = metadata(args, argv, threads, t)
    table = format_table(rows, with_pml=t is not None, with_rss=args.rss)
    print(table)
    out: pathlib.Path = args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(markdown_report(meta, table, notes))
    payload = {"meta": meta, "notes": notes, "rows": [r.to_json() for r in rows]}
    out.with_suffix(".json").write_text(json.dumps(payload, indent=1) + "\n")
    log(f"wrote {out} and {out.with_suffix('.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
