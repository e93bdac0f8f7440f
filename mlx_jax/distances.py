"""Pairwise distance and similarity matrices.

All metrics compute in at least float32 and return ``[B, M]`` for ``x`` [B, D] and ``y`` [M, D]
(``y=None`` means ``y = x``; then the diagonal of a Euclidean matrix is exactly 0).

* ``"squared_euclidean"``: ‖x_i − y_j‖², by direct differences for small problems (exact) and
  by one matmul ‖x_i‖² + ‖y_j‖² − 2·x_i·y_j, clamped at 0, for large ones (see
  :func:`squared_euclidean` for the accuracy trade-off).
* ``"euclidean"``: the square root of the above with a gradient that is finite (zero) at 0 —
  plain ``sqrt`` has an infinite derivative there, which NaNs every gradient of a batch holding
  duplicate embeddings.
* ``"cosine"``: cosine *similarity* of L2-normalized rows (higher is closer); a zero vector is
  normalized with an eps so it has similarity 0 to everything and finite gradients.

:data:`Metric` is the one type of every ``metric=`` argument in mlx_jax (this module,
:mod:`mlx_jax.metrics`, :mod:`mlx_jax.retrieval`), and every one of them defaults to
``"euclidean"`` — the plain distance, as ``scipy.spatial.distance.cdist``,
``sklearn.metrics.pairwise_distances`` and ``torch.cdist`` default to; pass ``metric="cosine"``
for embeddings trained on the sphere (the margin-softmax heads, circle, Siamese). A function
that supports only some metrics says so and raises :class:`UnsupportedMetricError` for the
others (:func:`check_metric`).
"""

from __future__ import annotations

from functools import partial
from typing import Literal

import jax
import jax.numpy as jnp

from mlx_jax import _checks

Metric = Literal["squared_euclidean", "euclidean", "cosine"]
METRICS: tuple[str, ...] = ("squared_euclidean", "euclidean", "cosine")
DEFAULT_METRIC = "euclidean"  # the default of every metric= argument (module docstring)


class UnsupportedMetricError(ValueError):
    """A ``metric`` that is not a :data:`Metric`, or one the function does not support."""


def check_metric(metric, supported: tuple[str, ...] = METRICS, where: str = "") -> str:
    """``metric`` if it is one of ``supported`` (default: every :data:`Metric`), else
    :class:`UnsupportedMetricError` (a ``ValueError``) naming the argument, the accepted values
    and ``where`` (the function that supports only some)."""
    if metric not in supported:
        context = f" for {where}" if where else ""
        raise UnsupportedMetricError(
            f"metric must be one of {list(supported)}{context}, got {metric!r}"
        )
    return metric


# Default matmul precision: full float32. On TPU/GPU the default would round inputs to bf16/tf32,
# and ‖x‖² + ‖y‖² − 2xy cancels catastrophically for nearby points.
HIGHEST = jax.lax.Precision.HIGHEST

NORMALIZE_EPS = 1e-12  # as torch.nn.functional.normalize (PML's CosineSimilarity uses it too)


def safe_sqrt(x: jax.Array) -> jax.Array:
    """``sqrt(x)`` for x >= 0 with derivative 0 (not inf) at x == 0."""
    positive = x > 0
    return jnp.where(positive, jnp.sqrt(jnp.where(positive, x, 1.0)), 0.0)


def l2_normalize(x: jax.Array, axis: int = -1, eps: float = NORMALIZE_EPS) -> jax.Array:
    """x / max(‖x‖, eps) along ``axis`` (zero vectors stay zero, with finite gradients).

    The columns of a matrix (``axis=0`` of [D, C] class weights) take
    :func:`_normalize_columns`: same values and gradients, with its two column sums as
    matmuls with a ones vector (XLA:CPU reduces over a major axis 5–12× slower at C ≥ 30k)."""
    if x.ndim == 2 and axis in (0, -2):
        return _normalize_columns(x, eps)
    squared_norm = jnp.sum(x * x, axis=axis, keepdims=True)
    return x * jax.lax.rsqrt(jnp.maximum(squared_norm, eps * eps))


