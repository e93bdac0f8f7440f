"""Lifted structure losses (mlx_jax.losses.lifted_structure): loop-by-loop float64 references of
Song et al. 2016, Eq. 4, and Hermans et al. 2017, Eq. 6, the row-block forms (value, gradients,
memory at B = 65,536), degenerate batches, bad input, and parity with pytorch-metric-learning's
LiftedStructureLoss / GeneralizedLiftedStructureLoss."""

from __future__ import annotations

import functools
import math
from types import SimpleNamespace

import chex
import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

from mlx_jax import blockwise
from mlx_jax.distances import l2_normalize
from mlx_jax.losses.lifted_structure import (
    generalized_lifted_structure_loss,
    lifted_structure_loss,
)
from tests.helpers import check_grads_x64, random_batch

# One batch shape (12 x 4) almost everywhere: eager JAX compiles each operation once per shape
# and dtype, so a shared shape keeps the file fast.
B, D = 12, 4

LOSSES = {"lifted": lifted_structure_loss, "generalized": generalized_lifted_structure_loss}


def batch(seed, classes=3, scale=0.7):
    """A float32 batch with repeated labels and one singleton class (sample 0)."""
    x, y = random_batch(seed, batch=B, dim=D, classes=classes, scale=scale)
    y = y.copy()
    y[0] = classes + 5
    return x, y


# --------------------------------------------------------------------------------------------
# References: the papers' formulas with explicit loops, float64, no code shared with the library.
# --------------------------------------------------------------------------------------------


def distance_matrix(x) -> np.ndarray:
    x = np.asarray(x, np.float64)
    batch = len(x)
    out = np.zeros((batch, batch))
    for i in range(batch):
        for j in range(batch):
            out[i, j] = math.sqrt(sum((x[i, d] - x[j, d]) ** 2 for d in range(x.shape[1])))
    return out


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


def reference_lifted(
    x, y, neg_margin=1.0, pos_margin=0.0, weights=None, reduction="mean"
) -> float | np.ndarray:
    """Song et al. 2016, Eq. 4: a term ½·[J_ij]₊² per ordered positive pair (i, j), weight w_i;
    an empty sum of negatives makes J_ij = −∞ (term 0)."""
    dist = distance_matrix(x)
    batch = len(y)
    w = np.ones(batch) if weights is None else np.asarray(weights, np.float64)
    losses, term_weights = [], []
    unreduced = np.zeros((batch, batch))
    for i in range(batch):
        if w[i] == 0:
            continue
        for j in range(batch):
            if j == i or y[j] != y[i] or w[j] == 0:
                continue
            total = sum(
                math.exp(neg_margin - dist[i, k]) for k in range(batch) if y[k] != y[i] and w[k]
            ) + sum(
                math.exp(neg_margin - dist[j, k]) for k in range(batch) if y[k] != y[j] and w[k]
            )
            big_j = math.log(total) + dist[i, j] - pos_margin if total > 0 else -math.inf
            loss = 0.5 * max(0.0, big_j) ** 2
            losses.append(loss)
            term_weights.append(w[i])
            unreduced[i, j] = w[i] * loss
    return _reduce(losses, term_weights, reduction, unreduced)


def paper_lifted(x, y, alpha=1.0) -> float:
    """Eq. 4 as printed: 1/(2|P|) Σ_{(i,j)∈P} max(0, J_ij)² over the *unordered* positive
    pairs i < j (0 without any)."""
    dist = distance_matrix(x)
    batch = len(y)
    squares = []
    for i in range(batch):
        for j in range(i + 1, batch):
            if y[i] != y[j]:
                continue
            total = sum(math.exp(alpha - dist[i, k]) for k in range(batch) if y[k] != y[i])
            total += sum(math.exp(alpha - dist[j, k]) for k in range(batch) if y[k] != y[j])
            big_j = math.log(total) + dist[i, j] if total > 0 else -math.inf
            squares.append(max(0.0, big_j) ** 2)
    return sum(squares) / (2 * len(squares)) if squares else 0.0


