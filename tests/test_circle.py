import chex
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given

from mlx_jax.losses.circle import circle_loss
from tests import references_pairs as references
from tests.helpers import assert_finite_value_and_grad, permuted, random_batch

CONFIGS = [
    dict(),  # paper's face-recognition setting, m = 0.25, γ = 256
    dict(m=0.4, gamma=80.0),  # PML's defaults (paper's fine-grained setting)
    dict(m=0.25, gamma=128.0, reduction="sum"),
    dict(m=0.4, gamma=80.0, reduction="mean_nonzero"),
    dict(gamma=256.0, reduction="mean_nonzero"),
    dict(m=0.0, gamma=4.0),
]


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("seed", [0, 1])
def test_matches_reference(config, seed):
    x, y = random_batch(seed, batch=14, dim=4, classes=4, scale=0.6)
    expected = references.circle(x, y, **config)
    actual = circle_loss(x, y, **config)
    assert actual.dtype == jnp.float32
    np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("config", [dict(), dict(m=0.4, gamma=80.0)])
def test_reduction_none_matches_reference_per_anchor(config):
    x, y = random_batch(2, batch=11, dim=3, classes=3)
    y = y.copy()
    y[0] = 7  # a singleton class: anchor 0 has no positive, hence no term
    per_anchor = circle_loss(x, y, reduction="none", **config)
    assert per_anchor.shape == (11,)
    assert per_anchor[0] == 0.0
    np.testing.assert_allclose(
        per_anchor, references.circle(x, y, reduction="none", **config), rtol=1e-5, atol=1e-6
    )
    np.testing.assert_allclose(
        jnp.sum(per_anchor), circle_loss(x, y, reduction="sum", **config), rtol=1e-6
    )


def test_large_gamma_does_not_overflow_in_float32():
    # Hard negatives (near-duplicates of another class) with γ = 256: exp(γ·α_n·(s_n − m)) is
    # about exp(240), far beyond float32's range, yet the loss is exact.
    rng = np.random.default_rng(0)
    centre = rng.normal(size=(1, 6))
    x = (centre + 0.01 * rng.normal(size=(8, 6))).astype(np.float32)
    y = np.array([0, 1, 0, 1, 2, 2, 0, 1], np.int32)
    expected = references.circle(x, y)
    assert expected > 100.0
    np.testing.assert_allclose(circle_loss(x, y), expected, rtol=1e-5)
    assert_finite_value_and_grad(lambda e: circle_loss(e, y), x)


@pytest.mark.parametrize("reduction", ["mean", "sum", "mean_nonzero"])
def test_weights_match_reference_and_padding_is_exact(reduction):
    x, y = random_batch(3, batch=10, dim=3, classes=3)
    w = np.array([1.0, 0.5, 2.0, 0.0, 1.0, 1.0, 3.0, 0.0, 1.0, 1.0], np.float32)
    for config in (dict(), dict(m=0.4, gamma=80.0)):
        np.testing.assert_allclose(
            circle_loss(x, y, weights=w, reduction=reduction, **config),
            references.circle(x, y, weights=w, reduction=reduction, **config),
            rtol=1e-5,
        )
        # Zero-weight rows behave as if they were not in the batch.
        keep = w > 0
        np.testing.assert_allclose(
            circle_loss(x, y, weights=keep.astype(np.float32), reduction=reduction, **config),
            circle_loss(x[keep], y[keep], reduction=reduction, **config),
            rtol=1e-6,
        )


def test_zero_weight_rows_get_zero_gradient():
    x, y = random_batch(9, batch=8, dim=3, classes=2)
    w = np.array([1, 1, 0, 1, 1, 1, 0, 1], np.float32)
    grad = jax.grad(lambda e: circle_loss(e, y, weights=w, gamma=80.0, m=0.4))(x)
    np.testing.assert_array_equal(grad[w == 0], 0.0)
    assert np.abs(grad[w > 0]).sum() > 0


