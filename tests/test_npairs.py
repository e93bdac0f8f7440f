"""N-pair loss (Sohn 2016) and angular loss (Wang et al. 2017), mlx_jax.losses.npairs: loop-by-loop
float64 references of the papers' formulas over both tuple constructions, the row-block forms,
degenerate batches, bad input, and parity with pytorch-metric-learning's NPairsLoss and
AngularLoss (value and gradient, float64)."""

from __future__ import annotations

import functools
import inspect
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mlx_jax.losses.npairs import angular_loss, npairs_loss
from tests.helpers import check_grads_x64, random_batch

# One batch shape (12 x 4) everywhere, smaller batches as zero-weight padding of it: each
# compiled function below is compiled once per dtype and shared by the tests. B = 12 > 8 also
# gives "all" two chunks of 8 positive slots, of which batches with classes of at most 8 run
# one.
B, D = 12, 4
REDUCTIONS = ("mean", "sum", "mean_nonzero", "none")
LOSSES = {"npairs": npairs_loss, "angular": angular_loss}

# ---------------------------------------------------------------------------------------------
# References: plain loops over tuples and negatives, float64, no code shared with the library.
# ---------------------------------------------------------------------------------------------


def reference_tuples(y, w, pairs):
    """[(anchor, positive, [negatives])] by the documented rule."""
    batch = len(y)
    valid = [w[i] > 0 for i in range(batch)]
    if pairs == "all":
        out = []
        for a in range(batch):
            for p in range(batch):
                if p != a and valid[a] and valid[p] and y[p] == y[a]:
                    negatives = [n for n in range(batch) if valid[n] and y[n] != y[a]]
                    out.append((a, p, negatives))
        return out
    first_two = {}
    for i in range(batch):  # batch order
        if valid[i]:
            members = first_two.setdefault(int(y[i]), [])
            if len(members) < 2:
                members.append(i)
    chosen = [members for members in first_two.values() if len(members) == 2]
    return [(a, p, [q for (_, q) in chosen if y[q] != y[a]]) for (a, p) in chosen]


def _log1p_sum_exp(exponents):
    """log(1 + Σ exp(z)) with the largest of 0 and the z factored out (no overflow)."""
    top = max([0.0, *exponents])
    return top + math.log(math.exp(-top) + sum(math.exp(z - top) for z in exponents))


def _reduce(y, w, pairs, reduction, tuple_loss):
    batch = len(y)
    w = np.ones(batch) if w is None else np.asarray(w, np.float64)
    total = weight = nonzero = 0.0
    unreduced = np.zeros((batch, batch))
    for a, p, negatives in reference_tuples(y, w, pairs):
        loss = tuple_loss(a, p, negatives)
        total += w[a] * loss
        weight += w[a]
        nonzero += w[a] if loss > 0 else 0.0
        unreduced[a, p] = w[a] * loss
    if reduction == "none":
        return unreduced
    if reduction == "sum":
        return total
    count = weight if reduction == "mean" else nonzero
    return total / count if count > 0 else 0.0


def _unit(x):
    x = np.asarray(x, np.float64)
    return x / np.maximum(np.sqrt(np.sum(x * x, axis=1, keepdims=True)), 1e-12)


def reference_npairs(
    x, y, normalize=True, l2_reg=0.0, pairs="one_per_class", weights=None, reduction="mean"
):
    """Sohn 2016, Eq. 3: log(1 + Σ_n exp(f_aᵀf_n − f_aᵀf_p)) + λ/4·(‖f_a‖² + ‖f_p‖²)."""
    raw = np.asarray(x, np.float64)
    f = _unit(raw) if normalize else raw

    def tuple_loss(a, p, negatives):
        exponents = [f[a] @ f[n] - f[a] @ f[p] for n in negatives]
        return _log1p_sum_exp(exponents) + l2_reg / 4 * (raw[a] @ raw[a] + raw[p] @ raw[p])

    return _reduce(y, weights, pairs, reduction, tuple_loss)


