"""Margin-based softmax losses over a learned class-weight matrix (a Flax Dense kernel).

With embeddings x [B, D] and class weights W [D, C], every loss here works on the cosines

    cos θ_ij = x̂_i · ŵ_j,   x̂ = x / ‖x‖,  ŵ_j = W[:, j] / ‖W[:, j]‖

(one matmul at ``Precision.HIGHEST``; zero vectors are normalized with an eps, so they have
cosine 0 to everything and finite gradients). Each loss replaces the *target* logit (j = y_i)
with a penalized one and applies softmax cross-entropy (:func:`margin_cross_entropy`: a hand-written
VJP, so reverse-mode gradients only — ``jax.grad``/``jax.vjp``, not ``jax.jvp``):

* ArcFace (Deng et al. 2019): s·cos(θ_y + m)
* CosFace / AM-Softmax (Wang et al. 2018): s·(cos θ_y − m)
* insightface's combined margin (Deng et al. 2019, Eq. 4): s·(cos(m1·θ_y + m2) − m3)
* SphereFace / A-Softmax (Liu et al. 2017): ‖x‖·ψ(θ_y) with the multiplicative angular margin

All compute in at least float32 and take optional per-sample ``weights`` [B] and a
``reduction`` (see :mod:`mlx_jax.reductions`).

**Avoiding arccos on the gradient path.** d arccos(c)/dc = −1/√(1 − c²) is infinite at c = ±1
(an embedding exactly aligned with its class weight), which would turn every gradient into NaN.
For m1 = 1 (ArcFace, CosFace, and insightface's usual combined settings) the target is expanded
as cos(θ + m) = cos θ·cos m − sin θ·sin m with sin θ = √(1 − cos²θ) through a square root whose
derivative is 0 (not ∞) at 0; for m1 ≠ 1, θ = atan2(√(1 − cos²θ), cos θ), which equals arccos
and has the same finite derivative at the poles. SphereFace's cos(mθ) is the Chebyshev
polynomial T_m(cos θ) (no arccos at all); its branch index k uses arccos only without gradient.
Near (but not at) |cos θ| = 1 the true derivative of the angular margin is large — that is the
loss, not rounding — but it stays finite.
"""

from __future__ import annotations

import math
import numbers
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

from mlx_jax import _checks, reductions
from mlx_jax.blockwise import check_block_size
from mlx_jax.distances import HIGHEST, l2_normalize, safe_sqrt
from mlx_jax.losses import class_blocks
from mlx_jax.losses._common import prepare_batch
from mlx_jax.losses.softmax import take_target, target_mask
from mlx_jax.parallel import match_varying_axes

__all__ = [
    "arcface_loss",
    "check_margins",
    "combined_margin_loss",
    "combined_margin_target",
    "cosface_loss",
    "cosine_logits",
    "integer_margin",
    "multiplicative_margin_psi",
    "sphereface_lambda",
    "sphereface_loss",
]

Boundary = Literal["monotonic", "easy", "none"]
BOUNDARIES: tuple[str, ...] = ("monotonic", "easy", "none")


# --------------------------------------------------------------------------------------------
# Shared pieces
# --------------------------------------------------------------------------------------------


def _check_inputs(embeddings, labels, class_weights, weights):
    """Checks and promotes; returns (x [B, D], labels [B], W [D, C], weights [B])."""
    x = _checks.embeddings_array(embeddings)
    w = _checks.class_weights_array(class_weights, x.shape[1])
    if w.shape[1] < 1:
        raise ValueError(
            f"class_weights must have shape [{x.shape[1]}, num_classes] with num_classes >= 1, "
            f"got shape {tuple(w.shape)}"
        )
    batch = prepare_batch(x, labels, weights, num_classes=w.shape[1])
    x, w = _checks.promote_all(batch.embeddings, w)
    return x, batch.labels, w, batch.weights.astype(x.dtype)


