"""Input preparation shared by every loss (checks, dtype promotion, sample weights, anchor
rows) and the row machinery of the pair losses: :func:`map_anchor_rows` evaluates a loss's
per-anchor-row function over the batch's anchor rows — every row, or only the contiguous
:class:`mlx_jax.parallel.AnchorRows` range a caller asks for — and the losses reduce the
per-row sums with :mod:`mlx_jax.reductions` (``reduction="parts"`` returns the sums
themselves)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from mlx_jax import _checks, blockwise, distances, mining, reductions
from mlx_jax.parallel import AnchorRows


class Batch(NamedTuple):
    """A checked batch: embeddings [B, D] in compute dtype, labels [B] int, weights [B] float,
    valid [B] bool (weight > 0), anchor_weights [B] float: the weights of the terms each
    sample anchors (``weights``, or 0 where ``anchors`` is False), and anchor_rows: the
    :class:`AnchorRows` range that :func:`map_anchor_rows` visits (None: every row)."""

    embeddings: jax.Array
    labels: jax.Array
    weights: jax.Array
    valid: jax.Array
    anchor_weights: jax.Array
    anchor_rows: AnchorRows | None = None


def prepare_batch(
    embeddings, labels, weights=None, *, num_classes: int | None = None, anchors=None
) -> Batch:
    """Checks ``embeddings`` [B, D], ``labels`` [B], ``weights`` [B] (None → ones) and
    ``anchors``: None (every sample anchors), a [B] bool mask, or an :class:`AnchorRows`
    range.

    A sample's weight scales the loss terms it anchors; a zero weight excludes the sample
    everywhere (as anchor, positive, negative or pair partner), so padded and sharded batches
    are exact. A sample with ``anchors`` False anchors no term but still serves as the partner
    (positive or negative) of the anchors: the reference-set form of a loss, as cross-batch
    memory (:mod:`mlx_jax.memory`) uses it.
    """
    x = _checks.embeddings_array(embeddings)
    size = x.shape[0]
    y = _checks.labels_array(labels, size, num_classes=num_classes)
    w = _checks.sample_weights(weights, size, x.dtype)
    anchor_rows = None
    if anchors is None:
        anchor_weights = w
    elif isinstance(anchors, AnchorRows):
        anchor_rows = _check_anchor_rows(anchors, size)
        position = jnp.arange(size)
        start = anchor_rows.start
        in_range = (position >= start) & (position < start + anchor_rows.size)
        anchor_weights = jnp.where(in_range, w, 0.0)
    else:
        anchor_weights = jnp.where(_checks.anchors_array(anchors, size), w, 0.0)
    return Batch(x, y, w, w > 0, anchor_weights, anchor_rows)


def _check_anchor_rows(rows: AnchorRows, batch: int) -> AnchorRows:
    """``rows`` with a static size in [1, batch] and an int32 start (checked when concrete;
    a traced start is clamped into [0, batch − size], as ``dynamic_slice`` does)."""
    size = rows.size
    if isinstance(size, bool) or not isinstance(size, int | np.integer) or not 1 <= size <= batch:
        raise ValueError(
            f"anchors=AnchorRows(start, size): size must be a static int in [1, {batch}] (the "
            f"batch size), got {size!r}"
        )
    start = jnp.asarray(rows.start)
    if start.shape != () or not jnp.issubdtype(start.dtype, jnp.integer):
        raise TypeError(
            "anchors=AnchorRows(start, size): start must be an int scalar, got "
            f"{start.dtype} of shape {list(start.shape)}"
        )
    if _checks.is_concrete(rows.start) and not 0 <= int(np.asarray(rows.start)) <= batch - size:
        raise ValueError(
            f"anchors=AnchorRows(start, size): start must be in [0, {batch - size}] (batch "
            f"{batch}, size {size}), got {int(np.asarray(rows.start))}"
        )
    start = jnp.clip(start.astype(jnp.int32), 0, batch - size)
    return AnchorRows(start, int(size))


class Rows(NamedTuple):
    """A block of anchor rows of a :class:`Batch`: batch ``index`` [R] int32 (>= B for padding
    rows), ``embeddings`` [R, D], ``labels`` [R], ``weights`` [R] (0 for padding), ``valid`` [R].
    ``every_row`` (static) says the block is the whole batch in order (the dense form).
    """

    index: jax.Array
    embeddings: jax.Array
    labels: jax.Array
    weights: jax.Array
    valid: jax.Array
    every_row: bool = False

    def pair_masks(self, batch: Batch) -> tuple[jax.Array, jax.Array]:
        """Positive and negative masks [R, B] of these anchors against the whole batch."""
        return mining.row_pair_masks(self.index, self.labels, self.valid, batch.labels, batch.valid)

    def squared_distances(self, batch: Batch) -> jax.Array:
        """‖x_r − x_j‖² [R, B] of these anchors to every sample. The whole batch takes the
        symmetric form (:func:`distances.all_pairs_squared_euclidean`: one matmul in the
        backward pass instead of two)."""
        if self.every_row:
            return distances.all_pairs_squared_euclidean(batch.embeddings)
        return distances.squared_euclidean_rows(batch.embeddings, self.index, self.embeddings)


def map_anchor_rows(
    fn: Callable[[Rows], Any],
    batch: Batch,
    block_size: blockwise.BlockSize,
    *row_args: jax.Array,
) -> Any:
    """``fn(rows, *row_args[rows])`` over the batch's anchor rows, dense (``block_size=None``),
    in blocks of ``block_size`` rows with O(B·block_size) memory, or ``"auto"``: chosen from B
    (:func:`mlx_jax.blockwise.auto_block_size`).
    ``fn`` returns a pytree of [R, ...] arrays; the result has leading dimension B — or, for a
    batch with an :class:`AnchorRows` range, ``size``: only those rows are evaluated (each
    against all B columns), the row arguments ([B, ...]) sliced to them."""
    size = batch.embeddings.shape[0]
    block_size = blockwise.resolve_block_size(block_size, size)
    args = (batch.embeddings, batch.labels, batch.anchor_weights, *row_args)
    if batch.anchor_rows is None:
        every_row = blockwise.runs_dense(block_size, size)

        def call(index, x, labels, weights, *extra):
            return fn(Rows(index, x, labels, weights, weights > 0, every_row), *extra)

        return blockwise.map_row_blocks(call, args, block_size=block_size)

    start, count = batch.anchor_rows
    sliced = tuple(jax.lax.dynamic_slice_in_dim(a, start, count) for a in args)

    def call_range(position, index, x, labels, weights, *extra):
        # blockwise padding rows (position >= count) get indices >= B: no self column
        index = jnp.where(position < count, index, size + position)
        return fn(Rows(index, x, labels, weights, weights > 0), *extra)

    index = start + jnp.arange(count, dtype=jnp.int32)
    return blockwise.map_row_blocks(call_range, (index, *sliced), block_size=block_size)


class PairSums(NamedTuple):
    """Per-anchor-row sums over one kind of pairs (positive or negative), each [R]: the
    weighted loss, the weight, and the weight of pairs whose loss is > 0."""

    loss: jax.Array
    weight: jax.Array
    nonzero: jax.Array


def pair_row_sums(mask: jax.Array, terms: jax.Array, row_weights: jax.Array) -> PairSums:
    """Sums [R, B] pair ``terms`` over the pairs in ``mask`` [R, B]; a pair's weight is its
    anchor's weight ``row_weights`` [R]."""
    count = jnp.sum(mask, axis=1, dtype=terms.dtype)
    nonzero = jnp.sum(mask & (terms > 0), axis=1, dtype=terms.dtype)
    loss = jnp.sum(jnp.where(mask, terms, 0.0), axis=1)
    return PairSums(loss * row_weights, count * row_weights, nonzero * row_weights)


