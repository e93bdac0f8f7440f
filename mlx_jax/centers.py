"""Class centers as explicit state, updated by the Center Loss α rule (Wen et al. 2016).

Centers are data in the train state, not parameters: the network is trained by the gradient of
the loss with respect to the embeddings, and the centers move by Eq. 4 of the paper::

    Δc_j = Σ_i δ(y_i = j)·(c_j − x_i) / (1 + Σ_i δ(y_i = j))
    c_j ← c_j − α·Δc_j

Classes absent from the batch do not move. The update is split into per-class statistics
(:func:`class_statistics`: Σ_i δ(y_i=j)·x_i and Σ_i δ(y_i=j)) and their application
(:func:`apply_center_update`) so that a data-parallel step can sum the statistics over devices
before applying them — the result then equals the update on the global batch.

The other common variant — centers trained as parameters by gradient descent, as in
pytorch-center-loss (KaiyangZhou: SGD with lr 0.5, center gradients scaled by 1/λ) — needs no
code here: pass the centers as a parameter to :func:`mlx_jax.losses.center_loss` and
differentiate with respect to them (see the README).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mlx_jax import _checks


def class_statistics(
    embeddings: jax.Array,
    labels: jax.Array,
    num_classes: int,
    *,
    weights: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Per-class sums Σ_i w_i·δ(y_i=j)·x_i [C, D] and counts Σ_i w_i·δ(y_i=j) [C].

    Embeddings are taken without gradient (the α rule is not part of backpropagation).
    ``weights`` [B] defaults to ones; 0 drops a sample (padding). Out-of-range labels under
    ``jit`` make every count NaN (they would otherwise be dropped silently).
    """
    x = _checks.embeddings_array(embeddings)
    y = _checks.labels_array(labels, x.shape[0], num_classes=num_classes)
    w = _checks.sample_weights(weights, x.shape[0], x.dtype)
    x = jax.lax.stop_gradient(x)
    sums = jax.ops.segment_sum(x * w[:, None], y, num_segments=num_classes)
    counts = jax.ops.segment_sum(w, y, num_segments=num_classes)
    out_of_range = jnp.any((y < 0) | (y >= num_classes))
    counts = jnp.where(out_of_range, jnp.nan, counts)
    return sums, counts


def apply_center_update(
    centers: jax.Array, sums: jax.Array, counts: jax.Array, alpha: float | jax.Array
) -> jax.Array:
    """c_j ← c_j − α·(n_j·c_j − s_j) / (1 + n_j) for statistics (s, n) from
    :func:`class_statistics` (possibly summed over devices). Returns centers in their dtype."""
    c = _checks.float_array(centers, "centers", 2, "[num_classes, dim]")
    if sums.shape != c.shape or counts.shape != c.shape[:1]:
        raise ValueError(
            f"sums must have shape {c.shape} and counts shape {c.shape[:1]} to match centers, "
            f"got {sums.shape} and {counts.shape}"
        )
    _checks.non_negative(alpha, "alpha")
    delta = (counts[:, None] * c - sums) / (1.0 + counts[:, None])
    return (c - alpha * delta).astype(jnp.asarray(centers).dtype)


def update_centers(
    centers: jax.Array,
    embeddings: jax.Array,
    labels: jax.Array,
    alpha: float | jax.Array,
    *,
    weights: jax.Array | None = None,
    axis_name: str | None = None,
) -> jax.Array:
    """The Center Loss α rule (Wen et al. 2016, Eq. 4) on one mini-batch.

    Args:
      centers: [C, D] float.
      embeddings: [B, D] float (gradient is not propagated).
      labels: [B] int in [0, C).
      alpha: center learning rate in [0, 1]; Wen et al. use 0.5 (the seed's λ/α study).
      weights: optional [B]; 0 excludes a sample (padding), other values weight its vote.
      axis_name: inside ``jax.shard_map`` (or ``pmap``) over a batch-sharded axis, the axis
        whose devices each hold a shard of the batch: the per-class statistics are
        ``psum``-ed over it before the update, so every device gets the update of the global
        batch (and the result is replicated). ``None`` (default): the batch is all here.

    Returns:
      new centers [C, D] in the dtype of ``centers``.
    """
    c = _checks.float_array(centers, "centers", 2, "[num_classes, dim]")
    x = _checks.embeddings_array(embeddings)
    if x.shape[1] != c.shape[1]:
        raise ValueError(
            f"embeddings must have shape [batch, {c.shape[1]}] to match centers "
            f"[num_classes, {c.shape[1]}], got {x.shape}"
        )
    sums, counts = class_statistics(x, labels, c.shape[0], weights=weights)
    if axis_name is not None:
        sums, counts = jax.lax.psum((sums, counts), axis_name)
    return apply_center_update(centers, sums, counts, alpha)
