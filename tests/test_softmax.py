import chex
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given

from mlx_jax.losses.softmax import softmax_loss
from tests import references_margin as ref
from tests.helpers import assert_finite_value_and_grad, check_grads_x64


def random_logits(seed, batch=10, classes=6, scale=3.0):
    rng = np.random.default_rng(seed)
    logits = (rng.normal(size=(batch, classes)) * scale).astype(np.float32)
    labels = rng.integers(0, classes, size=batch).astype(np.int32)
    return logits, labels


CONFIGS = [
    dict(),
    dict(reduction="sum"),
    dict(reduction="mean_nonzero"),
    dict(weights=np.array([1.0, 0.5, 2.0, 0.0, 1.0, 1.0, 3.0, 0.0, 1.0, 1.0], np.float32)),
    dict(
        weights=np.array([1.0, 0.5, 2.0, 0.0, 1.0, 1.0, 3.0, 0.0, 1.0, 1.0], np.float32),
        reduction="none",
    ),
]


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_reference(config, seed):
    z, y = random_logits(seed)
    np.testing.assert_allclose(
        softmax_loss(z, y, **config), ref.softmax(z, y, **config), rtol=1e-5, atol=1e-6
    )


def test_large_logits_are_stable():
    z, y = random_logits(3, scale=1.0)
    z = z * 1e4  # exp would overflow without the max shift
    out = softmax_loss(z, y)
    assert np.isfinite(out)
    np.testing.assert_allclose(out, ref.softmax(z, y), rtol=1e-5)


def test_weights_and_padding_are_exact():
    z, y = random_logits(4)
    w = np.array([1, 1, 0, 1, 0, 1, 1, 1, 0, 1], np.float32)
    keep = w > 0
    np.testing.assert_allclose(softmax_loss(z, y, weights=w), softmax_loss(z[keep], y[keep]))
    np.testing.assert_allclose(
        softmax_loss(z, y, weights=w, reduction="sum"),
        softmax_loss(z[keep], y[keep], reduction="sum"),
        rtol=1e-6,
    )


class TestVariants(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_jit_and_eager_agree(self):
        z, y = random_logits(5)
        fn = self.variant(softmax_loss)
        np.testing.assert_allclose(fn(z, y), ref.softmax(z, y), rtol=1e-5)


def test_gradients():
    z, y = random_logits(6)
    check_grads_x64(lambda logits: softmax_loss(logits, y), z)
    w = np.linspace(0.5, 2.0, len(y))
    check_grads_x64(lambda logits, weights: softmax_loss(logits, y, weights=weights), z, w)


@pytest.mark.parametrize(
    "z, y",
    [
        (np.zeros((4, 3), np.float32), np.array([0, 1, 2, 0], np.int32)),  # all equal
        (np.ones((3, 1), np.float32), np.zeros(3, np.int32)),  # one class
        (np.array([[1e4, -1e4, 0.0]], np.float32), np.array([1], np.int32)),  # extreme
    ],
)
def test_degenerate_inputs_are_finite(z, y):
    assert_finite_value_and_grad(lambda logits: softmax_loss(logits, y), z)


def test_low_precision_inputs_compute_in_float32():
    z, y = random_logits(7)
    zb = jnp.asarray(z, jnp.bfloat16)
    out = softmax_loss(zb, y)
    assert out.dtype == jnp.float32
    np.testing.assert_allclose(out, ref.softmax(np.asarray(zb, np.float64), y), rtol=1e-5)


@given(seed=st.integers(0, 10_000))
def test_invariant_to_batch_and_class_permutation(seed):
    z, y = random_logits(seed)
    base = softmax_loss(z, y)
    rng = np.random.default_rng(seed)
    rows = rng.permutation(len(y))
    np.testing.assert_allclose(softmax_loss(z[rows], y[rows]), base, rtol=1e-5)
    cols = rng.permutation(z.shape[1])  # new column j holds old class cols[j]
    relabel = np.argsort(cols).astype(np.int32)
    np.testing.assert_allclose(softmax_loss(z[:, cols], relabel[y]), base, rtol=1e-5)


def test_out_of_range_labels_raise_eagerly_and_are_nan_under_jit():
    z, y = random_logits(8, batch=4, classes=3)
    for bad in (np.array([0, 1, 3, 2], np.int32), np.array([0, -1, 1, 2], np.int32)):
        with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\)"):
            softmax_loss(z, bad)
        per_sample = jax.jit(lambda a, b: softmax_loss(a, b, reduction="none"))(z, bad)
        assert np.isnan(per_sample[np.flatnonzero((bad < 0) | (bad >= 3))]).all()
        assert np.isfinite(np.delete(per_sample, np.flatnonzero((bad < 0) | (bad >= 3)))).all()


@pytest.mark.parametrize(
    "args, error, match",
    [
        ((np.ones((4,), np.float32), np.zeros(4, np.int32)), ValueError, "logits must have shape"),
        (
            (np.ones((4, 3), np.float32), np.zeros(3, np.int32)),
            ValueError,
            r"labels must have shape \[4\]",
        ),
        (
            (np.ones((4, 3), np.float32), np.zeros(4, np.float32)),
            TypeError,
            "labels must be an integer",
        ),
        (
            (np.ones((4, 3), np.int32), np.zeros(4, np.int32)),
            TypeError,
            "logits must be a floating",
        ),
        ((np.ones((4, 0), np.float32), np.zeros(4, np.int32)), ValueError, "num_classes >= 1"),
    ],
)
def test_bad_input_raises_at_trace_time(args, error, match):
    with pytest.raises(error, match=match):
        jax.jit(softmax_loss).lower(*args)


def test_bad_weights_and_reduction():
    z, y = random_logits(9, batch=4)
    with pytest.raises(ValueError, match=r"weights must have shape \[4\]"):
        jax.jit(lambda a, b, w: softmax_loss(a, b, weights=w)).lower(z, y, np.ones(3, np.float32))
    with pytest.raises(ValueError, match="reduction must be one of"):
        softmax_loss(z, y, reduction="avg")
