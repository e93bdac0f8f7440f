"""VICReg and Barlow Twins (mlx_jax.losses.non_contrastive) against loop-by-loop float64
references written from the papers' equations, the Barlow Twins paper's Algorithm 1 and official
code, pytorch-metric-learning's VICRegLoss, weighted statistics, degenerate batches and bad
input."""

from __future__ import annotations

import functools
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mlx_jax.losses.non_contrastive import barlow_twins_loss, vicreg_loss
from tests.helpers import check_grads_x64

# One batch shape (12 x 4) almost everywhere: eager JAX compiles each operation once per shape
# and dtype, so a shared shape keeps the file fast.
B, D = 12, 4
LOSSES = {"vicreg": vicreg_loss, "barlow": barlow_twins_loss}


def views(seed, batch=B, dim=D, noise=0.4):
    """Two float32 views [batch, dim] of one batch; dimensions of different scales, so some
    have std < 1 (VICReg's variance hinge active) and some > 1 (inactive), and correlated
    dimensions (non-zero covariances)."""
    rng = np.random.default_rng(seed)
    scales = np.resize([0.4, 1.6, 0.7, 1.2], dim)
    a = rng.normal(size=(batch, dim)) * scales
    a[:, -1] += 0.5 * a[:, 0]
    b = a + noise * rng.normal(size=(batch, dim))
    return a.astype(np.float32), b.astype(np.float32)


WEIGHTS = np.array([1.0, 0.5, 2.0, 0.0, 1.0, 3.0, 1.0, 0.0, 0.25, 1.0, 1.0, 1.5], np.float32)

# ---------------------------------------------------------------------------------------------
# References: the papers' formulas with explicit loops, float64, no code shared with the library.
# ---------------------------------------------------------------------------------------------


def _weights(n, weights):
    return [1.0] * n if weights is None else [float(w) for w in weights]


def reference_covariance(z, weights=None):
    """VICReg's Eq. 3, C = Σ_i w_i (z_i − z̄)(z_i − z̄)ᵀ / (W − Σ w_i² / W): with unit weights
    the 1/(n − 1) estimate."""
    z = np.asarray(z, np.float64)
    n, d = z.shape
    w = _weights(n, weights)
    total = sum(w)
    mean = [sum(w[i] * z[i, k] for i in range(n)) / total for k in range(d)]
    denominator = total - sum(x * x for x in w) / total
    cov = np.zeros((d, d))
    for k in range(d):
        for m in range(d):
            cov[k, m] = (
                sum(w[i] * (z[i, k] - mean[k]) * (z[i, m] - mean[m]) for i in range(n))
                / denominator
            )
    return cov


def reference_vicreg(
    a,
    b,
    invariance_weight=25.0,
    variance_weight=25.0,
    covariance_weight=1.0,
    target_std=1.0,
    eps=1e-4,
    weights=None,
):
    """Bardes et al. 2022, Eq. 1-6, with s(Z, Z') the mean over the n·d entries (Algorithm 1's
    mse_loss). Fewer than two samples: no variance or covariance term."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    n, d = a.shape
    w = _weights(n, weights)
    total = sum(w)
    if total == 0:
        return 0.0
    invariance = sum(w[i] * sum((a[i, k] - b[i, k]) ** 2 for k in range(d)) for i in range(n))
    loss = invariance_weight * invariance / (total * d)
    if sum(1 for x in w if x > 0) < 2:
        return loss
    for z in (a, b):
        cov = reference_covariance(z, w)
        variance = sum(max(0.0, target_std - math.sqrt(cov[j, j] + eps)) for j in range(d)) / d
        covariance = sum(cov[i, j] ** 2 for i in range(d) for j in range(d) if i != j) / d
        loss += variance_weight * variance + covariance_weight * covariance
    return loss


def reference_cross_correlation(a, b, eps=1e-5, weights=None):
    """Each view batch-normalized per dimension (biased variance + eps), then
    C_ij = Σ_b w_b â_bi b̂_bj / W."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    n, d = a.shape
    w = _weights(n, weights)
    total = sum(w)

    def normalized(z):
        out = np.zeros_like(z)
        for k in range(d):
            mean = sum(w[i] * z[i, k] for i in range(n)) / total
            var = sum(w[i] * (z[i, k] - mean) ** 2 for i in range(n)) / total
            if var + eps > 0:
                for i in range(n):
                    out[i, k] = (z[i, k] - mean) / math.sqrt(var + eps)
        return out

    za, zb = normalized(a), normalized(b)
    return np.array(
        [
            [sum(w[s] * za[s, i] * zb[s, j] for s in range(n)) / total for j in range(d)]
            for i in range(d)
        ]
    )


