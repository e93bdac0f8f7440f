import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mlx_jax import distances
from mlx_jax.distances import (
    UnsupportedMetricError,
    all_pairs_squared_euclidean,
    check_metric,
    pairwise_distances,
    ranking_scores,
    safe_sqrt,
    squared_euclidean,
)
from tests.helpers import assert_finite_value_and_grad, check_grads_x64


def reference(x, y, metric):
    out = np.zeros((len(x), len(y)))
    for i in range(len(x)):
        for j in range(len(y)):
            a, b = np.asarray(x[i], np.float64), np.asarray(y[j], np.float64)
            if metric == "cosine":
                na, nb = np.linalg.norm(a), np.linalg.norm(b)
                out[i, j] = a @ b / (max(na, 1e-12) * max(nb, 1e-12))
            else:
                d2 = np.sum((a - b) ** 2)
                out[i, j] = d2 if metric == "squared_euclidean" else np.sqrt(d2)
    return out


METRICS = ["squared_euclidean", "euclidean", "cosine"]


@pytest.mark.parametrize("metric", METRICS)
def test_matches_reference(metric):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(7, 5)).astype(np.float32)
    y = rng.normal(size=(4, 5)).astype(np.float32)
    np.testing.assert_allclose(
        pairwise_distances(x, y, metric=metric), reference(x, y, metric), rtol=1e-5, atol=1e-5
    )
    np.testing.assert_allclose(
        pairwise_distances(x, metric=metric), reference(x, x, metric), rtol=1e-5, atol=1e-5
    )


def test_self_distance_diagonal_is_exactly_zero():
    x = np.random.default_rng(1).normal(size=(9, 3)).astype(np.float32) * 100
    for metric in ["squared_euclidean", "euclidean"]:
        assert np.all(np.diag(np.asarray(pairwise_distances(x, metric=metric))) == 0.0)


def test_clamped_non_negative_for_near_duplicates():
    x = np.ones((4, 16), np.float32) * 1000
    x[1] += 1e-4
    d = np.asarray(pairwise_distances(x, x + 0.0, metric="squared_euclidean"))
    assert (d >= 0).all()


@pytest.mark.parametrize("metric", METRICS)
def test_gradients(metric):
    x = np.random.default_rng(2).normal(size=(5, 3))
    check_grads_x64(lambda a: jnp.sum(jnp.sin(pairwise_distances(a, metric=metric))), x)


@pytest.mark.parametrize("metric", METRICS)
def test_zero_and_duplicate_rows_have_finite_gradients(metric):
    x = np.zeros((4, 3), np.float32)
    x[2] = x[3] = 1.0
    assert_finite_value_and_grad(lambda a: jnp.sum(pairwise_distances(a, metric=metric)), x)
    assert_finite_value_and_grad(
        lambda a: jnp.sum(pairwise_distances(a, a[::-1], metric=metric)), x
    )


def test_cosine_of_zero_vector_is_zero():
    x = np.array([[0.0, 0.0], [1.0, 0.0]], np.float32)
    s = np.asarray(pairwise_distances(x, metric="cosine"))
    np.testing.assert_allclose(s, [[0.0, 0.0], [0.0, 1.0]], atol=1e-7)


class TestVariants(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_jit_and_eager_agree(self):
        x = np.random.default_rng(3).normal(size=(6, 4)).astype(np.float32)
        for metric in METRICS:
            out = self.variant(lambda a, m=metric: pairwise_distances(a, metric=m))(x)
            np.testing.assert_allclose(out, reference(x, x, metric), rtol=1e-5, atol=1e-5)


def test_bfloat16_input_computes_in_float32():
    x = jnp.ones((3, 2), jnp.bfloat16)
    assert pairwise_distances(x).dtype == jnp.float32


def test_default_metric_is_euclidean():
    x = np.array([[0.0, 0.0], [3.0, 4.0]], np.float32)
    np.testing.assert_allclose(pairwise_distances(x), [[0.0, 5.0], [5.0, 0.0]], atol=1e-6)


def test_ranking_scores_order_like_the_metric():
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=(5, 4)).astype(np.float32), rng.normal(size=(7, 4)).astype(np.float32)
    for metric in METRICS:
        scores = np.asarray(ranking_scores(x, y, metric=metric))
        d = reference(x, y, metric)
        expected = np.argsort(-d if metric == "cosine" else d, axis=1, kind="stable")
        np.testing.assert_array_equal(np.argsort(scores, axis=1, kind="stable"), expected)
    np.testing.assert_allclose(
        ranking_scores(x, y), reference(x, y, "squared_euclidean"), rtol=1e-5
    )


