"""Multi-Similarity loss and pair mining (Wang et al. 2019): a loop-by-loop NumPy reference of
the paper's Eq. 9-11, the row-block forms, degenerate batches, bad input, and parity with
pytorch-metric-learning's MultiSimilarityLoss / MultiSimilarityMiner."""

from __future__ import annotations

import math
from types import SimpleNamespace

import chex
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings

from mlx_jax.losses.multi_similarity import multi_similarity_loss
from mlx_jax.mining import multi_similarity_pairs
from tests.helpers import assert_finite_value_and_grad, check_grads_x64, random_batch

# One batch shape (12 x 4) almost everywhere: eager JAX compiles each operation once per shape
# and dtype, so a shared shape keeps the file fast.
B, D = 12, 4


def batch(seed, classes=3, scale=1.0):
    return random_batch(seed, batch=B, dim=D, classes=classes, scale=scale)


# --------------------------------------------------------------------------------------------
# Reference: the paper's formulas with explicit loops over anchors and pairs, in float64.
# --------------------------------------------------------------------------------------------


def reference_similarity(x) -> np.ndarray:
    """Cosine similarities of the rows of x; a zero row has similarity 0 to everything."""
    x = np.asarray(x, np.float64)
    norms = np.sqrt(np.sum(x * x, axis=1, keepdims=True))
    unit = x / np.maximum(norms, 1e-12)
    return unit @ unit.T


def reference_pairs(similarity, labels, epsilon=0.1, valid=None):
    """Eq. 9 (negatives) and Eq. 10 (positives) for every anchor, as [B, B] bool masks."""
    similarity = np.asarray(similarity, np.float64)
    batch = len(labels)
    valid = np.ones(batch, bool) if valid is None else np.asarray(valid, bool)
    keep_positive = np.zeros((batch, batch), bool)
    keep_negative = np.zeros((batch, batch), bool)
    for i in range(batch):
        if not valid[i]:
            continue
        positives = [j for j in range(batch) if j != i and valid[j] and labels[j] == labels[i]]
        negatives = [k for k in range(batch) if valid[k] and labels[k] != labels[i]]
        if not positives or not negatives:
            continue  # no reference similarity for the other side: nothing is kept
        hardest_positive = min(similarity[i, j] for j in positives)
        hardest_negative = max(similarity[i, k] for k in negatives)
        for k in negatives:
            if similarity[i, k] + epsilon > hardest_positive:
                keep_negative[i, k] = True
        for j in positives:
            if similarity[i, j] - epsilon < hardest_negative:
                keep_positive[i, j] = True
    return keep_positive, keep_negative


def reference_loss(
    x,
    labels,
    *,
    alpha=2.0,
    beta=50.0,
    base=0.5,
    epsilon=0.1,
    mining=None,
    weights=None,
    reduction="mean",
):
    """Eq. 11, anchor by anchor; an empty sum gives log(1) = 0."""
    batch = len(labels)
    weights = np.ones(batch) if weights is None else np.asarray(weights, np.float64)
    valid = weights > 0
    similarity = reference_similarity(x)
    if mining == "multi_similarity":
        positive, negative = reference_pairs(similarity, labels, epsilon, valid)
    else:
        positive = np.zeros((batch, batch), bool)
        negative = np.zeros((batch, batch), bool)
        for i in range(batch):
            for k in range(batch):
                if valid[i] and valid[k] and k != i:
                    positive[i, k] = labels[k] == labels[i]
                    negative[i, k] = labels[k] != labels[i]
    losses = np.zeros(batch)
    for i in range(batch):
        positive_sum = sum(
            math.exp(-alpha * (similarity[i, k] - base)) for k in range(batch) if positive[i, k]
        )
        negative_sum = sum(
            math.exp(beta * (similarity[i, k] - base)) for k in range(batch) if negative[i, k]
        )
        losses[i] = math.log1p(positive_sum) / alpha + math.log1p(negative_sum) / beta
    weighted = np.where(valid, losses * weights, 0.0)
    if reduction == "none":
        return weighted
    if reduction == "sum":
        return weighted.sum()
    if reduction == "mean":
        denominator = weights[valid].sum()
    else:  # mean_nonzero
        denominator = weights[valid & (losses > 0)].sum()
    return weighted.sum() / denominator if denominator > 0 else 0.0


