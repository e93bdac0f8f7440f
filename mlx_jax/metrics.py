"""Evaluation of embedding models: accuracy, k-NN, retrieval metrics and distance ratios.

Every function but :func:`class_means` runs on the host and returns Python floats (or a dict of
them); it is meant to be called once per epoch on whole evaluation sets, e.g. 10k test queries
against 60k train references. Distances are computed by a jitted function on chunks of
``chunk_size`` queries (see :func:`mlx_jax.distances.pairwise_distances`), so the full
[queries, references] matrix never exists at once. The k nearest neighbours are selected with
``lax.top_k`` inside the jitted function when k is small (k-NN, P@1), and on the host with an
integer ``np.partition`` (O(M) per row, no sort) when k is large (MAP@R needs k = max R, e.g.
≈ 6000), while the next chunk's distances are being computed.

Metrics. Every ``metric=`` takes a :data:`mlx_jax.distances.Metric` — ``"euclidean"``,
``"squared_euclidean"`` or ``"cosine"`` — and defaults to ``"euclidean"``, as everywhere in
mlx_jax (see :mod:`mlx_jax.distances`). Nearest-center accuracy and the intra/inter distance
ratio are Euclidean by definition and take no ``metric``.

Neighbour ranking. References are ranked by squared Euclidean distance for
``metric="euclidean"`` / ``"squared_euclidean"`` (the same order) and by decreasing cosine
similarity for ``metric="cosine"``, compared in float32. Equal distances are ranked by reference
index (lower first), as a stable sort of the whole row would rank them — the results are
therefore deterministic and independent of ``chunk_size``.

Inputs are validated: embeddings must be finite floating arrays [N, D], labels integer arrays
[N] of non-negative class ids; errors name the argument and the expected shape.
"""

from __future__ import annotations

import fractions
import functools
import math
from collections.abc import Iterator, Sequence
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

from mlx_jax import _checks
from mlx_jax._chunking import chunk_rows, map_chunks
from mlx_jax.distances import (
    DEFAULT_METRIC,
    Metric,
    check_metric,
    pairwise_distances,
    ranking_scores,
)

TieBreak = Literal["nearest", "smallest_label"]
TIE_BREAKS: tuple[str, ...] = ("nearest", "smallest_label")

# Up to this many neighbours, select with lax.top_k inside JAX; above, on the host (NumPy).
SMALL_K = 256

__all__ = [
    "argmax_accuracy",
    "class_means",
    "nearest_center_accuracy",
    "knn_accuracy",
    "retrieval_metrics",
    "intra_inter_distance_ratio",
]


# --------------------------------------------------------------------------------------------
# Validation helpers


def _finite_embeddings(x, name: str) -> jax.Array:
    """[N, D] float, N, D >= 1, finite when concrete (NaN/inf raise ValueError naming ``name``)."""
    x = _checks.embeddings_array(x, name)
    if _checks.is_concrete(x) and not bool(jnp.all(jnp.isfinite(x))):
        raise ValueError(f"{name} must be finite, but contains NaN or inf values")
    return x


def _host_labels(labels, batch: int, name: str, num_classes: int | None = None) -> np.ndarray:
    """Validated integer labels [batch] as a NumPy int64 array."""
    return np.asarray(_checks.labels_array(labels, batch, name, num_classes), np.int64)


def _same_dim(reference: jax.Array, dim: int, name: str) -> None:
    if reference.shape[1] != dim:
        raise ValueError(
            f"{name} must have shape [num_references, {dim}] (same dim as the queries), "
            f"got shape {list(reference.shape)}"
        )


# --------------------------------------------------------------------------------------------
# Chunked evaluation


def _ranking_scores(
    queries: jax.Array, start, reference: jax.Array, metric: str, exclude_self: bool
) -> jax.Array:
    """[chunk, M] float32 :func:`mlx_jax.distances.ranking_scores` (smaller = nearer). Query
    ``start + r`` vs itself scores +inf when ``exclude_self`` (queries = references). Float64
    scores (under ``jax.enable_x64``) are rounded to float32, so both selection paths rank the
    same values."""
    scores = ranking_scores(queries, reference, metric=metric)
    if exclude_self:
        rows = start + jnp.arange(queries.shape[0])
        is_self = jnp.arange(reference.shape[0])[None, :] == rows[:, None]
        scores = jnp.where(is_self, jnp.inf, scores)
    return scores.astype(jnp.float32)


@functools.partial(jax.jit, static_argnames=("k", "metric", "exclude_self"))
def _top_k_indices(
    queries: jax.Array, start, reference: jax.Array, *, k: int, metric: str, exclude_self: bool
) -> jax.Array:
    """[chunk, k] indices of the nearest references, nearest first (``lax.top_k`` ranks equal
    values by lower index first)."""
    scores = _ranking_scores(queries, start, reference, metric, exclude_self)
    return jax.lax.top_k(-scores, k)[1]


@functools.partial(jax.jit, static_argnames=("metric", "exclude_self"))
def _ranking_keys(
    queries: jax.Array, start, reference: jax.Array, *, metric: str, exclude_self: bool
) -> jax.Array:
    """[chunk, M] uint32 keys in the order of the scores (smaller = nearer).

    The float32 score is mapped to an unsigned integer with the same order (the usual sign-flip
    trick, after turning −0.0 into +0.0), so the host can append the reference index and select
    with one integer partition, ties included.
    """
    scores = _ranking_scores(queries, start, reference, metric, exclude_self)
    scores = jnp.where(scores == 0, 0.0, scores)
    bits = jax.lax.bitcast_convert_type(scores, jnp.uint32)
    negative = (bits >> 31) == 1
    return jnp.where(negative, ~bits, bits | jnp.uint32(0x80000000))