def reference_angular(x, y, alpha=40.0, pairs="all", weights=None, reduction="mean"):
    """Wang et al. 2017, Eq. 8, on L2-normalized a, p and n."""
    f = _unit(x)
    t2 = math.tan(math.radians(alpha)) ** 2

    def tuple_loss(a, p, negatives):
        return _log1p_sum_exp(
            [4 * t2 * (f[a] + f[p]) @ f[n] - 2 * (1 + t2) * f[a] @ f[p] for n in negatives]
        )

    return _reduce(y, weights, pairs, reduction, tuple_loss)


# The configurations compiled below: (loss, pairs, normalize) with the loss's hyperparameter
# (alpha or l2_reg) a traced argument.
NPAIRS = ("npairs", "one_per_class", True)
NPAIRS_RAW_ALL = ("npairs", "all", False)
ANGULAR = ("angular", "all", None)
ANGULAR_ONE = ("angular", "one_per_class", None)
CONFIGS = (NPAIRS, NPAIRS_RAW_ALL, ANGULAR, ANGULAR_ONE)
DEFAULT_HYPER = {"npairs": 0.0, "angular": 40.0}


def _call(config, x, y, w, hyper, reduction, block_size=None):
    name, pairs, normalize = config
    if name == "npairs":
        options = dict(normalize=normalize, l2_reg=hyper)
    else:
        options = dict(alpha=hyper)
    return LOSSES[name](
        x, y, pairs=pairs, weights=w, reduction=reduction, block_size=block_size, **options
    )


def reference(config, x, y, w=None, hyper=None, reduction="mean"):
    name, pairs, normalize = config
    hyper = DEFAULT_HYPER[name] if hyper is None else hyper
    if name == "npairs":
        return reference_npairs(x, y, normalize, hyper, pairs, w, reduction)
    return reference_angular(x, y, hyper, pairs, w, reduction)


@functools.cache
def compiled(config, block_size=None, reductions=REDUCTIONS, grad=True):
    """(x, y, w, hyper) → {reduction: value} and "grad": ∇ of the first reduction's loss."""

    def run(x, y, w, hyper):
        out = {r: _call(config, x, y, w, hyper, r, block_size) for r in reductions}
        if grad:
            loss = functools.partial(_call, config, y=y, w=w, hyper=hyper, block_size=block_size)
            out["grad"] = jax.grad(lambda e: loss(x=e, reduction=reductions[0]))(x)
        return out

    return jax.jit(run)


def evaluate(config, x, y, w=None, hyper=None, block_size=None, reductions=REDUCTIONS, grad=True):
    name = config[0]
    w = np.ones(B, np.float32) if w is None else np.asarray(w, np.float32)
    hyper = DEFAULT_HYPER[name] if hyper is None else hyper
    fn = compiled(config, block_size, reductions, grad)
    return fn(np.asarray(x, np.float32), np.asarray(y, np.int32), w, np.float32(hyper))


@functools.cache
def compiled_x64(config):
    """float64 (x, y, w, hyper) → (value, grad) of the "mean" loss."""
    return jax.jit(jax.value_and_grad(lambda x, y, w, h: _call(config, x, y, w, h, "mean")))


def evaluate_x64(config, x, y, w=None, hyper=None):
    name = config[0]
    w = np.ones(B) if w is None else np.asarray(w, np.float64)
    hyper = DEFAULT_HYPER[name] if hyper is None else hyper
    with jax.enable_x64(True):
        fn = compiled_x64(config)
        value, grad = fn(jnp.asarray(x, jnp.float64), np.asarray(y, np.int32), w, np.float64(hyper))
        assert value.dtype == jnp.float64
    return float(value), np.asarray(grad)


def batch(seed, classes=3, scale=1.0):
    """A 12 x 4 float32 batch in shuffled class order with one singleton class (no tuple)."""
    x, y = random_batch(seed, batch=B, dim=D, classes=classes, scale=scale)
    y = y.copy()
    y[5] = classes + 2
    return x, y


def padded(x, y):
    """A smaller batch as the first rows of a 12 x 4 batch whose other rows have weight 0
    (exact: a zero weight removes a sample)."""
    x = np.asarray(x, np.float32)
    rows, dim = x.shape
    big = np.random.default_rng(99).normal(size=(B, D)).astype(np.float32)
    big[:rows] = 0.0
    big[:rows, :dim] = x
    labels = np.concatenate([y, np.arange(B - rows) % 2]).astype(np.int32)
    w = np.concatenate([np.ones(rows), np.zeros(B - rows)]).astype(np.float32)
    return big, labels, w


