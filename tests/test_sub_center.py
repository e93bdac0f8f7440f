"""Sub-center ArcFace and its outlier filter (mlx_jax.losses.sub_center) against loop-by-loop
float64 references written from the paper (Deng et al. 2020, Eq. 2 and Sec. 3.2), in the dense
and class-block forms, on degenerate inputs, and against pytorch-metric-learning (value,
gradients, get_outliers)."""

import functools
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mlx_jax.losses.margin_softmax import arcface_loss
from mlx_jax.losses.sub_center import (
    collapse_sub_centers,
    dominant_sub_centers,
    sub_center_arcface_loss,
    sub_center_cosines,
    sub_center_counts,
    sub_center_outliers,
)
from tests.helpers import check_grads_x64, head_value_and_grads

B, D, C, K = 12, 4, 3, 3

# ---------------------------------------------------------------------------------------------
# References: plain loops over samples, classes and sub-centers, float64, no code shared with
# the library.
# ---------------------------------------------------------------------------------------------


def _cos(u, v):
    nu = math.sqrt(sum(float(a) ** 2 for a in u))
    nv = math.sqrt(sum(float(a) ** 2 for a in v))
    if nu == 0 or nv == 0:
        return 0.0
    return sum(float(a) * float(b) for a, b in zip(u, v, strict=True)) / (nu * nv)


def ref_class_cosine(x, w, i, c, k):
    """max over the K sub-centers (columns c·K + j) of class c."""
    return max(_cos(x[i], w[:, c * k + j]) for j in range(k))


def ref_arcface_target(cos_y, margin):
    """cos(θ + m) while θ + m <= π, else cos θ − m·sin m (insightface / PML)."""
    theta = math.acos(min(1.0, max(-1.0, cos_y)))
    if theta + margin <= math.pi:
        return math.cos(theta + margin)
    return cos_y - margin * math.sin(margin)


def _reduce(losses, weights, reduction):
    if reduction == "none":
        return np.array([loss * w for loss, w in zip(losses, weights, strict=True)])
    total = sum(loss * w for loss, w in zip(losses, weights, strict=True))
    if reduction == "sum":
        return total
    if reduction == "mean":
        count = sum(weights)
    else:  # mean_nonzero
        count = sum(w for loss, w in zip(losses, weights, strict=True) if loss > 0)
    return total / count if count > 0 else 0.0


def reference_loss(x, y, w, k=K, margin=0.5, scale=64.0, weights=None, reduction="mean"):
    x, w = np.asarray(x, np.float64), np.asarray(w, np.float64)
    num_classes = w.shape[1] // k
    sample_w = [1.0] * len(y) if weights is None else [float(v) for v in weights]
    losses = []
    for i, label in enumerate(y):
        logits = []
        for c in range(num_classes):
            cos = ref_class_cosine(x, w, i, c, k)
            logits.append(scale * (ref_arcface_target(cos, margin) if c == label else cos))
        top = max(logits)
        lse = top + math.log(sum(math.exp(v - top) for v in logits))
        losses.append(lse - logits[int(label)])
    kept = [(loss, v) for loss, v in zip(losses, sample_w, strict=True)]
    return _reduce([a for a, _ in kept], [b for _, b in kept], reduction)