def barlow_from_correlation(c, off_diagonal_weight=5e-3):
    """Zbontar et al. 2021, Eq. 1."""
    d = len(c)
    on = sum((1.0 - c[i][i]) ** 2 for i in range(d))
    off = sum(c[i][j] ** 2 for i in range(d) for j in range(d) if i != j)
    return on + off_diagonal_weight * off


def reference_barlow(a, b, off_diagonal_weight=5e-3, eps=1e-5, weights=None):
    w = _weights(len(a), weights)
    if sum(1 for x in w if x > 0) < 2:
        return 0.0
    return barlow_from_correlation(
        reference_cross_correlation(a, b, eps, weights), off_diagonal_weight
    )


def pearson_cross_correlation(a, b):
    """Zbontar et al. 2021, Eq. 2 (cosine of the mean-centered columns): NumPy's corrcoef."""
    d = a.shape[1]
    full = np.corrcoef(np.asarray(a, np.float64).T, np.asarray(b, np.float64).T)
    return full[:d, d:]


def algorithm1_barlow(a, b, off_diagonal_weight=5e-3, ddof=1):
    """A line-by-line NumPy transcription of the Barlow Twins paper's Algorithm 1 (``z.std(0)``
    is torch's unbiased std: ``ddof=1``)."""
    z_a, z_b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    n, d = z_a.shape
    z_a_norm = (z_a - z_a.mean(0)) / z_a.std(0, ddof=ddof)
    z_b_norm = (z_b - z_b.mean(0)) / z_b.std(0, ddof=ddof)
    c = z_a_norm.T @ z_b_norm / n
    c_diff = (c - np.eye(d)) ** 2
    c_diff[~np.eye(d, dtype=bool)] *= off_diagonal_weight
    return c_diff.sum()


REFERENCES = {"vicreg": reference_vicreg, "barlow": reference_barlow}


@functools.cache
def _compiled(name, config):
    """Jitted value and gradients (w.r.t. both views) of one loss and hyperparameter set, with
    explicit weights; cached, so that each shape and dtype compiles once."""
    kwargs = dict(config)
    return jax.jit(
        jax.value_and_grad(lambda a, b, w: LOSSES[name](a, b, weights=w, **kwargs), argnums=(0, 1))
    )


def value_and_grads(name, a, b, weights=None, **kwargs):
    """The loss (and gradients) through :func:`_compiled`; weights None → ones (the same
    loss)."""
    a = jnp.asarray(a)
    w = jnp.ones(a.shape[0], a.dtype) if weights is None else jnp.asarray(weights, a.dtype)
    value, grads = _compiled(name, tuple(sorted(kwargs.items())))(a, jnp.asarray(b), w)
    assert np.isfinite(np.asarray(value))
    assert all(np.isfinite(np.asarray(g)).all() for g in grads)
    return value, grads


def loss(name, a, b, weights=None, **kwargs):
    return value_and_grads(name, a, b, weights, **kwargs)[0]


def f64(name, a, b, weights=None, **kwargs):
    """The loss in float64."""
    with jax.enable_x64(True):
        out = loss(name, np.asarray(a, np.float64), np.asarray(b, np.float64), weights, **kwargs)
        assert out.dtype == jnp.float64
        return float(out)


# ---------------------------------------------------------------------------------------------
# Values against the references
# ---------------------------------------------------------------------------------------------


