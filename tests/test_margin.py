"""Margin-based loss (Wu et al. 2017): a loop-over-triplets NumPy reference of the paper's Eq. 4-5,
the row-block forms, degenerate batches, bad input, the learnable β, and float64 parity (value,
embedding and β gradients) with pytorch-metric-learning's MarginLoss."""

from __future__ import annotations

import functools
import math
from types import SimpleNamespace

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mlx_jax.losses.margin import margin_loss, margin_loss_beta
from tests.helpers import check_grads_x64, random_batch

# One batch shape (12 x 4) almost everywhere: eager JAX compiles each operation once per shape
# and dtype, so a shared shape keeps the file fast.
B, D, C = 12, 4, 3


def batch(seed, classes=C, scale=0.7):
    return random_batch(seed, batch=B, dim=D, classes=classes, scale=scale)


def class_beta(seed, classes=C):
    """A per-class β spread around the paper's 1.2, so both hinge sides are active."""
    return np.random.default_rng(seed + 100).uniform(0.9, 1.3, size=classes).astype(np.float32)


# --------------------------------------------------------------------------------------------
# Reference: Eq. 4 term by term over every triplet (a, p, n), Eq. 5's ν·β, in float64.
# --------------------------------------------------------------------------------------------


def reference_distances(x) -> np.ndarray:
    x = np.asarray(x, np.float64)
    unit = x / np.maximum(np.sqrt(np.sum(x * x, axis=1, keepdims=True)), 1e-12)
    out = np.zeros((len(x), len(x)))
    for i in range(len(x)):
        for j in range(len(x)):
            out[i, j] = math.sqrt(sum((unit[i, k] - unit[j, k]) ** 2 for k in range(x.shape[1])))
    return out


def reference_loss(x, labels, beta, *, margin=0.2, nu=0.0, weights=None, reduction="mean"):
    """ℓ(i, j) = (α + y_ij (D_ij − β))₊ for the positive and the negative pair of every triplet,
    β the anchor's (shared, or of its class)."""
    batch_size = len(labels)
    w = np.ones(batch_size) if weights is None else np.asarray(weights, np.float64)
    beta = np.asarray(beta, np.float64)
    distance = reference_distances(x)
    per_anchor = np.zeros(batch_size)
    total = weight = nonzero = regularizer = 0.0
    triplets = 0
    for a in range(batch_size):
        if w[a] == 0:
            continue
        b = float(beta) if beta.ndim == 0 else beta[labels[a]]
        for p in range(batch_size):
            if p == a or labels[p] != labels[a] or w[p] == 0:
                continue
            for n in range(batch_size):
                if labels[n] == labels[a] or w[n] == 0:
                    continue
                triplets += 1
                for y_ij, d in ((+1, distance[a, p]), (-1, distance[a, n])):
                    term = max(0.0, margin + y_ij * (d - b))
                    per_anchor[a] += w[a] * term
                    total += w[a] * term
                    weight += w[a]
                    nonzero += w[a] if term > 0 else 0.0
                regularizer += nu * w[a] * b
    if reduction == "none":
        return per_anchor
    if beta.ndim == 0:  # shared β: ν·β once, if there is any triplet
        extra, regularizer = (nu * float(beta) if triplets else 0.0), 0.0
    else:
        extra = 0.0
    denominator = {"sum": 1.0, "mean": weight, "mean_nonzero": nonzero}[reduction]
    reduced = (total + regularizer) / denominator if denominator > 0 else 0.0
    return reduced + extra


# --------------------------------------------------------------------------------------------
# Values, reductions, weights
# --------------------------------------------------------------------------------------------

CONFIGS = [
    dict(),  # the paper's α = 0.2, shared β = 1.2
    dict(reduction="mean_nonzero", nu=0.1),
    dict(per_class=True, nu=0.3, reduction="mean_nonzero"),
    dict(per_class=True, margin=0.4, reduction="sum", nu=0.05),
    dict(per_class=True, nu=0.2),
    dict(margin=0.0, reduction="sum", nu=0.5),
]


def _beta(config, seed):
    return class_beta(seed) if config.get("per_class") else margin_loss_beta()


@pytest.mark.parametrize("config", CONFIGS)
def test_matches_reference(config):
    x, y = batch(0)
    kwargs = {k: v for k, v in config.items() if k != "per_class"}
    beta = _beta(config, 0)
    actual = margin_loss(x, y, beta, **kwargs)
    assert actual.dtype == jnp.float32
    np.testing.assert_allclose(actual, reference_loss(x, y, beta, **kwargs), rtol=1e-5)


