"""The experiments' networks: LeNet++'s 2×2 max-pool equals nnx.max_pool in value and gradient."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from experiments.models import LeNetPlusPlus, max_pool_2x2


def reference_pool(x):
    return nnx.max_pool(x, (2, 2), (2, 2))


@pytest.mark.parametrize("shape", [(3, 8, 8, 5), (2, 7, 7, 4), (2, 6, 9, 3), (1, 2, 2, 1)])
@pytest.mark.parametrize("ties", [False, True])
def test_max_pool_2x2_matches_nnx_max_pool_in_value_and_gradient(shape, ties):
    rng = np.random.default_rng(sum(shape) + ties)
    if ties:  # few distinct values: most windows hold tied maxima (MNIST's flat background)
        x = rng.integers(0, 3, shape).astype(np.float32)
    else:
        x = rng.standard_normal(shape, dtype=np.float32)
    x = jnp.asarray(x)
    np.testing.assert_array_equal(max_pool_2x2(x), reference_pool(x))
    cotangent = jnp.asarray(rng.standard_normal(reference_pool(x).shape, dtype=np.float32))
    ours = jax.vjp(max_pool_2x2, x)[1](cotangent)[0]
    ref = jax.vjp(reference_pool, x)[1](cotangent)[0]
    np.testing.assert_array_equal(ours, ref)
    jitted = jax.jit(jax.grad(lambda v: jnp.sum(max_pool_2x2(v) * cotangent)))(x)
    np.testing.assert_array_equal(jitted, ref)


def test_all_tied_window_sends_its_gradient_to_the_first_element():
    x = jnp.zeros((1, 2, 2, 1))
    grad = jax.grad(lambda v: max_pool_2x2(v).sum())(x)
    np.testing.assert_array_equal(grad[0, :, :, 0], [[1.0, 0.0], [0.0, 0.0]])


def _lenet_with(pool, monkeypatch):
    monkeypatch.setattr("experiments.models.max_pool_2x2", pool)
    return LeNetPlusPlus(1, 2, width=4, rngs=nnx.Rngs(0))


def test_lenet_is_the_same_network_with_either_pool(monkeypatch):
    images = jnp.asarray(np.random.default_rng(0).random((4, 28, 28, 1), dtype=np.float32))
    images = images.at[:, :6].set(0.0)  # a flat band: ties in every pooling stage
    outputs, grads = [], []
    for pool in (max_pool_2x2, reference_pool):
        model = _lenet_with(pool, monkeypatch)
        graphdef, params = nnx.split(model)
        params_count = sum(p.size for p in jax.tree.leaves(params))

        def loss(p, graphdef=graphdef):
            return jnp.sum(nnx.merge(graphdef, p)(images) ** 2)

        outputs.append(nnx.merge(graphdef, params)(images))
        grads.append(jax.grad(loss)(params))
    # 6 convs (5×5 + bias), 7 PReLU slopes, the embedding: width 4 → 4, 4, 8, 8, 16, 16 channels
    channels = [1, 4, 4, 8, 8, 16, 16]
    convs = sum(25 * a * b + b for a, b in zip(channels[:-1], channels[1:], strict=True))
    expected = convs + 7 + 16 * 9 * 2 + 2
    assert params_count == expected
    np.testing.assert_allclose(outputs[0], outputs[1], rtol=1e-6, atol=1e-6)
    for a, b in zip(jax.tree.leaves(grads[0]), jax.tree.leaves(grads[1]), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_torch_init_draws_weights_and_biases_as_pytorch_does():
    torch = pytest.importorskip("torch", reason="torch (parity extra) compares the init")
    torch.manual_seed(0)
    ours = LeNetPlusPlus(1, 128, width=32, init="torch", rngs=nnx.Rngs(0))
    flax_default = LeNetPlusPlus(1, 128, width=32, rngs=nnx.Rngs(0))
    theirs = [torch.nn.Conv2d(1, 32, 5, padding=2), torch.nn.Linear(128 * 3 * 3, 128)]
    pairs = [(ours.convs[0], theirs[0]), (ours.embed, theirs[1])]
    for layer, twin in pairs:
        for name, reference in (("kernel", twin.weight), ("bias", twin.bias)):
            values = np.asarray(getattr(layer, name)[...]).ravel()
            reference = reference.detach().numpy().ravel()
            bound = twin.weight[0].numel() ** -0.5  # PyTorch's U(±1/sqrt(fan_in))
            assert np.abs(reference).max() <= bound and np.abs(values).max() <= bound
            # Uniform on ±bound: std bound/sqrt(3), to 4 standard errors of a sample std.
            rtol = 4 * 0.45 / np.sqrt(values.size)
            for sample in (values, reference):
                np.testing.assert_allclose(sample.std(), bound / np.sqrt(3), rtol=rtol)
    # Flax's default LeCun normal has sqrt(3) times the standard deviation, and zero biases.
    ratio = (
        np.asarray(flax_default.embed.kernel[...]).std() / np.asarray(ours.embed.kernel[...]).std()
    )
    np.testing.assert_allclose(ratio, np.sqrt(3), rtol=0.05)
    assert not np.any(np.asarray(flax_default.embed.bias[...]))


def test_unknown_init_is_refused_by_name():
    with pytest.raises(ValueError, match=r"init must be one of \['flax', 'torch'\], got 'he'"):
        LeNetPlusPlus(1, 2, init="he", rngs=nnx.Rngs(0))