def reduce_pair_sums(positive: PairSums, negative: PairSums, reduction: str, balance: str):
    """Reduces per-row pair sums ([B] each) to the scalar of :func:`reduce_pair_terms`; for
    ``reduction="parts"`` their :class:`~mlx_jax.reductions.ReductionParts`, a (positive,
    negative) tuple of them with ``balance="pos_neg"`` (each kind has its own denominators)."""
    if balance == "pos_neg":
        kinds = tuple(
            reductions.reduce_terms(sums.loss, sums.weight, reduction, sums.nonzero)
            for sums in (positive, negative)
        )
        return kinds if reduction == reductions.PARTS else kinds[0] + kinds[1]
    return reductions.reduce_terms(
        positive.loss + negative.loss,
        positive.weight + negative.weight,
        reduction,
        positive.nonzero + negative.nonzero,
    )


def pair_rows(
    rows: Rows,
    batch: Batch,
    positive_terms: jax.Array,
    negative_terms: jax.Array,
    reduction: str,
) -> Any:
    """Per-row result of a pair loss for :func:`map_anchor_rows`: the weighted [R, B] pair
    losses for ``reduction="none"``, else (positive, negative) :class:`PairSums`."""
    positive, negative = rows.pair_masks(batch)
    if reduction == "none":
        terms = jnp.where(positive, positive_terms, jnp.where(negative, negative_terms, 0.0))
        return terms * rows.weights[:, None]
    return (
        pair_row_sums(positive, positive_terms, rows.weights),
        pair_row_sums(negative, negative_terms, rows.weights),
    )