def test_unsupported_metric_error_names_the_supported_subset():
    assert check_metric("cosine") == "cosine"
    with pytest.raises(UnsupportedMetricError, match=r"\['cosine'\] for f, got 'euclidean'"):
        check_metric("euclidean", ("cosine",), "f")
    assert issubclass(UnsupportedMetricError, ValueError)


def test_bad_input():
    x = np.ones((3, 2), np.float32)
    with pytest.raises(UnsupportedMetricError, match="metric must be one of"):
        pairwise_distances(x, metric="manhattan")
    with pytest.raises(ValueError, match=r"y must have shape \[M, 2\]"):
        jax.jit(pairwise_distances).lower(x, np.ones((3, 4), np.float32))
    with pytest.raises(ValueError, match=r"x must have shape \[batch, dim\]"):
        jax.jit(pairwise_distances).lower(np.ones(3, np.float32))
    with pytest.raises(TypeError, match="x must be a floating-point array"):
        pairwise_distances(np.ones((3, 2), np.int32))


def test_float32_accuracy_for_close_points_far_from_the_origin():
    """Two samples 0.03 apart at norm ~50 (2-D features of a trained LeNet++)."""
    rng = np.random.default_rng(5)
    base = rng.normal(size=(16, 2)) * 50
    x = np.concatenate([base, base + rng.normal(size=(16, 2)) * 0.03]).astype(np.float32)
    exact = reference(x, x, "squared_euclidean")
    off_diagonal = ~np.eye(32, dtype=bool)
    for method, rtol in [("auto", 1e-4), ("difference", 1e-4)]:
        got = np.asarray(pairwise_distances(x, metric="squared_euclidean", method=method))
        np.testing.assert_allclose(got[off_diagonal], exact[off_diagonal], rtol=rtol, atol=1e-6)
    # The matmul form is centred first; it stays within eps·‖x − mean‖² of the truth.
    got = np.asarray(pairwise_distances(x, metric="squared_euclidean", method="matmul"))
    spread = np.max(np.sum((x - x.mean(0)) ** 2, axis=1))
    assert np.max(np.abs(got - exact)) <= 8 * np.finfo(np.float32).eps * spread


def test_matmul_and_difference_agree_on_well_separated_points():
    # Distinct points only: for x_i = y_j the matmul form's cancellation leaves up to
    # ~sqrt(eps·‖x‖²) ≈ 1e-3 (jax 0.12 gives 9.8e-4 on the diagonal), which is what "difference"
    # is for.
    x = np.random.default_rng(6).normal(size=(20, 7)).astype(np.float32)
    a = pairwise_distances(x[5:], x[:5], metric="euclidean", method="matmul")
    b = pairwise_distances(x[5:], x[:5], metric="euclidean", method="difference")
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


# all_pairs_squared_euclidean: the losses' dense distance matrix with a hand-written VJP.


def _weighted_sum(matrix_fn, weights):
    return lambda a: jnp.sum(jnp.sin(matrix_fn(a)) * weights)


@pytest.mark.parametrize("method", ["matmul", "difference"])
def test_all_pairs_squared_matches_reference_and_autodiff(method):
    rng = np.random.default_rng(7)
    x = rng.normal(size=(24, 6)).astype(np.float32)
    # A non-symmetric cotangent: (i, j) and (j, i) must both reach x_i and x_j.
    weights = jnp.asarray(rng.uniform(size=(24, 24)), jnp.float32)
    got = all_pairs_squared_euclidean(x, method=method)
    np.testing.assert_allclose(got, reference(x, x, "squared_euclidean"), rtol=1e-5, atol=1e-5)
    assert np.all(np.diag(np.asarray(got)) == 0.0)
    ours = jax.grad(_weighted_sum(lambda a: all_pairs_squared_euclidean(a, method=method), weights))
    autodiff = jax.grad(_weighted_sum(lambda a: squared_euclidean(a, method=method), weights))
    np.testing.assert_allclose(ours(x), autodiff(x), rtol=1e-4, atol=1e-5)