def _cosines(x: jax.Array, w: jax.Array) -> jax.Array:
    """cos θ [B, C] = x̂ · ŵ with rows of x and columns of W L2-normalized."""
    return jnp.matmul(l2_normalize(x, axis=1), l2_normalize(w, axis=0), precision=HIGHEST)


def _is_exactly(value, target: float) -> bool:
    """True when ``value`` is a concrete scalar equal to ``target`` (traced → False)."""
    return _checks.is_concrete(value) and np.ndim(value) == 0 and float(value) == target


def _margin_head_loss(
    x: jax.Array,
    labels: jax.Array,
    w: jax.Array,
    penalize,
    row_scale,
    weights: jax.Array,
    reduction: str,
    class_block_size: int | None,
) -> jax.Array:
    """The loss of every head here: cosines, the target cosine replaced by
    ``penalize(cos θ_y)`` [B], softmax cross-entropy at ``row_scale`` (a number — the usual
    fixed s — or a [B, 1] array such as SphereFace's ‖x‖; gradients flow into an array).

    Dense (one [B, C] cosine matrix, :func:`margin_cross_entropy`) unless ``class_block_size``
    < C, where :func:`mlx_jax.losses.class_blocks.blockwise_margin_cross_entropy` visits the
    classes in blocks and no [B, C] array is formed (same value and gradients)."""
    scale = jnp.broadcast_to(jnp.asarray(row_scale, x.dtype).reshape(-1), labels.shape)
    if class_block_size is None or class_block_size >= w.shape[1]:
        cosines = _cosines(x, w)
        target = penalize(take_target(cosines, labels))
        terms = margin_cross_entropy(cosines, target, labels, scale)
    else:
        x_hat, w_hat = l2_normalize(x, axis=1), l2_normalize(w, axis=0)
        target = penalize(class_blocks.target_cosines(x_hat, w_hat, labels))
        terms = class_blocks.blockwise_margin_cross_entropy(
            x_hat, w_hat, target, labels, scale, class_block_size
        )
    return reductions.reduce_weighted(terms, weights, reduction)


def margin_cross_entropy(
    cosines: jax.Array, target_cosine: jax.Array, labels: jax.Array, row_scale: jax.Array
) -> jax.Array:
    """Per-sample softmax cross-entropy [B] of the logits z_ij = s_i · (t_i if j = y_i else
    cos_ij): ``logsumexp_j z_ij − s_i·t_i`` (NaN for a label outside ``[0, C)``, as
    :func:`~mlx_jax.losses.softmax.cross_entropy_terms`).

    Args: ``cosines`` [B, C], ``target_cosine`` t [B], ``labels`` [B] int, ``row_scale`` s [B]
    (a fixed scale broadcast, or SphereFace's ‖x_i‖; differentiable).

    Same value and gradients as autodiff of the plain expression, with a hand-written VJP
    because at large C the [B, C] passes, not the matmuls, dominate: the softmax gradient is
    formed in one fused pass from the saved log-normalizer, and the target entries' gradient
    goes to ``target_cosine`` as a [B] vector rather than through a [B, C] select (fewer
    [B, C] passes and temporaries; timings in BENCHMARKS.md). The gradient w.r.t. ``row_scale``,
    ∂L_i/∂s_i = Σ_j p_ij·(z_ij / s_i) − t_i, is one more [B, C] reduction.
    Reverse mode only (``jax.custom_vjp``): ``jax.jvp`` through it raises. Inside
    ``shard_map`` a replicated input (e.g. a fixed scale) gets its cotangent summed over the
    axis (:func:`~mlx_jax.parallel.match_varying_axes`).
    """
    cosines, target_cosine, labels, row_scale = match_varying_axes(
        cosines, target_cosine, labels, row_scale
    )
    return _margin_cross_entropy(cosines, target_cosine, labels, row_scale)


@jax.custom_vjp
def _margin_cross_entropy(cosines, target_cosine, labels, row_scale):
    return _margin_cross_entropy_forward(cosines, target_cosine, labels, row_scale)[0]