def test_reference_covariance_is_numpy_cov_with_reliability_weights():
    a, _ = views(0)
    np.testing.assert_allclose(reference_covariance(a), np.cov(a.T.astype(np.float64)), rtol=1e-12)
    np.testing.assert_allclose(
        reference_covariance(a, WEIGHTS),
        np.cov(a.T.astype(np.float64), aweights=WEIGHTS),
        rtol=1e-12,
    )


VICREG_CONFIGS = [
    {},
    dict(
        invariance_weight=5.0, variance_weight=10.0, covariance_weight=2.0, target_std=1.5, eps=1e-3
    ),
]
BARLOW_CONFIGS = [{}, dict(eps=0.0)]  # off_diagonal_weight: test_traced_hyperparameters
CONFIGS = [("vicreg", c) for c in VICREG_CONFIGS] + [("barlow", c) for c in BARLOW_CONFIGS]


@pytest.mark.parametrize("name, kwargs", CONFIGS)
def test_matches_reference_float64_and_float32(name, kwargs):
    a, b = views(1)
    expected = REFERENCES[name](a, b, **kwargs)
    np.testing.assert_allclose(f64(name, a, b, **kwargs), expected, rtol=1e-10)
    value = loss(name, a, b, **kwargs)
    assert value.dtype == jnp.float32
    np.testing.assert_allclose(value, expected, rtol=1e-5)


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_weighted_statistics_match_reference_float64(name):
    a, b = views(2)
    np.testing.assert_allclose(
        f64(name, a, b, WEIGHTS), REFERENCES[name](a, b, weights=WEIGHTS), rtol=1e-10
    )


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_symmetric_in_the_views(name):
    a, b = views(3)
    np.testing.assert_allclose(loss(name, a, b, WEIGHTS), loss(name, b, a, WEIGHTS), rtol=1e-6)


def test_vicreg_invariance_is_algorithm1s_mse_not_eq5_as_printed():
    # Eq. 5 as printed, s = 1/n Σ ‖z_i − z'_i‖², is d times Algorithm 1's mse_loss(z_a, z_b),
    # the scale λ = 25 was chosen with and the one used here.
    a, b = views(4)
    eq5 = sum(np.sum((a[i].astype(np.float64) - b[i]) ** 2) for i in range(B)) / B
    invariance_only = f64("vicreg", a, b, variance_weight=0.0, covariance_weight=0.0)
    np.testing.assert_allclose(invariance_only * D, 25.0 * eq5, rtol=1e-12)


def test_barlow_eq2_is_the_pearson_correlation_and_eps_zero_is_eq2():
    a, b = views(5)
    np.testing.assert_allclose(
        reference_cross_correlation(a, b, eps=0.0), pearson_cross_correlation(a, b), rtol=1e-12
    )
    expected = barlow_from_correlation(pearson_cross_correlation(a, b))
    np.testing.assert_allclose(f64("barlow", a, b, eps=0.0), expected, rtol=1e-10)
    # the default ε = 1e-5 moves it only slightly at unit-scale variances
    default = f64("barlow", a, b)
    assert default != expected
    np.testing.assert_allclose(default, expected, rtol=1e-3)


def test_barlow_differs_from_algorithm1_by_its_unbiased_std():
    # Algorithm 1 divides by n after normalizing with the unbiased std: its C is (n − 1)/n
    # times Eq. 2's. With the biased std (ddof=0) it is Eq. 2.
    a, b = views(6)
    ours = f64("barlow", a, b, eps=0.0)
    np.testing.assert_allclose(algorithm1_barlow(a, b, ddof=0), ours, rtol=1e-10)
    assert abs(algorithm1_barlow(a, b) - ours) > 1e-3
    # Identical views: Eq. 2 has C_ii = 1, so ours is λ Σ_{i≠j} C_ij²; Algorithm 1 has
    # C = k·C_Eq2 with k = (n − 1)/n: Σ (1 − k)² = d/n² on the diagonal, k² times ours off it.
    k = (B - 1) / B
    same = f64("barlow", a, a, eps=0.0)
    np.testing.assert_allclose(algorithm1_barlow(a, a), D / B**2 + k**2 * same, rtol=1e-10)


