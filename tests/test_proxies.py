"""Proxy-Anchor, Proxy-NCA and the normalized softmax (mlx_jax.losses.proxies) against
loop-by-loop float64 references written from the papers' formulas, with and without class
blocks, on degenerate batches, and against pytorch-metric-learning (value and gradients w.r.t.
embeddings and proxies)."""

import functools
import inspect
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mlx_jax.losses.proxies import normalized_softmax_loss, proxy_anchor_loss, proxy_nca_loss
from tests.helpers import check_grads_x64

B, D, C = 12, 4, 5

# ---------------------------------------------------------------------------------------------
# References: plain loops over proxies and samples, float64, no code shared with the library.
# ---------------------------------------------------------------------------------------------


def _unit(v):
    v = np.asarray(v, np.float64)
    return v / max(math.sqrt(float(np.sum(v * v))), 1e-12)


def _weights(weights, batch):
    return np.ones(batch) if weights is None else np.asarray(weights, np.float64)


def reference_proxy_anchor(x, y, proxies, alpha=32.0, delta=0.1, weights=None, reduction="mean"):
    """Kim et al. 2020, Eq. 4; a sample's weight multiplies its exp term."""
    batch, classes = len(y), proxies.shape[1]
    w = _weights(weights, batch)
    positive, negative = np.zeros(classes), np.zeros(classes)
    with_positives = 0
    for c in range(classes):
        p = _unit(proxies[:, c])
        positive_sum = negative_sum = 0.0
        has_positive = False
        for i in range(batch):
            if w[i] == 0:
                continue
            s = float(_unit(x[i]) @ p)
            if y[i] == c:
                positive_sum += w[i] * math.exp(-alpha * (s - delta))
                has_positive = True
            else:
                negative_sum += w[i] * math.exp(alpha * (s + delta))
        positive[c], negative[c] = math.log1p(positive_sum), math.log1p(negative_sum)
        with_positives += has_positive
    if reduction == "none":
        return np.stack([positive, negative])
    if reduction == "sum":
        return positive.sum() + negative.sum()
    mean_positive = positive.sum() / with_positives if with_positives else 0.0
    return mean_positive + negative.sum() / classes


def _cross_entropy(logits, target):
    top = max(logits)
    return top + math.log(sum(math.exp(z - top) for z in logits)) - logits[target]


def _reduce(losses, w, reduction):
    losses = np.asarray(losses)
    if reduction == "none":
        return w * losses
    total = float(np.sum(w * losses))
    if reduction == "sum":
        return total
    count = np.sum(w) if reduction == "mean" else np.sum(w[losses > 0])
    return total / count if count > 0 else 0.0


def reference_proxy_nca(x, y, proxies, softmax_scale=1.0, weights=None, reduction="mean"):
    """Movshovitz-Attias et al. 2017 as PML computes it: a softmax over every proxy (the
    positive one included) of −s·‖x̂ − p̂‖²."""
    w = _weights(weights, len(y))
    losses = []
    for i in range(len(y)):
        xi = _unit(x[i])
        logits = [
            -softmax_scale * float(np.sum((xi - _unit(proxies[:, j])) ** 2))
            for j in range(proxies.shape[1])
        ]
        losses.append(_cross_entropy(logits, y[i]))
    return _reduce(losses, w, reduction)


def reference_normalized_softmax(
    x, y, class_weights, temperature=0.05, weights=None, reduction="mean"
):
    """Zhai & Wu 2019, Eqs. 1-2: softmax cross-entropy of x̂·ŵ_j / σ."""
    w = _weights(weights, len(y))
    losses = []
    for i in range(len(y)):
        xi = _unit(x[i])
        logits = [
            float(xi @ _unit(class_weights[:, j])) / temperature
            for j in range(class_weights.shape[1])
        ]
        losses.append(_cross_entropy(logits, y[i]))
    return _reduce(losses, w, reduction)