# ---------------------------------------------------------------------------------------------
# The construction and the formulas, by hand
# ---------------------------------------------------------------------------------------------


def test_reference_eq8_is_the_angular_hinge_on_the_unit_sphere():
    # ‖x_a − x_p‖² − 4·tan²α·‖x_n − x_c‖² = Eq. 8's exponent + 2 − 6·tan²α for unit vectors
    x = _unit(np.random.default_rng(0).normal(size=(3, 5)))
    a, p, n = x
    t2 = math.tan(math.radians(40.0)) ** 2
    hinge = np.sum((a - p) ** 2) - 4 * t2 * np.sum((n - (a + p) / 2) ** 2)
    exponent = 4 * t2 * (a + p) @ n - 2 * (1 + t2) * a @ p
    np.testing.assert_allclose(hinge, exponent + 2 - 6 * t2, rtol=1e-12)


def test_values_by_hand():
    e1, e2 = [1.0, 0.0], [0.0, 1.0]
    x, y, w = padded(np.array([e1, e1, e2, e2]), np.array([0, 0, 1, 1]))
    # N-pair, raw dot products: tuples (0, 1), (2, 3) with the other one's positive as the
    # negative; ℓ = log(1 + exp(0 − 1)) for both, and with λ = 0.1: + 0.1/4·(1 + 1)
    raw = evaluate(NPAIRS_RAW_ALL, x, y, w, hyper=0.1)
    # "all": (0, 1), (1, 0), (2, 3), (3, 2), each with two negatives
    np.testing.assert_allclose(raw["mean"], math.log1p(2 * math.exp(-1)) + 0.05, rtol=1e-6)
    np.testing.assert_allclose(
        evaluate(NPAIRS, x, y, w)["mean"], math.log1p(math.exp(-1)), rtol=1e-6
    )
    # angular, α = 45° (tan² = 1): z = 4·0 − 4·1 = −4 per negative; "all": 4 tuples with
    # 2 negatives each, "one_per_class": 2 tuples with 1 negative each
    np.testing.assert_allclose(
        evaluate(ANGULAR, x, y, w, hyper=45.0)["mean"], math.log1p(2 * math.exp(-4)), rtol=1e-6
    )
    np.testing.assert_allclose(
        evaluate(ANGULAR_ONE, x, y, w, hyper=45.0)["sum"], 2 * math.log1p(math.exp(-4)), rtol=1e-6
    )


def test_one_per_class_takes_the_first_two_of_each_class_in_batch_order():
    x, _ = batch(1)
    y = np.array([2, 0, 2, 1, 0, 2, 0, 1, 3, 2, 5, 5], np.int32)

    def tuples(w=None):
        terms = np.asarray(evaluate(NPAIRS, x, y, w)["none"])
        return {(int(a), int(p)) for a, p in np.argwhere(terms != 0)}

    # class 2: (0, 2); class 0: (1, 4); class 1: (3, 7); class 3: none; class 5: (10, 11)
    assert tuples() == {(0, 2), (1, 4), (3, 7), (10, 11)}
    # a zero weight moves the selection on: class 2 becomes (2, 5)
    w = np.ones(B)
    w[0] = 0.0
    assert tuples(w) == {(2, 5), (1, 4), (3, 7), (10, 11)}


def test_defaults():
    # npairs: PML's NPairsLoss() (normalized, no regularizer, one pair per class);
    # angular: PML's AngularLoss(alpha=40), every positive pair
    defaults = {
        name: {k: p.default for k, p in inspect.signature(fn).parameters.items()}
        for name, fn in LOSSES.items()
    }
    assert defaults["npairs"]["normalize"] is True
    assert defaults["npairs"]["l2_reg"] == 0.0
    assert defaults["npairs"]["pairs"] == "one_per_class"
    assert defaults["angular"]["alpha"] == 40.0
    assert defaults["angular"]["pairs"] == "all"


