"""NT-Xent and SupCon (mlx_jax.losses.info_nce) against loop-by-loop float64 references written
from the papers' formulas, in their dense and blockwise forms, on degenerate batches, and
against pytorch-metric-learning (value and gradient)."""

import functools
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mlx_jax.losses.info_nce import ntxent_loss, positive_counts, self_supervised, supcon_loss
from tests.helpers import assert_finite_value_and_grad, check_grads_x64, random_batch

# ---------------------------------------------------------------------------------------------
# References: plain loops over anchors and pairs, float64, no code shared with the library.
# ---------------------------------------------------------------------------------------------


def _cosine_matrix(x):
    x = np.asarray(x, np.float64)
    norms = np.maximum(np.sqrt(np.sum(x * x, axis=1, keepdims=True)), 1e-12)
    z = x / norms
    return z @ z.T


def _reduce(losses, term_weights, reduction, unreduced):
    if reduction == "none":
        return unreduced
    total = sum(w * loss for loss, w in zip(losses, term_weights, strict=True))
    if reduction == "sum":
        return total
    if reduction == "mean":
        count = sum(term_weights)
    else:  # mean_nonzero
        count = sum(w for loss, w in zip(losses, term_weights, strict=True) if loss > 0)
    return total / count if count > 0 else 0.0


def reference_ntxent(x, y, temperature=0.07, weights=None, reduction="mean"):
    """Chen et al. 2020, Eq. 1, one term per ordered positive pair (i, p): the denominator
    holds the pair itself and the anchor's negatives."""
    s = _cosine_matrix(x)
    batch = len(y)
    w = np.ones(batch) if weights is None else np.asarray(weights, np.float64)
    losses, term_weights = [], []
    unreduced = np.zeros((batch, batch))
    for i in range(batch):
        if w[i] == 0:
            continue
        negatives = [n for n in range(batch) if y[n] != y[i] and w[n] > 0]
        for p in range(batch):
            if p == i or y[p] != y[i] or w[p] == 0:
                continue
            numerator = math.exp(s[i, p] / temperature)
            denominator = numerator + sum(math.exp(s[i, n] / temperature) for n in negatives)
            loss = -math.log(numerator / denominator)
            losses.append(loss)
            term_weights.append(w[i])
            unreduced[i, p] = w[i] * loss
    return _reduce(losses, term_weights, reduction, unreduced)


def reference_supcon(x, y, temperature=0.1, weights=None, reduction="mean"):
    """Khosla et al. 2020, Eq. 2 (L_out): one term per anchor with positives."""
    s = _cosine_matrix(x)
    batch = len(y)
    w = np.ones(batch) if weights is None else np.asarray(weights, np.float64)
    losses, term_weights = [], []
    unreduced = np.zeros(batch)
    for i in range(batch):
        if w[i] == 0:
            continue
        positives = [p for p in range(batch) if p != i and y[p] == y[i] and w[p] > 0]
        others = [a for a in range(batch) if a != i and w[a] > 0]
        if not positives:
            continue
        denominator = sum(math.exp(s[i, a] / temperature) for a in others)
        loss = -sum(math.log(math.exp(s[i, p] / temperature) / denominator) for p in positives)
        loss /= len(positives)
        losses.append(loss)
        term_weights.append(w[i])
        unreduced[i] = w[i] * loss
    return _reduce(losses, term_weights, reduction, unreduced)


REFERENCES = {"ntxent": reference_ntxent, "supcon": reference_supcon}
LOSSES = {"ntxent": ntxent_loss, "supcon": supcon_loss}


def _batch(seed, batch=12, dim=5, classes=4):
    """A float32 batch with repeated labels and one singleton class (an anchor without
    positives)."""
    x, y = random_batch(seed, batch=batch, dim=dim, classes=classes)
    y = y.copy()
    y[0] = classes + 5
    return x, y