def _nearest_indices(keys: np.ndarray, k: int, buffer: np.ndarray) -> np.ndarray:
    """Indices [c, k] of the k smallest ``keys`` [c, M] per row, nearest first; equal keys are
    ranked by index (lower first), i.e. ``np.argsort(keys, axis=1, kind="stable")[:, :k]``.

    Each key becomes ``key << 32 | index`` (all distinct) in ``buffer`` (uint64, at least
    [c, M]); one in-place ``partition`` and a sort of the k smallest give the order in
    O(M + k log k) per row.
    """
    c, m = keys.shape
    composite = buffer[:c, :m]
    np.copyto(composite, keys, casting="safe")
    composite <<= np.uint64(32)
    composite |= np.arange(m, dtype=np.uint64)
    if k < m:
        composite.partition(k - 1, axis=1)
    nearest = np.sort(composite[:, :k], axis=1)
    return (nearest & np.uint64(0xFFFFFFFF)).astype(np.intp)


def _nearest_neighbours(
    query: jax.Array,
    reference: jax.Array,
    k: int,
    *,
    metric: str,
    exclude_self: bool,
    chunk_size: int | None,
) -> Iterator[tuple[int, np.ndarray]]:
    """Yields ``(start, indices)``: the k nearest references [c, k] of queries start..start+c,
    nearest first, equal scores by lower reference index.

    Small k (<= SMALL_K) selects inside the jitted function with ``lax.top_k``; large k (MAP@R
    needs k = max R, thousands) selects on the host with :func:`_nearest_indices`, which is
    an O(M) partition per row instead of a sort. Both give the same indices.
    """
    num_references = reference.shape[0]
    if num_references >= 2**32:
        raise ValueError(f"at most 2**32 - 1 references are supported, got {num_references}")
    chunk = chunk_rows(chunk_size, query.shape[0], num_references)
    if k <= SMALL_K:
        fn = functools.partial(_top_k_indices, k=k, metric=metric, exclude_self=exclude_self)
        yield from map_chunks(fn, query, chunk, reference)
        return
    buffer = np.empty((chunk, num_references), np.uint64)
    fn = functools.partial(_ranking_keys, metric=metric, exclude_self=exclude_self)
    for start, keys in map_chunks(fn, query, chunk, reference):
        yield start, _nearest_indices(keys, k, buffer)


# --------------------------------------------------------------------------------------------
# Classification accuracies


def argmax_accuracy(logits: jax.Array, labels: jax.Array) -> float:
    """Fraction of samples whose largest logit is their label: mean_i [argmax_j z_ij = y_i].

    Args:
      logits: [B, C] float. labels: [B] int in [0, C).

    Returns:
      The accuracy as a Python float. Ties between logits go to the smallest class index.
    """
    z = _checks.float_array(logits, "logits", 2, "[batch, num_classes]")
    if z.shape[0] < 1 or z.shape[1] < 1:
        raise ValueError(
            f"logits must have shape [batch, num_classes] with batch, num_classes >= 1, "
            f"got {list(z.shape)}"
        )
    if not bool(jnp.all(~jnp.isnan(z))):
        raise ValueError("logits must not contain NaN")
    y = _host_labels(labels, z.shape[0], "labels", num_classes=z.shape[1])
    return float(np.mean(np.asarray(jnp.argmax(z, axis=1)) == y))


def class_means(embeddings: jax.Array, labels: jax.Array, num_classes: int) -> jax.Array:
    """Per-class mean embeddings μ_j = Σ_i δ(y_i = j)·x_i / Σ_i δ(y_i = j), as [C, D].

    A class with no sample gets a row of NaN (there is no mean to report, and NaN cannot be
    mistaken for a center); :func:`nearest_center_accuracy` never assigns a sample to a NaN
    center. Works under ``jit`` (``num_classes`` static); there an out-of-range label makes the
    whole result NaN instead of being dropped silently. Eagerly, labels are range-checked and
    NaN embeddings raise.

    Args:
      embeddings: [B, D] float. labels: [B] int in [0, num_classes). num_classes: C >= 1.

    Returns:
      [C, D] means in the embeddings' compute dtype (at least float32).
    """
    num_classes = _checks.positive_int(num_classes, "num_classes")
    x = _finite_embeddings(embeddings, "embeddings")
    y = _checks.labels_array(labels, x.shape[0], "labels", num_classes=num_classes)
    sums = jax.ops.segment_sum(x, y, num_segments=num_classes)
    counts = jax.ops.segment_sum(jnp.ones_like(y, x.dtype), y, num_segments=num_classes)
    means = sums / jnp.where(counts > 0, counts, jnp.nan)[:, None]
    out_of_range = jnp.any((y < 0) | (y >= num_classes))
    return jnp.where(out_of_range, jnp.nan, means)


@jax.jit
def _nearest_center(queries: jax.Array, start, centers: jax.Array) -> jax.Array:
    del start
    d = pairwise_distances(queries, centers, metric="squared_euclidean")
    d = jnp.where(jnp.isnan(d), jnp.inf, d)  # NaN rows: classes absent from class_means
    return jnp.argmin(d, axis=1)


