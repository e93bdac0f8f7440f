"""Siamese cosine regression loss over all pairs of a batch (Bromley et al. 1993)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mlx_jax import reductions
from mlx_jax.distances import cosine_similarity
from mlx_jax.losses._common import prepare_batch, reduce_pair_terms


def siamese_cosine_loss(
    embeddings: jax.Array,
    labels: jax.Array,
    *,
    positive_target: float = 1.0,
    negative_target: float = -0.9,
    balance: reductions.Balance = "pairs",
    weights: jax.Array | None = None,
    anchors: jax.Array | None = None,
    reduction: reductions.Reduction = "mean",
) -> jax.Array:
    """Squared error between each pair's cosine and its target (Bromley, Guyon, LeCun,
    Säckinger & Shah 1993, "Signature Verification using a 'Siamese' Time Delay Neural
    Network", NIPS 6).

    For every ordered pair (i, j), i != j, with c_ij = cos(x_i, x_j)::

        L(i, j) = (c_ij − t_ij)²,   t_ij = positive_target if y_i = y_j else negative_target

    The paper trained the two sub-networks to output cosine 1.0 for genuine signature pairs
    and −0.9 for genuine/forgery pairs (it also tried −1.0); these are the defaults. A zero
    embedding has cosine 0 to everything and finite gradients (eps-safe normalization, see
    :mod:`mlx_jax.distances`).

    Args:
      embeddings: [B, D] float (any float dtype; computed in at least float32).
      labels: [B] int class ids.
      positive_target: cosine target of same-class pairs; default 1.0 (the paper's).
      negative_target: cosine target of different-class pairs; default −0.9 (the paper's).
      balance: ``"pairs"`` averages over all pairs together; ``"pos_neg"`` reduces positive
        and negative pairs separately and adds the two (pytorch-metric-learning's convention).
      weights: optional [B] per-sample weights; a pair's weight is its first sample's weight,
        and zero-weight samples are excluded from every pair.
      anchors: optional [B] bool, which samples anchor loss terms (None: every sample).
        A sample with ``anchors`` False anchors nothing but is still a positive or
        negative of the anchors: scoring a batch against a reference set, e.g. the
        cross-batch memory of :func:`mlx_jax.memory.memory_loss`.
      reduction: see :mod:`mlx_jax.reductions`. ``"none"`` returns the [B, B] matrix of
        weighted pair losses (0 on the diagonal).

    Returns:
      scalar (or [B, B] for ``reduction="none"``) in the compute dtype (at least float32).
    """
    batch = prepare_batch(embeddings, labels, weights, anchors=anchors)
    cosine = cosine_similarity(batch.embeddings)
    positive_terms = jnp.square(cosine - positive_target)
    negative_terms = jnp.square(cosine - negative_target)
    return reduce_pair_terms(positive_terms, negative_terms, batch, reduction, balance)
