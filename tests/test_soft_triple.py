"""SoftTriple loss (Qian et al. 2019): a loop-by-loop NumPy reference of the paper's relaxed
similarity, loss and center regularizer, the class-block form, the center layout, degenerate
batches, bad input, and parity with pytorch-metric-learning's SoftTripleLoss (with and without
its SparseCentersRegularizer), gradients for embeddings and centers included."""

from __future__ import annotations

import math
from types import SimpleNamespace

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mlx_jax.losses.soft_triple import (
    soft_triple_centers,
    soft_triple_loss,
    soft_triple_regularizer,
)
from tests.helpers import assert_finite_value_and_grad, check_grads_x64, random_batch

# One shape almost everywhere: 12 x 4 embeddings, C = 4 classes of K = 3 centers ([4, 12]).
B, D, C, K = 12, 4, 4, 3


def batch(seed, classes=C):
    x, y = random_batch(seed, batch=B, dim=D, classes=classes)
    centers = np.random.default_rng(100 + seed).normal(size=(D, C * K)).astype(np.float32)
    return x, y, centers


def loss(x, y, centers, **config):
    return soft_triple_loss(x, y, centers, centers_per_class=K, **config)


# --------------------------------------------------------------------------------------------
# Reference: the paper's formulas with explicit loops over samples, classes and centers.
# --------------------------------------------------------------------------------------------


def _unit(v):
    v = np.asarray(v, np.float64)
    return v / max(math.sqrt(float(np.sum(v * v))), 1e-12)


def reference_terms(x, labels, centers, per_class, la=20.0, gamma=0.1, margin=0.01):
    """ℓ_i of Eq. 9 with S'_{i,c} of Eq. 8; center k of class c is column c·K + k."""
    num_classes = centers.shape[1] // per_class
    terms = []
    for i in range(len(labels)):
        xi = _unit(x[i])
        logits = []
        for c in range(num_classes):
            cosines = [float(xi @ _unit(centers[:, c * per_class + k])) for k in range(per_class)]
            top = max(cosines)
            softmax = [math.exp((s - top) / gamma) for s in cosines]
            relaxed = sum(p * s for p, s in zip(softmax, cosines, strict=True)) / sum(softmax)
            logits.append(la * (relaxed - (margin if c == labels[i] else 0.0)))
        top = max(logits)
        log_normalizer = top + math.log(sum(math.exp(z - top) for z in logits))
        terms.append(log_normalizer - logits[labels[i]])
    return np.array(terms)


def reference_regularizer(centers, per_class):
    """Σ_c Σ_{k<k'} √(2 − 2·ŵ_c^k·ŵ_c^k') / (C·K·(K − 1)) (Eq. 12–13)."""
    num_classes = centers.shape[1] // per_class
    if per_class == 1:
        return 0.0
    total = 0.0
    for c in range(num_classes):
        for k in range(per_class):
            for k2 in range(k + 1, per_class):
                cosine = _unit(centers[:, c * per_class + k]) @ _unit(
                    centers[:, c * per_class + k2]
                )
                total += math.sqrt(max(2.0 - 2.0 * min(cosine, 1.0), 0.0))
    return total / (num_classes * per_class * (per_class - 1))


def reference_loss(
    x,
    labels,
    centers,
    per_class=K,
    la=20.0,
    gamma=0.1,
    margin=0.01,
    tau=0.2,
    weights=None,
    reduction="mean",
):
    terms = reference_terms(x, labels, centers, per_class, la, gamma, margin)
    w = np.ones(len(labels)) if weights is None else np.asarray(weights, np.float64)
    weighted = np.where(w > 0, w * terms, 0.0)
    if reduction == "none":
        return weighted
    if reduction == "sum":
        reduced = weighted.sum()
    else:
        keep = (w > 0) if reduction == "mean" else (w > 0) & (terms > 0)
        reduced = weighted.sum() / w[keep].sum() if w[keep].sum() > 0 else 0.0
    return reduced + tau * reference_regularizer(centers, per_class)


# --------------------------------------------------------------------------------------------
# Value, reductions, weights, layout
# --------------------------------------------------------------------------------------------