def nearest_center_accuracy(
    embeddings: jax.Array,
    labels: jax.Array,
    centers: jax.Array,
    *,
    chunk_size: int | None = None,
) -> float:
    """Accuracy of assigning each sample to its nearest center (seed 001's evaluation).

    ŷ_i = argmin_j ‖x_i − c_j‖₂ and the accuracy is mean_i [ŷ_i = y_i]. This is how the
    standalone-center-loss study scores a model without a softmax layer; ``centers`` are the
    learned centers or :func:`class_means` of the training embeddings. Rows of ``centers`` that
    contain NaN (absent classes) are never chosen; equal distances go to the smaller class index.

    Args:
      embeddings: [B, D] float, finite. labels: [B] int in [0, C).
      centers: [C, D] float; at least one row without NaN.
      chunk_size: samples per distance chunk (None: automatic).

    Returns:
      The accuracy as a Python float.
    """
    x = _finite_embeddings(embeddings, "embeddings")
    c = _checks.centers_array(centers, x.shape[1])
    if c.shape[0] < 1:
        raise ValueError("centers must have at least one row [num_classes >= 1, dim]")
    usable = np.asarray(jnp.all(jnp.isfinite(c), axis=1) | jnp.any(jnp.isnan(c), axis=1))
    if not usable.all():
        raise ValueError("centers must be finite (rows of NaN mark absent classes), found inf")
    if bool(jnp.all(jnp.any(jnp.isnan(c), axis=1))):
        raise ValueError("centers has NaN in every row: there is no center to assign to")
    y = _host_labels(labels, x.shape[0], "labels", num_classes=c.shape[0])
    x, c = _checks.promote_all(x, c)
    chunk = chunk_rows(chunk_size, x.shape[0], c.shape[0])
    correct = 0
    for start, predicted in map_chunks(_nearest_center, x, chunk, c):
        correct += int(np.sum(predicted == y[start : start + len(predicted)]))
    return correct / x.shape[0]


def knn_accuracy(
    query: jax.Array,
    query_labels: jax.Array,
    reference: jax.Array,
    reference_labels: jax.Array,
    *,
    k: int = 1,
    metric: Metric = DEFAULT_METRIC,
    tie_break: TieBreak = "nearest",
    chunk_size: int | None = None,
) -> float:
    """Accuracy of the k-nearest-neighbour classifier: each query gets the majority label of its
    k nearest references (Cover & Hart 1967), unweighted.

    Ties in the vote: ``tie_break="nearest"`` (default) picks, among the classes with the most
    votes, the one of the nearest neighbour; ``"smallest_label"`` picks the smallest label, as
    ``sklearn.neighbors.KNeighborsClassifier(weights="uniform")`` does. Equal distances are ranked
    by reference index (see the module docstring). The query set is not excluded from the
    references: pass disjoint sets (e.g. test queries, train references).

    Args:
      query: [Q, D] float. query_labels: [Q] int >= 0.
      reference: [M, D] float. reference_labels: [M] int >= 0.
      k: number of neighbours, 1 <= k <= M.
      metric: ``"euclidean"`` (default), ``"squared_euclidean"`` (same neighbours) or
        ``"cosine"``.
      tie_break: ``"nearest"`` or ``"smallest_label"``.
      chunk_size: queries per distance chunk (None: automatic, ≤ 16 MiB of distances).

    Returns:
      The accuracy as a Python float.
    """
    check_metric(metric)
    _checks.choice(tie_break, "tie_break", TIE_BREAKS)
    q = _finite_embeddings(query, "query")
    r = _finite_embeddings(reference, "reference")
    _same_dim(r, q.shape[1], "reference")
    q_labels = _host_labels(query_labels, q.shape[0], "query_labels")
    r_labels = _host_labels(reference_labels, r.shape[0], "reference_labels")
    k = _checks.positive_int(k, "k")
    if k > r.shape[0]:
        raise ValueError(f"k must be <= the number of references ({r.shape[0]}), got {k}")
    q, r = _checks.promote_all(q, r)

    classes, dense = np.unique(r_labels, return_inverse=True)  # sorted: argmax = smallest label
    correct = 0
    for start, nearest in _nearest_neighbours(
        q, r, k, metric=metric, exclude_self=False, chunk_size=chunk_size
    ):
        neighbours = dense[nearest]  # [c, k] dense class ids, nearest first
        rows = np.arange(len(neighbours))[:, None]
        votes = np.zeros((len(neighbours), len(classes)), np.int64)
        np.add.at(votes, (np.broadcast_to(rows, neighbours.shape), neighbours), 1)
        if tie_break == "smallest_label":
            predicted = np.argmax(votes, axis=1)
        else:
            is_top = votes[rows, neighbours] == votes.max(axis=1, keepdims=True)
            predicted = neighbours[rows[:, 0], np.argmax(is_top, axis=1)]
        correct += int(np.sum(classes[predicted] == q_labels[start : start + len(neighbours)]))
    return correct / q.shape[0]


# --------------------------------------------------------------------------------------------
# Retrieval


RETRIEVAL_METRICS: tuple[str, ...] = (
    "precision_at_1",
    "r_precision",
    "map_at_r",
    "mean_average_precision",
    "mean_reciprocal_rank",
)
DEFAULT_RETRIEVAL_METRICS: tuple[str, ...] = ("precision_at_1", "r_precision", "map_at_r")
Average = Literal["queries", "classes"]
AVERAGES: tuple[str, ...] = ("queries", "classes")