def _replace_target(cosines, target_cosine, labels):
    mask = target_mask(labels, cosines.shape[1])
    return mask, jnp.where(mask, target_cosine[:, None], cosines)


def _margin_cross_entropy_forward(cosines, target_cosine, labels, row_scale):
    _, replaced = _replace_target(cosines, target_cosine, labels)
    log_normalizer = jax.nn.logsumexp(row_scale[:, None] * replaced, axis=1)
    terms = log_normalizer - row_scale * target_cosine
    return terms, (cosines, target_cosine, labels, row_scale, log_normalizer)


def _margin_cross_entropy_backward(residuals, g):
    cosines, target_cosine, labels, row_scale, log_normalizer = residuals
    mask, replaced = _replace_target(cosines, target_cosine, labels)
    probability = jnp.exp(row_scale[:, None] * replaced - log_normalizer[:, None])
    scaled_g = row_scale * g
    d_cosines = jnp.where(mask, 0.0, scaled_g[:, None] * probability)
    target_probability = jnp.exp(row_scale * target_cosine - log_normalizer)
    d_target = scaled_g * (target_probability - 1.0)
    d_scale = g * (jnp.sum(probability * replaced, axis=1) - target_cosine)
    return d_cosines, d_target, None, d_scale


_margin_cross_entropy.defvjp(_margin_cross_entropy_forward, _margin_cross_entropy_backward)


def check_margins(m1, m2, m3, scale, boundary: str) -> None:
    """Validates the hyperparameters of :func:`combined_margin_loss` (also used by
    :mod:`mlx_jax.partial_fc`): m1 > 0, 0 <= m2 < π, m3 >= 0, scale > 0 and ``boundary`` one of
    ``"monotonic"``, ``"easy"``, ``"none"``. Raises ``ValueError`` naming the argument; traced
    values pass unchecked."""
    _checks.choice(boundary, "boundary", BOUNDARIES)
    _checks.positive(m1, "m1")
    _checks.non_negative(m2, "m2")
    if _checks.is_concrete(m2) and np.ndim(m2) == 0 and float(m2) >= math.pi:
        raise ValueError(f"m2 must be in [0, π) radians, got {m2}")
    _checks.non_negative(m3, "m3")
    _checks.positive(scale, "scale")


def combined_margin_target(cos_y: jax.Array, m1, m2, m3, boundary: str) -> jax.Array:
    """The penalized target cosine cos(m1·θ + m2) − m3 of insightface's combined margin (Deng
    et al. 2019, Eq. 4), for target cosines ``cos_y`` = cos θ [B] (any float dtype).

    ``boundary`` (``"monotonic"``, ``"easy"`` or ``"none"``) decides the value where m1·θ + m2
    exceeds π; see :func:`combined_margin_loss`. m1 = 1, m2 = 0 gives cos θ − m3 exactly
    (CosFace); otherwise the angle never goes through arccos on the gradient path (see the
    module docstring), so the derivative is finite at cos θ = ±1. No argument checks
    (:func:`check_margins` does them). Used by the margin losses here and by the class-sharded
    heads of :mod:`mlx_jax.partial_fc`, so both apply the very same margin.

    Returns:
      [B] penalized cosines, before the scale s.
    """
    if _is_exactly(m1, 1.0) and _is_exactly(m2, 0.0):
        return cos_y - m3  # no angular margin: CosFace, exact and without any clipping
    c = jnp.clip(cos_y, -1.0, 1.0)
    sin = safe_sqrt(1.0 - c * c)  # sin θ >= 0 for θ ∈ [0, π]; derivative 0 (not ∞) at poles
    if _is_exactly(m1, 1.0):
        cos_margin = c * jnp.cos(m2) - sin * jnp.sin(m2)
    else:
        theta = jnp.arctan2(sin, c)  # = arccos(c), finite derivative at c = ±1
        cos_margin = jnp.cos(m1 * theta + m2)
    if boundary == "none":
        penalized = cos_margin
    elif boundary == "easy":
        penalized = jnp.where(c > 0, cos_margin, c)
    else:  # "monotonic"
        # m1·θ + m2 reaches π at θ_b; beyond it cos(m1·θ + m2) would increase again. Use the
        # first-order expansion cos(θ + Δ) ≈ cos θ − Δ·sin θ with the margin Δ = π − θ_b and
        # sin θ frozen at the boundary: for m1 = 1 this is insightface's / PML's
        # cos θ − m2·sin(m2) (since θ_b = π − m2).
        theta_b = jnp.clip((math.pi - m2) / m1, 0.0, math.pi)
        # The step must go *down* from cos(π) = −1: the second form is continuous there, and
        # the min keeps insightface's form for m1 = 1 (m·sin m >= 1 − cos m for m <= ~2.3).
        fallback = jnp.minimum(
            c - (math.pi - theta_b) * jnp.sin(theta_b), c - 1.0 - jnp.cos(theta_b)
        )
        use_margin = jnp.logical_or(theta_b >= math.pi, c > jnp.cos(theta_b))
        penalized = jnp.where(use_margin, cos_margin, fallback)
    return penalized - m3


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


