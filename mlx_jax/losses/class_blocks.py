"""Softmax cross-entropy of a margin head computed over blocks of classes: no [B, C] array.

With normalized embeddings x̂ [B, D], normalized class weights ŵ [D, C], per-sample scales
s_i and target cosines t_i (the margin already applied, see
:mod:`mlx_jax.losses.margin_softmax`), the margin heads' per-sample loss is (ArcFace paper,
Deng et al. 2019, Eq. 4)

    z_ij = s_i · (t_i if j = y_i else x̂_i · ŵ_j),     L_i = logsumexp_j z_ij − s_i · t_i.

At large C the dense form is memory-bound: it writes the [B, C] cosines and reads them back
several times (B = 1024, C = 100,000: 400 MB per pass). Here the classes are visited in blocks
of ``block_size`` columns with an online log-sum-exp (running max and rescaled sum, as in
Milakov & Gimelshein 2018, "Online normalizer calculation for softmax"), so only a
[B, block_size] tile exists at a time and it stays in cache. The backward pass recomputes each
tile's cosines from the saved log-normalizer (one extra [B, D]×[D, block] matmul per block) and
forms ∂x̂ = Σ_blocks G·ŵ_bᵀ and ∂ŵ_b = x̂ᵀ·G with G_ij = s_i·g_i·p_ij off the target column.
Memory: O(B·block_size + D·C) instead of O(B·C); values and gradients equal the dense form to
float rounding (``tests/test_class_blocks.py``). Reverse mode only (``jax.custom_vjp``). The
recomputed matmul costs about what the avoided [B, C] passes save: this buys memory, not speed
(timings in BENCHMARKS.md).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from mlx_jax.distances import HIGHEST
from mlx_jax.parallel import match_varying_axes

__all__ = ["blockwise_margin_cross_entropy", "target_cosines"]


def target_cosines(x_hat: jax.Array, w_hat: jax.Array, labels: jax.Array) -> jax.Array:
    """cos θ_{i, y_i} = x̂_i · ŵ_{y_i} [B] from a gather of the label columns (O(B·D));
    NaN for a label outside ``[0, C)``, like :func:`~mlx_jax.losses.softmax.take_target`."""
    num_classes = w_hat.shape[1]
    index = jnp.where(labels < 0, num_classes, labels)  # negative labels must not wrap
    columns = jnp.take(w_hat, index, axis=1, mode="fill", fill_value=jnp.nan)  # [D, B]
    return jnp.sum(x_hat * columns.T, axis=1)


def _column_blocks(w_hat: jax.Array, block_size: int) -> jax.Array:
    """ŵ [D, C] → [num_blocks, D, block_size], the last block zero-padded."""
    dim, num_classes = w_hat.shape
    num_blocks = -(-num_classes // block_size)
    padded = jnp.pad(w_hat, ((0, 0), (0, num_blocks * block_size - num_classes)))
    return padded.reshape(dim, num_blocks, block_size).transpose(1, 0, 2)


def _tile(x_hat, w_block, target_cosine, labels, start, num_classes):
    """One block's replaced cosines [B, block], its target and valid-column masks."""
    columns = start + jnp.arange(w_block.shape[1], dtype=labels.dtype)
    cosines = jnp.matmul(x_hat, w_block, precision=HIGHEST)
    is_target = labels[:, None] == columns[None, :]
    valid = (columns < num_classes)[None, :]
    return jnp.where(is_target, target_cosine[:, None], cosines), is_target, valid