# ---------------------------------------------------------------------------------------------
# Values against the references
# ---------------------------------------------------------------------------------------------

WEIGHTS = np.array([1, 2, 0.5, 1, 0, 1, 3, 1, 1, 0.25, 1, 1])


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: "-".join(map(str, c)))
def test_matches_reference_float32(config):
    x, y = batch(2, scale=0.8)
    hyper = {"npairs": 0.1, "angular": 50.0}[config[0]]
    for w in (None, WEIGHTS):
        out = evaluate(config, x, y, w, hyper)
        for reduction in REDUCTIONS:
            assert out[reduction].dtype == jnp.float32
            expected = reference(config, x, y, w, hyper, reduction)
            np.testing.assert_allclose(out[reduction], expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("config", [NPAIRS, ANGULAR], ids=lambda c: c[0])
def test_zero_weight_is_removal(config):
    # the first members of classes drop out, so the one-per-class selection moves on
    x, y = batch(3)
    keep = np.ones(B, bool)
    keep[[0, 3, 7]] = False
    out = evaluate(config, x, y, keep)
    for reduction in ("mean", "sum"):
        expected = reference(config, x[keep], y[keep], reduction=reduction)
        np.testing.assert_allclose(out[reduction], expected, rtol=1e-5)
    assert np.all(np.asarray(out["grad"])[~keep] == 0.0)


def test_matches_reference_float64():
    x, y = batch(4, scale=1.5)
    for config, hyper in [(NPAIRS, 0.0), (("npairs", "one_per_class", False), 0.3), (ANGULAR, 35)]:
        value, _ = evaluate_x64(config, x, y, WEIGHTS, hyper)
        np.testing.assert_allclose(value, reference(config, x, y, WEIGHTS, hyper), rtol=1e-10)


def test_classes_larger_than_one_chunk_of_positives():
    # a class of 9 (8 positives per anchor, itself in a slot too: two chunks of 8 slots)
    x, _ = batch(5)
    y = np.array([0, 0, 1, 0, 0, 0, 1, 0, 0, 0, 1, 0], np.int32)
    for config in (ANGULAR, NPAIRS_RAW_ALL):
        np.testing.assert_allclose(
            evaluate(config, x, y)["mean"], reference(config, x, y), rtol=1e-5
        )


def test_large_logits_do_not_overflow_in_float32():
    # raw dot products of norm-30 embeddings (logits ~ ±900), and α = 89° (tan²α ≈ 3282)
    x, y = batch(6, scale=15.0)
    for config, hyper in [(NPAIRS_RAW_ALL, 0.0), (ANGULAR, 89.0)]:
        out = evaluate(config, x, y, hyper=hyper)
        expected = reference(config, x, y, hyper=hyper)
        assert expected > 10.0
        np.testing.assert_allclose(out["mean"], expected, rtol=1e-4)
        assert np.isfinite(np.asarray(out["grad"])).all()


# ---------------------------------------------------------------------------------------------
# Gradients, jit, blocks, dtypes
# ---------------------------------------------------------------------------------------------


def test_gradient_matches_finite_differences():
    x, y = batch(7, scale=0.7)
    loss = jax.jit(
        lambda e: angular_loss(
            e, y, alpha=50.0, pairs="one_per_class", weights=WEIGHTS, reduction="sum"
        )
    )
    check_grads_x64(loss, x, tol=1e-5)


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: "-".join(map(str, c)))
def test_gradients_match_differences_of_the_reference(config):
    # float32 gradients against central differences of the float64 reference
    x, y = batch(8, scale=0.7)
    hyper = {"npairs": 0.1, "angular": 50.0}[config[0]]
    grad = np.asarray(evaluate(config, x, y, WEIGHTS, hyper)["grad"])
    x = x.astype(np.float64)
    step = 1e-6
    numeric = np.zeros_like(x)
    for index in np.ndindex(*x.shape):
        up, down = x.copy(), x.copy()
        up[index] += step
        down[index] -= step
        numeric[index] = (
            reference(config, up, y, WEIGHTS, hyper) - reference(config, down, y, WEIGHTS, hyper)
        ) / (2 * step)
    assert np.abs(numeric).max() > 1e-3
    np.testing.assert_allclose(grad, numeric, rtol=1e-3, atol=1e-5 * np.abs(numeric).max())


