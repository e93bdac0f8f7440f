"""Tests for mlx_jax.metrics against plain NumPy loops, scikit-learn and PML's AccuracyCalculator."""

import jax
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from mlx_jax import metrics

# --------------------------------------------------------------------------------------------
# Plain references (float64, explicit loops, no code shared with the library)


def ref_scores(q, r, metric):
    """Smaller = nearer, float64."""
    q, r = np.asarray(q, np.float64), np.asarray(r, np.float64)
    out = np.zeros((len(q), len(r)))
    for i in range(len(q)):
        for j in range(len(r)):
            if metric == "cosine":
                out[i, j] = -(q[i] @ r[j]) / (
                    max(np.linalg.norm(q[i]), 1e-12) * max(np.linalg.norm(r[j]), 1e-12)
                )
            else:
                out[i, j] = np.sum((q[i] - r[j]) ** 2)
    return out


def ref_ranking(q, r, metric, exclude_self):
    """Per query: reference indices sorted by (score, index); the query itself removed."""
    scores = ref_scores(q, r, metric)
    ranking = []
    for i in range(len(q)):
        order = sorted(range(len(r)), key=lambda j, i=i: (scores[i, j], j))
        if exclude_self:
            order = [j for j in order if j != i]
        ranking.append(order)
    return ranking


def ref_retrieval(q, q_labels, r=None, r_labels=None, metric="euclidean"):
    """Musgrave et al. 2020: P@1, R-Precision, MAP@R averaged over queries with R > 0."""
    exclude_self = r is None
    if exclude_self:
        r, r_labels = q, q_labels
    ranking = ref_ranking(q, r, metric, exclude_self)
    p1, rp, mapr = [], [], []
    for i, order in enumerate(ranking):
        big_r = sum(1 for j in order if r_labels[j] == q_labels[i])
        if big_r == 0:
            continue
        rel = [1 if r_labels[j] == q_labels[i] else 0 for j in order]
        p1.append(rel[0])
        rp.append(sum(rel[:big_r]) / big_r)
        ap = 0.0
        for pos in range(big_r):
            if rel[pos]:
                ap += sum(rel[: pos + 1]) / (pos + 1)
        mapr.append(ap / big_r)
    if not p1:
        return {"precision_at_1": np.nan, "r_precision": np.nan, "map_at_r": np.nan}
    return {"precision_at_1": np.mean(p1), "r_precision": np.mean(rp), "map_at_r": np.mean(mapr)}


def ref_knn(q, q_labels, r, r_labels, k, metric, tie_break):
    ranking = ref_ranking(q, r, metric, exclude_self=False)
    correct = 0
    for i, order in enumerate(ranking):
        neighbours = [int(r_labels[j]) for j in order[:k]]
        votes = {}
        for label in neighbours:
            votes[label] = votes.get(label, 0) + 1
        best = max(votes.values())
        tied = [label for label in votes if votes[label] == best]
        if tie_break == "smallest_label":
            predicted = min(tied)
        else:
            predicted = next(label for label in neighbours if label in tied)
        correct += predicted == q_labels[i]
    return correct / len(q)


def ref_ratio(x, y):
    x = np.asarray(x, np.float64)
    intra, inter = [], []
    for i in range(len(x)):
        for j in range(len(x)):
            if i != j:
                (intra if y[i] == y[j] else inter).append(np.linalg.norm(x[i] - x[j]))
    return np.mean(intra) / np.mean(inter)


# --------------------------------------------------------------------------------------------
# Data


def clusters(seed, n, dim=4, classes=5, spread=1.0, label_values=None):
    """Gaussian clusters (continuous: no tied distances) with labels in range(classes); the
    centers depend only on (dim, classes), so calls with different seeds share them."""
    centers = np.random.default_rng([dim, classes]).normal(size=(classes, dim)) * 2
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, n)
    x = centers[labels] + spread * rng.normal(size=(n, dim))
    if label_values is not None:
        labels = np.asarray(label_values)[labels]
    return x.astype(np.float32), labels.astype(np.int32)


def grid(seed, n, dim=3, classes=3):
    """Small integer coordinates: many exactly tied distances (exact in float32)."""
    rng = np.random.default_rng(seed)
    x = rng.integers(-2, 3, size=(n, dim)).astype(np.float32)
    return x, rng.integers(0, classes, n).astype(np.int32)


@pytest.fixture(params=["top_k", "host"])
def selection(request, monkeypatch):
    """Runs a test with both neighbour-selection paths (lax.top_k and the NumPy partition)."""
    if request.param == "host":
        monkeypatch.setattr(metrics, "SMALL_K", 0)
    return request.param


