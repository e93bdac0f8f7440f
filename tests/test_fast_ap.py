"""FastAP loss (Cakir et al. 2019): a loop-by-loop NumPy reference of the paper's histogram AP,
exact AP on bin-center distances, the row-block forms, degenerate batches, bad input, and
parity with pytorch-metric-learning's FastAPLoss."""

from __future__ import annotations

from types import SimpleNamespace

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mlx_jax.losses.fast_ap import fast_ap_loss
from tests.helpers import assert_finite_value_and_grad, check_grads_x64, random_batch

# One batch shape (12 x 4) almost everywhere: eager JAX compiles each operation once per shape
# and dtype, so a shared shape keeps the file fast.
B, D = 12, 4


def batch(seed, classes=3, scale=1.0):
    return random_batch(seed, batch=B, dim=D, classes=classes, scale=scale)


# --------------------------------------------------------------------------------------------
# Reference: the paper's histogram AP with explicit loops over queries, samples and bins.
# --------------------------------------------------------------------------------------------


def reference_distances(x) -> np.ndarray:
    """Squared Euclidean distances of the L2-normalized rows (a zero row stays zero)."""
    x = np.asarray(x, np.float64)
    unit = x / np.maximum(np.sqrt(np.sum(x * x, axis=1, keepdims=True)), 1e-12)
    batch_size = len(x)
    out = np.zeros((batch_size, batch_size))
    for i in range(batch_size):
        for j in range(batch_size):
            out[i, j] = sum((unit[i, k] - unit[j, k]) ** 2 for k in range(x.shape[1]))
    return out


def reference_per_query(x, labels, num_bins=10, weights=None):
    """(loss, has_term) per query: 1 − 1/N⁺ Σ_l h⁺_l·H⁺_l / H_l with L + 1 triangular bins of
    width Δ = 4 / L centered at 0, Δ, ..., 4."""
    batch_size = len(labels)
    weights = np.ones(batch_size) if weights is None else np.asarray(weights, np.float64)
    distances = reference_distances(x)
    delta = 4.0 / num_bins
    centers = [k * delta for k in range(num_bins + 1)]
    losses = np.zeros(batch_size)
    has_term = np.zeros(batch_size, bool)
    for q in range(batch_size):
        if weights[q] <= 0:
            continue
        positives = [
            j for j in range(batch_size) if j != q and weights[j] > 0 and labels[j] == labels[q]
        ]
        negatives = [j for j in range(batch_size) if weights[j] > 0 and labels[j] != labels[q]]
        if not positives:
            continue
        h_pos = [
            sum(max(0.0, 1 - abs(distances[q, j] - z) / delta) for j in positives) for z in centers
        ]
        h_neg = [
            sum(max(0.0, 1 - abs(distances[q, j] - z) / delta) for j in negatives) for z in centers
        ]
        fast_ap = 0.0
        for k in range(num_bins + 1):
            cumulative_pos = sum(h_pos[: k + 1])
            cumulative = sum(h_pos[: k + 1]) + sum(h_neg[: k + 1])
            if cumulative > 0:
                fast_ap += h_pos[k] * cumulative_pos / cumulative
        losses[q] = 1.0 - fast_ap / len(positives)
        has_term[q] = True
    return losses, has_term


def reference_loss(x, labels, num_bins=10, weights=None, reduction="mean"):
    batch_size = len(labels)
    w = np.ones(batch_size) if weights is None else np.asarray(weights, np.float64)
    losses, has_term = reference_per_query(x, labels, num_bins, weights)
    weighted = np.where(has_term, w * losses, 0.0)
    if reduction == "none":
        return weighted
    if reduction == "sum":
        return weighted.sum()
    if reduction == "mean":
        denominator = w[has_term].sum()
    else:  # mean_nonzero
        denominator = w[has_term & (losses > 0)].sum()
    return weighted.sum() / denominator if denominator > 0 else 0.0