CONFIGS = [
    dict(),  # the paper's λ = 20, γ = 0.1, δ = 0.01, τ = 0.2
    dict(tau=0.0),  # PML's SoftTripleLoss without a regularizer
    dict(la=8.0, gamma=0.5, margin=0.2, tau=1.0, reduction="sum"),
    dict(gamma=0.01, margin=0.0, reduction="mean_nonzero"),
]


@pytest.mark.parametrize("config", CONFIGS)
def test_matches_reference(config):
    x, y, centers = batch(0)
    expected = reference_loss(x, y, centers, **config)
    actual = loss(x, y, centers, **config)
    assert actual.dtype == jnp.float32
    np.testing.assert_allclose(actual, expected, rtol=1e-5)


def test_matches_reference_in_float64():
    x, y, centers = batch(1)
    w = np.linspace(0.0, 2.0, B)
    for config in (dict(), dict(la=8.0, tau=1.0, weights=w, reduction="sum")):
        with jax.enable_x64(True):
            actual = loss(
                jnp.asarray(x, jnp.float64), y, jnp.asarray(centers, jnp.float64), **config
            )
            assert actual.dtype == jnp.float64
        np.testing.assert_allclose(actual, reference_loss(x, y, centers, **config), rtol=1e-12)


def test_one_center_per_class_is_the_normalized_softmax_with_margin():
    # K = 1: S' is the plain cosine and there is no pair of centers, so no regularizer.
    x, y, _ = batch(2)
    centers = np.random.default_rng(0).normal(size=(D, C)).astype(np.float32)
    actual = soft_triple_loss(x, y, centers, centers_per_class=1)
    expected = reference_loss(x, y, centers, per_class=1)
    np.testing.assert_allclose(actual, expected, rtol=1e-5)
    assert reference_regularizer(centers, 1) == 0.0
    assert soft_triple_regularizer(centers, centers_per_class=1) == 0.0


def test_center_layout_is_class_major():
    x, y, centers = batch(3)
    base = loss(x, y, centers)
    by_class = centers.reshape(D, C, K)
    # Reordering the K centers within each class changes nothing ...
    within = by_class[:, :, ::-1].reshape(D, C * K)
    np.testing.assert_allclose(loss(x, y, within), base, rtol=1e-6)
    # ... and permuting whole classes (blocks of K columns) goes with relabelling.
    perm = np.array([2, 0, 3, 1])
    permuted = by_class[:, perm].reshape(D, C * K)
    inverse = np.argsort(perm).astype(np.int32)
    np.testing.assert_allclose(loss(x, inverse[y], permuted), base, rtol=1e-6)
    # Columns c·K + k belong to class c: the other grouping (column k·C + c) is another loss.
    interleaved = centers.reshape(D, K, C).transpose(0, 2, 1).reshape(D, C * K)
    assert abs(float(loss(x, y, interleaved)) - float(base)) > 1e-3


def test_reduction_none_matches_reference_per_sample():
    x, y, centers = batch(4)
    per_sample = loss(x, y, centers, tau=0.0, reduction="none")
    assert per_sample.shape == (B,)
    # logsumexp − target cancels for well-classified samples: absolute float32 rounding of
    # logits of size λ = 20
    np.testing.assert_allclose(
        per_sample,
        reference_loss(x, y, centers, tau=0.0, reduction="none"),
        rtol=1e-5,
        atol=20 * 2e-7,
    )
    # "sum" adds τ·R once to Σ ℓ_i
    regularizer = soft_triple_regularizer(centers, centers_per_class=K)
    np.testing.assert_allclose(
        loss(x, y, centers, reduction="sum"), jnp.sum(per_sample) + 0.2 * regularizer, rtol=1e-6
    )


