"""A gallery of enrolled embeddings: top-k search, open-set identification, save/load.

Face recognition at inference time "searches the gallery for the most similar feature" (seed 003:
FaceNet; seed 000: the open-set argument). This module is that path, with no faiss dependency::

    gallery = Gallery.create(embeddings, identities, metric="cosine")
    gallery = enroll(gallery, more_embeddings, more_identities)   # a new gallery
    scores, indices, ids = search(gallery, queries, k=5)          # [Q, k] each
    predicted = identify(gallery, queries, threshold=0.5)         # [Q], UNKNOWN (-1) if rejected
    save(gallery, "gallery.npz"); gallery = load("gallery.npz")

Metrics and scores. ``metric`` is a :data:`mlx_jax.distances.Metric` and defaults to
``"euclidean"``, as every ``metric=`` in mlx_jax (see :mod:`mlx_jax.distances`):

* ``metric="euclidean"`` (default): the score is the Euclidean distance ‖q − g‖₂: **lower is
  closer**, results are in increasing distance order, and :func:`identify` accepts a match
  when ``score <= threshold``.
* ``metric="squared_euclidean"``: the same with the squared distance ‖q − g‖₂² as the score
  (and the threshold).
* ``metric="cosine"``: the score is the cosine similarity cos(q, g) = q̂·ĝ of L2-normalized
  vectors (:func:`mlx_jax.distances.cosine_similarity`): **higher is closer**, results are in
  decreasing score order, and :func:`identify` accepts a match when ``score >= threshold``.

Ranking is done in float32 on :func:`mlx_jax.distances.ranking_scores` (the squared Euclidean
distance, or the negated cosine similarity), exactly as :mod:`mlx_jax.metrics` ranks neighbours.
Equal scores are ranked by gallery index, lower first (as a stable sort of each full row would
rank them), so results are deterministic. The chunking does not change the ranking rule; it can
only change the last bit of a score where the matmul's float32 rounding depends on the chunk's
shape.

Memory. :func:`search` is jitted and chunked twice: queries in chunks of ``query_chunk_size``
rows (the chunking of :mod:`mlx_jax.metrics`) and, inside one compiled ``lax.scan``, the gallery
in chunks of ``chunk_size`` entries, keeping a running top-k that is merged with each chunk's
scores (one ``lax.top_k`` over [query_chunk, k + chunk]). The intermediates are therefore one
[query_chunk, chunk] block of distances (computed by :func:`mlx_jax.distances.pairwise_distances`)
and its [query_chunk, k + chunk] merge, never [queries, gallery]: with the default chunks that is
about 16 MiB each, whatever the gallery size. The gallery itself is not copied or padded (the
last chunk overlaps the previous one and its already-seen entries are masked).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import zipfile

import jax
import jax.numpy as jnp
import numpy as np

from mlx_jax import _checks
from mlx_jax._chunking import chunk_rows, map_chunks
from mlx_jax.distances import DEFAULT_METRIC, Metric, check_metric, ranking_scores

UNKNOWN = -1  # identity returned by identify() for a rejected (open-set) query
FORMAT_VERSION = 1  # version of the .npz layout written by save()
DEFAULT_CHUNK = 4096  # gallery entries per chunk when chunk_size is None
_FILE_KEYS = frozenset({"format_version", "metric", "embeddings", "identities"})

__all__ = [
    "UNKNOWN",
    "Gallery",
    "enroll",
    "search",
    "identify",
    "save",
    "load",
]


# --------------------------------------------------------------------------------------------
# The gallery


def _gallery_embeddings(embeddings, name: str, dim: int | None = None) -> jax.Array:
    """[N, D] finite float (N >= 0, D >= 1; D == dim when given) in compute dtype."""
    x = _checks.float_array(
        embeddings, name, 2, "[num_entries, dim]" if dim is None else f"[num_entries, {dim}]"
    )
    if x.shape[1] < 1:
        raise ValueError(f"{name} must have shape [num_entries, dim] with dim >= 1, got {x.shape}")
    if dim is not None and x.shape[1] != dim:
        raise ValueError(
            f"{name} must have shape [num_entries, {dim}] (the gallery's dim), "
            f"got shape {list(x.shape)}"
        )
    if x.size and not bool(jnp.all(jnp.isfinite(x))):
        raise ValueError(f"{name} must be finite, but contains NaN or inf values")
    return x


def _identities(identities, num: int, name: str = "identities") -> np.ndarray:
    """[num] non-negative integer identities as a read-only int64 NumPy array."""
    ids = np.asarray(identities)
    if not np.issubdtype(ids.dtype, np.integer):
        raise TypeError(
            f"{name} must be an integer array of identities with shape [{num}], "
            f"got dtype {ids.dtype}"
        )
    if ids.shape != (num,):
        raise ValueError(
            f"{name} must have shape [{num}] (one identity per embedding), got shape "
            f"{list(ids.shape)}"
        )
    if ids.size and (ids.min() < 0 or ids.max() > np.iinfo(np.int64).max):
        raise ValueError(
            f"{name} must lie in [0, 2**63) ({UNKNOWN} is reserved for unknown), got values "
            f"from {ids.min()} to {ids.max()}"
        )
    ids = ids.astype(np.int64)
    ids.flags.writeable = False
    return ids


@dataclasses.dataclass(frozen=True, eq=False)
class Gallery:
    """An immutable set of enrolled embeddings with their identities.

    Attributes:
      embeddings: [N, D] float (at least float32), finite. N may be 0 (an empty gallery can be
        enrolled into but not searched).
      identities: [N] int64 NumPy array (read-only), identities >= 0; several entries may share
        an identity (several enrolled images of one person).
      metric: ``"euclidean"`` (default) or ``"squared_euclidean"`` (distances, lower is
        closer) or ``"cosine"`` (similarity, higher is closer); see the module docstring.

    Build it with :meth:`Gallery.create` (the fields are validated on any construction) and
    extend it with :func:`enroll`, which returns a new gallery.
    """

    embeddings: jax.Array
    identities: np.ndarray
    metric: Metric = DEFAULT_METRIC

    def __post_init__(self) -> None:
        check_metric(self.metric)
        x = _gallery_embeddings(self.embeddings, "embeddings")
        object.__setattr__(self, "embeddings", x)
        object.__setattr__(self, "identities", _identities(self.identities, x.shape[0]))

    @classmethod
    def create(cls, embeddings, identities, *, metric: Metric = DEFAULT_METRIC) -> Gallery:
        """A gallery of ``embeddings`` [N, D] float with ``identities`` [N] int >= 0."""
        return cls(embeddings, identities, metric)

    @property
    def size(self) -> int:
        """Number of enrolled entries N."""
        return int(self.embeddings.shape[0])

    @property
    def dim(self) -> int:
        """Embedding dimension D."""
        return int(self.embeddings.shape[1])

    def __len__(self) -> int:
        return self.size


def enroll(gallery: Gallery, embeddings, identities) -> Gallery:
    """A new gallery with ``embeddings`` [n, D] and ``identities`` [n] appended (indices N..N+n).

    The input gallery is unchanged. ``D`` must be the gallery's dim.
    """
    if not isinstance(gallery, Gallery):
        raise TypeError(f"gallery must be a Gallery, got {type(gallery).__name__}")
    x = _gallery_embeddings(embeddings, "embeddings", gallery.dim)
    ids = _identities(identities, x.shape[0])
    x, old = _checks.promote_all(x, gallery.embeddings)
    return Gallery(
        jnp.concatenate([old, x]), np.concatenate([gallery.identities, ids]), gallery.metric
    )


# --------------------------------------------------------------------------------------------
# Search


@functools.partial(jax.jit, static_argnames=("k", "metric", "chunk"))
def _search_chunk(
    queries: jax.Array, start, gallery: jax.Array, *, k: int, metric: str, chunk: int
) -> tuple[jax.Array, jax.Array]:
    """Top-k of ``queries`` [q, D] over ``gallery`` [N, D]: (scores [q, k], indices [q, k]).

    A ``lax.scan`` over ceil(N / chunk) gallery chunks carries the running k best ranking keys
    (smaller = nearer) and their indices. Chunk i covers entries [i·chunk, (i+1)·chunk); the last
    one is shifted back to end at N (no padded copy of the gallery) and the entries it repeats
    are masked to +inf. The merge ``top_k([carry, chunk])`` ranks equal keys by position, and
    the positions are in gallery-index order (the carry holds only earlier indices, itself in
    (key, index) order), so ties go to the lower gallery index. Finite keys are clamped to the
    float32 maximum so that an overflowed distance still beats the carry's +inf placeholders.
    """
    del start
    n = gallery.shape[0]
    biggest = jnp.finfo(jnp.float32).max

    def step(carry, i):
        best_keys, best_index = carry
        begin = i * chunk
        offset = jnp.minimum(begin, n - chunk)
        block = jax.lax.dynamic_slice_in_dim(gallery, offset, chunk)
        index = offset + jnp.arange(chunk, dtype=jnp.int32)
        keys = ranking_scores(queries, block, metric=metric).astype(jnp.float32)
        keys = jnp.where(index[None, :] >= begin, jnp.minimum(keys, biggest), jnp.inf)
        all_keys = jnp.concatenate([best_keys, keys], axis=1)
        all_index = jnp.concatenate(
            [best_index, jnp.broadcast_to(index, (queries.shape[0], chunk))], axis=1
        )
        negated, position = jax.lax.top_k(-all_keys, k)
        return (-negated, jnp.take_along_axis(all_index, position, axis=1)), None

    init = (
        jnp.full((queries.shape[0], k), jnp.inf, jnp.float32),
        jnp.full((queries.shape[0], k), -1, jnp.int32),
    )
    num_chunks = -(-n // chunk)
    (keys, index), _ = jax.lax.scan(step, init, jnp.arange(num_chunks, dtype=jnp.int32))
    if metric == "cosine":
        return -keys, index
    return (jnp.sqrt(keys) if metric == "euclidean" else keys), index


def _queries(gallery: Gallery, queries, name: str = "queries") -> jax.Array:
    if not isinstance(gallery, Gallery):
        raise TypeError(f"gallery must be a Gallery, got {type(gallery).__name__}")
    if gallery.size == 0:
        raise ValueError("gallery is empty (0 entries): enroll embeddings before searching it")
    q = _checks.float_array(queries, name, 2, f"[num_queries, {gallery.dim}]")
    if q.shape[0] < 1 or q.shape[1] != gallery.dim:
        raise ValueError(
            f"{name} must have shape [num_queries >= 1, {gallery.dim}] (the gallery's dim), "
            f"got shape {list(q.shape)}"
        )
    if not bool(jnp.all(jnp.isfinite(q))):
        raise ValueError(f"{name} must be finite, but contains NaN or inf values")
    return q


def _gallery_chunk(chunk_size: int | None, size: int) -> int:
    if chunk_size is None:
        return min(DEFAULT_CHUNK, size)
    return min(_checks.positive_int(chunk_size, "chunk_size"), size)


def search(
    gallery: Gallery,
    queries,
    k: int = 1,
    *,
    chunk_size: int | None = None,
    query_chunk_size: int | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The k nearest gallery entries of each query, nearest first.

    Args:
      gallery: a non-empty :class:`Gallery`.
      queries: [Q, D] float, finite, D the gallery's dim.
      k: number of results per query, 1 <= k <= gallery size.
      chunk_size: gallery entries scored per scan step (None: 4096, or the gallery size if
        smaller). Any value gives the same results.
      query_chunk_size: queries per compiled call (None: automatic, at most 1024 and about 2**22
        scores per step).

    Returns:
      ``(scores, indices, identities)``, NumPy arrays [Q, k]: ``scores`` float32 (cosine
      similarity, decreasing, or the (squared) Euclidean distance, increasing; see the module
      docstring),
      ``indices`` int64 gallery indices, ``identities`` int64 identities of those entries.
      Equal scores are ordered by gallery index, lower first.
    """
    q = _queries(gallery, queries)
    k = _checks.positive_int(k, "k")
    if k > gallery.size:
        raise ValueError(f"k must be <= the gallery size ({gallery.size}), got {k}")
    if gallery.size >= 2**31:
        raise ValueError(f"at most 2**31 - 1 gallery entries are supported, got {gallery.size}")
    chunk = _gallery_chunk(chunk_size, gallery.size)
    rows = chunk_rows(query_chunk_size, q.shape[0], chunk + k)
    q, g = _checks.promote_all(q, gallery.embeddings)
    fn = functools.partial(_search_chunk, k=k, metric=gallery.metric, chunk=chunk)
    scores = np.empty((q.shape[0], k), np.float32)
    indices = np.empty((q.shape[0], k), np.int64)
    for start, (s, i) in map_chunks(fn, q, rows, g):
        scores[start : start + len(s)] = s
        indices[start : start + len(i)] = i
    return scores, indices, gallery.identities[indices]