# ---------------------------------------------------------------------------------------------
# Values
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("reduction", ["mean", "sum", "mean_nonzero"])
@pytest.mark.parametrize("temperature", [0.07, 0.1, 0.5, 1.0])
@pytest.mark.parametrize("name", sorted(LOSSES))
def test_matches_reference(name, temperature, reduction):
    x, y = _batch(1)
    actual = LOSSES[name](x, y, temperature=temperature, reduction=reduction)
    assert actual.dtype == jnp.float32
    expected = REFERENCES[name](x, y, temperature=temperature, reduction=reduction)
    np.testing.assert_allclose(actual, expected, rtol=1e-5)


def test_default_temperatures_are_pmls():
    x, y = _batch(2)
    np.testing.assert_allclose(ntxent_loss(x, y), reference_ntxent(x, y, 0.07), rtol=1e-5)
    np.testing.assert_allclose(supcon_loss(x, y), reference_supcon(x, y, 0.1), rtol=1e-5)


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_reduction_none_and_positive_counts(name):
    x, y = _batch(3)
    w = np.array([1.0, 2.0, 0.5, 1.0, 0.0, 1.0, 3.0, 1.0, 1.0, 1.0, 0.0, 1.0], np.float32)
    fn = LOSSES[name]
    terms = fn(x, y, weights=w, reduction="none")
    expected = REFERENCES[name](x, y, weights=w, reduction="none")
    assert terms.shape == expected.shape  # [B, B] pair terms for NT-Xent, [B] for SupCon
    np.testing.assert_allclose(terms, expected, rtol=1e-5, atol=1e-6)

    counts = positive_counts(y, w)
    assert counts.dtype == jnp.int32
    brute = [
        sum(1 for j in range(len(y)) if j != i and y[j] == y[i] and w[j] > 0) if w[i] > 0 else 0
        for i in range(len(y))
    ]
    np.testing.assert_array_equal(counts, brute)
    assert counts[0] == 0  # the singleton anchor: no term
    if name == "supcon":
        np.testing.assert_array_equal(terms[np.asarray(counts) == 0], 0.0)
        denominator = np.sum(w * (np.asarray(counts) > 0))
    else:
        np.testing.assert_array_equal(np.asarray(terms).sum(axis=1)[np.asarray(counts) == 0], 0.0)
        denominator = np.sum(w * np.asarray(counts))
    np.testing.assert_allclose(
        fn(x, y, weights=w), np.sum(np.asarray(terms)) / denominator, rtol=1e-5
    )


def test_positive_counts_without_weights_and_under_jit():
    y = np.array([3, 1, 3, 7, 3, 1], np.int32)
    np.testing.assert_array_equal(positive_counts(y), [2, 1, 2, 0, 2, 1])
    np.testing.assert_array_equal(jax.jit(positive_counts)(y), [2, 1, 2, 0, 2, 1])
    w = np.array([1, 1, 0, 1, 1, 0], np.float32)
    np.testing.assert_array_equal(positive_counts(y, w), [1, 0, 0, 0, 1, 0])


@pytest.mark.parametrize("reduction", ["mean", "mean_nonzero"])
@pytest.mark.parametrize("name", sorted(LOSSES))
def test_weights_match_reference_and_zero_weight_is_removal(name, reduction):
    x, y = _batch(4, batch=10, classes=3)
    w = np.array([1.0, 0.5, 2.0, 0.0, 1.0, 1.0, 3.0, 0.0, 1.0, 1.0], np.float32)
    fn = LOSSES[name]
    np.testing.assert_allclose(
        fn(x, y, weights=w, reduction=reduction),
        REFERENCES[name](x, y, weights=w, reduction=reduction),
        rtol=1e-5,
    )
    keep = w > 0
    np.testing.assert_allclose(
        fn(x, y, weights=keep.astype(np.float32), reduction=reduction),
        fn(x[keep], y[keep], reduction=reduction),
        rtol=1e-6,
    )


