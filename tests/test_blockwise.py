"""Blockwise losses (``block_size=``) equal the dense form, in value and gradient, and keep
O(B·block) memory in the backward pass; the sort-free triplet path equals the sort-based one."""

from __future__ import annotations

import functools
import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mlx_jax import blockwise
from mlx_jax.distances import pairwise_distances, pairwise_distances_rows
from mlx_jax.losses import (
    circle_loss,
    contrastive_loss,
    standalone_center_loss,
    triplet_loss,
)
from tests import references, references_pairs
from tests.helpers import assert_finite_value_and_grad, random_batch

CENTERS = np.random.default_rng(7).normal(size=(1024, 16)).astype(np.float32) * 0.3

# name → loss(embeddings, labels, **kw) with the blockwise keyword passed through.
LOSSES = {
    "triplet_batch_hard": functools.partial(
        triplet_loss, mining="batch_hard", squared=False, reduction="mean_nonzero"
    ),
    "triplet_semihard": functools.partial(triplet_loss, mining="semihard"),
    "triplet_band": functools.partial(
        triplet_loss, mining="semihard_band", squared=False, reduction="mean_nonzero"
    ),
    "contrastive": functools.partial(
        contrastive_loss, squared=False, neg_margin=1.0, balance="pos_neg", reduction="mean_nonzero"
    ),
    "contrastive_paper": contrastive_loss,
    "circle": functools.partial(circle_loss, m=0.4, gamma=80.0),
    "standalone_center": lambda x, y, **kw: standalone_center_loss(
        x, y, CENTERS[:, : x.shape[1]], **kw
    ),
}


def clustered(batch: int, dim: int = 16, per_class: int = 4, seed: int = 0):
    """Embeddings with O(1) distances so margins are violated by some pairs and not others."""
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.arange(batch) // per_class).astype(np.int32)
    means = rng.normal(size=(labels.max() + 1, dim)) / np.sqrt(dim)
    x = 0.6 * means[labels] + 0.4 * rng.normal(size=(batch, dim)) / np.sqrt(dim)
    return x.astype(np.float32), labels


def value_and_grad(name, x, y, **kw):
    fn = jax.jit(jax.value_and_grad(lambda e: LOSSES[name](e, y, **kw)))
    value, grad = fn(jnp.asarray(x))
    return float(value), np.asarray(grad)


def assert_same(dense, blocked, rtol=2e-5):
    (v1, g1), (v2, g2) = dense, blocked
    np.testing.assert_allclose(v2, v1, rtol=rtol)
    scale = np.max(np.abs(g1))
    assert scale > 0  # a comparison that can fail
    np.testing.assert_allclose(g2, g1, rtol=0, atol=1e-4 * scale)


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_large_batch_blockwise_equals_dense(name, monkeypatch):
    # B = 2048 with blocks of 300: 7 blocks, the last one padded with 52 weight-0 rows.
    x, y = clustered(2048)
    dense = value_and_grad(name, x, y, block_size=None)
    assert_same(dense, value_and_grad(name, x, y, block_size=300))
    # "auto" with its dense limit lowered: blocks of 2^18 / 2048 = 128 rows here.
    monkeypatch.setattr(blockwise, "_AUTO_DENSE_BATCH", 1024)
    assert blockwise.auto_block_size(2048, backend="cpu") == 128
    assert_same(dense, value_and_grad(name, x, y, block_size="auto"))


@pytest.mark.parametrize("block_size", [1, 4, 5, 13, 64])
@pytest.mark.parametrize("mining", ["semihard", "batch_hard", "all", "semihard_band"])
@pytest.mark.parametrize("soft", [False, True])
def test_triplet_blocks_match_reference(mining, soft, block_size):
    x, y = random_batch(3, batch=13, dim=3, classes=4, scale=0.7)
    w = np.ones(13, np.float32)
    w[[2, 9]] = 0.0
    w[4] = 2.5
    for reduction in ("mean", "sum", "mean_nonzero"):
        kw = dict(mining=mining, soft=soft, margin=0.5, weights=w, reduction=reduction)
        expected = references.triplet(x, y, **kw)
        np.testing.assert_allclose(
            triplet_loss(x, y, block_size=block_size, **kw), expected, rtol=1e-5, atol=1e-6
        )