def reference_counts(x, y, w, k=K):
    """votes[c][j]: how many samples of class c are nearest to its sub-center j (lowest j on
    ties)."""
    votes = [[0] * k for _ in range(w.shape[1] // k)]
    for i, label in enumerate(y):
        sims = [_cos(x[i], w[:, label * k + j]) for j in range(k)]
        votes[label][sims.index(max(sims))] += 1
    return votes


def reference_dominant(x, y, w, k=K):
    """Per class: the sub-center most of its samples are nearest to (lowest index on ties)."""
    return [votes.index(max(votes)) for votes in reference_counts(x, y, w, k)]


def reference_outliers(x, y, w, k=K, threshold=75.0):
    """The paper's rule: angle to the class's dominant sub-center > threshold."""
    dominant = reference_dominant(x, y, w, k)
    out = []
    for i, label in enumerate(y):
        cos = _cos(x[i], w[:, label * k + dominant[label]])
        out.append(math.degrees(math.acos(min(1.0, max(-1.0, cos)))) > threshold)
    return np.array(out)


def nearest_rule_outliers(x, y, w, k=K, threshold=75.0):
    """The rule the paper does *not* use: angle to the sample's nearest own sub-center."""
    out = []
    for i, label in enumerate(y):
        cos = max(_cos(x[i], w[:, label * k + j]) for j in range(k))
        out.append(math.degrees(math.acos(min(1.0, max(-1.0, cos)))) > threshold)
    return np.array(out)


def random_problem(seed, batch=B, dim=D, classes=C, k=K, opposite=0):
    """Embeddings, labels (every class present), class weights [dim, classes·k]; the first
    ``opposite`` rows point away from all their sub-centers (θ_y + 0.5 > π)."""
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.arange(batch) % classes).astype(np.int32)
    w = rng.normal(size=(dim, classes * k))
    x = rng.normal(size=(batch, dim))
    for i in range(opposite):  # the class's sub-centers close together, x_i opposite them
        base = w[:, labels[i] * k]
        w[:, labels[i] * k : (labels[i] + 1) * k] = base[:, None] + 0.1 * rng.normal(size=(dim, k))
        x[i] = -base + 0.1 * rng.normal(size=dim)
    return x.astype(np.float32), labels, w.astype(np.float32)


STATIC = ("sub_centers", "margin", "scale", "boundary", "reduction", "class_block_size")
loss_jit = jax.jit(sub_center_arcface_loss, static_argnames=STATIC)
arcface_jit = jax.jit(arcface_loss)


@jax.jit
def every_reduction(x, y, w, weights):
    """The loss under each reduction (one compilation)."""
    return {
        reduction: sub_center_arcface_loss(x, y, w, weights=weights, reduction=reduction)
        for reduction in ("mean", "sum", "none", "mean_nonzero")
    }


value_and_grads = head_value_and_grads(sub_center_arcface_loss)


# ---------------------------------------------------------------------------------------------
# The loss
# ---------------------------------------------------------------------------------------------

CONFIGS = [
    dict(),
    dict(sub_centers=2, margin=0.3, scale=16.0, reduction="sum"),
    dict(sub_centers=1, scale=30.0),
]


@pytest.mark.parametrize("config", CONFIGS, ids=["default", "k2-sum", "k1"])
def test_matches_reference(config):
    k = config.get("sub_centers", K)
    x, y, w = random_problem(0, k=k, opposite=3)
    ref_config = {("k" if key == "sub_centers" else key): v for key, v in config.items()}
    expected = reference_loss(x, y, w, **ref_config)
    np.testing.assert_allclose(loss_jit(x, y, w, **config), expected, rtol=1e-5)
    with jax.enable_x64(True):
        value = loss_jit(jnp.asarray(x, jnp.float64), y, jnp.asarray(w, jnp.float64), **config)
        assert value.dtype == jnp.float64
        np.testing.assert_allclose(value, expected, rtol=1e-10)


def test_opposite_rows_reach_the_boundary():
    x, y, w = random_problem(0, opposite=3)
    cos = np.array([ref_class_cosine(x, w, i, y[i], K) for i in range(3)])
    assert np.all(np.arccos(cos) + 0.5 > math.pi)  # the monotonic boundary rule is exercised


def test_weights_and_reductions_match_reference_and_padding_is_exact():
    x, y, w = random_problem(1)
    sw = np.array([1.0, 0.5, 2.0, 0.0, 1.0, 1.0, 3.0, 0.0, 1.0, 1.0, 0.25, 1.0], np.float32)
    for reduction, value in every_reduction(x, y, w, sw).items():
        np.testing.assert_allclose(
            value, reference_loss(x, y, w, weights=sw, reduction=reduction), rtol=1e-5
        )
    keep = sw > 0
    value, (gx, gw) = value_and_grads(x, y, w, weights=keep.astype(np.float32))
    kept_value, (_, kept_gw) = value_and_grads(x[keep], y[keep], w)
    np.testing.assert_allclose(value, kept_value, rtol=1e-6)
    np.testing.assert_allclose(gw, kept_gw, rtol=1e-5, atol=1e-7)
    assert np.all(np.asarray(gx)[~keep] == 0.0)


def test_one_sub_center_and_copied_sub_centers_are_arcface():
    x, y, w = random_problem(2, k=1)
    arcface = arcface_jit(x, y, w)
    np.testing.assert_allclose(loss_jit(x, y, w, sub_centers=1), arcface, rtol=1e-6)
    # class c's sub-centers in columns c·K + j: K rescaled copies of ArcFace's column c
    copies = np.stack([w, 2.0 * w, 0.5 * w], axis=2).reshape(D, -1)
    np.testing.assert_allclose(loss_jit(x, y, copies), arcface, rtol=1e-6)


def test_sub_center_cosines():
    x, _, w = random_problem(3)
    expected = [[ref_class_cosine(x, w, i, c, K) for c in range(C)] for i in range(B)]
    np.testing.assert_allclose(sub_center_cosines(x, w), expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(jax.jit(sub_center_cosines)(x, w), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "k, block", [(3, 1), (3, 2), (1, 2)], ids=["k3-block1", "k3-block2-padded", "k1-block2"]
)
def test_class_blocks_equal_dense(k, block):
    x, y, w = random_problem(4, classes=5, k=k, opposite=2)
    config = dict(sub_centers=k, scale=16.0)
    value, (gx, gw) = value_and_grads(x, y, w, **config)
    b_value, (b_gx, b_gw) = value_and_grads(x, y, w, class_block_size=block, **config)
    np.testing.assert_allclose(b_value, reference_loss(x, y, w, k=k, scale=16.0), rtol=1e-5)
    np.testing.assert_allclose(b_value, value, rtol=1e-6)
    np.testing.assert_allclose(b_gx, gx, rtol=1e-4, atol=1e-6 * np.abs(gx).max())
    np.testing.assert_allclose(b_gw, gw, rtol=1e-4, atol=1e-6 * np.abs(gw).max())


def test_gradients():  # the class-block form's gradients equal these (test above)
    x, y, w = random_problem(5, batch=6, dim=3, classes=3, k=2, opposite=1)
    check_grads_x64(
        jax.jit(
            lambda e, cw, s: sub_center_arcface_loss(e, y, cw, sub_centers=2, scale=8.0, weights=s)
        ),
        x,
        w,
        np.linspace(0.5, 2.0, 6),
    )


class TestVariants(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_jit_and_eager_agree(self):
        x, y, w = random_problem(6, opposite=2)
        expected = reference_loss(x, y, w, scale=16.0)
        for block in (None, 2):
            fn = self.variant(
                functools.partial(sub_center_arcface_loss, scale=16.0, class_block_size=block)
            )
            np.testing.assert_allclose(fn(x, y, w), expected, rtol=1e-5)


def degenerate_cases():
    x, y, w = random_problem(7, batch=6, dim=3, classes=3, k=2)
    zero_x = x.copy()
    zero_x[[0, 3]] = 0.0
    zero_w = w.copy()
    zero_w[:, 2:4] = 0.0  # both sub-centers of class 1
    aligned_x = w[:, 2 * y + 1].T.copy()  # each embedding exactly a sub-center: cos θ_y = 1
    tied_w = np.repeat(w[:, ::2], 2, axis=1)  # each class's two sub-centers equal
    return {
        "zero-embedding": (zero_x, y, w),
        "zero-sub-centers": (x, y, zero_w),
        "aligned": (aligned_x, y, w),
        "opposed": (-np.stack([w[:, 2 * c] + w[:, 2 * c + 1] for c in y]), y, w),
        "tied-sub-centers": (x, y, tied_w),
        "one-class": (x, np.zeros(6, np.int32), w[:, :2]),
        "all-zero": (0 * x, y, 0 * w),
    }


@pytest.mark.parametrize("block", [None, 1], ids=["dense", "class-blocks"])
@pytest.mark.parametrize("case", list(degenerate_cases()))
def test_degenerate_inputs_are_finite(case, block):
    x, y, w = degenerate_cases()[case]
    value, grads = value_and_grads(x, y, w, sub_centers=2, class_block_size=block)
    assert np.isfinite(value) and all(np.isfinite(g).all() for g in grads)


def test_degenerate_values():
    cases = degenerate_cases()
    x, y, w = cases["one-class"]
    value, (gx, gw) = value_and_grads(x, y, w, sub_centers=2)
    assert float(value) == 0.0 and not np.any(gx) and not np.any(gw)
    x, y, w = cases["aligned"]
    with jax.enable_x64(True):  # cos θ_y = 1: target s·cos(m) (float32 rounding moves θ)
        np.testing.assert_allclose(
            loss_jit(np.float64(x), y, np.float64(w), sub_centers=2, reduction="none"),
            reference_loss(x, y, w, k=2, reduction="none"),
            rtol=1e-6,  # rounding of cos θ = 1 by ε moves θ by √(2ε) ≈ 1e-8
        )
    x, y, w = cases["tied-sub-centers"]  # tied sub-centers: the ArcFace loss of one copy
    np.testing.assert_allclose(
        loss_jit(x, y, w, sub_centers=2), arcface_jit(x, y, w[:, ::2]), rtol=1e-6
    )
    value, (gx, gw) = value_and_grads(x, y, w, weights=np.zeros(6, np.float32), sub_centers=2)
    assert float(value) == 0.0 and not np.any(gx) and not np.any(gw)


@pytest.mark.parametrize("block", [None, 1], ids=["dense", "class-blocks"])
def test_tied_sub_centers_pass_the_whole_gradient_to_the_first(block):
    # torch.max's rule (so PML's): the lowest index among exact ties takes the gradient, so a
    # class of two equal sub-centers trains its first one exactly as ArcFace trains one center
    x, y, w = degenerate_cases()["tied-sub-centers"]
    _, (gx, gw) = value_and_grads(x, y, w, sub_centers=2, class_block_size=block)
    arcface_x, arcface_w = jax.grad(arcface_loss, argnums=(0, 2))(x, y, w[:, ::2])
    # class blocks sum the log-sum-exp online: float32 rounding of ~1e-4 relative
    np.testing.assert_allclose(gx, arcface_x, rtol=1e-3, atol=1e-6)
    np.testing.assert_allclose(gw[:, ::2], arcface_w, rtol=1e-3, atol=1e-6)
    assert np.any(arcface_w) and not np.any(gw[:, 1::2])


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_low_precision_inputs_compute_in_float32(dtype):
    x, y, w = random_problem(8)
    xl, wl = jnp.asarray(x, dtype), jnp.asarray(w, dtype)
    out = loss_jit(xl, y, wl, scale=16.0)
    assert out.dtype == jnp.float32
    expected = reference_loss(np.asarray(xl, np.float64), y, np.asarray(wl, np.float64), scale=16.0)
    np.testing.assert_allclose(out, expected, rtol=1e-5)


X1, Y1, W1 = np.ones((4, 3), np.float32), np.zeros(4, np.int32), np.ones((3, 6), np.float32)


@pytest.mark.parametrize(
    "args, kwargs, error, match",
    [
        ((X1, Y1, np.ones((3, 5), np.float32)), {}, ValueError, r"num_classes \* sub_centers"),
        ((X1, Y1, np.ones((3, 2), np.float32)), {}, ValueError, r"num_classes \* sub_centers"),
        ((X1, Y1, W1), dict(sub_centers=4), ValueError, "sub_centers=4 columns per class"),
        ((X1, Y1, np.ones((2, 6), np.float32)), {}, ValueError, r"shape \[3, num_classes\]"),
        ((X1, Y1, W1), dict(sub_centers=0), ValueError, "sub_centers must be >= 1"),
        ((X1, Y1, W1), dict(sub_centers=2.0), TypeError, "sub_centers must be a positive int"),
        ((X1, Y1, W1), dict(margin=-0.1), ValueError, "margin must be >= 0"),
        ((X1, Y1, W1), dict(margin=3.2), ValueError, r"margin must be in \[0, π\)"),
        ((X1, Y1, W1), dict(scale=0.0), ValueError, "scale must be > 0"),
        ((X1, Y1, W1), dict(boundary="clip"), ValueError, "boundary must be one of"),
        ((X1, Y1, W1), dict(reduction="avg"), ValueError, "reduction must be one of"),
        ((X1, Y1, W1), dict(class_block_size=0), ValueError, "class_block_size must be >= 1"),
        ((X1, Y1, W1), dict(weights=np.ones(3)), ValueError, r"weights must have shape \[4\]"),
        ((X1, np.zeros(4, np.float32), W1), {}, TypeError, "labels must be an integer"),
    ],
)
def test_bad_input_raises_at_trace_time(args, kwargs, error, match):
    with pytest.raises(error, match=match):
        jax.jit(functools.partial(sub_center_arcface_loss, **kwargs)).lower(*args)


@pytest.mark.parametrize("block", [None, 1], ids=["dense", "class-blocks"])
def test_out_of_range_labels_raise_eagerly_and_are_nan_under_jit(block):
    x, y, w = random_problem(9, batch=6)
    for bad_value in (C, -1):
        bad = y.copy()
        bad[2] = bad_value
        with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\)"):
            sub_center_arcface_loss(x, bad, w)
        per_sample = np.asarray(loss_jit(x, bad, w, reduction="none", class_block_size=block))
        assert np.isnan(per_sample[2]) and np.isfinite(np.delete(per_sample, 2)).all()


# ---------------------------------------------------------------------------------------------
# The outlier filter
# ---------------------------------------------------------------------------------------------


counts_jit = jax.jit(sub_center_counts, static_argnames="sub_centers")
dominant_jit = jax.jit(dominant_sub_centers, static_argnames="sub_centers")
outliers_jit = jax.jit(sub_center_outliers, static_argnames=("sub_centers", "threshold_degrees"))


def test_outlier_filter_matches_reference():
    x, y, w = random_problem(10)
    np.testing.assert_array_equal(counts_jit(x, y, w), reference_counts(x, y, w))
    np.testing.assert_array_equal(dominant_jit(x, y, w), reference_dominant(x, y, w))
    for threshold in (75.0, 60.0):
        flags = outliers_jit(x, y, w, threshold_degrees=threshold)
        assert flags.dtype == jnp.bool_
        np.testing.assert_array_equal(flags, reference_outliers(x, y, w, threshold=threshold))
    np.testing.assert_array_equal(sub_center_outliers(x, y, w), reference_outliers(x, y, w))


def _planar(degrees, norm=1.0):
    return [norm * math.cos(math.radians(degrees)), norm * math.sin(math.radians(degrees))]


def constructed_problem():
    """2-D, 2 classes × 3 sub-centers. Class 0's dominant sub-center is at 0°; samples at 95°
    and 105° sit on its non-dominant sub-center at 100° (near it, > 75° from the dominant one)
    and the sample at 60° is nearest the 100° sub-center but within 75° of the dominant one.
    Class 1's dominant sub-center is at 270°; its sample at 185° sits on the one at 180°."""
    w = np.array([_planar(a) for a in (0, 100, 200, 180, 270, 30)]).T
    samples = [(-5, 0), (3, 0), (8, 0), (-2, 0), (95, 0), (105, 0), (60, 0)]
    samples += [(260, 1), (270, 1), (280, 1), (185, 1)]
    x = np.array([_planar(a, norm=1.0 + 0.1 * i) for i, (a, _) in enumerate(samples)])
    y = np.array([c for _, c in samples], np.int32)
    flagged = np.array([False] * 4 + [True, True, False] + [False] * 3 + [True])
    return x, y, w, flagged


def test_flags_samples_on_non_dominant_sub_centers_unlike_the_nearest_rule():
    x, y, w, flagged = constructed_problem()
    np.testing.assert_array_equal(dominant_jit(x, y, w), [0, 1])
    np.testing.assert_array_equal(outliers_jit(x, y, w), flagged)
    np.testing.assert_array_equal(reference_outliers(x, y, w), flagged)
    # comparing each sample with its nearest sub-center instead would keep every sample here
    assert not nearest_rule_outliers(x, y, w).any()


def test_counts_add_over_chunks_and_dominant_can_be_given():
    x, y, w = random_problem(11, batch=2 * B)
    chunks = [slice(0, B), slice(B, 2 * B)]
    total = sum(np.asarray(counts_jit(x[s], y[s], w)) for s in chunks)
    np.testing.assert_array_equal(total, reference_counts(x, y, w))
    dominant = jnp.argmax(total, axis=1)
    for s in chunks:
        np.testing.assert_array_equal(
            outliers_jit(x[s], y[s], w, dominant=dominant), reference_outliers(x, y, w)[s]
        )
    # zero weight: no vote and never flagged (the padding of a last chunk)
    padded_x, sw = x[:B].copy(), np.ones(B, np.float32)
    padded_x[-3:], sw[-3:] = -10.0 * padded_x[-3:], 0.0
    np.testing.assert_array_equal(
        counts_jit(padded_x, y[:B], w, weights=sw), reference_counts(x[:9], y[:9], w)
    )
    flags = np.asarray(outliers_jit(padded_x, y[:B], w, weights=sw))
    np.testing.assert_array_equal(flags[:9], reference_outliers(x[:9], y[:9], w))
    assert not flags[9:].any()


def test_outlier_degenerate_cases():
    x, y, w = random_problem(12)
    x[0] = 0.0  # cosine 0: 90° from everything, flagged at 75°, kept at 95°
    assert bool(outliers_jit(x, y, w)[0])
    assert not bool(outliers_jit(x, y, w, threshold_degrees=95.0)[0])
    assert not np.asarray(outliers_jit(x, y, w, threshold_degrees=180.0)).any()
    # a class without samples gets sub-center 0
    no_class_2 = np.where(y == 2, 1, y).astype(np.int32)
    assert int(dominant_jit(x, no_class_2, w)[2]) == 0
    bad = y.copy()
    bad[1] = C
    assert not bool(outliers_jit(x, bad, w)[1])


def test_collapse_sub_centers():
    x, y, w = random_problem(13)
    dominant = np.array([2, 0, 1])
    collapsed = collapse_sub_centers(w, dominant)
    expected = np.stack([w[:, c * K + dominant[c]] for c in range(C)], axis=1)
    np.testing.assert_array_equal(collapsed, expected)
    np.testing.assert_allclose(
        arcface_jit(x, y, collapsed), loss_jit(x, y, collapsed, sub_centers=1), rtol=1e-6
    )


@pytest.mark.parametrize(
    "fn, kwargs, match",
    [
        (sub_center_outliers, dict(threshold_degrees=181.0), "threshold_degrees must be"),
        (sub_center_outliers, dict(threshold_degrees=-1.0), "threshold_degrees must be"),
        (sub_center_outliers, dict(dominant=np.zeros(3, np.int32)), r"shape \[2\]"),
        (sub_center_outliers, dict(dominant=np.array([0, 3])), r"dominant must lie in \[0, 3\)"),
        (sub_center_counts, dict(sub_centers=4), "sub_centers=4 columns per class"),
        (dominant_sub_centers, dict(weights=np.ones(3)), r"weights must have shape \[4\]"),
    ],
)
def test_outlier_filter_bad_input(fn, kwargs, match):
    with pytest.raises(ValueError, match=match):
        fn(X1, Y1, W1, **kwargs)


def test_collapse_bad_input():
    with pytest.raises(ValueError, match=r"dominant must be an int array of shape \[2\]"):
        collapse_sub_centers(W1, np.zeros(3, np.int32))
    with pytest.raises(ValueError, match=r"num_classes \* sub_centers"):
        collapse_sub_centers(np.ones((3, 5), np.float32), np.zeros(2, np.int32))


# ---------------------------------------------------------------------------------------------
# pytorch-metric-learning parity
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pml():
    torch = pytest.importorskip("torch", reason="parity tests need torch (pip install torch)")
    losses = pytest.importorskip(
        "pytorch_metric_learning.losses",
        reason="parity tests need pytorch-metric-learning (pip install .[parity])",
    )
    return torch, losses


def _pml_loss(pml, w, margin=0.5, scale=64.0, k=K):
    torch, losses = pml
    loss_fn = losses.SubCenterArcFaceLoss(
        num_classes=w.shape[1] // k,
        embedding_size=w.shape[0],
        margin=np.degrees(margin),
        scale=scale,
        sub_centers=k,
    )
    loss_fn.W.data = torch.tensor(w, dtype=torch.float64)
    return loss_fn


@pytest.mark.parametrize("seed, opposite", [(0, 0), (1, 0), (2, 3)])
def test_loss_matches_pml(pml, seed, opposite):
    torch, _ = pml
    x, y, w = random_problem(seed, opposite=opposite)
    x, w = x.astype(np.float64), w.astype(np.float64)
    loss_fn = _pml_loss(pml, w)
    emb = torch.tensor(x, requires_grad=True)
    loss = loss_fn(emb, torch.tensor(y, dtype=torch.int64))
    loss.backward()
    with jax.enable_x64(True):
        value, (gx, gw) = value_and_grads(jnp.asarray(x), y, jnp.asarray(w))
        assert value.dtype == jnp.float64
    np.testing.assert_allclose(value, loss.item(), rtol=1e-10)
    for ours, theirs in ((gx, emb.grad.numpy()), (gw, loss_fn.W.grad.numpy())):
        np.testing.assert_allclose(ours, theirs, rtol=1e-8, atol=1e-10 * np.abs(theirs).max())


@pytest.mark.parametrize("seed", [0, 1])
def test_outliers_match_pml(pml, seed):
    """PML 2.9's get_outliers compares each sample with the dominant sub-center too (the
    authors' drop.py and the paper): same flagged samples, same dominant centers."""
    torch, _ = pml
    problems = [random_problem(seed)[:3], constructed_problem()[:3]]
    for x, y, w in problems:
        x, w = np.asarray(x, np.float64), np.asarray(w, np.float64)
        loss_fn = _pml_loss(pml, w, k=K)
        indices, dominant_centers = loss_fn.get_outliers(
            torch.tensor(x), torch.tensor(y, dtype=torch.int64), threshold=75
        )
        with jax.enable_x64(True):
            flags = outliers_jit(x, y, w)
            collapsed = collapse_sub_centers(w, dominant_jit(x, y, w))
        np.testing.assert_array_equal(np.sort(indices.numpy()), np.flatnonzero(flags))
        np.testing.assert_array_equal(dominant_centers.numpy(), collapsed)