def blockwise_margin_cross_entropy(
    x_hat: jax.Array,
    w_hat: jax.Array,
    target_cosine: jax.Array,
    labels: jax.Array,
    row_scale: jax.Array,
    block_size: int,
) -> jax.Array:
    """Per-sample margin softmax cross-entropy [B] over blocks of ``block_size`` classes.

    Args:
      x_hat: [B, D] float, L2-normalized embeddings (compute dtype).
      w_hat: [D, C] float, L2-normalized class-weight columns.
      target_cosine: [B] t_i, the target logit's cosine after the margin.
      labels: [B] int class ids; a label outside ``[0, C)`` gives NaN only through a NaN
        ``target_cosine`` (:func:`target_cosines` provides it).
      row_scale: [B] float s_i (a fixed scale broadcast, or SphereFace's ‖x_i‖).
      block_size: classes per block (static Python int >= 1).

    Returns:
      [B] ``logsumexp_j z_ij − s_i·t_i`` in the dtype of ``x_hat``; gradients flow to
      ``x_hat``, ``w_hat``, ``target_cosine`` and ``row_scale`` (inside ``shard_map``, a
      replicated one's summed over the axis: :func:`~mlx_jax.parallel.match_varying_axes`).
    """
    x_hat, w_hat, target_cosine, labels, row_scale = match_varying_axes(
        x_hat, w_hat, target_cosine, labels, row_scale
    )
    return _blockwise_margin_cross_entropy(
        x_hat, w_hat, target_cosine, labels, row_scale, block_size
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _blockwise_margin_cross_entropy(x_hat, w_hat, target_cosine, labels, row_scale, block_size):
    return _forward(x_hat, w_hat, target_cosine, labels, row_scale, block_size)[0]


def _forward(x_hat, w_hat, target_cosine, labels, row_scale, block_size):
    num_classes = w_hat.shape[1]
    blocks = _column_blocks(w_hat, block_size)

    def step(carry, inputs):
        running_max, running_sum = carry
        index, w_block = inputs
        replaced, _, valid = _tile(
            x_hat, w_block, target_cosine, labels, index * block_size, num_classes
        )
        logits = jnp.where(valid, row_scale[:, None] * replaced, -jnp.inf)
        new_max = jnp.maximum(running_max, jnp.max(logits, axis=1))
        # exp(−inf − finite) = 0 drops the empty start; a NaN logit poisons its row on purpose
        rescaled = running_sum * jnp.exp(running_max - new_max)
        new_sum = rescaled + jnp.sum(jnp.exp(logits - new_max[:, None]), axis=1)
        return (new_max, new_sum), None

    # *_like keeps the rows' shard_map varying axes, which scan requires of its carry
    start = (jnp.full_like(target_cosine, -jnp.inf), jnp.zeros_like(target_cosine))
    indices = jnp.arange(blocks.shape[0])
    (row_max, row_sum), _ = jax.lax.scan(step, start, (indices, blocks))
    log_normalizer = row_max + jnp.log(row_sum)
    terms = log_normalizer - row_scale * target_cosine
    return terms, (x_hat, w_hat, target_cosine, labels, row_scale, log_normalizer)


def _backward(block_size, residuals, g):
    x_hat, w_hat, target_cosine, labels, row_scale, log_normalizer = residuals
    num_classes = w_hat.shape[1]
    blocks = _column_blocks(w_hat, block_size)
    scaled_g = row_scale * g

    def step(carry, inputs):
        d_x, d_scale = carry
        index, w_block = inputs
        replaced, is_target, valid = _tile(
            x_hat, w_block, target_cosine, labels, index * block_size, num_classes
        )
        probability = jnp.where(
            valid, jnp.exp(row_scale[:, None] * replaced - log_normalizer[:, None]), 0.0
        )
        d_cosines = jnp.where(is_target, 0.0, scaled_g[:, None] * probability)
        d_x = d_x + jnp.matmul(d_cosines, w_block.T, precision=HIGHEST)
        d_scale = d_scale + jnp.sum(probability * replaced, axis=1)
        d_block = jnp.matmul(x_hat.T, d_cosines, precision=HIGHEST)
        return (d_x, d_scale), d_block

    start = (jnp.zeros_like(x_hat), jnp.zeros_like(row_scale))
    indices = jnp.arange(blocks.shape[0])
    (d_x, expected_cosine), d_blocks = jax.lax.scan(step, start, (indices, blocks))
    d_w = d_blocks.transpose(1, 0, 2).reshape(w_hat.shape[0], -1)[:, :num_classes]
    target_probability = jnp.exp(row_scale * target_cosine - log_normalizer)
    d_target = scaled_g * (target_probability - 1.0)
    # ∂L_i/∂s_i = Σ_j p_ij·z_ij/s_i − t_i
    d_scale = g * (expected_cosine - target_cosine)
    return d_x, d_w, d_target, None, d_scale


_blockwise_margin_cross_entropy.defvjp(_forward, _backward)