# --------------------------------------------------------------------------------------------
# Value, reductions, weights
# --------------------------------------------------------------------------------------------

CONFIGS = [
    dict(),  # PML's defaults α = 2, β = 50, λ = 0.5, all pairs
    dict(mining="multi_similarity"),  # with the paper's mining, ε = 0.1
    dict(base=1.0, mining="multi_similarity"),
    dict(alpha=1.0, beta=10.0, base=0.3, reduction="sum"),
    dict(alpha=2.0, beta=40.0, epsilon=0.3, mining="multi_similarity", reduction="mean_nonzero"),
    dict(reduction="mean_nonzero"),
    dict(epsilon=0.0, mining="multi_similarity", reduction="sum"),
]


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("seed", [0, 1])
def test_matches_reference(config, seed):
    x, y = batch(seed, scale=0.6)
    expected = reference_loss(x, y, **config)
    actual = multi_similarity_loss(x, y, **config)
    assert actual.dtype == jnp.float32
    np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-7)


def test_mining_changes_the_loss():
    # The mining must actually drop pairs on these batches, or the mined tests prove little.
    for seed in (0, 1):
        x, y = batch(seed, scale=0.6)
        positive, negative = reference_pairs(reference_similarity(x), y)
        all_pairs = np.equal.outer(y, y)
        assert positive.sum() < all_pairs.sum() - len(y) or negative.sum() < (~all_pairs).sum()
        assert abs(
            reference_loss(x, y) - reference_loss(x, y, mining="multi_similarity")
        ) > 1e-3 * reference_loss(x, y)


@pytest.mark.parametrize("mining", [None, "multi_similarity"])
def test_reduction_none_matches_reference_per_anchor(mining):
    x, y = batch(2)
    y = y.copy()
    y[0] = 7  # a singleton class: anchor 0 has no positive
    per_anchor = multi_similarity_loss(x, y, reduction="none", mining=mining)
    assert per_anchor.shape == (12,)
    expected = reference_loss(x, y, reduction="none", mining=mining)
    np.testing.assert_allclose(per_anchor, expected, rtol=1e-5, atol=1e-7)
    if mining is None:
        assert per_anchor[0] > 0.0  # its negative part alone
    else:
        assert per_anchor[0] == 0.0  # no positive to compare negatives with: nothing mined
    np.testing.assert_allclose(
        jnp.sum(per_anchor),
        multi_similarity_loss(x, y, reduction="sum", mining=mining),
        rtol=1e-6,
    )


@pytest.mark.parametrize("reduction", ["mean", "sum", "mean_nonzero"])
@pytest.mark.parametrize("mining", [None, "multi_similarity"])
def test_weights_match_reference_and_padding_is_exact(reduction, mining):
    x, y = batch(3)
    w = np.array([1.0, 0.5, 2.0, 0.0, 1.0, 1.0, 3.0, 0.0, 1.0, 1.0, 0.5, 1.0], np.float32)
    config = dict(reduction=reduction, mining=mining)
    np.testing.assert_allclose(
        multi_similarity_loss(x, y, weights=w, **config),
        reference_loss(x, y, weights=w, **config),
        rtol=1e-5,
    )
    # Zero-weight rows behave as if they were not in the batch (mining included).
    keep = w > 0
    np.testing.assert_allclose(
        multi_similarity_loss(x, y, weights=keep.astype(np.float32), **config),
        multi_similarity_loss(x[keep], y[keep], **config),
        rtol=1e-6,
    )
    grad = jax.grad(lambda e: multi_similarity_loss(e, y, weights=w, **config))(x)
    np.testing.assert_array_equal(grad[~keep], 0.0)


