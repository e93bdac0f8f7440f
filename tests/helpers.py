"""Shared test utilities: random batches, gradient and finiteness checks."""

from __future__ import annotations

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