def assert_dicts_close(got, want, tol=1e-6):
    assert set(got) == {"precision_at_1", "r_precision", "map_at_r"}
    for key in want:
        assert isinstance(got[key], float)
        np.testing.assert_allclose(got[key], want[key], rtol=tol, atol=tol, err_msg=key)


# --------------------------------------------------------------------------------------------
# argmax_accuracy


def test_argmax_accuracy_matches_loop():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(50, 7)).astype(np.float32)
    labels = rng.integers(0, 7, 50)
    want = np.mean([np.argmax(logits[i]) == labels[i] for i in range(50)])
    got = metrics.argmax_accuracy(logits, labels)
    assert isinstance(got, float)
    assert got == pytest.approx(want)


def test_argmax_accuracy_ties_go_to_smallest_class():
    logits = np.array([[1.0, 1.0, 0.0], [0.0, 2.0, 2.0]], np.float32)
    assert metrics.argmax_accuracy(logits, np.array([0, 1])) == 1.0
    assert metrics.argmax_accuracy(logits, np.array([1, 2])) == 0.0


@pytest.mark.parametrize(
    "logits, labels, error, match",
    [
        (np.zeros((3,), np.float32), np.zeros(3, np.int32), ValueError, "logits must have shape"),
        (np.zeros((3, 2), np.int32), np.zeros(3, np.int32), TypeError, "logits must be"),
        (np.zeros((3, 2), np.float32), np.zeros(4, np.int32), ValueError, r"labels must have"),
        (np.zeros((3, 2), np.float32), np.zeros(3, np.float32), TypeError, "labels must be"),
        (np.zeros((3, 2), np.float32), np.array([0, 1, 2]), ValueError, r"labels must lie"),
        (np.full((3, 2), np.nan, np.float32), np.zeros(3, np.int32), ValueError, "NaN"),
    ],
)
def test_argmax_accuracy_bad_inputs(logits, labels, error, match):
    with pytest.raises(error, match=match):
        metrics.argmax_accuracy(logits, labels)


# --------------------------------------------------------------------------------------------
# class_means


def test_class_means_matches_loop_and_absent_class_is_nan():
    x, y = clusters(1, 40, dim=3, classes=4)
    y[y == 2] = 0  # class 2 absent
    got = np.asarray(metrics.class_means(x, y, 5))  # class 4 absent too
    assert got.shape == (5, 3)
    for c in range(5):
        members = x[y == c].astype(np.float64)
        if len(members):
            np.testing.assert_allclose(got[c], members.mean(axis=0), rtol=1e-5, atol=1e-6)
        else:
            assert np.isnan(got[c]).all()


def test_class_means_jit_and_out_of_range_label_under_jit_is_nan():
    x, y = clusters(2, 20, dim=2, classes=3)
    jitted = jax.jit(metrics.class_means, static_argnums=2)
    np.testing.assert_allclose(jitted(x, y, 3), metrics.class_means(x, y, 3), rtol=1e-6)
    y_bad = y.copy()
    y_bad[0] = 7
    assert np.isnan(np.asarray(jitted(x, y_bad, 3))).all()


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"num_classes": 0}, ValueError, "num_classes must be >= 1"),
        ({"num_classes": 2.0}, TypeError, "num_classes must be a positive int"),
        ({"labels": np.array([0, 1, 5, 0])}, ValueError, "labels must lie in"),
        ({"labels": np.array([0, 1])}, ValueError, r"labels must have shape \[4\]"),
        ({"embeddings": np.ones(4, np.float32)}, ValueError, "embeddings must have shape"),
        (
            {"embeddings": np.full((4, 2), np.nan, np.float32)},
            ValueError,
            "embeddings must be finite",
        ),
    ],
)
def test_class_means_bad_inputs(kwargs, error, match):
    args = {"embeddings": np.ones((4, 2), np.float32), "labels": np.array([0, 1, 1, 0])}
    args["num_classes"] = 3
    args.update(kwargs)
    with pytest.raises(error, match=match):
        metrics.class_means(**args)


# --------------------------------------------------------------------------------------------
# nearest_center_accuracy


def ref_nearest_center(x, y, centers):
    correct = 0
    for i in range(len(x)):
        best, best_d = None, np.inf
        for j, c in enumerate(centers):
            if np.isnan(c).any():
                continue
            d = np.linalg.norm(np.asarray(x[i], np.float64) - c)
            if d < best_d:
                best, best_d = j, d
        correct += best == y[i]
    return correct / len(x)


@pytest.mark.parametrize("chunk_size", [None, 1, 7])
def test_nearest_center_accuracy_matches_loop(chunk_size):
    x, y = clusters(3, 60, dim=3, classes=4, spread=2.0)
    centers = np.random.default_rng(4).normal(size=(4, 3)).astype(np.float32) * 2
    want = ref_nearest_center(x, y, centers)
    assert 0 < want < 1
    got = metrics.nearest_center_accuracy(x, y, centers, chunk_size=chunk_size)
    assert isinstance(got, float)
    assert got == pytest.approx(want)