@pytest.mark.parametrize("temperature", [0.1, 0.5])
def test_ntxent_equals_supcon_when_every_class_is_a_pair(temperature):
    # With exactly two samples per class P(i) = {p}, and A(i) = {p} ∪ N(i): the two
    # denominators coincide (SimCLR's setting, where SupCon reduces to NT-Xent).
    x, _ = random_batch(5, batch=10, dim=4)
    y = np.repeat(np.arange(5), 2).astype(np.int32)
    np.testing.assert_allclose(
        ntxent_loss(x, y, temperature=temperature),
        supcon_loss(x, y, temperature=temperature),
        rtol=1e-6,
    )


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_small_temperature_with_duplicates_does_not_overflow_in_float32(name):
    # exp(s/τ) at τ = 0.01 is exp(100), beyond float32's range; near-duplicates of another
    # class make the negatives as large as the positives.
    rng = np.random.default_rng(0)
    centre = rng.normal(size=(1, 6))
    x = (centre + 0.01 * rng.normal(size=(8, 6))).astype(np.float32)
    x[5] = x[4]  # an exact duplicate
    y = np.array([0, 1, 0, 1, 2, 2, 0, 1], np.int32)
    for temperature in (0.07, 0.01):
        expected = REFERENCES[name](x.astype(np.float64), y, temperature=temperature)
        np.testing.assert_allclose(LOSSES[name](x, y, temperature=temperature), expected, rtol=1e-4)
        assert_finite_value_and_grad(lambda e, t=temperature: LOSSES[name](e, y, temperature=t), x)


# ---------------------------------------------------------------------------------------------
# Gradients, jit, blocks, dtypes
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, kwargs",
    [
        ("ntxent", dict()),
        ("supcon", dict(temperature=0.5, reduction="mean_nonzero")),
    ],
)
def test_gradients_match_finite_differences(name, kwargs):
    x, y = _batch(6, batch=8, dim=3, classes=3)
    w = np.array([1.0, 2.0, 1.0, 0.5, 1.0, 1.0, 0.0, 1.0])
    check_grads_x64(jax.jit(lambda e: LOSSES[name](e, y, weights=w, **kwargs)), x, tol=1e-5)


