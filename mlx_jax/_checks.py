"""Argument checks shared by every public function (package-internal: the modules of mlx_jax
import this module; users do not).

Shapes and dtypes are static under ``jax.jit``, so these checks raise at trace time with a
message naming the argument and the expected shape. Label *values* are only known at trace time
when they are concrete (eager calls); then they are range-checked too. Under ``jit`` an
out-of-range label cannot raise, so gathers by label use ``fill`` mode and turn it into NaN
(visible) rather than JAX's default clamping (silently wrong).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np


def compute_dtype(dtype: jnp.dtype) -> jnp.dtype:
    """Float dtype used for the math: at least float32 (bf16/f16 inputs are promoted)."""
    return jnp.promote_types(dtype, jnp.float32)


def _shape_str(x) -> str:
    return "[" + ", ".join(str(d) for d in np.shape(x)) + "]"


def float_array(x, name: str, rank: int, shape_doc: str) -> jax.Array:
    """Checks that ``x`` is a floating array of the given rank; returns it in compute dtype."""
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"{name} must be a floating-point array {shape_doc}, got dtype {x.dtype}")
    if x.ndim != rank:
        raise ValueError(
            f"{name} must have shape {shape_doc} (rank {rank}), got shape {_shape_str(x)}"
        )
    return x.astype(compute_dtype(x.dtype))


def embeddings_array(embeddings, name: str = "embeddings") -> jax.Array:
    """``embeddings`` [batch, dim] float with batch, dim >= 1 → compute dtype."""
    x = float_array(embeddings, name, 2, "[batch, dim]")
    if x.shape[0] < 1 or x.shape[1] < 1:
        raise ValueError(f"{name} must have shape [batch, dim] with batch, dim >= 1, got {x.shape}")
    return x


def is_concrete(x) -> bool:
    """Whether ``x`` has a value this process can read at trace time: value checks (ranges,
    signs) run only then. Traced values pass through unchecked, and so do arrays spanning other
    processes' devices (``jax.distributed``: only their local shards are here)."""
    if isinstance(x, jax.core.Tracer):
        return False
    return not isinstance(x, jax.Array) or x.is_fully_addressable or x.is_fully_replicated


def labels_array(
    labels, batch: int, name: str = "labels", num_classes: int | None = None
) -> jax.Array:
    """``labels`` [batch] integer class ids (range-checked when concrete)."""
    labels = jnp.asarray(labels)
    if not jnp.issubdtype(labels.dtype, jnp.integer):
        raise TypeError(
            f"{name} must be an integer array of class ids with shape [{batch}], "
            f"got dtype {labels.dtype}"
        )
    if labels.shape != (batch,):
        raise ValueError(
            f"{name} must have shape [{batch}] (one class id per embedding), "
            f"got shape {_shape_str(labels)}"
        )
    if is_concrete(labels) and labels.size:
        # NumPy, not jnp: inside a jit trace even a closed-over concrete array would turn
        # into a tracer under jnp.min.
        values = np.asarray(labels)
        low = int(values.min())
        high = int(values.max())
        upper = num_classes if num_classes is not None else None
        if low < 0 or (upper is not None and high >= upper):
            bound = f"[0, {upper})" if upper is not None else ">= 0"
            raise ValueError(f"{name} must lie in {bound}, got values from {low} to {high}")
    return labels


def sample_weights(weights, batch: int, dtype, name: str = "weights") -> jax.Array:
    """Per-sample weights [batch] (None → ones). Zero weight excludes a sample entirely."""
    if weights is None:
        return jnp.ones((batch,), dtype)
    weights = jnp.asarray(weights)
    if weights.dtype == jnp.bool_:
        weights = weights.astype(dtype)
    if not (
        jnp.issubdtype(weights.dtype, jnp.floating) or jnp.issubdtype(weights.dtype, jnp.integer)
    ):
        raise TypeError(f"{name} must be a numeric or boolean array [{batch}], got {weights.dtype}")
    if weights.shape != (batch,):
        raise ValueError(
            f"{name} must have shape [{batch}] (one weight per embedding), "
            f"got shape {_shape_str(weights)}"
        )
    if is_concrete(weights) and weights.size and bool(np.any(np.asarray(weights) < 0)):
        raise ValueError(f"{name} must be non-negative")
    return weights.astype(dtype)


def anchors_array(anchors, batch: int, name: str = "anchors") -> jax.Array:
    """A boolean mask [batch]: which samples anchor loss terms."""
    anchors = jnp.asarray(anchors)
    if anchors.dtype != jnp.bool_:
        raise TypeError(f"{name} must be a boolean array [{batch}], got {anchors.dtype}")
    if anchors.shape != (batch,):
        raise ValueError(
            f"{name} must have shape [{batch}] (one flag per embedding), "
            f"got shape {_shape_str(anchors)}"
        )
    return anchors


def centers_array(centers, dim: int, name: str = "centers") -> jax.Array:
    """``centers`` [num_classes, dim] float, matching the embeddings' dim."""
    c = float_array(centers, name, 2, f"[num_classes, {dim}]")
    if c.shape[1] != dim:
        raise ValueError(
            f"{name} must have shape [num_classes, {dim}] (dim of embeddings), "
            f"got shape {_shape_str(c)}"
        )
    return c


def class_weights_array(class_weights, dim: int, name: str = "class_weights") -> jax.Array:
    """``class_weights`` [dim, num_classes] float (a Flax Dense kernel)."""
    w = float_array(class_weights, name, 2, f"[{dim}, num_classes]")
    if w.shape[0] != dim:
        raise ValueError(
            f"{name} must have shape [{dim}, num_classes] (a Dense kernel over the "
            f"embedding dim), got shape {_shape_str(w)}"
        )
    return w


def choice(value, name: str, options: Sequence[str]) -> str:
    """``value`` if it is one of ``options``, else ``ValueError`` naming ``name``."""
    if value not in options:
        raise ValueError(f"{name} must be one of {list(options)}, got {value!r}")
    return value


def non_negative(value, name: str) -> None:
    """Checks a hyperparameter when it is a concrete number (traced values pass through)."""
    if is_concrete(value) and np.ndim(value) == 0 and float(value) < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")


def positive(value, name: str) -> None:
    """Checks a hyperparameter > 0 when it is a concrete number (traced values pass through)."""
    if is_concrete(value) and np.ndim(value) == 0 and float(value) <= 0:
        raise ValueError(f"{name} must be > 0, got {value}")


def positive_int(value, name: str) -> int:
    """``value`` as a Python int >= 1 (``TypeError`` for a non-int or bool, ``ValueError`` for
    < 1), naming ``name``."""
    if not isinstance(value, int | np.integer) or isinstance(value, bool):
        raise TypeError(f"{name} must be a positive int, got {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return int(value)


def gather_rows(table: jax.Array, labels: jax.Array) -> jax.Array:
    """``table[labels]`` where an out-of-range label gives NaN rows instead of clamping.

    JAX's ``fill`` mode only fills indices >= len(table); negative ones would wrap around
    (−1 → last class), so they are moved out of range first.
    """
    labels = jnp.where(labels < 0, table.shape[0], labels)
    return jnp.take(table, labels, axis=0, mode="fill", fill_value=jnp.nan)


def promote_all(*arrays: jax.Array) -> tuple[jax.Array, ...]:
    """Casts arrays to their common compute dtype."""
    dtype = compute_dtype(jnp.result_type(*arrays))
    return tuple(a.astype(dtype) for a in arrays)