def reduce_pair_rows(row_results: Any, reduction: str, balance: str) -> jax.Array:
    """The loss from the per-row results of :func:`pair_rows` over all B rows."""
    if reduction == "none":
        return row_results
    return reduce_pair_sums(*row_results, reduction, balance)


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
    ``reduction="none"`` returns the [B, B] matrix of weighted pair losses; ``"parts"`` the
    reduction's sums (:func:`reduce_pair_sums`). A batch with an :class:`AnchorRows` range
    reduces those rows of the matrices only (``"none"``: [size, B]).
    """
    _checks.choice(balance, "balance", reductions.BALANCES)
    reductions.check_reduction(reduction, reductions.WITH_PARTS)
    if batch.anchor_rows is None:
        index = jnp.arange(batch.labels.shape[0])
        row_data = (batch.embeddings, batch.labels, batch.anchor_weights)
    else:
        start, count = batch.anchor_rows
        index = start + jnp.arange(count, dtype=jnp.int32)
        row_data = tuple(
            jax.lax.dynamic_slice_in_dim(a, start, count)
            for a in (batch.embeddings, batch.labels, batch.anchor_weights)
        )
        positive_terms, negative_terms = (
            jax.lax.dynamic_slice_in_dim(t, start, count) for t in (positive_terms, negative_terms)
        )
    x, labels, weights = row_data
    rows = Rows(index, x, labels, weights, weights > 0, every_row=batch.anchor_rows is None)
    result = pair_rows(rows, batch, positive_terms, negative_terms, reduction)
    return reduce_pair_rows(result, reduction, balance)


def masked_logsumexp(logits: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Row-wise log Σ_{j: mask[i, j]} exp(logits[i, j]) and whether the row has any entry.

    ``jax.nn.logsumexp`` subtracts the row maximum before exponentiating, so no scale or
    temperature overflows. Empty rows give 0 with zero gradients: their logits are replaced by
    zeros *before* the logsumexp (so it stays finite) and the output is masked after it.
    """
    has_any = jnp.any(mask, axis=1)
    keep = mask | ~has_any[:, None]
    safe = jnp.where(keep, jnp.where(mask, logits, 0.0), -jnp.inf)
    return jnp.where(has_any, jax.nn.logsumexp(safe, axis=1), 0.0), has_any


def log_one_plus_sum_exp(logits: jax.Array, mask: jax.Array) -> jax.Array:
    """Row-wise log(1 + Σ_{j: mask[i, j]} exp(logits[i, j])) = softplus(masked logsumexp).

    Max-subtracted (:func:`masked_logsumexp`), so no scale overflows; an empty row is log 1 = 0
    with zero gradients. The "1 +" form of Multi-Similarity, N-pair, Proxy Anchor and the
    angular losses.
    """
    log_sum, has_any = masked_logsumexp(logits, mask)
    return jnp.where(has_any, jax.nn.softplus(log_sum), 0.0)
