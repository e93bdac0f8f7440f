"""Multi-Similarity loss over a batch (Wang et al. 2019, "Multi-Similarity Loss with General Pair
Weighting for Deep Metric Learning", CVPR)."""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp

from mlx_jax import _checks, blockwise, reductions
from mlx_jax.distances import l2_normalize
from mlx_jax.losses._common import Rows, log_one_plus_sum_exp, map_anchor_rows, prepare_batch
from mlx_jax.mining import multi_similarity_pairs_rows

Mining = Literal["multi_similarity"] | None
MININGS: tuple[str | None, ...] = (None, "multi_similarity")


def multi_similarity_loss(
    embeddings: jax.Array,
    labels: jax.Array,
    *,
    alpha: float = 2.0,
    beta: float = 50.0,
    base: float = 0.5,
    epsilon: float = 0.1,
    weights: jax.Array | None = None,
    anchors: jax.Array | None = None,
    reduction: reductions.Reduction = "mean",
    block_size: blockwise.BlockSize = "auto",
    mining: Mining = None,
) -> jax.Array:
    """Multi-Similarity (MS) loss with class-level labels, each batch sample in turn the anchor.

    With S_ik the cosine similarity of the L2-normalised embeddings i and k, P_i = {k != i:
    y_k = y_i} and N_i = {k: y_k != y_i}, anchor i's loss is (Wang et al. 2019, Eq. 11)::

        L_i = 1/α · log[1 + Σ_{k∈P_i} exp(−α·(S_ik − λ))]
            + 1/β · log[1 + Σ_{k∈N_i} exp(β·(S_ik − λ))]

    and the batch loss is their mean, 1/m Σ_i L_i over the m samples of the batch (Eq. 11).
    Each part is evaluated as a logsumexp over the set and a 0 logit for the "1", shifted by its
    maximum, so β = 50 (or far larger) never overflows, in float32 either.

    An empty set contributes log(1 + 0) = 0 with zero gradient: an anchor without positives
    (a singleton class) keeps only its negative part, an anchor without negatives (a one-class
    batch) only its positive part. Every valid anchor still counts in ``"mean"``'s denominator,
    as in Eq. 11's 1/m and pytorch-metric-learning's default reducer.

    ``mining="multi_similarity"`` first mines the pairs (the paper's Eq. 9 and 10, with margin
    ``epsilon``; :func:`mlx_jax.mining.multi_similarity_pairs`): a negative is kept if
    S_ik + ε > min_{j∈P_i} S_ij, a positive if S_ij − ε < max_{k∈N_i} S_ik, and P_i, N_i above
    become the kept pairs. An anchor without positives or without negatives has no reference for
    the other side and keeps no pair at all (loss 0, still counted by ``"mean"``), as with PML's
    ``MultiSimilarityMiner``. The mined sets are piecewise constant in the embeddings: no gradient
    flows through the mining. ``mining=None`` (default) uses every pair, PML's
    ``MultiSimilarityLoss`` alone. (The authors' released code differs in two details: it drops
    an anchor's whole term when either mined side is empty, and it drops positives with
    S ≥ 1 − 1e-5, i.e. duplicates of the anchor.)

    Args:
      embeddings: [B, D] float (any float dtype; computed in at least float32).
      labels: [B] int class ids.
      alpha: α, the scale of the positive part (> 0); default 2.
      beta: β, the scale of the negative part (> 0); default 50.
      base: λ, the similarity margin both parts are shifted by; default 0.5.
        The defaults α = 2, β = 50, λ = 0.5 are pytorch-metric-learning's
        ``MultiSimilarityLoss(alpha=2, beta=50, base=0.5)``. λ = 0.5 is also the ``thresh`` of
        the authors' released code (MalongTech/research-ms-loss, whose default config sets
        β = 40); reimplementations that follow the paper's Sec. 5.1 use α = 2, β = 50, λ = 1:
        pass ``base=1.0`` for that.
      epsilon: ε, the mining margin (>= 0), used only with ``mining="multi_similarity"``;
        default 0.1 (PML's ``MultiSimilarityMiner`` default, the margin of the authors' code).
      weights: optional [B] per-sample weights; an anchor's term is weighted by the anchor's
        weight, and a zero-weight sample is excluded everywhere (anchor, positive, negative, and
        the mining's hardest pairs).
      anchors: optional [B] bool, which samples anchor loss terms (None: every sample).
        A sample with ``anchors`` False anchors nothing but is still a positive or
        negative of the anchors: scoring a batch against a reference set, e.g. the
        cross-batch memory of :func:`mlx_jax.memory.memory_loss`.
      reduction: see :mod:`mlx_jax.reductions`, over anchors. ``"mean"`` (default) is Eq. 11
        and PML's ``MeanReducer`` (its default for this loss): the weighted mean over all valid
        anchors. ``"mean_nonzero"`` averages over anchors whose loss is > 0, i.e. those with at
        least one pair (after mining). ``"none"`` returns the [B] per-anchor weighted losses.
      block_size: ``"auto"`` (default): dense up to B = 2048, blocks of about 2^18 / B
        anchor rows above on CPU, dense on GPU/TPU (:func:`mlx_jax.blockwise.auto_block_size`);
        None: the [B, B] similarity matrix at once; an int: blocks of that many anchor rows with
        O(B·block_size) memory in the forward and backward pass (:mod:`mlx_jax.blockwise`).
        The same value and gradients in every form, with or without mining.
      mining: ``None`` (all pairs) or ``"multi_similarity"`` (see above).

    Returns:
      scalar (or [B] for ``reduction="none"``) in the compute dtype (at least float32).
    """
    batch = prepare_batch(embeddings, labels, weights, anchors=anchors)
    _checks.positive(alpha, "alpha")
    _checks.positive(beta, "beta")
    _checks.non_negative(epsilon, "epsilon")
    reductions.check_reduction(reduction, reductions.WITH_PARTS)
    _checks.choice(mining, "mining", MININGS)
    normalized = l2_normalize(batch.embeddings)

    def per_rows(rows: Rows):
        positive, negative = rows.pair_masks(batch)
        similarity = jnp.matmul(
            l2_normalize(rows.embeddings), normalized.T, precision=jax.lax.Precision.HIGHEST
        )
        if mining == "multi_similarity":
            positive, negative = multi_similarity_pairs_rows(
                similarity, positive, negative, epsilon=epsilon
            )
        positive_part = log_one_plus_sum_exp(-alpha * (similarity - base), positive) / alpha
        negative_part = log_one_plus_sum_exp(beta * (similarity - base), negative) / beta
        return positive_part + negative_part, rows.weights

    losses, anchor_weight = map_anchor_rows(per_rows, batch, block_size)
    return reductions.reduce_weighted(losses, anchor_weight, reduction)
