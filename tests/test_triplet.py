import chex
import hypothesis.strategies as st
import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given

from mlx_jax.losses import triplet_loss
from tests import references
from tests.helpers import assert_finite_value_and_grad, check_grads_x64, permuted, random_batch

MININGS = ["semihard", "batch_hard", "all", "semihard_band"]


@pytest.mark.parametrize("mining", MININGS)
@pytest.mark.parametrize(
    "config",
    [
        dict(),
        dict(squared=False, margin=0.5),
        dict(soft=True),
        dict(reduction="sum", margin=1.0),
        dict(reduction="mean_nonzero", margin=2.0),
        dict(semihard_fallback="drop", margin=0.7),
    ],
)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_reference(mining, config, seed):
    x, y = random_batch(seed, batch=16, dim=3, classes=4, scale=0.7)
    expected = references.triplet(x, y, mining=mining, **config)
    actual = triplet_loss(x, y, mining=mining, **config)
    np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mining", MININGS)
def test_weights_match_reference_and_padding_is_exact(mining):
    x, y = random_batch(3, batch=12, dim=3, classes=3)
    w = np.array([1.0, 0.5, 2.0, 0.0, 1.0, 1.0, 3.0, 0.0, 1.0, 1.0, 0.2, 1.0], np.float32)
    np.testing.assert_allclose(
        triplet_loss(x, y, mining=mining, margin=1.0, weights=w),
        references.triplet(x, y, mining=mining, margin=1.0, weights=w),
        rtol=1e-5,
    )
    keep = w > 0
    np.testing.assert_allclose(
        triplet_loss(x, y, mining=mining, margin=1.0, weights=keep.astype(np.float32)),
        triplet_loss(x[keep], y[keep], mining=mining, margin=1.0),
        rtol=1e-6,
    )


def test_semihard_fallback_when_no_negative_is_farther():
    # Anchor 0's positive is far; every negative is closer than it: no semi-hard negative.
    x = np.array([[0.0, 0.0], [3.0, 0.0], [0.5, 0.0], [0.0, 0.7]], np.float32)
    y = np.array([0, 0, 1, 1], np.int32)
    # Pair (0, 1): d_ap = 9; negatives at 0.25 and 0.49 → fallback picks the farthest (0.49).
    farthest = triplet_loss(x, y, margin=0.2, reduction="none")
    np.testing.assert_allclose(farthest[0, 1], 9.0 - 0.49 + 0.2, rtol=1e-6)
    dropped = triplet_loss(x, y, margin=0.2, semihard_fallback="drop", reduction="none")
    assert float(dropped[0, 1]) == 0.0
    np.testing.assert_allclose(
        triplet_loss(x, y, margin=0.2, semihard_fallback="drop"),
        references.triplet(x, y, margin=0.2, semihard_fallback="drop"),
        rtol=1e-6,
    )


