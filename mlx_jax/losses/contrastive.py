"""Contrastive loss over all pairs of a batch (Hadsell, Chopra & LeCun 2006)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mlx_jax import _checks, blockwise, reductions
from mlx_jax.distances import safe_sqrt
from mlx_jax.losses._common import Rows, map_anchor_rows, pair_rows, prepare_batch, reduce_pair_rows


def contrastive_loss(
    embeddings: jax.Array,
    labels: jax.Array,
    *,
    margin: float = 1.0,
    squared: bool = True,
    pos_margin: float = 0.0,
    neg_margin: float | None = None,
    balance: reductions.Balance = "pairs",
    weights: jax.Array | None = None,
    anchors: jax.Array | None = None,
    reduction: reductions.Reduction = "mean",
    block_size: blockwise.BlockSize = "auto",
) -> jax.Array:
    """Contrastive loss over every ordered pair (i, j), i != j, of the batch.

    With D = ‖x_i − x_j‖₂ and Y = 0 for a same-class pair, 1 otherwise:

    * ``squared=True`` (Hadsell et al. 2006, Eq. 4, the default)::

        L(i, j) = (1 − Y)·½·D² + Y·½·max(0, m − D)²

    * ``squared=False`` (pytorch-metric-learning's ``ContrastiveLoss``)::

        L(i, j) = (1 − Y)·max(0, D − pos_margin) + Y·max(0, neg_margin − D)

    Args:
      embeddings: [B, D] float (any float dtype; computed in at least float32).
      labels: [B] int class ids.
      margin: m of Hadsell et al.; default 1.0 (their experiments, and PML's ``neg_margin``).
      squared: paper form (True) or PML's non-squared hinges (False).
      pos_margin: PML's positive margin (only with ``squared=False``); PML default 0.
      neg_margin: PML's negative margin (only with ``squared=False``); defaults to ``margin``.
      balance: ``"pairs"`` averages over all pairs together; ``"pos_neg"`` reduces positive
        and negative pairs separately and adds the two (PML's convention).
      weights: optional [B] per-sample weights; a pair's weight is its first sample's weight,
        and zero-weight samples are excluded from every pair.
      anchors: optional [B] bool, which samples anchor loss terms (None: every sample).
        A sample with ``anchors`` False anchors nothing but is still a positive or
        negative of the anchors: scoring a batch against a reference set, e.g. the
        cross-batch memory of :func:`mlx_jax.memory.memory_loss`.
      reduction: see :mod:`mlx_jax.reductions`; PML's default is ``"mean_nonzero"``. Each
        unordered pair counts twice, as (i, j) and (j, i) (PML does the same), which
        ``"mean"`` cancels and ``"sum"`` does not.
        ``"none"`` returns the [B, B] matrix of weighted pair losses.
      block_size: ``"auto"`` (default): dense up to B = 2048, blocks of about 2^18 / B
        anchor rows above on CPU, dense on GPU/TPU (:func:`mlx_jax.blockwise.auto_block_size`);
        None: the [B, B] distance matrix at once; an int: blocks of that many anchor rows with
        O(B·block_size) memory in the forward and backward pass (:mod:`mlx_jax.blockwise`).
        The same value and gradients in every form.

    Returns:
      float32 scalar (or [B, B] for ``reduction="none"``).
    """
    batch = prepare_batch(embeddings, labels, weights, anchors=anchors)
    _checks.non_negative(margin, "margin")
    _checks.choice(balance, "balance", reductions.BALANCES)
    reductions.check_reduction(reduction, reductions.WITH_PARTS)
    if squared and (pos_margin != 0.0 or neg_margin is not None):
        raise ValueError(
            "pos_margin/neg_margin are PML's non-squared hinges: pass squared=False with them "
            "(the squared Hadsell form uses margin)"
        )
    neg_margin = margin if neg_margin is None else neg_margin

    def per_rows(rows: Rows):
        squared_distance = rows.squared_distances(batch)
        distance = safe_sqrt(squared_distance)
        if squared:
            positive_terms = 0.5 * squared_distance
            negative_terms = 0.5 * jnp.square(jax.nn.relu(margin - distance))
        else:
            positive_terms = jax.nn.relu(distance - pos_margin)
            negative_terms = jax.nn.relu(neg_margin - distance)
        return pair_rows(rows, batch, positive_terms, negative_terms, reduction)

    return reduce_pair_rows(map_anchor_rows(per_rows, batch, block_size), reduction, balance)