def test_nearest_center_accuracy_with_class_means_and_absent_class():
    train_x, train_y = clusters(5, 200, dim=2, classes=4, spread=0.3)
    test_x, test_y = clusters(5, 50, dim=2, classes=4, spread=0.3)
    centers = metrics.class_means(train_x, train_y, 4)
    assert metrics.nearest_center_accuracy(test_x, test_y, centers) > 0.95
    # class 3 unseen in training: its NaN center is never chosen
    seen = train_y != 3
    centers = metrics.class_means(train_x[seen], train_y[seen], 4)
    want = ref_nearest_center(test_x, test_y, np.asarray(centers))
    assert metrics.nearest_center_accuracy(test_x, test_y, centers) == pytest.approx(want)
    assert want == pytest.approx(np.mean(test_y != 3), abs=0.05)


def test_nearest_center_accuracy_bad_inputs():
    x = np.zeros((4, 2), np.float32)
    y = np.array([0, 1, 0, 1])
    with pytest.raises(ValueError, match=r"centers must have shape \[num_classes, 2\]"):
        metrics.nearest_center_accuracy(x, y, np.zeros((2, 3), np.float32))
    with pytest.raises(ValueError, match="labels must lie in"):
        metrics.nearest_center_accuracy(x, np.array([0, 1, 2, 0]), np.zeros((2, 2), np.float32))
    with pytest.raises(ValueError, match="NaN in every row"):
        metrics.nearest_center_accuracy(x, y, np.full((2, 2), np.nan, np.float32))
    with pytest.raises(ValueError, match="centers must be finite"):
        metrics.nearest_center_accuracy(x, y, np.full((2, 2), np.inf, np.float32))
    with pytest.raises(ValueError, match="embeddings must be finite"):
        metrics.nearest_center_accuracy(x + np.nan, y, np.zeros((2, 2), np.float32))
    with pytest.raises(ValueError, match="chunk_size must be >= 1"):
        metrics.nearest_center_accuracy(x, y, np.zeros((2, 2), np.float32), chunk_size=0)


# --------------------------------------------------------------------------------------------
# k-NN accuracy


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
@pytest.mark.parametrize("k", [1, 2, 4, 7])
def test_knn_accuracy_matches_sklearn(metric, k):
    from sklearn.neighbors import KNeighborsClassifier

    train_x, train_y = clusters(
        6, 120, dim=5, classes=6, spread=2.0, label_values=[3, 9, 0, 4, 12, 5]
    )
    test_x, test_y = clusters(7, 70, dim=5, classes=6, spread=2.0, label_values=[3, 9, 0, 4, 12, 5])
    sk = KNeighborsClassifier(n_neighbors=k, metric=metric, algorithm="brute")
    want = sk.fit(train_x.astype(np.float64), train_y).score(test_x.astype(np.float64), test_y)
    got = metrics.knn_accuracy(
        test_x, test_y, train_x, train_y, k=k, metric=metric, tie_break="smallest_label"
    )
    assert isinstance(got, float)
    assert got == pytest.approx(want)
    if k in (1, 7):  # sklearn has no vote ties here, so the tie rule does not matter
        got_nearest = metrics.knn_accuracy(test_x, test_y, train_x, train_y, k=k, metric=metric)
        assert got_nearest == pytest.approx(
            ref_knn(test_x, test_y, train_x, train_y, k, metric, "nearest")
        )


@pytest.mark.parametrize("tie_break", ["nearest", "smallest_label"])
@pytest.mark.parametrize("k", [1, 2, 4, 6])
def test_knn_accuracy_ties_match_reference(selection, tie_break, k):
    """Integer grid: tied distances (ranked by reference index) and tied votes."""
    train_x, train_y = grid(8, 50)
    test_x, test_y = grid(9, 40)
    want = ref_knn(test_x, test_y, train_x, train_y, k, "euclidean", tie_break)
    for chunk_size in (None, 3):
        got = metrics.knn_accuracy(
            test_x, test_y, train_x, train_y, k=k, tie_break=tie_break, chunk_size=chunk_size
        )
        assert got == pytest.approx(want)


def test_knn_accuracy_tie_break_rules_differ():
    # query at 0; neighbours: label 5 at distance 1, label 2 at distance 2: one vote each
    reference = np.array([[1.0], [2.0], [10.0]], np.float32)
    r_labels = np.array([5, 2, 2])
    query = np.zeros((1, 1), np.float32)
    assert metrics.knn_accuracy(query, np.array([5]), reference, r_labels, k=2) == 1.0
    assert (
        metrics.knn_accuracy(
            query, np.array([2]), reference, r_labels, k=2, tie_break="smallest_label"
        )
        == 1.0
    )


