"""mlx_jax.parallel on 8 virtual CPU devices: global-batch losses, their gradients, the global
center α update and a data-parallel train step equal the single-device computation on the
concatenated batch."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from mlx_jax import centers as centers_lib
from mlx_jax import losses as L
from mlx_jax import parallel
from mlx_jax.heads import CenterStore

N = 8
B, D, C = 32, 6, 10  # 4 rows per device
AXIS = parallel.DATA_AXIS


@pytest.fixture(scope="module")
def mesh():
    return parallel.data_mesh(N)


def _batch(kind: str, seed: int = 0):
    """Embeddings [B, D], labels [B], weights [B] (uneven, with weight-0 padding rows)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(B, D)).astype(np.float32)
    if kind == "mixed":  # every class on several devices
        y = rng.permutation(np.arange(B) % 6)
    elif kind == "one_device_class":  # class 9 only on device 5 (rows 20..23)
        y = rng.permutation(np.arange(B) % 5)
        y[[20, 22]] = 9
    elif kind == "disjoint":  # device k holds only class k: every negative is on another device
        y = np.repeat(np.arange(N), B // N)
    else:
        raise ValueError(kind)
    w = rng.uniform(0.5, 2.0, size=B).astype(np.float32)
    w[[3, 12, 31]] = 0.0  # padding rows
    x[[3, 12, 31]] = 100.0  # would dominate every loss if they were not excluded
    return x, y.astype(np.int32), w


KINDS = ["mixed", "one_device_class", "disjoint"]


def _state(seed: int = 1):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(C, D)).astype(np.float32)
    class_weights = rng.normal(size=(D, C)).astype(np.float32)
    return {"centers": centers, "class_weights": class_weights, "scale": np.float32(8.0)}


def _cosface_learned_scale(x, y, class_weights, scale, **hyper):
    """CosFace with its scale s as a trained, replicated parameter: its gradient is a sum over
    every device's samples."""
    return L.cosface_loss(x, y, class_weights, scale=scale, **hyper)


# (name, loss, state keys, hyperparameters, per_sample)
CASES = [
    ("contrastive", L.contrastive_loss, (), {}, False),
    (
        "contrastive_pml",
        L.contrastive_loss,
        (),
        {"squared": False, "reduction": "mean_nonzero"},
        False,
    ),
    ("triplet_batch_hard", L.triplet_loss, (), {"mining": "batch_hard"}, False),
    ("triplet_semihard", L.triplet_loss, (), {"mining": "semihard"}, False),
    ("circle", L.circle_loss, (), {"m": 0.4, "gamma": 80.0}, False),
    ("standalone_center", L.standalone_center_loss, ("centers",), {}, False),
    ("center_gathered", L.center_loss, ("centers",), {}, False),
    ("center_per_sample", L.center_loss, ("centers",), {}, True),
    ("center_per_sample_sum", L.center_loss, ("centers",), {"reduction": "sum"}, True),
    ("arcface_gathered", L.arcface_loss, ("class_weights",), {}, False),
    ("arcface_per_sample", L.arcface_loss, ("class_weights",), {}, True),
    (
        "arcface_per_sample_nonzero",
        L.arcface_loss,
        ("class_weights",),
        {"reduction": "mean_nonzero"},
        True,
    ),
    # The heads' hand-written VJPs get replicated inputs (the fixed scale, class weights).
    ("arcface_class_blocks", L.arcface_loss, ("class_weights",), {"class_block_size": 4}, True),
    ("sphereface_per_sample", L.sphereface_loss, ("class_weights",), {}, True),
    ("cosface_learned_scale", _cosface_learned_scale, ("class_weights", "scale"), {}, True),
    (
        "cosface_learned_scale_blocks",
        _cosface_learned_scale,
        ("class_weights", "scale"),
        {"class_block_size": 3},
        True,
    ),
]


def _assert_close(actual, expected, what, rtol=2e-5):
    expected = np.asarray(expected)
    scale = max(float(np.max(np.abs(expected))), 1e-3)
    np.testing.assert_allclose(
        np.asarray(actual), expected, rtol=rtol, atol=rtol * scale, err_msg=what
    )


