"""Tests for mlx_jax.retrieval: gallery top-k against brute force, enroll, open-set identify,
save/load, bad input, and bounded memory of the chunked search."""

import dataclasses
import functools

import jax
import jax.extend.core
import jax.numpy as jnp
import numpy as np
import pytest

from mlx_jax import retrieval
from mlx_jax.retrieval import UNKNOWN, Gallery, enroll, identify, load, save, search

# --------------------------------------------------------------------------------------------
# Brute-force reference (float64, full matrix, stable argsort: ties by lower index)


def brute_force(gallery, queries, metric, k):
    g = np.asarray(gallery, np.float64)
    q = np.asarray(queries, np.float64)
    if metric == "cosine":
        g = g / np.maximum(np.linalg.norm(g, axis=1, keepdims=True), 1e-12)
        q = q / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12)
        keys = -(q @ g.T)
    else:
        keys = ((q[:, None, :] - g[None, :, :]) ** 2).sum(-1)
    order = np.argsort(keys, axis=1, kind="stable")[:, :k]
    best = np.take_along_axis(keys, order, axis=1)
    if metric == "cosine":
        return -best, order
    return (np.sqrt(best) if metric == "euclidean" else best), order


def random_gallery(seed, n=1000, dim=16, num_ids=37):
    rng = np.random.default_rng(seed)
    g = rng.normal(size=(n, dim)).astype(np.float32)
    ids = rng.integers(0, num_ids, size=n)
    return g, ids


METRICS = ["cosine", "euclidean", "squared_euclidean"]


# --------------------------------------------------------------------------------------------
# Top-k


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("chunk_size", [1, 7, 64, 333, 1000, 5000, None])
def test_search_matches_brute_force(metric, chunk_size):
    g, ids = random_gallery(0)
    q = np.random.default_rng(1).normal(size=(23, 16)).astype(np.float32)
    gallery = Gallery.create(g, ids, metric=metric)
    scores, indices, identities = search(gallery, q, 10, chunk_size=chunk_size, query_chunk_size=8)
    ref_scores, ref_indices = brute_force(g, q, metric, 10)
    np.testing.assert_array_equal(indices, ref_indices)
    np.testing.assert_array_equal(identities, ids[ref_indices])
    np.testing.assert_allclose(scores, ref_scores, rtol=1e-5, atol=1e-5)
    assert scores.dtype == np.float32 and indices.dtype == np.int64 and identities.dtype == np.int64


@pytest.mark.parametrize("metric", METRICS)
def test_search_k_equal_to_gallery_size_is_a_full_ranking(metric):
    g, ids = random_gallery(2, n=37, dim=4)
    q = np.random.default_rng(3).normal(size=(5, 4)).astype(np.float32)
    gallery = Gallery.create(g, ids, metric=metric)
    _, indices, _ = search(gallery, q, 37, chunk_size=5)
    np.testing.assert_array_equal(indices, brute_force(g, q, metric, 37)[1])
    assert (np.sort(indices, axis=1) == np.arange(37)).all()


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("chunk_size", [1, 3, 4, 10, None])
def test_ties_go_to_the_lower_gallery_index(metric, chunk_size):
    """Integer vectors give exact (bitwise equal) scores for duplicates, whatever the chunking."""
    rng = np.random.default_rng(4)
    base = rng.integers(-2, 3, size=(4, 3)).astype(np.float32)
    g = base[rng.integers(0, 4, size=21)]  # many duplicated rows
    q = rng.integers(-2, 3, size=(6, 3)).astype(np.float32)
    q[0] = 0.0  # zero query: cosine 0 to everything, all tied
    gallery = Gallery.create(g, np.arange(21), metric=metric)
    _, indices, _ = search(gallery, q, 9, chunk_size=chunk_size, query_chunk_size=4)
    np.testing.assert_array_equal(indices, brute_force(g, q, metric, 9)[1])
    np.testing.assert_array_equal(indices[0], np.arange(9) if metric == "cosine" else indices[0])


def test_search_result_is_independent_of_query_chunking():
    g, ids = random_gallery(5, n=300)
    q = np.random.default_rng(6).normal(size=(40, 16)).astype(np.float32)
    gallery = Gallery.create(g, ids)
    results = [search(gallery, q, 4, query_chunk_size=c) for c in (1, 7, 40, None)]
    for scores, indices, identities in results[1:]:
        np.testing.assert_array_equal(indices, results[0][1])
        np.testing.assert_array_equal(identities, results[0][2])
        # the matmul's float32 rounding may depend on the chunk's shape (last-bit differences)
        np.testing.assert_allclose(scores, results[0][0], rtol=1e-6)


