"""Tests for the verification metrics of mlx_jax.metrics (FaceNet's VAL/FAR, VAL@FAR, ROC, AUC)
and clustering_scores, against plain pair loops and scikit-learn."""

import math

import numpy as np
import pytest
from sklearn import metrics as skm

from mlx_jax import metrics
from mlx_jax.metrics import clustering_scores, roc_auc, roc_curve, val_at_far, verification_rates

METRICS = ["squared_euclidean", "euclidean", "cosine"]
# FaceNet's distance; small-integer embeddings have exact float32 squared distances (ties).
SQ = "squared_euclidean"

# --------------------------------------------------------------------------------------------
# Plain references (float64, explicit loops over pairs i < j; no code shared with the library)


def ref_pairs(x, y, metric):
    """[(distance, same)] over all pairs i < j."""
    x = np.asarray(x, np.float64)
    out = []
    for i in range(len(x)):
        for j in range(i + 1, len(x)):
            if metric == "cosine":
                na, nb = max(np.linalg.norm(x[i]), 1e-12), max(np.linalg.norm(x[j]), 1e-12)
                d = 1.0 - x[i] @ x[j] / (na * nb)
            else:
                d = float(np.sum((x[i] - x[j]) ** 2))
                d = d if metric == "squared_euclidean" else math.sqrt(d)
            out.append((d, bool(y[i] == y[j])))
    return out


def ref_rates(pairs, d):
    """FaceNet: VAL(d) = |TA(d)| / |P_same|, FAR(d) = |FA(d)| / |P_diff|."""
    same = [p for p in pairs if p[1]]
    diff = [p for p in pairs if not p[1]]
    true_accepts = sum(1 for dist, _ in same if dist <= d)
    false_accepts = sum(1 for dist, _ in diff if dist <= d)
    return true_accepts / len(same), false_accepts / len(diff)


def ref_val_at_far(pairs, far):
    """The largest observed distance d with FAR(d) <= far (or none), its VAL and FAR, and the
    smallest different-pair distance above it (the threshold must lie in between)."""
    best = None
    for d in sorted({p[0] for p in pairs}):
        val, rate = ref_rates(pairs, d)
        if rate <= far:
            best = (val, d, rate)
    val, d, rate = best if best is not None else (0.0, -math.inf, 0.0)
    above = min(p[0] for p in pairs if not p[1] and p[0] > d)
    return val, d, rate, above


def random_set(seed, n=30, dim=4, classes=3):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, dim)).astype(np.float32)
    y = rng.integers(0, classes, size=n)
    return x, y


def integer_set(seed, n=30, dim=3, classes=3):
    """Small-integer embeddings: float32 squared distances are exact, with many ties."""
    rng = np.random.default_rng(seed)
    x = rng.integers(-2, 3, size=(n, dim)).astype(np.float32)
    y = rng.integers(0, classes, size=n)
    return x, y


# --------------------------------------------------------------------------------------------
# verification_rates


@pytest.mark.parametrize("metric", METRICS)
def test_verification_rates_match_pair_loops(metric):
    x, y = random_set(0)
    pairs = ref_pairs(x, y, metric)
    distances = np.sort([p[0] for p in pairs])
    # thresholds between observed distances (away from float32 rounding), below and above all
    thresholds = np.concatenate([(distances[:-1] + distances[1:])[::37] / 2, [-1.0, 1e9]])
    thresholds = np.random.default_rng(1).permutation(thresholds)  # any order
    val, far = verification_rates(x, y, thresholds, metric=metric, chunk_size=7)
    for t, v, f in zip(thresholds, val, far, strict=True):
        assert (v, f) == ref_rates(pairs, t)
    assert val.dtype == np.float64 and val.shape == thresholds.shape


def test_verification_rates_count_ties_as_accepted():
    """D <= d: a pair at exactly the threshold is accepted (exact integer distances)."""
    x, y = integer_set(2)
    pairs = ref_pairs(x, y, "squared_euclidean")
    thresholds = np.unique([p[0] for p in pairs])  # every observed distance, exactly
    val, far = verification_rates(x, y, thresholds, metric=SQ)
    expected = np.array([ref_rates(pairs, t) for t in thresholds])
    np.testing.assert_array_equal(np.stack([val, far], axis=1), expected)
    val0, far0 = verification_rates(x, y, 2.0, metric=SQ)  # a scalar threshold gives 0-d results
    assert val0.shape == () and (float(val0), float(far0)) == ref_rates(pairs, 2.0)


