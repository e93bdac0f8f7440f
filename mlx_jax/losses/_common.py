"""Input preparation shared by every loss (checks, dtype promotion, sample weights)."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from mlx_jax import _checks, mining, reductions


class Batch(NamedTuple):
    """A checked batch: embeddings [B, D] in compute dtype, labels [B] int, weights [B] float,
    valid [B] bool (weight > 0)."""

    embeddings: jax.Array
    labels: jax.Array
    weights: jax.Array
    valid: jax.Array


def prepare_batch(embeddings, labels, weights=None, *, num_classes: int | None = None) -> Batch:
    """Checks ``embeddings`` [B, D], ``labels`` [B] and ``weights`` [B] (None → ones).

    A sample's weight scales the loss terms it anchors; a zero weight excludes the sample
    everywhere (as anchor, positive, negative or pair partner), so padded and sharded batches
    are exact.
    """
    x = _checks.embeddings_array(embeddings)
    y = _checks.labels_array(labels, x.shape[0], num_classes=num_classes)
    w = _checks.sample_weights(weights, x.shape[0], x.dtype)
    return Batch(x, y, w, w > 0)


def reduce_pair_terms(
    positive_terms: jax.Array,
    negative_terms: jax.Array,
    batch: Batch,
    reduction: str,
    balance: str = "pairs",
) -> jax.Array:
    """Reduces [B, B] per-pair losses over all ordered pairs (i, j), i != j.

    A pair's weight is its first sample's weight; zero-weight samples drop out of every pair.
    ``balance="pairs"`` reduces positive and negative pairs together; ``"pos_neg"`` reduces each
    kind on its own and adds the two (pytorch-metric-learning's convention for pair losses).
    ``reduction="none"`` returns the [B, B] matrix of weighted pair losses.
    """
    _checks.choice(balance, "balance", ("pairs", "pos_neg"))
    positive, negative = mining.pair_masks(batch.labels, batch.valid)

    def weighted(mask, terms):
        pair_weight = jnp.where(mask, batch.weights[:, None], 0.0)
        loss = jnp.where(mask, terms, 0.0) * pair_weight
        return loss, pair_weight, jnp.where(terms > 0, pair_weight, 0.0)

    pos = weighted(positive, positive_terms)
    neg = weighted(negative, negative_terms)
    if reduction == "none":
        return pos[0] + neg[0]
    if balance == "pos_neg":
        return reductions.reduce_terms(pos[0], pos[1], reduction, pos[2]) + reductions.reduce_terms(
            neg[0], neg[1], reduction, neg[2]
        )
    return reductions.reduce_terms(pos[0] + neg[0], pos[1] + neg[1], reduction, pos[2] + neg[2])