def exact_average_precision(distances, relevant):
    """AP of a ranked list, ties ranked pessimistically (all tied items counted before)."""
    order = sorted(range(len(distances)), key=lambda j: distances[j])
    total = 0.0
    for j in order:
        if relevant[j]:
            at_most = [k for k in order if distances[k] <= distances[j]]
            total += sum(relevant[k] for k in at_most) / len(at_most)
    return total / sum(relevant)


# --------------------------------------------------------------------------------------------
# Value, reductions, weights
# --------------------------------------------------------------------------------------------

CONFIGS = [
    dict(),  # PML's default, L = 10
    dict(num_bins=4, reduction="sum"),
    dict(reduction="mean_nonzero"),
    dict(num_bins=1),  # two bins, centered at 0 and 4
]


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("seed", [0, 1])
def test_matches_reference(config, seed):
    x, y = batch(seed)
    expected = reference_loss(x, y, **config)
    actual = fast_ap_loss(x, y, **config)
    assert actual.dtype == jnp.float32
    np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-7)


def test_matches_reference_in_float64():
    x, y = batch(2)
    y = y.copy()
    y[0] = 7  # a query without positives
    w = np.linspace(0.0, 2.0, B)
    for config in (dict(), dict(num_bins=4, weights=w, reduction="sum")):
        with jax.enable_x64(True):
            actual = fast_ap_loss(jnp.asarray(x, jnp.float64), y, **config)
            assert actual.dtype == jnp.float64
        np.testing.assert_allclose(actual, reference_loss(x, y, **config), rtol=1e-12)


def padded(x, y):
    """A small batch as the file's 12 x 4 shape (nothing new to compile): zero columns, and
    zero-weight rows, which drop out exactly (see the weights test). Returns x, y, weights."""
    x = np.asarray(x, np.float64)
    out = np.zeros((B, D))
    out[: len(x), : x.shape[1]] = x
    labels = np.zeros(B, np.int32)
    labels[: len(y)] = y
    return out, labels, (np.arange(B) < len(y)).astype(np.float64)


def test_hand_derived_value():
    # x0 = e1 and x1 = −e1 share class 0; x2 = e1 is class 1. Query 0: its positive x1 is at
    # d = 4, its negative x2 at d = 0, so the bin at 4 holds h⁺ = 1 with H⁺ = 1, H = 2:
    # FastAP = 1/2. Query 1: x0 and x2 both at d = 4: the same. Query 2 has no positive.
    # Loss = mean over the two queries of 1 − 1/2 = 0.5.
    x, y, w = padded([[1.0, 0.0], [-1.0, 0.0], [1.0, 0.0]], [0, 0, 1])
    x = x.astype(np.float32)
    np.testing.assert_allclose(fast_ap_loss(x, y, weights=w), 0.5, rtol=1e-6)
    per_query = fast_ap_loss(x, y, weights=w, reduction="none")
    np.testing.assert_allclose(per_query[:3], [0.5, 0.5, 0.0], atol=1e-6)


def test_equals_exact_average_precision_on_bin_centers():
    # Unit vectors in the plane at angles θ from the query have d = 2 − 2cos θ; the angles
    # 0°, 60°, 90°, 120°, 180° put d on the centers 0, 1, 2, 3, 4 of num_bins=4 (Δ = 1), where
    # the soft assignment is a hard one and the histogram AP is the exact AP of the ranking
    # (ties, here at ±60° and ±120°, counted pessimistically). Samples 0-1 are the query's
    # class, so several relevance patterns are checked by relabelling the others.
    angles = np.radians([0.0, 180.0, 60.0, -60.0, 90.0, 120.0, -120.0, 0.0])
    plane = np.stack([np.cos(angles), np.sin(angles)], axis=1)
    distances = reference_distances(plane)[0, 1:]
    rng = np.random.default_rng(0)
    for _ in range(4):
        labels = np.concatenate([[0, 0], rng.integers(0, 2, size=6)])
        relevant = labels[1:] == 0
        x, y, w = padded(plane, labels)
        with jax.enable_x64(True):
            per_query = fast_ap_loss(jnp.asarray(x), y, num_bins=4, weights=w, reduction="none")
        expected = 1.0 - exact_average_precision(distances, relevant)
        np.testing.assert_allclose(per_query[0], expected, rtol=1e-12, atol=1e-12)