def test_knn_accuracy_k_equals_num_references_and_unseen_query_class():
    train_x, train_y = clusters(10, 12, classes=3)
    test_x, test_y = clusters(11, 9, classes=3)
    test_y[:3] = 8  # not among the reference labels: never predicted
    got = metrics.knn_accuracy(test_x, test_y, train_x, train_y, k=12)
    assert got == pytest.approx(
        ref_knn(test_x, test_y, train_x, train_y, 12, "euclidean", "nearest")
    )


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"k": 0}, ValueError, "k must be >= 1"),
        ({"k": 11}, ValueError, r"k must be <= the number of references \(10\)"),
        ({"k": 1.5}, TypeError, "k must be a positive int"),
        ({"metric": "manhattan"}, ValueError, "metric must be one of"),
        ({"tie_break": "random"}, ValueError, "tie_break must be one of"),
        (
            {"reference": np.zeros((10, 3), np.float32)},
            ValueError,
            r"reference must have shape \[num_references, 2\]",
        ),
        (
            {"reference_labels": np.zeros(9, np.int32)},
            ValueError,
            r"reference_labels must have shape \[10\]",
        ),
        ({"query_labels": np.zeros(4, np.float32)}, TypeError, "query_labels must be an integer"),
        ({"query": np.full((4, 2), np.nan, np.float32)}, ValueError, "query must be finite"),
        (
            {"reference": np.full((10, 2), np.inf, np.float32)},
            ValueError,
            "reference must be finite",
        ),
        (
            {"query": np.zeros((0, 2), np.float32), "query_labels": np.zeros(0, np.int32)},
            ValueError,
            "query must have shape",
        ),
    ],
)
def test_knn_accuracy_bad_inputs(kwargs, error, match):
    args = {
        "query": np.zeros((4, 2), np.float32),
        "query_labels": np.zeros(4, np.int32),
        "reference": np.zeros((10, 2), np.float32),
        "reference_labels": np.zeros(10, np.int32),
    }
    args.update(kwargs)
    with pytest.raises(error, match=match):
        metrics.knn_accuracy(**args)


# --------------------------------------------------------------------------------------------
# Retrieval metrics


@pytest.mark.parametrize("metric", ["euclidean", "squared_euclidean", "cosine"])
def test_retrieval_metrics_match_reference(selection, metric):
    q, q_labels = clusters(12, 40, dim=4, classes=4, spread=2.0)
    r, r_labels = clusters(13, 70, dim=4, classes=4, spread=2.0)
    want = ref_retrieval(q, q_labels, r, r_labels, metric=metric)
    assert 0.2 < want["map_at_r"] < 0.9
    assert_dicts_close(metrics.retrieval_metrics(q, q_labels, r, r_labels, metric=metric), want)
    want_self = ref_retrieval(q, q_labels, metric=metric)
    assert_dicts_close(metrics.retrieval_metrics(q, q_labels, metric=metric), want_self)


@pytest.mark.parametrize("chunk_size", [None, 1, 6])
def test_retrieval_metrics_ties_match_reference(selection, chunk_size):
    """Integer grid: tied distances ranked by reference index, in both selection paths."""
    q, q_labels = grid(14, 30)
    r, r_labels = grid(15, 45)
    got = metrics.retrieval_metrics(q, q_labels, r, r_labels, chunk_size=chunk_size)
    assert_dicts_close(got, ref_retrieval(q, q_labels, r, r_labels))
    got_self = metrics.retrieval_metrics(q, q_labels, chunk_size=chunk_size)
    assert_dicts_close(got_self, ref_retrieval(q, q_labels))


def test_retrieval_metrics_lone_queries_are_left_out():
    q, q_labels = clusters(16, 30, classes=3)
    r, r_labels = clusters(17, 40, classes=3)
    q_labels[:5] = 7  # no reference of class 7
    q_labels[5] = 8  # ditto
    got = metrics.retrieval_metrics(q, q_labels, r, r_labels)
    assert_dicts_close(got, ref_retrieval(q, q_labels, r, r_labels))
    kept = slice(6, None)
    assert_dicts_close(got, ref_retrieval(q[kept], q_labels[kept], r, r_labels))
    # self-retrieval: a singleton class has R = 0
    got_self = metrics.retrieval_metrics(q, q_labels)
    assert_dicts_close(got_self, ref_retrieval(q, q_labels))


def test_retrieval_metrics_all_lone_is_nan():
    q = np.eye(3, dtype=np.float32)
    got = metrics.retrieval_metrics(q, np.array([0, 1, 2]))
    assert all(np.isnan(v) for v in got.values())
    got = metrics.retrieval_metrics(q, np.array([0, 0, 0]), q, np.array([1, 1, 2]))
    assert all(np.isnan(v) for v in got.values())