LOSSES = {
    "proxy_anchor": proxy_anchor_loss,
    "proxy_nca": proxy_nca_loss,
    "normalized_softmax": normalized_softmax_loss,
}
REFERENCES = {
    "proxy_anchor": reference_proxy_anchor,
    "proxy_nca": reference_proxy_nca,
    "normalized_softmax": reference_normalized_softmax,
}
NAMES = sorted(LOSSES)
SOFTMAX_NAMES = ("normalized_softmax", "proxy_nca")  # softmax over classes: class_block_size
REDUCTIONS = {
    "proxy_anchor": ("mean", "sum", "none"),
    "proxy_nca": ("mean", "sum", "mean_nonzero", "none"),
    "normalized_softmax": ("mean", "sum", "mean_nonzero", "none"),
}
# hyperparameters spelled out (the defaults first) so that every configuration of a loss
# shares one compilation of _all_reductions; the defaults themselves: test_defaults
CONFIGS = {
    "proxy_anchor": (dict(alpha=32.0, delta=0.1), dict(alpha=8.0, delta=0.3)),
    "proxy_nca": (dict(softmax_scale=1.0), dict(softmax_scale=4.0)),
    "normalized_softmax": (dict(temperature=0.05), dict(temperature=0.5)),
}
PARAM_NAME = {
    "proxy_anchor": "proxies",
    "proxy_nca": "proxies",
    "normalized_softmax": "class_weights",
}


def _problem(seed, batch=B, dim=D, classes=C):
    """Float32 embeddings [batch, dim], labels (every class but the last present, so one proxy
    has no positive) and proxies [dim, classes]."""
    rng = np.random.default_rng(seed)
    labels = np.arange(batch) % (classes - 1)
    rng.shuffle(labels)
    x = rng.normal(size=(batch, dim))
    proxies = rng.normal(size=(dim, classes))
    return x.astype(np.float32), labels.astype(np.int32), proxies.astype(np.float32)


@functools.cache
def _all_reductions(name):
    """Jitted (embeddings, labels, proxies, weights, hyperparameters) → {reduction: loss}: every
    reduction, hyperparameters traced, one compilation per shape and dtype (eager JAX compiles
    every op on its own, which would dominate the time of these small tests)."""

    def values(x, y, p, w, kwargs):
        return {
            r: LOSSES[name](x, y, p, weights=w, reduction=r, **kwargs) for r in REDUCTIONS[name]
        }

    return jax.jit(values)


def _losses(name, x, y, p, weights=None, **kwargs):
    """Every reduction of the loss, through :func:`_all_reductions`."""
    w = np.ones(len(y), np.asarray(x).dtype) if weights is None else weights
    return _all_reductions(name)(x, y, p, w, kwargs or CONFIGS[name][0])


# ---------------------------------------------------------------------------------------------
# Values
# ---------------------------------------------------------------------------------------------


def test_defaults():
    # the papers' (Kim et al. Sec. 4: α 32, δ 0.1; Zhai & Wu: σ 0.05) and PML's (all three)
    for name, fn in LOSSES.items():
        params = inspect.signature(fn).parameters
        for key, value in CONFIGS[name][0].items():
            assert params[key].default == value, (name, key)
        assert params["reduction"].default == "mean"