def test_verification_rates_are_independent_of_chunking_and_order():
    x, y = integer_set(3, n=41)
    t = np.arange(0.0, 30.0, 0.5)
    base = verification_rates(x, y, t, metric=SQ, chunk_size=41)
    perm = np.random.default_rng(4).permutation(41)
    for chunk in (1, 5, None):
        for a, b in zip(
            verification_rates(x, y, t, metric=SQ, chunk_size=chunk), base, strict=True
        ):
            np.testing.assert_array_equal(a, b)
    for a, b in zip(verification_rates(x[perm], y[perm], t, metric=SQ), base, strict=True):
        np.testing.assert_array_equal(a, b)


# --------------------------------------------------------------------------------------------
# val_at_far


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("far", [1e-3, 0.01, 0.1, 0.5, 0.99])
def test_val_at_far_matches_pair_loops(metric, far):
    x, y = random_set(5, n=40)
    pairs = ref_pairs(x, y, metric)
    val, threshold, achieved = val_at_far(x, y, far, metric=metric, chunk_size=6)
    ref_val, ref_d, ref_far, above = ref_val_at_far(pairs, far)
    assert (val, achieved) == (ref_val, ref_far)
    assert ref_d * (1 - 1e-5) - 1e-6 <= threshold < above * (1 + 1e-5) + 1e-6
    assert achieved <= far
    # the threshold reproduces the rates with FaceNet's D <= d on the library's own distances
    # (the same chunk_size: the matmul's last-bit rounding can depend on the chunk's shape)
    rates = verification_rates(x, y, threshold, metric=metric, chunk_size=6)
    assert (float(rates[0]), float(rates[1])) == (val, achieved)


@pytest.mark.parametrize("far", [1e-3, 0.02, 0.05, 0.2, 0.6])
def test_val_at_far_ties_exact(far):
    """Integer distances, many ties: the threshold is the float32 just below δ_{m+1}, different
    pairs tied at δ_{m+1} are rejected together (achieved FAR may fall below the target)."""
    x, y = integer_set(6, n=40)
    pairs = ref_pairs(x, y, "squared_euclidean")
    val, threshold, achieved = val_at_far(x, y, far, metric=SQ)
    ref_val, _, ref_far, above = ref_val_at_far(pairs, far)
    assert (val, achieved) == (ref_val, ref_far)
    assert threshold == float(np.nextafter(np.float32(above), np.float32(-np.inf)))


def test_val_at_far_below_one_false_accept_can_give_zero_val():
    x = np.array([[0.0], [0.1], [5.0], [5.2]], np.float32)
    y = np.array([0, 1, 0, 1])  # different pairs at 0.01, 0.04, 24.01, 27.04; same at 25, 26.01
    # |P_diff| = 4: no false accept allowed
    val, threshold, achieved = val_at_far(x, y, far=0.2, metric=SQ)
    assert (val, achieved) == (0.0, 0.0)
    assert 0.0 <= threshold < np.float32(0.1) ** 2
    assert val_at_far(x, y, far=0.5, metric=SQ)[::2] == (0.0, 0.5)  # two false accepts, below 25
    val, threshold, achieved = val_at_far(x, y, far=0.75, metric=SQ)
    assert (val, achieved) == (1.0, 0.75) and 26.01 < threshold < 27.04


def test_val_at_far_is_exact_on_a_larger_set():
    """3000 embeddings (≈4.5M pairs, several row chunks): the streamed selection equals a full
    sort of the same float32 pair distances, and agrees with float64 distances up to rounding."""
    rng = np.random.default_rng(7)
    y = rng.integers(0, 30, size=3000)
    x = (rng.normal(size=(3000, 16)) + 0.7 * rng.normal(size=(30, 16))[y]).astype(np.float32)
    val, threshold, achieved = val_at_far(x, y, 1e-3, metric=SQ)
    chunks = list(metrics._verification_pairs(x, y, "squared_euclidean", None)[0])
    same = np.concatenate([c[0] for c in chunks])
    diff_sorted = np.sort(np.concatenate([c[1] for c in chunks]))
    assert len(same) + len(diff_sorted) == 3000 * 2999 // 2
    cutoff = diff_sorted[math.floor(1e-3 * len(diff_sorted))]
    assert achieved == np.count_nonzero(diff_sorted < cutoff) / len(diff_sorted) <= 1e-3
    assert val == np.count_nonzero(same < cutoff) / len(same)
    assert threshold == float(np.nextafter(cutoff, np.float32(-np.inf)))
    # float64 reference: the same operating point up to a few pairs at the rounding level
    x64 = x.astype(np.float64)
    d = (x64**2).sum(1)[:, None] + (x64**2).sum(1)[None, :] - 2 * x64 @ x64.T
    i, j = np.triu_indices(len(x), 1)
    d, is_same = d[i, j], y[i] == y[j]
    assert abs(np.count_nonzero(d[is_same] <= threshold) / is_same.sum() - val) < 1e-4
    assert abs(np.count_nonzero(d[~is_same] <= threshold) / (~is_same).sum() - achieved) < 1e-5