def test_all_pairs_squared_gradient_is_finite_difference_exact():
    x = np.random.default_rng(8).normal(size=(6, 3))
    weights = np.random.default_rng(9).uniform(size=(6, 6))
    fn = _weighted_sum(lambda a: all_pairs_squared_euclidean(a, method="matmul"), weights)
    check_grads_x64(fn, x)
    check_grads_x64(fn, x, order=2)


def test_all_pairs_squared_duplicates_and_zero_rows_have_zero_pair_gradients():
    x = np.zeros((5, 3), np.float32)
    x[2] = x[3] = 1.0  # a duplicate pair: distance 0, clamped — its gradient is 0, not NaN
    value, grad = jax.value_and_grad(
        lambda a: jnp.sum(safe_sqrt(all_pairs_squared_euclidean(a, method="matmul")))
    )(x)
    assert np.isfinite(value) and np.isfinite(np.asarray(grad)).all()
    # Only the duplicates' distance is 0: the gradient equals the one without that pair.
    autodiff = jax.grad(lambda a: jnp.sum(safe_sqrt(squared_euclidean(a, method="matmul"))))(x)
    np.testing.assert_allclose(grad, autodiff, rtol=1e-5, atol=1e-6)


def test_all_pairs_squared_is_reverse_mode_only():
    x = np.ones((4, 2), np.float32)
    with pytest.raises(TypeError, match="custom_vjp"):
        jax.jvp(lambda a: all_pairs_squared_euclidean(a, method="matmul"), (x,), (x,))


class TestAllPairsVariants(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_jit_and_eager_agree(self):
        x = np.random.default_rng(10).normal(size=(16, 4)).astype(np.float32)
        value_and_grad = self.variant(
            jax.value_and_grad(lambda a: jnp.sum(all_pairs_squared_euclidean(a, method="matmul")))
        )
        value, grad = value_and_grad(x)
        np.testing.assert_allclose(value, reference(x, x, "squared_euclidean").sum(), rtol=1e-5)
        # Σ_ij ‖x_i − x_j‖² has gradient 4·Σ_j (x_i − x_j) = 4·B·(x_i − mean).
        np.testing.assert_allclose(grad, 4 * 16 * (x - x.mean(0)), rtol=1e-4, atol=1e-4)


def test_column_normalization_matches_the_plain_formula_and_its_gradient():
    """l2_normalize(w, axis=0) on a matrix runs a custom VJP (ones-vector matmuls for the
    column sums): same values and gradients as x / max(‖x‖, eps) by autodiff, a zero column
    and a column below eps included."""
    rng = np.random.default_rng(3)
    w = rng.normal(size=(6, 9))
    w[:, 2] = 0.0
    w[:, 4] *= 1e-14
    cotangent = rng.normal(size=w.shape)

    def plain(v, eps=distances.NORMALIZE_EPS):
        squared = jnp.sum(v * v, axis=0, keepdims=True)
        return v * jax.lax.rsqrt(jnp.maximum(squared, eps * eps))

    with jax.enable_x64(True):
        wj, cj = jnp.asarray(w), jnp.asarray(cotangent)
        for axis in (0, -2):
            value = distances.l2_normalize(wj, axis=axis)
            np.testing.assert_allclose(value, plain(wj), rtol=1e-14, atol=1e-300)
            grad = jax.grad(
                lambda v, axis=axis: jnp.sum(distances.l2_normalize(v, axis=axis) * cj)
            )(wj)
            expected = jax.grad(lambda v: jnp.sum(plain(v) * cj))(wj)
            np.testing.assert_allclose(grad, expected, rtol=1e-12, atol=1e-12)
        assert np.all(np.isfinite(grad))
        np.testing.assert_array_equal(np.asarray(value)[:, 2], 0.0)