@pytest.mark.parametrize("config", [CONFIGS[1], CONFIGS[3]])
def test_matches_reference_in_float64(config):
    x, y = batch(1)
    kwargs = {k: v for k, v in config.items() if k != "per_class"}
    beta = np.asarray(_beta(config, 1), np.float64)
    with jax.enable_x64(True):
        actual = margin_loss(jnp.asarray(x, jnp.float64), y, jnp.asarray(beta), **kwargs)
        assert actual.dtype == jnp.float64
    np.testing.assert_allclose(float(actual), reference_loss(x, y, beta, **kwargs), rtol=1e-10)


def test_hand_derived_value():
    # Unit vectors e0 = (1, 0, 0, 0), e1 = (0, 1, 0, 0), e2 = (−1, 0, 0, 0), labels (0, 0, 1):
    # D01 = D12 = √2, D02 = 2. Triplets (0, 1, 2) and (1, 0, 2); anchor 2 has no positive.
    # With α = 0.2 and β = 1.2 both positive terms are 0.2 + √2 − 1.2 = √2 − 1, the negative
    # terms 0.2 − (2 − 1.2) < 0 and 0.2 − (√2 − 1.2) < 0 are 0: four pair terms, two non-zero.
    # The other rows of the (12, 4) batch have weight 0, i.e. are not in it.
    x, y = batch(25)
    x[:3] = [[1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0], [-1.0, 0.0, 0.0, 0.0]]
    y = y.copy()
    y[:3] = [0, 0, 1]
    w = (np.arange(B) < 3).astype(np.float32)
    beta = margin_loss_beta()
    np.testing.assert_allclose(
        margin_loss(x, y, beta, weights=w), (math.sqrt(2) - 1) / 2, rtol=1e-6
    )
    np.testing.assert_allclose(
        margin_loss(x, y, beta, weights=w, reduction="mean_nonzero"), math.sqrt(2) - 1, rtol=1e-6
    )
    # ν·β once for a shared β: + 0.5·1.2
    np.testing.assert_allclose(
        margin_loss(x, y, beta, weights=w, nu=0.5, reduction="sum"),
        2 * (math.sqrt(2) - 1) + 0.6,
        rtol=1e-6,
    )


def test_shared_beta_equals_a_constant_per_class_beta_without_nu():
    x, y = batch(2)
    shared = margin_loss(x, y, jnp.float32(1.1), reduction="mean_nonzero")
    per_class = margin_loss(x, y, jnp.full((C,), 1.1), reduction="mean_nonzero")
    np.testing.assert_allclose(shared, per_class, rtol=1e-6)


@pytest.mark.parametrize("per_class", [False, True])
def test_reduction_none_is_per_anchor(per_class):
    x, y = batch(3)
    y = y.copy()
    y[0] = C  # a class of one: anchor 0 has no triplet
    beta = class_beta(3, C + 1) if per_class else margin_loss_beta()
    per_anchor = margin_loss(x, y, beta, reduction="none", nu=0.3)
    assert per_anchor.shape == (B,)
    np.testing.assert_allclose(per_anchor, reference_loss(x, y, beta, reduction="none"), rtol=1e-5)
    assert per_anchor[0] == 0.0
    # "sum" adds the ν term to the sum of the per-anchor terms (which never hold it)
    plain_sum = margin_loss(x, y, beta, reduction="sum")
    np.testing.assert_allclose(jnp.sum(per_anchor), plain_sum, rtol=1e-6)
    assert margin_loss(x, y, beta, reduction="sum", nu=0.3) > plain_sum


@pytest.mark.parametrize("reduction", ["mean", "sum", "mean_nonzero"])
def test_weights_match_reference_and_zero_weight_is_removal(reduction):
    x, y = batch(4)
    w = np.array([1.0, 0.5, 2.0, 0.0, 1.0, 1.0, 3.0, 0.0, 1.0, 1.0, 0.5, 1.0], np.float32)
    beta = class_beta(4)
    config = dict(reduction=reduction, nu=0.2)
    np.testing.assert_allclose(
        margin_loss(x, y, beta, weights=w, **config),
        reference_loss(x, y, beta, weights=w, **config),
        rtol=1e-5,
    )
    keep = w > 0
    for b in (beta, margin_loss_beta()):
        np.testing.assert_allclose(
            margin_loss(x, y, b, weights=keep.astype(np.float32), **config),
            margin_loss(x[keep], y[keep], b, **config),
            rtol=1e-6,
        )
    grad = jax.grad(lambda e: margin_loss(e, y, beta, weights=w, **config))(x)
    np.testing.assert_array_equal(grad[~keep], 0.0)


