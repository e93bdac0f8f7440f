"""Circle loss, pair-wise form over a batch (Sun et al. 2020, "Circle Loss: A Unified
Perspective of Pair Similarity Optimization", CVPR)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mlx_jax import _checks, blockwise, reductions
from mlx_jax.distances import l2_normalize
from mlx_jax.losses._common import Rows, map_anchor_rows, masked_logsumexp, prepare_batch


def circle_loss(
    embeddings: jax.Array,
    labels: jax.Array,
    *,
    m: float = 0.25,
    gamma: float = 256.0,
    weights: jax.Array | None = None,
    anchors: jax.Array | None = None,
    reduction: reductions.Reduction = "mean",
    block_size: blockwise.BlockSize = "auto",
) -> jax.Array:
    """Circle loss with class-level labels, each batch sample in turn the anchor.

    With s_ij the cosine similarity of samples i and j, P(i) = {j != i: y_j = y_i} and
    N(i) = {j: y_j != y_i}, anchor i's loss is (Sun et al. 2020, Eq. 6, with the self-paced
    weights of Eq. 5 and the optima and margins of Eq. 8)::

        L_i = log[1 + Σ_{n∈N(i)} exp(γ·α_n·(s_n − Δ_n)) · Σ_{p∈P(i)} exp(−γ·α_p·(s_p − Δ_p))]

        α_p = [O_p − s_p]₊,  α_n = [s_n − O_n]₊,  O_p = 1 + m,  O_n = −m,  Δ_p = 1 − m,  Δ_n = m

    The weights α are treated as constants in back-propagation (``stop_gradient``), as in the
    paper. The loss is evaluated as softplus(logsumexp_p(·) + logsumexp_n(·)), so γ = 256
    does not overflow.

    An anchor without a positive or without a negative in the batch has no term (loss 0,
    weight 0, zero gradient).

    Args:
      embeddings: [B, D] float (any float dtype; computed in at least float32).
      labels: [B] int class ids.
      m: relaxation margin; default 0.25.
      gamma: scale factor; default 256. m = 0.25, γ = 256 is the paper's face-recognition
        setting (Sec. 4); it uses m = 0.25, γ = 128 for person re-identification and
        m = 0.4, γ = 80 for fine-grained retrieval. pytorch-metric-learning's ``CircleLoss``
        defaults to m = 0.4, γ = 80.
      weights: optional [B] per-sample weights; an anchor's term is weighted by the anchor's
        weight, and a zero-weight sample is excluded everywhere (anchor, positive, negative).
      anchors: optional [B] bool, which samples anchor loss terms (None: every sample).
        A sample with ``anchors`` False anchors nothing but is still a positive or
        negative of the anchors: scoring a batch against a reference set, e.g. the
        cross-batch memory of :func:`mlx_jax.memory.memory_loss`.
      reduction: see :mod:`mlx_jax.reductions`, over anchors; pytorch-metric-learning's
        default (``AvgNonZeroReducer``) is ``"mean_nonzero"``. ``"none"`` returns the [B]
        per-anchor weighted losses (0 for anchors without a term).
      block_size: ``"auto"`` (default): dense up to B = 2048, blocks of about 2^18 / B
        anchor rows above on CPU, dense on GPU/TPU (:func:`mlx_jax.blockwise.auto_block_size`);
        None: the [B, B] similarity matrix at once; an int: blocks of that many anchor rows with
        O(B·block_size) memory in the forward and backward pass (:mod:`mlx_jax.blockwise`).
        The same value and gradients in every form.

    Returns:
      scalar (or [B] for ``reduction="none"``) in the compute dtype (at least float32).
    """
    batch = prepare_batch(embeddings, labels, weights, anchors=anchors)
    _checks.non_negative(m, "m")
    _checks.positive(gamma, "gamma")
    reductions.check_reduction(reduction, reductions.WITH_PARTS)
    normalized = l2_normalize(batch.embeddings)

    def per_rows(rows: Rows):
        positive, negative = rows.pair_masks(batch)
        similarity = jnp.matmul(
            l2_normalize(rows.embeddings), normalized.T, precision=jax.lax.Precision.HIGHEST
        )
        fixed = jax.lax.stop_gradient(similarity)
        alpha_p = jax.nn.relu(1.0 + m - fixed)  # [O_p − s_p]₊
        alpha_n = jax.nn.relu(fixed + m)  # [s_n − O_n]₊
        positive_logits = -gamma * alpha_p * (similarity - (1.0 - m))
        negative_logits = gamma * alpha_n * (similarity - m)

        lse_p, has_positive = masked_logsumexp(positive_logits, positive)
        lse_n, has_negative = masked_logsumexp(negative_logits, negative)
        has_term = has_positive & has_negative
        losses = jnp.where(has_term, jax.nn.softplus(lse_p + lse_n), 0.0)
        return losses, jnp.where(has_term, rows.weights, 0.0)

    losses, anchor_weight = map_anchor_rows(per_rows, batch, block_size)
    return reductions.reduce_weighted(losses, anchor_weight, reduction)