class TestVariants(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_jit_and_eager_agree(self):
        x, y = random_batch(4, batch=12, dim=4, classes=3)
        for mining in MININGS:
            fn = self.variant(lambda e, lab, m=mining: triplet_loss(e, lab, mining=m, margin=1.0))
            np.testing.assert_allclose(
                fn(x, y), references.triplet(x, y, mining=mining, margin=1.0), rtol=1e-5
            )


@pytest.mark.parametrize("mining", MININGS)
@pytest.mark.parametrize("squared, soft", [(True, False), (False, False), (True, True)])
def test_gradients(mining, squared, soft):
    x, y = random_batch(5, batch=9, dim=3, classes=3)
    check_grads_x64(
        lambda e: triplet_loss(e, y, mining=mining, margin=1.0, squared=squared, soft=soft), x
    )


@pytest.mark.parametrize("mining", MININGS)
@pytest.mark.parametrize(
    "x, y",
    [
        (np.ones((6, 3), np.float32), np.zeros(6, np.int32)),  # one class: no valid triplet
        (np.zeros((6, 3), np.float32), np.arange(6, dtype=np.int32) % 2),  # zero vectors
        (np.ones((6, 3), np.float32), np.arange(6, dtype=np.int32) % 3),  # duplicates
        (np.ones((4, 3), np.float32), np.arange(4, dtype=np.int32)),  # no positive pair
        (np.ones((1, 3), np.float32), np.zeros(1, np.int32)),  # single sample
    ],
)
@pytest.mark.parametrize("squared", [True, False])
def test_degenerate_batches_are_finite(mining, x, y, squared):
    assert_finite_value_and_grad(lambda e: triplet_loss(e, y, mining=mining, squared=squared), x)


def test_no_valid_triplet_gives_zero():
    x, y = random_batch(0, batch=6)
    for mining in MININGS:
        assert float(triplet_loss(x, np.zeros(6, np.int32), mining=mining)) == 0.0


def _largest_intermediate(fn, *args) -> int:
    jaxpr = jax.make_jaxpr(fn)(*args)
    sizes = [0]

    def visit(jpr):
        for eqn in jpr.eqns:
            for v in eqn.outvars:
                sizes.append(int(np.prod(v.aval.shape)) if hasattr(v.aval, "shape") else 0)
            for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                visit(sub)

    visit(jaxpr.jaxpr)
    return max(sizes)


@pytest.mark.parametrize("mining", ["semihard", "all", "semihard_band", "batch_hard"])
def test_mining_never_builds_a_cubic_tensor(mining):
    batch = 64
    x, y = random_batch(0, batch=batch, dim=8, classes=8)
    largest = _largest_intermediate(
        lambda e: jax.grad(lambda e: triplet_loss(e, y, mining=mining))(e), x
    )
    # O(B²·D) for the distance matrix (direct differences at this size), never O(B³).
    assert largest <= max(2 * batch * (batch + 1), batch * batch * 8), largest
    assert largest < batch**3


@given(seed=st.integers(0, 10_000), mining=st.sampled_from(MININGS))
def test_invariant_to_permutation_and_relabeling(seed, mining):
    x, y = random_batch(seed, batch=10, dim=3, classes=3)
    base = triplet_loss(x, y, mining=mining, margin=1.0)
    xp, yp = permuted(seed, x, y)
    relabel = np.random.default_rng(seed).permutation(50)[:3]
    np.testing.assert_allclose(triplet_loss(xp, yp, mining=mining, margin=1.0), base, rtol=1e-5)
    np.testing.assert_allclose(
        triplet_loss(x, relabel[y].astype(np.int32), mining=mining, margin=1.0), base, rtol=1e-6
    )


def test_low_precision_inputs_compute_in_float32():
    x, y = random_batch(6)
    out = triplet_loss(jnp.asarray(x, jnp.float16), y, margin=1.0)
    assert out.dtype == jnp.float32
    ref = references.triplet(np.asarray(jnp.asarray(x, jnp.float16), np.float64), y, margin=1.0)
    np.testing.assert_allclose(out, ref, rtol=1e-5)


def test_bad_input():
    x, y = random_batch(0, batch=4)
    with pytest.raises(ValueError, match="mining must be one of"):
        triplet_loss(x, y, mining="hard")
    with pytest.raises(ValueError, match="margin must be >= 0"):
        triplet_loss(x, y, margin=-1.0)
    with pytest.raises(ValueError, match=r"labels must have shape \[4\]"):
        jax.jit(triplet_loss).lower(x, y[:3])
    with pytest.raises(TypeError, match="labels must be an integer"):
        jax.jit(triplet_loss).lower(x, y.astype(np.float32))
    with pytest.raises(ValueError, match=r"embeddings must have shape \[batch, dim\]"):
        jax.jit(triplet_loss).lower(x[None], y)


@pytest.mark.parametrize("block_size", [None, 3])
@pytest.mark.parametrize("mining", MININGS)
def test_nan_embedding_gives_nan_loss_not_a_dropped_anchor(mining, block_size):
    # Mining picks indices; a NaN distance must still reach the loss (the driver's divergence
    # check relies on it), whichever anchor row holds it.
    x, y = random_batch(0)
    x = np.array(x)
    x[2, 0] = np.nan
    value = triplet_loss(x, y, mining=mining, block_size=block_size)
    assert np.isnan(float(value))


@pytest.mark.parametrize("block_size", [None, 5])
def test_batch_hard_nan_sample_poisons_every_anchor_that_sees_it(block_size):
    # Every anchor has sample 2 among its positives or negatives, so every anchor's mined
    # distance is NaN: no anchor may come out finite (or be dropped with weight 0).
    x, y = random_batch(0)
    x = np.array(x)
    x[2, 0] = np.nan
    per_anchor = triplet_loss(x, y, mining="batch_hard", reduction="none", block_size=block_size)
    assert np.all(np.isnan(np.asarray(per_anchor)))
