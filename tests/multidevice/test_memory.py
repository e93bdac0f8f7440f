"""Cross-batch memory on 8 virtual CPU devices: every device keeps the same memory (gathered
in device order), and memory_loss's value and gradients equal the single-device run on the
concatenated batch."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from mlx_jax import losses as L
from mlx_jax import parallel
from mlx_jax.memory import create_memory, enqueue, memory_loss

N = 8
B, D = 16, 4  # 2 rows per device
AXIS = parallel.DATA_AXIS


@pytest.fixture(scope="module")
def mesh():
    return parallel.data_mesh(N)


def _batch(seed):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(B, D)).astype(np.float32)
    y = rng.integers(0, 4, B).astype(np.int32)
    w = np.ones(B, np.float32)
    w[[5, 10]] = 0.0  # padding rows: neither scored nor stored
    return x, y, w


@pytest.mark.parametrize("loss", [L.contrastive_loss, L.multi_similarity_loss, L.supcon_loss])
def test_memory_training_steps_equal_single_device(mesh, loss):
    memory_specs = jax.tree.map(lambda _: P(), create_memory(24, D))

    def sharded_step(x, y, w, memory):
        def value(x):
            return memory_loss(loss, x, y, memory, weights=w, axis_name=AXIS)

        value_and_grad = jax.value_and_grad(value)(x)
        new_memory = enqueue(memory, x, y, weights=w, axis_name=AXIS)
        # each device's copy, stacked, to check they are all equal
        copies = jax.tree.map(lambda a: a[None], new_memory)
        return value_and_grad, copies

    copies_specs = jax.tree.map(lambda _: P(AXIS), create_memory(24, D))
    step = jax.jit(
        jax.shard_map(
            sharded_step,
            mesh=mesh,
            in_specs=(P(AXIS), P(AXIS), P(AXIS), memory_specs),
            out_specs=((P(), P(AXIS)), copies_specs),
        )
    )

    def single_step(x, y, w, memory):
        value_and_grad = jax.value_and_grad(lambda x: memory_loss(loss, x, y, memory, weights=w))(x)
        return value_and_grad, enqueue(memory, x, y, weights=w)

    sharded_memory = single_memory = create_memory(24, D)
    for seed in range(4):  # the memory wraps around on the last step
        x, y, w = _batch(seed)
        (value, grad), copies = step(x, y, w, sharded_memory)
        (want_value, want_grad), single_memory = single_step(x, y, w, single_memory)
        np.testing.assert_allclose(value, want_value, rtol=2e-5, err_msg=f"step {seed}")
        np.testing.assert_allclose(grad, want_grad, rtol=2e-5, atol=1e-6, err_msg=f"step {seed}")
        for got, want in zip(jax.tree.leaves(copies), jax.tree.leaves(single_memory), strict=True):
            got = np.asarray(got)
            assert got.shape[0] == N
            for device in range(N):  # identical on every device, and equal to one device's
                np.testing.assert_array_equal(got[device], np.asarray(want))
        sharded_memory = jax.tree.map(lambda a: jnp.asarray(a[0]), copies)
    assert bool(np.all(np.asarray(single_memory.valid)))