class TestVariants(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_jit_and_eager_agree(self):
        x, y = _batch(7)
        for name, fn in LOSSES.items():
            loss = self.variant(lambda e, lab, f=fn: f(e, lab, temperature=0.2))
            np.testing.assert_allclose(
                loss(x, y), REFERENCES[name](x, y, temperature=0.2), rtol=1e-5
            )

    @chex.variants(with_jit=True, without_jit=True)
    def test_grad_jit_and_eager_agree(self):
        x, y = _batch(8)
        for fn in LOSSES.values():
            grad = self.variant(jax.grad(lambda e, lab, f=fn: f(e, lab)))
            expected = jax.grad(lambda e, f=fn: f(e, y))(x)
            np.testing.assert_allclose(grad(x, y), expected, rtol=1e-4, atol=1e-6)


def test_traced_temperature():
    x, y = _batch(9)
    for name, fn in LOSSES.items():
        loss = jax.jit(lambda e, lab, t, f=fn: f(e, lab, temperature=t))
        np.testing.assert_allclose(
            loss(x, y, 0.3), REFERENCES[name](x, y, temperature=0.3), rtol=1e-5
        )


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_block_sizes_give_the_same_value_and_gradients(name):
    # "mean_nonzero" reduces the per-row sums (loss, weight, nonzero weight) every other
    # reduction uses; "none" returns the unreduced rows. Random cotangents weigh every term.
    x, y = _batch(10, batch=13, classes=4)
    w = np.ones(13, np.float32)
    w[[2, 9]] = [0.0, 2.5]
    cotangent = np.random.default_rng(10).uniform(0.5, 1.5, size=(13, 13)).astype(np.float32)

    @jax.jit(static_argnums=1)
    def values_and_grads(e, block_size):
        out = []
        for reduction in ("mean_nonzero", "none"):

            def weighted(e, r=reduction):
                value = LOSSES[name](e, y, weights=w, reduction=r, block_size=block_size)
                return jnp.sum(value * cotangent[tuple(slice(n) for n in value.shape)]), value

            (_, value), grad = jax.value_and_grad(weighted, has_aux=True)(e)
            out.append((value, grad))
        return out

    dense = values_and_grads(x, None)
    assert np.abs(dense[0][1]).sum() > 0
    for block_size in (1, 5):
        for (value, grad), (dense_value, dense_grad) in zip(
            values_and_grads(x, block_size), dense, strict=True
        ):
            np.testing.assert_allclose(value, dense_value, rtol=1e-5, atol=1e-6)
            scale = np.abs(dense_grad).max()
            np.testing.assert_allclose(grad, dense_grad, rtol=1e-4, atol=1e-6 * scale)
    # "auto" (the default, dense at this size; its gradients are checked against finite
    # differences above)
    for reduction, (dense_value, _) in zip(("mean_nonzero", "none"), dense, strict=True):
        value = LOSSES[name](x, y, weights=w, reduction=reduction, block_size="auto")
        np.testing.assert_allclose(value, dense_value, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("name", sorted(LOSSES))
def test_low_precision_inputs_compute_in_float32(name, dtype):
    x, y = _batch(11)
    low = jnp.asarray(x, dtype)
    value, grad = jax.value_and_grad(lambda e: LOSSES[name](e, y))(low)
    assert value.dtype == jnp.float32
    assert grad.dtype == dtype
    assert np.isfinite(np.asarray(value)) and np.isfinite(np.asarray(grad, np.float32)).all()
    # exact on the rounded inputs, close to the float32 loss of the unrounded ones
    rounded = np.asarray(low, np.float64)
    np.testing.assert_allclose(value, REFERENCES[name](rounded, y), rtol=1e-5)
    np.testing.assert_allclose(value, LOSSES[name](x, y), rtol=2e-2)


# ---------------------------------------------------------------------------------------------
# Degenerate batches
# ---------------------------------------------------------------------------------------------

DEGENERATE = {
    "one_class": (random_batch(12, batch=6, dim=3)[0], np.zeros(6, np.int32)),
    "singletons": (random_batch(13, batch=6, dim=3)[0], np.arange(6, dtype=np.int32)),
    "zero_vectors": (np.zeros((6, 3), np.float32), np.arange(6, dtype=np.int32) % 2),
    "duplicates": (np.ones((6, 3), np.float32), np.arange(6, dtype=np.int32) % 2),
    "duplicates_one_class": (np.ones((6, 3), np.float32), np.zeros(6, np.int32)),
    "single_sample": (np.ones((1, 3), np.float32), np.zeros(1, np.int32)),
    "two_samples": (random_batch(14, batch=2, dim=3)[0], np.zeros(2, np.int32)),
}


# the blockwise form shares the per-row sums of every reduction: one suffices there
DEGENERATE_FORMS = (("mean", None), ("sum", None), ("mean_nonzero", None), ("mean", 2))


@functools.cache
def _degenerate_values_and_grads(name):
    """Jitted (embeddings, labels) → [(value, grad)] of each form; the batches of one shape
    share a compilation."""

    def values_and_grads(x, y):
        return [
            jax.value_and_grad(lambda e, r=r, b=b: LOSSES[name](e, y, reduction=r, block_size=b))(x)
            for r, b in DEGENERATE_FORMS
        ]

    return jax.jit(values_and_grads)


@pytest.mark.parametrize("case", sorted(DEGENERATE))
@pytest.mark.parametrize("name", sorted(LOSSES))
def test_degenerate_batches_are_finite_and_match_reference(name, case):
    x, y = DEGENERATE[case]
    results = _degenerate_values_and_grads(name)(x, y)
    for (reduction, _), (value, grad) in zip(DEGENERATE_FORMS, results, strict=True):
        assert np.isfinite(np.asarray(value)) and np.isfinite(np.asarray(grad)).all()
        expected = REFERENCES[name](x, y, reduction=reduction)
        np.testing.assert_allclose(value, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_no_positive_pair_gives_zero_value_gradient_and_no_terms(name):
    x, y = DEGENERATE["singletons"]
    for value, grad in _degenerate_values_and_grads(name)(x, y):
        assert value == 0.0
        np.testing.assert_array_equal(grad, 0.0)
    np.testing.assert_array_equal(LOSSES[name](x, y, reduction="none"), 0.0)
    # ... and the caller can tell that 0 means "no term", not "perfect embeddings"
    np.testing.assert_array_equal(positive_counts(y), 0)


def test_one_class_batch():
    # NT-Xent: no negatives, every pair is alone in its denominator: 0.
    # SupCon: Eq. 2 is defined without negatives and is > 0 (PML returns 0 there).
    x, y = DEGENERATE["one_class"]
    assert ntxent_loss(x, y) == 0.0
    np.testing.assert_array_equal(jax.grad(lambda e: ntxent_loss(e, y))(x), 0.0)
    value = supcon_loss(x, y)
    assert value > 0.0
    np.testing.assert_allclose(value, reference_supcon(x, y), rtol=1e-5)


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_zero_vector_in_a_normal_batch(name):
    x, y = _batch(15)
    x[3] = 0.0
    np.testing.assert_allclose(LOSSES[name](x, y), REFERENCES[name](x, y), rtol=1e-5)
    assert_finite_value_and_grad(lambda e: LOSSES[name](e, y), x)


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_all_weights_zero(name):
    x, y = _batch(16)
    w = np.zeros(len(y), np.float32)
    value, grad = jax.value_and_grad(lambda e: LOSSES[name](e, y, weights=w))(x)
    assert value == 0.0
    np.testing.assert_array_equal(grad, 0.0)
    np.testing.assert_array_equal(positive_counts(y, w), 0)


# ---------------------------------------------------------------------------------------------
# Two views
# ---------------------------------------------------------------------------------------------


def test_self_supervised_is_the_loss_on_the_concatenated_views():
    rng = np.random.default_rng(17)
    a = rng.normal(size=(6, 4)).astype(np.float32)
    b = (a + 0.3 * rng.normal(size=(6, 4))).astype(np.float32)
    labels = np.concatenate([np.arange(6), np.arange(6)])
    both = np.concatenate([a, b])
    simclr = self_supervised(ntxent_loss)
    assert simclr.__name__ == "self_supervised(ntxent_loss)"
    np.testing.assert_allclose(simclr(a, b), reference_ntxent(both, labels, 0.07), rtol=1e-5)
    np.testing.assert_allclose(
        simclr(a, b, temperature=0.5, reduction="sum"),
        reference_ntxent(both, labels, 0.5, reduction="sum"),
        rtol=1e-5,
    )
    assert simclr(a, b, reduction="none").shape == (12, 12)
    # weights: one per sample, for both of its views
    w = np.array([1.0, 0.0, 2.0, 1.0, 1.0, 0.5], np.float32)
    np.testing.assert_allclose(
        simclr(a, b, weights=w),
        reference_ntxent(both, labels, 0.07, weights=np.concatenate([w, w])),
        rtol=1e-5,
    )
    supervised = self_supervised(supcon_loss)
    np.testing.assert_allclose(
        jax.jit(supervised)(a, b), reference_supcon(both, labels, 0.1), rtol=1e-5
    )
    assert_finite_value_and_grad(lambda u, v: simclr(u, v, block_size=5), a, b)


# ---------------------------------------------------------------------------------------------
# Bad input: ValueError naming the argument, at trace time
# ---------------------------------------------------------------------------------------------

X = np.ones((4, 2), np.float32)
Y = np.zeros(4, np.int32)


@pytest.mark.parametrize("name", sorted(LOSSES))
@pytest.mark.parametrize(
    "args, kwargs, error, match",
    [
        ((np.ones((4,), np.float32), Y), {}, ValueError, r"embeddings must have shape \[batch"),
        ((np.ones((4, 2, 1), np.float32), Y), {}, ValueError, r"embeddings must have shape"),
        ((X, np.zeros(3, np.int32)), {}, ValueError, r"labels must have shape \[4\]"),
        ((X, np.zeros((4, 1), np.int32)), {}, ValueError, r"labels must have shape \[4\]"),
        ((X, Y), dict(weights=np.ones(3, np.float32)), ValueError, r"weights must have shape"),
        ((X, Y), dict(temperature=0.0), ValueError, "temperature must be > 0"),
        ((X, Y), dict(temperature=-0.1), ValueError, "temperature must be > 0"),
        ((X, Y), dict(reduction="avg"), ValueError, "reduction must be one of"),
        ((X, Y), dict(block_size=0), ValueError, "block_size must be >= 1"),
        ((X, np.zeros(4, np.float32)), {}, TypeError, "labels must be an integer"),
    ],
)
def test_bad_input_raises_at_trace_time(name, args, kwargs, error, match):
    with pytest.raises(error, match=match):
        jax.jit(lambda *a: LOSSES[name](*a, **kwargs)).lower(*args)


def test_bad_views_raise_at_trace_time():
    simclr = jax.jit(self_supervised(ntxent_loss))
    with pytest.raises(ValueError, match=r"view_b must have the shape of view_a \[4, 2\]"):
        simclr.lower(X, np.ones((5, 2), np.float32))
    with pytest.raises(ValueError, match=r"view_b must have the shape of view_a \[4, 2\]"):
        simclr.lower(X, np.ones((4, 3), np.float32))
    with pytest.raises(ValueError, match=r"view_a must have shape \[batch, dim\]"):
        simclr.lower(np.ones(4, np.float32), X)
    with pytest.raises(ValueError, match=r"weights must have shape \[4\]"):
        jax.jit(lambda a, b, w: self_supervised(ntxent_loss)(a, b, weights=w)).lower(
            X, X, np.ones(8, np.float32)
        )
    with pytest.raises(ValueError, match="labels must have shape"):
        positive_counts(np.zeros((2, 2), np.int32))


# ---------------------------------------------------------------------------------------------
# Parity with pytorch-metric-learning, float64
# ---------------------------------------------------------------------------------------------


def _parity_batches():
    """Random batches with repeated labels, one with a singleton class and one with
    near-duplicate hard negatives."""
    out = []
    for seed in range(3):
        x, y = random_batch(seed, batch=16, dim=5, classes=4, scale=0.7)
        out.append((x.astype(np.float64), y))
    x, y = _batch(7, batch=11, dim=4, classes=3)
    out.append((x.astype(np.float64), y))
    rng = np.random.default_rng(3)
    x = rng.normal(size=(1, 6)) + 0.05 * rng.normal(size=(10, 6))
    out.append((x, (np.arange(10) % 3).astype(np.int32)))
    return out


PARITY_BATCHES = _parity_batches()


@pytest.fixture(scope="module")
def pml():
    torch = pytest.importorskip("torch", reason="parity tests need torch (pip install torch)")
    losses = pytest.importorskip(
        "pytorch_metric_learning.losses",
        reason="parity tests need pytorch-metric-learning (pip install .[parity])",
    )
    from pytorch_metric_learning.reducers import AvgNonZeroReducer

    return torch, losses, AvgNonZeroReducer


def _pml_value_and_grads(torch, loss_fn, *arrays, labels=None):
    tensors = [torch.tensor(a, dtype=torch.float64, requires_grad=True) for a in arrays]
    args = tensors if labels is None else [*tensors, torch.tensor(labels, dtype=torch.int64)]
    loss = loss_fn(*args)
    loss.backward()
    return float(loss.detach()), [t.grad.numpy() for t in tensors]


@functools.cache
def _ours(name, configs):
    """A jitted float64 function of (embeddings, labels): [(value, grad)] for each
    (temperature, reduction) of ``configs``; cached so that equal shapes compile once."""

    def value_and_grads(e, y):
        return [
            jax.value_and_grad(lambda e, t=t, r=r: LOSSES[name](e, y, temperature=t, reduction=r))(
                e
            )
            for t, r in configs
        ]

    return jax.jit(value_and_grads)


def _ours_value_and_grads(name, configs, x, y):
    with jax.enable_x64(True):
        out = _ours(name, configs)(jnp.asarray(x, jnp.float64), jnp.asarray(y))
        assert all(value.dtype == jnp.float64 for value, _ in out)
        return [(float(value), [np.asarray(grad)]) for value, grad in out]


def _assert_parity(ours, theirs):
    (value, grads), (ref_value, ref_grads) = ours, theirs
    assert ref_value != 0.0  # a meaningful comparison
    np.testing.assert_allclose(value, ref_value, rtol=1e-9)
    for grad, ref_grad in zip(grads, ref_grads, strict=True):
        np.testing.assert_allclose(grad, ref_grad, rtol=1e-7, atol=1e-9 * np.abs(ref_grad).max())


NTXENT_CONFIGS = ((0.07, "mean"), (0.2, "mean_nonzero"))
SUPCON_CONFIGS = ((0.1, "mean"), (0.1, "mean_nonzero"))


@pytest.mark.parametrize("index", range(len(PARITY_BATCHES)))
def test_ntxent_matches_pml(pml, index):
    torch, losses, avg_non_zero = pml
    x, y = PARITY_BATCHES[index]
    default, non_zero = _ours_value_and_grads("ntxent", NTXENT_CONFIGS, x, y)
    theirs = _pml_value_and_grads(torch, losses.NTXentLoss(temperature=0.07), x, labels=y)
    _assert_parity(default, theirs)
    # the literal AvgNonZeroReducer is reduction="mean_nonzero"
    theirs = _pml_value_and_grads(
        torch, losses.NTXentLoss(temperature=0.2, reducer=avg_non_zero()), x, labels=y
    )
    _assert_parity(non_zero, theirs)


@pytest.mark.parametrize("index", range(len(PARITY_BATCHES)))
def test_supcon_matches_pml(pml, index):
    # PML's default AvgNonZeroReducer is "mean_nonzero"; "mean" equals it on these batches
    torch, losses, _ = pml
    x, y = PARITY_BATCHES[index]
    theirs = _pml_value_and_grads(torch, losses.SupConLoss(temperature=0.1), x, labels=y)
    for ours in _ours_value_and_grads("supcon", SUPCON_CONFIGS, x, y):
        _assert_parity(ours, theirs)


def test_supcon_differs_from_pml_only_on_one_class_batches(pml):
    torch, losses, _ = pml
    x, y = DEGENERATE["one_class"]
    value, _ = _pml_value_and_grads(torch, losses.SupConLoss(temperature=0.1), x, labels=y)
    assert value == 0.0  # PML needs a negative pair
    assert supcon_loss(x, y) > 0.0  # Eq. 2 does not


_simclr_value_and_grads = jax.jit(jax.value_and_grad(self_supervised(ntxent_loss), argnums=(0, 1)))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_self_supervised_ntxent_matches_pml(pml, seed):
    torch, losses, _ = pml
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(8, 5))
    b = a + 0.5 * rng.normal(size=(8, 5))
    theirs = _pml_value_and_grads(
        torch, losses.SelfSupervisedLoss(losses.NTXentLoss(temperature=0.07)), a, b
    )
    with jax.enable_x64(True):
        value, grads = _simclr_value_and_grads(jnp.asarray(a), jnp.asarray(b))
        assert value.dtype == jnp.float64
    _assert_parity((float(value), [np.asarray(g) for g in grads]), theirs)