# ---------------------------------------------------------------------------------------------
# Weights
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_zero_weight_is_removal_even_for_non_finite_padding(name):
    a, b = views(7)
    keep = WEIGHTS > 0
    removed = loss(name, a[keep], b[keep], WEIGHTS[keep])
    np.testing.assert_allclose(loss(name, a, b, WEIGHTS), removed, rtol=1e-6)
    a_pad, b_pad = a.copy(), b.copy()
    a_pad[~keep] = np.nan
    b_pad[~keep] = np.inf
    value, grads = value_and_grads(name, a_pad, b_pad, WEIGHTS)
    np.testing.assert_allclose(value, removed, rtol=1e-6)
    for grad in grads:
        np.testing.assert_array_equal(np.asarray(grad)[~keep], 0.0)
        assert np.abs(np.asarray(grad)[keep]).sum() > 0


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_weights_are_scale_invariant(name):
    a, b = views(8)
    np.testing.assert_allclose(
        loss(name, a, b, 3.7 * WEIGHTS), loss(name, a, b, WEIGHTS), rtol=1e-5
    )


def test_barlow_integer_weight_counts_the_sample_that_many_times():
    a, b = views(9)
    counts = np.array([1, 2, 0, 3, 1, 0, 1, 2, 1, 0, 1, 0])  # 12 rows repeated
    np.testing.assert_allclose(
        loss("barlow", a, b, counts),
        loss("barlow", np.repeat(a, counts, axis=0), np.repeat(b, counts, axis=0)),
        rtol=1e-5,
    )


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_only_mean_reduction(name):
    a, b = views(10)
    np.testing.assert_array_equal(LOSSES[name](a, b, reduction="mean"), LOSSES[name](a, b))
    for reduction in ("sum", "mean_nonzero", "none"):
        with pytest.raises(
            ValueError, match=r"reduction must be one of \['mean'\] \(a batch-level"
        ):
            LOSSES[name](a, b, reduction=reduction)


# ---------------------------------------------------------------------------------------------
# Degenerate batches: finite values and gradients, the documented values
# ---------------------------------------------------------------------------------------------


def _degenerate_cases():
    a, b = views(11)
    constant = a.copy(), b.copy()
    constant[0][:, 2] = 0.3
    constant[1][:, 2] = -1.7
    zeros = np.zeros((B, D), np.float32)
    collapsed = np.full((B, D), 0.3, np.float32)
    one = np.zeros(B, np.float32)
    one[4] = 2.0
    return {
        "single_sample": (a[:1], b[:1], None),
        "constant_dimension": (*constant, None),
        "zero_embeddings": (zeros, zeros, None),
        "collapsed": (collapsed, collapsed, None),
        "duplicate_views": (a, a, None),
        "all_weights_zero": (a, b, np.zeros(B, np.float32)),
        "one_positive_weight": (a, b, one),
    }


DEGENERATE = _degenerate_cases()


@pytest.mark.parametrize("case", sorted(DEGENERATE))
@pytest.mark.parametrize("name", sorted(LOSSES))
def test_degenerate_batches_are_finite_and_match_reference(name, case):
    a, b, w = DEGENERATE[case]
    value, _ = value_and_grads(name, a, b, w)  # asserts finite value and gradients
    atol = 1e-4 if case == "collapsed" else 1e-6  # rounding residue of the mean of equal values
    np.testing.assert_allclose(value, REFERENCES[name](a, b, weights=w), rtol=1e-5, atol=atol)


