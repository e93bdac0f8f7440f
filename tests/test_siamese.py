import chex
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given

from mlx_jax.losses.siamese import siamese_cosine_loss
from tests import references_pairs as references
from tests.helpers import (
    assert_finite_value_and_grad,
    check_grads_x64,
    permuted,
    random_batch,
)

CONFIGS = [
    dict(),  # Bromley et al.'s targets: 1.0 genuine, -0.9 forgery
    dict(negative_target=-1.0),  # the paper's alternative target
    dict(positive_target=0.8, negative_target=0.0, balance="pos_neg"),
    dict(reduction="sum"),
    dict(reduction="mean_nonzero"),
    dict(balance="pos_neg", reduction="mean_nonzero"),
]


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("seed", [0, 1])
def test_matches_reference(config, seed):
    x, y = random_batch(seed, batch=14, dim=4, classes=4, scale=0.6)
    expected = references.siamese_cosine(x, y, **config)
    actual = siamese_cosine_loss(x, y, **config)
    assert actual.dtype == jnp.float32
    np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-7)


def test_reduction_none_matches_reference_per_pair():
    x, y = random_batch(2, batch=9, dim=3, classes=3)
    w = np.array([1.0, 2.0, 0.0, 1.0, 0.5, 1.0, 1.0, 1.0, 3.0], np.float32)
    per_pair = siamese_cosine_loss(x, y, weights=w, reduction="none")
    assert per_pair.shape == (9, 9)
    np.testing.assert_array_equal(jnp.diagonal(per_pair), 0.0)
    np.testing.assert_allclose(
        per_pair,
        references.siamese_cosine(x, y, weights=w, reduction="none"),
        rtol=1e-5,
        atol=1e-6,
    )
    np.testing.assert_allclose(
        jnp.sum(per_pair), siamese_cosine_loss(x, y, weights=w, reduction="sum"), rtol=1e-6
    )


@pytest.mark.parametrize("reduction", ["mean", "sum", "mean_nonzero"])
@pytest.mark.parametrize("balance", ["pairs", "pos_neg"])
def test_weights_match_reference_and_padding_is_exact(reduction, balance):
    x, y = random_batch(3, batch=10, dim=3, classes=3)
    w = np.array([1.0, 0.5, 2.0, 0.0, 1.0, 1.0, 3.0, 0.0, 1.0, 1.0], np.float32)
    config = dict(reduction=reduction, balance=balance)
    np.testing.assert_allclose(
        siamese_cosine_loss(x, y, weights=w, **config),
        references.siamese_cosine(x, y, weights=w, **config),
        rtol=1e-5,
    )
    # Zero-weight rows behave as if they were not in the batch.
    keep = w > 0
    np.testing.assert_allclose(
        siamese_cosine_loss(x, y, weights=keep.astype(np.float32), **config),
        siamese_cosine_loss(x[keep], y[keep], **config),
        rtol=1e-6,
    )


def test_zero_weight_rows_get_zero_gradient():
    x, y = random_batch(9, batch=8, dim=3, classes=2)
    w = np.array([1, 1, 0, 1, 1, 1, 0, 1], np.float32)
    grad = jax.grad(lambda e: siamese_cosine_loss(e, y, weights=w))(x)
    np.testing.assert_array_equal(grad[w == 0], 0.0)