# --------------------------------------------------------------------------------------------
# ROC and AUC against scikit-learn (score = −distance: smaller distance means "same")


def sklearn_roc(pairs, drop_intermediate):
    same = np.array([p[1] for p in pairs])
    score = -np.array([p[0] for p in pairs])
    fpr, tpr, thresholds = skm.roc_curve(same, score, drop_intermediate=drop_intermediate)
    return fpr, tpr, -thresholds, skm.roc_auc_score(same, score)


@pytest.mark.parametrize("drop_intermediate", [False, True])
@pytest.mark.parametrize("seed", [8, 9])
def test_roc_matches_sklearn_with_ties(drop_intermediate, seed):
    x, y = integer_set(seed, n=35)
    pairs = ref_pairs(x, y, "squared_euclidean")
    far, val, thresholds = roc_curve(
        x, y, metric=SQ, drop_intermediate=drop_intermediate, chunk_size=4
    )
    fpr, tpr, ref_thresholds, auc = sklearn_roc(pairs, drop_intermediate)
    np.testing.assert_array_equal(far, fpr)
    np.testing.assert_array_equal(val, tpr)
    np.testing.assert_array_equal(thresholds, ref_thresholds)  # exact, -inf first
    assert roc_auc(x, y, metric=SQ, chunk_size=4) == pytest.approx(auc, abs=1e-12)
    assert np.trapezoid(val, far) == pytest.approx(auc, abs=1e-12)


@pytest.mark.parametrize("metric", METRICS)
def test_roc_matches_sklearn_random(metric):
    x, y = random_set(10, n=40, classes=4)
    pairs = ref_pairs(x, y, metric)
    far, val, thresholds = roc_curve(x, y, metric=metric, drop_intermediate=False)
    fpr, tpr, ref_thresholds, auc = sklearn_roc(pairs, False)
    np.testing.assert_array_equal(far, fpr)
    np.testing.assert_array_equal(val, tpr)
    np.testing.assert_allclose(thresholds, ref_thresholds, rtol=1e-5, atol=1e-5)
    assert roc_auc(x, y, metric=metric) == pytest.approx(auc, abs=1e-12)
    # each ROC point is (FAR(d), VAL(d)) at its threshold
    rates = verification_rates(x, y, thresholds[1:], metric=metric)
    np.testing.assert_array_equal(rates[0], val[1:])
    np.testing.assert_array_equal(rates[1], far[1:])


def test_roc_auc_counts_same_and_diff_sides_alike():
    """More same pairs than different pairs takes the other branch of the exact count."""
    x, y = integer_set(11, n=30, classes=2)
    y = np.where(np.arange(30) < 26, 0, 1)  # 325 + 6 same pairs, 104 different pairs
    pairs = ref_pairs(x, y, "squared_euclidean")
    assert roc_auc(x, y, metric=SQ) == pytest.approx(sklearn_roc(pairs, True)[3], abs=1e-12)


def test_default_metric_is_euclidean():
    x, y = random_set(13, n=30)
    thresholds = np.array([0.5, 1.0, 2.0])
    default = verification_rates(x, y, thresholds)
    for a, b in zip(default, verification_rates(x, y, thresholds, metric="euclidean"), strict=True):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(
        default[0], [ref_rates(ref_pairs(x, y, "euclidean"), t)[0] for t in thresholds]
    )
    squared = verification_rates(x, y, thresholds, metric=SQ)
    assert not np.array_equal(default[0], squared[0])  # the units differ
    threshold = val_at_far(x, y, 0.1)[1]
    assert threshold == val_at_far(x, y, 0.1, metric="euclidean")[1]
    assert threshold != val_at_far(x, y, 0.1, metric=SQ)[1]