def _column_sums(a: jax.Array) -> jax.Array:
    """Σ_d a[d, c] as a [1, C] row: a ones-vector matmul (an XLA dot, not a major-axis reduce)."""
    ones = jnp.ones((1, a.shape[0]), a.dtype)
    return jnp.matmul(ones, a, precision=HIGHEST)


@partial(jax.custom_vjp, nondiff_argnums=(1,))
def _normalize_columns(w: jax.Array, eps: float) -> jax.Array:
    """w[:, c] / max(‖w[:, c]‖, eps) for w [D, C]."""
    return _normalize_columns_forward(w, eps)[0]


def _normalize_columns_forward(w: jax.Array, eps: float):
    squared = _column_sums(w * w)
    inverse = jax.lax.rsqrt(jnp.maximum(squared, eps * eps))
    return w * inverse, (w, inverse, squared > eps * eps)


def _normalize_columns_backward(eps: float, residuals, g: jax.Array):
    # out = w·r with r = (‖w‖²)^(-1/2) where ‖w‖ > eps (else the constant 1/eps):
    # ∂L/∂w = g·r − w·r³·Σ_d(g·w)  (the second term only where the norm is above eps)
    w, inverse, above = residuals
    along = _column_sums(g * w)
    return (g * inverse - w * jnp.where(above, along * inverse**3, 0.0),)


_normalize_columns.defvjp(_normalize_columns_forward, _normalize_columns_backward)


DistanceMethod = Literal["auto", "matmul", "difference"]
# "auto" subtracts coordinates directly while B·M·D stays at or below this (8 MB of float32
# if XLA materialises it: a training batch of 128 with D <= 128); above it the matmul form
# (O(B·M) memory, BLAS speed) takes over.
DIFFERENCE_MAX_ELEMENTS = 1 << 21


def _resolve_method(method: str, rows: int, columns: int, dim: int) -> str:
    _checks.choice(method, "method", ("auto", "matmul", "difference"))
    if method != "auto":
        return method
    return "difference" if rows * columns * dim <= DIFFERENCE_MAX_ELEMENTS else "matmul"


def squared_euclidean(
    x: jax.Array,
    y: jax.Array | None = None,
    *,
    precision=HIGHEST,
    method: DistanceMethod = "auto",
) -> jax.Array:
    """‖x_i − y_j‖², [B, M].

    ``method="matmul"``: ‖x_i‖² + ‖y_j‖² − 2·x_i·y_j (one matmul), clamped at 0, after
    subtracting the mean of ``x`` from both sides (distances are translation-invariant; it
    shrinks the norms that cancel). Cancellation still limits its accuracy to about
    eps·‖x‖² absolute: two samples 0.03 apart at norm 50 get garbage in float32.
    ``method="difference"``: Σ_k (x_ik − y_jk)², exact to rounding, O(B·M·D) work.
    ``method="auto"`` (default): ``"difference"`` while B·M·D <= 2²¹ (e.g. B = 128 with
    D <= 128), else ``"matmul"``.
    """
    if y is None:
        return squared_euclidean_rows(x, None, precision=precision, method=method)
    method = _resolve_method(method, x.shape[0], y.shape[0], x.shape[1])
    if method == "difference":
        diff = x[:, None, :] - y[None, :, :]
        return jnp.sum(diff * diff, axis=-1)
    shift = jax.lax.stop_gradient(jnp.mean(x, axis=0))
    x = x - shift
    y = y - shift
    gram = jnp.matmul(x, y.T, precision=precision)
    return jnp.maximum(jnp.sum(x * x, axis=1)[:, None] + jnp.sum(y * y, axis=1) - 2.0 * gram, 0.0)