def test_degenerate_values_derived_by_hand():
    zeros, _, _ = DEGENERATE["zero_embeddings"]
    # VICReg: s = 0, c = 0, every std is √ε = 0.01: 2·μ·(1 − 0.01) = 49.5
    # Barlow: every normalized value is 0, so C = 0 and Σ_i (1 − 0)² = d
    for name, expected in [("vicreg", 49.5), ("barlow", float(D))]:
        value, grads = value_and_grads(name, zeros, zeros)
        np.testing.assert_allclose(value, expected, rtol=1e-6)
        for grad in grads:
            np.testing.assert_array_equal(grad, 0.0)
    # fewer than two samples: VICReg keeps λ·s only, Barlow has no correlation (0)
    a, b, _ = DEGENERATE["single_sample"]
    mse = np.mean((a[0].astype(np.float64) - b[0]) ** 2)
    np.testing.assert_allclose(loss("vicreg", a, b), 25.0 * mse, rtol=1e-6)
    value, grads = value_and_grads("barlow", a, b)
    assert value == 0.0
    for grad in grads:
        np.testing.assert_array_equal(grad, 0.0)
    # duplicate views: no invariance cost; Barlow (ε = 0) has C_ii = 1
    a, _, _ = DEGENERATE["duplicate_views"]
    np.testing.assert_allclose(
        loss("vicreg", a, a), reference_vicreg(a, a, invariance_weight=0.0), rtol=1e-5
    )
    c = pearson_cross_correlation(a, a)
    np.testing.assert_allclose(np.diag(c), 1.0, rtol=1e-12)
    np.testing.assert_allclose(loss("barlow", a, a, eps=0.0), barlow_from_correlation(c), rtol=1e-5)


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_all_weights_zero_gives_zero_with_zero_gradients(name):
    a, b, w = DEGENERATE["all_weights_zero"]
    value, grads = value_and_grads(name, a, b, w)
    assert value == 0.0
    for grad in grads:
        np.testing.assert_array_equal(grad, 0.0)


def test_barlow_constant_dimension():
    a, b, _ = DEGENERATE["constant_dimension"]  # dimension 2 constant in both views
    c = reference_cross_correlation(a, b)
    np.testing.assert_array_equal(c[2], 0.0)
    np.testing.assert_array_equal(c[:, 2], 0.0)
    # ε = 0 too: the zero-variance dimension is exactly 0, not its rounding residue blown up
    # to ±1, and guarded (0, not 0/0)
    np.testing.assert_allclose(
        loss("barlow", a, b, eps=0.0), reference_barlow(a, b, eps=0.0), rtol=1e-5
    )
    # one view collapsed in dimension 2: with ε > 0 the gradient pulls it towards the other
    # view's dimension 2 (∝ 1/√ε); at ε = 0 the 0/0 has zero gradient
    b = views(11)[1]
    _, grads = value_and_grads("barlow", a, b)
    assert np.abs(np.asarray(grads[0])[:, 2]).max() > 1.0
    _, grads = value_and_grads("barlow", a, b, eps=0.0)
    np.testing.assert_array_equal(np.asarray(grads[0])[:, 2], 0.0)


# ---------------------------------------------------------------------------------------------
# Gradients, jit, dtypes
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, kwargs", [("vicreg", dict(target_std=1.5)), ("barlow", dict(eps=0.5))]
)
def test_gradients_match_finite_differences(name, kwargs):
    a, b = views(12)
    if name == "barlow":
        a[:, 2] = 0.3  # a collapsed dimension in one view: its gradient is checked too
    check_grads_x64(
        jax.jit(lambda x, y: LOSSES[name](x, y, weights=WEIGHTS, **kwargs)), a, b, tol=1e-5
    )