@pytest.mark.parametrize("reduction", ["mean", "sum", "mean_nonzero"])
def test_weights_match_reference_and_padding_is_exact(reduction):
    x, y, centers = batch(5)
    w = np.array([1.0, 0.5, 2.0, 0.0, 1.0, 1.0, 3.0, 0.0, 1.0, 1.0, 0.5, 1.0], np.float32)
    np.testing.assert_allclose(
        loss(x, y, centers, weights=w, reduction=reduction),
        reference_loss(x, y, centers, weights=w, reduction=reduction),
        rtol=1e-5,
    )
    # Zero-weight rows behave as if they were not in the batch (compared with the formula on
    # the smaller batch: another batch shape would compile everything again).
    keep = w > 0
    np.testing.assert_allclose(
        loss(x, y, centers, weights=keep.astype(np.float32), reduction=reduction),
        reference_loss(x[keep], y[keep], centers, reduction=reduction),
        rtol=1e-5,
    )
    grad = jax.grad(lambda e: loss(e, y, centers, weights=w, reduction=reduction))(x)
    np.testing.assert_array_equal(grad[~keep], 0.0)
    assert np.abs(grad[keep]).max() > 0


def test_regularizer_matches_reference():
    _, _, centers = batch(6)
    np.testing.assert_allclose(
        soft_triple_regularizer(centers, centers_per_class=K),
        reference_regularizer(centers, K),
        rtol=1e-6,
    )
    # Hand-derived: one class, two orthogonal centers: √2 / (1·2·1).
    two = np.array([[1.0, 0.0], [0.0, 1.0]], np.float32)
    np.testing.assert_allclose(
        soft_triple_regularizer(two, centers_per_class=2), math.sqrt(2) / 2, rtol=1e-6
    )


# --------------------------------------------------------------------------------------------
# Gradients, jit, class blocks, low precision
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("config", [dict(), dict(la=8.0, gamma=0.5, tau=1.0, reduction="sum")])
def test_gradients_match_finite_differences(config):
    x, y, centers = batch(7)
    check_grads_x64(lambda e, w: loss(e, jnp.asarray(y), w, **config), x, centers)


@pytest.mark.parametrize("class_block_size", [None, 2])
def test_gradient_in_the_temperature_matches_finite_differences(class_block_size):
    # γ's cotangent comes from the relaxed similarity's hand-written VJP, dense and in blocks
    x, y, centers = batch(8)
    check_grads_x64(
        lambda e, w, g: loss(e, jnp.asarray(y), w, gamma=g, class_block_size=class_block_size),
        x,
        centers,
        np.float64(0.3),
    )