def squared_euclidean_rows(
    x: jax.Array,
    row_index: jax.Array | None,
    rows: jax.Array | None = None,
    *,
    precision=HIGHEST,
    method: DistanceMethod = "auto",
) -> jax.Array:
    """Rows ``row_index`` of ``squared_euclidean(x)``: ‖x_{row_index[r]} − x_j‖², [R, B].

    The blockwise form of the [B, B] matrix: a loss can visit row blocks of it (see
    :mod:`mlx_jax.blockwise`) so that no B×B array exists at once. Every block is computed the
    way the whole matrix is — the same ``method`` (``"auto"`` decides from B·B·D, not from the
    block), the same centering (mean of all of ``x``) — and entry (r, row_index[r]) is exactly 0.

    Args:
      x: [B, D] all samples (the columns).
      row_index: [R] int batch indices of the rows (entries >= B are padding rows with no
        self-column); None means every row (R = B, the full matrix).
      rows: [R, D] = ``x[row_index]`` if the caller already has it (e.g. a slice), else None.
      precision, method: as :func:`squared_euclidean`.
    """
    batch = x.shape[0]
    method = _resolve_method(method, batch, batch, x.shape[1])
    if row_index is None:
        row_index = jnp.arange(batch)
        rows = x if rows is None else rows
    elif rows is None:
        rows = jnp.take(x, row_index, axis=0, mode="clip")
    if method == "difference":
        diff = rows[:, None, :] - x[None, :, :]
        return jnp.sum(diff * diff, axis=-1)  # the self entry is exactly 0 already
    shift = jax.lax.stop_gradient(jnp.mean(x, axis=0))
    x = x - shift
    rows = rows - shift
    gram = jnp.matmul(rows, x.T, precision=precision)
    squared = jnp.sum(rows * rows, axis=1)[:, None] + jnp.sum(x * x, axis=1) - 2.0 * gram
    own = row_index[:, None] == jnp.arange(batch)
    return jnp.where(own, 0.0, jnp.maximum(squared, 0.0))


@partial(jax.custom_vjp, nondiff_argnums=(1,))
def _all_pairs_squared_matmul(x: jax.Array, precision) -> jax.Array:
    return _all_pairs_squared_forward(x, precision)[0]


def _all_pairs_squared_forward(x: jax.Array, precision):
    out = squared_euclidean_rows(x, None, precision=precision, method="matmul")
    # the backward pass uses the same centring (distances are translation-invariant)
    return out, (x - jnp.mean(x, axis=0), out)


def _all_pairs_squared_backward(precision, residuals, cotangent):
    centered, out = residuals
    # ∂‖x_i − x_j‖²/∂x_i = 2(x_i − x_j); entry (i, j) and (j, i) both move x_i, so with
    # S = G + Gᵀ (G masked where the clamp or the diagonal cut the gradient):
    # ∂L/∂x = 2·(rowsum(S)·x − S·x) — one matmul instead of autodiff's two.
    live = jnp.where(out > 0, cotangent, 0.0)
    symmetric = live + live.T
    weighted = jnp.matmul(symmetric, centered, precision=precision)
    return (2.0 * (jnp.sum(symmetric, axis=1)[:, None] * centered - weighted),)


_all_pairs_squared_matmul.defvjp(_all_pairs_squared_forward, _all_pairs_squared_backward)


def all_pairs_squared_euclidean(
    x: jax.Array, *, precision=HIGHEST, method: DistanceMethod = "auto"
) -> jax.Array:
    """``squared_euclidean(x)`` [B, B] with a hand-written gradient, for losses over all pairs.

    Same value as :func:`squared_euclidean_rows` ``(x, None)``. With the matmul form, autodiff
    of ``x @ x.T`` treats the operands as unrelated and spends two [B, B]×[B, D] matmuls and
    several [B, B] passes on the backward pass; the VJP here uses the symmetry — one matmul and
    one masked pass (timings in BENCHMARKS.md). The gradient is 0 where the distance was
    clamped to 0 (and on the diagonal), as autodiff's. Reverse mode only:
    ``jax.jvp``/``jax.hessian`` raise; use :func:`squared_euclidean` for forward-mode
    derivatives.
    """
    batch = x.shape[0]
    if _resolve_method(method, batch, batch, x.shape[1]) == "difference":
        return squared_euclidean_rows(x, None, precision=precision, method="difference")
    return _all_pairs_squared_matmul(x, precision)