class TestVariants(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_jit_and_eager_agree(self):
        x, y = random_batch(4)
        fn = self.variant(lambda e, lab: siamese_cosine_loss(e, lab, negative_target=-1.0))
        np.testing.assert_allclose(
            fn(x, y), references.siamese_cosine(x, y, negative_target=-1.0), rtol=1e-5
        )


@pytest.mark.parametrize(
    "config", [dict(), dict(balance="pos_neg"), dict(negative_target=-1.0, reduction="sum")]
)
def test_gradients(config):
    x, y = random_batch(5, batch=8, dim=3, classes=3)
    check_grads_x64(lambda e: siamese_cosine_loss(e, y, **config), x)


def test_gradient_matches_reference_finite_differences():
    x, y = random_batch(6, batch=7, dim=3, classes=2)
    x = x.astype(np.float64)
    with jax.enable_x64(True):
        grad = jax.grad(lambda e: siamese_cosine_loss(e, y))(jnp.asarray(x))
    expected = references.numerical_gradient(lambda e: references.siamese_cosine(e, y), x)
    np.testing.assert_allclose(grad, expected, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize(
    "x, y",
    [
        (np.ones((6, 3), np.float32), np.zeros(6, np.int32)),  # one class, duplicates
        (np.zeros((6, 3), np.float32), np.arange(6, dtype=np.int32) % 2),  # zero vectors
        (np.ones((4, 3), np.float32), np.arange(4, dtype=np.int32)),  # no positive pair
        (np.ones((6, 3), np.float32), np.arange(6, dtype=np.int32) % 2),  # duplicates, 2 classes
        (np.ones((1, 3), np.float32), np.zeros(1, np.int32)),  # single sample
    ],
)
@pytest.mark.parametrize("balance", ["pairs", "pos_neg"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "mean_nonzero"])
def test_degenerate_batches_are_finite(x, y, balance, reduction):
    assert_finite_value_and_grad(
        lambda e: siamese_cosine_loss(e, y, balance=balance, reduction=reduction), x
    )


def test_zero_vector_in_a_normal_batch():
    x, y = random_batch(10, batch=8, dim=3, classes=2)
    x[3] = 0.0
    np.testing.assert_allclose(
        siamese_cosine_loss(x, y), references.siamese_cosine(x, y), rtol=1e-5
    )
    assert_finite_value_and_grad(lambda e: siamese_cosine_loss(e, y), x)


def test_single_sample_and_all_zero_weights_give_zero():
    value, grad = jax.value_and_grad(lambda e: siamese_cosine_loss(e, np.zeros(1, np.int32)))(
        np.ones((1, 3), np.float32)
    )
    assert value == 0.0
    np.testing.assert_array_equal(grad, 0.0)
    x, y = random_batch(11, batch=6, dim=3, classes=2)
    w = np.zeros(6, np.float32)
    value, grad = jax.value_and_grad(lambda e: siamese_cosine_loss(e, y, weights=w))(x)
    assert value == 0.0
    np.testing.assert_array_equal(grad, 0.0)


def test_low_precision_inputs_compute_in_float32():
    x, y = random_batch(6)
    out = siamese_cosine_loss(jnp.asarray(x, jnp.bfloat16), y)
    assert out.dtype == jnp.float32
    ref = references.siamese_cosine(np.asarray(jnp.asarray(x, jnp.bfloat16), np.float64), y)
    np.testing.assert_allclose(out, ref, rtol=1e-5)


@given(seed=st.integers(0, 10_000))
def test_invariant_to_permutation_and_relabeling(seed):
    x, y = random_batch(seed, batch=10, dim=3, classes=3)
    base = siamese_cosine_loss(x, y)
    xp, yp = permuted(seed, x, y)
    relabel = np.random.default_rng(seed).permutation(50)[:3]
    np.testing.assert_allclose(siamese_cosine_loss(xp, yp), base, rtol=1e-5)
    np.testing.assert_allclose(siamese_cosine_loss(x, relabel[y].astype(np.int32)), base, rtol=1e-6)


def test_invariant_to_embedding_scale():
    x, y = random_batch(13, batch=8, dim=4, classes=2)
    np.testing.assert_allclose(
        siamese_cosine_loss(3.7 * x, y), siamese_cosine_loss(x, y), rtol=1e-5
    )


def test_bad_weights_and_options():
    x, y = random_batch(8, batch=4)
    with pytest.raises(ValueError, match=r"weights must have shape \[4\]"):
        jax.jit(siamese_cosine_loss).lower(x, y, weights=np.ones(3, np.float32))
    with pytest.raises(ValueError, match="reduction must be one of"):
        siamese_cosine_loss(x, y, reduction="avg")
    with pytest.raises(ValueError, match="balance must be one of"):
        siamese_cosine_loss(x, y, balance="both")