def test_reduction_none_matches_reference_per_query():
    x, y = batch(3)
    y = y.copy()
    y[5] = 9  # a singleton class: query 5 has no term
    per_query = fast_ap_loss(x, y, reduction="none")
    assert per_query.shape == (B,)
    np.testing.assert_allclose(per_query, reference_loss(x, y, reduction="none"), atol=1e-6)
    assert per_query[5] == 0.0
    np.testing.assert_allclose(jnp.sum(per_query), fast_ap_loss(x, y, reduction="sum"), rtol=1e-6)
    # "mean" divides by the 11 queries with positives, not by 12
    np.testing.assert_allclose(fast_ap_loss(x, y), jnp.sum(per_query) / 11, rtol=1e-6)


@pytest.mark.parametrize("reduction", ["mean", "sum", "mean_nonzero"])
def test_weights_match_reference_and_padding_is_exact(reduction):
    x, y = batch(4)
    w = np.array([1.0, 0.5, 2.0, 0.0, 1.0, 1.0, 3.0, 0.0, 1.0, 1.0, 0.5, 1.0], np.float32)
    np.testing.assert_allclose(
        fast_ap_loss(x, y, weights=w, reduction=reduction),
        reference_loss(x, y, weights=w, reduction=reduction),
        rtol=1e-5,
    )
    # Zero-weight rows behave as if they were not in the batch (compared with the formula on
    # the smaller batch: another batch shape would compile everything again).
    keep = w > 0
    np.testing.assert_allclose(
        fast_ap_loss(x, y, weights=keep.astype(np.float32), reduction=reduction),
        reference_loss(x[keep], y[keep], reduction=reduction),
        rtol=1e-5,
    )
    grad = jax.grad(lambda e: fast_ap_loss(e, y, weights=w, reduction=reduction))(x)
    np.testing.assert_array_equal(grad[~keep], 0.0)
    assert np.abs(grad[keep]).max() > 0


# --------------------------------------------------------------------------------------------
# Gradients, jit, row blocks, low precision
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("config", [dict(), dict(num_bins=4, reduction="sum")])
def test_gradients_match_finite_differences(config):
    x, y = batch(5)
    check_grads_x64(lambda e: fast_ap_loss(e, jnp.asarray(y), **config), x)


def test_gradient_float32_close_to_float64():
    x, y = batch(7)
    grad32 = jax.grad(lambda e: fast_ap_loss(e, y))(x)
    assert grad32.dtype == jnp.float32
    with jax.enable_x64(True):
        grad64 = jax.grad(lambda e: fast_ap_loss(e, y))(jnp.asarray(x, jnp.float64))
    np.testing.assert_allclose(grad32, grad64, rtol=1e-3, atol=1e-4 * np.abs(grad64).max())


