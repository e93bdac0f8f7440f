"""global_batch_loss(..., split_rows=True) on 8 and 2 virtual CPU devices: each device
evaluates only the terms its own rows anchor, the reduction parts are summed over the devices,
and the value and gradients (embeddings and the margin loss's β) equal the single-device loss
on the concatenated batch, for every loss that takes anchors= and every scalar reduction;
losses that cannot be split are refused by name."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from mlx_jax import losses as L
from mlx_jax import parallel, reductions
from tests.test_reductions_parts import (
    FAST_COMPILE,
    IDS,
    SCALAR,
    SPLIT_CASES,
    assert_close,
    cases,
    split_batch,
)

AXIS = parallel.DATA_AXIS
B = 16  # 2 rows per device on 8 devices, 8 on 2


@pytest.fixture(scope="module")
def meshes():
    return {n: parallel.data_mesh(n) for n in (8, 2)}


def _split_and_single(mesh, loss, hyper, plan):
    """One jitted function of (batches, state): for each batch (x, y, w) and each of its
    reductions in ``plan`` (one tuple per batch), the pair ((value, grads) of the row-split
    global loss under shard_map, (value, grads) of the single-device loss), grads with
    respect to the embeddings and the state."""
    split = parallel.global_batch_loss(loss, AXIS, split_rows=True)

    def sharded(x, y, w, state, reduction):
        def shard(x, y, w, state):
            return split(x, y, *state, weights=w, reduction=reduction, **hyper)

        specs = (P(AXIS), P(AXIS), P(AXIS), P())
        return jax.shard_map(shard, mesh=mesh, in_specs=specs, out_specs=P())(x, y, w, state)

    def single(x, y, w, state, reduction):
        return loss(x, y, *state, weights=w, reduction=reduction, **hyper)

    @functools.partial(jax.jit, compiler_options=FAST_COMPILE)
    def run(batches, state):
        out = []
        for (x, y, w), reductions_ in zip(batches, plan, strict=True):
            for reduction in reductions_:
                pair = [
                    jax.value_and_grad(fn, argnums=(0, 3))(x, y, w, state, reduction)
                    for fn in (sharded, single)
                ]
                out.append(pair)
        return out

    return run


def _assert_equal_to_single_device(name, results, labels, floor=1e-3):
    for label, ((value, grads), (expected, expected_grads)) in zip(labels, results, strict=True):
        assert_close(value, expected, f"{name} {label} value", floor=floor)
        assert_close(grads[0], expected_grads[0], f"{name} {label} d/d embeddings", floor=floor)
        for i, (g, e) in enumerate(zip(grads[1], expected_grads[1], strict=True)):
            assert_close(g, e, f"{name} {label} d/d state {i}", floor=floor)


@pytest.mark.parametrize(("name", "loss", "hyper", "state"), SPLIT_CASES, ids=IDS)
def test_row_split_equals_the_single_device_loss_on_8_devices(meshes, name, loss, hyper, state):
    """Random weights with weight-0 rows, every scalar reduction; and, with "mean", two
    degenerate batches: one class (no negatives; devices 4-7 hold only weight-0 rows) and every
    label different (no positive pairs). Where their gradients are 0 analytically they are
    rounding noise (~1e-8): compared to 1e-7 absolute."""
    mixed = split_batch("mixed", B, seed=3)
    degenerate = [split_batch("one_class", B), split_batch("singletons", B)]
    plan = [SCALAR, ("mean",), ("mean",)]
    results = _split_and_single(meshes[8], loss, hyper, plan)([mixed, *degenerate], state)
    _assert_equal_to_single_device(name, results[:3], SCALAR)
    (value, grads), _ = results[0]
    assert float(value) != 0.0 and np.any(np.asarray(grads[0]) != 0)  # not vacuous
    zero_rows = np.flatnonzero(mixed[2] == 0)
    np.testing.assert_array_equal(np.asarray(grads[0])[zero_rows], 0.0)
    _assert_equal_to_single_device(name, results[3:], ("one_class", "singletons"), floor=1e-2)


@pytest.mark.parametrize(
    ("name", "loss", "hyper", "state"),
    **cases("contrastive_pos_neg", "margin_class_beta"),
)
def test_row_split_equals_the_single_device_loss_on_2_devices(meshes, name, loss, hyper, state):
    mixed = split_batch("mixed", B, seed=4)
    results = _split_and_single(meshes[2], loss, hyper, [SCALAR])([mixed], state)
    _assert_equal_to_single_device(name, results, SCALAR)


def test_row_split_needs_the_other_devices_rows():
    """Guards the fixture: on the disjoint batch each device's rows have their negatives on
    other devices only, so the split form must gather."""
    x, y, w = split_batch("mixed", B)
    y = np.repeat(np.arange(8), 2).astype(np.int32)  # device k holds class k only
    mesh = parallel.data_mesh(8)
    split = parallel.global_batch_loss(L.contrastive_loss, AXIS, split_rows=True)

    def shard(x, y, w):
        return split(x, y, weights=w, balance="pos_neg")

    specs = (P(AXIS),) * 3
    value = jax.jit(jax.shard_map(shard, mesh=mesh, in_specs=specs, out_specs=P()))(x, y, w)
    expected = L.contrastive_loss(x, y, weights=w, balance="pos_neg")
    assert_close(value, expected, "value")
    negatives_only = L.contrastive_loss(x, y, weights=w, reduction="parts", balance="pos_neg")[1]
    assert float(negatives_only.weight) > 0


def _traced_split(mesh, loss, **hyper):
    split = parallel.global_batch_loss(loss, AXIS, split_rows=True)
    x, y, w = split_batch("mixed", B)
    fn = jax.shard_map(
        lambda x, y, w: split(x, y, weights=w, **hyper),
        mesh=mesh,
        in_specs=(P(AXIS),) * 3,
        out_specs=P(),
    )
    return jax.jit(fn).lower(x, y, w)


def test_unsplittable_losses_and_reductions_are_refused_by_name(meshes):
    with pytest.raises(ValueError, match="npairs_loss cannot be split by anchor rows: it takes"):
        parallel.global_batch_loss(L.npairs_loss, AXIS, split_rows=True)
    with pytest.raises(ValueError, match="center_loss cannot be split by anchor rows"):
        parallel.global_batch_loss(L.center_loss, AXIS, split_rows=True)

    def unsplittable(x, y, *, weights=None, anchors=None, reduction="mean"):
        reductions.check_reduction(reduction)  # no "parts"
        return jnp.max(x)

    with pytest.raises(ValueError, match="unsplittable cannot be split .* not a ratio of sums"):
        _traced_split(meshes[8], unsplittable)
    with pytest.raises(ValueError, match="row-split form adds every device's sums.*got 'none'"):
        _traced_split(meshes[8], L.circle_loss, reduction="none")
    with pytest.raises(ValueError, match="sets anchors= itself"):
        _traced_split(meshes[8], L.circle_loss, anchors=jnp.ones(2, bool))
    with pytest.raises(ValueError, match="exclude each other"):
        parallel.global_batch_loss(L.circle_loss, AXIS, per_sample=True, split_rows=True)
    # one device: the loss itself, after the same check
    assert parallel.global_batch_loss(L.circle_loss, None, split_rows=True) is L.circle_loss
