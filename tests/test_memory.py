"""Cross-batch memory (mlx_jax.memory): the ring buffer against a plain FIFO, memory_loss
against a loop over (batch anchor, batch-or-memory partner) pairs, the losses' ``anchors=``
argument, warm-up, gradients and bad input. The 8-device form is in
tests/multidevice/test_memory.py."""

from __future__ import annotations

import collections
import functools
import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mlx_jax import losses as L
from mlx_jax.memory import CrossBatchMemory, create_memory, enqueue, memory_loss
from tests.helpers import check_grads_x64, random_batch

D = 4


def fifo_reference(size, batches):
    """The memory's content after enqueuing ``batches`` [(x, y, w)], as a list of (x, y) from
    oldest to newest (a deque of maxlen ``size``), and the slot the next entry goes to."""
    queue = collections.deque(maxlen=size)
    written = 0
    for x, y, w in batches:
        for row in range(len(y)):
            if w is None or w[row] > 0:
                queue.append((x[row], y[row]))
                written += 1
    return list(queue), written % size


def stored_in_order(memory):
    """The memory's valid entries from oldest to newest."""
    valid = np.asarray(memory.valid)
    start = int(memory.next_slot) if valid.all() else 0
    order = [(start + i) % memory.size for i in range(memory.size)]
    return [(np.asarray(memory.embeddings[i]), int(memory.labels[i])) for i in order if valid[i]]


@pytest.mark.parametrize("size", [5, 8, 20])
def test_enqueue_is_a_fifo_that_skips_zero_weights(size):
    rng = np.random.default_rng(size)
    memory = create_memory(size, D)
    batches = []
    for step, batch in enumerate([3, 7, 1, 12, 6]):
        x = rng.normal(size=(batch, D)).astype(np.float32)
        y = rng.integers(0, 5, batch).astype(np.int32)
        w = None if step % 2 else (rng.uniform(size=batch) > 0.3).astype(np.float32)
        batches.append((x, y, w))
        memory = enqueue(memory, x, y, weights=w)
        want, next_slot = fifo_reference(size, batches)
        got = stored_in_order(memory)
        assert len(got) == len(want)
        for (gx, gy), (wx, wy) in zip(got, want, strict=True):
            np.testing.assert_array_equal(gx, wx)
            assert gy == wy
        assert int(memory.next_slot) == next_slot
        assert int(memory.steps) == step + 1


def test_enqueue_under_jit_and_dtype():
    memory = create_memory(6, D, jnp.bfloat16)
    x, y = random_batch(0, batch=4, dim=D)
    got = jax.jit(enqueue)(memory, x, y)
    want = enqueue(memory, x, y)
    assert got.embeddings.dtype == jnp.bfloat16
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_enqueue_stops_gradients():
    x, y = random_batch(1, batch=4, dim=D)

    def stored_sum(x):
        return jnp.sum(enqueue(create_memory(6, D), x, y).embeddings)

    np.testing.assert_array_equal(jax.grad(stored_sum)(x), 0.0)


# --------------------------------------------------------------------------------------------
# memory_loss against a loop (contrastive loss, Hadsell et al. squared form)


def reference_contrastive_xbm(x, y, w, mem_x, mem_y, mem_valid, margin=1.0):
    """Mean over (anchor in batch, partner in batch ∪ memory) pairs, pair weight = anchor
    weight: Σ_i w_i Σ_j l_ij / Σ_i w_i·#partners(i)."""
    x = np.asarray(x, np.float64)
    partners = [(x[j], y[j], w[j] > 0, ("batch", j)) for j in range(len(y))]
    partners += [
        (np.asarray(mem_x[k], np.float64), mem_y[k], mem_valid[k], ("memory", k))
        for k in range(len(mem_y))
    ]
    total = count = 0.0
    for i in range(len(y)):
        if w[i] <= 0:
            continue
        for px, py, ok, key in partners:
            if not ok or key == ("batch", i):
                continue
            d = np.sqrt(np.sum((x[i] - px) ** 2))
            term = 0.5 * d**2 if py == y[i] else 0.5 * max(0.0, margin - d) ** 2
            total += w[i] * term
            count += w[i]
    return total / count


def filled_memory(seed, size=10, batches=(4, 4)):
    memory = create_memory(size, D)
    for k, b in enumerate(batches):
        x, y = random_batch(seed + k, batch=b, dim=D, classes=3, scale=0.5)
        memory = enqueue(memory, x, y)
    return memory


@pytest.mark.parametrize("block_size", [None, 3])
def test_memory_loss_matches_loop_over_batch_and_memory_pairs(block_size):
    memory = filled_memory(2, size=10, batches=(4, 4))  # 8 of 10 slots filled
    x, y = random_batch(3, batch=6, dim=D, classes=3, scale=0.5)
    w = np.array([1.0, 2.0, 0.0, 1.0, 0.5, 1.0], np.float32)
    got = memory_loss(L.contrastive_loss, x, y, memory, weights=w, block_size=block_size)
    want = reference_contrastive_xbm(
        x, y, w, memory.embeddings, np.asarray(memory.labels), np.asarray(memory.valid)
    )
    np.testing.assert_allclose(got, want, rtol=1e-5)


