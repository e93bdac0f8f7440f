"""FastAP: a listwise loss that optimizes a histogram approximation of Average Precision
(Cakir, He, Xia, Kulis & Sclaroff 2019, "Deep Metric Learning to Rank", CVPR)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mlx_jax import _checks, blockwise, reductions
from mlx_jax.distances import l2_normalize
from mlx_jax.losses._common import Rows, map_anchor_rows, prepare_batch

# Squared Euclidean distances of unit vectors lie in [0, 4] (the paper's distance range).
_DISTANCE_RANGE = 4.0


def _soft_histograms(
    distances: jax.Array, positive: jax.Array, negative: jax.Array, num_bins: int
) -> tuple[jax.Array, jax.Array]:
    """Soft-binned positive and negative histograms h⁺, h⁻ [R, num_bins + 1] of [R, B]
    ``distances``: the pair (i, j) adds δ_l = max(0, 1 − |d_ij − z_l| / Δ) to bin l, with
    centers z_l = l·Δ, Δ = 4 / num_bins.

    Only the two centers around d (l = ⌊d/Δ⌋ and l + 1, clipped to the range) can have δ > 0,
    so each pair is added to those two bins by a segment sum instead of evaluating all
    num_bins + 1 kernels: O(R·B) memory in the forward and backward pass rather than
    O(R·B·num_bins), with the same values (the clipped edges included: past 4 only δ_L is > 0).
    """
    rows, _ = distances.shape
    bins = num_bins + 1
    delta = _DISTANCE_RANGE / num_bins
    # a NaN distance (NaN input) must land in a bin, where its NaN mass poisons the loss
    lower = jnp.floor(jnp.nan_to_num(jax.lax.stop_gradient(distances)) / delta)
    lower = jnp.clip(lower, 0, num_bins - 1).astype(jnp.int32)
    # relu: derivative 0 (not 1/2) at the kinks, as torch's; |d − z| has derivative 0 at d = z
    lower_mass = jax.nn.relu(1.0 - jnp.abs(distances - lower * delta) / delta)
    upper_mass = jax.nn.relu(1.0 - jnp.abs(distances - (lower + 1) * delta) / delta)
    # segment of (row r, bin l): r·bins + l among the positives' histograms, shifted by
    # rows·bins for the negatives'; other pairs (self, zero weight) go to a third, unused part
    part = jnp.where(positive, 0, jnp.where(negative, 1, 2))
    segment = (part * rows + jnp.arange(rows)[:, None]) * bins + lower
    size = 3 * rows * bins
    histograms = jax.ops.segment_sum(
        lower_mass.ravel(), segment.ravel(), num_segments=size
    ) + jax.ops.segment_sum(upper_mass.ravel(), (segment + 1).ravel(), num_segments=size)
    histograms = histograms.reshape(3, rows, bins)
    return histograms[0], histograms[1]


def fast_ap_loss(
    embeddings: jax.Array,
    labels: jax.Array,
    *,
    num_bins: int = 10,
    weights: jax.Array | None = None,
    anchors: jax.Array | None = None,
    reduction: reductions.Reduction = "mean",
    block_size: blockwise.BlockSize = "auto",
) -> jax.Array:
    """FastAP loss: one minus the histogram-approximated Average Precision of each query.

    Every batch sample in turn is the query q; the others are its retrieval set, ranked by the
    squared Euclidean distance d_qj = ‖x̂_q − x̂_j‖² ∈ [0, 4] of the L2-normalized embeddings.
    Positives are the other samples with the query's label, negatives those with another one.
    The distance range is quantized into bins with centers z_l = l·Δ, Δ = 4 / L, l = 0, …, L
    (L = ``num_bins``), each distance soft-assigned to its two nearest centers by the triangular
    kernel δ(d, z_l) = max(0, 1 − |d − z_l| / Δ), which makes the histograms differentiable.
    With h⁺_l, h⁻_l the soft counts of positives and negatives in bin l, h_l = h⁺_l + h⁻_l, and
    the cumulative counts H⁺_l = Σ_{k≤l} h⁺_k, H_l = Σ_{k≤l} h_k (everything at most as far as
    bin l), the query's FastAP is (Cakir et al. 2019, Eq. 10–11)::

        FastAP_q = 1/N⁺_q · Σ_l h⁺_l · H⁺_l / H_l

    with N⁺_q the number of the query's positives, and the loss is 1 − FastAP_q, averaged over
    the queries. An empty prefix (H_l = 0, so h⁺_l = 0 too) contributes 0 with zero gradient,
    never 0/0.

    Bins: ``num_bins`` is the number of intervals of width Δ = 4 / L, so there are L + 1 bin
    centers, the end points 0 and 4 included (their triangles are half-width inside [0, 4]).
    That is how the authors' released code (kunhe/FastAP-metric-learning) and
    pytorch-metric-learning's ``FastAPLoss(num_bins)`` count them; the paper speaks of "L bins".

    Queries without positives have no term (loss 0, weight 0, zero gradient) and are left out of
    ``"mean"``'s denominator, as in the authors' code and PML (which drop them). A batch in
    which no query has a positive gives 0 with zero gradients. A query whose positives are all
    closer than its negatives (by at least a bin) has FastAP 1: loss 0.

    Equal to pytorch-metric-learning's ``FastAPLoss(num_bins=num_bins)`` with its default
    ``MeanReducer`` (value and gradients; PML's distance is ``LpDistance(power=2)`` on
    normalized embeddings, the same d).

    Args:
      embeddings: [B, D] float (any float dtype; computed in at least float32). Normalized
        here; a zero vector stays zero (distance 1 to every unit vector).
      labels: [B] int class ids.
      num_bins: L, the number of bin intervals on [0, 4] (an int >= 1); default 10, the
        paper's choice (its Sec. 5 compares L from 5 to 40) and PML's default.
      weights: optional [B] per-sample weights; a query's term is weighted by the query's
        weight, and a zero-weight sample is excluded everywhere (as query, positive or
        negative). Nonzero weights do not weight the histograms.
      anchors: optional [B] bool, which samples anchor loss terms (None: every sample).
        A sample with ``anchors`` False anchors nothing but is still a positive or
        negative of the anchors: scoring a batch against a reference set, e.g. the
        cross-batch memory of :func:`mlx_jax.memory.memory_loss`.
      reduction: see :mod:`mlx_jax.reductions`, over queries with positives. ``"mean"``
        (default) is the paper's batch average and PML's ``MeanReducer``; ``"mean_nonzero"``
        averages over queries whose loss is > 0 (PML's ``AvgNonZeroReducer``). ``"none"``
        returns the [B] per-query weighted losses (0 for queries without positives).
      block_size: ``"auto"`` (default): dense up to B = 2048, blocks of about 2^18 / B query
        rows above on CPU, dense on GPU/TPU (:func:`mlx_jax.blockwise.auto_block_size`);
        None: the [B, B] distance matrix at once; an int: blocks of that many query rows with
        O(B·block_size) memory in the forward and backward pass (:mod:`mlx_jax.blockwise`).
        The same value and gradients in every form.

    Returns:
      scalar (or [B] for ``reduction="none"``) in the compute dtype (at least float32).
    """
    batch = prepare_batch(embeddings, labels, weights, anchors=anchors)
    num_bins = _checks.positive_int(num_bins, "num_bins")
    reductions.check_reduction(reduction, reductions.WITH_PARTS)
    # Rows of the normalized batch: rows.squared_distances gives d_qj of unit vectors.
    unit_batch = batch._replace(embeddings=l2_normalize(batch.embeddings))

    def per_rows(rows: Rows):
        positive, negative = rows.pair_masks(unit_batch)
        distances = rows.squared_distances(unit_batch)
        h_positive, h_negative = _soft_histograms(distances, positive, negative, num_bins)
        cumulative_positive = jnp.cumsum(h_positive, axis=1)
        cumulative = jnp.cumsum(h_positive + h_negative, axis=1)
        precision_sum = jnp.sum(
            reductions.safe_divide(h_positive * cumulative_positive, cumulative), axis=1
        )
        count = jnp.sum(positive, axis=1, dtype=distances.dtype)
        losses = 1.0 - reductions.safe_divide(precision_sum, count)
        return jnp.where(count > 0, losses, 0.0), jnp.where(count > 0, rows.weights, 0.0)

    losses, query_weight = map_anchor_rows(per_rows, unit_batch, block_size)
    return reductions.reduce_weighted(losses, query_weight, reduction)