def cosine_logits(embeddings: jax.Array, class_weights: jax.Array) -> jax.Array:
    """cos θ_ij = x̂_i · ŵ_j, the unscaled logits of every loss in this module.

    For accuracy / argmax predictions in experiments (margins and scales do not change the
    argmax of the non-target logits, and at test time there is no target).

    Args:
      embeddings: [B, D] float (computed in at least float32).
      class_weights: [D, C] float, a Flax ``Dense`` kernel; each column is L2-normalized.

    Returns:
      [B, C] cosines in the compute dtype (at least float32).
    """
    x = _checks.embeddings_array(embeddings)
    w = _checks.class_weights_array(class_weights, x.shape[1])
    x, w = _checks.promote_all(x, w)
    return _cosines(x, w)


def combined_margin_loss(
    embeddings: jax.Array,
    labels: jax.Array,
    class_weights: jax.Array,
    *,
    m1: float = 1.0,
    m2: float = 0.0,
    m3: float = 0.0,
    scale: float = 64.0,
    boundary: Boundary = "monotonic",
    weights: jax.Array | None = None,
    reduction: reductions.Reduction = "mean",
    class_block_size: int | None = None,
) -> jax.Array:
    """insightface's combined margin softmax (Deng et al. 2019, ArcFace paper, Eq. 4)::

        L_i = −log( e^{s·(cos(m1·θ_y + m2) − m3)} /
                    (e^{s·(cos(m1·θ_y + m2) − m3)} + Σ_{j≠y} e^{s·cos θ_j}) )

    (m1, m2, m3) = (m, 0, 0) is the multiplicative angular margin of SphereFace (without its
    ψ extension), (1, m, 0) ArcFace, (1, 0, m) CosFace.

    ``boundary`` decides the target logit where m1·θ + m2 > π (cos stops decreasing there,
    so a larger angle would *lower* the loss):

    * ``"monotonic"`` (default): insightface arcface_torch ``CombinedMarginLoss`` and
      pytorch-metric-learning ``ArcFaceLoss``: for θ > θ_b = (π − m2)/m1 use
      min(cos θ − (π − θ_b)·sin θ_b, cos θ − 1 − cos θ_b), i.e. cos θ − m2·sin(m2) for
      m1 = 1 (m2 <= ~2.3). For m1 ≠ 1 this generalization is ours (insightface only defines
      m1 = 1): the first form is the first-order expansion cos(θ + Δ) ≈ cos θ − Δ·sin θ at
      the boundary, the second is continuous at θ_b; their min never rises above cos π = −1
      at θ_b, so the target stays non-increasing in θ for every m1 (tested up to m1 = 6).
    * ``"easy"``: insightface's ``easy_margin``: the angular margin (m1, m2) only where
      cos θ > 0, plain cos θ elsewhere (m3 is always subtracted).
    * ``"none"``: the raw cos(m1·θ + m2) − m3 everywhere.

    See the module docstring for how arccos is kept off the gradient path.

    Args:
      embeddings: [B, D] float (any float dtype; computed in at least float32); normalized
        inside.
      labels: [B] int class ids in ``[0, C)`` (checked when concrete; NaN loss under ``jit``).
      class_weights: [D, C] float, a Flax ``Dense`` kernel; each column is normalized inside.
      m1: multiplicative angular margin; default 1 (no multiplicative margin, insightface).
      m2: additive angular margin in radians, 0 <= m2 < π; default 0.
      m3: additive cosine margin; default 0.
      scale: s, the logit scale; default 64 (ArcFace and CosFace papers, insightface).
      boundary: ``"monotonic"``, ``"easy"`` or ``"none"`` (above).
      weights: optional [B] per-sample weights (None → ones; zero excludes a sample).
      reduction: see :mod:`mlx_jax.reductions`; default ``"mean"`` (insightface and PML's
        ``MeanReducer``). ``"none"`` returns the [B] weighted per-sample losses.
      class_block_size: None (default) computes the [B, C] cosines at once; an int visits the
        classes in blocks of that many (:mod:`mlx_jax.losses.class_blocks`): memory
        O(B·class_block_size) instead of O(B·C), same value and gradients (reverse mode).
        It trades one extra matmul per block in the backward pass for the memory; worth it
        when the [B, C] logits strain memory (timings in BENCHMARKS.md).

    Returns:
      float32 (or wider) scalar, or [B] for ``reduction="none"``.
    """
    check_margins(m1, m2, m3, scale, boundary)
    reductions.check_reduction(reduction)
    class_block_size = check_block_size(class_block_size, "class_block_size")
    x, y, w, sample_w = _check_inputs(embeddings, labels, class_weights, weights)

    def penalize(cos_y):
        return combined_margin_target(cos_y, m1, m2, m3, boundary)

    return _margin_head_loss(x, y, w, penalize, scale, sample_w, reduction, class_block_size)