def _logsumexp_or_zero(values) -> float:
    """log Σ exp over a list; an empty list gives 0 (pytorch-metric-learning's convention)."""
    if not values:
        return 0.0
    top = max(values)
    return top + math.log(sum(math.exp(v - top) for v in values))


def reference_generalized(
    x, y, neg_margin=1.0, pos_margin=0.0, weights=None, reduction="mean"
) -> float | np.ndarray:
    """Hermans et al. 2017, Eq. 6, anchor by anchor: [log Σ_p exp(D_ap − m_pos) +
    log Σ_n exp(m − D_an)]₊, an empty sum's log taken as 0; every valid anchor is a term."""
    dist = distance_matrix(x)
    batch = len(y)
    w = np.ones(batch) if weights is None else np.asarray(weights, np.float64)
    losses, term_weights = [], []
    unreduced = np.zeros(batch)
    for a in range(batch):
        if w[a] == 0:
            continue
        positive = [
            dist[a, p] - pos_margin for p in range(batch) if p != a and y[p] == y[a] and w[p]
        ]
        negative = [neg_margin - dist[a, n] for n in range(batch) if y[n] != y[a] and w[n]]
        loss = max(0.0, _logsumexp_or_zero(positive) + _logsumexp_or_zero(negative))
        losses.append(loss)
        term_weights.append(w[a])
        unreduced[a] = w[a] * loss
    return _reduce(losses, term_weights, reduction, unreduced)


REFERENCES = {"lifted": reference_lifted, "generalized": reference_generalized}


REDUCTIONS = ("mean", "sum", "mean_nonzero", "none")


@functools.cache
def _jitted(name, block_size="auto"):
    """Jitted (embeddings, labels, weights, neg_margin, pos_margin) → {reduction: (value,
    gradient)} for every reduction (the gradient of Σ value for ``"none"``): one compilation
    per loss, block size, shape and dtype serves every test."""

    def loss(e, y, w, neg_margin, pos_margin, reduction):
        value = LOSSES[name](
            e,
            y,
            neg_margin=neg_margin,
            pos_margin=pos_margin,
            weights=w,
            reduction=reduction,
            block_size=block_size,
        )
        return jnp.sum(value), value

    def all_reductions(*args):
        out = {}
        for reduction in REDUCTIONS:
            (_, value), grad = jax.value_and_grad(loss, has_aux=True)(*args, reduction)
            out[reduction] = (value, grad)
        return out

    return jax.jit(all_reductions)


def evaluate(
    name, x, y, *, weights=None, neg_margin=1.0, pos_margin=0.0, reduction="mean", block_size="auto"
):
    """(value, gradient) of ``LOSSES[name]`` through the cached jitted function."""
    w = np.ones(len(y), np.float32) if weights is None else np.asarray(weights, np.float32)
    out = _jitted(name, block_size)(x, y, w, neg_margin, pos_margin)
    return out[reduction]


# --------------------------------------------------------------------------------------------
# Values, reductions, weights
# --------------------------------------------------------------------------------------------

CONFIGS = [
    dict(),  # the defaults α = 1 (m = 1), m_pos = 0
    dict(neg_margin=0.5, pos_margin=0.3, reduction="sum"),
    dict(neg_margin=2.0, reduction="mean_nonzero"),
]


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("name", sorted(LOSSES))
def test_matches_reference(name, config):
    x, y = batch(0)
    value, _ = evaluate(name, x, y, **config)
    assert value.dtype == jnp.float32
    np.testing.assert_allclose(value, REFERENCES[name](x, y, **config), rtol=1e-5)


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_matches_reference_in_float64(name):
    x, y = batch(1)
    with jax.enable_x64(True):
        for config in CONFIGS[:2]:
            value, _ = evaluate(name, jnp.asarray(x, jnp.float64), y, **config)
            assert value.dtype == jnp.float64
            np.testing.assert_allclose(value, REFERENCES[name](x, y, **config), rtol=1e-10)