# --------------------------------------------------------------------------------------------
# Gradients (embeddings and β), jit, row blocks, low precision
# --------------------------------------------------------------------------------------------


def test_gradients_match_finite_differences():
    # per-class β (the shared β's gradient is checked against PML's below)
    x, y = batch(5)
    beta = class_beta(5)
    w = np.array([1.0, 2.0, 1.0, 0.5, 1.0, 1.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.5])
    check_grads_x64(
        jax.jit(lambda e, b: margin_loss(e, y, b, nu=0.3, weights=w, reduction="mean_nonzero")),
        x,
        beta,
    )


def test_beta_gradient_by_hand():
    # ∂/∂β of Σ (α + D_ap − β)₊ + (α − D_an + β)₊ is −(# active positive terms) + (# active
    # negative terms); per class, counted over the triplets of that class's anchors; plus ν
    # per triplet (per class) — all over the "sum" reduction.
    x, y = batch(6)
    beta = class_beta(6)
    nu = 0.25
    grad = jax.grad(lambda b: margin_loss(x, y, b, nu=nu, reduction="sum"))(beta)
    distance = reference_distances(x)
    expected = np.zeros(C)
    for a in range(B):
        for p in range(B):
            for n in range(B):
                if p == a or y[p] != y[a] or y[n] == y[a]:
                    continue
                b = beta[y[a]]
                expected[y[a]] += -float(0.2 + distance[a, p] - b > 0)
                expected[y[a]] += float(0.2 - distance[a, n] + b > 0) + nu
    np.testing.assert_allclose(grad, expected, rtol=1e-6)
    shared = jax.grad(lambda b: margin_loss(x, y, b, nu=nu, reduction="sum"))(jnp.float32(1.1))
    assert shared.shape == ()


class TestVariants(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_jit_and_eager_agree(self):
        x, y = batch(7)
        beta = class_beta(7)
        fn = self.variant(
            lambda e, lab, b: margin_loss(e, lab, b, nu=0.1, reduction="mean_nonzero")
        )
        expected = reference_loss(x, y, beta, nu=0.1, reduction="mean_nonzero")
        np.testing.assert_allclose(fn(x, y, beta), expected, rtol=1e-5)

    @chex.variants(with_jit=True, without_jit=True)
    def test_grad_jit_and_eager_agree(self):
        x, y = batch(8)
        beta = class_beta(8)
        loss = lambda e, lab, b: margin_loss(e, lab, b, nu=0.1)  # noqa: E731
        grads = self.variant(jax.grad(loss, argnums=(0, 2)))(x, y, beta)
        expected = jax.grad(loss, argnums=(0, 2))(x, y, beta)
        for g, e in zip(grads, expected, strict=True):
            np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-7)


def test_traced_hyperparameters():
    x, y = batch(9)
    beta = class_beta(9)
    fn = jax.jit(lambda e, b, m, nu: margin_loss(e, y, b, margin=m, nu=nu))
    np.testing.assert_allclose(
        fn(x, beta, 0.3, 0.2), reference_loss(x, y, beta, margin=0.3, nu=0.2), rtol=1e-5
    )


