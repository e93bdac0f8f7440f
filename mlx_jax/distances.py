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
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp

from mlx_jax import _checks

Metric = Literal["squared_euclidean", "euclidean", "cosine"]
METRICS: tuple[str, ...] = ("squared_euclidean", "euclidean", "cosine")

# Default matmul precision: full float32. On TPU/GPU the default would round inputs to bf16/tf32,
# and ‖x‖² + ‖y‖² − 2xy cancels catastrophically for nearby points.
HIGHEST = jax.lax.Precision.HIGHEST

NORMALIZE_EPS = 1e-12  # as torch.nn.functional.normalize (PML's CosineSimilarity uses it too)


def safe_sqrt(x: jax.Array) -> jax.Array:
    """``sqrt(x)`` for x >= 0 with derivative 0 (not inf) at x == 0."""
    positive = x > 0
    return jnp.where(positive, jnp.sqrt(jnp.where(positive, x, 1.0)), 0.0)


def l2_normalize(x: jax.Array, axis: int = -1, eps: float = NORMALIZE_EPS) -> jax.Array:
    """x / max(‖x‖, eps) along ``axis`` (zero vectors stay zero, with finite gradients)."""
    squared_norm = jnp.sum(x * x, axis=axis, keepdims=True)
    return x * jax.lax.rsqrt(jnp.maximum(squared_norm, eps * eps))


DistanceMethod = Literal["auto", "matmul", "difference"]
# "auto" subtracts coordinates directly while B·M·D stays at or below this (8 MB of float32
# if XLA materialises it: a training batch of 128 with D <= 128); above it the matmul form,
# 10-50x faster there on CPU, takes over.
DIFFERENCE_MAX_ELEMENTS = 1 << 21


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
    _checks.choice(method, "method", ("auto", "matmul", "difference"))
    same = y is None
    y = x if same else y
    if method == "auto":
        small = x.shape[0] * y.shape[0] * x.shape[1] <= DIFFERENCE_MAX_ELEMENTS
        method = "difference" if small else "matmul"
    if method == "difference":
        diff = x[:, None, :] - y[None, :, :]
        return jnp.sum(diff * diff, axis=-1)
    shift = jax.lax.stop_gradient(jnp.mean(x, axis=0))
    x = x - shift
    y = x if same else y - shift
    x_sq = jnp.sum(x * x, axis=1)
    y_sq = x_sq if same else jnp.sum(y * y, axis=1)
    gram = jnp.matmul(x, y.T, precision=precision)
    squared = jnp.maximum(x_sq[:, None] + y_sq[None, :] - 2.0 * gram, 0.0)
    if same:
        squared = jnp.where(jnp.eye(x.shape[0], dtype=bool), 0.0, squared)
    return squared


def cosine_similarity(x: jax.Array, y: jax.Array | None = None, *, precision=HIGHEST) -> jax.Array:
    """cos(x_i, y_j) = x̂_i · ŷ_j with eps-safe normalization."""
    x_hat = l2_normalize(x)
    y_hat = x_hat if y is None else l2_normalize(y)
    return jnp.matmul(x_hat, y_hat.T, precision=precision)


def pairwise_distances(
    x: jax.Array,
    y: jax.Array | None = None,
    *,
    metric: Metric = "squared_euclidean",
    precision=HIGHEST,
    method: DistanceMethod = "auto",
) -> jax.Array:
    """Pairwise matrix between the rows of ``x`` [B, D] and ``y`` [M, D] (default ``y = x``).

    Args:
      x: [B, D] floating array.
      y: [M, D] floating array or None (then ``y = x``).
      metric: ``"squared_euclidean"``, ``"euclidean"`` (distances) or ``"cosine"``
        (a similarity: larger means closer).
      precision: matmul precision; full float32 by default.
      method: Euclidean metrics only — ``"auto"``, ``"matmul"`` or ``"difference"``; see
        :func:`squared_euclidean` (accuracy for close points vs. memory at large sizes).

    Returns:
      [B, M] array in ``x``'s compute dtype (at least float32).
    """
    _checks.choice(metric, "metric", METRICS)
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