def _sharded_value_and_grad(mesh, loss, hyper, per_sample, x, y, w, state):
    global_loss = parallel.global_batch_loss(loss, AXIS, per_sample=per_sample)

    def shard(x, y, w, state):
        return global_loss(x, y, *state, weights=w, **hyper)

    def f(x, state):
        specs = (P(AXIS), P(AXIS), P(AXIS), P())
        return jax.shard_map(shard, mesh=mesh, in_specs=specs, out_specs=P())(x, y, w, state)

    return jax.jit(jax.value_and_grad(f, argnums=(0, 1)))(x, state)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(
    ("name", "loss", "keys", "hyper", "per_sample"), CASES, ids=[c[0] for c in CASES]
)
def test_global_loss_value_and_gradients_equal_single_device(
    mesh, kind, name, loss, keys, hyper, per_sample
):
    x, y, w = _batch(kind)
    state = tuple(_state()[k] for k in keys)

    def single(x, state):
        return loss(x, y, *state, weights=w, **hyper)

    value, (grad_x, grad_state) = jax.value_and_grad(single, argnums=(0, 1))(x, state)
    assert float(value) != 0.0 and np.any(grad_x != 0)  # the comparison is not vacuous
    value8, (grad_x8, grad_state8) = _sharded_value_and_grad(
        mesh, loss, hyper, per_sample, x, y, w, state
    )
    _assert_close(value8, value, f"{name} value")
    _assert_close(grad_x8, grad_x, f"{name} d/d embeddings")
    np.testing.assert_array_equal(np.asarray(grad_x8)[[3, 12, 31]], 0.0)  # padding rows
    for key, g8, g in zip(keys, grad_state8, grad_state, strict=True):
        _assert_close(g8, g, f"{name} d/d {key}")


def _on_shards(mesh, fn, x, y, w, out_specs=None):
    """fn(x, y, w) under shard_map with the three batch arrays split over the devices."""
    out_specs = P() if out_specs is None else out_specs
    return jax.shard_map(fn, mesh=mesh, in_specs=(P(AXIS),) * 3, out_specs=out_specs)(x, y, w)


def test_disjoint_batch_needs_the_other_devices_negatives(mesh):
    """Guards the fixture: per-device losses on the disjoint batch (no negatives locally) are
    0, so only the gathered loss can match the single-device value."""
    x, y, w = _batch("disjoint")
    global_loss = parallel.global_batch_loss(L.triplet_loss, AXIS)

    def per_device(x, y, w):
        return L.triplet_loss(x, y, weights=w, mining="batch_hard")[None]

    local_values = _on_shards(mesh, per_device, x, y, w, out_specs=P(AXIS))
    np.testing.assert_array_equal(np.asarray(local_values), 0.0)
    gathered = _on_shards(
        mesh, lambda x, y, w: global_loss(x, y, weights=w, mining="batch_hard"), x, y, w
    )
    _assert_close(gathered, L.triplet_loss(x, y, weights=w, mining="batch_hard"), "value")
    assert float(gathered) > 0


def test_reduction_none_gathered_returns_the_global_terms(mesh):
    x, y, w = _batch("mixed")
    global_loss = parallel.global_batch_loss(L.circle_loss, AXIS)
    terms = _on_shards(
        mesh, lambda x, y, w: global_loss(x, y, weights=w, reduction="none"), x, y, w
    )
    _assert_close(terms, L.circle_loss(x, y, weights=w, reduction="none"), "terms")