def test_cosine_scores_are_scale_invariant_and_euclidean_are_distances():
    g = np.array([[1.0, 0.0], [0.0, 2.0], [-3.0, 0.0]], np.float32)
    q = np.array([[10.0, 0.0]], np.float32)
    s, i, _ = search(Gallery.create(g, [0, 1, 2], metric="cosine"), q, 3)
    np.testing.assert_allclose(s, [[1.0, 0.0, -1.0]], atol=1e-6)
    np.testing.assert_array_equal(i, [[0, 1, 2]])
    s, i, _ = search(Gallery.create(g, [0, 1, 2], metric="euclidean"), q, 3)
    np.testing.assert_allclose(s, [[9.0, np.sqrt(104.0), 13.0]], rtol=1e-6)
    np.testing.assert_array_equal(i, [[0, 1, 2]])
    s, i, _ = search(Gallery.create(g, [0, 1, 2], metric="squared_euclidean"), q, 3)
    np.testing.assert_allclose(s, [[81.0, 104.0, 169.0]], rtol=1e-6)
    np.testing.assert_array_equal(i, [[0, 1, 2]])


def test_default_metric_is_euclidean():
    g = np.array([[1.0, 0.0], [0.0, 2.0]], np.float32)
    gallery = Gallery.create(g, [0, 1])
    assert gallery.metric == "euclidean"
    s, _, _ = search(gallery, np.array([[4.0, 0.0]], np.float32), 1)
    np.testing.assert_allclose(s, [[3.0]], rtol=1e-6)


# --------------------------------------------------------------------------------------------
# Enroll


def test_enroll_appends_and_returns_a_new_gallery():
    g, ids = random_gallery(7, n=120)
    q = np.random.default_rng(8).normal(size=(9, 16)).astype(np.float32)
    first = Gallery.create(g[:50], ids[:50], metric="euclidean")
    grown = enroll(enroll(first, g[50:90], ids[50:90]), g[90:], ids[90:])
    assert first.size == 50 and grown.size == 120 and len(grown) == 120 and grown.dim == 16
    assert grown.metric == "euclidean"
    whole = Gallery.create(g, ids, metric="euclidean")
    for a, b in zip(search(grown, q, 6), search(whole, q, 6), strict=True):
        np.testing.assert_array_equal(a, b)


def test_enroll_into_an_empty_gallery():
    empty = Gallery.create(np.zeros((0, 3), np.float32), np.zeros(0, np.int64))
    assert empty.size == 0
    g = enroll(empty, np.eye(3, dtype=np.float32), [5, 6, 7])
    np.testing.assert_array_equal(
        identify(g, np.eye(3, dtype=np.float32), threshold=0.9), [5, 6, 7]
    )


def test_gallery_is_immutable():
    gallery = Gallery.create(np.eye(3, dtype=np.float32), [0, 1, 2])
    with pytest.raises(dataclasses.FrozenInstanceError):
        gallery.metric = "euclidean"
    with pytest.raises(ValueError, match="read-only"):
        gallery.identities[0] = 9


# --------------------------------------------------------------------------------------------
# Open-set identification


def test_identify_rejects_unknown_queries_cosine():
    gallery = Gallery.create(np.eye(4, dtype=np.float32), [10, 11, 12, 13], metric="cosine")
    q = np.array([[1.0, 0.1, 0, 0], [0, 0, 2.0, 0], [1.0, 1.0, 1.0, 1.0], [0, 0, 0, -1.0]])
    q = q.astype(np.float32)
    np.testing.assert_array_equal(identify(gallery, q, threshold=0.9), [10, 12, UNKNOWN, UNKNOWN])
    np.testing.assert_array_equal(identify(gallery, q, threshold=0.5), [10, 12, 10, UNKNOWN])
    np.testing.assert_array_equal(identify(gallery, q, threshold=-1.0), [10, 12, 10, 10])


def test_identify_rejects_unknown_queries_euclidean():
    gallery = Gallery.create(np.eye(4, dtype=np.float32) * 10, [3, 1, 4, 1], metric="euclidean")
    q = np.array([[10.0, 0, 0, 0.5], [0, 9.0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 20.0]], np.float32)
    np.testing.assert_array_equal(identify(gallery, q, threshold=1.0), [3, 1, UNKNOWN, UNKNOWN])
    np.testing.assert_array_equal(identify(gallery, q, threshold=float("inf")), [3, 1, 3, 1])