def test_large_beta_does_not_overflow_in_float32():
    # Near-duplicates of another class as negatives: β·(S − λ) ≈ 500·0.5 = 250, so a plain
    # exp overflows float32 (max ≈ exp(88)); the shifted log-sum-exp stays exact.
    rng = np.random.default_rng(0)
    centre = rng.normal(size=(1, D))
    x = (centre + 0.01 * rng.normal(size=(B, D))).astype(np.float32)
    y = (np.arange(B) % 3).astype(np.int32)
    for mining in (None, "multi_similarity"):
        expected = reference_loss(x, y, beta=500.0, mining=mining)
        assert expected > 0.4
        actual = multi_similarity_loss(x, y, beta=500.0, mining=mining)
        np.testing.assert_allclose(actual, expected, rtol=1e-5)
        assert_finite_value_and_grad(
            lambda e, m=mining: multi_similarity_loss(e, y, beta=500.0, mining=m), x
        )


# --------------------------------------------------------------------------------------------
# Gradients, jit, row blocks, low precision
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "config",
    [dict(), dict(mining="multi_similarity"), dict(alpha=1.0, beta=10.0, reduction="sum")],
)
def test_gradients_match_finite_differences(config):
    x, y = batch(5)
    check_grads_x64(lambda e: multi_similarity_loss(e, jnp.asarray(y), **config), x)


def test_gradient_float32_close_to_float64():
    x, y = batch(7)
    for mining in (None, "multi_similarity"):
        grad32 = jax.grad(lambda e, m=mining: multi_similarity_loss(e, y, mining=m))(x)
        assert grad32.dtype == jnp.float32
        with jax.enable_x64(True):
            grad64 = jax.grad(lambda e, m=mining: multi_similarity_loss(e, y, mining=m))(
                jnp.asarray(x, jnp.float64)
            )
        np.testing.assert_allclose(grad32, grad64, rtol=1e-3, atol=1e-4 * np.abs(grad64).max())