@pytest.mark.parametrize("name", NAMES)
def test_matches_reference_in_float32(name):
    x, y, p = _problem(1)
    for kwargs in CONFIGS[name]:
        values = _losses(name, x, y, p, **kwargs)
        for reduction in REDUCTIONS[name]:
            assert values[reduction].dtype == jnp.float32
            expected = REFERENCES[name](x, y, p, reduction=reduction, **kwargs)
            assert np.shape(values[reduction]) == np.shape(expected)
            np.testing.assert_allclose(values[reduction], expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", NAMES)
def test_matches_reference_in_float64(name):
    x, y, p = _problem(2)
    w = np.array([1.0, 0.5, 2.0, 0.0, 1.0, 1.0, 3.0, 1.0, 1.0, 0.25, 1.0, 1.0])
    with jax.enable_x64(True):
        for kwargs in CONFIGS[name]:
            values = _losses(name, x.astype(np.float64), y, p.astype(np.float64), w, **kwargs)
            for reduction in REDUCTIONS[name]:
                assert values[reduction].dtype == jnp.float64
                expected = REFERENCES[name](x, y, p, weights=w, reduction=reduction, **kwargs)
                np.testing.assert_allclose(values[reduction], expected, rtol=1e-10, atol=1e-12)


def test_proxy_anchor_none_holds_the_terms_of_mean_and_sum():
    x, y, p = _problem(3)
    values = _losses("proxy_anchor", x, y, p)
    terms = np.asarray(values["none"])
    assert terms.shape == (2, C)
    assert terms[0, C - 1] == 0.0  # the absent class: not in P+, no positive term
    assert np.all(terms[1] > 0)
    with_positives = len(set(y.tolist()))
    np.testing.assert_allclose(
        values["mean"], terms[0].sum() / with_positives + terms[1].sum() / C, rtol=1e-6
    )
    np.testing.assert_allclose(values["sum"], terms.sum(), rtol=1e-6)


def test_proxy_nca_is_the_normalized_softmax_at_temperature_one_over_two_s():
    # −s·‖x̂ − p̂‖² = 2s·cos − 2s and the −2s cancels in the softmax
    x, y, p = _problem(4)
    for s in (0.5, 3.0):
        nca = _losses("proxy_nca", x, y, p, softmax_scale=s)
        softmax = _losses("normalized_softmax", x, y, p, temperature=1.0 / (2.0 * s))
        for reduction in ("mean", "none"):
            np.testing.assert_allclose(nca[reduction], softmax[reduction], rtol=1e-6)


def test_proxy_anchor_large_alpha_does_not_overflow_in_float32():
    # exp(α·(s + δ)) at α = 200 is exp(220), beyond float32's range; near-duplicates of a
    # proxy make every term that large.
    rng = np.random.default_rng(5)
    p = rng.normal(size=(D, C)).astype(np.float32)
    x = (p[:, 0] + 0.01 * rng.normal(size=(B, D))).astype(np.float32)
    y = (np.arange(B) % 3).astype(np.int32)
    value, grads = jax.jit(
        jax.value_and_grad(lambda e, q: proxy_anchor_loss(e, y, q, alpha=200.0), argnums=(0, 1))
    )(x, p)
    np.testing.assert_allclose(value, reference_proxy_anchor(x, y, p, alpha=200.0), rtol=1e-5)
    assert all(np.isfinite(np.asarray(g)).all() for g in grads)


@pytest.mark.parametrize("name", NAMES)
def test_weights_zero_is_removal_and_two_is_a_duplicate(name):
    x, y, p = _problem(6)
    y = y.copy()
    y[0] = C - 1  # the last class's only sample, removed below: its proxy leaves P+
    w = np.ones(B, np.float32)
    w[[0, 7]] = 0.0
    w[3] = 2.0
    keep = w > 0
    duplicated = np.concatenate([np.flatnonzero(keep), [3]])
    weighted = _losses(name, x, y, p, w)
    removed = _losses(name, x, y, p, keep.astype(np.float32))
    copied = _losses(name, x[duplicated], y[duplicated], p)
    kept = _losses(name, x[keep], y[keep], p)
    for reduction in ("mean", "sum"):
        np.testing.assert_allclose(
            weighted[reduction],
            REFERENCES[name](x, y, p, weights=w, reduction=reduction),
            rtol=1e-5,
        )
        np.testing.assert_allclose(weighted[reduction], copied[reduction], rtol=1e-5)
        np.testing.assert_allclose(removed[reduction], kept[reduction], rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# Gradients, jit, class blocks, dtypes
# ---------------------------------------------------------------------------------------------

GRADIENT_CONFIGS = {
    "proxy_anchor": dict(alpha=16.0, delta=0.2),
    "proxy_nca": dict(softmax_scale=3.0, class_block_size=2),
    "normalized_softmax": dict(temperature=0.2),
}


@pytest.mark.parametrize("name", NAMES)
def test_gradients_match_finite_differences(name):
    x, y, p = _problem(7, batch=8, dim=3)
    w = np.array([1.0, 2.0, 1.0, 0.5, 1.0, 1.0, 0.0, 1.0])
    kwargs = GRADIENT_CONFIGS[name]
    check_grads_x64(
        jax.jit(lambda e, q: LOSSES[name](e, y, q, weights=w, **kwargs)), x, p, tol=1e-5
    )


@pytest.mark.parametrize("name", NAMES)
def test_jit_and_eager_agree(name):
    # the defaults against the reference; eager and jitted gradients against each other
    x, y, p = _problem(8)
    value_and_grad = jax.value_and_grad(lambda e, q: LOSSES[name](e, y, q), argnums=(0, 1))
    eager, jitted = value_and_grad(x, p), jax.jit(value_and_grad)(x, p)
    for value, _ in (eager, jitted):
        np.testing.assert_allclose(value, REFERENCES[name](x, y, p), rtol=1e-5)
    for actual, wanted in zip(eager[1], jitted[1], strict=True):
        assert np.abs(wanted).max() > 0
        np.testing.assert_allclose(actual, wanted, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", SOFTMAX_NAMES)
def test_class_blocks_give_the_same_value_and_gradients(name):
    # "mean" reduces, "none" returns the rows; random cotangents weigh every sample's term
    x, y, p = _problem(11)
    w = np.ones(B, np.float32)
    w[[2, 9]] = [0.0, 2.5]
    cotangent = np.random.default_rng(11).uniform(0.5, 1.5, size=B).astype(np.float32)

    def values_and_grads(e, q, class_block_size):
        out = []
        for reduction in ("mean", "none"):

            def weighted(e, q, r=reduction):
                value = LOSSES[name](
                    e, y, q, weights=w, reduction=r, class_block_size=class_block_size
                )
                scale = cotangent if r == "none" else 1.0
                return jnp.sum(value * scale), value

            (_, value), grads = jax.value_and_grad(weighted, argnums=(0, 1), has_aux=True)(e, q)
            out.append((value, grads))
        return out

    # class_block_size 2: three blocks of the 5 classes, the last one short
    dense, blocks = jax.jit(lambda e, q: (values_and_grads(e, q, None), values_and_grads(e, q, 2)))(
        x, p
    )
    assert np.abs(dense[0][1][1]).sum() > 0
    for (value, grads), (dense_value, dense_grads) in zip(blocks, dense, strict=True):
        np.testing.assert_allclose(value, dense_value, rtol=1e-5, atol=1e-6)
        for grad, dense_grad in zip(grads, dense_grads, strict=True):
            scale = np.abs(dense_grad).max()
            np.testing.assert_allclose(grad, dense_grad, rtol=1e-4, atol=1e-6 * scale)


@pytest.mark.parametrize("name", NAMES)
def test_low_precision_inputs_compute_in_float32(name):
    x, y, p = _problem(12)
    dtypes = (jnp.bfloat16, jnp.float16)
    inputs = [(jnp.asarray(x, dtype), jnp.asarray(p, dtype)) for dtype in dtypes]
    value_and_grad = jax.value_and_grad(lambda e, q: LOSSES[name](e, y, q), argnums=(0, 1))
    results = jax.jit(lambda pairs: [value_and_grad(*pair) for pair in pairs])(inputs)
    for dtype, (low_x, low_p), (value, (grad_x, grad_p)) in zip(
        dtypes, inputs, results, strict=True
    ):
        assert value.dtype == jnp.float32
        assert grad_x.dtype == dtype and grad_p.dtype == dtype
        assert np.isfinite(np.asarray(grad_x, np.float32)).all()
        assert np.isfinite(np.asarray(grad_p, np.float32)).all()
        # exact on the rounded inputs, close to the float32 loss of the unrounded ones
        rounded_x, rounded_p = np.asarray(low_x, np.float64), np.asarray(low_p, np.float64)
        np.testing.assert_allclose(value, REFERENCES[name](rounded_x, y, rounded_p), rtol=1e-5)
        np.testing.assert_allclose(value, _losses(name, x, y, p)["mean"], rtol=5e-2)


# ---------------------------------------------------------------------------------------------
# Degenerate batches
# ---------------------------------------------------------------------------------------------


def _degenerate_cases():
    rng = np.random.default_rng(13)
    x = rng.normal(size=(6, 3)).astype(np.float32)
    p = rng.normal(size=(3, 4)).astype(np.float32)
    y = np.array([0, 1, 2, 0, 1, 2], np.int32)
    ones = np.ones(6, np.float32)
    zero_row = x.copy()
    zero_row[2] = 0.0
    zero_proxy = p.copy()
    zero_proxy[:, 1] = 0.0
    on_proxy = np.stack([p[:, c] * 3.0 for c in y]).astype(np.float32)  # cos = 1 up to rounding
    return {
        "one_class": (x, np.zeros(6, np.int32), p, ones),
        "one_class_absent_others": (x, np.full(6, 3, np.int32), p, ones),
        "zero_embedding": (zero_row, y, p, ones),
        "all_zero_embeddings": (np.zeros_like(x), y, p, ones),
        "zero_proxy": (x, y, zero_proxy, ones),
        "duplicates": (np.ones_like(x), y, p, ones),
        "on_the_proxies": (on_proxy, y, p, ones),
        "all_weights_zero": (x, y, p, np.zeros(6, np.float32)),
        "one_weight_left": (x, y, p, np.array([0, 0, 0, 2, 0, 0], np.float32)),
    }


DEGENERATE = _degenerate_cases()


@functools.cache
def _degenerate_values_and_grads(name):
    """Jitted (embeddings, labels, proxies, weights) → [(value, grads)] per reduction; every
    case has the same shapes, so one compilation serves them all."""

    def values_and_grads(x, y, p, w):
        return [
            jax.value_and_grad(
                lambda e, q, r=r: LOSSES[name](e, y, q, weights=w, reduction=r), argnums=(0, 1)
            )(x, p)
            for r in REDUCTIONS[name]
            if r != "none"
        ]

    return jax.jit(values_and_grads)


@pytest.mark.parametrize("case", sorted(DEGENERATE))
@pytest.mark.parametrize("name", NAMES)
def test_degenerate_batches_are_finite_and_match_reference(name, case):
    x, y, p, w = DEGENERATE[case]
    results = _degenerate_values_and_grads(name)(x, y, p, w)
    reductions = [r for r in REDUCTIONS[name] if r != "none"]
    for reduction, (value, grads) in zip(reductions, results, strict=True):
        assert np.isfinite(np.asarray(value))
        assert all(np.isfinite(np.asarray(g)).all() for g in grads)
        if case == "all_weights_zero":
            assert value == 0.0
            assert all(np.all(np.asarray(g) == 0.0) for g in grads)
        if name == "proxy_nca" and case == "zero_proxy":
            continue  # test_proxy_nca_zero_proxy_is_cosine_zero_where_pml_has_distance_one
        expected = REFERENCES[name](x, y, p, weights=w, reduction=reduction)
        np.testing.assert_allclose(value, expected, rtol=1e-5, atol=1e-6)


def test_degenerate_values_derived_by_hand():
    x, y, p, w = DEGENERATE["all_zero_embeddings"]
    # every cosine is 0: a uniform softmax over C = 4 classes, L = log 4
    # (the jitted "mean" of test_degenerate_batches_are_finite_and_match_reference)
    mean = {name: _degenerate_values_and_grads(name)(x, y, p, w)[0][0] for name in NAMES}
    np.testing.assert_allclose(mean["proxy_nca"], math.log(4.0), rtol=1e-6)
    np.testing.assert_allclose(mean["normalized_softmax"], math.log(4.0), rtol=1e-6)
    # Proxy-Anchor, cos = 0: 3 proxies with 2 positives each, log(1 + 2·e^{αδ}); 4 proxies with
    # 4 negatives (6 for the absent class 3): log(1 + n·e^{αδ}), αδ = 3.2
    e = math.exp(3.2)
    expected = math.log1p(2 * e) + (3 * math.log1p(4 * e) + math.log1p(6 * e)) / 4
    np.testing.assert_allclose(mean["proxy_anchor"], expected, rtol=1e-6)


@pytest.mark.parametrize("name", NAMES)
def test_out_of_range_labels_raise_eagerly_and_are_nan_under_jit(name):
    x, y, p = _problem(14)
    for bad_value in (C, -1):
        bad = y.copy()
        bad[4] = bad_value
        with pytest.raises(ValueError, match=r"labels must lie in \[0, 5\)"):
            LOSSES[name](x, bad, p)
        # traced labels cannot be checked: the loss is NaN, never a clamped or wrapped class
        assert np.isnan(_losses(name, x, bad, p)["mean"])


# ---------------------------------------------------------------------------------------------
# Bad input: an error naming the argument, at trace time
# ---------------------------------------------------------------------------------------------

X = np.ones((4, 3), np.float32)
Y = np.zeros(4, np.int32)
P = np.ones((3, 5), np.float32)

COMMON_BAD = [
    ((np.ones(4, np.float32), Y, P), {}, ValueError, r"embeddings must have shape \[batch"),
    ((X, np.zeros(3, np.int32), P), {}, ValueError, r"labels must have shape \[4\]"),
    ((X, np.zeros(4, np.float32), P), {}, TypeError, "labels must be an integer"),
    ((X, Y, P), dict(weights=np.ones(3, np.float32)), ValueError, r"weights must have shape"),
    ((X, Y, P), dict(reduction="avg"), ValueError, "reduction must be one of"),
]
PROXY_BAD = [
    (
        (X, Y, np.ones((4, 5), np.float32)),
        {},
        ValueError,
        r"{p} must have shape \[3, num_classes\]",
    ),
    (
        (X, Y, np.ones((5, 3), np.float32)),
        {},
        ValueError,
        r"{p} must have shape \[3, num_classes\]",
    ),
    ((X, Y, np.ones(3, np.float32)), {}, ValueError, r"{p} must have shape \[3, num_classes\]"),
    (
        (X, Y, np.ones((3, 0), np.float32)),
        {},
        ValueError,
        "{p} must have shape .* num_classes >= 1",
    ),
    ((X, Y, np.ones((3, 5), np.int32)), {}, TypeError, "{p} must be a floating-point array"),
]
OWN_BAD = {
    "proxy_anchor": [
        ((X, Y, P), dict(alpha=0.0), ValueError, "alpha must be > 0"),
        ((X, Y, P), dict(delta=-0.1), ValueError, "delta must be >= 0"),
        ((X, Y, P), dict(reduction="mean_nonzero"), ValueError, r"reduction must be one of .*P⁺"),
    ],
    "proxy_nca": [
        ((X, Y, P), dict(softmax_scale=-1.0), ValueError, "softmax_scale must be > 0"),
        ((X, Y, P), dict(class_block_size=0), ValueError, "class_block_size must be >= 1"),
    ],
    "normalized_softmax": [
        ((X, Y, P), dict(temperature=0.0), ValueError, "temperature must be > 0"),
        ((X, Y, P), dict(class_block_size=1.5), TypeError, "class_block_size must be None"),
    ],
}
BAD_CASES = [(name, *case) for name in NAMES for case in COMMON_BAD + PROXY_BAD + OWN_BAD[name]]


@pytest.mark.parametrize("name, args, kwargs, error, match", BAD_CASES)
def test_bad_input_raises_at_trace_time(name, args, kwargs, error, match):
    match = match.replace("{p}", PARAM_NAME[name])
    with pytest.raises(error, match=match):
        jax.jit(lambda *a: LOSSES[name](*a, **kwargs)).lower(*args)


# ---------------------------------------------------------------------------------------------
# Parity with pytorch-metric-learning, float64
# ---------------------------------------------------------------------------------------------


def _parity_batches():
    """Random batches: every class present, one class absent, near-duplicate embeddings."""
    out = []
    for seed in range(2):
        rng = np.random.default_rng(100 + seed)
        y = rng.permutation(np.arange(16) % 6)
        out.append((rng.normal(size=(16, 5)), y.astype(np.int64), rng.normal(size=(5, 6))))
    rng = np.random.default_rng(102)
    y = rng.permutation(np.arange(16) % 4)  # classes 4 and 5 absent
    out.append((rng.normal(size=(16, 5)), y.astype(np.int64), rng.normal(size=(5, 6))))
    rng = np.random.default_rng(103)
    x = rng.normal(size=(1, 5)) + 0.05 * rng.normal(size=(16, 5))
    out.append((x, (np.arange(16) % 3).astype(np.int64), rng.normal(size=(5, 6))))
    return out


PARITY_BATCHES = _parity_batches()

PARITY_CONFIGS = {
    "proxy_anchor": (dict(alpha=32.0, delta=0.1), dict(alpha=16.0, delta=0.25)),
    "proxy_nca": (dict(softmax_scale=1.0), dict(softmax_scale=8.0)),
    "normalized_softmax": (dict(temperature=0.05), dict(temperature=0.3)),
}


@pytest.fixture(scope="module")
def pml():
    torch = pytest.importorskip("torch", reason="parity tests need torch (pip install torch)")
    losses = pytest.importorskip(
        "pytorch_metric_learning.losses",
        reason="parity tests need pytorch-metric-learning (pip install .[parity])",
    )
    return torch, losses


def _pml_loss(torch, losses, name, classes, dim, kwargs, proxies):
    """PML's module with our hyperparameters and proxies, its proxy parameter, and the map
    between that parameter's layout and our [D, C] (a transpose, or none)."""
    if name == "proxy_anchor":
        module = losses.ProxyAnchorLoss(classes, dim, margin=kwargs["delta"], alpha=kwargs["alpha"])
    elif name == "proxy_nca":
        module = losses.ProxyNCALoss(classes, dim, softmax_scale=kwargs["softmax_scale"])
    else:
        module = losses.NormalizedSoftmaxLoss(classes, dim, temperature=kwargs["temperature"])
    if name == "normalized_softmax":
        parameter, layout = module.W, lambda a: a  # already [D, C]
    else:
        parameter, layout = module.proxies, lambda a: a.T  # [C, D]
    parameter.data = torch.tensor(layout(proxies).copy(), dtype=torch.float64)
    return module, parameter, layout


def _pml_value_and_grads(pml, name, kwargs, x, y, proxies):
    torch, losses = pml
    module, parameter, layout = _pml_loss(
        torch, losses, name, proxies.shape[1], x.shape[1], kwargs, proxies
    )
    embeddings = torch.tensor(x, dtype=torch.float64, requires_grad=True)
    loss = module(embeddings, torch.tensor(y, dtype=torch.int64))
    loss.backward()
    return float(loss.detach()), embeddings.grad.numpy(), layout(parameter.grad.numpy())


@functools.cache
def _ours(name):
    def value_and_grads(x, y, p):
        return [
            jax.value_and_grad(lambda e, q, k=k: LOSSES[name](e, y, q, **k), argnums=(0, 1))(x, p)
            for k in PARITY_CONFIGS[name]
        ]

    return jax.jit(value_and_grads)


@pytest.mark.parametrize("name", NAMES)
def test_matches_pml_in_float64(pml, name):
    for x, y, p in PARITY_BATCHES:
        with jax.enable_x64(True):
            ours = _ours(name)(jnp.asarray(x), jnp.asarray(y, jnp.int32), jnp.asarray(p))
            assert ours[0][0].dtype == jnp.float64
        for kwargs, (value, (grad_x, grad_p)) in zip(PARITY_CONFIGS[name], ours, strict=True):
            ref_value, ref_grad_x, ref_grad_p = _pml_value_and_grads(pml, name, kwargs, x, y, p)
            assert ref_value != 0.0  # a meaningful comparison
            np.testing.assert_allclose(value, ref_value, rtol=1e-10)
            for grad, ref_grad in ((grad_x, ref_grad_x), (grad_p, ref_grad_p)):
                assert np.abs(ref_grad).max() > 0
                np.testing.assert_allclose(
                    grad, ref_grad, rtol=1e-10, atol=1e-12 * np.abs(ref_grad).max()
                )


def test_proxy_nca_differs_from_pml_where_its_target_probability_underflows(pml):
    # s = 200: a sample opposite its proxy (d = 4) next to a proxy it sits on (d = 0) has
    # target probability ~exp(−800), 0 in float64. PML drops that sample from the loss and the
    # mean; here its loss is exact: ≈ 200·4 = 800 (the other logits add ≈ nothing).
    rng = np.random.default_rng(15)
    p = rng.normal(size=(5, 3))
    y = np.array([0, 1, 2, 0, 1, 2], np.int64)
    x = np.stack([p[:, c] + 0.3 * rng.normal(size=5) for c in y])
    x[0] = p[:, 1] / np.linalg.norm(p[:, 1])  # on proxy 1
    p[:, 0] = -p[:, 1]  # its own proxy opposite
    with jax.enable_x64(True):
        values = _losses("proxy_nca", x, y.astype(np.int32), p, softmax_scale=200.0)
    terms, ours = values["none"], values["mean"]
    np.testing.assert_allclose(terms[0], 800.0, rtol=1e-6)
    np.testing.assert_allclose(ours, reference_proxy_nca(x, y, p, 200.0), rtol=1e-10)
    theirs, _, _ = _pml_value_and_grads(pml, "proxy_nca", dict(softmax_scale=200.0), x, y, p)
    np.testing.assert_allclose(theirs, np.mean(np.asarray(terms)[1:]), rtol=1e-10)
    assert float(ours) - theirs > 100.0  # (800 + the other five) / 6 vs the other five / 5


def test_proxy_nca_zero_proxy_is_cosine_zero_where_pml_has_distance_one(pml):
    # A zero proxy has cosine 0 here, i.e. squared distance 2 to every unit embedding; PML's
    # literal ‖x̂ − 0‖² is 1 (the reference's distance form). Logits −s·(2 − 2·cos), s = 1.
    x, y, p, w = DEGENERATE["zero_proxy"]
    losses = []
    for i in range(len(y)):
        xi = _unit(x[i])
        logits = [-(2.0 - 2.0 * float(xi @ _unit(p[:, j]))) for j in range(p.shape[1])]
        losses.append(_cross_entropy(logits, y[i]))
    value = float(_degenerate_values_and_grads("proxy_nca")(x, y, p, w)[0][0])  # "mean", s = 1
    np.testing.assert_allclose(value, np.mean(losses), rtol=1e-6)
    theirs, _, _ = _pml_value_and_grads(
        pml, "proxy_nca", dict(softmax_scale=1.0), x.astype(np.float64), y, p.astype(np.float64)
    )
    np.testing.assert_allclose(theirs, reference_proxy_nca(x, y, p, 1.0), rtol=1e-10)
    assert abs(value - theirs) > 1e-2