@pytest.mark.parametrize("kind", KINDS)
def test_center_update_and_center_loss_with_global_statistics(mesh, kind):
    x, y, w = _batch(kind)
    centers = _state()["centers"]
    alpha, lam = 0.5, 0.3

    def objective(x, y, w, centers, axis_name):
        center = parallel.global_batch_loss(L.center_loss, axis_name, per_sample=True)
        return lam * center(x, y, centers, weights=w)

    def step(x, y, w, centers, axis_name):
        value, (grad_x, grad_c) = jax.value_and_grad(objective, argnums=(0, 3))(
            x, y, w, centers, axis_name
        )
        new = centers_lib.update_centers(centers, x, y, alpha, weights=w, axis_name=axis_name)
        return value, grad_x, grad_c, new

    expected = step(x, y, w, centers, None)
    sharded = jax.jit(
        parallel.data_parallel(
            functools.partial(step, axis_name=AXIS),
            mesh,
            batch_argnums=(0, 1, 2),
            out_specs=(P(), P(AXIS), P(), P()),
        )
    )
    actual = sharded(x, y, w, centers)
    for what, a, e in zip(
        ["value", "d/dx", "d/dcenters", "centers"], actual, expected, strict=True
    ):
        _assert_close(a, e, what)
    moved = np.any(np.asarray(expected[3]) != centers, axis=1)
    assert moved.sum() == len(set(y[w > 0].tolist()))  # only classes in the batch move
    # The local-statistics update (no psum) differs: the test can tell.
    local = jax.jit(
        parallel.data_parallel(
            lambda x, y, w, c: centers_lib.update_centers(c, x, y, alpha, weights=w),
            mesh,
            batch_argnums=(0, 1, 2),
            out_specs=P(AXIS),
        )
    )(x, y, w, centers)
    assert not np.allclose(np.asarray(local)[:C], np.asarray(expected[3]), atol=1e-4)


def test_center_store_update_sums_over_devices(mesh):
    x, y, w = _batch("one_device_class")
    store = CenterStore(C, D)
    expected = centers_lib.update_centers(store(), x, y, 0.5, weights=w)
    graphdef, state = nnx.split(store)

    def update(state, x, y, w):
        store = nnx.merge(graphdef, state)
        store.update(x, y, 0.5, weights=w, axis_name=AXIS)
        return nnx.state(store)

    new_state = jax.jit(parallel.data_parallel(update, mesh, batch_argnums=(1, 2, 3)))(
        state, x, y, w
    )
    _assert_close(nnx.merge(graphdef, new_state)(), expected, "centers")


# ----------------------------------------------------------------------------- a train step


class _Tiny(nnx.Module):
    """Linear → BatchNorm (batch statistics synchronised over ``axis_name``) → PReLU → Linear,
    with arcface class weights and α-rule centers."""

    def __init__(self, axis_name: str | None, *, rngs: nnx.Rngs):
        self.hidden = nnx.Linear(5, 16, rngs=rngs)
        self.norm = nnx.BatchNorm(16, axis_name=axis_name, rngs=rngs)
        self.act = nnx.PReLU(0.25)
        self.embed = nnx.Linear(16, D, rngs=rngs)
        self.class_weights = nnx.Param(jax.random.normal(rngs.params(), (D, C)))
        self.centers = CenterStore(C, D)

    def __call__(self, x):
        return self.embed(self.act(self.norm(self.hidden(x))))


def _train_step(graphdef, state, images, labels, weights, axis_name):
    model, optimizer = nnx.merge(graphdef, state)
    triplet = parallel.global_batch_loss(L.triplet_loss, axis_name)
    arcface = parallel.global_batch_loss(L.arcface_loss, axis_name, per_sample=True)

    def loss_fn(model):
        f = model(images)
        loss = triplet(f, labels, weights=weights) + 0.1 * arcface(
            f, labels, model.class_weights[...], weights=weights, scale=8.0
        )
        return loss, f

    (loss, features), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
    optimizer.update(model, grads)
    model.centers.update(features, labels, 0.5, weights=weights, axis_name=axis_name)
    return nnx.state((model, optimizer)), loss


def _tiny(axis_name):
    model = _Tiny(axis_name, rngs=nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, optax.sgd(0.1, momentum=0.9), wrt=nnx.Param)
    return nnx.split((model, optimizer))