def test_block_sizes_give_the_same_value_and_gradients():
    x, y = batch(10)
    w = np.ones(B, np.float32)
    w[[2, 9]] = [0.0, 2.5]
    beta = class_beta(10)
    cotangent = np.random.default_rng(10).uniform(0.5, 1.5, size=B).astype(np.float32)

    @functools.partial(jax.jit, static_argnums=2)
    def values_and_grads(e, b, block_size):
        out = []
        for reduction in ("mean_nonzero", "none"):

            def weighted(e, b, r=reduction):
                value = margin_loss(e, y, b, nu=0.2, weights=w, reduction=r, block_size=block_size)
                return jnp.sum(value * cotangent[: value.size].reshape(value.shape)), value

            (_, value), grads = jax.value_and_grad(weighted, argnums=(0, 1), has_aux=True)(e, b)
            out.append((value, grads))
        return out

    dense = values_and_grads(x, beta, None)
    assert np.abs(dense[0][1][0]).sum() > 0 and np.abs(dense[0][1][1]).sum() > 0
    for block_size in (5,):  # 5 does not divide 12: the last block is padded
        for (value, grads), (dense_value, dense_grads) in zip(
            values_and_grads(x, beta, block_size), dense, strict=True
        ):
            np.testing.assert_allclose(value, dense_value, rtol=1e-6, atol=1e-7)
            for g, dense_g in zip(grads, dense_grads, strict=True):
                np.testing.assert_allclose(g, dense_g, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_low_precision_inputs_compute_in_float32(dtype):
    x, y = batch(11)
    low = jnp.asarray(x, dtype)
    beta = jnp.asarray(class_beta(11), dtype)
    value, (grad, beta_grad) = jax.value_and_grad(
        lambda e, b: margin_loss(e, y, b, nu=0.1), argnums=(0, 1)
    )(low, beta)
    assert value.dtype == jnp.float32 and np.isfinite(value)
    assert grad.dtype == dtype and beta_grad.dtype == dtype
    assert np.isfinite(np.asarray(grad, np.float32)).all()
    rounded = np.asarray(low, np.float32)
    rounded_beta = np.asarray(beta, np.float32)
    np.testing.assert_allclose(value, reference_loss(rounded, y, rounded_beta, nu=0.1), rtol=1e-5)
    # a float32 β with low-precision embeddings: the common compute dtype is float32
    assert margin_loss(low, y, margin_loss_beta(C)).dtype == jnp.float32


def test_margin_loss_beta():
    shared = margin_loss_beta()
    assert shared.shape == () and shared.dtype == jnp.float32 and float(shared) == np.float32(1.2)
    per_class = margin_loss_beta(5, init=0.8)
    assert per_class.shape == (5,)
    np.testing.assert_array_equal(per_class, np.float32(0.8))
    with pytest.raises(ValueError, match="num_classes must be >= 1"):
        margin_loss_beta(0)
    with pytest.raises(TypeError, match="num_classes must be a positive int"):
        margin_loss_beta(2.0)


# --------------------------------------------------------------------------------------------
# Degenerate batches
# --------------------------------------------------------------------------------------------

DEGENERATE = {
    "one_class": (batch(12)[0], np.zeros(B, np.int32)),
    "singletons": (batch(13)[0], np.arange(B, dtype=np.int32) % C),
    "zero_vectors": (np.zeros((B, D), np.float32), np.arange(B, dtype=np.int32) % 2),
    "duplicates": (np.ones((B, D), np.float32), np.arange(B, dtype=np.int32) % 2),
    "one_zero_vector": (batch(14)[0] * (np.arange(B) != 3)[:, None], batch(14)[1]),
    "one_valid_sample": (batch(15)[0], batch(15)[1]),
    "all_weights_zero": (batch(16)[0], batch(16)[1]),
}
DEGENERATE_WEIGHTS = {
    # every sample its own class: the labels above repeat, so weights keep one of each
    "singletons": (np.arange(B) < C).astype(np.float32),
    "one_valid_sample": (np.arange(B) == 0).astype(np.float32),
    "all_weights_zero": np.zeros(B, np.float32),
}
NO_TRIPLET = {"one_class", "singletons", "one_valid_sample", "all_weights_zero"}
DEGENERATE_FORMS = (("sum", None), ("mean_nonzero", None), ("mean", 5))


@functools.cache
def _degenerate_values_and_grads(per_class):
    def values_and_grads(x, y, w, beta):
        return [
            jax.value_and_grad(
                lambda e, b, r=r, s=s: margin_loss(
                    e, y, b, nu=0.3, weights=w, reduction=r, block_size=s
                ),
                argnums=(0, 1),
            )(x, beta)
            for r, s in DEGENERATE_FORMS
        ]

    return jax.jit(values_and_grads)


@pytest.mark.parametrize("per_class", [False, True])
@pytest.mark.parametrize("case", sorted(DEGENERATE))
def test_degenerate_batches_are_finite_and_match_reference(case, per_class):
    x, y = DEGENERATE[case]
    w = DEGENERATE_WEIGHTS.get(case, np.ones(B, np.float32))
    beta = class_beta(17) if per_class else np.float32(1.2)
    results = _degenerate_values_and_grads(per_class)(x, y, w, beta)
    for (reduction, _), (value, grads) in zip(DEGENERATE_FORMS, results, strict=True):
        assert np.isfinite(np.asarray(value))
        for g in grads:
            assert np.isfinite(np.asarray(g)).all()
        expected = reference_loss(x, y, beta, nu=0.3, weights=w, reduction=reduction)
        np.testing.assert_allclose(value, expected, rtol=1e-5, atol=1e-6)
        if case in NO_TRIPLET:  # no term at all, the ν term included
            assert value == 0.0
            for g in grads:
                np.testing.assert_array_equal(g, 0.0)


# --------------------------------------------------------------------------------------------
# Bad input: errors naming the argument, raised while tracing
# --------------------------------------------------------------------------------------------


def test_bad_input_raises_at_trace_time():
    x, y = batch(18)
    beta = margin_loss_beta()

    def trace(fn, *args):
        return jax.eval_shape(fn, *args)

    with pytest.raises(ValueError, match="embeddings must have shape"):
        trace(lambda e: margin_loss(e, y, beta), x[0])
    with pytest.raises(ValueError, match=r"labels must have shape \[12\]"):
        trace(lambda e, lab: margin_loss(e, lab, beta), x, y[:5])
    with pytest.raises(TypeError, match="beta must be a floating-point array"):
        trace(lambda e: margin_loss(e, y, np.ones(C, np.int32)), x)
    with pytest.raises(ValueError, match=r"beta must have shape \[\] .* got shape \[3, 1\]"):
        trace(lambda e, b: margin_loss(e, y, b), x, np.ones((C, 1), np.float32))
    with pytest.raises(ValueError, match=r"beta must have shape .* got shape \[0\]"):
        trace(lambda e, b: margin_loss(e, y, b), x, np.ones(0, np.float32))
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 2\)"):
        margin_loss(x, y, margin_loss_beta(2))  # a per-class β for fewer classes than labels
    with pytest.raises(ValueError, match="margin must be >= 0"):
        trace(lambda e: margin_loss(e, y, beta, margin=-0.1), x)
    with pytest.raises(ValueError, match="nu must be >= 0"):
        trace(lambda e: margin_loss(e, y, beta, nu=-1.0), x)
    with pytest.raises(ValueError, match="reduction must be one of"):
        trace(lambda e: margin_loss(e, y, beta, reduction="avg"), x)
    with pytest.raises(ValueError, match=r"weights must have shape \[12\]"):
        trace(lambda e: margin_loss(e, y, beta, weights=np.ones(3, np.float32)), x)
    with pytest.raises(ValueError, match="block_size must be >= 1"):
        trace(lambda e: margin_loss(e, y, beta, block_size=0), x)