def test_retrieval_metrics_hand_computed():
    # 1-D: query at 0 (label 0); references: 1 (label 0), 2 (label 1), 3 (label 0), 4 (label 1)
    # R = 2, relevance 1,0,1,0 → P@1 = 1, R-precision = 1/2, MAP@R = (1/1 + 0)/2 = 1/2
    reference = np.array([[1.0], [2.0], [3.0], [4.0]], np.float32)
    got = metrics.retrieval_metrics(
        np.zeros((1, 1), np.float32), np.array([0]), reference, np.array([0, 1, 0, 1])
    )
    assert got == {"precision_at_1": 1.0, "r_precision": 0.5, "map_at_r": 0.5}
    # relevance 0,1,1 with R = 2 → P@1 = 0, R-precision = 1/2, MAP@R = (1/2)/2 = 1/4
    got = metrics.retrieval_metrics(
        np.zeros((1, 1), np.float32), np.array([0]), reference[1:], np.array([1, 0, 0])
    )
    assert got == {"precision_at_1": 0.0, "r_precision": 0.5, "map_at_r": 0.25}


def test_retrieval_metrics_explicit_reference_does_not_exclude_self():
    q, q_labels = clusters(18, 25, classes=3, spread=3.0)
    got = metrics.retrieval_metrics(q, q_labels, q, q_labels)
    assert got["precision_at_1"] == 1.0  # each query finds itself first
    assert_dicts_close(got, ref_retrieval(q, q_labels, q.copy(), q_labels))


def test_retrieval_metrics_separated_clusters_are_perfect():
    q, q_labels = clusters(19, 60, dim=8, classes=5, spread=0.01)
    assert metrics.retrieval_metrics(q, q_labels) == {
        "precision_at_1": 1.0,
        "r_precision": 1.0,
        "map_at_r": 1.0,
    }


@given(
    seed=st.integers(0, 2**16),
    relabel_seed=st.integers(0, 2**16),
)
def test_retrieval_metrics_invariances(seed, relabel_seed):
    """Relabeling classes and permuting queries or references leaves the metrics unchanged."""
    q, q_labels = clusters(seed, 20, dim=3, classes=3, spread=2.0)
    r, r_labels = clusters(seed + 1, 30, dim=3, classes=3, spread=2.0)
    base = metrics.retrieval_metrics(q, q_labels, r, r_labels)
    rng = np.random.default_rng(relabel_seed)
    new_ids = rng.permutation(50)[:3]
    relabeled = metrics.retrieval_metrics(q, new_ids[q_labels], r, new_ids[r_labels])
    assert_dicts_close(relabeled, base, tol=1e-12)
    qp, rp = rng.permutation(20), rng.permutation(30)
    permuted = metrics.retrieval_metrics(q[qp], q_labels[qp], r[rp], r_labels[rp])
    assert_dicts_close(permuted, base, tol=1e-12)
    self_base = metrics.retrieval_metrics(q, q_labels)
    self_permuted = metrics.retrieval_metrics(q[qp], q_labels[qp])
    assert_dicts_close(self_permuted, self_base, tol=1e-12)


def test_retrieval_metrics_large_r_uses_host_path_and_matches_top_k(monkeypatch):
    q, q_labels = clusters(20, 300, dim=2, classes=2, spread=3.0)
    r, r_labels = clusters(21, 700, dim=2, classes=2, spread=3.0)
    assert np.bincount(r_labels).max() > metrics.SMALL_K  # the default takes the host path
    host = metrics.retrieval_metrics(q, q_labels, r, r_labels)
    monkeypatch.setattr(metrics, "SMALL_K", 10**6)
    assert_dicts_close(host, metrics.retrieval_metrics(q, q_labels, r, r_labels), tol=1e-12)


def test_retrieval_metrics_bad_inputs():
    q = np.zeros((4, 2), np.float32)
    y = np.array([0, 1, 0, 1])
    with pytest.raises(ValueError, match="reference and reference_labels must be given together"):
        metrics.retrieval_metrics(q, y, q)
    with pytest.raises(ValueError, match="reference and reference_labels must be given together"):
        metrics.retrieval_metrics(q, y, reference_labels=y)
    with pytest.raises(ValueError, match=r"reference must have shape \[num_references, 2\]"):
        metrics.retrieval_metrics(q, y, np.zeros((4, 3), np.float32), y)
    with pytest.raises(ValueError, match="metric must be one of"):
        metrics.retrieval_metrics(q, y, metric="dot")
    with pytest.raises(ValueError, match="query must be finite"):
        metrics.retrieval_metrics(q + np.nan, y)
    with pytest.raises(ValueError, match="query_labels must lie in"):
        metrics.retrieval_metrics(q, np.array([0, -1, 0, 1]))
    with pytest.raises(TypeError, match="query must be a floating-point array"):
        metrics.retrieval_metrics(y[:, None], y)


