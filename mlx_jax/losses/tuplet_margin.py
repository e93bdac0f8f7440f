"""Tuplet margin loss (Yu & Tao 2019, "Deep Metric Learning with Tuplet Margin Loss", ICCV)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from mlx_jax import _checks, blockwise, reductions
from mlx_jax.distances import HIGHEST, l2_normalize
from mlx_jax.losses._common import (
    Rows,
    map_anchor_rows,
    masked_logsumexp,
    pair_row_sums,
    prepare_batch,
)
from mlx_jax.losses.margin_softmax import combined_margin_target

__all__ = ["tuplet_margin_loss"]


def _check_margin(margin) -> None:
    """0 <= margin <= 180 degrees when concrete (traced values pass through)."""
    _checks.non_negative(margin, "margin")
    if _checks.is_concrete(margin) and np.ndim(margin) == 0 and float(margin) > 180.0:
        raise ValueError(f"margin must be in [0, 180] degrees, got {margin}")


def tuplet_margin_loss(
    embeddings: jax.Array,
    labels: jax.Array,
    *,
    margin: float = 5.73,
    scale: float = 64.0,
    weights: jax.Array | None = None,
    anchors: jax.Array | None = None,
    reduction: reductions.Reduction = "mean",
    block_size: blockwise.BlockSize = "auto",
) -> jax.Array:
    """Tuplet margin loss over every positive pair, the anchor's negatives as the tuplet.

    With θ_ij the angle between the embeddings i and j (cos θ_ij their cosine similarity),
    P(a) = {p != a: y_p = y_a} and N(a) = {n: y_n != y_a}, the term of the positive pair (a, p)
    is (Yu & Tao 2019, Eq. 5, with the slack margin β on the positive angle)::

        ℓ(a, p) = log(1 + Σ_{n∈N(a)} exp(s·(cos θ_an − cos(θ_ap − β))))

    evaluated as softplus(logsumexp_n(s·cos θ_an) − s·cos(θ_ap − β)) (max-subtracted: s = 64
    cannot overflow). The slackened target cos(θ_ap − β) is largest at θ_ap = β, so the loss
    pulls a positive to the angle β from its anchor rather than onto it (a closer one is
    pushed out to β): the slack that keeps the embedding from overfitting hard positives.

    cos(θ − β) = cos θ·cos β + sin θ·sin β with sin θ = √(1 − cos²θ) through a square root with
    a zero derivative at 0 (:func:`mlx_jax.losses.margin_softmax.combined_margin_target`
    with m2 = −β), so there is no arccos on the gradient path and the derivative is finite at
    cos θ = ±1 (a duplicate of the anchor); see :mod:`mlx_jax.losses.margin_softmax`.

    The paper's Eq. 6 adds an intra-pair variance term; pytorch-metric-learning keeps it as
    the separate ``IntraPairVarianceLoss`` and so does this library: it is not part of this
    loss.

    Every ordered positive pair is a term. A positive pair whose anchor has no negative has
    the term log(1) = 0 with zero gradient (it still counts in ``"mean"``); a batch without
    positive pairs (every sample its own class, all weights zero) gives 0 with zero
    gradients, and so does a one-class batch.

    Same value and gradients as pytorch-metric-learning's ``TupletMarginLoss(margin=5.73,
    scale=64)`` with its default ``MeanReducer`` (``reduction="mean"``), which computes
    cos(θ − β) through ``acos`` (an infinite derivative at cos θ = ±1).

    Args:
      embeddings: [B, D] float (any float dtype; computed in at least float32). Normalised
        here (cosine similarity); a zero vector has similarity 0 to everything.
      labels: [B] int class ids.
      margin: β in degrees, 0 <= β <= 180; default 5.73° (0.1 rad), pytorch-metric-learning's
        ``TupletMarginLoss`` default.
      scale: s > 0, the logit scale; default 64, pytorch-metric-learning's default.
      weights: optional [B] per-sample weights; a pair's term carries its anchor's weight, and
        a zero-weight sample is excluded everywhere (anchor, positive, negative).
      anchors: optional [B] bool, which samples anchor loss terms (None: every sample).
        A sample with ``anchors`` False anchors nothing but is still a positive or
        negative of the anchors: scoring a batch against a reference set, e.g. the
        cross-batch memory of :func:`mlx_jax.memory.memory_loss`.
      reduction: see :mod:`mlx_jax.reductions`, over the positive pairs. ``"mean"``
        (default): the average over all positive pairs, PML's ``MeanReducer``. ``"none"``
        returns the [B, B] matrix of weighted pair terms (entry (a, p) for positive pairs, 0
        elsewhere).
      block_size: ``"auto"`` (default): dense up to B = 2048, blocks of about 2^18 / B
        anchor rows above on CPU, dense on GPU/TPU (:func:`mlx_jax.blockwise.auto_block_size`);
        None: the [B, B] similarity matrix at once; an int: blocks of that many anchor rows with
        O(B·block_size) memory in the forward and backward pass (:mod:`mlx_jax.blockwise`).
        The same value and gradients in every form.

    Returns:
      scalar (or [B, B] for ``reduction="none"``) in the compute dtype (at least float32).
    """
    batch = prepare_batch(embeddings, labels, weights, anchors=anchors)
    _check_margin(margin)
    _checks.positive(scale, "scale")
    reductions.check_reduction(reduction, reductions.WITH_PARTS)
    slack = margin * (math.pi / 180.0)
    normalized = l2_normalize(batch.embeddings)

    def per_rows(rows: Rows):
        positive, negative = rows.pair_masks(batch)
        anchors = normalized if rows.every_row else l2_normalize(rows.embeddings)
        cosine = jnp.matmul(anchors, normalized.T, precision=HIGHEST)
        # cos(θ + m2) with m2 = −β is the slackened positive target cos(θ − β)
        target = combined_margin_target(cosine, 1.0, -slack, 0.0, "none")
        log_negatives, has_negative = masked_logsumexp(scale * cosine, negative)
        terms = jnp.where(
            has_negative[:, None], jax.nn.softplus(log_negatives[:, None] - scale * target), 0.0
        )
        if reduction == "none":
            return jnp.where(positive, terms, 0.0) * rows.weights[:, None]
        return pair_row_sums(positive, terms, rows.weights)

    result = map_anchor_rows(per_rows, batch, block_size)
    if reduction == "none":
        return result
    return reductions.reduce_terms(result.loss, result.weight, reduction, result.nonzero)
