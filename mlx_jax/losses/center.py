"""Center Loss (Wen et al. 2016) and the standalone center loss of seed 001."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mlx_jax import _checks, blockwise, reductions
from mlx_jax.losses._common import Batch, Rows, map_anchor_rows, prepare_batch

# Added inside log(‖x_i − x_j‖² + eps): keeps duplicate embeddings of different classes finite.
# 1e-12 is the size of the floor pytorch-center-loss (KaiyangZhou), which seed 001 follows,
# clamps its distances to (there a clamp; here an addition, so gradients never vanish).
LOG_EPS = 1e-12


def _batch_with_centers(embeddings, labels, centers, weights) -> tuple[Batch, jax.Array]:
    x = _checks.embeddings_array(embeddings)
    c = _checks.centers_array(centers, x.shape[1])
    batch = prepare_batch(x, labels, weights, num_classes=c.shape[0])
    x, c = _checks.promote_all(batch.embeddings, c)
    return batch._replace(embeddings=x), c


def _squared_distance_to_own_center(batch: Batch, centers: jax.Array) -> jax.Array:
    """‖x_i − c_{y_i}‖² [B]; NaN for an out-of-range label (never a clamped wrong center)."""
    diff = batch.embeddings - _checks.gather_rows(centers, batch.labels)
    return jnp.sum(diff * diff, axis=1)


def center_loss(
    embeddings: jax.Array,
    labels: jax.Array,
    centers: jax.Array,
    *,
    weights: jax.Array | None = None,
    reduction: reductions.Reduction = "mean",
) -> jax.Array:
    """Center loss L_C = ½·(1/m)·Σ_i ‖x_i − c_{y_i}‖² (Wen et al. 2016, Eq. 2, averaged over the
    batch of m samples).

    Use it jointly with :func:`softmax_loss` (L = L_S + λ·L_C, Eq. 5) and move the centers with
    :func:`mlx_jax.centers.update_centers` (the α rule); the gradient w.r.t. ``centers`` also
    exists, for the variant that trains centers as parameters (pytorch-center-loss, which sums
    ‖x_i − c_{y_i}‖² / m without the ½ — i.e. 2·L_C).

    Args:
      embeddings: [B, D] float. labels: [B] int in [0, C). centers: [C, D] float.
      weights: optional [B] per-sample weights (0 = excluded).
      reduction: ``"mean"`` (paper), ``"sum"``, ``"mean_nonzero"`` or ``"none"`` ([B]).

    Returns:
      scalar in the compute dtype (at least float32), [B] for ``reduction="none"``;
      differentiable in ``embeddings`` and ``centers``.
    """
    batch, c = _batch_with_centers(embeddings, labels, centers, weights)
    losses = 0.5 * _squared_distance_to_own_center(batch, c)
    return reductions.reduce_weighted(losses, batch.weights, reduction)


def standalone_center_loss(
    embeddings: jax.Array,
    labels: jax.Array,
    centers: jax.Array,
    *,
    weight_intra: float = 1.0,
    weight_inter: float = 0.1,
    eps: float = LOG_EPS,
    weights: jax.Array | None = None,
    reduction: reductions.Reduction = "mean",
    block_size: blockwise.BlockSize = "auto",
) -> jax.Array:
    """Standalone center loss (seed 001, "standalone-center-loss"; no softmax)::

        L       = w_intra·L_intra + w_inter·L_inter
        L_intra = Σ_{i=1..m} ‖x_i − c_{y_i}‖² / m
        L_inter = −Σ_{i=1..m} Σ_{j=1..m} I(y_i, y_j)·log(‖x_i − x_j‖² + eps) / m

    with I(y_i, y_j) = 1 when y_i != y_j, else 0. Both terms divide by m, so L is the mean over
    samples of l_i = w_intra‖x_i − c_{y_i}‖² − w_inter Σ_j I·log(‖x_i − x_j‖² + eps): the
    ``reduction`` acts on those l_i. The seed writes log(‖·‖²) with no eps; ``eps`` (default
    1e-12, pytorch-center-loss's clamp) keeps duplicate embeddings of different classes finite.
    The inter term has no lower bound (seed 001 warns it can run to −∞); it is balanced by the
    intra term.

    Args:
      embeddings: [B, D] float. labels: [B] int in [0, C). centers: [C, D] float.
      weight_intra: w_intra, default 1.0 (seed 001's table).
      weight_inter: w_inter, default 0.1 (seed 001's table).
      eps: added inside the log.
      weights: optional [B] (a pair's weight is its first sample's; 0 = excluded).
      reduction: ``"mean"`` (the seed's /m), ``"sum"`` or ``"none"`` ([B]). Not
        ``"mean_nonzero"``: the l_i can be negative, so "non-zero" has no meaning here.
      block_size: ``"auto"`` (default): dense up to B = 2048, blocks of about 2^18 / B
        anchor rows above on CPU, dense on GPU/TPU (:func:`mlx_jax.blockwise.auto_block_size`);
        None: the inter term's [B, B] distance matrix at once; an int: blocks of that many
        anchor rows with O(B·block_size) memory in the forward and backward pass
        (:mod:`mlx_jax.blockwise`).
        The same value and gradients in every form.

    Returns:
      scalar in the compute dtype (at least float32), [B] for ``reduction="none"``.
    """
    reductions.check_reduction(
        reduction,
        ("mean", "sum", "none"),
        "standalone_center_loss: its per-sample terms can be negative",
    )
    batch, c = _batch_with_centers(embeddings, labels, centers, weights)
    _checks.positive(eps, "eps")
    intra = _squared_distance_to_own_center(batch, c)

    def per_rows(rows: Rows):
        _, different = rows.pair_masks(batch)
        squared = rows.squared_distances(batch)
        return -jnp.sum(jnp.where(different, jnp.log(squared + eps), 0.0), axis=1)

    inter = map_anchor_rows(per_rows, batch, block_size)
    losses = weight_intra * intra + weight_inter * inter
    return reductions.reduce_weighted(losses, batch.weights, reduction)