# PML parity ------------------------------------------------------------------------------


def pml_accuracy(q, q_labels, r, r_labels, metric):
    pytest.importorskip("torch", reason="torch not installed (see DEVELOPERS.md)")
    pytest.importorskip("pytorch_metric_learning", reason="pytorch-metric-learning not installed")
    import torch
    from pytorch_metric_learning.distances import CosineSimilarity, LpDistance
    from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator
    from pytorch_metric_learning.utils.inference import CustomKNN

    # PML's default k-NN needs faiss; CustomKNN with the same distance does not.
    distance = CosineSimilarity() if metric == "cosine" else LpDistance(normalize_embeddings=False)
    calculator = AccuracyCalculator(
        include=("precision_at_1", "r_precision", "mean_average_precision_at_r"),
        k="max_bin_count",
        knn_func=CustomKNN(distance),
        device=torch.device("cpu"),
    )
    kwargs = {} if r is None else {"reference": r, "reference_labels": r_labels}
    got = calculator.get_accuracy(q, q_labels, **kwargs)
    return {
        "precision_at_1": got["precision_at_1"],
        "r_precision": got["r_precision"],
        "map_at_r": got["mean_average_precision_at_r"],
    }


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
@pytest.mark.parametrize("with_reference", [False, True])
def test_retrieval_metrics_match_pml_accuracy_calculator(selection, metric, with_reference):
    q, q_labels = clusters(22, 80, dim=6, classes=5, spread=2.5)
    r, r_labels = clusters(23, 120, dim=6, classes=5, spread=2.5)
    q_labels[:3] = 9  # lone queries: PML leaves them out too
    if not with_reference:
        r = r_labels = None
    want = pml_accuracy(q, q_labels, r, r_labels, metric)
    assert 0.2 < want["map_at_r"] < 0.9
    got = metrics.retrieval_metrics(q, q_labels, r, r_labels, metric=metric)
    assert_dicts_close(got, want, tol=1e-6)


# Mean average precision, mean reciprocal rank, per-class averages ---------------------------

ALL_RETRIEVAL = (
    "precision_at_1",
    "r_precision",
    "map_at_r",
    "mean_average_precision",
    "mean_reciprocal_rank",
)


def ref_per_query(q, q_labels, r=None, r_labels=None, metric="euclidean", k=None):
    """Per query with R > 0: (label, {metric: value}) by explicit loops over the ranking."""
    exclude_self = r is None
    if exclude_self:
        r, r_labels = q, q_labels
    out = []
    for i, order in enumerate(ref_ranking(q, r, metric, exclude_self)):
        rel = [1 if r_labels[j] == q_labels[i] else 0 for j in order]
        big_r = sum(rel)
        if big_r == 0:
            continue
        cut = len(rel) if k is None else k
        ap = sum(sum(rel[: pos + 1]) / (pos + 1) for pos in range(min(cut, len(rel))) if rel[pos])
        first = next((pos + 1 for pos in range(min(cut, len(rel))) if rel[pos]), None)
        ap_at_r = sum(sum(rel[: pos + 1]) / (pos + 1) for pos in range(big_r) if rel[pos])
        values = {
            "precision_at_1": rel[0],
            "r_precision": sum(rel[:big_r]) / big_r,
            "map_at_r": ap_at_r / big_r,
            "mean_average_precision": ap / big_r,
            "mean_reciprocal_rank": 0.0 if first is None else 1.0 / first,
        }
        out.append((int(q_labels[i]), values))
    return out


def ref_average(per_query, average):
    if average == "queries":
        return {m: np.mean([v[m] for _, v in per_query]) for m in ALL_RETRIEVAL}
    by_class = ref_by_class(per_query)
    return {m: np.mean(list(by_class[m].values())) for m in ALL_RETRIEVAL}


def ref_by_class(per_query):
    classes = sorted({c for c, _ in per_query})
    return {
        m: {c: np.mean([v[m] for cc, v in per_query if cc == c]) for c in classes}
        for m in ALL_RETRIEVAL
    }