def arcface_loss(
    embeddings: jax.Array,
    labels: jax.Array,
    class_weights: jax.Array,
    *,
    scale: float = 64.0,
    margin: float = 0.5,
    boundary: Boundary = "monotonic",
    weights: jax.Array | None = None,
    reduction: reductions.Reduction = "mean",
    class_block_size: int | None = None,
) -> jax.Array:
    """ArcFace / additive angular margin (Deng et al. 2019, Eq. 3)::

        L_i = −log( e^{s·cos(θ_y + m)} / (e^{s·cos(θ_y + m)} + Σ_{j≠y} e^{s·cos θ_j}) )

    :func:`combined_margin_loss` with (m1, m2, m3) = (1, margin, 0).

    Args:
      embeddings: [B, D] float; normalized inside.
      labels: [B] int class ids in ``[0, C)``.
      class_weights: [D, C] float (Flax ``Dense`` kernel); columns normalized inside.
      scale: s; default 64 (the paper).
      margin: m in **radians**; default 0.5 (the paper). pytorch-metric-learning's
        ``ArcFaceLoss`` takes degrees (default 28.6° ≈ 0.5 rad): pass ``np.radians(deg)``.
      boundary: handling of θ + m > π; default ``"monotonic"`` (insightface / PML; see
        :func:`combined_margin_loss`).
      weights: optional [B] per-sample weights.
      reduction: see :mod:`mlx_jax.reductions`; default ``"mean"``.
      class_block_size: None (default, the dense [B, C] cosines) or classes per block; see
        :func:`combined_margin_loss`.

    Returns:
      float32 (or wider) scalar, or [B] for ``reduction="none"``.
    """
    _checks.non_negative(margin, "margin")
    return combined_margin_loss(
        embeddings,
        labels,
        class_weights,
        m1=1.0,
        m2=margin,
        m3=0.0,
        scale=scale,
        boundary=boundary,
        weights=weights,
        reduction=reduction,
        class_block_size=class_block_size,
    )