def cosine_similarity(x: jax.Array, y: jax.Array | None = None, *, precision=HIGHEST) -> jax.Array:
    """cos(x_i, y_j) = x̂_i · ŷ_j with eps-safe normalization."""
    x_hat = l2_normalize(x)
    y_hat = x_hat if y is None else l2_normalize(y)
    return jnp.matmul(x_hat, y_hat.T, precision=precision)


def pairwise_distances(
    x: jax.Array,
    y: jax.Array | None = None,
    *,
    metric: Metric = DEFAULT_METRIC,
    precision=HIGHEST,
    method: DistanceMethod = "auto",
) -> jax.Array:
    """Pairwise matrix between the rows of ``x`` [B, D] and ``y`` [M, D] (default ``y = x``).

    Args:
      x: [B, D] floating array.
      y: [M, D] floating array or None (then ``y = x``).
      metric: ``"euclidean"`` (default), ``"squared_euclidean"`` (distances) or
        ``"cosine"`` (a similarity: larger means closer).
      precision: matmul precision; full float32 by default.
      method: Euclidean metrics only — ``"auto"``, ``"matmul"`` or ``"difference"``; see
        :func:`squared_euclidean` (accuracy for close points vs. memory at large sizes).

    Returns:
      [B, M] array in ``x``'s compute dtype (at least float32).
    """
    check_metric(metric)
    x = _checks.embeddings_array(x, "x")
    if y is not None:
        y = _checks.embeddings_array(y, "y")
        if y.shape[1] != x.shape[1]:
            raise ValueError(
                f"y must have shape [M, {x.shape[1]}] (same dim as x), got {tuple(y.shape)}"
            )
        x, y = _checks.promote_all(x, y)
    if metric == "cosine":
        return cosine_similarity(x, y, precision=precision)
    squared = squared_euclidean(x, y, precision=precision, method=method)
    return squared if metric == "squared_euclidean" else safe_sqrt(squared)


def pairwise_distances_rows(
    x: jax.Array,
    row_index: jax.Array | None,
    rows: jax.Array | None = None,
    *,
    metric: Metric = DEFAULT_METRIC,
    precision=HIGHEST,
    method: DistanceMethod = "auto",
) -> jax.Array:
    """Rows ``row_index`` [R] of ``pairwise_distances(x, metric=metric)``, [R, B].

    The blockwise form: computed like the full matrix (see :func:`squared_euclidean_rows`), so
    concatenating the row blocks gives the full matrix up to float rounding of the matmul.
    ``rows`` [R, D] may pass ``x[row_index]`` when the caller has it. Padding rows (index >= B)
    are allowed and give finite values.
    """
    check_metric(metric)
    if metric == "cosine":
        if rows is None:
            rows = x if row_index is None else jnp.take(x, row_index, axis=0, mode="clip")
        return jnp.matmul(l2_normalize(rows), l2_normalize(x).T, precision=precision)
    squared = squared_euclidean_rows(x, row_index, rows, precision=precision, method=method)
    return squared if metric == "squared_euclidean" else safe_sqrt(squared)


def ranking_scores(
    x: jax.Array, y: jax.Array, *, metric: Metric = DEFAULT_METRIC, precision=HIGHEST
) -> jax.Array:
    """[B, M] scores of the rows of ``y`` [M, D] for each row of ``x`` [B, D], **smaller is
    nearer**, for ranking neighbours under ``metric``: the squared Euclidean distance for
    ``"euclidean"`` and ``"squared_euclidean"`` (the same order; the square root would only add
    ties) and the negated cosine similarity for ``"cosine"``. In ``x``'s compute dtype; the
    nearest-neighbour functions of :mod:`mlx_jax.metrics` and :mod:`mlx_jax.retrieval` rank
    these scores (in float32) with ties broken by the lower index of ``y``."""
    check_metric(metric)
    if metric == "cosine":
        return -pairwise_distances(x, y, metric="cosine", precision=precision)
    return pairwise_distances(x, y, metric="squared_euclidean", precision=precision)