class TestVariants(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_jit_and_eager_agree(self):
        x, y, centers = batch(9)
        fn = self.variant(lambda e, lab, w: loss(e, lab, w))
        np.testing.assert_allclose(fn(x, y, centers), reference_loss(x, y, centers), rtol=1e-5)

    @chex.variants(with_jit=True, without_jit=True)
    def test_grad_jit_and_eager_agree(self):
        x, y, centers = batch(10)
        fn = lambda e, lab, w: loss(e, lab, w)  # noqa: E731
        grad = self.variant(jax.grad(fn, argnums=(0, 2)))
        expected = jax.grad(fn, argnums=(0, 2))(x, y, centers)
        for actual, wanted in zip(grad(x, y, centers), expected, strict=True):
            np.testing.assert_allclose(actual, wanted, rtol=1e-4, atol=1e-6)


def test_traced_hyperparameters():
    x, y, centers = batch(11)
    fn = jax.jit(
        lambda e, w, la, gamma, margin, tau: loss(
            e, y, w, la=la, gamma=gamma, margin=margin, tau=tau
        )
    )
    expected = reference_loss(x, y, centers, la=8.0, gamma=0.5, margin=0.2, tau=1.0)
    np.testing.assert_allclose(fn(x, centers, 8.0, 0.5, 0.2, 1.0), expected, rtol=1e-5)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_class_block_sizes_agree(reduction):
    # In float64, so that "the same value and gradients" is checked to rounding (with the dense
    # form's PML parity below, this is the class-block form's parity too).
    x, y, centers = batch(12)
    w = np.ones(B)
    w[4] = 0.0
    tau = 0.0 if reduction == "none" else 0.2

    def value_and_grad(class_block_size):
        def fn(e, c):
            out = loss(
                e, y, c, tau=tau, weights=w, reduction=reduction, class_block_size=class_block_size
            )
            return jnp.sum(out * jnp.arange(1.0, out.size + 1.0)) if out.ndim else out

        with jax.enable_x64(True):
            args = jnp.asarray(x, jnp.float64), jnp.asarray(centers, jnp.float64)
            return jax.value_and_grad(fn, argnums=(0, 1))(*args)

    dense_value, dense_grads = value_and_grad(None)
    # 3 does not divide C = 4: the last block is padded; 4 is one block (the dense path).
    for class_block_size in (3, 4):
        value, grads = value_and_grad(class_block_size)
        np.testing.assert_allclose(value, dense_value, rtol=1e-12)
        for grad, dense_grad in zip(grads, dense_grads, strict=True):
            np.testing.assert_allclose(grad, dense_grad, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_low_precision_inputs_compute_in_float32(dtype):
    x, y, centers = batch(13)
    low_x, low_c = jnp.asarray(x, dtype), jnp.asarray(centers, dtype)
    value, (grad_x, grad_c) = jax.value_and_grad(lambda e, w: loss(e, y, w), argnums=(0, 1))(
        low_x, low_c
    )
    assert value.dtype == jnp.float32 and np.isfinite(value)
    for grad in (grad_x, grad_c):
        assert grad.dtype == dtype and np.isfinite(np.asarray(grad, np.float32)).all()
    rounded_x, rounded_c = np.asarray(low_x, np.float32), np.asarray(low_c, np.float32)
    np.testing.assert_allclose(value, reference_loss(rounded_x, y, rounded_c), rtol=1e-5)
    np.testing.assert_allclose(value, loss(x, y, centers), rtol=2e-2)


def test_large_scale_does_not_overflow_in_float32():
    # λ = 2000 puts logits at ±2000 and γ = 1e-3 the center logits at ±1000: both softmaxes
    # are max-subtracted.
    x, y, centers = batch(14)
    config = dict(la=2000.0, gamma=1e-3)
    np.testing.assert_allclose(
        loss(x, y, centers, **config), reference_loss(x, y, centers, **config), rtol=1e-4
    )
    assert_finite_value_and_grad(lambda e, w: loss(e, y, w, **config), x, centers)


# --------------------------------------------------------------------------------------------
# Degenerate batches
# --------------------------------------------------------------------------------------------


def _degenerate_cases():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(B, D)).astype(np.float32)
    centers = rng.normal(size=(D, C * K)).astype(np.float32)
    labels = (np.arange(B) % C).astype(np.int32)
    duplicate_centers = centers.copy()
    duplicate_centers[:, 1] = duplicate_centers[:, 0]  # class 0's centers 0 and 1 coincide
    duplicate_centers[:, 5] = 3.0 * duplicate_centers[:, 4]  # and class 1's, at another norm
    with_zero_row = x.copy()
    with_zero_row[0] = 0.0
    return {
        "one_label": (x, np.zeros(B, np.int32), centers),
        "zero_embeddings": (np.zeros((B, D), np.float32), labels, centers),
        "one_zero_embedding": (with_zero_row, labels, centers),
        "duplicate_embeddings": (np.ones((B, D), np.float32), labels, centers),
        "duplicate_centers": (x, labels, duplicate_centers),
        "zero_center": (x, labels, np.where(np.arange(C * K) == 2, 0.0, centers)),
    }


DEGENERATE = _degenerate_cases()


@pytest.mark.parametrize("case", sorted(DEGENERATE))
def test_degenerate_batches_are_finite_and_match_reference(case):
    x, y, centers = DEGENERATE[case]
    fn = lambda e, w: loss(e, y, w)  # noqa: E731
    assert_finite_value_and_grad(fn, x, centers)
    np.testing.assert_allclose(fn(x, centers), reference_loss(x, y, centers), rtol=1e-5)


def test_documented_degenerate_values():
    # A head of one class (C = 1): the softmax over one logit is 1, ℓ_i = 0, and only τ·R is
    # left. (Jitted: one compilation for this shape, cheaper than op-by-op.)
    x, y, centers = DEGENERATE["one_label"]
    one_class = centers[:, :K]
    value, grad = jax.jit(jax.value_and_grad(lambda e: loss(e, y, one_class)))(x)
    np.testing.assert_allclose(value, 0.2 * reference_regularizer(one_class, K), rtol=1e-6)
    np.testing.assert_allclose(grad, 0.0, atol=1e-6)
    # All weights zero: no sample term; τ·R remains, its gradient only for the centers.
    x, y, centers = batch(15)
    value, (grad_x, grad_c) = jax.value_and_grad(
        lambda e, w: loss(e, y, w, weights=np.zeros(B, np.float32)), argnums=(0, 1)
    )(x, centers)
    np.testing.assert_allclose(
        value, 0.2 * soft_triple_regularizer(centers, centers_per_class=K), rtol=1e-6
    )
    np.testing.assert_array_equal(grad_x, 0.0)
    assert np.isfinite(grad_c).all() and np.abs(grad_c).max() > 0
    # Zero embeddings: cosine 0 to every center, S' = 0, so the logits are −λδ (target) and 0:
    # ℓ = log(e^{−λδ} + C − 1) + λδ.
    x, y, centers = DEGENERATE["zero_embeddings"]
    la_delta = 20.0 * 0.01
    expected = math.log(math.exp(-la_delta) + C - 1) + la_delta
    np.testing.assert_allclose(loss(x, y, centers, tau=0.0), expected, rtol=1e-6)


def coincident_centers(seed):
    """Centers whose class 0 (columns 0-2) is e1, 2·e1 and 3·e1: one unit vector, so every
    cosine within the class is exactly 1 and every distance exactly 0."""
    centers = batch(seed)[2].copy()
    centers[:, :K] = np.eye(D)[:, :1] * np.arange(1.0, K + 1.0)
    return centers


def test_coincident_centers_have_zero_regularizer_gradient():
    # Equal centers are at distance 0, where √ has no derivative; ours is 0 there (PML's is
    # not finite, see test_regularizer_differs_from_pml_only_at_coincident_centers).
    centers = coincident_centers(0)
    value, grad = jax.value_and_grad(lambda w: soft_triple_regularizer(w, centers_per_class=K))(
        centers
    )
    np.testing.assert_allclose(value, reference_regularizer(centers, K), rtol=1e-6)
    np.testing.assert_array_equal(grad[:, :K], 0.0)
    assert np.abs(grad[:, K:]).max() > 0


def test_out_of_range_label_under_jit_is_nan():
    x, y, centers = batch(16)
    for class_block_size in (None, 3):
        fn = jax.jit(lambda e, lab, w, cb=class_block_size: loss(e, lab, w, class_block_size=cb))
        for bad in (C, -1):
            labels = y.copy()
            labels[0] = bad
            assert np.isnan(fn(x, labels, centers))


# --------------------------------------------------------------------------------------------
# Initializer
# --------------------------------------------------------------------------------------------


def test_centers_initializer():
    centers = soft_triple_centers(jax.random.key(0), 16, 20, 5)
    assert centers.shape == (16, 100) and centers.dtype == jnp.float32
    values = np.asarray(centers, np.float64)
    bound = 1.0 / math.sqrt(100)  # kaiming_uniform_(a=√5): 1/√fan_in, fan_in = C·K
    assert 0.95 * bound < np.abs(values).max() <= bound
    unit = values / np.linalg.norm(values, axis=0)
    assert (unit.T @ unit - 2 * np.eye(100)).max() < 0.99  # distinct directions
    assert soft_triple_centers(jax.random.key(0), 4, 2, 3, dtype=jnp.bfloat16).dtype == jnp.bfloat16
    with pytest.raises(ValueError, match="num_classes must be >= 1"):
        soft_triple_centers(jax.random.key(0), 4, 0, 3)


# --------------------------------------------------------------------------------------------
# Bad input: errors naming the argument, raised while tracing
# --------------------------------------------------------------------------------------------


def test_bad_input_raises_at_trace_time():
    x, y, centers = batch(17)

    def trace(fn, *args):
        return jax.eval_shape(fn, *args)

    with pytest.raises(ValueError, match="embeddings must have shape"):
        trace(lambda e: loss(e, y, centers), x[0])
    with pytest.raises(ValueError, match=r"labels must have shape \[12\]"):
        trace(lambda e, lab: loss(e, lab, centers), x, y[:3])
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 4\)"):
        loss(x, np.full(B, C, np.int32), centers)
    with pytest.raises(ValueError, match=r"centers must have shape \[4, num_classes \* centers"):
        trace(lambda e, w: loss(e, y, w), x, centers[:3])  # wrong dim
    with pytest.raises(ValueError, match="centers_per_class = 3"):
        trace(lambda e, w: loss(e, y, w), x, centers[:, :10])  # 10 columns, K = 3
    with pytest.raises(ValueError, match=r"centers must have shape \[dim, num_classes"):
        soft_triple_regularizer(centers[0], centers_per_class=K)
    with pytest.raises(TypeError, match="centers must be a floating-point array"):
        trace(lambda e: loss(e, y, np.ones((D, C * K), np.int32)), x)
    for value, error in [(0, ValueError), (2.0, TypeError), (True, TypeError)]:
        with pytest.raises(error, match="centers_per_class must be"):
            trace(lambda e, v=value: soft_triple_loss(e, y, centers, centers_per_class=v), x)
    for name, value, message in [
        ("la", 0.0, "la must be > 0"),
        ("gamma", -0.1, "gamma must be > 0"),
        ("margin", -0.01, "margin must be >= 0"),
        ("tau", -1.0, "tau must be >= 0"),
    ]:
        with pytest.raises(ValueError, match=message):
            trace(lambda e, n=name, v=value: loss(e, y, centers, **{n: v}), x)
    with pytest.raises(ValueError, match="'none' needs tau=0"):
        trace(lambda e: loss(e, y, centers, reduction="none"), x)
    with pytest.raises(ValueError, match="reduction must be one of"):
        trace(lambda e: loss(e, y, centers, tau=0.0, reduction="avg"), x)
    with pytest.raises(ValueError, match=r"weights must have shape \[12\]"):
        trace(lambda e: loss(e, y, centers, weights=np.ones(3, np.float32)), x)
    with pytest.raises(ValueError, match="class_block_size must be >= 1"):
        trace(lambda e: loss(e, y, centers, class_block_size=0), x)