def _retrieval_options(include, k) -> tuple[tuple[str, ...], int | None]:
    if isinstance(include, str) or not include:
        raise ValueError(
            f"include must be a non-empty sequence of metric names from {RETRIEVAL_METRICS}, "
            f"got {include!r}"
        )
    unknown = [name for name in include if name not in RETRIEVAL_METRICS]
    if unknown:
        raise ValueError(f"include: unknown metric(s) {unknown}; choose from {RETRIEVAL_METRICS}")
    if k is not None and (not isinstance(k, int | np.integer) or isinstance(k, bool) or k < 1):
        raise ValueError(f"k must be a positive int or None (the whole ranking), got {k!r}")
    return tuple(dict.fromkeys(include)), None if k is None else int(k)


def _per_query_retrieval(
    hits: np.ndarray, relevant: np.ndarray, include: tuple[str, ...], cutoff: int | None
) -> dict[str, np.ndarray]:
    """Per-query metrics [c] from ``hits`` [c, depth] (rel(i) of the ranking's first ``depth``
    references) and R [c] (> 0)."""
    depth = hits.shape[1]
    ranks = np.arange(1, depth + 1)
    big_r = relevant[:, None]
    out = {}
    if "precision_at_1" in include:
        out["precision_at_1"] = hits[:, 0].astype(np.float64)
    if "r_precision" in include or "map_at_r" in include:
        hits_at_r = hits & (ranks[None, :] <= big_r)  # rel(i) for i <= R
        if "r_precision" in include:
            out["r_precision"] = hits_at_r.sum(axis=1) / relevant
        if "map_at_r" in include:
            precision = np.cumsum(hits_at_r, axis=1) / ranks
            out["map_at_r"] = (precision * hits_at_r).sum(axis=1) / relevant
    if "mean_average_precision" in include or "mean_reciprocal_rank" in include:
        ranked = hits[:, : cutoff or depth]
        if "mean_average_precision" in include:
            precision = np.cumsum(ranked, axis=1) / ranks[: ranked.shape[1]]
            out["mean_average_precision"] = (precision * ranked).sum(axis=1) / relevant
        if "mean_reciprocal_rank" in include:
            found = ranked.any(axis=1)
            out["mean_reciprocal_rank"] = np.where(found, 1.0 / (ranked.argmax(axis=1) + 1), 0.0)
    return out


