import chex
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given

from mlx_jax.centers import apply_center_update, class_statistics, update_centers
from mlx_jax.losses import (
    center_loss,
    standalone_center_loss,
    triplet_center_loss,
)
from tests import references
from tests.helpers import assert_finite_value_and_grad, check_grads_x64, permuted, random_batch


def batch_and_centers(seed, batch=12, dim=4, classes=3):
    x, y = random_batch(seed, batch=batch, dim=dim, classes=classes)
    centers = np.random.default_rng(seed + 100).normal(size=(classes, dim)).astype(np.float32)
    return x, y, centers


# ---------------------------------------------------------------- center loss + α rule


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("seed", [0, 1])
def test_center_loss_matches_reference(reduction, seed):
    x, y, c = batch_and_centers(seed)
    np.testing.assert_allclose(
        center_loss(x, y, c, reduction=reduction),
        references.center(x, y, c, reduction=reduction),
        rtol=1e-5,
    )


def test_center_loss_gradients():
    x, y, c = batch_and_centers(2)
    check_grads_x64(lambda e, cc: center_loss(e, y, cc), x, c)
    # Closed form (Wen et al. Eq. 3 with the batch mean): ∂L/∂x_i = (x_i − c_{y_i}) / m.
    gx = jax.grad(center_loss)(x, y, c)
    np.testing.assert_allclose(gx, (x - c[y]) / len(y), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_update_centers_matches_loop_over_classes(seed):
    x, y, c = batch_and_centers(seed, batch=10, classes=5)  # some classes absent? ensure one
    y = np.where(y == 4, 0, y).astype(np.int32)  # class 4 absent from the batch
    new = update_centers(c, x, y, 0.5)
    np.testing.assert_allclose(new, references.update_centers(c, x, y, 0.5), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(new[4], c[4])  # absent classes do not move


def test_update_centers_weights_and_padding():
    x, y, c = batch_and_centers(3, batch=10, classes=3)
    w = np.array([1, 0, 1, 1, 0, 1, 1, 1, 1, 0], np.float32)
    keep = w > 0
    np.testing.assert_allclose(
        update_centers(c, x, y, 0.3, weights=w), update_centers(c, x[keep], y[keep], 0.3), rtol=1e-6
    )
    w2 = np.linspace(0.1, 2.0, 10).astype(np.float32)
    np.testing.assert_allclose(
        update_centers(c, x, y, 0.3, weights=w2),
        references.update_centers(c, x, y, 0.3, weights=w2),
        rtol=1e-5,
    )


def test_statistics_can_be_summed_across_shards():
    x, y, c = batch_and_centers(4, batch=12, classes=3)
    s1, n1 = class_statistics(x[:5], y[:5], 3)
    s2, n2 = class_statistics(x[5:], y[5:], 3)
    np.testing.assert_allclose(
        apply_center_update(c, s1 + s2, n1 + n2, 0.5), update_centers(c, x, y, 0.5), rtol=1e-6
    )


def test_alpha_one_moves_a_single_sample_class_halfway():
    # Δc = (c − x)/(1 + 1): with α = 1 the center moves half-way to its only sample.
    c = np.zeros((2, 2), np.float32)
    x = np.array([[2.0, 4.0]], np.float32)
    np.testing.assert_allclose(update_centers(c, x, np.array([1], np.int32), 1.0)[1], [1.0, 2.0])


def test_update_centers_has_no_gradient_path_to_embeddings():
    x, y, c = batch_and_centers(5)
    g = jax.grad(lambda e: jnp.sum(update_centers(c, e, y, 0.5)))(x)
    np.testing.assert_array_equal(g, np.zeros_like(x))


def test_update_centers_out_of_range_label():
    x, y, c = batch_and_centers(6)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\)"):
        update_centers(c, x, np.full_like(y, 3), 0.5)
    # Under jit the value cannot raise: the result is NaN, never a silently skipped sample.
    out = jax.jit(update_centers)(c, x, np.full_like(y, 3), 0.5)
    assert np.isnan(np.asarray(out)).all()


def test_centers_as_parameters_pytorch_center_loss_variant():
    """Centers trained by gradient with their own optimizer (pytorch-center-loss: SGD lr 0.5,
    gradients scaled by 1/λ), via optax.partition; one step equals the closed form."""
    x, y, c = batch_and_centers(7)
    lam, lr = 0.1, 0.5
    params = {"centers": jnp.asarray(c)}
    tx = optax.partition(
        {"centers": optax.chain(optax.scale(1.0 / lam), optax.sgd(lr))},
        {"centers": "centers"},
    )
    state = tx.init(params)
    grads = jax.grad(lambda p: lam * 2.0 * center_loss(x, y, p["centers"]))(params)
    updates, _ = tx.update(grads, state, params)
    new = optax.apply_updates(params, updates)["centers"]
    # ∂(Σ‖x−c‖²/m)/∂c_j = −2 Σ_{y_i=j} (x_i − c_j) / m, then × λ × 1/λ × lr.
    expected = c.copy()
    for j in range(3):
        expected[j] += lr * 2.0 * np.sum(x[y == j] - c[j], axis=0) / len(y)
    np.testing.assert_allclose(new, expected, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- standalone center loss


@pytest.mark.parametrize(
    "config", [dict(), dict(weight_intra=0.5, weight_inter=1.0), dict(eps=1e-6)]
)
@pytest.mark.parametrize("seed", [0, 1])
def test_standalone_matches_reference(config, seed):
    x, y, c = batch_and_centers(seed)
    np.testing.assert_allclose(
        standalone_center_loss(x, y, c, **config),
        references.standalone(x, y, c, **config),
        rtol=1e-5,
    )


def test_standalone_weights():
    x, y, c = batch_and_centers(3, batch=10)
    w = np.array([1, 0.5, 2, 0, 1, 1, 3, 0, 1, 1], np.float32)
    np.testing.assert_allclose(
        standalone_center_loss(x, y, c, weights=w),
        references.standalone(x, y, c, weights=w),
        rtol=1e-5,
    )
    keep = w > 0
    np.testing.assert_allclose(
        standalone_center_loss(x, y, c, weights=keep.astype(np.float32)),
        standalone_center_loss(x[keep], y[keep], c),
        rtol=1e-5,
    )


def test_standalone_gradients():
    x, y, c = batch_and_centers(2, batch=8)
    check_grads_x64(lambda e, cc: standalone_center_loss(e, y, cc), x, c)


# ---------------------------------------------------------------- triplet-center loss


@pytest.mark.parametrize(
    "config", [dict(margin=1.0), dict(margin=5.0, squared=False), dict(margin=2.0, reduction="sum")]
)
@pytest.mark.parametrize("seed", [0, 1])
def test_triplet_center_matches_reference(config, seed):
    x, y, c = batch_and_centers(seed)
    np.testing.assert_allclose(
        triplet_center_loss(x, y, c, **config),
        references.triplet_center(x, y, c, **config),
        rtol=1e-5,
    )


def test_triplet_center_default_margin_is_5():
    x, y, c = batch_and_centers(5)
    np.testing.assert_allclose(
        triplet_center_loss(x, y, c), references.triplet_center(x, y, c, margin=5.0), rtol=1e-5
    )
    assert float(triplet_center_loss(x, y, c)) != float(triplet_center_loss(x, y, c, margin=1.0))


@pytest.mark.parametrize("squared", [True, False])
def test_triplet_center_gradients(squared):
    x, y, c = batch_and_centers(3, batch=8)
    check_grads_x64(lambda e, cc: triplet_center_loss(e, y, cc, margin=3.0, squared=squared), x, c)


# ---------------------------------------------------------------- shared properties

LOSSES = {
    "center": lambda e, y, c: center_loss(e, y, c),
    "standalone": lambda e, y, c: standalone_center_loss(e, y, c),
    "triplet_center": lambda e, y, c: triplet_center_loss(e, y, c, margin=1.0),
    "triplet_center_euclid": lambda e, y, c: triplet_center_loss(
        e, y, c, margin=1.0, squared=False
    ),
}


class TestVariants(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_jit_and_eager_agree(self):
        x, y, c = batch_and_centers(4)
        expected = {
            "center": references.center(x, y, c),
            "standalone": references.standalone(x, y, c),
            "triplet_center": references.triplet_center(x, y, c, margin=1.0),
            "triplet_center_euclid": references.triplet_center(x, y, c, 1.0, squared=False),
        }
        for name, fn in LOSSES.items():
            np.testing.assert_allclose(self.variant(fn)(x, y, c), expected[name], rtol=1e-5)
        np.testing.assert_allclose(
            self.variant(update_centers)(c, x, y, 0.5),
            references.update_centers(c, x, y, 0.5),
            rtol=1e-5,
            atol=1e-6,
        )


@pytest.mark.parametrize("name", list(LOSSES))
@pytest.mark.parametrize(
    "x, y, c",
    [
        (np.ones((6, 2), np.float32), np.zeros(6, np.int32), np.ones((3, 2), np.float32)),
        (
            np.zeros((6, 2), np.float32),
            np.arange(6, dtype=np.int32) % 3,
            np.zeros((3, 2), np.float32),
        ),
        (
            np.ones((4, 2), np.float32),
            np.arange(4, dtype=np.int32) % 2,
            np.ones((2, 2), np.float32),
        ),
        (np.ones((1, 2), np.float32), np.zeros(1, np.int32), np.eye(2, dtype=np.float32)),
    ],
)
def test_degenerate_batches_are_finite(name, x, y, c):
    assert_finite_value_and_grad(LOSSES[name], x, y, c)


@given(seed=st.integers(0, 10_000), name=st.sampled_from(list(LOSSES)))
def test_invariant_to_permutation_and_relabeling(seed, name):
    x, y, c = batch_and_centers(seed % 100, batch=9)
    fn = LOSSES[name]
    base = fn(x, y, c)
    xp, yp = permuted(seed, x, y)
    np.testing.assert_allclose(fn(xp, yp, c), base, rtol=1e-5)
    relabel = np.random.default_rng(seed).permutation(3)
    inverse = np.argsort(relabel)
    # Relabel classes and permute the center rows consistently: y' = relabel[y], c'[k] = c[inverse[k]].
    np.testing.assert_allclose(fn(x, relabel[y].astype(np.int32), c[inverse]), base, rtol=1e-5)


def test_low_precision_inputs_compute_in_float32():
    x, y, c = batch_and_centers(5)
    for name, fn in LOSSES.items():
        out = fn(jnp.asarray(x, jnp.bfloat16), y, jnp.asarray(c, jnp.bfloat16))
        assert out.dtype == jnp.float32, name
    new = update_centers(jnp.asarray(c, jnp.bfloat16), x, y, 0.5)
    assert new.dtype == jnp.bfloat16


@pytest.mark.parametrize("name", list(LOSSES))
def test_bad_input_raises_at_trace_time(name):
    x, y, c = batch_and_centers(0)
    fn = jax.jit(LOSSES[name])
    with pytest.raises(ValueError, match=r"centers must have shape \[num_classes, 4\]"):
        fn.lower(x, y, c[:, :3])
    with pytest.raises(ValueError, match=r"labels must have shape \[12\]"):
        fn.lower(x, y[:5], c)
    with pytest.raises(TypeError, match="labels must be an integer"):
        fn.lower(x, y.astype(np.float32), c)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\)"):
        LOSSES[name](x, np.full_like(y, 7), c)


def test_out_of_range_label_under_jit_is_nan_not_clamped():
    x, y, c = batch_and_centers(0)
    bad = np.full_like(y, 7)
    assert np.isnan(float(jax.jit(center_loss)(x, bad, c)))
    assert np.isnan(float(jax.jit(center_loss)(x, np.full_like(y, -1), c)))  # no wrap-around
    assert np.isnan(float(jax.jit(lambda *a: triplet_center_loss(*a, margin=1.0))(x, bad, c)))


def test_standalone_rejects_mean_nonzero():
    x, y, c = batch_and_centers(0)
    with pytest.raises(ValueError, match="can be negative"):
        standalone_center_loss(x, y, c, reduction="mean_nonzero")


def test_standalone_float32_gradient_for_close_pairs_far_from_origin():
    """Different-class samples 0.03 apart at norm ~50: the log term's gradient is ~1/d² and
    must be computed from accurate small distances, not from a cancelling matmul."""
    rng = np.random.default_rng(2)
    base = rng.normal(size=(8, 2)) * 50
    x = np.concatenate([base, base + rng.normal(size=(8, 2)) * 0.03])
    y = np.concatenate([np.zeros(8), np.ones(8)]).astype(np.int32)
    c = np.stack([base.mean(0), base.mean(0) + 0.01])
    g32 = jax.grad(standalone_center_loss)(x.astype(np.float32), y, c.astype(np.float32))
    with jax.enable_x64(True):
        g64 = jax.grad(standalone_center_loss)(jnp.asarray(x), y, jnp.asarray(c))
    np.testing.assert_allclose(g32, g64, rtol=2e-3, atol=1e-3 * float(np.abs(g64).max()))