def test_out_of_range_label_under_jit_is_nan_not_clamped():
    x, y = batch(19)
    y = y.copy()
    y[0] = 5  # per-class β has 3 entries; under jit the label cannot be checked
    value = jax.jit(lambda e, lab, b: margin_loss(e, lab, b))(x, y, margin_loss_beta(C))
    assert np.isnan(value)


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
    """(embeddings float64, labels int32): random batches, one with a singleton class (an anchor
    without triplets), one of near-duplicates (small distances, both hinge sides active)."""
    out = []
    for seed in range(3):
        x, y = batch(20 + seed)
        out.append((x.astype(np.float64), y))
    x, y = batch(23)
    y = y.copy()
    y[5] = C  # a class of one: C + 1 classes
    out.append((x.astype(np.float64), y))
    rng = np.random.default_rng(24)
    x = rng.normal(size=(1, D)) + 0.3 * rng.normal(size=(B, D))
    out.append((x, (np.arange(B) % C).astype(np.int32)))
    return out


PARITY_BATCHES = _parity_batches()


def _pml_value_and_grads(pml, x, y, beta, *, learn_beta, nu, margin=0.2, reducer=None):
    torch = pml.torch
    num_classes = None if beta is None or np.ndim(beta) == 0 else len(beta)
    kwargs = {} if reducer is None else dict(reducer=reducer)
    loss_fn = pml.losses.MarginLoss(
        margin=margin, nu=nu, learn_beta=learn_beta, num_classes=num_classes, **kwargs
    )
    if beta is not None:
        # β in float64 (PML's own is float32, then cast: 1.2 would differ in the 8th digit)
        value = torch.tensor(np.atleast_1d(beta), dtype=torch.float64)
        loss_fn.beta = torch.nn.Parameter(value) if learn_beta else value
    embeddings = torch.tensor(x, dtype=torch.float64, requires_grad=True)
    loss = loss_fn(embeddings, torch.tensor(y, dtype=torch.int64))
    loss.backward()
    beta_grad = loss_fn.beta.grad.numpy() if learn_beta and loss_fn.beta.grad is not None else None
    if beta_grad is not None and (beta is None or np.ndim(beta) == 0):
        beta_grad = beta_grad[0]
    return float(loss.detach()), embeddings.grad.numpy(), beta_grad