@pytest.mark.parametrize("mining", ["semihard", "all", "semihard_band"])
@pytest.mark.parametrize("max_positives", [None, 1, 2, 7])
@pytest.mark.parametrize("soft", [False, True])
def test_sort_free_and_sorted_paths_agree(mining, max_positives, soft):
    # 5 samples in one class: max_positives=1/2 overflow → the sort-based path, 7 → slots.
    x, y = random_batch(5, batch=14, dim=3, classes=3, scale=0.8)
    for fallback in ("farthest", "drop"):
        kw = dict(mining=mining, soft=soft, margin=0.4, semihard_fallback=fallback)
        expected = references.triplet(x, y, **kw)
        for block_size in (None, 4):
            fn = jax.jit(
                lambda e, b=block_size, k=kw: triplet_loss(
                    e, y, max_positives=max_positives, block_size=b, **k
                )
            )
            np.testing.assert_allclose(fn(x), expected, rtol=1e-5, atol=1e-6)
    dense = jax.grad(lambda e: triplet_loss(e, y, mining=mining, soft=soft, max_positives=None))
    slots = jax.grad(lambda e: triplet_loss(e, y, mining=mining, soft=soft, max_positives=7))
    np.testing.assert_allclose(slots(x), dense(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mining", ["semihard", "batch_hard", "all", "semihard_band"])
def test_reduction_none_is_the_same_matrix(mining):
    x, y = random_batch(4, batch=11, dim=3, classes=3)
    dense = triplet_loss(x, y, mining=mining, margin=0.6, reduction="none")
    for kw in (dict(block_size=3), dict(max_positives=None), dict(max_positives=1)):
        blocked = triplet_loss(x, y, mining=mining, margin=0.6, reduction="none", **kw)
        assert blocked.shape == dense.shape
        np.testing.assert_allclose(blocked, dense, rtol=1e-5, atol=1e-6)
    for loss in (contrastive_loss, circle_loss):
        np.testing.assert_allclose(
            loss(x, y, reduction="none", block_size=4), loss(x, y, reduction="none"), rtol=1e-5
        )


def test_pair_losses_blocks_match_references():
    x, y = random_batch(6, batch=10, dim=4, classes=3)
    w = np.array([1, 0, 2, 1, 1, 0.5, 1, 1, 0, 1], np.float32)
    for balance in ("pairs", "pos_neg"):
        kw = dict(squared=False, neg_margin=1.5, balance=balance, weights=w)
        np.testing.assert_allclose(
            contrastive_loss(x, y, block_size=3, **kw),
            references.contrastive(x, y, **kw),
            rtol=1e-5,
        )
    np.testing.assert_allclose(
        circle_loss(x, y, m=0.3, gamma=32.0, weights=w, block_size=4),
        references_pairs.circle(x, y, m=0.3, gamma=32.0, weights=w),
        rtol=1e-5,
    )
    centers = CENTERS[:3, :4]
    np.testing.assert_allclose(
        standalone_center_loss(x, y, centers, weights=w, block_size=3),
        references.standalone(x, y, centers, weights=w),
        rtol=1e-5,
    )


DEGENERATE = {
    "one class": (np.random.default_rng(0).normal(size=(9, 4)), np.zeros(9)),
    "all distinct classes": (np.random.default_rng(1).normal(size=(9, 4)), np.arange(9)),
    "zero embeddings": (np.zeros((9, 4)), np.arange(9) % 3),
    "duplicate embeddings": (np.ones((9, 4)), np.arange(9) % 2),
}


@pytest.mark.parametrize("case", sorted(DEGENERATE))
@pytest.mark.parametrize("name", sorted(LOSSES))
def test_degenerate_batches_are_finite_blockwise(name, case):
    x, y = DEGENERATE[case]
    x, y = x.astype(np.float32), y.astype(np.int32)
    assert_finite_value_and_grad(lambda e: LOSSES[name](e, y, block_size=4), x)
    blocked = LOSSES[name](x, y, block_size=4)
    np.testing.assert_allclose(blocked, LOSSES[name](x, y), rtol=1e-5, atol=1e-6)


def _temp_bytes(name: str, batch: int, block_size: int | None) -> int:
    x = jax.ShapeDtypeStruct((batch, 16), jnp.float32)
    y = jax.ShapeDtypeStruct((batch,), jnp.int32)
    step = jax.jit(jax.value_and_grad(lambda e, lab: LOSSES[name](e, lab, block_size=block_size)))
    return step.lower(x, y).compile().memory_analysis().temp_size_in_bytes


@pytest.mark.parametrize("name", ["triplet_batch_hard", "triplet_band", "contrastive", "circle"])
def test_backward_pass_memory_is_per_block(name):
    # XLA's buffer assignment of the compiled fwd+bwd: the dense step holds B×B matrices, the
    # blockwise one only [block, B] arrays (×(max_positives + 1) = 8 for the slotted triplets,
    # whose [block, 8, B] comparisons are as large as 8 row blocks). Batch-hard mining keeps ~9
    # [block, B] intermediates alive (masks, masked values, index candidates): bound 16 blocks.
    batch, block = 4096, 64
    matrix = 4 * batch * batch
    slots = 8 if name == "triplet_band" else 1
    assert _temp_bytes(name, batch, None) >= matrix
    assert _temp_bytes(name, batch, block) < matrix / 4 * slots


def test_auto_block_size_is_dense_up_to_2048_then_1_mib_row_blocks():
    assert blockwise.auto_block_size(2048, backend="cpu") is None
    for batch in (2049, 3000, 4096, 8192):
        rows = blockwise.auto_block_size(batch, backend="cpu")
        assert rows is not None and rows & (rows - 1) == 0  # a power of two
        # a [rows, B] float32 plane of 0.7-1.4 MiB: within a factor √2 of 2^18 entries
        assert 2**17.5 <= rows * batch <= 2**18.5
    assert blockwise.auto_block_size(1 << 20, backend="cpu") == 16  # the floor on rows
    # accelerators run the dense form as one fused kernel
    assert blockwise.auto_block_size(1 << 16, backend="gpu") is None
    assert blockwise.auto_block_size(1 << 16, backend="tpu") is None


@pytest.mark.parametrize(
    "name", ["triplet_batch_hard", "contrastive", "circle", "standalone_center"]
)
def test_default_block_size_is_auto(name):
    # Every loss with block_size defaults to "auto" (one default for one concept)...
    loss = {
        "triplet_batch_hard": triplet_loss,
        "contrastive": contrastive_loss,
        "circle": circle_loss,
        "standalone_center": standalone_center_loss,
    }[name]
    assert inspect.signature(loss).parameters["block_size"].default == "auto"
    # ... and on CPU a large batch's default step holds [block, B] arrays, not [B, B] ones.
    if jax.default_backend() != "cpu":
        pytest.skip("'auto' is dense off CPU")
    batch = 4096
    matrix = 4 * batch * batch
    x = jax.ShapeDtypeStruct((batch, 16), jnp.float32)
    y = jax.ShapeDtypeStruct((batch,), jnp.int32)
    step = jax.jit(jax.value_and_grad(lambda e, lab: LOSSES[name](e, lab)))
    assert step.lower(x, y).compile().memory_analysis().temp_size_in_bytes < matrix / 4
    assert _temp_bytes(name, batch, None) >= matrix


def test_misspelt_auto_lists_the_accepted_values():
    x, y = random_batch(0)
    with pytest.raises(TypeError, match="block_size must be None, 'auto' or a positive int"):
        triplet_loss(x, y, block_size="Auto")


def test_distance_rows_are_the_rows_of_the_matrix():
    x, _ = clustered(300, dim=8)
    index = jnp.arange(40, 90)
    for metric in ("squared_euclidean", "euclidean", "cosine"):
        full = np.asarray(pairwise_distances(x, metric=metric))
        rows = np.asarray(pairwise_distances_rows(x, index, metric=metric))
        np.testing.assert_allclose(rows, full[40:90], rtol=1e-5, atol=1e-6)
        if metric != "cosine":
            assert np.all(rows[np.arange(50), np.arange(40, 90)] == 0.0)


def test_map_row_blocks_pads_and_cuts():
    values = jnp.arange(10.0)
    out = blockwise.map_row_blocks(lambda i, v: (i, v * 2), (values,), block_size=4)
    np.testing.assert_array_equal(out[0], np.arange(10))
    np.testing.assert_array_equal(out[1], 2 * np.arange(10.0))


@pytest.mark.parametrize("bad", [0, -3, 2.5, True, "8"])
def test_bad_block_size_names_the_argument(bad):
    x, y = random_batch(0)
    with pytest.raises((ValueError, TypeError), match="block_size"):
        contrastive_loss(x, y, block_size=bad)
    with pytest.raises(ValueError, match="max_positives"):
        triplet_loss(x, y, max_positives=0)