class TestVariants(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_jit_and_eager_agree(self):
        x, y = batch(4)
        fn = self.variant(lambda e, lab: fast_ap_loss(e, lab))
        np.testing.assert_allclose(fn(x, y), reference_loss(x, y), rtol=1e-5)

    @chex.variants(with_jit=True, without_jit=True)
    def test_grad_jit_and_eager_agree(self):
        x, y = batch(5)
        grad = self.variant(jax.grad(lambda e, lab: fast_ap_loss(e, lab)))
        expected = jax.grad(lambda e, lab: fast_ap_loss(e, lab))(x, y)
        np.testing.assert_allclose(grad(x, y), expected, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_block_sizes_agree(reduction):
    x, y = batch(6)
    w = np.ones(B, np.float32)
    w[4] = 0.0

    def value_and_grad(block_size):
        def loss(e):
            out = fast_ap_loss(e, y, weights=w, reduction=reduction, block_size=block_size)
            return jnp.sum(out * jnp.arange(1.0, out.size + 1.0)) if out.ndim else out

        return jax.value_and_grad(loss)(x)

    dense_value, dense_grad = value_and_grad(None)
    # 5 does not divide 12: the last block is padded.
    for block_size in (5, "auto"):
        value, grad = value_and_grad(block_size)
        np.testing.assert_allclose(value, dense_value, rtol=1e-6)
        np.testing.assert_allclose(grad, dense_grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_low_precision_inputs_compute_in_float32(dtype):
    x, y = batch(6)
    low = jnp.asarray(x, dtype)
    value, grad = jax.value_and_grad(lambda e: fast_ap_loss(e, y))(low)
    assert value.dtype == jnp.float32 and np.isfinite(value)
    assert grad.dtype == dtype and np.isfinite(np.asarray(grad, np.float32)).all()
    # Exact for the rounded inputs, and close to the float32 loss of the unrounded ones.
    rounded = np.asarray(low, np.float32)
    np.testing.assert_allclose(value, reference_loss(rounded, y), rtol=1e-5)
    np.testing.assert_allclose(value, fast_ap_loss(x, y), rtol=2e-2)


# --------------------------------------------------------------------------------------------
# Degenerate batches
# --------------------------------------------------------------------------------------------

DEGENERATE = {
    "one_class": (
        np.random.default_rng(0).normal(size=(B, D)).astype(np.float32),
        np.zeros(B, np.int32),
    ),
    "singletons": (
        np.random.default_rng(1).normal(size=(B, D)).astype(np.float32),
        np.arange(B, dtype=np.int32),
    ),
    "zero_vectors": (np.zeros((B, D), np.float32), np.arange(B, dtype=np.int32) % 2),
    "one_zero_vector": (
        np.concatenate([np.zeros((1, D)), np.random.default_rng(3).normal(size=(B - 1, D))]).astype(
            np.float32
        ),
        np.arange(B, dtype=np.int32) % 3,
    ),
    "duplicates_one_class": (np.ones((B, D), np.float32), np.zeros(B, np.int32)),
    "duplicates_two_classes": (np.ones((B, D), np.float32), np.arange(B, dtype=np.int32) % 2),
    "one_valid_sample": (
        np.random.default_rng(2).normal(size=(B, D)).astype(np.float32),
        np.arange(B, dtype=np.int32) % 3,
    ),
}
DEGENERATE_WEIGHTS = {"one_valid_sample": (np.arange(B) == 0).astype(np.float32)}


@pytest.mark.parametrize("case", sorted(DEGENERATE))
def test_degenerate_batches_are_finite_and_match_reference(case):
    x, y = DEGENERATE[case]
    weights = DEGENERATE_WEIGHTS.get(case)
    fn = lambda e: fast_ap_loss(e, y, weights=weights)  # noqa: E731
    assert_finite_value_and_grad(fn, x)
    np.testing.assert_allclose(fn(x), reference_loss(x, y, weights=weights), rtol=1e-5, atol=1e-7)


def test_documented_degenerate_values():
    # One class: no negatives, so H = H⁺ and FastAP = Σ_l h⁺_l / N⁺ = 1 (every distance is in
    # [0, 4], where the triangles sum to 1): loss 0.
    x, y = DEGENERATE["one_class"]
    np.testing.assert_allclose(fast_ap_loss(x, y), 0.0, atol=1e-6)
    # Duplicates of two classes of 6: everything at d = 0, one bin with h⁺ = H⁺ = 5, H = 11:
    # FastAP = 5·5/11 / 5 = 5/11.
    x, y = DEGENERATE["duplicates_two_classes"]
    np.testing.assert_allclose(fast_ap_loss(x, y), 1.0 - 5.0 / 11.0, rtol=1e-6)
    # No query has a positive (singletons, or one valid sample): 0 with zero gradient.
    for case in ("singletons", "one_valid_sample"):
        x, y = DEGENERATE[case]
        value, grad = jax.value_and_grad(
            lambda e, lab=y, c=case: fast_ap_loss(e, lab, weights=DEGENERATE_WEIGHTS.get(c))
        )(x)
        assert value == 0.0
        np.testing.assert_array_equal(grad, 0.0)


def test_all_weights_zero_is_finite():
    x, y = batch(11, classes=2)
    for reduction in ("mean", "mean_nonzero", "sum"):
        value, grad = jax.value_and_grad(
            lambda e, r=reduction: fast_ap_loss(e, y, weights=np.zeros(B, np.float32), reduction=r)
        )(x)
        assert value == 0.0
        np.testing.assert_array_equal(grad, 0.0)


# --------------------------------------------------------------------------------------------
# Bad input: errors naming the argument, raised while tracing
# --------------------------------------------------------------------------------------------


def test_bad_input_raises_at_trace_time():
    x, y = random_batch(8, batch=4, dim=D)

    def trace(fn, *args):
        return jax.eval_shape(fn, *args)

    with pytest.raises(ValueError, match="embeddings must have shape"):
        trace(lambda e: fast_ap_loss(e, y), x[0])
    with pytest.raises(TypeError, match="embeddings must be a floating-point array"):
        trace(lambda e: fast_ap_loss(e, y), y[:, None])
    with pytest.raises(ValueError, match=r"labels must have shape \[4\]"):
        trace(lambda e, lab: fast_ap_loss(e, lab), x, y[:3])
    with pytest.raises(ValueError, match="labels must lie in"):
        fast_ap_loss(x, -y - 1)
    for value, error in [(0, ValueError), (-3, ValueError), (2.5, TypeError), (True, TypeError)]:
        with pytest.raises(error, match="num_bins must be"):
            trace(lambda e, v=value: fast_ap_loss(e, y, num_bins=v), x)
    with pytest.raises(ValueError, match="reduction must be one of"):
        trace(lambda e: fast_ap_loss(e, y, reduction="avg"), x)
    with pytest.raises(ValueError, match=r"weights must have shape \[4\]"):
        trace(lambda e: fast_ap_loss(e, y, weights=np.ones(3, np.float32)), x)
    with pytest.raises(ValueError, match="weights must be non-negative"):
        fast_ap_loss(x, y, weights=-np.ones(4, np.float32))
    with pytest.raises(ValueError, match="block_size must be >= 1"):
        trace(lambda e: fast_ap_loss(e, y, block_size=0), x)


def test_nan_embedding_gives_nan():
    # A NaN distance must not fall out of the histograms (its bin index is undefined) and leave
    # a finite, wrong loss.
    x, y = batch(9)
    x = x.copy()
    x[3, 1] = np.nan
    assert np.isnan(fast_ap_loss(x, y))


# --------------------------------------------------------------------------------------------
# Parity with pytorch-metric-learning (float64)
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pml():
    torch = pytest.importorskip("torch", reason="parity tests need torch (pip install torch)")
    pytest.importorskip(
        "pytorch_metric_learning.losses",
        reason="parity tests need pytorch-metric-learning (pip install .[parity])",
    )
    from pytorch_metric_learning import losses, reducers

    return SimpleNamespace(torch=torch, losses=losses, reducers=reducers)


def _parity_batches():
    """(embeddings float64, labels int32): random batches, one with a singleton class (a
    query PML drops), one of near-duplicates of one point."""
    out = []
    for seed in range(3):
        x, y = batch(seed, classes=4, scale=0.7)
        out.append((x.astype(np.float64), y))
    x, y = batch(7)
    y = y.copy()
    y[4] = 9
    out.append((x.astype(np.float64), y))
    rng = np.random.default_rng(3)
    x = rng.normal(size=(1, D)) + 0.3 * rng.normal(size=(B, D))
    out.append((x, (np.arange(B) % 3).astype(np.int32)))
    return out


PARITY_BATCHES = _parity_batches()


def _pml_value_and_grad(pml, loss_fn, x, y):
    torch = pml.torch
    embeddings = torch.tensor(x, dtype=torch.float64, requires_grad=True)
    loss = loss_fn(embeddings, torch.tensor(y, dtype=torch.int64))
    loss.backward()
    return float(loss.detach()), embeddings.grad.numpy()


def _ours_value_and_grad(x, y, **config):
    with jax.enable_x64(True):
        value, grad = jax.value_and_grad(lambda e: fast_ap_loss(e, jnp.asarray(y), **config))(
            jnp.asarray(x, jnp.float64)
        )
        assert value.dtype == jnp.float64
        return float(value), np.asarray(grad)


@pytest.mark.parametrize("num_bins", [10, 4])
@pytest.mark.parametrize("index", range(len(PARITY_BATCHES)))
def test_loss_matches_pml(pml, num_bins, index):
    """PML's FastAPLoss keeps the queries with positives (its ``safe_N``) as elements of a
    MeanReducer: our ``reduction="mean"``."""
    x, y = PARITY_BATCHES[index]
    loss_fn = pml.losses.FastAPLoss(num_bins=num_bins)
    assert isinstance(loss_fn.reducer, pml.reducers.MeanReducer)
    ref_value, ref_grad = _pml_value_and_grad(pml, loss_fn, x, y)
    value, grad = _ours_value_and_grad(x, y, num_bins=num_bins)
    assert ref_value != 0.0
    np.testing.assert_allclose(value, ref_value, rtol=1e-10)
    np.testing.assert_allclose(grad, ref_grad, rtol=1e-9, atol=1e-12 * np.abs(ref_grad).max())


def test_mean_nonzero_matches_pml_avg_nonzero_reducer(pml):
    # Class 0: copies of e1 (d = 0 to each other), every other sample at x·e1 < 0 (d > 2):
    # its queries have all positives in bin 0 and no negative there, so FastAP 1 and loss 0,
    # which AvgNonZeroReducer leaves out of its denominator.
    x, y = PARITY_BATCHES[0]
    x = x.copy()
    x[y == 0] = np.eye(D)[0] * np.arange(1.0, np.sum(y == 0) + 1.0)[:, None]
    x[y != 0, 0] = -np.abs(x[y != 0, 0]) - 0.1
    loss_fn = pml.losses.FastAPLoss(reducer=pml.reducers.AvgNonZeroReducer())
    ref_value, ref_grad = _pml_value_and_grad(pml, loss_fn, x, y)
    value, grad = _ours_value_and_grad(x, y, reduction="mean_nonzero")
    per_query = reference_per_query(x, y)[0]
    np.testing.assert_array_equal(per_query[y == 0], 0.0)
    assert np.all(per_query[y != 0] > 0.0)
    np.testing.assert_allclose(value, ref_value, rtol=1e-10)
    np.testing.assert_allclose(grad, ref_grad, rtol=1e-9, atol=1e-12 * np.abs(ref_grad).max())


def test_batch_without_positives_is_zero_like_pml(pml):
    x, y = DEGENERATE["singletons"]
    torch = pml.torch
    ref = pml.losses.FastAPLoss()(torch.tensor(x, dtype=torch.float64), torch.tensor(y))
    assert float(ref) == 0.0
    assert _ours_value_and_grad(x.astype(np.float64), y)[0] == 0.0


def test_exact_average_precision_helper():
    # The helper the bin-center test relies on, by hand: a negative ranked before the only
    # positive gives precision 1/2 at the positive; a tie counts both items: 1/2 as well.
    assert exact_average_precision([0.0, 1.0], [False, True]) == 0.5
    assert exact_average_precision([0.0, 0.0], [True, False]) == 0.5
    # positives at ranks 1 and 3: (1/1 + 2/3) / 2
    assert np.isclose(exact_average_precision([1.0, 2.0, 3.0], [True, False, True]), 5 / 6)
