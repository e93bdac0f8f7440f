import chex
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given

from mlx_jax.losses import contrastive_loss
from tests import references
from tests.helpers import (
    assert_finite_value_and_grad,
    check_grads_x64,
    permuted,
    random_batch,
)

CONFIGS = [
    dict(),
    dict(margin=2.5),
    dict(squared=False, pos_margin=0.3, neg_margin=2.0),
    dict(squared=False, balance="pos_neg", reduction="mean_nonzero"),
    dict(reduction="sum"),
    dict(margin=3.0, reduction="mean_nonzero"),
]


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("seed", [0, 1])
def test_matches_reference(config, seed):
    x, y = random_batch(seed, batch=14, dim=4, classes=4, scale=0.6)
    expected = references.contrastive(x, y, **config)
    actual = contrastive_loss(x, y, **config)
    np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-7)


def test_weights_match_reference_and_padding_is_exact():
    x, y = random_batch(3, batch=10, dim=3, classes=3)
    w = np.array([1.0, 0.5, 2.0, 0.0, 1.0, 1.0, 3.0, 0.0, 1.0, 1.0], np.float32)
    np.testing.assert_allclose(
        contrastive_loss(x, y, weights=w), references.contrastive(x, y, weights=w), rtol=1e-5
    )
    # Zero-weight rows behave as if they were not in the batch.
    keep = w > 0
    np.testing.assert_allclose(
        contrastive_loss(x, y, weights=w.astype(bool).astype(np.float32)),
        contrastive_loss(x[keep], y[keep]),
        rtol=1e-6,
    )


class TestVariants(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_jit_and_eager_agree(self):
        x, y = random_batch(4)
        fn = self.variant(lambda e, lab: contrastive_loss(e, lab, margin=2.0))
        np.testing.assert_allclose(fn(x, y), references.contrastive(x, y, margin=2.0), rtol=1e-5)


@pytest.mark.parametrize("squared", [True, False])
def test_gradients(squared):
    x, y = random_batch(5, batch=8, dim=3, classes=3)
    check_grads_x64(lambda e: contrastive_loss(e, y, margin=1.5, squared=squared), x)


@pytest.mark.parametrize(
    "x, y",
    [
        (np.ones((6, 3), np.float32), np.zeros(6, np.int32)),  # one class, duplicates
        (np.zeros((6, 3), np.float32), np.arange(6, dtype=np.int32) % 2),  # zero vectors
        (np.ones((4, 3), np.float32), np.arange(4, dtype=np.int32)),  # no positive pair
        (np.ones((1, 3), np.float32), np.zeros(1, np.int32)),  # single sample
    ],
)
@pytest.mark.parametrize("squared", [True, False])
def test_degenerate_batches_are_finite(x, y, squared):
    assert_finite_value_and_grad(lambda e: contrastive_loss(e, y, squared=squared), x)


def test_low_precision_inputs_compute_in_float32():
    x, y = random_batch(6)
    out = contrastive_loss(jnp.asarray(x, jnp.bfloat16), y)
    assert out.dtype == jnp.float32
    ref = references.contrastive(np.asarray(jnp.asarray(x, jnp.bfloat16), np.float64), y)
    np.testing.assert_allclose(out, ref, rtol=1e-5)


@given(seed=st.integers(0, 10_000))
def test_invariant_to_permutation_and_relabeling(seed):
    x, y = random_batch(seed, batch=10, dim=3, classes=3)
    base = contrastive_loss(x, y)
    xp, yp = permuted(seed, x, y)
    relabel = np.random.default_rng(seed).permutation(50)[:3]
    np.testing.assert_allclose(contrastive_loss(xp, yp), base, rtol=1e-5)
    np.testing.assert_allclose(contrastive_loss(x, relabel[y].astype(np.int32)), base, rtol=1e-6)


def test_reduction_none_shape():
    x, y = random_batch(7, batch=9)
    per_pair = contrastive_loss(x, y, reduction="none")
    assert per_pair.shape == (9, 9)
    np.testing.assert_allclose(
        jnp.sum(per_pair), contrastive_loss(x, y, reduction="sum"), rtol=1e-6
    )


def test_bad_weights_and_options():
    x, y = random_batch(8, batch=4)
    with pytest.raises(ValueError, match=r"weights must have shape \[4\]"):
        contrastive_loss(x, y, weights=np.ones(3, np.float32))
    with pytest.raises(ValueError, match="reduction must be one of"):
        contrastive_loss(x, y, reduction="avg")
    with pytest.raises(ValueError, match="balance must be one of"):
        contrastive_loss(x, y, balance="both")


def test_pml_margins_require_non_squared_form():
    x, y = random_batch(9, batch=4)
    with pytest.raises(ValueError, match="pass squared=False"):
        contrastive_loss(x, y, pos_margin=0.2)
    with pytest.raises(ValueError, match="pass squared=False"):
        contrastive_loss(x, y, neg_margin=2.0)


def test_concrete_jax_labels_closed_over_inside_jit():
    x, y = random_batch(10, batch=6)
    labels = jnp.asarray(y)
    np.testing.assert_allclose(
        jax.jit(lambda e: contrastive_loss(e, labels))(x), contrastive_loss(x, y), rtol=1e-6
    )