def cosface_loss(
    embeddings: jax.Array,
    labels: jax.Array,
    class_weights: jax.Array,
    *,
    scale: float = 64.0,
    margin: float = 0.35,
    weights: jax.Array | None = None,
    reduction: reductions.Reduction = "mean",
    class_block_size: int | None = None,
) -> jax.Array:
    """CosFace / large margin cosine loss (Wang et al. 2018, Eq. 4)::

        L_i = −log( e^{s·(cos θ_y − m)} / (e^{s·(cos θ_y − m)} + Σ_{j≠y} e^{s·cos θ_j}) )

    :func:`combined_margin_loss` with (m1, m2, m3) = (1, 0, margin) (monotonic everywhere, so
    no boundary rule is needed).

    Args:
      embeddings: [B, D] float; normalized inside.
      labels: [B] int class ids in ``[0, C)``.
      class_weights: [D, C] float (Flax ``Dense`` kernel); columns normalized inside.
      scale: s; default 64 (the paper; also PML's ``CosFaceLoss``).
      margin: m, a cosine margin; default 0.35 (the paper; also PML).
      weights: optional [B] per-sample weights.
      reduction: see :mod:`mlx_jax.reductions`; default ``"mean"``.
      class_block_size: None (default, the dense [B, C] cosines) or classes per block; see
        :func:`combined_margin_loss`.

    Returns:
      float32 (or wider) scalar, or [B] for ``reduction="none"``.
    """
    _checks.non_negative(margin, "margin")
    return combined_margin_loss(
        embeddings,
        labels,
        class_weights,
        m1=1.0,
        m2=0.0,
        m3=margin,
        scale=scale,
        boundary="none",
        weights=weights,
        reduction=reduction,
        class_block_size=class_block_size,
    )


def integer_margin(margin, name: str = "margin") -> int:
    """The multiplicative angular margin m as an int >= 1 (4 and 4.0 are accepted; SphereFace's
    and L-Softmax's m), else ``ValueError`` naming ``name``."""
    integral_float = isinstance(margin, float | np.floating) and float(margin).is_integer()
    if (
        isinstance(margin, bool)
        or not (isinstance(margin, numbers.Integral | np.integer) or integral_float)
        or int(margin) < 1
    ):
        raise ValueError(f"{name} must be an integer >= 1 (the angular margin m), got {margin!r}")
    return int(margin)


def _chebyshev(c: jax.Array, degree: int) -> jax.Array:
    """T_m(c) = cos(m·arccos c) via T_{n+1} = 2c·T_n − T_{n−1} (a polynomial in c)."""
    previous, current = jnp.ones_like(c), c
    if degree == 0:
        return previous
    for _ in range(degree - 1):
        previous, current = current, 2.0 * c * current - previous
    return current


def multiplicative_margin_psi(cos_y: jax.Array, m: int) -> jax.Array:
    """ψ(θ) = (−1)^k·cos(mθ) − 2k for θ ∈ [kπ/m, (k+1)π/m], k ∈ {0, …, m − 1}: the
    multiplicative angular margin of L-Softmax (Liu et al. 2016, Eq. 6) and SphereFace (Liu et
    al. 2017, Eq. 7), continuous and monotonically decreasing on [0, π].

    cos(mθ) is the Chebyshev polynomial T_m(cos θ) (the multiple-angle formula), so no arccos is
    on the gradient path; k is piecewise constant and computed without gradient (θ = π gives
    k = m − 1: ψ is 1 − 2m either way).
    """
    theta = jax.lax.stop_gradient(jnp.arccos(jnp.clip(cos_y, -1.0, 1.0)))
    k = jax.lax.stop_gradient(jnp.clip(jnp.floor(m * theta / math.pi), 0.0, m - 1.0))
    sign = 1.0 - 2.0 * jnp.mod(k, 2.0)
    return sign * _chebyshev(cos_y, m) - 2.0 * k