class TestVariants(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_jit_and_eager_agree(self):
        x, y = batch(4)
        for mining in (None, "multi_similarity"):
            fn = self.variant(lambda e, lab, m=mining: multi_similarity_loss(e, lab, mining=m))
            np.testing.assert_allclose(fn(x, y), reference_loss(x, y, mining=mining), rtol=1e-5)

    @chex.variants(with_jit=True, without_jit=True)
    def test_grad_jit_and_eager_agree(self):
        x, y = batch(5)
        for mining in (None, "multi_similarity"):
            loss = lambda e, lab, m=mining: multi_similarity_loss(e, lab, mining=m)  # noqa: E731
            grad = self.variant(jax.grad(loss))
            expected = jax.grad(loss)(x, y)
            np.testing.assert_allclose(grad(x, y), expected, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("mining", [None, "multi_similarity"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_block_sizes_agree(mining, reduction):
    x, y = batch(6)
    w = np.ones(12, np.float32)
    w[4] = 0.0

    def value_and_grad(block_size):
        def loss(e):
            out = multi_similarity_loss(
                e, y, weights=w, reduction=reduction, mining=mining, block_size=block_size
            )
            return jnp.sum(out * jnp.arange(1.0, out.size + 1.0)) if out.ndim else out

        return jax.value_and_grad(loss)(x)

    dense_value, dense_grad = value_and_grad(None)
    # 5 does not divide 12: the last block is padded.
    for block_size in (5, "auto"):
        value, grad = value_and_grad(block_size)
        np.testing.assert_allclose(value, dense_value, rtol=1e-6)
        np.testing.assert_allclose(grad, dense_grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("mining", [None, "multi_similarity"])
def test_low_precision_inputs_compute_in_float32(dtype, mining):
    x, y = batch(6)
    low = jnp.asarray(x, dtype)
    value, grad = jax.value_and_grad(lambda e: multi_similarity_loss(e, y, mining=mining))(low)
    assert value.dtype == jnp.float32 and np.isfinite(value)
    assert grad.dtype == dtype and np.isfinite(np.asarray(grad, np.float32)).all()
    # Exact for the rounded inputs, and close to the float32 loss of the unrounded ones.
    rounded = np.asarray(low, np.float32)
    np.testing.assert_allclose(value, reference_loss(rounded, y, mining=mining), rtol=1e-5)
    np.testing.assert_allclose(value, multi_similarity_loss(x, y, mining=mining), rtol=2e-2)


def test_traced_hyperparameters():
    x, y = batch(12, classes=2)
    fn = jax.jit(
        lambda e, lab, a, b, base, eps: multi_similarity_loss(
            e, lab, alpha=a, beta=b, base=base, epsilon=eps, mining="multi_similarity"
        )
    )
    expected = reference_loss(
        x, y, alpha=1.5, beta=30.0, base=0.4, epsilon=0.2, mining="multi_similarity"
    )
    np.testing.assert_allclose(fn(x, y, 1.5, 30.0, 0.4, 0.2), expected, rtol=1e-5)


# --------------------------------------------------------------------------------------------
# Degenerate batches
# --------------------------------------------------------------------------------------------

DEGENERATE = {
    "one_class": (
        np.random.default_rng(0).normal(size=(B, D)).astype(np.float32),
        np.zeros(B, np.int32),
    ),
    "singletons": (
        np.random.default_rng(1).normal(size=(B, D)).astype(np.float32),
        np.arange(B, dtype=np.int32),
    ),
    "zero_vectors": (np.zeros((B, D), np.float32), np.arange(B, dtype=np.int32) % 2),
    "duplicates_one_class": (np.ones((B, D), np.float32), np.zeros(B, np.int32)),
    "duplicates_two_classes": (np.ones((B, D), np.float32), np.arange(B, dtype=np.int32) % 2),
    # One valid sample (the rest weighted 0): no pair at all. Kept at the shape of the others,
    # so it compiles nothing new.
    "one_valid_sample": (
        np.random.default_rng(2).normal(size=(B, D)).astype(np.float32),
        np.arange(B, dtype=np.int32) % 3,
    ),
}
DEGENERATE_WEIGHTS = {"one_valid_sample": (np.arange(B) == 0).astype(np.float32)}


@pytest.mark.parametrize("case", sorted(DEGENERATE))
@pytest.mark.parametrize("mining", [None, "multi_similarity"])
@pytest.mark.parametrize("reduction", ["mean", "mean_nonzero"])
def test_degenerate_batches_are_finite_and_match_reference(case, mining, reduction):
    x, y = DEGENERATE[case]
    config = dict(mining=mining, reduction=reduction, weights=DEGENERATE_WEIGHTS.get(case))
    fn = lambda e: multi_similarity_loss(e, y, **config)  # noqa: E731
    assert_finite_value_and_grad(fn, x)
    np.testing.assert_allclose(fn(x), reference_loss(x, y, **config), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("case", ["one_class", "singletons"])
def test_one_sided_batches(case):
    x, y = DEGENERATE[case]
    # All pairs: only the side that exists contributes (the other is log(1) = 0).
    alpha, beta = 2.0, 50.0
    similarity = reference_similarity(x)
    off_diagonal = ~np.eye(len(y), dtype=bool)
    if case == "one_class":
        terms = np.where(off_diagonal, np.exp(-alpha * (similarity - 0.5)), 0.0)
        expected = np.mean(np.log1p(terms.sum(1)) / alpha)
    else:
        terms = np.where(off_diagonal, np.exp(beta * (similarity - 0.5)), 0.0)
        expected = np.mean(np.log1p(terms.sum(1)) / beta)
    np.testing.assert_allclose(multi_similarity_loss(x, y), expected, rtol=1e-5)
    # Mined: no reference for the other side, so nothing is kept — 0 with zero gradient.
    value, grad = jax.value_and_grad(
        lambda e: multi_similarity_loss(e, y, mining="multi_similarity")
    )(x)
    assert value == 0.0
    np.testing.assert_array_equal(grad, 0.0)


def test_all_weights_zero_is_finite():
    x, y = batch(11, classes=2)
    value, grad = jax.value_and_grad(
        lambda e: multi_similarity_loss(e, y, weights=np.zeros(B, np.float32))
    )(x)
    assert value == 0.0
    np.testing.assert_array_equal(grad, 0.0)


# --------------------------------------------------------------------------------------------
# The miner
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("epsilon", [0.0, 0.1, 0.5])
@pytest.mark.parametrize("seed", [0, 1])
def test_miner_matches_reference(epsilon, seed):
    x, y = batch(seed, scale=0.6)
    similarity = reference_similarity(x)
    positive, negative = multi_similarity_pairs(similarity, y, epsilon=epsilon)
    assert positive.dtype == jnp.bool_ and positive.shape == (B, B)
    expected_positive, expected_negative = reference_pairs(similarity, y, epsilon)
    np.testing.assert_array_equal(positive, expected_positive)
    np.testing.assert_array_equal(negative, expected_negative)


def test_miner_with_a_large_margin_keeps_every_pair_of_two_sided_anchors():
    x, y = batch(3)
    y = y.copy()
    y[0] = 9  # anchor 0: no positive, so no reference for its negatives
    positive, negative = multi_similarity_pairs(reference_similarity(x), y, epsilon=10.0)
    same = np.equal.outer(y, y)
    np.testing.assert_array_equal(positive, same & ~np.eye(B, dtype=bool))
    expected_negative = ~same
    expected_negative[0] = False
    np.testing.assert_array_equal(negative, expected_negative)


@settings(max_examples=10)
@given(
    seed=st.integers(0, 10_000),
    classes=st.integers(1, 6),
    epsilon=st.sampled_from([0.0, 0.25, 0.5]),
)
def test_miner_never_pairs_across_labels_or_with_itself(seed, classes, epsilon):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, size=B).astype(np.int32)
    # Arbitrary (not necessarily symmetric) similarities with ties, and invalid samples (which
    # also make smaller effective batches). Similarities and ε are multiples of 1/4, so S ± ε is
    # exact in float32 and float64 alike and the strict inequalities meet exact ties.
    similarity = rng.choice(np.arange(-4, 5) / 4, size=(B, B))
    valid = rng.random(B) > rng.choice([0.0, 0.3, 0.8])
    positive, negative = multi_similarity_pairs(similarity, labels, epsilon=epsilon, valid=valid)
    positive, negative = np.asarray(positive), np.asarray(negative)
    same = np.equal.outer(labels, labels)
    both_valid = np.outer(valid, valid)
    assert not np.any(positive & ~same), "a mined positive with a different label"
    assert not np.any(np.diag(positive)), "a mined positive pair (i, i)"
    assert not np.any(negative & same), "a mined negative with the same label"
    assert not np.any((positive | negative) & ~both_valid)
    expected_positive, expected_negative = reference_pairs(similarity, labels, epsilon, valid)
    np.testing.assert_array_equal(positive, expected_positive)
    np.testing.assert_array_equal(negative, expected_negative)


def test_miner_ignores_nan_similarities():
    similarity = np.full((4, 4), 0.5)
    similarity[0, 1] = np.nan
    labels = np.array([0, 0, 1, 1], np.int32)
    positive, negative = multi_similarity_pairs(similarity, labels)
    assert not positive[0, 1]  # a NaN pair is never kept
    assert not negative[0].any()  # its anchor's hardest positive is NaN: no negative kept


# --------------------------------------------------------------------------------------------
# Bad input: ValueError naming the argument, raised while tracing
# --------------------------------------------------------------------------------------------


def test_bad_loss_input_raises_at_trace_time():
    x, y = random_batch(8, batch=4, dim=D)

    def trace(fn, *args):
        return jax.eval_shape(fn, *args)

    with pytest.raises(ValueError, match="embeddings must have shape"):
        trace(lambda e: multi_similarity_loss(e, y), x[0])
    with pytest.raises(ValueError, match="embeddings must have shape"):
        trace(lambda e: multi_similarity_loss(e, y), x[None])
    with pytest.raises(ValueError, match=r"labels must have shape \[4\]"):
        trace(lambda e, lab: multi_similarity_loss(e, lab), x, y[:3])
    for name, value in [("alpha", 0.0), ("alpha", -1.0), ("beta", 0.0), ("beta", -50.0)]:
        with pytest.raises(ValueError, match=f"{name} must be > 0"):
            trace(lambda e, n=name, v=value: multi_similarity_loss(e, y, **{n: v}), x)
    with pytest.raises(ValueError, match="epsilon must be >= 0"):
        trace(lambda e: multi_similarity_loss(e, y, epsilon=-0.1, mining="multi_similarity"), x)
    with pytest.raises(ValueError, match="mining must be one of"):
        trace(lambda e: multi_similarity_loss(e, y, mining="hard"), x)
    with pytest.raises(ValueError, match="reduction must be one of"):
        trace(lambda e: multi_similarity_loss(e, y, reduction="avg"), x)
    with pytest.raises(ValueError, match=r"weights must have shape \[4\]"):
        trace(lambda e: multi_similarity_loss(e, y, weights=np.ones(3, np.float32)), x)


def test_bad_miner_input_raises_at_trace_time():
    similarity = np.zeros((4, 4), np.float32)
    labels = np.array([0, 0, 1, 1], np.int32)

    def trace(fn, *args):
        return jax.eval_shape(fn, *args)

    with pytest.raises(ValueError, match="similarity must have shape"):
        trace(lambda s: multi_similarity_pairs(s, labels), similarity[0])
    with pytest.raises(ValueError, match="similarity must be square"):
        trace(lambda s: multi_similarity_pairs(s, labels), similarity[:3])
    with pytest.raises(ValueError, match=r"labels must have shape \[4\]"):
        trace(lambda s, lab: multi_similarity_pairs(s, lab), similarity, labels[:3])
    with pytest.raises(ValueError, match="epsilon must be >= 0"):
        trace(lambda s: multi_similarity_pairs(s, labels, epsilon=-0.1), similarity)
    with pytest.raises(ValueError, match=r"valid must have shape \[4\]"):
        trace(lambda s: multi_similarity_pairs(s, labels, valid=np.ones(3, bool)), similarity)


# --------------------------------------------------------------------------------------------
# Parity with pytorch-metric-learning (float64)
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pml():
    torch = pytest.importorskip("torch", reason="parity tests need torch (pip install torch)")
    pytest.importorskip(
        "pytorch_metric_learning",
        reason="parity tests need pytorch-metric-learning (pip install .[parity])",
    )
    from pytorch_metric_learning import losses, miners, reducers

    return SimpleNamespace(torch=torch, losses=losses, miners=miners, reducers=reducers)


def _parity_batches():
    """(embeddings float64, labels int32): random batches, one with a singleton class, one with
    near-duplicate hard negatives."""
    out = []
    for seed in range(3):
        x, y = batch(seed, classes=4, scale=0.7)
        out.append((x.astype(np.float64), y))
    x, y = batch(7)
    y = y.copy()
    y[4] = 9
    out.append((x.astype(np.float64), y))
    rng = np.random.default_rng(3)
    x = rng.normal(size=(1, D)) + 0.05 * rng.normal(size=(B, D))
    out.append((x, (np.arange(B) % 3).astype(np.int32)))
    return out


PARITY_BATCHES = _parity_batches()


def _pml_value_and_grad(pml, loss_fn, x, y, miner=None):
    torch = pml.torch
    embeddings = torch.tensor(x, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor(y, dtype=torch.int64)
    pairs = miner(embeddings, labels) if miner is not None else None
    loss = loss_fn(embeddings, labels, pairs)
    loss.backward()
    return float(loss.detach()), embeddings.grad.numpy()


def _ours_value_and_grad(x, y, **config):
    with jax.enable_x64(True):
        value, grad = jax.value_and_grad(
            lambda e: multi_similarity_loss(e, jnp.asarray(y), **config)
        )(jnp.asarray(x, jnp.float64))
        assert value.dtype == jnp.float64
        return float(value), np.asarray(grad)


@pytest.mark.parametrize("mining", [None, "multi_similarity"])
@pytest.mark.parametrize(
    "hyper", [dict(alpha=2.0, beta=50.0, base=0.5), dict(alpha=1.0, beta=20.0, base=0.8)]
)
@pytest.mark.parametrize("index", range(len(PARITY_BATCHES)))
def test_loss_matches_pml(pml, mining, hyper, index):
    """PML's default reducer for MultiSimilarityLoss is MeanReducer over the B per-anchor
    losses, anchors without (mined) pairs included: our ``reduction="mean"``."""
    x, y = PARITY_BATCHES[index]
    loss_fn = pml.losses.MultiSimilarityLoss(**hyper)
    assert isinstance(loss_fn.reducer, pml.reducers.MeanReducer)
    miner = pml.miners.MultiSimilarityMiner(epsilon=0.1) if mining else None
    ref_value, ref_grad = _pml_value_and_grad(pml, loss_fn, x, y, miner)
    value, grad = _ours_value_and_grad(x, y, mining=mining, reduction="mean", **hyper)
    assert ref_value != 0.0
    np.testing.assert_allclose(value, ref_value, rtol=1e-10)
    np.testing.assert_allclose(grad, ref_grad, rtol=1e-9, atol=1e-12 * np.abs(ref_grad).max())


@pytest.mark.parametrize("index", [0, 3])
def test_mean_nonzero_matches_pml_avg_nonzero_reducer(pml, index):
    x, y = PARITY_BATCHES[index]
    loss_fn = pml.losses.MultiSimilarityLoss(reducer=pml.reducers.AvgNonZeroReducer())
    miner = pml.miners.MultiSimilarityMiner(epsilon=0.1)
    ref_value, ref_grad = _pml_value_and_grad(pml, loss_fn, x, y, miner)
    value, grad = _ours_value_and_grad(x, y, mining="multi_similarity", reduction="mean_nonzero")
    np.testing.assert_allclose(value, ref_value, rtol=1e-10)
    np.testing.assert_allclose(grad, ref_grad, rtol=1e-9, atol=1e-12 * np.abs(ref_grad).max())


@pytest.mark.parametrize("epsilon", [0.1, 0.3])
@pytest.mark.parametrize("index", range(len(PARITY_BATCHES)))
def test_miner_matches_pml(pml, epsilon, index):
    """Same pairs as PML's MultiSimilarityMiner on CPU. KevinMusgrave/pytorch-metric-learning#723
    reports that miner returning positives with different labels (on an Apple MPS device); ours
    cannot (its positives are a subset of the label mask, see
    test_miner_never_pairs_across_labels_or_with_itself), so where PML shows that bug the masks
    differ by exactly those pairs."""
    torch = pml.torch
    x, y = PARITY_BATCHES[index]
    miner = pml.miners.MultiSimilarityMiner(epsilon=epsilon)
    a1, p, a2, n = miner(torch.tensor(x), torch.tensor(y, dtype=torch.int64))
    pml_positive = np.zeros((len(y), len(y)), bool)
    pml_negative = np.zeros((len(y), len(y)), bool)
    pml_positive[a1.numpy(), p.numpy()] = True
    pml_negative[a2.numpy(), n.numpy()] = True
    with jax.enable_x64(True):
        similarity = jnp.asarray(reference_similarity(x))
        positive, negative = multi_similarity_pairs(similarity, y, epsilon=epsilon)
    assert pml_positive.any() and pml_negative.any()
    np.testing.assert_array_equal(np.asarray(positive), pml_positive)
    np.testing.assert_array_equal(np.asarray(negative), pml_negative)