@pytest.mark.parametrize("metric", METRICS)
def test_identify_threshold_equal_to_the_score_accepts(metric):
    g, ids = random_gallery(9, n=50, dim=8)
    q = np.random.default_rng(10).normal(size=(12, 8)).astype(np.float32)
    gallery = Gallery.create(g, ids, metric=metric)
    scores, _, best = search(gallery, q, 1)
    for row in range(len(q)):
        accepted = identify(gallery, q, threshold=float(scores[row, 0]))
        assert accepted[row] == best[row, 0]
        # the direction: higher similarity / lower distance than the threshold is accepted
        closer = (
            scores[:, 0] >= scores[row, 0]
            if metric == "cosine"
            else (scores[:, 0] <= scores[row, 0])
        )
        np.testing.assert_array_equal(accepted, np.where(closer, best[:, 0], UNKNOWN))


# --------------------------------------------------------------------------------------------
# Save / load


@pytest.mark.parametrize("metric", METRICS)
def test_save_load_round_trip(tmp_path, metric):
    g, ids = random_gallery(11, n=60, dim=5)
    ids = ids + 2**40  # int64 identities survive
    gallery = Gallery.create(g, ids, metric=metric)
    path = tmp_path / "gallery.bin"  # any name: written exactly there
    save(gallery, path)
    assert path.exists()
    loaded = load(path)
    assert loaded.metric == metric and loaded.identities.dtype == np.int64
    np.testing.assert_array_equal(np.asarray(loaded.embeddings), np.asarray(gallery.embeddings))
    np.testing.assert_array_equal(loaded.identities, ids)
    q = np.random.default_rng(12).normal(size=(4, 5)).astype(np.float32)
    for a, b in zip(search(loaded, q, 3), search(gallery, q, 3), strict=True):
        np.testing.assert_array_equal(a, b)


def test_load_rejects_bad_files(tmp_path):
    g = np.eye(3, dtype=np.float32)
    good = {
        "format_version": np.int64(1),
        "metric": np.str_("cosine"),
        "embeddings": g,
        "identities": np.arange(3),
    }

    def write(name, **changes):
        path = tmp_path / name
        arrays = {**good, **changes}
        np.savez(path, **{k: v for k, v in arrays.items() if v is not None})
        return path

    (tmp_path / "text.npz").write_text("not a zip")
    with pytest.raises(ValueError, match="not a gallery .npz"):
        load(tmp_path / "text.npz")
    with pytest.raises(ValueError, match="format version 2"):
        load(write("v2.npz", format_version=np.int64(2)))
    with pytest.raises(ValueError, match="expected arrays"):
        load(write("missing.npz", identities=None))
    with pytest.raises(ValueError, match="metric must be one of"):
        load(write("metric.npz", metric=np.str_("manhattan")))
    with pytest.raises(ValueError, match="embeddings must be finite"):
        load(write("nan.npz", embeddings=np.full((3, 3), np.nan, np.float32)))
    with pytest.raises(ValueError, match=r"identities must have shape \[3\]"):
        load(write("ids.npz", identities=np.arange(4)))
    assert load(write("ok.npz")).size == 3


# --------------------------------------------------------------------------------------------
# Bad input


