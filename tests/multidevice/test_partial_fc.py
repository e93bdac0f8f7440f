"""Class-sharded margin heads (mlx_jax.partial_fc) on 8 virtual CPU devices: value and gradients
equal the unsharded losses of mlx_jax.losses.margin_softmax."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from mlx_jax import partial_fc as pfc
from mlx_jax.losses.margin_softmax import arcface_loss, combined_margin_loss, cosface_loss
from tests import references_margin as ref

N = 8
B, D, C = 32, 16, 10_000


@functools.cache
def class_mesh(shape=(N,), names=("model",)):
    return jax.make_mesh(shape, names, axis_types=(jax.sharding.AxisType.Auto,) * len(shape))


def problem(seed, classes=C, batch=B, dim=D, label_range=None, opposite=0):
    """x [B, D], labels [B] spread over the shards (or drawn from ``label_range``), W [D, C].

    The first ``opposite`` embeddings point away from their class weight (θ_y near π), so that
    θ_y + m > π and the boundary rule is exercised.
    """
    rng = np.random.default_rng(seed)
    low, high = label_range or (0, classes)
    labels = rng.integers(low, high, size=batch)
    w = rng.normal(size=(dim, classes))
    x = rng.normal(size=(batch, dim))
    for i in range(opposite):
        w_hat = w[:, labels[i]] / np.linalg.norm(w[:, labels[i]])
        x[i] = -2.0 * w_hat + 0.25 * rng.normal(size=dim)
    return x.astype(np.float32), labels.astype(np.int32), w.astype(np.float32)


def value_and_grads(loss_fn, x, y, w, **kwargs):
    """jit(value_and_grad) w.r.t. (embeddings, class_weights)."""
    fn = jax.jit(jax.value_and_grad(lambda e, cw: loss_fn(e, y, cw, **kwargs), argnums=(0, 1)))
    value, (gx, gw) = fn(x, w)
    return np.asarray(value), np.asarray(gx), np.asarray(gw), gw


def assert_close(actual, expected, rtol=2e-5, what=""):
    """Elementwise |a − e| <= rtol·max|e| (+ a tiny floor): float32 rounding relative to the
    array's scale (gradient entries of W are tiny where the softmax mass is tiny)."""
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
    assert np.all(np.isfinite(actual)), what
    scale = max(float(np.max(np.abs(expected))), 1e-30)
    error = float(np.max(np.abs(actual - expected)))
    assert error <= rtol * scale + 1e-9, f"{what}: max |diff| {error:.3g} vs scale {scale:.3g}"


CONFIGS = [
    ("arcface", dict(), 0),
    ("arcface", dict(scale=16.0, margin=0.3), 4),
    ("arcface", dict(scale=16.0, margin=0.7, boundary="easy"), 4),
    ("arcface", dict(scale=32.0, margin=0.7, boundary="none"), 4),
    ("cosface", dict(), 0),
    ("cosface", dict(scale=30.0, margin=0.2), 0),
    ("combined", dict(m1=1.0, m2=0.3, m3=0.2, scale=32.0), 4),
    ("combined", dict(m1=1.35, m2=0.25, m3=0.1, scale=16.0), 4),
    ("combined", dict(m1=2.0, scale=16.0, boundary="easy"), 0),
]
LOSSES = {
    "arcface": (pfc.partial_fc_arcface_loss, arcface_loss),
    "cosface": (pfc.partial_fc_cosface_loss, cosface_loss),
    "combined": (pfc.partial_fc_loss, combined_margin_loss),
}