def test_separated_classes_are_perfect():
    x = np.array([[0.0, 0], [0.1, 0], [10, 0], [10.1, 0], [0, 10], [0, 10.2]], np.float32)
    y = np.array([0, 0, 1, 1, 2, 2])
    assert roc_auc(x, y) == 1.0
    val, threshold, achieved = val_at_far(x, y, 1e-3)
    assert (val, achieved) == (1.0, 0.0) and threshold > 0.04
    far, val_curve, _ = roc_curve(x, y)
    assert (far[0], val_curve[0]) == (0.0, 0.0) and (far[-1], val_curve[-1]) == (1.0, 1.0)


# --------------------------------------------------------------------------------------------
# Clustering scores


def test_clustering_scores_perfect_and_match_sklearn():
    rng = np.random.default_rng(12)
    y = np.repeat(np.arange(4), 25)
    x = (rng.normal(size=(100, 8)) * 0.1 + 10 * rng.normal(size=(4, 8))[y]).astype(np.float32)
    assert clustering_scores(x, y) == {"nmi": 1.0, "ami": 1.0}
    noisy = (x + rng.normal(size=x.shape) * 8).astype(np.float32)
    scores = clustering_scores(noisy, y, seed=3, n_init=2)
    from sklearn.cluster import KMeans

    clusters = KMeans(n_clusters=4, n_init=2, random_state=3).fit_predict(noisy.astype(np.float64))
    assert scores["nmi"] == pytest.approx(skm.normalized_mutual_info_score(y, clusters))
    assert scores["ami"] == pytest.approx(skm.adjusted_mutual_info_score(y, clusters))
    assert 0.0 <= scores["ami"] <= scores["nmi"] < 1.0


# --------------------------------------------------------------------------------------------
# Bad input


def test_bad_inputs_name_the_argument():
    x, y = random_set(13, n=10)
    nan_x = x.copy()
    nan_x[3, 1] = np.nan
    one_class = np.zeros(10, int)
    singletons = np.arange(10)
    cases = [
        (lambda: val_at_far(x, y, 0.0), ValueError, r"far must lie in \(0, 1\)"),
        (lambda: val_at_far(x, y, 1.0), ValueError, r"far must lie in \(0, 1\)"),
        (lambda: val_at_far(x, y, -1e-3), ValueError, r"far must lie in \(0, 1\)"),
        (lambda: val_at_far(x, y, float("nan")), ValueError, r"far must lie in \(0, 1\)"),
        (lambda: val_at_far(x, y, "1e-3"), TypeError, "far must be a real number"),
        (lambda: val_at_far(x, one_class), ValueError, "at least two classes"),
        (lambda: roc_curve(x, one_class), ValueError, "no different-identity pairs"),
        (lambda: roc_auc(x, singletons), ValueError, "no same-identity pairs"),
        (lambda: verification_rates(x, singletons, 1.0), ValueError, "no same-identity pairs"),
        (lambda: val_at_far(nan_x, y), ValueError, "embeddings must be finite"),
        (lambda: roc_curve(nan_x, y), ValueError, "embeddings must be finite"),
        (lambda: roc_auc(nan_x, y), ValueError, "embeddings must be finite"),
        (lambda: verification_rates(nan_x, y, 1.0), ValueError, "embeddings must be finite"),
        (lambda: clustering_scores(nan_x, y), ValueError, "embeddings must be finite"),
        (lambda: val_at_far(x[0], y), ValueError, r"embeddings must have shape \[batch, dim\]"),
        (lambda: val_at_far(x, y[:9]), ValueError, r"labels must have shape \[10\]"),
        (lambda: val_at_far(x, y.astype(float)), TypeError, "labels must be an integer array"),
        (lambda: val_at_far(x, y, metric="dot"), ValueError, "metric must be one of"),
        (
            lambda: verification_rates(x, y, [1.0, np.nan]),
            ValueError,
            "thresholds must not contain NaN",
        ),
        (
            lambda: verification_rates(x, y, np.ones((2, 2))),
            ValueError,
            r"thresholds must be a number or have shape \[T\]",
        ),
        (lambda: verification_rates(x, y, ["a"]), TypeError, "thresholds must be a real number"),
        (lambda: clustering_scores(x, one_class), ValueError, "at least two classes"),
        (lambda: clustering_scores(x, y, n_init=0), ValueError, "n_init must be >= 1"),
        (lambda: clustering_scores(x, y, seed=1.5), TypeError, "seed must be an int"),
    ]
    for fn, error, match in cases:
        with pytest.raises(error, match=match):
            fn()