def _threshold(threshold) -> float:
    if isinstance(threshold, bool) or not isinstance(threshold, int | float | np.number):
        raise TypeError(f"threshold must be a real number, got {threshold!r}")
    if math.isnan(float(threshold)):
        raise ValueError("threshold must not be NaN")
    return float(threshold)


def identify(
    gallery: Gallery,
    queries,
    *,
    threshold: float,
    chunk_size: int | None = None,
    query_chunk_size: int | None = None,
) -> np.ndarray:
    """Open-set identification: the identity of each query's nearest entry, or ``UNKNOWN``.

    The nearest entry (top-1 of :func:`search`; equal scores go to the lower gallery index) is
    accepted when it is close enough, else the query is rejected as an identity not enrolled:

    * cosine: accepted iff cos(q, g) >= ``threshold`` (e.g. 0.5; -1 accepts every query);
    * euclidean: accepted iff ‖q − g‖₂ <= ``threshold`` (``inf`` accepts every query);
    * squared_euclidean: accepted iff ‖q − g‖₂² <= ``threshold``.

    Args:
      gallery: a non-empty :class:`Gallery`. queries: [Q, D] float, finite.
      threshold: a real number (not NaN), in the units of the gallery's score.
      chunk_size, query_chunk_size: as for :func:`search`.

    Returns:
      [Q] int64 NumPy array of identities, ``UNKNOWN`` (-1) for rejected queries.
    """
    threshold = _threshold(threshold)
    scores, _, ids = search(
        gallery, queries, 1, chunk_size=chunk_size, query_chunk_size=query_chunk_size
    )
    scores, ids = scores[:, 0], ids[:, 0]
    accepted = scores >= threshold if gallery.metric == "cosine" else scores <= threshold
    return np.where(accepted, ids, UNKNOWN)