@pytest.mark.parametrize("k", [None, 1, 7])
@pytest.mark.parametrize("average", ["queries", "classes"])
@pytest.mark.parametrize("with_reference", [False, True])
def test_average_precision_and_reciprocal_rank_match_loops(selection, k, average, with_reference):
    q, q_labels = grid(30, 36, classes=4)  # many ties: ranked by reference index
    r, r_labels = grid(31, 50, classes=4) if with_reference else (None, None)
    q_labels[:2] = 7  # a class absent from the references (R = 0), R = 1 in self-retrieval
    got = metrics.retrieval_metrics(
        q, q_labels, r, r_labels, include=ALL_RETRIEVAL, k=k, average=average, chunk_size=10
    )
    want = ref_average(ref_per_query(q, q_labels, r, r_labels, k=k), average)
    assert list(got) == list(ALL_RETRIEVAL)
    for m in ALL_RETRIEVAL:
        assert got[m] == pytest.approx(want[m], abs=1e-12), m


def test_per_class_results_match_loops():
    q, q_labels = clusters(32, 60, dim=3, classes=4, spread=2.5, label_values=[3, 5, 8, 11])
    got = metrics.retrieval_metrics(q, q_labels, include=ALL_RETRIEVAL, per_class=True)
    want = ref_by_class(ref_per_query(q, q_labels))
    assert set(got) == set(ALL_RETRIEVAL)
    for m in ALL_RETRIEVAL:
        assert set(got[m]) == {3, 5, 8, 11}
        for c, value in want[m].items():
            assert got[m][c] == pytest.approx(value, abs=1e-12), (m, c)
    # the average of per-class averages weighs classes, not queries
    q_labels[q_labels == 3] = 5  # one big class
    by_query = metrics.retrieval_metrics(q, q_labels, include=["map_at_r"])
    by_class = metrics.retrieval_metrics(q, q_labels, include=["map_at_r"], average="classes")
    assert by_query["map_at_r"] != pytest.approx(by_class["map_at_r"])


def test_average_precision_hand_computed():
    # one query at 0; references at 1..5 with labels 0 1 0 1 1 (R = 2): ranks 1 and 3 relevant
    q = np.zeros((1, 1), np.float32)
    r = np.arange(1, 6, dtype=np.float32)[:, None]
    r_labels = np.array([0, 1, 0, 1, 1])
    got = metrics.retrieval_metrics(
        q, np.array([0]), r, r_labels, include=["mean_average_precision", "mean_reciprocal_rank"]
    )
    assert got["mean_average_precision"] == pytest.approx((1 / 1 + 2 / 3) / 2)
    assert got["mean_reciprocal_rank"] == 1.0
    # cut at k = 2: only rank 1 counts, still divided by R = 2 (AccuracyCalculator's convention)
    got = metrics.retrieval_metrics(q, np.array([0]), r, r_labels[::-1], include=ALL_RETRIEVAL, k=2)
    assert got["mean_average_precision"] == 0.0  # labels 1 1 0 1 0: no relevant in the top 2
    assert got["mean_reciprocal_rank"] == 0.0
    got = metrics.retrieval_metrics(q, np.array([0]), r, r_labels[::-1], include=ALL_RETRIEVAL)
    assert got["mean_reciprocal_rank"] == pytest.approx(1 / 3)


def test_retrieval_metrics_all_lone_per_class_is_empty():
    q = np.eye(3, dtype=np.float32)
    got = metrics.retrieval_metrics(q, np.array([0, 1, 2]), per_class=True)
    assert got == {"precision_at_1": {}, "r_precision": {}, "map_at_r": {}}
    got = metrics.retrieval_metrics(q, np.array([0, 1, 2]), include=["mean_reciprocal_rank"])
    assert np.isnan(got["mean_reciprocal_rank"])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"include": "map_at_r"}, "include must be a non-empty sequence"),
        ({"include": []}, "include must be a non-empty sequence"),
        ({"include": ["map"]}, r"include: unknown metric\(s\) \['map'\]"),
        ({"k": 0}, "k must be a positive int or None"),
        ({"k": 2.5}, "k must be a positive int or None"),
        ({"average": "samples"}, "average must be one of"),
    ],
)
def test_retrieval_options_bad_inputs(kwargs, match):
    q, y = clusters(33, 8, dim=2, classes=2)
    with pytest.raises(ValueError, match=match):
        metrics.retrieval_metrics(q, y, **kwargs)


@pytest.mark.parametrize("k", [None, 5])
@pytest.mark.parametrize("avg_of_avgs", [False, True])
def test_average_precision_and_reciprocal_rank_match_pml(k, avg_of_avgs):
    pytest.importorskip("torch", reason="torch not installed")
    pytest.importorskip("pytorch_metric_learning", reason="pytorch-metric-learning not installed")
    import torch
    from pytorch_metric_learning.distances import LpDistance
    from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator
    from pytorch_metric_learning.utils.inference import CustomKNN

    q, q_labels = clusters(34, 70, dim=5, classes=5, spread=2.5)
    r, r_labels = clusters(35, 90, dim=5, classes=5, spread=2.5)
    include = ("mean_average_precision", "mean_reciprocal_rank", "precision_at_1")
    calculator = AccuracyCalculator(
        include=include,
        k=len(r) if k is None else k,  # PML's k=None would mean max_bin_count
        avg_of_avgs=avg_of_avgs,
        knn_func=CustomKNN(LpDistance(normalize_embeddings=False)),
        device=torch.device("cpu"),
    )
    want = calculator.get_accuracy(q, q_labels, r, r_labels)
    got = metrics.retrieval_metrics(
        q,
        q_labels,
        r,
        r_labels,
        include=include,
        k=k,
        average="classes" if avg_of_avgs else "queries",
    )
    assert 0.1 < want["mean_average_precision"] < 0.95  # not trivially 0 or 1
    for m in include:
        assert got[m] == pytest.approx(want[m], abs=1e-6), m


