"""Cross-batch memory (Wang, Zhang, Huang & Scott 2020, "Cross-Batch Memory for Embedding
Learning", CVPR): pair losses scored against the embeddings of recent batches.

Embeddings drift slowly once a model has trained for a while (the paper's Sec. 3), so the
embeddings of the last few batches are still good positives and negatives for the current one.
XBM keeps them in a FIFO queue of M entries and scores each batch against the batch and the
queue, which gives a pair loss the negatives of a batch of size B + M at the cost of B·(B + M)
distances and no extra forward pass.

Here the queue is an explicit pytree, :class:`CrossBatchMemory`, that lives in the train state
and is updated functionally; a training step is::

    loss = memory_loss(loss_fn, embeddings, labels, state.memory)          # 1. score
    grads = ...; params = ...                                              # 2. step
    memory = enqueue(state.memory, embeddings, labels)                     # 3. then enqueue

**Order.** The batch is scored against the memory *before* its own embeddings are enqueued.
The memory therefore never holds the current batch, so no anchor meets its own detached copy as
a positive at distance 0, and every pair of two current samples is scored once, with gradients
on both sides. (Enqueuing first, as pytorch-metric-learning's ``CrossBatchMemory`` did, pairs
each anchor with its own copy and counts the batch's pairs twice: pytorch-metric-learning#24, #478.)
Gradients never flow into the memory: its entries are constants (the paper's Eq. 5).

**Anchors.** Only the current batch anchors loss terms; memory entries are positives and
negatives (the losses' ``anchors=`` argument), as in XBM's L(x, M). The loss's ``"mean"`` is
therefore over the batch's anchors (or their pairs), whatever the memory holds.

**Warm-up.** The paper starts using the memory once the embeddings drift slowly (its Fig. 3:
after about 1k iterations): ``warmup_steps`` counts :func:`enqueue` calls before the memory is
used; until then :func:`memory_loss` equals the loss of the batch alone.

**Several devices.** Inside ``jax.shard_map`` over a batch axis, pass ``axis_name``: the
batches of all devices are gathered in device order (``all_gather(tiled=True)``) before they
are scored and before they are enqueued, so every device holds the *same* memory, written in
the same order (pytorch-metric-learning's per-GPU memories diverge: #639), and the
loss and gradients equal the single-device run on the concatenated batch.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

from mlx_jax import _checks, parallel

__all__ = ["CrossBatchMemory", "create_memory", "enqueue", "memory_loss"]


class CrossBatchMemory(NamedTuple):
    """A ring buffer of M embeddings (a pytree: keep it in the train state).

    Attributes:
      embeddings: [M, D] float, the stored embeddings (zeros where empty).
      labels: [M] int32 class ids.
      valid: [M] bool, which slots hold an embedding.
      next_slot: [] int32, where the next embedding is written (the oldest entry once full).
      steps: [] int32, the number of :func:`enqueue` calls so far (for the warm-up).
    """

    embeddings: jax.Array
    labels: jax.Array
    valid: jax.Array
    next_slot: jax.Array
    steps: jax.Array

    @property
    def size(self) -> int:
        """M, the number of slots."""
        return self.embeddings.shape[0]


def create_memory(size: int, dim: int, dtype: jnp.dtype = jnp.float32) -> CrossBatchMemory:
    """An empty memory of ``size`` slots for ``dim``-dimensional embeddings.

    The paper's memory holds several batches (its Table 1: M up to the whole training set for
    small datasets, 8,192-55,000 on its benchmarks); pytorch-metric-learning's
    ``CrossBatchMemory`` has no default size (``memory_size`` is required).
    """
    size = _checks.positive_int(size, "size")
    dim = _checks.positive_int(dim, "dim")
    return CrossBatchMemory(
        embeddings=jnp.zeros((size, dim), dtype),
        labels=jnp.zeros((size,), jnp.int32),
        valid=jnp.zeros((size,), bool),
        next_slot=jnp.zeros((), jnp.int32),
        steps=jnp.zeros((), jnp.int32),
    )


def _check_memory(memory, dim: int) -> CrossBatchMemory:
    if not isinstance(memory, CrossBatchMemory):
        raise TypeError(
            f"memory must be a CrossBatchMemory (see create_memory), got {type(memory).__name__}"
        )
    if memory.embeddings.ndim != 2 or memory.embeddings.shape[1] != dim:
        raise ValueError(
            f"memory holds embeddings of shape {list(memory.embeddings.shape)}, but the batch "
            f"has dim {dim}: create the memory with create_memory(size, {dim})"
        )
    return memory


def enqueue(
    memory: CrossBatchMemory,
    embeddings: jax.Array,
    labels: jax.Array,
    *,
    weights: jax.Array | None = None,
    axis_name: str | None = None,
) -> CrossBatchMemory:
    """The memory after writing a batch into it, oldest entries first out (FIFO).

    Call it *after* the gradient step (see the module docstring). The batch's rows are written
    in order at ``next_slot``, ``next_slot + 1``, ... (mod M); samples of weight 0 (padding) are
    skipped; if the batch has more than M samples, only its last M are kept. Gradients are
    stopped.

    Args:
      memory: the current memory.
      embeddings: [B, D] float, the batch (cast to the memory's dtype).
      labels: [B] int class ids.
      weights: optional [B] sample weights; a sample of weight 0 is not stored.
      axis_name: inside ``shard_map``, the batch axis: every device's batch is gathered in
        device order and written, so all devices keep identical memories.

    Returns:
      the updated :class:`CrossBatchMemory`.
    """
    x = _checks.embeddings_array(embeddings)
    memory = _check_memory(memory, x.shape[1])
    y = _checks.labels_array(labels, x.shape[0])
    w = _checks.sample_weights(weights, x.shape[0], x.dtype)
    x, y, w = parallel.gather_batch((jax.lax.stop_gradient(x), y, w), axis_name)
    keep = w > 0
    order = jnp.cumsum(keep) - 1  # rank of each kept sample within the batch
    count = order[-1] + 1
    size = memory.size
    keep = keep & (order >= count - size)  # more than M: the last M win
    slot = jnp.where(keep, (memory.next_slot + order) % size, size)  # size: dropped
    return CrossBatchMemory(
        embeddings=memory.embeddings.at[slot].set(x.astype(memory.embeddings.dtype), mode="drop"),
        labels=memory.labels.at[slot].set(y.astype(jnp.int32), mode="drop"),
        valid=memory.valid.at[slot].set(True, mode="drop"),
        next_slot=((memory.next_slot + count) % size).astype(jnp.int32),
        steps=memory.steps + 1,
    )


def memory_loss(
    loss_fn: Callable[..., jax.Array],
    embeddings: jax.Array,
    labels: jax.Array,
    memory: CrossBatchMemory,
    *,
    weights: jax.Array | None = None,
    warmup_steps: int = 0,
    axis_name: str | None = None,
    **loss_kwargs,
) -> jax.Array:
    """``loss_fn`` of the batch scored against the batch ∪ memory (XBM's L(x, M), Eq. 5).

    The batch's samples anchor the loss terms; their positives and negatives are the other
    batch samples and the memory's valid entries (constants: no gradient reaches the memory).
    ``loss_fn`` is any mlx_jax pair loss with an ``anchors=`` argument (contrastive, triplet,
    circle, multi-similarity, NT-Xent, SupCon, ...); ``loss_kwargs`` go to it. Before
    ``warmup_steps`` enqueues the memory is ignored and the result is ``loss_fn`` of the batch
    alone.

    Args:
      loss_fn: the pair loss, ``loss_fn(embeddings, labels, *, weights, anchors, ...)``.
      embeddings: [B, D] float, the current batch (this device's shard with ``axis_name``).
      labels: [B] int class ids.
      memory: a :class:`CrossBatchMemory` with the same D, *not* yet holding this batch.
      weights: optional [B] sample weights of the batch (memory entries weigh 1).
      warmup_steps: enqueues before the memory is used (>= 0); default 0.
      axis_name: inside ``shard_map``, the batch axis: the global batch is scored against the
        (replicated) memory, exactly as on one device.
      **loss_kwargs: hyperparameters of ``loss_fn`` (e.g. ``margin=``, ``block_size=``).

    Returns:
      the loss, as ``loss_fn`` reduces it over the batch's anchors; with
      ``reduction="none"``, ``loss_fn``'s per-anchor terms of the batch's rows ([B, ...]).
    """
    if "anchors" not in inspect.signature(loss_fn).parameters:
        name = getattr(loss_fn, "__name__", repr(loss_fn))
        raise TypeError(
            f"loss_fn {name} takes no anchors= argument, so it cannot score a batch against a "
            "memory; use a pair loss such as contrastive_loss, triplet_loss or "
            "multi_similarity_loss"
        )
    for reserved in ("anchors",):
        if reserved in loss_kwargs:
            raise TypeError(f"memory_loss sets {reserved}= itself; do not pass it")
    if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
        raise ValueError(f"warmup_steps must be an int >= 0, got {warmup_steps!r}")
    x = _checks.embeddings_array(embeddings)
    memory = _check_memory(memory, x.shape[1])
    y = _checks.labels_array(labels, x.shape[0])
    w = _checks.sample_weights(weights, x.shape[0], x.dtype)
    x, y, w = parallel.gather_batch((x, y, w), axis_name)
    in_use = memory.valid & (memory.steps >= warmup_steps)
    x, stored = _checks.promote_all(x, jax.lax.stop_gradient(memory.embeddings))
    batch_size = x.shape[0]
    loss = loss_fn(
        jnp.concatenate([x, stored]),
        jnp.concatenate([y, memory.labels.astype(y.dtype)]),
        weights=jnp.concatenate([w.astype(x.dtype), in_use.astype(x.dtype)]),
        anchors=jnp.arange(batch_size + memory.size) < batch_size,
        **loss_kwargs,
    )
    if loss_kwargs.get("reduction") == "none":
        return loss[:batch_size]  # memory rows anchor nothing: all zero
    return parallel.mean_over_devices(loss, axis_name)