# --------------------------------------------------------------------------------------------
# Persistence


def save(gallery: Gallery, path: str | os.PathLike) -> None:
    """Writes ``gallery`` to ``path`` (exactly that path; no suffix is added) as an ``.npz``.

    The archive holds ``format_version`` (int, currently 1), ``metric`` (str), ``embeddings``
    [N, D] (the stored float dtype) and ``identities`` [N] int64; no pickled objects.
    """
    if not isinstance(gallery, Gallery):
        raise TypeError(f"gallery must be a Gallery, got {type(gallery).__name__}")
    with open(path, "wb") as f:
        np.savez(
            f,
            format_version=np.int64(FORMAT_VERSION),
            metric=np.str_(gallery.metric),
            embeddings=np.asarray(gallery.embeddings),
            identities=gallery.identities,
        )


def load(path: str | os.PathLike) -> Gallery:
    """Reads a gallery written by :func:`save`; the contents are validated like a new gallery.

    Raises:
      ValueError: ``path`` is not an ``.npz`` archive, lacks or has extra arrays, has another
        format version, or holds an invalid gallery (unknown metric, NaN embeddings, ...).
    """
    if not zipfile.is_zipfile(path):
        raise ValueError(f"path {os.fspath(path)!r} is not a gallery .npz archive")
    with np.load(path, allow_pickle=False) as data:
        keys = set(data.files)
        if keys != _FILE_KEYS:
            raise ValueError(
                f"path {os.fspath(path)!r} is not a gallery archive: expected arrays "
                f"{sorted(_FILE_KEYS)}, found {sorted(keys)}"
            )
        version = data["format_version"]
        if version.shape != () or not np.issubdtype(version.dtype, np.integer):
            raise ValueError(f"path {os.fspath(path)!r}: format_version must be an integer")
        if int(version) != FORMAT_VERSION:
            raise ValueError(
                f"path {os.fspath(path)!r} has gallery format version {int(version)}; this "
                f"version of mlx_jax reads version {FORMAT_VERSION}"
            )
        metric = data["metric"]
        if metric.shape != () or metric.dtype.kind != "U":
            raise ValueError(f"path {os.fspath(path)!r}: metric must be a string")
        return Gallery(data["embeddings"], data["identities"], str(metric))
