"""Chunked host-side evaluation shared by :mod:`mlx_jax.metrics` and :mod:`mlx_jax.retrieval`
(package-internal).

A jitted function is applied to fixed-size chunks of query rows against all reference rows, so
the [queries, references] matrix never exists at once, and each chunk's result is brought to
the host while the next chunk is computed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

# Automatic chunk size: at most CHUNK_ELEMENTS scores per chunk (2**22 float32 = 16 MiB) and at
# most MAX_CHUNK queries.
CHUNK_ELEMENTS = 2**22
MAX_CHUNK = 1024


def chunk_rows(chunk_size: int | None, num_queries: int, num_columns: int) -> int:
    """Query rows per chunk: ``chunk_size`` (a positive int, checked) or, for None, as many as
    keep a chunk at <= CHUNK_ELEMENTS scores (at most MAX_CHUNK); never more than the queries."""
    if chunk_size is None:
        chunk_size = max(1, min(MAX_CHUNK, CHUNK_ELEMENTS // max(num_columns, 1)))
    elif not isinstance(chunk_size, int | np.integer) or isinstance(chunk_size, bool):
        raise TypeError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    elif chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    return int(min(chunk_size, num_queries))


def map_chunks(
    fn: Callable[..., Any], queries: jax.Array, chunk: int, *args
) -> Iterator[tuple[int, Any]]:
    """Yields ``(start, np.asarray(fn(queries[start:start + chunk], start, *args)))``.

    Queries are zero-padded to a multiple of ``chunk`` so ``fn`` compiles once; the rows of the
    last result past the end are dropped. One chunk is dispatched ahead, so JAX computes the next
    chunk while the caller's NumPy code processes the current one. ``fn`` may return a tuple (any
    pytree) of arrays with the chunk's rows first; each one is converted and trimmed.
    """
    n = queries.shape[0]
    num_chunks = -(-n // chunk)
    padded = jnp.pad(queries, ((0, num_chunks * chunk - n), (0, 0)))
    pending: tuple[int, jax.Array] | None = None
    for i in range(num_chunks):
        start = i * chunk
        out = fn(jax.lax.dynamic_slice_in_dim(padded, start, chunk), start, *args)
        if pending is not None:
            yield pending[0], _rows_to_host(pending[1], n - pending[0])
        pending = (start, out)
    assert pending is not None
    yield pending[0], _rows_to_host(pending[1], n - pending[0])


def _rows_to_host(out, rows: int):
    """``out`` (an array or pytree of arrays) as NumPy arrays, keeping the first ``rows`` rows."""
    return jax.tree.map(lambda a: np.asarray(a)[:rows], out)