class TestVariants(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_jit_and_eager_agree(self):
        x, y = random_batch(4)
        fn = self.variant(lambda e, lab: circle_loss(e, lab, m=0.4, gamma=80.0))
        np.testing.assert_allclose(fn(x, y), references.circle(x, y, m=0.4, gamma=80.0), rtol=1e-5)

    @chex.variants(with_jit=True, without_jit=True)
    def test_grad_jit_and_eager_agree(self):
        x, y = random_batch(5)
        grad = self.variant(jax.grad(lambda e, lab: circle_loss(e, lab)))
        expected = jax.grad(lambda e: circle_loss(e, y))(x)
        np.testing.assert_allclose(grad(x, y), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "config",
    [dict(), dict(m=0.4, gamma=80.0), dict(m=0.3, gamma=8.0, reduction="sum")],
)
@pytest.mark.parametrize("seed", [5, 6])
def test_gradients_with_alpha_held_constant(config, seed):
    """α is stop-gradient (Sun et al. 2020): jax.grad must equal the finite-difference
    gradient of the loss whose α is frozen at the evaluation point — and differ from that of
    the loss whose α moves with the embeddings."""
    x, y = random_batch(seed, batch=8, dim=3, classes=3)
    x = x.astype(np.float64)
    with jax.enable_x64(True):
        grad = np.asarray(jax.grad(lambda e: circle_loss(e, y, **config))(jnp.asarray(x)))
    frozen = references.numerical_gradient(
        lambda e: references.circle(e, y, alpha_from=x, **config), x
    )
    scale = np.max(np.abs(frozen))
    np.testing.assert_allclose(grad, frozen, rtol=1e-5, atol=1e-6 * scale)
    moving = references.numerical_gradient(lambda e: references.circle(e, y, **config), x)
    assert np.max(np.abs(grad - moving)) > 1e-3 * scale


def test_gradient_float32_close_to_float64():
    x, y = random_batch(7, batch=10, dim=4, classes=3)
    grad32 = jax.grad(lambda e: circle_loss(e, y))(x)
    assert grad32.dtype == jnp.float32
    with jax.enable_x64(True):
        grad64 = jax.grad(lambda e: circle_loss(e, y))(jnp.asarray(x, jnp.float64))
    np.testing.assert_allclose(grad32, grad64, rtol=1e-3, atol=1e-3 * np.abs(grad64).max())


@pytest.mark.parametrize(
    "x, y",
    [
        (np.ones((6, 3), np.float32), np.zeros(6, np.int32)),  # one class, duplicates
        (
            np.random.default_rng(0).normal(size=(6, 3)).astype(np.float32),
            np.zeros(6, np.int32),
        ),  # one class: no negative
        (np.ones((4, 3), np.float32), np.arange(4, dtype=np.int32)),  # all distinct: no positive
        (np.zeros((6, 3), np.float32), np.arange(6, dtype=np.int32) % 2),  # zero vectors
        (np.ones((6, 3), np.float32), np.arange(6, dtype=np.int32) % 2),  # duplicates, 2 classes
        (np.ones((1, 3), np.float32), np.zeros(1, np.int32)),  # single sample
    ],
)
@pytest.mark.parametrize("config", [dict(), dict(m=0.4, gamma=80.0)])
@pytest.mark.parametrize("reduction", ["mean", "sum", "mean_nonzero"])
def test_degenerate_batches_are_finite(x, y, config, reduction):
    assert_finite_value_and_grad(lambda e: circle_loss(e, y, reduction=reduction, **config), x)


@pytest.mark.parametrize(
    "y", [np.zeros(6, np.int32), np.arange(6, dtype=np.int32)], ids=["one_class", "distinct"]
)
def test_no_valid_anchor_gives_zero_loss_and_gradient(y):
    x, _ = random_batch(8, batch=6, dim=3, classes=2)
    value, grad = jax.value_and_grad(lambda e: circle_loss(e, y))(x)
    assert value == 0.0
    np.testing.assert_array_equal(grad, 0.0)


def test_zero_vector_in_a_normal_batch():
    x, y = random_batch(10, batch=8, dim=3, classes=2)
    x[3] = 0.0
    np.testing.assert_allclose(circle_loss(x, y), references.circle(x, y), rtol=1e-5)
    assert_finite_value_and_grad(lambda e: circle_loss(e, y), x)


def test_all_weights_zero_is_finite():
    x, y = random_batch(11, batch=6, dim=3, classes=2)
    w = np.zeros(6, np.float32)
    value, grad = jax.value_and_grad(lambda e: circle_loss(e, y, weights=w))(x)
    assert value == 0.0
    np.testing.assert_array_equal(grad, 0.0)


@pytest.mark.parametrize("gamma", [256.0, 80.0])
def test_low_precision_inputs_compute_in_float32(gamma):
    x, y = random_batch(6)
    out = circle_loss(jnp.asarray(x, jnp.bfloat16), y, gamma=gamma)
    assert out.dtype == jnp.float32
    ref = references.circle(np.asarray(jnp.asarray(x, jnp.bfloat16), np.float64), y, gamma=gamma)
    np.testing.assert_allclose(out, ref, rtol=1e-5)


@given(seed=st.integers(0, 10_000))
def test_invariant_to_permutation_and_relabeling(seed):
    x, y = random_batch(seed, batch=10, dim=3, classes=3)
    base = circle_loss(x, y)
    xp, yp = permuted(seed, x, y)
    relabel = np.random.default_rng(seed).permutation(50)[:3]
    np.testing.assert_allclose(circle_loss(xp, yp), base, rtol=1e-5)
    np.testing.assert_allclose(circle_loss(x, relabel[y].astype(np.int32)), base, rtol=1e-6)


def test_bad_weights_and_options():
    x, y = random_batch(8, batch=4)
    with pytest.raises(ValueError, match=r"weights must have shape \[4\]"):
        jax.jit(circle_loss).lower(x, y, weights=np.ones(3, np.float32))
    with pytest.raises(ValueError, match="weights must be non-negative"):
        circle_loss(x, y, weights=-np.ones(4, np.float32))
    with pytest.raises(ValueError, match="reduction must be one of"):
        circle_loss(x, y, reduction="avg")
    with pytest.raises(ValueError, match="gamma must be > 0"):
        circle_loss(x, y, gamma=0.0)
    with pytest.raises(ValueError, match="m must be >= 0"):
        circle_loss(x, y, m=-0.1)


def test_traced_hyperparameters():
    x, y = random_batch(12, batch=8, dim=3, classes=2)
    fn = jax.jit(lambda e, lab, m, g: circle_loss(e, lab, m=m, gamma=g))
    np.testing.assert_allclose(
        fn(x, y, 0.4, 80.0), references.circle(x, y, m=0.4, gamma=80.0), rtol=1e-5
    )
