"""Lifted structured losses over all pairs of a batch: the lifted structure loss (Song, Xiang,
Jegelka & Savarese 2016, "Deep Metric Learning via Lifted Structured Feature Embedding", CVPR)
and its generalized form (Hermans, Beyer & Leibe 2017, "In Defense of the Triplet Loss for
Person Re-Identification", arXiv:1703.07737).

Both take D_ij = ‖x_i − x_j‖₂, the plain (non-squared) Euclidean distance of the embeddings as
given, as both papers do, with a square root whose gradient is 0 (not inf) at D = 0
(:func:`mlx_jax.distances.safe_sqrt`), so duplicate embeddings keep finite gradients. Every
log-sum-exp subtracts its maximum (:func:`mlx_jax.losses._common.masked_logsumexp`).

pytorch-metric-learning's ``LiftedStructureLoss`` and ``GeneralizedLiftedStructureLoss`` compute
the same values with ``distance=LpDistance(normalize_embeddings=False)``; their default distance
L2-normalizes the embeddings first, which equals these functions applied to
``mlx_jax.distances.l2_normalize(embeddings)``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mlx_jax import blockwise, reductions
from mlx_jax.distances import safe_sqrt
from mlx_jax.losses._common import (
    Batch,
    Rows,
    map_anchor_rows,
    masked_logsumexp,
    pair_row_sums,
    prepare_batch,
)


def _distances(rows: Rows, batch: Batch) -> jax.Array:
    """D [R, B]: Euclidean distances of the rows to every sample, finite gradient at 0."""
    return safe_sqrt(rows.squared_distances(batch))


def lifted_structure_loss(
    embeddings: jax.Array,
    labels: jax.Array,
    *,
    neg_margin: float = 1.0,
    pos_margin: float = 0.0,
    weights: jax.Array | None = None,
    anchors: jax.Array | None = None,
    reduction: reductions.Reduction = "mean",
    block_size: blockwise.BlockSize = "auto",
) -> jax.Array:
    """Lifted structure loss over every positive pair, with all negatives of both its samples.

    With D_ij = ‖x_i − x_j‖₂, P the positive pairs (same label, i != j) and N_i = {k: y_k !=
    y_i}, the pair (i, j) ∈ P has (Song et al. 2016, Eq. 4, the smooth bound of Eq. 3)::

        J_ij = log( Σ_{k∈N_i} exp(α − D_ik) + Σ_{l∈N_j} exp(α − D_jl) ) + D_ij − m_pos

        L = 1/(2|P|) · Σ_{(i,j)∈P} [J_ij]₊²

    with α = ``neg_margin`` and m_pos = ``pos_margin`` (0 in the paper, which has no such
    term). J_ij = J_ji, so L is the same whether P holds unordered or ordered pairs: here every
    ordered pair (i, j) is a term ½·[J_ij]₊², and ``"mean"`` (their average) is Eq. 4.

    Evaluated in two row-blocked passes: the per-sample n_i = log Σ_{k∈N_i} exp(α − D_ik),
    then the pairs, J_ij = logaddexp(n_i, n_j) + D_ij − m_pos; gradients flow through both.

    Degenerate batches: a batch without positive pairs (every sample its own class) has no
    term and gives 0. A positive pair has N_i = N_j, so if it has no negative, no sample has one
    (a one-class batch): the sum in the log is empty, J_ij = −∞ and its term is 0 — the loss is
    0 with zero gradients, as Eq. 4 reads and as PML returns.

    pytorch-metric-learning: ``LiftedStructureLoss(neg_margin=α, pos_margin=m_pos,
    distance=LpDistance(normalize_embeddings=False))`` gives the same value and gradients: it
    computes ½·relu(J_ij)² for every ordered positive pair and reduces them with its default
    ``MeanReducer`` (``reduction="mean"``; its ``AvgNonZeroReducer`` is ``"mean_nonzero"``, its
    ``SumReducer`` ``"sum"``). Its default distance L2-normalizes the embeddings (see the module
    docstring).

    Args:
      embeddings: [B, D] float (any float dtype; computed in at least float32). Not normalized.
      labels: [B] int class ids.
      neg_margin: α, the margin of the negative pairs; default 1.0 (pytorch-metric-learning's
        ``neg_margin`` default).
      pos_margin: m_pos, subtracted from D_ij; default 0.0 (Eq. 4 and pytorch-metric-learning).
      weights: optional [B] per-sample weights; the ordered pair (i, j) has its first sample's
        weight w_i, and a zero-weight sample is excluded everywhere (from the pairs and from
        every N_k).
      anchors: optional [B] bool, which samples anchor loss terms (None: every sample).
        A sample with ``anchors`` False anchors nothing but is still a positive or
        negative of the anchors: scoring a batch against a reference set, e.g. the
        cross-batch memory of :func:`mlx_jax.memory.memory_loss`.
      reduction: see :mod:`mlx_jax.reductions`, over ordered positive pairs. ``"mean"``
        (default) is Eq. 4; ``"sum"`` is Σ over unordered pairs of [J_ij]₊² (each ordered pair
        adds half); ``"mean_nonzero"`` averages over the pairs with J_ij > 0; ``"none"``
        returns the [B, B] matrix of weighted terms ½·w_i·[J_ij]₊² (0 off the positive pairs).
      block_size: ``"auto"`` (default): dense up to B = 2048, blocks of about 2^18 / B
        anchor rows above on CPU, dense on GPU/TPU (:func:`mlx_jax.blockwise.auto_block_size`);
        None: the [B, B] distance matrix at once; an int: blocks of that many rows with
        O(B·block_size) memory in the forward and backward pass (:mod:`mlx_jax.blockwise`), in
        both passes. The same value and gradients in every form.

    Returns:
      scalar (or [B, B] for ``reduction="none"``) in the compute dtype (at least float32).
    """
    batch = prepare_batch(embeddings, labels, weights, anchors=anchors)
    reductions.check_reduction(reduction, reductions.WITH_PARTS)

    def negative_rows(rows: Rows):
        _, negative = rows.pair_masks(batch)
        return masked_logsumexp(neg_margin - _distances(rows, batch), negative)

    # every sample's negatives, anchor or not: a pair (i, j) needs j's as well as i's
    every_row = batch._replace(anchor_weights=batch.weights, anchor_rows=None)
    negative_lse, has_negative = map_anchor_rows(negative_rows, every_row, block_size)

    def pair_rows(rows: Rows, row_lse: jax.Array, row_has_negative: jax.Array):
        positive, _ = rows.pair_masks(batch)
        lse = jnp.logaddexp(row_lse[:, None], negative_lse[None, :])
        hinge = jax.nn.relu(lse + _distances(rows, batch) - pos_margin)
        # a positive pair's samples share N_i = N_j: no negative means an empty sum (J = −∞)
        live = positive & row_has_negative[:, None]
        terms = jnp.where(live, 0.5 * jnp.square(hinge), 0.0)
        if reduction == "none":
            return terms * rows.weights[:, None]
        return pair_row_sums(positive, terms, rows.weights)

    result = map_anchor_rows(pair_rows, batch, block_size, negative_lse, has_negative)
    if reduction == "none":
        return result
    return reductions.reduce_terms(result.loss, result.weight, reduction, result.nonzero)


def generalized_lifted_structure_loss(
    embeddings: jax.Array,
    labels: jax.Array,
    *,
    neg_margin: float = 1.0,
    pos_margin: float = 0.0,
    weights: jax.Array | None = None,
    anchors: jax.Array | None = None,
    reduction: reductions.Reduction = "mean",
    block_size: blockwise.BlockSize = "auto",
) -> jax.Array:
    """Generalized lifted structure loss, each batch sample in turn the anchor.

    With D_ij = ‖x_i − x_j‖₂, P(a) = {p != a: y_p = y_a} and N(a) = {n: y_n != y_a}, anchor a's
    loss is (Hermans et al. 2017, Eq. 6, with m = ``neg_margin``; ``pos_margin`` m_pos is
    pytorch-metric-learning's addition, 0 in the paper)::

        L_a = [ log Σ_{p∈P(a)} exp(D_ap − m_pos) + log Σ_{n∈N(a)} exp(m − D_an) ]₊

    a smooth form of the batch-hard triplet loss's hardest positive and hardest negative.
    Eq. 6 sums L_a over the anchors (``reduction="sum"``); the default ``"mean"`` averages them
    over the B anchors, as pytorch-metric-learning does.

    Empty sets: as in pytorch-metric-learning, the log-sum-exp over an empty set is taken as 0
    (with zero gradient), so an anchor without positives (a singleton class) keeps
    [log Σ_n exp(m − D_an)]₊ and pushes its negatives away, and an anchor without negatives
    (a one-class batch) keeps [log Σ_p exp(D_ap − m_pos)]₊ and pulls its positives in. A
    literal reading of Eq. 6 would make log 0 = −∞ and such an anchor's loss 0; the paper's
    P×K batches (P, K >= 2) have no such anchor. Both kinds of anchor count in ``"mean"``.
    A sample with neither (a batch of one valid sample) has loss 0.

    pytorch-metric-learning: ``GeneralizedLiftedStructureLoss(neg_margin=m, pos_margin=m_pos,
    distance=LpDistance(normalize_embeddings=False))`` gives the same value and gradients with
    its default ``MeanReducer`` over the B anchors (``reduction="mean"``;
    ``AvgNonZeroReducer`` is ``"mean_nonzero"``). Its default distance L2-normalizes the
    embeddings (see the module docstring).

    Args:
      embeddings: [B, D] float (any float dtype; computed in at least float32). Not normalized.
      labels: [B] int class ids.
      neg_margin: m, the margin of the negatives; default 1.0 (pytorch-metric-learning's
        default; the paper gives no value for this loss).
      pos_margin: m_pos, subtracted from every D_ap; default 0.0 (Eq. 6 and
        pytorch-metric-learning).
      weights: optional [B] per-sample weights; an anchor's loss is weighted by the anchor's
        weight, and a zero-weight sample is excluded everywhere (anchor, positive, negative).
      anchors: optional [B] bool, which samples anchor loss terms (None: every sample).
        A sample with ``anchors`` False anchors nothing but is still a positive or
        negative of the anchors: scoring a batch against a reference set, e.g. the
        cross-batch memory of :func:`mlx_jax.memory.memory_loss`.
      reduction: see :mod:`mlx_jax.reductions`, over anchors. ``"none"`` returns the [B]
        per-anchor weighted losses.
      block_size: ``"auto"`` (default): dense up to B = 2048, blocks of about 2^18 / B
        anchor rows above on CPU, dense on GPU/TPU (:func:`mlx_jax.blockwise.auto_block_size`);
        None: the [B, B] distance matrix at once; an int: blocks of that many anchor rows with
        O(B·block_size) memory in the forward and backward pass (:mod:`mlx_jax.blockwise`).
        The same value and gradients in every form.

    Returns:
      scalar (or [B] for ``reduction="none"``) in the compute dtype (at least float32).
    """
    batch = prepare_batch(embeddings, labels, weights, anchors=anchors)
    reductions.check_reduction(reduction, reductions.WITH_PARTS)

    def per_rows(rows: Rows):
        positive, negative = rows.pair_masks(batch)
        distance = _distances(rows, batch)
        positive_lse, _ = masked_logsumexp(distance - pos_margin, positive)
        negative_lse, _ = masked_logsumexp(neg_margin - distance, negative)
        return jax.nn.relu(positive_lse + negative_lse), rows.weights

    losses, anchor_weight = map_anchor_rows(per_rows, batch, block_size)
    return reductions.reduce_weighted(losses, anchor_weight, reduction)
