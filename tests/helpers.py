"""Shared test utilities: random batches, gradient and finiteness checks."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.test_util import check_grads


def random_batch(seed: int, batch: int = 12, dim: int = 5, classes: int = 3, scale: float = 1.0):
    """Float32 embeddings [batch, dim] and int32 labels with every class present twice or more."""
    rng = np.random.default_rng(seed)
    labels = np.arange(batch) % classes
    rng.shuffle(labels)
    embeddings = rng.normal(size=(batch, dim)) * scale
    return embeddings.astype(np.float32), labels.astype(np.int32)


def assert_finite_value_and_grad(fn, *args) -> None:
    """fn(*args) and its gradient w.r.t. every float argument are finite."""
    float_args = tuple(
        i for i, a in enumerate(args) if jnp.issubdtype(jnp.asarray(a).dtype, jnp.floating)
    )
    value, grads = jax.value_and_grad(fn, argnums=float_args)(*args)
    assert np.isfinite(np.asarray(value)).all(), f"non-finite loss {value}"
    for g in jax.tree_util.tree_leaves(grads):
        assert np.isfinite(np.asarray(g)).all(), "non-finite gradient"


def check_grads_x64(fn, *args, order: int = 1, eps: float = 1e-6, tol: float = 1e-5) -> None:
    """Finite-difference gradient check in float64 (float32 differences are too noisy)."""
    with jax.enable_x64(True):
        args64 = tuple(jnp.asarray(np.asarray(a, np.float64)) for a in args)
        check_grads(fn, args64, order=order, modes=("rev",), eps=eps, atol=tol, rtol=tol)


def permuted(seed: int, *arrays):
    perm = np.random.default_rng(seed).permutation(len(arrays[0]))
    return tuple(np.asarray(a)[perm] for a in arrays)


def head_value_and_grads(loss):
    """``value_and_grads(x, y, w, weights=None, **config)`` for a class-weight head
    ``loss(x, y, w, *, weights, **config)``: jitted (one compilation per configuration and
    shape) value and gradients w.r.t. the embeddings and the class weights."""

    @functools.cache
    def compiled(**config):
        return jax.jit(
            jax.value_and_grad(
                lambda e, y, cw, s: loss(e, y, cw, weights=s, **config), argnums=(0, 2)
            )
        )

    def value_and_grads(x, y, w, weights=None, **config):
        if config.get("class_block_size", 0) is None:  # the default: one compilation for both
            del config["class_block_size"]
        if weights is None:  # ones: one compilation with and without weights
            weights = np.ones(len(y), np.asarray(x).dtype)
        return compiled(**config)(x, y, w, weights)

    return value_and_grads
