"""Pairwise distance and similarity matrices, each from a single matmul.

All metrics compute in at least float32 and return ``[B, M]`` for ``x`` [B, D] and ``y`` [M, D]
(``y=None`` means ``y = x``; then the diagonal of a Euclidean matrix is exactly 0).

* ``"squared_euclidean"``: ‖x_i‖² + ‖y_j‖² − 2·x_i·y_j, clamped at 0 (rounding can make it
  slightly negative).
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


def squared_euclidean(x: jax.Array, y: jax.Array | None = None, *, precision=HIGHEST) -> jax.Array:
    """‖x_i − y_j‖² as ‖x_i‖² + ‖y_j‖² − 2·x_i·y_j (one matmul), clamped at 0."""
    same = y is None
    y = x if same else y
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
) -> jax.Array:
    """Pairwise matrix between the rows of ``x`` [B, D] and ``y`` [M, D] (default ``y = x``).

    Args:
      x: [B, D] floating array.
      y: [M, D] floating array or None (then ``y = x``).
      metric: ``"squared_euclidean"``, ``"euclidean"`` (distances) or ``"cosine"``
        (a similarity: larger means closer).
      precision: matmul precision; full float32 by default.

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
    squared = squared_euclidean(x, y, precision=precision)
    return squared if metric == "squared_euclidean" else safe_sqrt(squared)