# --------------------------------------------------------------------------------------------
# Parity with pytorch-metric-learning (float64)
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pml():
    torch = pytest.importorskip("torch", reason="parity tests need torch (pip install torch)")
    pytest.importorskip(
        "pytorch_metric_learning.losses",
        reason="parity tests need pytorch-metric-learning (pip install .[parity])",
    )
    from pytorch_metric_learning import losses, reducers, regularizers

    return SimpleNamespace(torch=torch, losses=losses, reducers=reducers, regularizers=regularizers)


def _pml_loss(pml, centers, tau, hyper, reducer=None):
    """PML's SoftTripleLoss with ``centers`` as its fc; τ > 0 adds SparseCentersRegularizer."""
    extra = {} if reducer is None else dict(reducer=reducer)
    if tau:
        extra.update(
            weight_regularizer=pml.regularizers.SparseCentersRegularizer(C, K),
            weight_reg_weight=tau,
        )
    loss_fn = pml.losses.SoftTripleLoss(C, D, centers_per_class=K, **hyper, **extra)
    loss_fn.fc.data = pml.torch.tensor(centers, dtype=pml.torch.float64)
    return loss_fn


def _pml_value_and_grads(pml, loss_fn, x, y):
    torch = pml.torch
    embeddings = torch.tensor(x, dtype=torch.float64, requires_grad=True)
    value = loss_fn(embeddings, torch.tensor(y, dtype=torch.int64))
    value.backward()
    return float(value.detach()), embeddings.grad.numpy(), loss_fn.fc.grad.numpy()


