"""Row-block evaluation: the one mechanism behind every loss's ``block_size`` keyword.

A batch loss over pairs is a sum over *anchor rows* of terms that need the anchor's row of the
[B, B] distance matrix and nothing else (batch-hard, semi-hard and all-triplet mining,
contrastive, circle and the standalone center loss all are). :func:`map_row_blocks` evaluates
such a per-row function

* densely (``block_size=None``, or ``block_size >= B``): once, on all B rows — the [B, B]
  matrix exists, XLA fuses everything, fastest for batches that fit;
* blockwise: on ``ceil(B / block_size)`` blocks of ``block_size`` rows, one after the other
  (``lax.map``), each against all B columns, with the per-block function wrapped in
  ``jax.checkpoint``. The forward pass holds one [block_size, B] block at a time, and so does
  the backward pass: the scan saves only each block's inputs and recomputes the block's
  distances when differentiating (one extra forward matmul per block), so memory is
  O(B·block_size + B·D) instead of O(B²).

A per-row function can mark small results of the forward pass with :func:`keep_for_backward`
(e.g. batch-hard's mined indices, [R] ints): the backward pass then reuses them instead of
recomputing the block's distances.

``block_size="auto"`` — the default of every loss that takes ``block_size`` (triplet,
contrastive, circle, standalone center) — picks between the two from the batch size
(:func:`resolve_block_size`, :func:`auto_block_size`): dense up to B = 2048, and on XLA:CPU
blocks of about 2^18 / B rows above; on GPU/TPU it stays dense. The value and the gradients are
the same either way (up to float rounding), so "auto" only decides the memory: a user who wants
the [B, B] form at any size passes ``block_size=None``.

When B is not a multiple of ``block_size`` the rows are padded with zero rows to the next
multiple; the caller gives padding rows zero weight (the row arguments are zero-padded, so a
weight or ``valid`` argument is 0/False there) and the padded outputs are cut off, so the
result is exact. Row indices of padding rows are >= B and match no column.

The per-row function gets the batch indices of its rows (to recognise the self pair) and its
slices of the row arguments; column data (all B samples) are closed over.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

_KEPT = "mlx_jax_blockwise_kept"

AUTO = "auto"
BlockSize = int | Literal["auto"] | None

# "auto" on CPU: dense up to B = 2048, above it blocks of ~2^18 / B rows (a 1 MiB float32
# [rows, B] plane); see auto_block_size.
_AUTO_DENSE_BATCH = 2048
_AUTO_BLOCK_ENTRIES = 1 << 18
_AUTO_MIN_ROWS = 16


def keep_for_backward(x: Any) -> Any:
    """Marks ``x`` (a pytree of arrays computed inside a per-row function) to be saved by the
    blockwise form's ``jax.checkpoint`` rather than recomputed when differentiating. Use it for
    O(R) results whose recomputation needs the [R, B] block; a no-op in the dense form."""
    return jax.tree_util.tree_map(lambda a: checkpoint_name(a, _KEPT), x)


def check_block_size(
    block_size: int | None, name: str = "block_size", *, allow_auto: bool = False
) -> int | None:
    """``block_size`` is None (dense) or a positive Python int (static: it sets shapes);
    ``allow_auto`` only changes the message (the caller resolves ``"auto"`` first)."""
    if block_size is None:
        return None
    if isinstance(block_size, bool) or not isinstance(block_size, int | np.integer):
        expected = "None, 'auto' or a positive int" if allow_auto else "None or a positive int"
        raise TypeError(f"{name} must be {expected} (static), got {block_size!r}")
    if block_size < 1:
        raise ValueError(f"{name} must be >= 1, got {block_size}")
    return int(block_size)


def auto_block_size(batch: int, backend: str | None = None) -> int | None:
    """Rows per block that ``block_size="auto"`` uses for a batch of ``batch`` rows; None = dense.

    On CPU (``backend``, default ``jax.default_backend()``): dense up to B = 2048; above, the
    power of two nearest to 2^18 / B rows (a 1 MiB float32 [rows, B] plane; at least 16).
    On GPU/TPU the dense form is one fused kernel and blocks would serialise it: always dense.

    Why: the dense form's temporaries grow as B² — a few [B, B] float32 matrices for
    batch-hard, and [B, max_positives + 1, B] comparisons for the semi-hard band — i.e. hundreds
    of MiB to GiB past B = 2048, while a row block keeps them at [rows, B]. Up to B = 2048 the
    dense matrices are small and XLA fuses the whole loss. Timings of both forms on CPU, which
    depend on the allocator and on D: BENCHMARKS.md, "Row blocks".
    """
    if (backend or jax.default_backend()) != "cpu" or batch <= _AUTO_DENSE_BATCH:
        return None
    rows = 2 ** round(np.log2(_AUTO_BLOCK_ENTRIES / batch))
    return max(_AUTO_MIN_ROWS, int(rows))


def resolve_block_size(block_size: BlockSize, batch: int) -> int | None:
    """``block_size`` checked, with ``"auto"`` replaced by :func:`auto_block_size`'s choice."""
    if isinstance(block_size, str) and block_size == AUTO:
        return auto_block_size(batch)
    return check_block_size(block_size, allow_auto=True)


def runs_dense(block_size: int | None, batch: int) -> bool:
    """Whether :func:`map_row_blocks` makes one call on all ``batch`` rows (in batch order)."""
    block_size = check_block_size(block_size)
    return block_size is None or block_size >= batch


def map_row_blocks(
    fn: Callable[..., Any],
    row_args: tuple[jax.Array, ...],
    *,
    block_size: int | None = None,
) -> Any:
    """``fn(row_index [R], *row_args[rows])`` over all B rows, densely or in row blocks.

    Args:
      fn: per-row function; takes the [R] int32 batch indices of its rows and the [R, ...]
        slices of ``row_args``, returns a pytree of arrays with leading dimension R.
      row_args: arrays with leading dimension B (e.g. embeddings [B, D], labels [B],
        weights [B]); zero-padded in the blockwise form.
      block_size: None (dense: one call on all rows) or the rows per block.

    Returns:
      ``fn``'s pytree with leading dimension B, equal to the dense call up to float rounding.
    """
    batch = row_args[0].shape[0]
    if runs_dense(block_size, batch):
        return fn(jnp.arange(batch, dtype=jnp.int32), *row_args)
    blocks = -(-batch // block_size)
    padded = blocks * block_size

    def split(a: jax.Array) -> jax.Array:
        a = jnp.pad(a, [(0, padded - batch)] + [(0, 0)] * (a.ndim - 1))
        return a.reshape(blocks, block_size, *a.shape[1:])

    index = jnp.arange(padded, dtype=jnp.int32).reshape(blocks, block_size)
    policy = jax.checkpoint_policies.save_only_these_names(_KEPT)
    per_block = jax.checkpoint(lambda args: fn(*args), policy=policy)
    out = jax.lax.map(per_block, (index, *(split(a) for a in row_args)))
    return jax.tree_util.tree_map(lambda o: o.reshape(padded, *o.shape[2:])[:batch], out)