def test_lifted_mean_is_eq4_over_unordered_pairs():
    # J_ij = J_ji, so the mean of ½[J]₊² over ordered pairs is Eq. 4's 1/(2|P|) Σ over
    # unordered ones, on batches with and without a singleton class.
    for seed, classes in [(2, 3), (3, 4)]:
        x, y = random_batch(seed, batch=B, dim=D, classes=classes, scale=0.7)
        with jax.enable_x64(True):
            value, _ = evaluate("lifted", jnp.asarray(x, jnp.float64), y)
        np.testing.assert_allclose(value, paper_lifted(x, y), rtol=1e-10)


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_reduction_none_matches_reference(name):
    x, y = batch(4)
    w = np.array([1.0, 2.0, 0.5, 1.0, 0.0, 1.0, 3.0, 1.0, 1.0, 1.0, 0.0, 1.0], np.float32)
    terms, _ = evaluate(name, x, y, weights=w, reduction="none")
    expected = REFERENCES[name](x, y, weights=w, reduction="none")
    assert terms.shape == expected.shape  # [B, B] pair terms (lifted), [B] anchors (generalized)
    np.testing.assert_allclose(terms, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
        np.sum(terms), evaluate(name, x, y, weights=w, reduction="sum")[0], rtol=1e-5
    )
    if name == "lifted":
        # a term per positive pair only: the singleton sample 0 has none
        same = np.equal.outer(y, y) & ~np.eye(B, dtype=bool) & np.outer(w > 0, w > 0)
        np.testing.assert_array_equal(np.asarray(terms)[~same], 0.0)
        assert np.all(np.asarray(terms)[same] > 0)
        assert not np.any(terms[0])
    else:
        # the singleton anchor keeps its negative part (empty positive log-sum-exp = 0)
        dist = distance_matrix(x)
        negatives = [1.0 - dist[0, n] for n in range(B) if y[n] != y[0] and w[n] > 0]
        np.testing.assert_allclose(terms[0], max(0.0, _logsumexp_or_zero(negatives)), rtol=1e-5)
        assert terms[0] > 0


@pytest.mark.parametrize("reduction", ["mean", "mean_nonzero"])
@pytest.mark.parametrize("name", sorted(LOSSES))
def test_weights_match_reference_and_zero_weight_is_removal(name, reduction):
    x, y = batch(5)
    w = np.array([1.0, 0.5, 2.0, 0.0, 1.0, 1.0, 3.0, 0.0, 1.0, 1.0, 0.5, 1.0], np.float32)
    value, grad = evaluate(name, x, y, weights=w, reduction=reduction)
    np.testing.assert_allclose(
        value, REFERENCES[name](x, y, weights=w, reduction=reduction), rtol=1e-5
    )
    keep = w > 0
    removed, _ = evaluate(name, x[keep], y[keep], weights=w[keep], reduction=reduction)
    np.testing.assert_allclose(value, removed, rtol=1e-6)
    np.testing.assert_array_equal(grad[~keep], 0.0)


def test_mean_nonzero_drops_pairs_inside_the_margin():
    # A large positive margin pulls some J_ij below 0: "mean_nonzero" then averages over the
    # other pairs only.
    x, y = batch(6)
    config = dict(pos_margin=4.0)  # J_ij + m_pos lies in [3.0, 5.2] on this batch
    terms = np.asarray(evaluate("lifted", x, y, reduction="none", **config)[0])
    same = np.equal.outer(y, y) & ~np.eye(B, dtype=bool)
    assert np.any(terms[same] == 0) and np.any(terms[same] > 0)
    np.testing.assert_allclose(
        evaluate("lifted", x, y, reduction="mean_nonzero", **config)[0],
        terms.sum() / np.sum(terms[same] > 0),
        rtol=1e-5,
    )