def retrieval_metrics(
    query: jax.Array,
    query_labels: jax.Array,
    reference: jax.Array | None = None,
    reference_labels: jax.Array | None = None,
    *,
    metric: Metric = DEFAULT_METRIC,
    chunk_size: int | None = None,
    include: Sequence[str] = DEFAULT_RETRIEVAL_METRICS,
    k: int | None = None,
    average: Average = "queries",
    per_class: bool = False,
) -> dict[str, float] | dict[str, dict[int, float]]:
    """Retrieval metrics of a ranking, as pytorch-metric-learning's ``AccuracyCalculator``
    computes them: Precision@1, R-Precision and MAP@R (Musgrave, Belongie & Lim 2020, "A Metric
    Learning Reality Check", §3.2), mean average precision and mean reciprocal rank.

    For a query q, rank the references by distance (nearest first) and let rel(i) = 1 when the
    i-th one has q's label. R = the number of references with q's label (minus q itself when
    ``reference`` is None). Then, per query::

        P@1         = rel(1)
        R-Precision = (1/R)·Σ_{i=1..R} rel(i)
        MAP@R       = (1/R)·Σ_{i=1..R} P(i)·rel(i),   P(i) = (1/i)·Σ_{j=1..i} rel(j)
        AP          = (1/R)·Σ_{i=1..K} P(i)·rel(i)     (``"mean_average_precision"``)
        RR          = 1/(rank of the first relevant reference), 0 if none is within K
                                                       (``"mean_reciprocal_rank"``)

    with K = ``k`` or, for ``k=None`` (default), the whole ranking — so AP is the usual
    (untruncated) average precision over all R relevant references. PML's ``AccuracyCalculator``
    ranks only its ``k`` nearest (default ``"max_bin_count"``, the largest class size): pass the
    same ``k`` to get its numbers; its AP also divides by R when fewer than R relevant
    references fall within K. ``k`` affects only AP and RR.

    Each metric is averaged over queries (``average="queries"``, default) or, with
    ``average="classes"``, first over the queries of each class and then over classes
    (PML's ``avg_of_avgs=True``), so small classes weigh as much as large ones.
    ``per_class=True`` returns each metric per query class instead (PML's
    ``return_per_class``). Queries with R = 0 (no other reference of their class) are left out
    of every mean, and their class out of the per-class results, as PML does; if every query has
    R = 0 the metrics are NaN (and the per-class dicts empty). Equal distances are ranked by
    reference index.

    With ``reference=None`` the query set is its own reference set and every query is excluded
    from its own ranking (PML's ``ref_includes_query``). Passing the same array explicitly as
    ``reference`` does *not* exclude it: each query then finds itself first.

    Cost: for the default ``include`` the top max(R) references of each query are selected per
    chunk (e.g. R ≈ 6000 for 60k references of 10 balanced classes), holding one chunk of
    distances (≤ 16 MiB by default) plus its top-R indices at a time. AP and RR with
    ``k=None`` rank the whole reference set (a sort of each query's row).

    Args:
      query: [Q, D] float. query_labels: [Q] int >= 0.
      reference: [M, D] float or None. reference_labels: [M] int >= 0, given iff ``reference``.
      metric: ``"euclidean"`` (default), ``"squared_euclidean"`` (same ranking) or
        ``"cosine"``.
      chunk_size: queries per chunk (None: automatic).
      include: which of ``RETRIEVAL_METRICS`` to compute; default P@1, R-Precision, MAP@R.
      k: rank cutoff K for AP and RR (a positive int), or None for the whole ranking.
      average: ``"queries"`` or ``"classes"`` (the average of per-class averages).
      per_class: return ``{metric: {class id: value}}`` instead of one value per metric.

    Returns:
      ``{name: float}`` for each name in ``include`` (or ``{name: {class: float}}``).
    """
    check_metric(metric)
    _checks.choice(average, "average", AVERAGES)
    include, cutoff = _retrieval_options(include, k)
    q = _finite_embeddings(query, "query")
    q_labels = _host_labels(query_labels, q.shape[0], "query_labels")
    if (reference is None) != (reference_labels is None):
        raise ValueError("reference and reference_labels must be given together (or neither)")
    exclude_self = reference is None
    if exclude_self:
        r, r_labels = q, q_labels
    else:
        r = _finite_embeddings(reference, "reference")
        _same_dim(r, q.shape[1], "reference")
        r_labels = _host_labels(reference_labels, r.shape[0], "reference_labels")
        q, r = _checks.promote_all(q, r)

    classes, class_counts = np.unique(r_labels, return_counts=True)
    position = np.minimum(np.searchsorted(classes, q_labels), len(classes) - 1)
    relevant = np.where(classes[position] == q_labels, class_counts[position], 0)
    relevant = relevant - int(exclude_self)  # R per query [Q]
    counted = relevant > 0

    if not counted.any():
        if per_class:
            return {name: {} for name in include}
        return dict.fromkeys(include, math.nan)
    num_ranked = r.shape[0] - int(exclude_self)
    depth = int(relevant.max())
    if "mean_average_precision" in include or "mean_reciprocal_rank" in include:
        depth = num_ranked if cutoff is None else max(depth, min(cutoff, num_ranked))
    per_query = {name: np.zeros(q.shape[0]) for name in include}
    for start, nearest in _nearest_neighbours(
        q, r, depth, metric=metric, exclude_self=exclude_self, chunk_size=chunk_size
    ):
        rows = np.arange(start, start + len(nearest))[counted[start : start + len(nearest)]]
        hits = r_labels[nearest[rows - start]] == q_labels[rows, None]
        for name, values in _per_query_retrieval(hits, relevant[rows], include, cutoff).items():
            per_query[name][rows] = values

    kept_labels = q_labels[counted]
    if not per_class and average == "queries":
        return {name: float(values[counted].mean()) for name, values in per_query.items()}
    query_classes, inverse = np.unique(kept_labels, return_inverse=True)
    queries_per_class = np.bincount(inverse)
    by_class = {
        name: np.bincount(inverse, weights=values[counted]) / queries_per_class
        for name, values in per_query.items()
    }
    if per_class:
        return {
            name: {int(c): float(v) for c, v in zip(query_classes, values, strict=True)}
            for name, values in by_class.items()
        }
    return {name: float(values.mean()) for name, values in by_class.items()}


# --------------------------------------------------------------------------------------------
# Distance statistics


@jax.jit
def _distance_row_sums(
    rows: jax.Array, start, embeddings: jax.Array, labels: jax.Array
) -> jax.Array:
    """[chunk, 2]: Σ_j ‖x_i − x_j‖ over j != i of the same class, and over all j != i."""
    d = pairwise_distances(rows, embeddings, metric="euclidean")
    index = start + jnp.arange(rows.shape[0])
    not_self = jnp.arange(embeddings.shape[0])[None, :] != index[:, None]
    d = jnp.where(not_self, d, 0.0)
    row_labels = jax.lax.dynamic_slice_in_dim(
        jnp.pad(labels, (0, rows.shape[0])), start, rows.shape[0]
    )
    same = row_labels[:, None] == labels[None, :]
    return jnp.stack([jnp.sum(jnp.where(same, d, 0.0), axis=1), jnp.sum(d, axis=1)], axis=1)


def intra_inter_distance_ratio(
    embeddings: jax.Array, labels: jax.Array, *, chunk_size: int | None = None
) -> float:
    """Mean intra-class distance over mean inter-class distance (Euclidean, pairs i != j)::

        ratio = mean_{i≠j, y_i=y_j} ‖x_i − x_j‖ / mean_{y_i≠y_j} ‖x_i − x_j‖

    Smaller is more discriminative (compact classes far apart), the aim of Center Loss (Wen et
    al. 2016). Computed over all N² ordered pairs in row blocks — O(N²·D) time, one chunk of
    distances in memory; the sums are accumulated in float64.

    Args:
      embeddings: [N, D] float, finite. labels: [N] int >= 0; at least one class with two
        samples and at least two classes.
      chunk_size: rows per block (None: automatic).

    Returns:
      The ratio as a Python float.
    """
    x = _finite_embeddings(embeddings, "embeddings")
    y = _host_labels(labels, x.shape[0], "labels")
    counts = np.unique(y, return_counts=True)[1].astype(np.float64)
    n = float(x.shape[0])
    intra_pairs = float(np.sum(counts * (counts - 1)))
    inter_pairs = n * n - float(np.sum(counts * counts))
    if intra_pairs == 0:
        raise ValueError("labels must have a class with at least two samples (no intra pairs)")
    if inter_pairs == 0:
        raise ValueError("labels must contain at least two classes (no inter-class pairs)")
    chunk = chunk_rows(chunk_size, x.shape[0], x.shape[0])
    intra = total = 0.0
    for _, sums in map_chunks(_distance_row_sums, x, chunk, x, jnp.asarray(y, jnp.int32)):
        intra += float(np.sum(sums[:, 0], dtype=np.float64))
        total += float(np.sum(sums[:, 1], dtype=np.float64))
    return (intra / intra_pairs) / ((total - intra) / inter_pairs)