def _ours_value_and_grads(x, y, centers, **config):
    with jax.enable_x64(True):
        value, (grad_x, grad_c) = jax.value_and_grad(
            lambda e, w: loss(e, jnp.asarray(y), w, **config), argnums=(0, 1)
        )(jnp.asarray(x, jnp.float64), jnp.asarray(centers, jnp.float64))
        assert value.dtype == jnp.float64
        return float(value), np.asarray(grad_x), np.asarray(grad_c)


def _assert_close(ours, theirs):
    np.testing.assert_allclose(ours[0], theirs[0], rtol=1e-10)
    for grad, ref in zip(ours[1:], theirs[1:], strict=True):
        np.testing.assert_allclose(grad, ref, rtol=1e-9, atol=1e-12 * np.abs(ref).max())


PARITY_HYPER = [
    dict(la=20.0, gamma=0.1, margin=0.01),  # PML's and the paper's defaults
    dict(la=8.0, gamma=0.5, margin=0.2),
]


@pytest.mark.parametrize("tau", [0.0, 0.2])
@pytest.mark.parametrize("hyper", PARITY_HYPER)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_loss_matches_pml(pml, tau, hyper, seed):
    """PML's default MeanReducer over the B per-sample terms, plus (with a weight regularizer)
    weight_reg_weight · SparseCentersRegularizer: our ``reduction="mean"`` with ``tau``."""
    x, y, centers = batch(seed)
    centers = centers * (1.0 + np.arange(C * K))  # unequal column norms: normalized inside
    loss_fn = _pml_loss(pml, centers, tau, hyper)
    reducer = loss_fn.reducer  # with a regularizer, one reducer per sub-loss
    if isinstance(reducer, pml.reducers.MultipleReducers):
        reducer = reducer.reducers["loss"]
    assert isinstance(reducer, pml.reducers.MeanReducer)
    theirs = _pml_value_and_grads(pml, loss_fn, x, y)
    ours = _ours_value_and_grads(x, y, centers, tau=tau, **hyper)
    _assert_close(ours, theirs)


