"""Tuplet margin loss (Yu & Tao 2019): a loop-over-pairs NumPy reference of the paper's Eq. 5,
the row-block forms, degenerate batches, bad input, and float64 parity (value and gradient) with
pytorch-metric-learning's TupletMarginLoss."""

from __future__ import annotations

import functools
import math
from types import SimpleNamespace

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mlx_jax.losses.tuplet_margin import tuplet_margin_loss
from tests.helpers import assert_finite_value_and_grad, check_grads_x64, random_batch

# One batch shape (12 x 4) almost everywhere: eager JAX compiles each operation once per shape
# and dtype, so a shared shape keeps the file fast.
B, D = 12, 4


def batch(seed, classes=3, scale=1.0):
    return random_batch(seed, batch=B, dim=D, classes=classes, scale=scale)


# --------------------------------------------------------------------------------------------
# Reference: Eq. 5 pair by pair, with the angle through arccos, in float64.
# --------------------------------------------------------------------------------------------


def reference_cosines(x) -> np.ndarray:
    x = np.asarray(x, np.float64)
    unit = x / np.maximum(np.sqrt(np.sum(x * x, axis=1, keepdims=True)), 1e-12)
    return unit @ unit.T


def reference_loss(x, labels, *, margin=5.73, scale=64.0, weights=None, reduction="mean"):
    """ℓ(a, p) = log(1 + Σ_n exp(s·(cos θ_an − cos(θ_ap − β)))) for every positive pair."""
    batch_size = len(labels)
    w = np.ones(batch_size) if weights is None else np.asarray(weights, np.float64)
    cosine = reference_cosines(x)
    beta = math.radians(margin)
    unreduced = np.zeros((batch_size, batch_size))
    total = weight = nonzero = 0.0
    for a in range(batch_size):
        if w[a] == 0:
            continue
        negatives = [n for n in range(batch_size) if labels[n] != labels[a] and w[n] > 0]
        for p in range(batch_size):
            if p == a or labels[p] != labels[a] or w[p] == 0:
                continue
            theta = math.acos(min(1.0, max(-1.0, cosine[a, p])))
            target = math.cos(theta - beta)
            term = math.log1p(sum(math.exp(scale * (cosine[a, n] - target)) for n in negatives))
            unreduced[a, p] = w[a] * term
            total += w[a] * term
            weight += w[a]
            nonzero += w[a] if term > 0 else 0.0
    if reduction == "none":
        return unreduced
    denominator = {"sum": 1.0, "mean": weight, "mean_nonzero": nonzero}[reduction]
    return total / denominator if denominator > 0 else 0.0


# --------------------------------------------------------------------------------------------
# Values, reductions, weights
# --------------------------------------------------------------------------------------------

CONFIGS = [
    dict(),  # PML's defaults: β = 5.73°, s = 64
    dict(margin=0.0, scale=16.0, reduction="sum"),
    dict(margin=30.0, scale=8.0, reduction="mean_nonzero"),
    dict(margin=90.0, scale=32.0),
]


@pytest.mark.parametrize("config", CONFIGS)
def test_matches_reference(config):
    x, y = batch(0)
    actual = tuplet_margin_loss(x, y, **config)
    assert actual.dtype == jnp.float32
    np.testing.assert_allclose(actual, reference_loss(x, y, **config), rtol=1e-5)


def test_matches_reference_in_float64():
    x, y = batch(1)
    y = y.copy()
    y[0] = 5  # a singleton class: anchor 0 has no positive
    with jax.enable_x64(True):
        actual = tuplet_margin_loss(jnp.asarray(x, jnp.float64), y, reduction="sum")
        assert actual.dtype == jnp.float64
    np.testing.assert_allclose(float(actual), reference_loss(x, y, reduction="sum"), rtol=1e-10)