# --------------------------------------------------------------------------------------------
# Intra / inter distance ratio


@pytest.mark.parametrize("chunk_size", [None, 1, 7])
def test_intra_inter_distance_ratio_matches_loops(chunk_size):
    x, y = clusters(24, 45, dim=3, classes=4, spread=1.5)
    got = metrics.intra_inter_distance_ratio(x, y, chunk_size=chunk_size)
    assert isinstance(got, float)
    assert got == pytest.approx(ref_ratio(x, y), rel=1e-5)


def test_intra_inter_distance_ratio_with_singletons_and_duplicates():
    x, y = clusters(25, 20, dim=2, classes=3)
    y[0] = 17  # a singleton class: contributes inter pairs only
    x[2] = x[1]  # a duplicate point
    assert metrics.intra_inter_distance_ratio(x, y) == pytest.approx(ref_ratio(x, y), rel=1e-5)


def test_intra_inter_distance_ratio_bad_inputs():
    x = np.random.default_rng(0).normal(size=(4, 2)).astype(np.float32)
    with pytest.raises(ValueError, match="at least two classes"):
        metrics.intra_inter_distance_ratio(x, np.zeros(4, np.int32))
    with pytest.raises(ValueError, match="at least two samples"):
        metrics.intra_inter_distance_ratio(x, np.arange(4))
    with pytest.raises(ValueError, match="embeddings must be finite"):
        metrics.intra_inter_distance_ratio(x * np.nan, np.array([0, 0, 1, 1]))
    with pytest.raises(ValueError, match=r"labels must have shape \[4\]"):
        metrics.intra_inter_distance_ratio(x, np.array([0, 0, 1]))


# --------------------------------------------------------------------------------------------
# Internals


@pytest.mark.parametrize("k", [1, 5, 19, 20])
def test_nearest_indices_is_a_stable_argsort_prefix(k):
    rng = np.random.default_rng(26)
    keys = rng.integers(0, 4, size=(9, 20)).astype(np.uint32)  # many ties
    buffer = np.empty((16, 32), np.uint64)
    got = metrics._nearest_indices(keys, k, buffer)
    np.testing.assert_array_equal(got, np.argsort(keys, axis=1, kind="stable")[:, :k])


def test_ranking_keys_preserve_score_order():
    queries = np.array([[0.0, 0.0], [1.0, 0.0], [-1.0, 1.0]], np.float32)
    reference = np.array([[0.0, 0.0], [2.0, 0.0], [1.0, 0.0], [0.0, 3.0], [-1.0, -1.0]], np.float32)
    for metric in ["euclidean", "cosine"]:
        for exclude_self in [False, True]:
            r = queries if exclude_self else reference
            keys = np.asarray(
                metrics._ranking_keys(queries, 0, r, metric=metric, exclude_self=exclude_self)
            )
            assert keys.dtype == np.uint32
            scores = ref_scores(queries, r, metric)
            if exclude_self:
                np.fill_diagonal(scores, np.inf)
            for i in range(len(queries)):  # same order wherever the scores clearly differ
                for j in range(len(r)):
                    for m in range(len(r)):
                        if scores[i, j] < scores[i, m] - 1e-6:
                            assert keys[i, j] < keys[i, m], (metric, exclude_self, i, j, m)
    # a zero query: every cosine similarity is 0 and its negation −0.0 or +0.0: all keys equal
    keys = np.asarray(
        metrics._ranking_keys(queries[:1], 0, reference, metric="cosine", exclude_self=False)
    )
    assert len(set(keys[0].tolist())) == 1


def test_cosine_zero_vector_ties_are_ranked_by_index(selection):
    """A zero query has similarity 0 (−0.0 after negation) to everything: index order."""
    reference = np.array([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]], np.float32)
    q = np.zeros((1, 2), np.float32)
    for k, label in [(1, 0), (2, 0)]:
        assert (
            metrics.knn_accuracy(
                q, np.array([label]), reference, np.array([0, 1, 1]), k=k, metric="cosine"
            )
            == 1.0
        )