@pytest.mark.parametrize("name, config, opposite", CONFIGS)
def test_value_and_grads_equal_unsharded_at_10k_classes(name, config, opposite):
    sharded_loss, loss = LOSSES[name]
    mesh = class_mesh()
    x, y, w = problem(0, opposite=opposite)
    assert len({int(label) // (C // N) for label in y}) >= 6  # labels on most shards
    w_sharded = pfc.shard_class_weights(w, mesh)
    value, gx, gw, gw_array = value_and_grads(sharded_loss, x, y, w_sharded, mesh=mesh, **config)
    expected, ex, ew, _ = value_and_grads(loss, x, y, w, **config)
    assert_close(value, expected, 1e-6, "loss")
    assert_close(gx, ex, 2e-5, "d/d embeddings")
    assert_close(gw, ew, 2e-5, "d/d class_weights")
    # The gradient of W comes back sharded by class, like W.
    assert gw_array.sharding.is_equivalent_to(pfc.class_sharding(mesh), 2)


def test_boundary_cases_occur_in_the_opposite_problem():
    x, y, w = problem(0, opposite=4)
    cos = ref.cosines(x, w)[np.arange(B), y]
    assert np.sum(np.arccos(np.clip(cos, -1, 1)) + 0.7 > np.pi) >= 2


@pytest.mark.parametrize("classes", [10_001, 10])
def test_padded_classes_equal_the_unpadded_loss(classes):
    """C not divisible by 8: W is padded to a multiple of 8 (for C = 10, three shards hold only
    padding); padding is left out of the normaliser and gets zero gradient."""
    mesh = class_mesh()
    x, y, w = problem(1, classes=classes)
    w_padded = pfc.shard_class_weights(w, mesh)
    padded = pfc.padded_num_classes(classes, N)
    assert w_padded.shape == (D, padded) and padded > classes
    kwargs = dict(mesh=mesh, num_classes=classes, m2=0.5, m3=0.1, scale=32.0)
    value, gx, gw, _ = value_and_grads(pfc.partial_fc_loss, x, y, w_padded, **kwargs)
    expected, ex, ew, _ = value_and_grads(combined_margin_loss, x, y, w, m2=0.5, m3=0.1, scale=32)
    assert_close(value, expected, 1e-6, "loss")
    assert_close(gx, ex, 2e-5, "d/d embeddings")
    assert_close(gw[:, :classes], ew, 2e-5, "d/d class_weights")
    assert np.all(gw[:, classes:] == 0.0)
    # Without num_classes the padding columns would be classes: a different loss.
    unmasked = jax.jit(lambda e, cw: pfc.partial_fc_loss(e, y, cw, mesh=mesh, m2=0.5, m3=0.1))
    assert abs(float(unmasked(x, w_padded)) - float(value)) > 1e-3


def test_class_weights_not_divisible_by_devices_raise():
    mesh = class_mesh()
    x, y, w = problem(2, classes=10_001)
    with pytest.raises(ValueError, match=r"class_weights .*divisible by the 8 devices.*10008"):
        pfc.partial_fc_arcface_loss(x, y, w, mesh=mesh)


def test_labels_all_on_one_shard():
    mesh = class_mesh()
    local = C // N
    x, y, w = problem(3, label_range=(3 * local, 4 * local))
    w_sharded = pfc.shard_class_weights(w, mesh)
    value, gx, gw, _ = value_and_grads(pfc.partial_fc_arcface_loss, x, y, w_sharded, mesh=mesh)
    expected, ex, ew, _ = value_and_grads(arcface_loss, x, y, w)
    assert_close(value, expected, 1e-6, "loss")
    assert_close(gx, ex, 2e-5, "d/d embeddings")
    assert_close(gw, ew, 2e-5, "d/d class_weights")


@pytest.mark.parametrize("batch_sharded", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "sum", "mean_nonzero", "none"])
def test_weights_and_reductions(reduction, batch_sharded):
    mesh = class_mesh()
    x, y, w = problem(4)
    weights = np.random.default_rng(4).uniform(0.5, 2.0, size=B).astype(np.float32)
    weights[[0, 5, 17]] = 0.0
    w_sharded = pfc.shard_class_weights(w, mesh)
    if batch_sharded:  # every per-sample input split along B over the same axis
        rows = NamedSharding(mesh, P("model"))
        x, y, weights = (jax.device_put(a, rows) for a in (x, y, weights))

    def total(loss_fn, e, cw, **kw):
        out = loss_fn(e, y, cw, scale=32.0, weights=weights, reduction=reduction, **kw)
        return jnp.sum(out * jnp.arange(1, out.size + 1)) if reduction == "none" else out

    sharded = functools.partial(total, pfc.partial_fc_cosface_loss, mesh=mesh)
    sharded = functools.partial(sharded, batch_sharded=batch_sharded)
    value, (gx, gw) = jax.jit(jax.value_and_grad(sharded, argnums=(0, 1)))(x, w_sharded)
    expected, (ex, ew) = jax.jit(
        jax.value_and_grad(functools.partial(total, cosface_loss), argnums=(0, 1))
    )(np.asarray(x), w)
    assert_close(value, expected, 1e-6, "loss")
    assert_close(gx, ex, 2e-5, "d/d embeddings")
    assert_close(gw, ew, 2e-5, "d/d class_weights")
    assert np.all(np.asarray(gx)[[0, 5, 17]] == 0.0)  # a zero weight removes the sample
    per_sample = jax.jit(
        lambda e, cw: pfc.partial_fc_cosface_loss(
            e, y, cw, mesh=mesh, batch_sharded=batch_sharded, weights=weights, reduction="none"
        )
    )(x, w_sharded)
    assert per_sample.shape == (B,)
    if batch_sharded:  # each device's embedding gradient is its own rows
        assert gx.sharding.is_equivalent_to(NamedSharding(mesh, P("model")), 2)


def test_never_builds_the_full_logits():
    """The per-device program holds [B, C/N] logits, never [B, C], and its temporaries stay far
    below one [B, C] float32 array."""
    mesh = class_mesh()
    classes = 80_000
    x, y, w = problem(5, classes=classes, batch=64)
    w_sharded = pfc.shard_class_weights(w, mesh)
    step = jax.jit(
        jax.value_and_grad(
            lambda e, cw: pfc.partial_fc_arcface_loss(e, y, cw, mesh=mesh), argnums=(0, 1)
        )
    )
    compiled = step.lower(x, w_sharded).compile()
    hlo = compiled.as_text()
    assert f"[64,{classes // N}]" in hlo
    assert f"[64,{classes}]" not in hlo and f"[{classes},64]" not in hlo
    memory = compiled.memory_analysis()
    full_logits = 64 * classes * 4
    assert memory.temp_size_in_bytes < full_logits / 2, memory


def test_out_of_range_label_gives_nan_under_jit():
    mesh = class_mesh()
    x, y, w = problem(6)
    w_sharded = pfc.shard_class_weights(w, mesh)
    fn = jax.jit(
        lambda labels: pfc.partial_fc_loss(
            x, labels, w_sharded, mesh=mesh, m2=0.5, reduction="none"
        )
    )
    for bad in (C, -1):
        labels = y.copy()
        labels[3] = bad
        out = np.asarray(fn(labels))
        assert np.isnan(out[3]) and np.all(np.isfinite(np.delete(out, 3)))


def test_two_dimensional_mesh_shards_classes_over_one_axis():
    mesh = class_mesh((2, 4), ("data", "model"))
    x, y, w = problem(7)
    w_sharded = pfc.shard_class_weights(w, mesh, "model")
    assert w_sharded.addressable_shards[0].data.shape == (D, C // 4)
    value, gx, gw, _ = value_and_grads(pfc.partial_fc_arcface_loss, x, y, w_sharded, mesh=mesh)
    expected, ex, ew, _ = value_and_grads(arcface_loss, x, y, w)
    assert_close(value, expected, 1e-6, "loss")
    assert_close(gx, ex, 2e-5, "d/d embeddings")
    assert_close(gw, ew, 2e-5, "d/d class_weights")


def test_small_problem_matches_the_float64_reference():
    mesh = class_mesh()
    x, y, w = problem(8, classes=16, batch=6, dim=5, opposite=2)
    expected = ref.arcface(x, y, w, scale=16.0, margin=0.5, reduction="none")
    actual = pfc.partial_fc_arcface_loss(
        x, y, pfc.shard_class_weights(w, mesh), mesh=mesh, scale=16.0, reduction="none"
    )
    np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("classes", [C, 10_001])
def test_predict_is_the_argmax_of_the_cosines(classes):
    mesh = class_mesh()
    x, _, w = problem(9, classes=classes)
    x[1] = x[0]  # a tie-free duplicate row still predicts the same class
    w[:, 7] = w[:, 9_000]  # an exact tie across shards: the lowest class id wins
    x[2] = w[:, 7]
    predict = jax.jit(lambda e, cw: pfc.partial_fc_predict(e, cw, mesh=mesh, num_classes=classes))
    actual = np.asarray(predict(x, pfc.shard_class_weights(w, mesh)))
    cosines = ref.cosines(x, w)
    np.testing.assert_array_equal(actual, np.argmax(cosines, axis=1))
    assert actual[2] == 7


def test_bad_arguments_name_the_argument():
    mesh = class_mesh()
    x, y, w = problem(10)
    w_sharded = pfc.shard_class_weights(w, mesh)
    with pytest.raises(ValueError, match="axis_name"):
        pfc.partial_fc_loss(x, y, w_sharded, mesh=mesh, axis_name="data")
    with pytest.raises(ValueError, match="num_classes"):
        pfc.partial_fc_loss(x, y, w_sharded, mesh=mesh, num_classes=C + 1)
    with pytest.raises(ValueError, match="labels"):
        pfc.partial_fc_loss(x, y.clip(0, 99), w_sharded, mesh=mesh, num_classes=99)
    with pytest.raises(ValueError, match=r"embeddings .*batch divisible"):
        pfc.partial_fc_loss(x[:30], y[:30], w_sharded, mesh=mesh, batch_sharded=True)
    with pytest.raises(ValueError, match="class_weights"):
        pfc.partial_fc_loss(x, y, w_sharded[:8], mesh=mesh)
    with pytest.raises(ValueError, match="m2"):
        pfc.partial_fc_loss(x, y, w_sharded, mesh=mesh, m2=4.0)
    with pytest.raises(ValueError, match="reduction"):
        pfc.partial_fc_loss(x, y, w_sharded, mesh=mesh, reduction="max")
    with pytest.raises(TypeError, match="mesh"):
        pfc.partial_fc_loss(x, y, w_sharded, mesh=None)


# --------------------------------------------------------------------------------------------
# Sampled Partial FC (sample_rate < 1)
# --------------------------------------------------------------------------------------------


def sampled_value_and_grads(x, y, w, key, **kwargs):
    mesh = class_mesh()
    loss = functools.partial(pfc.partial_fc_loss, mesh=mesh, key=key, **kwargs)
    return value_and_grads(loss, x, y, w)


@pytest.mark.parametrize("classes", [C, 10_001])
def test_sampled_loss_is_the_exact_loss_over_the_sampled_classes(classes):
    """r = 0.1: each device keeps its positives plus random classes, floor(0.1·C_pad/8) in all;
    the loss and gradients are those of the unsharded loss over exactly those classes."""
    mesh = class_mesh()
    x, y, w = problem(11, classes=classes)
    w_sharded = pfc.shard_class_weights(w, mesh)
    local = pfc.padded_num_classes(classes, N) // N
    kwargs = dict(num_classes=classes, m2=0.5, scale=8.0, sample_rate=0.1)
    value, gx, gw, _ = sampled_value_and_grads(x, y, w_sharded, jax.random.key(3), **kwargs)
    # With s = 8 no exp underflows: the sampled classes are exactly the columns with gradient.
    sampled = np.flatnonzero(np.any(gw != 0.0, axis=0))
    assert len(sampled) == N * int(0.1 * local)
    assert set(y.tolist()) <= set(sampled.tolist())  # every positive is kept
    assert sampled.max() < classes  # padding is never sampled
    relabeled = np.searchsorted(sampled, y).astype(np.int32)
    expected, ex, ew, _ = value_and_grads(
        combined_margin_loss, x, relabeled, w[:, sampled], m2=0.5, scale=8.0
    )
    assert_close(value, expected, 1e-6, "loss")
    assert_close(gx, ex, 2e-5, "d/d embeddings")
    assert_close(gw[:, sampled], ew, 2e-5, "d/d sampled class_weights")
    exact = value_and_grads(
        pfc.partial_fc_loss,
        x,
        y,
        w_sharded,
        mesh=mesh,
        **{k: v for k, v in kwargs.items() if k != "sample_rate"},
    )[0]
    assert value < exact  # fewer negatives in the normaliser


def test_sampling_depends_on_the_key_only():
    x, y, w = problem(12)
    w_sharded = pfc.shard_class_weights(w, class_mesh())

    def sampled(key):
        gw = sampled_value_and_grads(x, y, w_sharded, key, scale=8.0, sample_rate=0.2)[2]
        return np.flatnonzero(np.any(gw != 0.0, axis=0))

    first, again, other = (
        sampled(jax.random.key(0)),
        sampled(jax.random.key(0)),
        sampled(jax.random.key(1)),
    )
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)
    # Each device draws its own negatives (the key is folded with the device index): the
    # positions sampled on shard 0 and shard 1 overlap about as much as chance (r = 0.2).
    local = C // N
    shard0, shard1 = (set((first[first // local == k] % local).tolist()) for k in (0, 1))
    assert len(shard0 & shard1) < 0.5 * len(shard0)


def test_sampled_batch_sharded_equals_replicated():
    mesh = class_mesh()
    x, y, w = problem(13)
    w_sharded = pfc.shard_class_weights(w, mesh)
    key = jax.random.key(5)
    replicated = sampled_value_and_grads(x, y, w_sharded, key, sample_rate=0.1, m3=0.2)
    rows = NamedSharding(mesh, P("model"))
    xs, ys = jax.device_put(x, rows), jax.device_put(y, rows)
    sharded = sampled_value_and_grads(
        xs, ys, w_sharded, key, sample_rate=0.1, m3=0.2, batch_sharded=True
    )
    for a, b, what in zip(sharded[:3], replicated[:3], ("loss", "dx", "dW"), strict=True):
        assert_close(a, b, 2e-5, what)


def test_sampled_arguments_are_checked():
    mesh = class_mesh()
    x, y, w = problem(14)
    w_sharded = pfc.shard_class_weights(w, mesh)
    key = jax.random.key(0)
    with pytest.raises(ValueError, match="sample_rate must keep at least min.*32"):
        pfc.partial_fc_arcface_loss(x, y, w_sharded, mesh=mesh, sample_rate=0.01, key=key)
    with pytest.raises(ValueError, match="key"):
        pfc.partial_fc_cosface_loss(x, y, w_sharded, mesh=mesh, sample_rate=0.5)
    for bad in (0.0, 1.5):
        with pytest.raises(ValueError, match=r"sample_rate must be in \(0, 1\]"):
            pfc.partial_fc_loss(x, y, w_sharded, mesh=mesh, sample_rate=bad, key=key)