def sphereface_loss(
    embeddings: jax.Array,
    labels: jax.Array,
    class_weights: jax.Array,
    *,
    margin: int = 4,
    annealing_lambda: float = 0.0,
    scale: float | None = None,
    weights: jax.Array | None = None,
    reduction: reductions.Reduction = "mean",
    class_block_size: int | None = None,
) -> jax.Array:
    """SphereFace / A-Softmax (Liu et al. 2017, Eqs. 6–7), with its training-time annealing.

    Class weights are normalized, features are not: logit_j = ‖x‖·cos θ_j for j ≠ y, and the
    target logit uses the multiplicative angular margin m through ψ::

        ψ(θ) = (−1)^k·cos(mθ) − 2k,   θ ∈ [kπ/m, (k+1)π/m],  k ∈ {0, …, m − 1}
        f_y = ‖x‖·(λ·cos θ_y + ψ(θ_y)) / (1 + λ)
        L_i = −log( e^{f_y} / (e^{f_y} + Σ_{j≠y} e^{‖x‖·cos θ_j}) )

    cos(mθ) is the Chebyshev polynomial T_m(cos θ) (multiple-angle formula), k is computed
    without gradient. λ = ``annealing_lambda`` blends in the plain softmax (λ → ∞) as in the
    authors' released Caffe code; anneal it with :func:`sphereface_lambda`.

    Args:
      embeddings: [B, D] float (not normalized for ``scale=None``).
      labels: [B] int class ids in ``[0, C)``.
      class_weights: [D, C] float (Flax ``Dense`` kernel); columns normalized inside.
      margin: integer m >= 1; default 4 (the paper). ``margin=1`` is the normalized-weight
        softmax.
      annealing_lambda: λ >= 0; default 0 (the pure A-Softmax of the paper's Eq. 7; also PML's
        ``SphereFaceLoss``, which has no annealing).
      scale: None (default) uses the paper's feature norm ‖x‖; a float s normalizes the
        features and uses s instead. PML's ``SphereFaceLoss(scale=1)`` equals ``scale=None``.
      weights: optional [B] per-sample weights.
      reduction: see :mod:`mlx_jax.reductions`; default ``"mean"``.
      class_block_size: None (default, the dense [B, C] cosines) or classes per block; see
        :func:`combined_margin_loss`.

    Returns:
      float32 (or wider) scalar, or [B] for ``reduction="none"``.
    """
    m = integer_margin(margin)
    _checks.non_negative(annealing_lambda, "annealing_lambda")
    reductions.check_reduction(reduction)
    if scale is not None:
        _checks.positive(scale, "scale")
    class_block_size = check_block_size(class_block_size, "class_block_size")
    x, y, w, sample_w = _check_inputs(embeddings, labels, class_weights, weights)

    def penalize(cos_y):
        return (annealing_lambda * cos_y + multiplicative_margin_psi(cos_y, m)) / (
            1.0 + annealing_lambda
        )

    if scale is None:
        row_scale = safe_sqrt(jnp.sum(x * x, axis=1, keepdims=True))
    else:
        row_scale = scale
    return _margin_head_loss(x, y, w, penalize, row_scale, sample_w, reduction, class_block_size)


def sphereface_lambda(
    step,
    *,
    base: float = 1000.0,
    gamma: float = 0.12,
    power: float = 1.0,
    minimum: float = 5.0,
) -> jax.Array:
    """SphereFace's annealing schedule for λ (the authors' Caffe ``MarginInnerProduct`` layer)::

        λ(step) = max(minimum, base·(1 + gamma·step)^(−power))

    Defaults are the released training prototxt's ``base: 1000, gamma: 0.12, power: 1,
    lambda_min: 5``. Pure and jit-safe: ``step`` may be a Python int or a traced integer/float.

    Returns:
      float32 scalar λ (float64 under x64 for a float64 ``step``).
    """
    step = jnp.asarray(step)
    _checks.non_negative(step, "step")
    step = step.astype(_checks.compute_dtype(step.dtype))
    return jnp.maximum(minimum, base * (1.0 + gamma * step) ** (-power)).astype(step.dtype)