def test_empty_or_warming_memory_is_the_batch_loss():
    x, y = random_batch(4, batch=8, dim=D)
    alone = L.triplet_loss(x, y)
    np.testing.assert_allclose(memory_loss(L.triplet_loss, x, y, create_memory(16, D)), alone)
    memory = filled_memory(5, size=16, batches=(8, 8))
    assert float(memory_loss(L.triplet_loss, x, y, memory)) != pytest.approx(float(alone))
    warming = memory_loss(L.triplet_loss, x, y, memory, warmup_steps=3)  # 2 enqueues so far
    np.testing.assert_allclose(warming, alone, rtol=1e-6)
    warm = memory_loss(L.triplet_loss, x, y, memory, warmup_steps=2)
    np.testing.assert_allclose(warm, memory_loss(L.triplet_loss, x, y, memory), rtol=1e-6)


def test_memory_gets_no_gradient_and_batch_gradient_is_exact():
    memory = filled_memory(6, size=6, batches=(4, 4))
    x, y = random_batch(7, batch=5, dim=D, classes=3, scale=0.5)
    g_memory = jax.grad(
        lambda m: memory_loss(L.contrastive_loss, x, y, memory._replace(embeddings=m))
    )(memory.embeddings)
    np.testing.assert_array_equal(g_memory, 0.0)
    mem_x = np.asarray(memory.embeddings, np.float64)

    def as_function_of_batch(x):
        m = memory._replace(embeddings=jnp.asarray(mem_x))
        return memory_loss(L.multi_similarity_loss, x, y, m)

    check_grads_x64(as_function_of_batch, x)


def test_memory_loss_under_jit_and_with_low_precision_batch():
    memory = filled_memory(8, size=12, batches=(6, 6))
    x, y = random_batch(9, batch=6, dim=D, classes=3)
    eager = memory_loss(L.supcon_loss, x, y, memory)
    jitted = jax.jit(lambda x, m: memory_loss(L.supcon_loss, x, y, m))(x, memory)
    np.testing.assert_allclose(jitted, eager, rtol=1e-6)
    low = memory_loss(L.supcon_loss, jnp.asarray(x, jnp.bfloat16), y, memory)
    assert low.dtype == jnp.float32
    np.testing.assert_allclose(low, eager, rtol=2e-2)


def test_reduction_none_returns_the_batch_rows():
    memory = filled_memory(10, size=8, batches=(4,))
    x, y = random_batch(11, batch=5, dim=D, classes=3)
    terms = memory_loss(L.circle_loss, x, y, memory, reduction="none")
    assert terms.shape == (5,)
    total = memory_loss(L.circle_loss, x, y, memory, reduction="sum")
    np.testing.assert_allclose(jnp.sum(terms), total, rtol=1e-6)


def test_memory_loss_bad_input():
    memory = create_memory(4, D)
    x, y = random_batch(12, batch=4, dim=D)
    with pytest.raises(TypeError, match="softmax_loss takes no anchors= argument"):
        memory_loss(L.softmax_loss, x, y, memory)
    with pytest.raises(ValueError, match=r"memory holds embeddings of shape \[4, 4\].*dim 3"):
        memory_loss(L.contrastive_loss, x[:, :3], y, memory)
    with pytest.raises(TypeError, match="memory must be a CrossBatchMemory"):
        memory_loss(L.contrastive_loss, x, y, (memory.embeddings, memory.labels))
    with pytest.raises(ValueError, match="warmup_steps must be an int >= 0"):
        memory_loss(L.contrastive_loss, x, y, memory, warmup_steps=-1)
    with pytest.raises(TypeError, match="sets anchors= itself"):
        memory_loss(L.contrastive_loss, x, y, memory, anchors=np.ones(4, bool))
    with pytest.raises(ValueError, match=r"labels must have shape \[4\]"):
        enqueue(memory, x, y[:3])
    with pytest.raises(ValueError, match="size must be >= 1"):
        create_memory(0, D)
    assert isinstance(memory, CrossBatchMemory) and memory.size == 4


# --------------------------------------------------------------------------------------------
# The anchors= argument every pair loss shares


ANCHORED_LOSSES = [
    getattr(L, name)
    for name in L.__all__
    if name.endswith("_loss") and "anchors" in inspect.signature(getattr(L, name)).parameters
]
EXTRA_ARGUMENTS = {"margin_loss": {"beta": np.float32(1.2)}}


def test_pair_losses_take_anchors():
    names = {f.__name__ for f in ANCHORED_LOSSES}
    assert {"contrastive_loss", "triplet_loss", "multi_similarity_loss", "supcon_loss"} <= names
    assert {"lifted_structure_loss", "margin_loss", "fast_ap_loss"} <= names


@pytest.mark.parametrize("loss", ANCHORED_LOSSES, ids=lambda f: f.__name__)
def test_anchors_keep_only_the_anchor_rows(loss):
    loss = functools.partial(loss, **EXTRA_ARGUMENTS.get(loss.__name__, {}))
    x, y = random_batch(13, batch=12, dim=D, classes=3)
    anchors = np.arange(12) % 3 != 1
    every = np.asarray(loss(x, y, reduction="none"))
    some = np.asarray(loss(x, y, reduction="none", anchors=anchors))
    mask = anchors.reshape((12,) + (1,) * (every.ndim - 1))
    np.testing.assert_allclose(some, np.where(mask, every, 0.0), rtol=1e-6, atol=1e-7)
    # the partners of the kept anchors are unchanged, so the sum is a sub-sum
    np.testing.assert_allclose(loss(x, y, reduction="sum", anchors=anchors), some.sum(), rtol=1e-5)


def test_anchors_bad_input():
    x, y = random_batch(14, batch=6, dim=D)
    with pytest.raises(TypeError, match="anchors must be a boolean array"):
        L.contrastive_loss(x, y, anchors=np.ones(6))
    with pytest.raises(ValueError, match=r"anchors must have shape \[6\]"):
        L.contrastive_loss(x, y, anchors=np.ones(5, bool))