def test_hand_derived_value():
    # Unit vectors e0 = (1, 0, 0, 0), e1 = (cos 30°, sin 30°, 0, 0), e2 = (−1, 0, 0, 0),
    # labels (0, 0, 1), β = 30°, s = 1: θ_01 = 30°, so the target is cos(30° − 30°) = 1;
    # the one negative, e2, has cos θ_02 = −1 and cos θ_12 = −cos 30°. Pair (0, 1):
    # log(1 + e^{−1 − 1}); pair (1, 0): log(1 + e^{−cos 30° − 1}). Anchor 2 has no positive.
    # The other rows of the (12, 4) batch have weight 0, i.e. are not in it.
    x, y = batch(2)
    c, s = math.cos(math.pi / 6), math.sin(math.pi / 6)
    x[:3] = [[1.0, 0.0, 0.0, 0.0], [c, s, 0.0, 0.0], [-1.0, 0.0, 0.0, 0.0]]
    y = y.copy()
    y[:3] = [0, 0, 1]
    w = (np.arange(B) < 3).astype(np.float32)
    expected = (math.log1p(math.exp(-2.0)) + math.log1p(math.exp(-c - 1.0))) / 2
    value = tuplet_margin_loss(x, y, margin=30.0, scale=1.0, weights=w)
    np.testing.assert_allclose(value, expected, rtol=1e-6)


def test_margin_zero_is_the_plain_cosine_tuplet_loss():
    # β = 0: log(1 + Σ_n exp(s·(cos θ_an − cos θ_ap))), written directly
    x, y = batch(3)
    cosine = reference_cosines(x)
    same = np.equal.outer(y, y)
    terms = []
    for a in range(B):
        for p in range(B):
            if p != a and same[a, p]:
                terms.append(np.log1p(np.sum(np.exp(16.0 * (cosine[a, ~same[a]] - cosine[a, p])))))
    np.testing.assert_allclose(
        tuplet_margin_loss(x, y, margin=0.0, scale=16.0), np.mean(terms), rtol=1e-5
    )


