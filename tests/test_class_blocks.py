"""Margin heads over blocks of classes (``class_block_size``) against the plain references and
the dense form: values, gradients, degenerate inputs, bad labels, memory."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mlx_jax.losses import class_blocks
from mlx_jax.losses.margin_softmax import (
    arcface_loss,
    combined_margin_loss,
    cosface_loss,
    sphereface_loss,
)
from tests import references_margin as ref
from tests.helpers import assert_finite_value_and_grad, check_grads_x64
from tests.test_margin_softmax import (
    CONFIGS,
    DEGENERATE_IDS,
    DEGENERATE_LOSSES,
    LOSSES,
    degenerate_cases,
    random_problem,
)

C_WIDE = 37  # a class count no block size below divides evenly: the last block is padded


def value_and_grads(loss, x, y, w, **config):
    return jax.value_and_grad(lambda e, cw: loss(e, y, cw, **config), argnums=(0, 1))(x, w)


# every configuration with a padded last block; block sizes 1 and 8 on a subset
BLOCK_CASES = [(name, config, 3) for name, config in CONFIGS] + [
    (name, config, block) for name, config in CONFIGS[::4] for block in (1, 8)
]
BLOCK_IDS = [f"{i}-block{block}" for i, (_, _, block) in enumerate(BLOCK_CASES)]


@pytest.mark.parametrize("name, config, block", BLOCK_CASES, ids=BLOCK_IDS)
def test_matches_reference_and_dense_gradients(name, config, block):
    ours, theirs = LOSSES[name]
    x, y, w = random_problem(0, batch=16, classes=C_WIDE, opposite=4)
    expected = theirs(x, y, w, **config)
    value, (grad_x, grad_w) = value_and_grads(ours, x, y, w, class_block_size=block, **config)
    np.testing.assert_allclose(value, expected, rtol=1e-5, atol=1e-6)
    _, (dense_x, dense_w) = value_and_grads(ours, x, y, w, **config)
    np.testing.assert_allclose(grad_x, dense_x, rtol=2e-4, atol=1e-5 * np.abs(dense_x).max())
    np.testing.assert_allclose(grad_w, dense_w, rtol=2e-4, atol=1e-5 * np.abs(dense_w).max())


GRAD_CONFIGS = [
    ("arcface", dict(scale=8.0)),
    ("cosface", dict(scale=8.0, margin=0.2)),
    ("combined", dict(m1=1.5, m2=0.2, m3=0.1, scale=8.0)),
    ("sphereface", dict(margin=2, annealing_lambda=1.0)),  # per-sample scale ‖x‖
    ("sphereface", dict(margin=3, annealing_lambda=2.5, scale=10.0)),
]


@pytest.mark.parametrize("name, config", GRAD_CONFIGS, ids=[n for n, _ in GRAD_CONFIGS])
def test_gradients_match_finite_differences(name, config):
    ours, _ = LOSSES[name]
    x, y, w = random_problem(6, batch=8, dim=4, classes=7, opposite=2)
    check_grads_x64(lambda e, cw: ours(e, y, cw, class_block_size=3, **config), x, w)


def test_per_sample_weights_and_reductions():
    x, y, w = random_problem(13, batch=12, classes=C_WIDE, opposite=2)
    y = y % 9  # the gradient check below keeps 9 classes
    sw = np.linspace(0.0, 2.0, 12).astype(np.float32)
    for reduction in ("mean", "sum", "none"):
        np.testing.assert_allclose(
            arcface_loss(x, y, w, weights=sw, reduction=reduction, class_block_size=5),
            ref.arcface(x, y, w, weights=sw, reduction=reduction),
            rtol=1e-5,
            atol=1e-6,
        )
    check_grads_x64(
        lambda e, cw, s: cosface_loss(e, y[1:7], cw, scale=8.0, weights=s, class_block_size=4),
        x[1:7],
        w[:, :9],
        sw[1:7],
    )


def test_block_at_least_the_class_count_is_the_dense_path():
    x, y, w = random_problem(2, classes=C_WIDE)
    dense = arcface_loss(x, y, w, reduction="none")
    for block in (C_WIDE, 4 * C_WIDE):
        np.testing.assert_array_equal(
            arcface_loss(x, y, w, reduction="none", class_block_size=block), dense
        )


class TestVariants(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_jit_and_eager_agree(self):
        x, y, w = random_problem(8, classes=C_WIDE, opposite=3)
        for name, config in CONFIGS[::3]:
            ours, theirs = LOSSES[name]
            fn = self.variant(functools.partial(ours, class_block_size=6, **config))
            np.testing.assert_allclose(fn(x, y, w), theirs(x, y, w, **config), rtol=1e-5)


@pytest.mark.parametrize("case", list(degenerate_cases()))
@pytest.mark.parametrize("loss", DEGENERATE_LOSSES[::2], ids=DEGENERATE_IDS[::2])
def test_degenerate_inputs_are_finite(loss, case):
    x, y, w = degenerate_cases()[case]
    blocked = functools.partial(loss, class_block_size=1)
    assert_finite_value_and_grad(lambda e, cw: blocked(e, y, cw), x, w)
    assert_finite_value_and_grad(jax.jit(lambda e, cw: blocked(e, y, cw)), x, w)


def test_low_precision_inputs_compute_in_float32():
    x, y, w = random_problem(12, classes=C_WIDE)
    xb, wb = jnp.asarray(x, jnp.bfloat16), jnp.asarray(w, jnp.bfloat16)
    out = arcface_loss(xb, y, wb, class_block_size=8)
    assert out.dtype == jnp.float32
    expected = ref.arcface(np.asarray(xb, np.float64), y, np.asarray(wb, np.float64))
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)


def temp_bytes(fn, *args) -> int:
    return jax.jit(fn).lower(*args).compile().memory_analysis().temp_size_in_bytes


def test_no_batch_by_classes_array_is_formed():
    batch, dim, classes, block = 256, 8, 20_000, 500
    x = jnp.ones((batch, dim), jnp.float32)
    y = jnp.zeros((batch,), jnp.int32)
    w = jnp.ones((dim, classes), jnp.float32)

    def grads(block_size):
        return jax.grad(
            lambda e, cw: cosface_loss(e, y, cw, class_block_size=block_size), argnums=(0, 1)
        )

    logits_bytes = batch * classes * 4
    dense = temp_bytes(grads(None), x, w)
    blocked = temp_bytes(grads(block), x, w)
    assert dense >= logits_bytes, dense  # the dense form holds [B, C] arrays
    # blocked: [B, block] tiles plus O(D·C) copies of W (normalized, padded, gradient)
    assert blocked < logits_bytes / 4, (blocked, logits_bytes)


@pytest.mark.parametrize(
    "value, error, match",
    [
        (0, ValueError, "class_block_size must be >= 1, got 0"),
        (-3, ValueError, "class_block_size must be >= 1"),
        (2.0, TypeError, "class_block_size must be None or a positive int"),
        (True, TypeError, "class_block_size must be None or a positive int"),
    ],
)
def test_bad_class_block_size_raises(value, error, match):
    x, y, w = random_problem(1)
    for loss in (arcface_loss, cosface_loss, combined_margin_loss, sphereface_loss):
        with pytest.raises(error, match=match):
            loss(x, y, w, class_block_size=value)


def test_core_function_scale_gradient():
    """∂L/∂s_i of the core against autodiff of the dense expression (SphereFace's ‖x‖ path)."""
    x, y, w = random_problem(4, batch=6, classes=9)
    x_hat = x / np.linalg.norm(x, axis=1, keepdims=True)
    w_hat = w / np.linalg.norm(w, axis=0, keepdims=True)
    target = class_blocks.target_cosines(x_hat, w_hat, y) - 0.2
    scale = np.linspace(2.0, 9.0, 6).astype(np.float32)

    def dense(s, t):
        cos = x_hat @ w_hat
        z = s[:, None] * jnp.where(np.arange(9)[None, :] == y[:, None], t[:, None], cos)
        return jnp.sum(jax.nn.logsumexp(z, axis=1) - s * t)

    def blocked(s, t):
        return jnp.sum(class_blocks.blockwise_margin_cross_entropy(x_hat, w_hat, t, y, s, 4))

    np.testing.assert_allclose(blocked(scale, target), dense(scale, target), rtol=1e-6)
    for mine, theirs in zip(
        jax.grad(blocked, argnums=(0, 1))(scale, target),
        jax.grad(dense, argnums=(0, 1))(scale, target),
        strict=True,
    ):
        np.testing.assert_allclose(mine, theirs, rtol=1e-5, atol=1e-6)