# --------------------------------------------------------------------------------------------
# Gradients, jit, block sizes, memory, dtypes
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, kwargs",
    [
        ("lifted", dict(neg_margin=0.5, reduction="sum", block_size=5)),
        ("generalized", dict(pos_margin=0.2, reduction="mean_nonzero")),
    ],
)
def test_gradients_match_finite_differences(name, kwargs):
    x, y = batch(7)
    w = np.array([1.0, 2.0, 1.0, 0.5, 1.0, 1.0, 0.0, 1.0, 1.0, 1.0, 1.5, 1.0])
    check_grads_x64(jax.jit(lambda e: LOSSES[name](e, y, weights=w, **kwargs)), x, tol=1e-5)


class TestVariants(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_value_and_grad_jit_and_eager_agree(self):
        x, y = batch(8)
        for name, fn in LOSSES.items():
            value_and_grad = self.variant(
                jax.value_and_grad(lambda e, lab, f=fn: f(e, lab, neg_margin=0.8))
            )
            value, grad = value_and_grad(x, y)
            np.testing.assert_allclose(value, REFERENCES[name](x, y, neg_margin=0.8), rtol=1e-5)
            _, expected = evaluate(name, x, y, neg_margin=0.8)
            np.testing.assert_allclose(grad, expected, rtol=1e-4, atol=1e-6)


def test_traced_hyperparameters():
    x, y = batch(9)
    for name in LOSSES:
        value, _ = evaluate(name, x, y, neg_margin=1.3, pos_margin=0.2)
        expected = REFERENCES[name](x, y, neg_margin=1.3, pos_margin=0.2)
        np.testing.assert_allclose(value, expected, rtol=1e-5)


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_block_sizes_give_the_same_value_and_gradients(name):
    # Every reduction, "none" (the rows themselves) included, against the dense form ("auto"
    # at B = 12). Blocks of 5 rows: several blocks, the last one padded.
    assert blockwise.auto_block_size(B) is None
    x, y = batch(10)
    w = np.ones(B, np.float32)
    w[[2, 9]] = [0.0, 2.5]
    for reduction in REDUCTIONS:
        dense_value, dense_grad = evaluate(name, x, y, weights=w, reduction=reduction)
        scale = np.abs(dense_grad).max()
        assert scale > 0
        value, grad = evaluate(name, x, y, weights=w, reduction=reduction, block_size=5)
        np.testing.assert_allclose(value, dense_value, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(grad, dense_grad, rtol=1e-4, atol=1e-6 * scale)


def _largest_intermediate(fn, *args) -> int:
    """The most elements of any value in ``fn``'s jaxpr, sub-jaxprs (scan, checkpoint) included."""
    jaxpr = jax.make_jaxpr(fn)(*args)
    sizes = [0]

    def visit(jpr):
        for eqn in jpr.eqns:
            sizes.extend(
                int(np.prod(v.aval.shape)) for v in eqn.outvars if hasattr(v.aval, "shape")
            )
            for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                visit(sub)

    visit(jaxpr.jaxpr)
    return max(sizes)


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_batch_of_65536_holds_only_row_blocks(name):
    # Traced, not run: forward and backward pass of both row-blocked passes hold nothing
    # larger than a [block, B] plane, while the dense form builds the [B, B] matrix.
    batch_size, block = 65_536, 256
    x = jax.ShapeDtypeStruct((batch_size, 8), jnp.float32)
    y = jax.ShapeDtypeStruct((batch_size,), jnp.int32)

    def step(block_size):
        return jax.value_and_grad(lambda e, lab: LOSSES[name](e, lab, block_size=block_size))

    assert _largest_intermediate(step(block), x, y) <= block * batch_size
    assert _largest_intermediate(step(None), x, y) >= batch_size * batch_size
    if jax.default_backend() == "cpu":  # "auto" picks blocks of 16 rows on CPU at this size
        assert _largest_intermediate(step("auto"), x, y) <= 16 * batch_size


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("name", sorted(LOSSES))
def test_low_precision_inputs_compute_in_float32(name, dtype):
    x, y = batch(11)
    low = jnp.asarray(x, dtype)
    value, grad = jax.jit(jax.value_and_grad(lambda e: LOSSES[name](e, y)))(low)
    assert value.dtype == jnp.float32
    assert grad.dtype == dtype
    assert np.isfinite(np.asarray(value)) and np.isfinite(np.asarray(grad, np.float32)).all()
    # exact on the rounded inputs, close to the float32 loss of the unrounded ones
    rounded = np.asarray(low, np.float64)
    np.testing.assert_allclose(value, REFERENCES[name](rounded, y), rtol=1e-5)
    np.testing.assert_allclose(value, evaluate(name, x, y)[0], rtol=2e-2)


def test_far_apart_negatives_do_not_underflow_to_minus_infinity():
    # exp(α − D) underflows float32 for D > ~100; the max-subtracted log-sum-exp keeps J_ij
    # (≈ α − D_min + D_ij) and the generalized loss exact.
    x, y = batch(12, scale=1.0)
    x = x * 200.0
    for name in LOSSES:
        value, grad = evaluate(name, x, y)
        np.testing.assert_allclose(value, REFERENCES[name](x, y), rtol=1e-5)
        assert np.isfinite(np.asarray(grad)).all() and np.abs(grad).max() > 0


# --------------------------------------------------------------------------------------------
# Degenerate batches
# --------------------------------------------------------------------------------------------

DEGENERATE = {
    "one_class": (random_batch(20, batch=B, dim=D)[0], np.zeros(B, np.int32)),
    "singletons": (random_batch(21, batch=B, dim=D)[0], np.arange(B, dtype=np.int32)),
    "zero_vectors": (np.zeros((B, D), np.float32), np.arange(B, dtype=np.int32) % 2),
    "duplicates_one_class": (np.ones((B, D), np.float32), np.zeros(B, np.int32)),
    "duplicates_two_classes": (np.ones((B, D), np.float32), np.arange(B, dtype=np.int32) % 2),
    "zero_vector_in_a_batch": (
        np.concatenate([np.zeros((1, D)), random_batch(22, batch=B - 1, dim=D)[0]]).astype(
            np.float32
        ),
        np.arange(B, dtype=np.int32) % 3,
    ),
    # one valid sample (the rest weighted 0): no pair at all, at the shape of the others
    "one_valid_sample": (random_batch(23, batch=B, dim=D)[0], np.arange(B, dtype=np.int32) % 3),
    "all_weights_zero": (random_batch(24, batch=B, dim=D)[0], np.arange(B, dtype=np.int32) % 3),
}
DEGENERATE_WEIGHTS = {
    "one_valid_sample": (np.arange(B) == 0).astype(np.float32),
    "all_weights_zero": np.zeros(B, np.float32),
}


@pytest.mark.parametrize("case", sorted(DEGENERATE))
@pytest.mark.parametrize("name", sorted(LOSSES))
def test_degenerate_batches_are_finite_and_match_reference(name, case):
    x, y = DEGENERATE[case]
    w = DEGENERATE_WEIGHTS.get(case)
    for reduction, block_size in (("mean", "auto"), ("sum", "auto"), ("mean_nonzero", 5)):
        value, grad = evaluate(name, x, y, weights=w, reduction=reduction, block_size=block_size)
        assert np.isfinite(np.asarray(value)) and np.isfinite(np.asarray(grad)).all()
        expected = REFERENCES[name](x, y, weights=w, reduction=reduction)
        np.testing.assert_allclose(value, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "case", ["one_class", "singletons", "duplicates_one_class", "one_valid_sample"]
)
def test_lifted_without_positive_pairs_or_negatives_is_zero(case):
    # No positive pair, or no negative for any pair (log of an empty sum: J = −∞): 0, and
    # no gradient.
    x, y = DEGENERATE[case]
    value, grad = evaluate("lifted", x, y, weights=DEGENERATE_WEIGHTS.get(case))
    assert value == 0.0
    np.testing.assert_array_equal(grad, 0.0)


def test_generalized_keeps_the_side_that_exists():
    # An empty set's log-sum-exp is 0 (PML's convention; a literal Eq. 6 would give −∞ and
    # loss 0): singletons keep [log Σ_n exp(m − D_an)]₊, a one-class batch
    # [log Σ_p exp(D_ap)]₊ — both > 0 here, with gradients.
    for case in ("singletons", "one_class"):
        x, y = DEGENERATE[case]
        dist = distance_matrix(x)
        off_diagonal = ~np.eye(B, dtype=bool)
        side = 1.0 - dist if case == "singletons" else dist
        expected = np.mean(
            [max(0.0, _logsumexp_or_zero(list(side[a][off_diagonal[a]]))) for a in range(B)]
        )
        value, grad = evaluate("generalized", x, y)
        assert value > 0
        np.testing.assert_allclose(value, expected, rtol=1e-5)
        assert np.abs(grad).max() > 0


def test_duplicate_embeddings_have_zero_gradient():
    # D = 0 everywhere: the safe square root's derivative is 0 there (not inf), and every
    # loss term is constant, so the gradient is exactly 0 — not NaN.
    x, y = DEGENERATE["duplicates_two_classes"]
    for name in LOSSES:
        value, grad = evaluate(name, x, y)
        assert value > 0
        np.testing.assert_array_equal(grad, 0.0)


# --------------------------------------------------------------------------------------------
# Bad input: errors naming the argument, raised while tracing
# --------------------------------------------------------------------------------------------

X = np.ones((4, 2), np.float32)
Y = np.zeros(4, np.int32)


@pytest.mark.parametrize("name", sorted(LOSSES))
@pytest.mark.parametrize(
    "args, kwargs, error, match",
    [
        ((np.ones((4,), np.float32), Y), {}, ValueError, r"embeddings must have shape \[batch"),
        ((np.ones((4, 2, 1), np.float32), Y), {}, ValueError, r"embeddings must have shape"),
        ((np.ones((4, 2), np.int32), Y), {}, TypeError, r"embeddings must be a floating"),
        ((X, np.zeros(3, np.int32)), {}, ValueError, r"labels must have shape \[4\]"),
        ((X, np.zeros(4, np.float32)), {}, TypeError, "labels must be an integer"),
        ((X, Y), dict(weights=np.ones(3, np.float32)), ValueError, r"weights must have shape"),
        ((X, Y), dict(reduction="avg"), ValueError, "reduction must be one of"),
        ((X, Y), dict(block_size=0), ValueError, "block_size must be >= 1"),
        ((X, Y), dict(block_size="Auto"), TypeError, "block_size must be None, 'auto'"),
    ],
)
def test_bad_input_raises_at_trace_time(name, args, kwargs, error, match):
    with pytest.raises(error, match=match):
        jax.jit(lambda *a: LOSSES[name](*a, **kwargs)).lower(*args)


def test_negative_labels_raise_when_concrete():
    with pytest.raises(ValueError, match="labels must lie in"):
        lifted_structure_loss(X, np.array([0, -1, 0, 1], np.int32))


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
    from pytorch_metric_learning import distances, reducers

    return SimpleNamespace(torch=torch, losses=losses, distances=distances, reducers=reducers)


def _parity_batches():
    """(embeddings float64, labels int32): random batches, one with a singleton class, one with
    near-duplicate hard negatives."""
    out = []
    for seed in range(3):
        x, y = random_batch(seed, batch=B, dim=D, classes=3 + seed % 2, scale=0.7)
        out.append((x.astype(np.float64), y))
    x, y = batch(7)
    out.append((x.astype(np.float64), y))
    rng = np.random.default_rng(3)
    x = rng.normal(size=(1, D)) + 0.05 * rng.normal(size=(B, D))
    out.append((x, (np.arange(B) % 3).astype(np.int32)))
    return out


PARITY_BATCHES = _parity_batches()
PML_CLASSES = {"lifted": "LiftedStructureLoss", "generalized": "GeneralizedLiftedStructureLoss"}


def _pml_value_and_grad(pml, name, x, y, *, normalize=False, reducer=None, **margins):
    torch = pml.torch
    kwargs = dict(margins)
    if not normalize:
        kwargs["distance"] = pml.distances.LpDistance(normalize_embeddings=False)
    if reducer is not None:
        kwargs["reducer"] = getattr(pml.reducers, reducer)()
    loss_fn = getattr(pml.losses, PML_CLASSES[name])(**kwargs)
    if reducer is None:
        assert isinstance(loss_fn.reducer, pml.reducers.MeanReducer)  # PML's default
    embeddings = torch.tensor(x, dtype=torch.float64, requires_grad=True)
    loss = loss_fn(embeddings, torch.tensor(y, dtype=torch.int64))
    loss.backward()
    return float(loss.detach()), embeddings.grad.numpy()


def _ours_value_and_grad(name, x, y, *, neg_margin=1.0, pos_margin=0.0, **static):
    with jax.enable_x64(True):
        value, grad = evaluate(
            name,
            jnp.asarray(x, jnp.float64),
            jnp.asarray(y),
            neg_margin=neg_margin,
            pos_margin=pos_margin,
            **static,
        )
        assert value.dtype == jnp.float64
        return float(value), np.asarray(grad)


def _assert_parity(ours, theirs, nonzero=True):
    (value, grad), (ref_value, ref_grad) = ours, theirs
    if nonzero:
        assert ref_value != 0.0  # a meaningful comparison
    np.testing.assert_allclose(value, ref_value, rtol=1e-10, atol=1e-14)
    scale = max(np.abs(ref_grad).max(), 1e-300)
    np.testing.assert_allclose(grad, ref_grad, rtol=1e-9, atol=1e-12 * scale)


PARITY_MARGINS = [dict(neg_margin=1.0, pos_margin=0.0), dict(neg_margin=0.5, pos_margin=0.3)]


@pytest.mark.parametrize("index", range(len(PARITY_BATCHES)))
@pytest.mark.parametrize("name", sorted(LOSSES))
def test_matches_pml(pml, name, index):
    """PML's default MeanReducer is ``reduction="mean"``, its AvgNonZeroReducer
    ``"mean_nonzero"`` and its SumReducer ``"sum"``; the distance is PML's LpDistance without
    its default normalization (the losses take the embeddings as given)."""
    x, y = PARITY_BATCHES[index]
    for margins in PARITY_MARGINS:
        _assert_parity(
            _ours_value_and_grad(name, x, y, **margins),
            _pml_value_and_grad(pml, name, x, y, **margins),
        )
    for reducer, reduction in [("AvgNonZeroReducer", "mean_nonzero"), ("SumReducer", "sum")]:
        _assert_parity(
            _ours_value_and_grad(name, x, y, reduction=reduction, **PARITY_MARGINS[1]),
            _pml_value_and_grad(pml, name, x, y, reducer=reducer, **PARITY_MARGINS[1]),
        )


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_pml_default_distance_is_ours_on_normalized_embeddings(pml, name):
    # PML's default LpDistance L2-normalizes first: the gradient is ours chained through
    # l2_normalize.
    x, y = PARITY_BATCHES[0]
    with jax.enable_x64(True):
        unit, normalize_vjp = jax.vjp(l2_normalize, jnp.asarray(x, jnp.float64))
        value, grad_unit = evaluate(name, unit, y)
        (grad,) = normalize_vjp(grad_unit)
    _assert_parity(
        (float(value), np.asarray(grad)), _pml_value_and_grad(pml, name, x, y, normalize=True)
    )


@pytest.mark.parametrize("case", ["one_class", "singletons"])
@pytest.mark.parametrize("name", sorted(LOSSES))
def test_degenerate_batches_match_pml(pml, name, case):
    # lifted: 0 for both (no positive pair / no negative); generalized: the side that exists
    x, y = DEGENERATE[case]
    x = x.astype(np.float64)
    theirs = _pml_value_and_grad(pml, name, x, y)
    _assert_parity(_ours_value_and_grad(name, x, y), theirs, nonzero=name == "generalized")