# --------------------------------------------------------------------------------------------
# Verification (FaceNet, Schroff, Kalenichenko & Philbin 2015, §5) and clustering

__all__ += [
    "verification_rates",
    "val_at_far",
    "roc_curve",
    "roc_auc",
    "clustering_scores",
]


@functools.partial(jax.jit, static_argnames=("metric",))
def _pair_distance_rows(rows: jax.Array, start, embeddings: jax.Array, *, metric: str) -> jax.Array:
    """[chunk, N] float32 distances D(x_i, x_j) of rows i = start.. to every j: squared or plain
    Euclidean, or the cosine distance 1 − cos(x_i, x_j)."""
    del start
    if metric == "cosine":
        d = 1.0 - pairwise_distances(rows, embeddings, metric="cosine")
    else:
        d = pairwise_distances(rows, embeddings, metric=metric)
    return d.astype(jnp.float32)


def _verification_pairs(
    embeddings, labels, metric: str, chunk_size: int | None
) -> tuple[Iterator[tuple[np.ndarray, np.ndarray]], int, int]:
    """Validates the inputs; returns (an iterator over row chunks yielding the float32
    distances of their same-class and different-class pairs (i, j), i < j), |P_same|, |P_diff|).

    Each unordered pair is yielded once, computed in the row of its smaller index.
    """
    check_metric(metric)
    x = _finite_embeddings(embeddings, "embeddings")
    n = x.shape[0]
    y = _host_labels(labels, n, "labels")
    counts = np.unique(y, return_counts=True)[1]
    num_same = int(np.sum(counts * (counts - 1) // 2))
    num_diff = n * (n - 1) // 2 - num_same
    if num_same == 0:
        raise ValueError(
            "labels must have a class with at least two samples (no same-identity pairs)"
        )
    if num_diff == 0:
        raise ValueError("labels must contain at least two classes (no different-identity pairs)")
    chunk = chunk_rows(chunk_size, n, n)
    fn = functools.partial(_pair_distance_rows, metric=metric)

    def pairs() -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for start, d in map_chunks(fn, x, chunk, x):
            rows = np.arange(start, start + len(d))
            upper = d[:, start + 1 :]  # columns j > start; j > i masked below
            later = np.arange(start + 1, n)[None, :] > rows[:, None]
            same = y[rows][:, None] == y[None, start + 1 :]
            yield upper[later & same], upper[later & ~same]

    return pairs(), num_same, num_diff


def verification_rates(
    embeddings: jax.Array,
    labels: jax.Array,
    thresholds,
    *,
    metric: Metric = DEFAULT_METRIC,
    chunk_size: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """FaceNet's validation rate and false accept rate at given distance thresholds.

    Over all pairs (i, j), i < j, of the set, P_same holds those with y_i = y_j and P_diff the
    others. A pair is accepted ("same") at threshold d when D(x_i, x_j) <= d, and (Schroff et
    al. 2015, §5)::

        TA(d) = {(i, j) ∈ P_same : D(x_i, x_j) <= d}     VAL(d) = |TA(d)| / |P_same|
        FA(d) = {(i, j) ∈ P_diff : D(x_i, x_j) <= d}     FAR(d) = |FA(d)| / |P_diff|

    D is the Euclidean distance (default), the squared Euclidean distance (FaceNet's) or the
    cosine distance 1 − cos(x_i, x_j) (``metric``), computed in float32. Counts are exact; the
    pairs are streamed in row chunks (memory: one chunk of distances, ≤ 16 MiB by default).

    Args:
      embeddings: [N, D] float, finite. labels: [N] int >= 0 with at least one same-class and
        one different-class pair.
      thresholds: a float or [T] floats (not NaN), in any order.
      metric: ``"euclidean"`` (default), ``"squared_euclidean"`` (FaceNet's) or ``"cosine"``.
      chunk_size: rows per chunk (None: automatic).

    Returns:
      ``(val, far)``: float64 NumPy arrays of the thresholds' shape.
    """
    t = np.asarray(thresholds)
    if not (np.issubdtype(t.dtype, np.floating) or np.issubdtype(t.dtype, np.integer)):
        raise TypeError(f"thresholds must be a real number or array [T], got dtype {t.dtype}")
    if t.ndim > 1:
        raise ValueError(f"thresholds must be a number or have shape [T], got {list(t.shape)}")
    t = t.astype(np.float64)
    if np.isnan(t).any():
        raise ValueError("thresholds must not contain NaN")
    pairs, num_same, num_diff = _verification_pairs(embeddings, labels, metric, chunk_size)
    flat = t.reshape(-1)
    order = np.argsort(flat, kind="stable")
    ascending = flat[order]
    accepted = np.zeros((2, len(flat) + 1), np.int64)  # [same, diff] pairs first accepted at t_k
    for same, diff in pairs:
        for row, d in enumerate((same, diff)):
            first = np.searchsorted(ascending, d, side="left")  # first threshold >= d
            accepted[row] += np.bincount(first, minlength=len(flat) + 1)
    counts = np.cumsum(accepted[:, :-1], axis=1)
    rates = np.empty((2, len(flat)))
    rates[:, order] = counts / np.array([[num_same], [num_diff]], np.float64)
    return rates[0].reshape(t.shape), rates[1].reshape(t.shape)


def val_at_far(
    embeddings: jax.Array,
    labels: jax.Array,
    far: float = 1e-3,
    *,
    metric: Metric = DEFAULT_METRIC,
    chunk_size: int | None = None,
) -> tuple[float, float, float]:
    """VAL at a target FAR, with the threshold found on the data (FaceNet reports VAL at
    FAR = 1e-3).

    The threshold is the largest d with FAR(d) <= ``far`` (definitions in
    :func:`verification_rates`). With δ_1 <= δ_2 <= ... the sorted different-pair distances and
    m = ⌊far·|P_diff|⌋ (exact, in rational arithmetic), FAR(d) <= far iff d < δ_{m+1}: the
    threshold is the largest float32 below δ_{m+1}, and every d in [the largest observed pair
    distance below δ_{m+1}, δ_{m+1}) gives the same VAL and FAR on this set. Ties: different
    pairs at distance δ_{m+1} are all rejected together (a threshold cannot split equal
    distances), so the achieved FAR can be below the target, and same pairs at δ_{m+1} are
    rejected too. If the smallest distances belong to different pairs, VAL can be 0.

    Exact: the m + 1 smallest different-pair distances are kept while the pairs are streamed in
    row chunks (``np.partition``), with the same-pair distances below the running bound. Memory:
    4 bytes per kept distance, e.g. 10,000 embeddings of 10 classes at FAR = 1e-3 keep ≈ 45k
    different-pair and at most ≈ 5M same-pair distances (≤ 20 MB), plus one chunk of distances.

    Args:
      embeddings: [N, D] float, finite. labels: [N] int >= 0 with at least one same-class and
        one different-class pair.
      far: target false accept rate, 0 < far < 1.
      metric: ``"euclidean"`` (default), ``"squared_euclidean"`` (FaceNet's) or ``"cosine"``
        (the cosine distance 1 − cos); the threshold is in its units.
      chunk_size: rows per chunk (None: automatic).

    Returns:
      ``(val, threshold, achieved_far)`` as Python floats: VAL(threshold) and FAR(threshold),
      as :func:`verification_rates` finds them at ``threshold`` with the same ``chunk_size``
      (another chunking can change a distance's float32 rounding in the last bit).
    """
    if isinstance(far, bool) or not isinstance(far, int | float | np.number):
        raise TypeError(f"far must be a real number in (0, 1), got {far!r}")
    if not 0.0 < float(far) < 1.0:  # also rejects NaN
        raise ValueError(f"far must lie in (0, 1) (exclusive), got {far}")
    pairs, num_same, num_diff = _verification_pairs(embeddings, labels, metric, chunk_size)
    allowed = math.floor(fractions.Fraction(float(far)) * num_diff)  # m < num_diff since far < 1
    kept_diff = np.empty(0, np.float32)
    kept_same: list[np.ndarray] = []
    bound = np.float32(np.inf)  # the (m+1)-th smallest diff distance seen so far (>= δ_{m+1})
    for same, diff in pairs:
        kept_diff = np.concatenate([kept_diff, diff])
        if len(kept_diff) > allowed + 1:
            kept_diff = np.partition(kept_diff, allowed)[: allowed + 1]
        if len(kept_diff) == allowed + 1:
            bound = kept_diff.max()
        kept_same.append(same[same < bound])
    cutoff = kept_diff.max()  # δ_{m+1}
    true_accepts = sum(int(np.count_nonzero(s < cutoff)) for s in kept_same)
    false_accepts = int(np.count_nonzero(kept_diff < cutoff))
    threshold = np.nextafter(cutoff, np.float32(-np.inf))
    return true_accepts / num_same, float(threshold), false_accepts / num_diff


def _sorted_pair_distances(
    embeddings, labels, metric: str, chunk_size: int | None
) -> tuple[np.ndarray, np.ndarray]:
    """All same-pair and different-pair distances (float32, ascending): 4 bytes per pair."""
    pairs, num_same, num_diff = _verification_pairs(embeddings, labels, metric, chunk_size)
    same_all = np.empty(num_same, np.float32)
    diff_all = np.empty(num_diff, np.float32)
    filled = [0, 0]
    for chunk in pairs:
        for row, (out, d) in enumerate(zip((same_all, diff_all), chunk, strict=True)):
            out[filled[row] : filled[row] + len(d)] = d
            filled[row] += len(d)
    same_all.sort()
    diff_all.sort()
    return same_all, diff_all


def roc_curve(
    embeddings: jax.Array,
    labels: jax.Array,
    *,
    metric: Metric = DEFAULT_METRIC,
    drop_intermediate: bool = True,
    chunk_size: int | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The exact verification ROC curve: FAR(d) and VAL(d) at every distinct pair distance d.

    ``thresholds`` are the distinct pair distances in increasing order, preceded by −inf (the
    point (0, 0)); ``far[i] = FAR(thresholds[i])`` and ``val[i] = VAL(thresholds[i])`` as
    defined in :func:`verification_rates`, so both increase to 1. This is
    ``sklearn.metrics.roc_curve(same, -distance)`` with the thresholds negated: smaller distance
    means "same". ``drop_intermediate`` drops the points on straight segments of the curve with
    scikit-learn's rule (the curve and its AUC are unchanged).

    Memory: every pair distance is held once, sorted (4 bytes per pair: 200 MB for 10,000
    embeddings), plus about 5 bytes per pair and 8 per distinct distance while the curve is
    built (peak ≈ 0.65 GB for 10,000 random 128-d embeddings); the full curve
    (``drop_intermediate=False``) has one point per distinct distance, 24 bytes each.

    Args:
      embeddings: [N, D] float, finite. labels: [N] int >= 0 with at least one same-class and
        one different-class pair.
      metric: ``"euclidean"`` (default), ``"squared_euclidean"`` (FaceNet's) or ``"cosine"``.
      drop_intermediate: drop collinear points (default True).
      chunk_size: rows per chunk (None: automatic).

    Returns:
      ``(far, val, thresholds)``: float64 NumPy arrays of one length.
    """
    same, diff = _sorted_pair_distances(embeddings, labels, metric, chunk_size)
    values = np.concatenate([same, diff])
    del diff
    values.sort()
    ends = np.flatnonzero(np.append(values[1:] != values[:-1], True))  # last of each value
    thresholds = values[ends]
    del values
    true_accepts = np.searchsorted(same, thresholds, side="right")
    false_accepts = ends + 1 - true_accepts
    if drop_intermediate and len(thresholds) > 2:
        keep = np.flatnonzero(
            np.concatenate(
                [[True], np.logical_or(np.diff(false_accepts, 2), np.diff(true_accepts, 2)), [True]]
            )
        )
        thresholds, true_accepts, false_accepts = (
            thresholds[keep],
            true_accepts[keep],
            false_accepts[keep],
        )
    far = np.concatenate([[0.0], false_accepts / false_accepts[-1]])
    val = np.concatenate([[0.0], true_accepts / true_accepts[-1]])
    return far, val, np.concatenate([[-np.inf], thresholds.astype(np.float64)])


def roc_auc(
    embeddings: jax.Array,
    labels: jax.Array,
    *,
    metric: Metric = DEFAULT_METRIC,
    chunk_size: int | None = None,
) -> float:
    """Area under the verification ROC curve (:func:`roc_curve`), computed exactly as the
    Mann–Whitney statistic P(D_same < D_diff) + ½·P(D_same = D_diff) over all (same pair,
    different pair) combinations — equal to ``sklearn.metrics.roc_auc_score(same, -distance)``.

    Memory: every pair distance once, sorted (4 bytes per pair), plus 16 bytes per pair of the
    smaller of the two sets.

    Args and validation as :func:`roc_curve`. Returns the AUC as a Python float.
    """
    same, diff = _sorted_pair_distances(embeddings, labels, metric, chunk_size)
    # For each same distance s: #diff > s counts 1, #diff == s counts 1/2 (in halves, exactly).
    if len(same) <= len(diff):
        below = np.searchsorted(diff, same, side="left")
        not_above = np.searchsorted(diff, same, side="right")
        halves = 2 * int(np.sum(len(diff) - not_above)) + int(np.sum(not_above - below))
    else:  # the same sum, counted from the different pairs' side
        below = np.searchsorted(same, diff, side="left")
        not_above = np.searchsorted(same, diff, side="right")
        halves = 2 * int(np.sum(below)) + int(np.sum(not_above - below))
    return halves / (2 * len(same) * len(diff))


def clustering_scores(
    embeddings: jax.Array, labels: jax.Array, *, seed: int = 0, n_init: int = 10
) -> dict[str, float]:
    """NMI and AMI between the classes and a k-means clustering of the embeddings (FaceNet's
    clustering task; the clustering scores of Musgrave et al. 2020 and PML).

    k-means with k = the number of classes (scikit-learn's ``KMeans``, k-means++ init,
    ``n_init`` restarts, ``random_state=seed``) on the embeddings as given (normalize them first
    for a cosine geometry); the scores are ``normalized_mutual_info_score`` and
    ``adjusted_mutual_info_score`` (arithmetic normalization), both 1 for a perfect clustering.

    Requires scikit-learn (an optional dependency, imported here).

    Args:
      embeddings: [N, D] float, finite. labels: [N] int >= 0 with at least two classes.
      seed: k-means random state. n_init: number of k-means restarts (>= 1).

    Returns:
      ``{"nmi": float, "ami": float}``.
    """
    x = _finite_embeddings(embeddings, "embeddings")
    y = _host_labels(labels, x.shape[0], "labels")
    n_init = _checks.positive_int(n_init, "n_init")
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer):
        raise TypeError(f"seed must be an int, got {seed!r}")
    num_classes = len(np.unique(y))
    if num_classes < 2:
        raise ValueError("labels must contain at least two classes to score a clustering")
    try:
        from sklearn.cluster import KMeans
        from sklearn.metrics import adjusted_mutual_info_score, normalized_mutual_info_score
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError(
            "clustering_scores needs scikit-learn: pip install scikit-learn"
        ) from error
    clusters = KMeans(n_clusters=num_classes, n_init=n_init, random_state=int(seed)).fit_predict(
        np.asarray(x, np.float64)
    )
    return {
        "nmi": float(normalized_mutual_info_score(y, clusters)),
        "ami": float(adjusted_mutual_info_score(y, clusters)),
    }