def _ours_value_and_grads(x, y, beta, **config):
    with jax.enable_x64(True):
        value, (grad, beta_grad) = jax.value_and_grad(
            lambda e, b: margin_loss(e, jnp.asarray(y), b, **config), argnums=(0, 1)
        )(jnp.asarray(x, jnp.float64), jnp.asarray(beta, jnp.float64))
        assert value.dtype == jnp.float64
        return float(value), np.asarray(grad), np.asarray(beta_grad)


def _assert_grads_close(actual, expected):
    np.testing.assert_allclose(
        actual, expected, rtol=1e-9, atol=1e-12 * max(np.abs(expected).max(), 1.0)
    )


@pytest.mark.parametrize(
    "learn_beta, per_class, nu",
    [(False, False, 0.0), (False, True, 0.0), (True, False, 0.3), (True, True, 0.3)],
)
@pytest.mark.parametrize("index", range(len(PARITY_BATCHES)))
def test_loss_matches_pml(pml, index, learn_beta, per_class, nu):
    """PML's default DivisorReducer is our ``reduction="mean_nonzero"``; with ``learn_beta``
    its β gradient is ours too."""
    x, y = PARITY_BATCHES[index]
    classes = int(y.max()) + 1
    beta = class_beta(index, classes).astype(np.float64) if per_class else np.float64(1.1)
    ref_value, ref_grad, ref_beta_grad = _pml_value_and_grads(
        pml, x, y, beta, learn_beta=learn_beta, nu=nu
    )
    value, grad, beta_grad = _ours_value_and_grads(x, y, beta, nu=nu, reduction="mean_nonzero")
    assert ref_value > 0.0
    np.testing.assert_allclose(value, ref_value, rtol=1e-10)
    _assert_grads_close(grad, ref_grad)
    if learn_beta:
        assert np.abs(ref_beta_grad).max() > 0
        _assert_grads_close(beta_grad, ref_beta_grad)


def test_pml_default_beta_and_margin(pml):
    # PML's own β: float32 1.2, as margin_loss_beta()'s
    x, y = PARITY_BATCHES[0]
    ref_value, ref_grad, _ = _pml_value_and_grads(pml, x, y, None, learn_beta=False, nu=0.0)
    value, grad, _ = _ours_value_and_grads(x, y, margin_loss_beta(), reduction="mean_nonzero")
    np.testing.assert_allclose(value, ref_value, rtol=1e-10)
    _assert_grads_close(grad, ref_grad)


def test_pml_mean_reducer_is_twice_our_mean(pml):
    # PML's MeanReducer averages (pos + neg) over triplets; our "mean" averages the 2·|T| pair
    # terms.
    x, y = PARITY_BATCHES[1]
    ref_value, ref_grad, _ = _pml_value_and_grads(
        pml, x, y, 1.1, learn_beta=False, nu=0.0, reducer=pml.reducers.MeanReducer()
    )
    value, grad, _ = _ours_value_and_grads(x, y, np.float64(1.1), reduction="mean")
    np.testing.assert_allclose(2 * value, ref_value, rtol=1e-10)
    _assert_grads_close(2 * grad, ref_grad)


@pytest.mark.parametrize("case", ["one_class", "all_singletons"])
def test_batches_without_triplets_match_pml(pml, case):
    x, _ = PARITY_BATCHES[0]
    y = np.zeros(B, np.int32) if case == "one_class" else np.arange(B, dtype=np.int32)
    beta = np.float64(1.2)
    ref_value, ref_grad, ref_beta_grad = _pml_value_and_grads(
        pml, x, y, beta, learn_beta=True, nu=0.3
    )
    value, grad, beta_grad = _ours_value_and_grads(x, y, beta, nu=0.3, reduction="mean_nonzero")
    assert ref_value == value == 0.0
    np.testing.assert_array_equal(ref_grad, 0.0)
    np.testing.assert_array_equal(grad, 0.0)
    assert ref_beta_grad is None or ref_beta_grad == 0.0
    assert beta_grad == 0.0