def test_data_parallel_train_step_equals_single_device_step(mesh):
    rng = np.random.default_rng(3)
    graphdef1, state1 = _tiny(None)
    graphdef8, state8 = _tiny(AXIS)
    single = jax.jit(functools.partial(_train_step, graphdef1, axis_name=None))
    sharded = jax.jit(
        parallel.data_parallel(
            functools.partial(_train_step, graphdef8, axis_name=AXIS), mesh, batch_argnums=(1, 2, 3)
        )
    )
    state8 = parallel.replicate(mesh, state8)
    losses1, losses8 = [], []
    for _ in range(3):
        images = rng.normal(size=(B, 5)).astype(np.float32)
        labels = rng.permutation(np.arange(B) % C).astype(np.int32)
        weights = np.ones(B, np.float32)
        weights[-3:] = 0.0
        state1, loss1 = single(state1, images, labels, weights)
        batch = parallel.shard_batch(mesh, (images, labels, weights))
        state8, loss8 = sharded(state8, *batch)
        losses1.append(float(loss1))
        losses8.append(float(loss8))
    np.testing.assert_allclose(losses8, losses1, rtol=2e-5)
    leaves1 = jax.tree_util.tree_leaves_with_path(state1)
    leaves8 = jax.tree.leaves(state8)
    assert len(leaves1) == len(leaves8)
    for (path, a), b in zip(leaves1, leaves8, strict=True):
        _assert_close(b, a, jax.tree_util.keystr(path), rtol=1e-4)
    model1, _ = nnx.merge(graphdef1, state1)
    assert np.any(np.asarray(model1.centers()) != 0)  # the centers did move
    assert np.any(np.asarray(model1.norm.mean[...]) != 0)  # and the BatchNorm statistics


# ----------------------------------------------------------------------------- bad input


def test_batch_not_divisible_by_devices_names_the_argument(mesh):
    def step(state, images, labels):
        return jnp.sum(images) + state

    wrapped = parallel.data_parallel(step, mesh, batch_argnums=(1, 2))
    with pytest.raises(
        ValueError,
        match=r"images \(leading dimension\) must be divisible by the number of devices \(8\).*got 30",
    ):
        wrapped(jnp.zeros(()), jnp.zeros((30, 2)), jnp.zeros((32,), jnp.int32))
    with pytest.raises(ValueError, match=r"labels \(leading dimension\) must be divisible"):
        wrapped(jnp.zeros(()), jnp.zeros((32, 2)), jnp.zeros((36,), jnp.int32))
    with pytest.raises(ValueError, match=r"batch\[1\] \(leading dimension\) must be divisible"):
        parallel.shard_batch(mesh, (np.zeros((32, 2)), np.zeros(20)))
    with pytest.raises(ValueError, match="batch_size must be divisible by the number of devices"):
        parallel.check_batch_divisible(100, 8)


def test_bad_mesh_arguments_are_named():
    with pytest.raises(ValueError, match=r"num_devices must be an int in \[1, 8\]"):
        parallel.data_mesh(9)
    with pytest.raises(ValueError, match="num_devices"):
        parallel.data_mesh(0)
    mesh = parallel.data_mesh(4)
    assert mesh.shape == {AXIS: 4}
    with pytest.raises(ValueError, match="axis_name must be an axis of mesh"):
        parallel.batch_sharding(mesh, "batch")


def test_per_sample_rejects_an_unknown_reduction(mesh):
    x, y, w = _batch("mixed")
    loss = parallel.global_batch_loss(L.center_loss, AXIS, per_sample=True)
    with pytest.raises(ValueError, match="reduction must be one of"):
        jax.shard_map(
            lambda x, y: loss(x, y, _state()["centers"], reduction="avg"),
            mesh=mesh,
            in_specs=(P(AXIS), P(AXIS)),
            out_specs=P(),
        )(x, y)


def test_axis_name_none_is_the_single_device_loss():
    assert parallel.global_batch_loss(L.triplet_loss, None) is L.triplet_loss
    tree = {"a": jnp.ones(3)}
    assert parallel.gather_batch(tree, None) is tree
    assert parallel.mean_over_devices(tree, None) is tree
    assert parallel.sum_over_devices(tree, None) is tree