def test_reduction_none_is_per_pair():
    x, y = batch(4)
    y = y.copy()
    y[0] = 5
    w = np.array([1.0, 0.5, 2.0, 0.0, 1.0, 1.0, 3.0, 1.0, 1.0, 1.0, 0.5, 1.0], np.float32)
    terms = tuplet_margin_loss(x, y, weights=w, reduction="none")
    assert terms.shape == (B, B)
    expected = reference_loss(x, y, weights=w, reduction="none")
    np.testing.assert_allclose(terms, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(terms[0], 0.0)  # no positive
    np.testing.assert_allclose(
        jnp.sum(terms), tuplet_margin_loss(x, y, weights=w, reduction="sum"), rtol=1e-6
    )


@pytest.mark.parametrize("reduction", ["mean", "sum", "mean_nonzero"])
def test_weights_match_reference_and_zero_weight_is_removal(reduction):
    x, y = batch(5)
    w = np.array([1.0, 0.5, 2.0, 0.0, 1.0, 1.0, 3.0, 0.0, 1.0, 1.0, 0.5, 1.0], np.float32)
    config = dict(reduction=reduction, scale=16.0)
    np.testing.assert_allclose(
        tuplet_margin_loss(x, y, weights=w, **config),
        reference_loss(x, y, weights=w, **config),
        rtol=1e-5,
    )
    keep = w > 0
    np.testing.assert_allclose(
        tuplet_margin_loss(x, y, weights=keep.astype(np.float32), **config),
        tuplet_margin_loss(x[keep], y[keep], **config),
        rtol=1e-6,
    )
    grad = jax.grad(lambda e: tuplet_margin_loss(e, y, weights=w, **config))(x)
    np.testing.assert_array_equal(grad[~keep], 0.0)


# --------------------------------------------------------------------------------------------
# Gradients, jit, row blocks, low precision
# --------------------------------------------------------------------------------------------


def test_gradients_match_finite_differences():
    x, y = batch(6)
    w = np.array([1.0, 2.0, 1.0, 0.5, 1.0, 1.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.5])
    check_grads_x64(
        jax.jit(lambda e: tuplet_margin_loss(e, y, margin=20.0, scale=8.0, weights=w)), x
    )


class TestVariants(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_jit_and_eager_agree(self):
        x, y = batch(7)
        fn = self.variant(lambda e, lab: tuplet_margin_loss(e, lab))
        np.testing.assert_allclose(fn(x, y), reference_loss(x, y), rtol=1e-5)

    @chex.variants(with_jit=True, without_jit=True)
    def test_grad_jit_and_eager_agree(self):
        x, y = batch(8)
        loss = lambda e, lab: tuplet_margin_loss(e, lab)  # noqa: E731
        expected = jax.grad(loss)(x, y)
        np.testing.assert_allclose(self.variant(jax.grad(loss))(x, y), expected, rtol=1e-4)


def test_traced_hyperparameters():
    x, y = batch(9)
    fn = jax.jit(lambda e, m, s: tuplet_margin_loss(e, y, margin=m, scale=s))
    np.testing.assert_allclose(
        fn(x, 12.0, 20.0), reference_loss(x, y, margin=12.0, scale=20.0), rtol=1e-5
    )
    # a traced β of 0 takes the general (square-root) path: still cos θ
    np.testing.assert_allclose(
        fn(x, 0.0, 20.0), reference_loss(x, y, margin=0.0, scale=20.0), rtol=1e-5
    )


def test_block_sizes_give_the_same_value_and_gradients():
    x, y = batch(10)
    w = np.ones(B, np.float32)
    w[[2, 9]] = [0.0, 2.5]
    cotangent = np.random.default_rng(10).uniform(0.5, 1.5, size=(B, B)).astype(np.float32)

    @functools.partial(jax.jit, static_argnums=1)
    def values_and_grads(e, block_size):
        out = []
        for reduction in ("mean_nonzero", "none"):

            def weighted(e, r=reduction):
                value = tuplet_margin_loss(e, y, weights=w, reduction=r, block_size=block_size)
                return jnp.sum(value * cotangent[tuple(slice(n) for n in value.shape)]), value

            (_, value), grad = jax.value_and_grad(weighted, has_aux=True)(e)
            out.append((value, grad))
        return out

    dense = values_and_grads(x, None)
    assert np.abs(dense[0][1]).sum() > 0
    for (value, grad), (dense_value, dense_grad) in zip(
        values_and_grads(x, 5),
        dense,
        strict=True,  # 5 does not divide 12: padded
    ):
        np.testing.assert_allclose(value, dense_value, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(
            grad, dense_grad, rtol=1e-4, atol=1e-6 * np.abs(dense_grad).max()
        )


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_low_precision_inputs_compute_in_float32(dtype):
    x, y = batch(11)
    low = jnp.asarray(x, dtype)
    value, grad = jax.value_and_grad(lambda e: tuplet_margin_loss(e, y))(low)
    assert value.dtype == jnp.float32 and np.isfinite(value)
    assert grad.dtype == dtype and np.isfinite(np.asarray(grad, np.float32)).all()
    # exact for the rounded inputs (s = 64 amplifies their rounding, so no comparison with the
    # unrounded ones)
    np.testing.assert_allclose(value, reference_loss(np.asarray(low, np.float32), y), rtol=1e-5)


def test_duplicate_positive_has_finite_gradient_unlike_pml_acos():
    # cos θ_ap = 1 exactly (x1 = 2·x0): d arccos/dc is infinite there, PML's gradient is NaN
    # (checked against PML below); the square-root form has a finite one.
    x, y = batch(12)
    x[0] = [1.0, 0.0, 0.0, 0.0]
    x[1] = [2.0, 0.0, 0.0, 0.0]
    y = y.copy()
    y[:2] = 0
    assert reference_cosines(x)[0, 1] == 1.0
    np.testing.assert_allclose(tuplet_margin_loss(x, y), reference_loss(x, y), rtol=1e-5)
    assert_finite_value_and_grad(lambda e: tuplet_margin_loss(e, y), x)


# --------------------------------------------------------------------------------------------
# Degenerate batches
# --------------------------------------------------------------------------------------------

DEGENERATE = {
    "one_class": (batch(13)[0], np.zeros(B, np.int32)),
    "singletons": (batch(14)[0], np.arange(B, dtype=np.int32)),
    "zero_vectors": (np.zeros((B, D), np.float32), np.arange(B, dtype=np.int32) % 2),
    "duplicates": (np.ones((B, D), np.float32), np.arange(B, dtype=np.int32) % 2),
    "duplicates_one_class": (np.ones((B, D), np.float32), np.zeros(B, np.int32)),
    "one_zero_vector": (batch(15)[0] * (np.arange(B) != 3)[:, None], batch(15)[1]),
    "one_valid_sample": batch(16),
    "all_weights_zero": batch(17),
}
DEGENERATE_WEIGHTS = {
    "one_valid_sample": (np.arange(B) == 0).astype(np.float32),
    "all_weights_zero": np.zeros(B, np.float32),
}
NO_TERM = {"one_class", "singletons", "duplicates_one_class", "one_valid_sample"}
NO_TERM |= {"all_weights_zero"}
DEGENERATE_FORMS = (("sum", None), ("mean_nonzero", None), ("mean", 5))


@jax.jit
def _degenerate_values_and_grads(x, y, w):
    return [
        jax.value_and_grad(
            lambda e, r=r, s=s: tuplet_margin_loss(e, y, weights=w, reduction=r, block_size=s)
        )(x)
        for r, s in DEGENERATE_FORMS
    ]


@pytest.mark.parametrize("case", sorted(DEGENERATE))
def test_degenerate_batches_are_finite_and_match_reference(case):
    x, y = DEGENERATE[case]
    w = DEGENERATE_WEIGHTS.get(case, np.ones(B, np.float32))
    results = _degenerate_values_and_grads(x, y, w)
    for (reduction, _), (value, grad) in zip(DEGENERATE_FORMS, results, strict=True):
        assert np.isfinite(np.asarray(value)) and np.isfinite(np.asarray(grad)).all()
        expected = reference_loss(x, y, weights=w, reduction=reduction)
        np.testing.assert_allclose(value, expected, rtol=1e-5, atol=1e-6)
        if case in NO_TERM:  # no positive pair, or no negative for any of them
            assert value == 0.0
            np.testing.assert_array_equal(grad, 0.0)


# --------------------------------------------------------------------------------------------
# Bad input: errors naming the argument, raised while tracing
# --------------------------------------------------------------------------------------------


def test_bad_input_raises_at_trace_time():
    x, y = batch(18)

    def trace(fn, *args):
        return jax.eval_shape(fn, *args)

    with pytest.raises(ValueError, match="embeddings must have shape"):
        trace(lambda e: tuplet_margin_loss(e, y), x[None])
    with pytest.raises(TypeError, match="embeddings must be a floating-point array"):
        trace(lambda e: tuplet_margin_loss(e, y), x.astype(np.int32))
    with pytest.raises(ValueError, match=r"labels must have shape \[12\]"):
        trace(lambda e, lab: tuplet_margin_loss(e, lab), x, y[:5])
    with pytest.raises(ValueError, match="margin must be >= 0"):
        trace(lambda e: tuplet_margin_loss(e, y, margin=-1.0), x)
    with pytest.raises(ValueError, match=r"margin must be in \[0, 180\] degrees"):
        trace(lambda e: tuplet_margin_loss(e, y, margin=200.0), x)
    with pytest.raises(ValueError, match="scale must be > 0"):
        trace(lambda e: tuplet_margin_loss(e, y, scale=0.0), x)
    with pytest.raises(ValueError, match="reduction must be one of"):
        trace(lambda e: tuplet_margin_loss(e, y, reduction="avg"), x)
    with pytest.raises(ValueError, match=r"weights must have shape \[12\]"):
        trace(lambda e: tuplet_margin_loss(e, y, weights=np.ones(3, np.float32)), x)
    with pytest.raises(TypeError, match="block_size must be"):
        trace(lambda e: tuplet_margin_loss(e, y, block_size=2.5), x)


# --------------------------------------------------------------------------------------------
# Parity with pytorch-metric-learning (float64)
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pml():
    torch = pytest.importorskip("torch", reason="parity tests need torch (pip install torch)")
    losses = pytest.importorskip(
        "pytorch_metric_learning.losses",
        reason="parity tests need pytorch-metric-learning (pip install .[parity])",
    )
    from pytorch_metric_learning import reducers

    return SimpleNamespace(torch=torch, losses=losses, reducers=reducers)


def _parity_batches():
    """(embeddings float64, labels int32): random batches, one with a singleton class, one of
    near-duplicates (positives within the margin: θ_ap < β)."""
    out = []
    for seed in range(3):
        x, y = batch(20 + seed, scale=0.7)
        out.append((x.astype(np.float64), y))
    x, y = batch(23)
    y = y.copy()
    y[4] = 9
    out.append((x.astype(np.float64), y))
    rng = np.random.default_rng(24)
    labels = (np.arange(B) % 3).astype(np.int32)
    centres = rng.normal(size=(1, D)) + 0.3 * rng.normal(size=(3, D))  # nearby classes
    out.append((centres[labels] + 0.02 * rng.normal(size=(B, D)), labels))
    return out


PARITY_BATCHES = _parity_batches()


def _pml_value_and_grad(pml, x, y, reducer=None, **hyper):
    torch = pml.torch
    kwargs = {} if reducer is None else dict(reducer=reducer)
    loss_fn = pml.losses.TupletMarginLoss(**hyper, **kwargs)
    embeddings = torch.tensor(x, dtype=torch.float64, requires_grad=True)
    loss = loss_fn(embeddings, torch.tensor(y, dtype=torch.int64))
    loss.backward()
    return float(loss.detach()), embeddings.grad.numpy()


def _ours_value_and_grad(x, y, **config):
    with jax.enable_x64(True):
        value, grad = jax.value_and_grad(lambda e: tuplet_margin_loss(e, jnp.asarray(y), **config))(
            jnp.asarray(x, jnp.float64)
        )
        assert value.dtype == jnp.float64
        return float(value), np.asarray(grad)


def _assert_grads_close(actual, expected):
    np.testing.assert_allclose(actual, expected, rtol=1e-9, atol=1e-12 * np.abs(expected).max())


@pytest.mark.parametrize("hyper", [dict(), dict(margin=20.0, scale=16.0)])
@pytest.mark.parametrize("index", range(len(PARITY_BATCHES)))
def test_loss_matches_pml(pml, index, hyper):
    """PML's default reducer for TupletMarginLoss is MeanReducer over every positive pair: our
    ``reduction="mean"``."""
    x, y = PARITY_BATCHES[index]
    ref_value, ref_grad = _pml_value_and_grad(pml, x, y, **hyper)
    value, grad = _ours_value_and_grad(x, y, **hyper)
    assert ref_value > 0.0
    np.testing.assert_allclose(value, ref_value, rtol=1e-10)
    _assert_grads_close(grad, ref_grad)


def test_near_duplicates_are_inside_the_margin():
    # the last parity batch must exercise θ_ap < β (where cos(θ − β) = cos(β − θ))
    x, y = PARITY_BATCHES[-1]
    cosine = reference_cosines(x)
    same = np.equal.outer(y, y) & ~np.eye(B, dtype=bool)
    assert np.degrees(np.arccos(np.clip(cosine[same], -1, 1))).min() < 5.73


def test_mean_nonzero_matches_pml_avg_nonzero_reducer(pml):
    x, y = PARITY_BATCHES[3]
    ref_value, ref_grad = _pml_value_and_grad(pml, x, y, reducer=pml.reducers.AvgNonZeroReducer())
    value, grad = _ours_value_and_grad(x, y, reduction="mean_nonzero")
    np.testing.assert_allclose(value, ref_value, rtol=1e-10)
    _assert_grads_close(grad, ref_grad)


def test_pml_gradient_is_nan_at_a_duplicate_positive(pml):
    # The difference pinned: PML's acos has an infinite derivative at cos θ = 1 (NaN gradients),
    # ours is finite and agrees with PML's value.
    x, y = PARITY_BATCHES[0]
    x = x.copy()
    y = y.copy()
    x[0] = [1.0, 0.0, 0.0, 0.0]
    x[1] = [2.0, 0.0, 0.0, 0.0]
    y[1] = y[0]
    assert reference_cosines(x)[0, 1] == 1.0
    ref_value, ref_grad = _pml_value_and_grad(pml, x, y)
    value, grad = _ours_value_and_grad(x, y)
    assert np.isnan(ref_grad).any()
    np.testing.assert_allclose(value, ref_value, rtol=1e-10)
    assert np.isfinite(grad).all()


def test_no_negative_anywhere_matches_pml(pml):
    x, _ = PARITY_BATCHES[0]
    y = np.zeros(B, np.int32)
    ref_value, ref_grad = _pml_value_and_grad(pml, x, y)
    value, grad = _ours_value_and_grad(x, y)
    assert ref_value == value == 0.0
    np.testing.assert_array_equal(ref_grad, 0.0)
    np.testing.assert_array_equal(grad, 0.0)