def test_bad_inputs_name_the_argument():
    g = np.eye(4, dtype=np.float32)
    gallery = Gallery.create(g, [0, 1, 2, 3])
    q = np.ones((2, 4), np.float32)
    empty = Gallery.create(np.zeros((0, 4), np.float32), np.zeros(0, np.int32))
    cases = [
        (lambda: search(empty, q, 1), ValueError, "gallery is empty"),
        (lambda: identify(empty, q, threshold=0.5), ValueError, "gallery is empty"),
        (
            lambda: search(gallery, np.ones((2, 3), np.float32)),
            ValueError,
            r"queries .*\[num_queries >= 1, 4\]",
        ),
        (lambda: search(gallery, np.ones(4, np.float32)), ValueError, "queries must have shape"),
        (lambda: search(gallery, np.ones((0, 4), np.float32)), ValueError, "queries"),
        (
            lambda: search(gallery, np.ones((2, 4), np.int32)),
            TypeError,
            "queries must be a floating",
        ),
        (
            lambda: search(gallery, np.full((2, 4), np.nan, np.float32)),
            ValueError,
            "queries must be finite",
        ),
        (lambda: search(gallery, q, 5), ValueError, r"k must be <= the gallery size \(4\)"),
        (lambda: search(gallery, q, 0), ValueError, "k must be >= 1"),
        (lambda: search(gallery, q, 1.5), TypeError, "k must be a positive int"),
        (lambda: search(gallery, q, 1, chunk_size=0), ValueError, "chunk_size must be >= 1"),
        (lambda: search(g, q, 1), TypeError, "gallery must be a Gallery"),
        (
            lambda: identify(gallery, q, threshold=float("nan")),
            ValueError,
            "threshold must not be NaN",
        ),
        (
            lambda: identify(gallery, q, threshold="high"),
            TypeError,
            "threshold must be a real number",
        ),
        (
            lambda: Gallery.create(np.where(g > 0, np.nan, g), [0, 1, 2, 3]),
            ValueError,
            "embeddings must be finite",
        ),
        (lambda: Gallery.create(g, [0, 1, 2]), ValueError, r"identities must have shape \[4\]"),
        (
            lambda: Gallery.create(g, np.zeros((4, 1), int)),
            ValueError,
            r"identities must have shape \[4\]",
        ),
        (
            lambda: Gallery.create(g, np.arange(4.0)),
            TypeError,
            "identities must be an integer array",
        ),
        (lambda: Gallery.create(g, [0, 1, -1, 3]), ValueError, "identities must lie in"),
        (
            lambda: Gallery.create(g, [0, 1, 2, 3], metric="dot"),
            ValueError,
            "metric must be one of",
        ),
        (
            lambda: Gallery.create(np.ones(4, np.float32), [0]),
            ValueError,
            r"embeddings must have shape \[num_entries, dim\]",
        ),
        (lambda: Gallery.create(np.ones((4, 0), np.float32), [0, 1, 2, 3]), ValueError, "dim >= 1"),
        (
            lambda: enroll(gallery, np.ones((2, 3), np.float32), [4, 5]),
            ValueError,
            r"embeddings must have shape \[num_entries, 4\]",
        ),
        (
            lambda: enroll(gallery, np.ones((2, 4), np.float32), [4]),
            ValueError,
            r"identities must have shape \[2\]",
        ),
        (
            lambda: enroll(gallery, np.full((1, 4), np.inf, np.float32), [4]),
            ValueError,
            "embeddings must be finite",
        ),
    ]
    for fn, error, match in cases:
        with pytest.raises(error, match=match):
            fn()


# --------------------------------------------------------------------------------------------
# Memory: no [queries, gallery] array


def _all_shapes(jaxpr):
    """Shapes of every variable of a jaxpr and of its sub-jaxprs (scan bodies, pjit, ...)."""
    for eqn in jaxpr.eqns:
        for var in (*eqn.invars, *eqn.outvars):
            if hasattr(var.aval, "shape"):
                yield tuple(var.aval.shape)
        for param in eqn.params.values():
            for sub in param if isinstance(param, tuple | list) else (param,):
                if isinstance(sub, jax.extend.core.ClosedJaxpr):
                    yield from _all_shapes(sub.jaxpr)
                elif isinstance(sub, jax.extend.core.Jaxpr):
                    yield from _all_shapes(sub)


def test_chunked_search_never_builds_a_queries_by_gallery_array():
    num_queries, n, dim, chunk, k = 64, 200_000, 32, 10_000, 10
    fn = functools.partial(retrieval._search_chunk, k=k, metric="euclidean", chunk=chunk)
    queries = jax.ShapeDtypeStruct((num_queries, dim), jnp.float32)
    gallery = jax.ShapeDtypeStruct((n, dim), jnp.float32)
    shapes = set(_all_shapes(jax.make_jaxpr(fn)(queries, 0, gallery).jaxpr))
    assert (num_queries, chunk) in shapes  # one chunk of scores is built at a time ...
    assert (num_queries, chunk + k) in shapes  # ... and merged with the running top-k
    # nothing spans the gallery but the gallery itself: no [queries, gallery] array
    assert {s for s in shapes if n in s} == {(n, dim)}
    stats = jax.jit(fn).lower(queries, 0, gallery).compile().memory_analysis()
    if stats is not None:  # backends without the analysis skip this half
        assert stats.temp_size_in_bytes < num_queries * n * 4 // 4


def test_large_gallery_in_chunks_matches_brute_force():
    rng = np.random.default_rng(13)
    g = rng.normal(size=(200_000, 32)).astype(np.float32)
    q = rng.normal(size=(4, 32)).astype(np.float32)
    gallery = Gallery.create(g, np.arange(len(g)) // 3, metric="euclidean")
    scores, indices, identities = search(gallery, q, 5, chunk_size=10_000)
    ref_scores, ref_indices = brute_force(g, q, "euclidean", 5)
    np.testing.assert_array_equal(indices, ref_indices)
    np.testing.assert_array_equal(identities, ref_indices // 3)
    np.testing.assert_allclose(scores, ref_scores, rtol=1e-5)