def test_eager_equals_jit_with_default_keywords():
    # one loss only: eager JAX compiles every operation on its own (seconds for a loss)
    x, y = batch(9)
    eager = angular_loss(x, y)
    np.testing.assert_allclose(eager, evaluate(ANGULAR, x, y)["mean"], rtol=1e-6)
    np.testing.assert_allclose(eager, reference(ANGULAR, x, y), rtol=1e-5)


@pytest.mark.parametrize("config", [NPAIRS, ANGULAR], ids=lambda c: c[0])
def test_blocks_give_the_same_values_and_gradients(config):
    # blocks of 5 rows (the last one padded): the per-row tuples and the padding of the row
    # arguments; for "all", a class of 9 makes the positive slots run in two chunks of 8,
    # rematerialised inside the blocks' rematerialisation. The gradients are compared for the
    # angular loss, whose chunks are the part that is rematerialised.
    x, _ = batch(10)
    y = np.array([1, 0, 0, 0, 2, 0, 0, 1, 0, 0, 0, 0], np.int32)
    w = np.ones(B)
    w[[2, 9]] = [0.0, 2.5]
    reductions = ("mean", "none")  # the gradient: of "mean"
    with_grad = config[0] == "angular"
    blocks = evaluate(config, x, y, w, block_size=5, reductions=reductions, grad=with_grad)
    dense = evaluate(config, x, y, w)
    for reduction in reductions:
        expected = reference(config, x, y, w, None, reduction)
        np.testing.assert_allclose(blocks[reduction], dense[reduction], rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(blocks[reduction], expected, rtol=1e-5, atol=1e-7)
    if with_grad:
        scale = np.abs(dense["grad"]).max()
        assert scale > 0
        np.testing.assert_allclose(blocks["grad"], dense["grad"], rtol=1e-4, atol=1e-6 * scale)


@pytest.mark.parametrize(
    "config, dtype", [(NPAIRS, jnp.float16), (ANGULAR_ONE, jnp.bfloat16)], ids=["f16", "bf16"]
)
def test_low_precision_inputs_compute_in_float32(config, dtype):
    name, pairs, _ = config
    x, y = batch(11)
    low = jnp.asarray(x, dtype)
    value, grad = jax.jit(jax.value_and_grad(lambda e: LOSSES[name](e, y, pairs=pairs)))(low)
    assert value.dtype == jnp.float32
    assert grad.dtype == dtype
    assert np.isfinite(np.asarray(grad, np.float32)).all()
    # exact on the rounded inputs, close to the float32 loss of the unrounded ones
    np.testing.assert_allclose(value, reference(config, np.asarray(low, np.float64), y), rtol=1e-5)
    np.testing.assert_allclose(value, reference(config, x, y), rtol=2e-2)


# ---------------------------------------------------------------------------------------------
# Degenerate batches
# ---------------------------------------------------------------------------------------------

_rng = np.random.default_rng(13)
DEGENERATE = {
    # (embeddings, labels, weights); None: all ones
    "one_class": (_rng.normal(size=(B, D)), np.zeros(B, np.int32), None),
    "singletons": (_rng.normal(size=(B, D)), np.arange(B, dtype=np.int32), None),
    "zero_vectors": (np.zeros((B, D)), np.arange(B, dtype=np.int32) % 3, None),
    "duplicates": (np.ones((B, D)), np.arange(B, dtype=np.int32) % 3, None),
    "zero_vector_in_batch": (
        np.concatenate([np.zeros((1, D)), _rng.normal(size=(B - 1, D))]),
        np.arange(B, dtype=np.int32) % 3,
        None,
    ),
    "all_weights_zero": (_rng.normal(size=(B, D)), np.arange(B, dtype=np.int32) % 3, np.zeros(B)),
    "single_sample": padded(np.ones((1, D)), np.zeros(1, np.int32)),
}
NO_TERM = {"one_class", "singletons", "all_weights_zero", "single_sample"}


@pytest.mark.parametrize("case", sorted(DEGENERATE))
def test_degenerate_batches_are_finite_and_match_reference(case):
    x, y, w = DEGENERATE[case]
    for config in CONFIGS:
        out = evaluate(config, x, y, w)
        assert np.isfinite(np.asarray(out["grad"])).all()
        for reduction in REDUCTIONS:
            expected = reference(config, x, y, w, reduction=reduction)
            np.testing.assert_allclose(out[reduction], expected, rtol=1e-5, atol=1e-6)
        if case in NO_TERM:
            # no tuple, or tuples without negatives: 0 with zero gradients
            assert out["mean"] == 0.0
            np.testing.assert_array_equal(out["grad"], 0.0)


def test_one_class_regularizer_only():
    x, y, _ = DEGENERATE["one_class"]
    # every pair is a tuple without negatives: λ/4·(‖f_a‖² + ‖f_p‖²) only
    out = evaluate(NPAIRS_RAW_ALL, x, y, hyper=0.5)
    np.testing.assert_allclose(out["mean"], reference(NPAIRS_RAW_ALL, x, y, hyper=0.5), rtol=1e-6)
    assert out["mean"] > 0.0


# ---------------------------------------------------------------------------------------------
# Bad input: errors naming the argument, at trace time
# ---------------------------------------------------------------------------------------------

X = np.ones((4, 2), np.float32)
Y = np.zeros(4, np.int32)
COMMON_BAD = [
    ((np.ones((4,), np.float32), Y), {}, ValueError, r"embeddings must have shape \[batch"),
    ((X, np.zeros(3, np.int32)), {}, ValueError, r"labels must have shape \[4\]"),
    ((X, np.zeros(4, np.float32)), {}, TypeError, "labels must be an integer"),
    ((X, Y), dict(weights=np.ones(3, np.float32)), ValueError, r"weights must have shape"),
    ((X, Y), dict(pairs="every"), ValueError, "pairs must be one of"),
    ((X, Y), dict(reduction="avg"), ValueError, "reduction must be one of"),
    ((X, Y), dict(block_size=0), ValueError, "block_size must be >= 1"),
]
BAD = [(name, *case) for name in sorted(LOSSES) for case in COMMON_BAD] + [
    ("npairs", (X, Y), dict(l2_reg=-0.1), ValueError, "l2_reg must be >= 0"),
    ("npairs", (X, Y), dict(normalize=1), TypeError, "normalize must be a bool"),
    *[
        ("angular", (X, Y), dict(alpha=alpha), ValueError, r"alpha must be in \(0, 90\) degrees")
        for alpha in (0.0, 90.0, -10.0, 120.0, float("nan"))
    ],
]


@pytest.mark.parametrize("name, args, kwargs, error, match", BAD)
def test_bad_input_raises_at_trace_time(name, args, kwargs, error, match):
    with pytest.raises(error, match=match):
        jax.jit(lambda *a: LOSSES[name](*a, **kwargs)).lower(*args)


# ---------------------------------------------------------------------------------------------
# Parity with pytorch-metric-learning, float64
# ---------------------------------------------------------------------------------------------


def _parity_batches():
    """Random batches with classes of 1 to 7 samples in shuffled order, a PK batch of 4 per
    class, and near-duplicate hard negatives."""
    rng = np.random.default_rng(20)
    out = [(rng.normal(size=(B, D)) * 1.5, rng.integers(0, 4, B).astype(np.int32)) for _ in "ab"]
    pk = np.repeat(np.arange(3), 4)[rng.permutation(B)].astype(np.int32)
    out.append((rng.normal(size=(B, D)), pk))
    centre = rng.normal(size=(1, D))
    out.append((centre + 0.05 * rng.normal(size=(B, D)), (np.arange(B) % 5).astype(np.int32)))
    return out


PARITY_BATCHES = _parity_batches()


@pytest.fixture(scope="module")
def pml():
    torch = pytest.importorskip("torch", reason="parity tests need torch (pip install torch)")
    losses = pytest.importorskip(
        "pytorch_metric_learning.losses",
        reason="parity tests need pytorch-metric-learning (pip install .[parity])",
    )
    from pytorch_metric_learning.distances import DotProductSimilarity
    from pytorch_metric_learning.regularizers import LpRegularizer

    return torch, losses, DotProductSimilarity, LpRegularizer


def _pml_value_and_grad(torch, loss_fn, x, y, normalize_first=False):
    t = torch.tensor(x, dtype=torch.float64, requires_grad=True)
    inputs = torch.nn.functional.normalize(t) if normalize_first else t
    loss = loss_fn(inputs, torch.tensor(y, dtype=torch.int64))
    loss.backward()
    return float(loss.detach()), t.grad.numpy()


def _assert_parity(ours, theirs):
    (value, grad), (ref_value, ref_grad) = ours, theirs
    assert ref_value != 0.0  # a meaningful comparison
    np.testing.assert_allclose(value, ref_value, rtol=1e-10)
    np.testing.assert_allclose(grad, ref_grad, rtol=1e-8, atol=1e-10 * np.abs(ref_grad).max())


@pytest.mark.parametrize("index", range(len(PARITY_BATCHES)))
def test_npairs_matches_pml(pml, index):
    torch, losses, dot_product, _ = pml
    x, y = PARITY_BATCHES[index]
    theirs = _pml_value_and_grad(torch, losses.NPairsLoss(), x, y)
    _assert_parity(evaluate_x64(NPAIRS, x, y), theirs)
    # Sohn's raw dot products: PML with an unnormalized DotProductSimilarity
    raw = losses.NPairsLoss(distance=dot_product(normalize_embeddings=False))
    ours = evaluate_x64(("npairs", "one_per_class", False), x, y)
    _assert_parity(ours, _pml_value_and_grad(torch, raw, x, y))


@pytest.mark.parametrize("seed", [0, 1])
def test_npairs_regularizer_matches_pml_on_n_pair_batches(pml, seed):
    # two samples per class: the tuples hold every sample, and PML's λ/2 · mean ‖f‖² over the
    # batch is λ/4·(mean ‖f_a‖² + mean ‖f_p‖²)
    torch, losses, dot_product, lp = pml
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(B, D)) * 3.0
    y = np.repeat(np.arange(B // 2), 2)[rng.permutation(B)].astype(np.int32)
    theirs = losses.NPairsLoss(
        distance=dot_product(normalize_embeddings=False),
        embedding_regularizer=lp(power=2),
        embedding_reg_weight=0.002 / 2,
    )
    ours = evaluate_x64(("npairs", "one_per_class", False), x, y, hyper=0.002)
    _assert_parity(ours, _pml_value_and_grad(torch, theirs, x, y))


@pytest.mark.parametrize("index", range(len(PARITY_BATCHES)))
def test_angular_matches_pml_on_normalized_inputs(pml, index):
    torch, losses, _, _ = pml
    x, y = PARITY_BATCHES[index]
    for alpha in (40.0, 30.0):
        theirs = _pml_value_and_grad(torch, losses.AngularLoss(alpha=alpha), x, y, True)
        _assert_parity(evaluate_x64(ANGULAR, x, y, hyper=alpha), theirs)


def test_angular_differs_from_pml_where_pml_leaves_negatives_unnormalized(pml):
    # PML normalizes the anchors and positives but takes the raw embeddings as x_n
    torch, losses, _, _ = pml
    x, y = PARITY_BATCHES[0]
    theirs, _ = _pml_value_and_grad(torch, losses.AngularLoss(alpha=40), x, y)
    f = _unit(x)
    t2 = math.tan(math.radians(40.0)) ** 2
    pml_form = np.mean(
        [
            _log1p_sum_exp(
                [4 * t2 * (f[a] + f[p]) @ x[n] - 2 * (1 + t2) * f[a] @ f[p] for n in negatives]
            )
            for a, p, negatives in reference_tuples(y, np.ones(B), "all")
        ]
    )
    np.testing.assert_allclose(theirs, pml_form, rtol=1e-10)
    ours, _ = evaluate_x64(ANGULAR, x, y)
    np.testing.assert_allclose(ours, reference_angular(x, y), rtol=1e-10)
    assert abs(ours - theirs) > 1e-2 * abs(theirs)