class TestVariants(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_jit_and_eager_agree(self):
        a, b = views(13)
        for name, fn in LOSSES.items():
            value, grads = self.variant(
                jax.value_and_grad(lambda x, y, w, f=fn: f(x, y, weights=w), argnums=(0, 1))
            )(a, b, WEIGHTS)
            np.testing.assert_allclose(value, REFERENCES[name](a, b, weights=WEIGHTS), rtol=1e-5)
            _, expected = value_and_grads(name, a, b, WEIGHTS)
            for grad, ref in zip(grads, expected, strict=True):
                np.testing.assert_allclose(grad, ref, rtol=1e-4, atol=1e-6)


def test_traced_hyperparameters():
    a, b = views(14)
    vicreg = jax.jit(
        lambda x, y, lam, mu, nu, gamma, eps: vicreg_loss(
            x,
            y,
            invariance_weight=lam,
            variance_weight=mu,
            covariance_weight=nu,
            target_std=gamma,
            eps=eps,
        )
    )
    np.testing.assert_allclose(
        vicreg(a, b, 5.0, 10.0, 2.0, 1.5, 1e-3),
        reference_vicreg(a, b, 5.0, 10.0, 2.0, 1.5, 1e-3),
        rtol=1e-5,
    )
    barlow = jax.jit(
        lambda x, y, lam, eps: barlow_twins_loss(x, y, off_diagonal_weight=lam, eps=eps)
    )
    np.testing.assert_allclose(barlow(a, b, 0.1, 0.5), reference_barlow(a, b, 0.1, 0.5), rtol=1e-5)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("name", sorted(LOSSES))
def test_low_precision_inputs_compute_in_float32(name, dtype):
    a, b = views(15)
    low_a, low_b = jnp.asarray(a, dtype), jnp.asarray(b, dtype)
    # eager, sharing the float32 operations the eager variant of TestVariants compiles
    value, grads = jax.value_and_grad(
        lambda x, y: LOSSES[name](x, y, weights=WEIGHTS), argnums=(0, 1)
    )(low_a, low_b)
    assert value.dtype == jnp.float32
    for grad in grads:
        assert grad.dtype == dtype
        assert np.isfinite(np.asarray(grad, np.float32)).all()
    # exact on the rounded inputs
    rounded = (np.asarray(low_a, np.float64), np.asarray(low_b, np.float64))
    np.testing.assert_allclose(value, REFERENCES[name](*rounded, weights=WEIGHTS), rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# Bad input: errors naming the argument, at trace time
# ---------------------------------------------------------------------------------------------

X = np.ones((4, 2), np.float32)


@pytest.mark.parametrize("name", sorted(LOSSES))
@pytest.mark.parametrize(
    "args, kwargs, error, match",
    [
        (
            (X, np.ones((5, 2), np.float32)),
            {},
            ValueError,
            r"view_b must have the shape of view_a \[4, 2\]",
        ),
        (
            (X, np.ones((4, 3), np.float32)),
            {},
            ValueError,
            r"view_b must have the shape of view_a \[4, 2\]",
        ),
        ((np.ones(4, np.float32), X), {}, ValueError, r"view_a must have shape \[batch, dim\]"),
        (
            (X, np.ones((4, 2, 1), np.float32)),
            {},
            ValueError,
            r"view_b must have shape \[batch, dim\]",
        ),
        ((np.ones((4, 2), np.int32), X), {}, TypeError, r"view_a must be a floating-point array"),
        (
            (X, X),
            dict(weights=np.ones(3, np.float32)),
            ValueError,
            r"weights must have shape \[4\]",
        ),
        ((X, X), dict(reduction="none"), ValueError, r"reduction must be one of \['mean'\]"),
    ],
)
def test_bad_input_raises_at_trace_time(name, args, kwargs, error, match):
    with pytest.raises(error, match=match):
        jax.jit(lambda *a: LOSSES[name](*a, **kwargs)).lower(*args)


@pytest.mark.parametrize(
    "name, kwargs, match",
    [
        ("vicreg", dict(invariance_weight=-1.0), "invariance_weight must be >= 0"),
        ("vicreg", dict(variance_weight=-1.0), "variance_weight must be >= 0"),
        ("vicreg", dict(covariance_weight=-1.0), "covariance_weight must be >= 0"),
        ("vicreg", dict(target_std=-1.0), "target_std must be >= 0"),
        ("vicreg", dict(eps=0.0), "eps must be > 0"),
        ("barlow", dict(off_diagonal_weight=-1.0), "off_diagonal_weight must be >= 0"),
        ("barlow", dict(eps=-1e-5), "eps must be >= 0"),
    ],
)
def test_bad_hyperparameters_raise(name, kwargs, match):
    with pytest.raises(ValueError, match=match):
        LOSSES[name](X, X, **kwargs)


# ---------------------------------------------------------------------------------------------
# Parity: pytorch-metric-learning's VICRegLoss, the official Barlow Twins code, float64
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pml():
    torch = pytest.importorskip("torch", reason="parity tests need torch (pip install torch)")
    losses = pytest.importorskip(
        "pytorch_metric_learning.losses",
        reason="parity tests need pytorch-metric-learning (pip install .[parity])",
    )
    return torch, losses


def _torch_value_and_grads(torch, loss_fn, a, b):
    ta, tb = (torch.tensor(np.asarray(x, np.float64), requires_grad=True) for x in (a, b))
    loss = loss_fn(ta, tb)
    loss.backward()
    return float(loss.detach()), [ta.grad.numpy(), tb.grad.numpy()]


def _ours_value_and_grads(name, a, b, **kwargs):
    with jax.enable_x64(True):
        value, grads = value_and_grads(
            name, np.asarray(a, np.float64), np.asarray(b, np.float64), **kwargs
        )
        assert value.dtype == jnp.float64
        return float(value), [np.asarray(g) for g in grads]


def _assert_parity(ours, theirs):
    (value, grads), (ref_value, ref_grads) = ours, theirs
    assert ref_value != 0.0
    np.testing.assert_allclose(value, ref_value, rtol=1e-10)
    for grad, ref in zip(grads, ref_grads, strict=True):
        np.testing.assert_allclose(grad, ref, rtol=1e-8, atol=1e-10 * np.abs(ref).max())


def _parity_views():
    out = [views(seed) for seed in range(20, 23)]
    a, b = views(23)
    a[:, 1] = 0.25  # a constant dimension
    out.append((a, b))
    rng = np.random.default_rng(24)
    a = rng.normal(size=(9, 6)) * 2.0  # every std > 1: no variance cost
    out.append((a, a + 0.1 * rng.normal(size=(9, 6))))
    return out


PARITY_VIEWS = _parity_views()


@pytest.mark.parametrize("index", range(len(PARITY_VIEWS)))
def test_vicreg_with_half_variance_weight_matches_pml(pml, index):
    # PML (as the authors' released code) halves the variance term; see the docstring.
    torch, losses = pml
    a, b = PARITY_VIEWS[index]
    pml_loss = losses.VICRegLoss(invariance_lambda=25, variance_mu=25, covariance_v=1, eps=1e-4)
    theirs = _torch_value_and_grads(torch, lambda x, y: pml_loss(x, ref_emb=y), a, b)
    _assert_parity(_ours_value_and_grads("vicreg", a, b, variance_weight=12.5), theirs)


def test_vicreg_differs_from_pml_by_half_the_variance_term(pml):
    torch, losses = pml
    a, b = PARITY_VIEWS[0]
    theirs, _ = _torch_value_and_grads(torch, lambda x, y: losses.VICRegLoss()(x, ref_emb=y), a, b)
    ours = f64("vicreg", a, b)
    half_variance = f64(
        "vicreg", a, b, invariance_weight=0.0, variance_weight=12.5, covariance_weight=0.0
    )
    assert half_variance > 0.1
    np.testing.assert_allclose(ours - theirs, half_variance, rtol=1e-9)


def official_barlow_twins(torch, off_diagonal_weight=5e-3):
    """The official implementation's loss (facebookresearch/barlowtwins, main.py,
    ``BarlowTwins.forward`` after the projector, one process): BatchNorm1d(affine=False) in
    training mode, C = bn(z1)ᵀ bn(z2) / n."""

    def loss(z1, z2):
        n, d = z1.shape
        bn = torch.nn.BatchNorm1d(d, affine=False, dtype=torch.float64)
        c = bn(z1).T @ bn(z2)
        c = c / n
        on_diag = torch.diagonal(c).add(-1).pow(2).sum()
        off_diag = c.flatten()[:-1].view(d - 1, d + 1)[:, 1:].flatten().pow(2).sum()
        return on_diag + off_diagonal_weight * off_diag

    return loss


@pytest.mark.parametrize("index", range(len(PARITY_VIEWS)))
def test_barlow_matches_the_official_code(pml, index):
    torch, _ = pml
    a, b = PARITY_VIEWS[index]
    theirs = _torch_value_and_grads(torch, official_barlow_twins(torch), a, b)
    _assert_parity(_ours_value_and_grads("barlow", a, b), theirs)


def test_pml_has_no_barlow_twins_loss(pml):
    # if this fails, PML added one: add a parity test against it
    _, losses = pml
    assert not [name for name in dir(losses) if "barlow" in name.lower()]