def test_mean_nonzero_matches_pml_avg_nonzero_reducer(pml):
    x, y, centers = batch(4)
    loss_fn = _pml_loss(pml, centers, 0.2, PARITY_HYPER[1], pml.reducers.AvgNonZeroReducer())
    theirs = _pml_value_and_grads(pml, loss_fn, x, y)
    _assert_close(
        _ours_value_and_grads(x, y, centers, reduction="mean_nonzero", **PARITY_HYPER[1]), theirs
    )


def test_regularizer_differs_from_pml_only_at_coincident_centers(pml):
    torch = pml.torch
    regularizer = pml.regularizers.SparseCentersRegularizer(C, K)
    for case, centers in (("distinct", batch(5)[2]), ("coincident", coincident_centers(5))):
        weights = torch.tensor(centers.T, dtype=torch.float64, requires_grad=True)
        reference = regularizer(weights)
        reference.backward()
        ref_grad = weights.grad.numpy().T
        with jax.enable_x64(True):
            value, grad = jax.value_and_grad(
                lambda w: soft_triple_regularizer(w, centers_per_class=K)
            )(jnp.asarray(centers, jnp.float64))
        np.testing.assert_allclose(value, float(reference.detach()), rtol=1e-12)
        if case == "distinct":
            np.testing.assert_allclose(grad, ref_grad, rtol=1e-9, atol=1e-14)
        else:
            # PML: √(2 + tiny − 2·1) = √0 (2 + tiny rounds to 2) has an infinite derivative,
            # so its gradient for class 0's columns is not finite; ours is 0 there, and the
            # other classes agree.
            assert not np.isfinite(ref_grad[:, :K]).any()
            np.testing.assert_array_equal(grad[:, :K], 0.0)
            np.testing.assert_allclose(grad[:, K:], ref_grad[:, K:], rtol=1e-9, atol=1e-14)


def test_initializer_matches_pml_bound(pml):
    # PML initializes fc with kaiming_uniform_(a=√5): uniform on ±1/√(C·K), as ours.
    torch = pml.torch
    torch.manual_seed(0)
    loss_fn = pml.losses.SoftTripleLoss(50, 16, centers_per_class=10)
    theirs = float(loss_fn.fc.detach().abs().max())
    ours = float(jnp.max(jnp.abs(soft_triple_centers(jax.random.key(1), 16, 50, 10))))
    bound = 1.0 / math.sqrt(500)
    assert 0.99 * bound < theirs <= bound and 0.99 * bound < ours <= bound
