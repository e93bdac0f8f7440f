"""L-Softmax (mlx_jax.losses.large_margin_softmax) against a loop-by-loop float64 reference
written from the paper (Liu et al. 2016, Eqs. 4–7), in the dense and class-block forms, on
degenerate inputs, and against pytorch-metric-learning (value and gradients)."""

import functools
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mlx_jax.losses.large_margin_softmax import large_margin_softmax_loss
from mlx_jax.losses.margin_softmax import sphereface_lambda
from mlx_jax.losses.softmax import softmax_loss
from tests.helpers import check_grads_x64, head_value_and_grads

B, D, C = 12, 4, 5
STATIC = ("margin", "scale", "annealing_lambda", "reduction", "class_block_size")
loss_jit = jax.jit(large_margin_softmax_loss, static_argnames=STATIC)

# ---------------------------------------------------------------------------------------------
# Reference: plain loops over samples and classes, float64, θ from math.acos and cos(mθ) from
# math.cos (not the multiple-angle formula), no code shared with the library.
# ---------------------------------------------------------------------------------------------


def _norm(v):
    return math.sqrt(sum(float(a) ** 2 for a in v))


def reference_psi(theta, m):
    """Eq. 6: (−1)^k·cos(mθ) − 2k on [kπ/m, (k+1)π/m], k ∈ {0, …, m − 1}."""
    k = min(int(theta * m / math.pi), m - 1)
    return (-1) ** k * math.cos(m * theta) - 2 * k


def reference_loss(
    x, y, w, margin=4, scale=1.0, annealing_lambda=0.0, weights=None, reduction="mean"
):
    x, w = np.asarray(x, np.float64), np.asarray(w, np.float64)
    sample_w = [1.0] * len(y) if weights is None else [float(v) for v in weights]
    losses = []
    for i, label in enumerate(y):
        logits = []
        for j in range(w.shape[1]):
            dot = sum(float(a) * float(b) for a, b in zip(x[i], w[:, j], strict=True))
            if j != label:
                logits.append(scale * dot)
                continue
            norms = _norm(x[i]) * _norm(w[:, j])
            cos = dot / norms if norms > 0 else 0.0
            theta = math.acos(min(1.0, max(-1.0, cos)))
            lam = annealing_lambda
            logits.append(scale * norms * (lam * cos + reference_psi(theta, margin)) / (1 + lam))
        top = max(logits)
        lse = top + math.log(sum(math.exp(v - top) for v in logits))
        losses.append(lse - logits[int(label)])
    if reduction == "none":
        return np.array([loss * v for loss, v in zip(losses, sample_w, strict=True)])
    total = sum(loss * v for loss, v in zip(losses, sample_w, strict=True))
    if reduction == "sum":
        return total
    if reduction == "mean":
        count = sum(sample_w)
    else:  # mean_nonzero
        count = sum(v for loss, v in zip(losses, sample_w, strict=True) if loss > 0)
    return total / count if count > 0 else 0.0


ANGLES = (0.3, 1.2, 2.0, 2.8)  # θ_y of the first rows: k = 0, 1, 2, 3 for m = 4


def random_problem(seed, batch=B, dim=D, classes=C):
    """Unnormalized embeddings and class weights (scaled by 0.5–1.5), every class present;
    the first rows at the angles ``ANGLES`` to their class weight."""
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.arange(batch) % classes).astype(np.int32)
    x = rng.normal(size=(batch, dim)) * rng.uniform(0.5, 1.5, size=(batch, 1))
    w = rng.normal(size=(dim, classes)) * rng.uniform(0.5, 1.5, size=(1, classes))
    for i, theta in enumerate(ANGLES[: min(batch, dim)]):
        w_hat = w[:, labels[i]] / np.linalg.norm(w[:, labels[i]])
        u = x[i] - (x[i] @ w_hat) * w_hat  # a direction orthogonal to W_y
        x[i] = np.linalg.norm(x[i]) * (
            math.cos(theta) * w_hat + math.sin(theta) * u / np.linalg.norm(u)
        )
    return x.astype(np.float32), labels, w.astype(np.float32)


@jax.jit
def every_reduction(x, y, w, weights):
    """The loss under each reduction (one compilation)."""
    return {
        reduction: large_margin_softmax_loss(x, y, w, weights=weights, reduction=reduction)
        for reduction in ("mean", "sum", "none", "mean_nonzero")
    }


value_and_grads = head_value_and_grads(large_margin_softmax_loss)


# ---------------------------------------------------------------------------------------------
# Values, gradients, forms
# ---------------------------------------------------------------------------------------------

CONFIGS = [
    dict(),
    dict(margin=1, scale=2.0),
    dict(margin=2, scale=2.0, reduction="sum"),
    dict(margin=3, annealing_lambda=2.5),
]


@pytest.mark.parametrize("config", CONFIGS, ids=["m4", "m1-scale2", "m2-sum", "m3-lambda"])
def test_matches_reference(config):
    x, y, w = random_problem(0)
    expected = reference_loss(x, y, w, **config)
    np.testing.assert_allclose(loss_jit(x, y, w, **config), expected, rtol=1e-5)
    with jax.enable_x64(True):
        value = loss_jit(jnp.asarray(x, jnp.float64), y, jnp.asarray(w, jnp.float64), **config)
        assert value.dtype == jnp.float64
        np.testing.assert_allclose(value, expected, rtol=1e-10)


def test_every_branch_of_psi_is_reached():
    x, y, w = random_problem(0)
    own = w[:, y].T.astype(np.float64)
    cos = np.sum(x * own, axis=1) / np.linalg.norm(x, axis=1) / np.linalg.norm(own, axis=1)
    np.testing.assert_allclose(np.arccos(cos[:4]), ANGLES, rtol=1e-6)
    assert set(np.floor(np.arccos(cos) * 4 / math.pi)) == {0, 1, 2, 3}


def test_margin_one_is_the_linear_softmax():
    x, y, w = random_problem(1)
    np.testing.assert_allclose(
        loss_jit(x, y, w, margin=1, scale=2.0),
        softmax_loss(2.0 * x.astype(np.float64) @ w, y),
        rtol=1e-5,
    )


def test_weights_and_reductions_match_reference_and_padding_is_exact():
    x, y, w = random_problem(2)
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


@pytest.mark.parametrize("block", [1, 2], ids=["block1", "block2-padded"])
def test_class_blocks_equal_dense(block):
    x, y, w = random_problem(3)
    value, (gx, gw) = value_and_grads(x, y, w, margin=3)
    b_value, (b_gx, b_gw) = value_and_grads(x, y, w, margin=3, class_block_size=block)
    np.testing.assert_allclose(b_value, value, rtol=1e-6)
    np.testing.assert_allclose(b_gx, gx, rtol=1e-4, atol=1e-6 * np.abs(gx).max())
    np.testing.assert_allclose(b_gw, gw, rtol=1e-4, atol=1e-6 * np.abs(gw).max())
    np.testing.assert_allclose(
        loss_jit(x, y, w, margin=3, reduction="none", class_block_size=block),
        reference_loss(x, y, w, margin=3, reduction="none"),
        rtol=1e-5,
    )


def test_gradients():  # the class-block form's gradients equal these (test above)
    x, y, w = random_problem(4, batch=6, dim=3, classes=3)
    check_grads_x64(
        jax.jit(
            lambda e, cw, s: large_margin_softmax_loss(
                e, y, cw, margin=4, annealing_lambda=0.5, weights=s
            )
        ),
        x,
        w,
        np.linspace(0.5, 2.0, 6),
    )


class TestVariants(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_jit_and_eager_agree(self):
        x, y, w = random_problem(5)
        expected = reference_loss(x, y, w)
        for block in (None, 2):
            fn = self.variant(functools.partial(large_margin_softmax_loss, class_block_size=block))
            np.testing.assert_allclose(fn(x, y, w), expected, rtol=1e-5)


def test_annealing_lambda_is_traceable_and_tends_to_softmax():
    x, y, w = random_problem(6)
    fn = jax.jit(lambda step: large_margin_softmax_loss(x, y, w, annealing_lambda=step))
    lam = sphereface_lambda(100, base=1000.0, gamma=0.000025, power=35.0, minimum=0.0)
    np.testing.assert_allclose(
        fn(lam), reference_loss(x, y, w, annealing_lambda=float(lam)), rtol=1e-5
    )
    np.testing.assert_allclose(fn(1e7), softmax_loss(x.astype(np.float64) @ w, y), rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# Degenerate and bad input
# ---------------------------------------------------------------------------------------------


def degenerate_cases():
    x, y, w = random_problem(7)
    zero_x = x.copy()
    zero_x[[0, 3]] = 0.0
    zero_w = w.copy()
    zero_w[:, 1] = 0.0
    return {
        "zero-embedding": (zero_x, y, w),
        "zero-class-weight": (x, y, zero_w),
        "aligned": (2.0 * w[:, y].T, y, w),  # cos θ_y = 1
        "opposed": (-w[:, y].T, y, w),  # cos θ_y = −1
        "one-class": (x, np.zeros(B, np.int32), w[:, :1]),
        "all-zero": (0 * x, y, 0 * w),
    }


@pytest.mark.parametrize("block", [None, 2], ids=["dense", "class-blocks"])
@pytest.mark.parametrize("case", list(degenerate_cases()))
def test_degenerate_inputs_are_finite(case, block):
    x, y, w = degenerate_cases()[case]
    value, grads = value_and_grads(x, y, w, class_block_size=block)
    assert np.isfinite(value) and all(np.isfinite(g).all() for g in grads)


def test_degenerate_values():
    cases = degenerate_cases()
    with jax.enable_x64(True):
        for name in ("aligned", "opposed", "zero-embedding", "zero-class-weight"):
            x, y, w = cases[name]
            np.testing.assert_allclose(
                loss_jit(np.float64(x), y, np.float64(w), reduction="none"),
                reference_loss(x, y, w, reduction="none"),
                rtol=1e-10,
                err_msg=name,
            )
    x, y, w = cases["aligned"]  # ψ(0) = 1: the target logit is ‖W_y‖‖x‖
    np.testing.assert_allclose(
        loss_jit(x, y, w, reduction="none"),
        softmax_loss(x.astype(np.float64) @ w, y, reduction="none"),
        rtol=1e-5,
    )
    x, y, w = cases["one-class"]
    value, (gx, gw) = value_and_grads(x, y, w)
    assert float(value) == 0.0 and not np.any(gx) and not np.any(gw)
    value, (gx, gw) = value_and_grads(x, y, w, weights=np.zeros(B, np.float32))
    assert float(value) == 0.0 and not np.any(gx) and not np.any(gw)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_low_precision_inputs_compute_in_float32(dtype):
    x, y, w = random_problem(8)
    xl, wl = jnp.asarray(x, dtype), jnp.asarray(w, dtype)
    out = loss_jit(xl, y, wl)
    assert out.dtype == jnp.float32
    expected = reference_loss(np.asarray(xl, np.float64), y, np.asarray(wl, np.float64))
    np.testing.assert_allclose(out, expected, rtol=1e-5)


X1, Y1, W1 = np.ones((4, 3), np.float32), np.zeros(4, np.int32), np.ones((3, 2), np.float32)


@pytest.mark.parametrize(
    "args, kwargs, error, match",
    [
        ((X1, Y1, W1), dict(margin=2.5), ValueError, "margin must be an integer >= 1"),
        ((X1, Y1, W1), dict(margin=True), ValueError, "margin must be an integer >= 1"),
        ((X1, Y1, W1), dict(margin=0), ValueError, "margin must be an integer >= 1"),
        ((X1, Y1, W1), dict(scale=0.0), ValueError, "scale must be > 0"),
        ((X1, Y1, W1), dict(annealing_lambda=-1.0), ValueError, "annealing_lambda must be >= 0"),
        ((X1, Y1, W1), dict(reduction="avg"), ValueError, "reduction must be one of"),
        ((X1, Y1, W1), dict(class_block_size=0), ValueError, "class_block_size must be >= 1"),
        ((X1, Y1, W1), dict(weights=np.ones(3)), ValueError, r"weights must have shape \[4\]"),
        ((X1, Y1, np.ones((2, 2), np.float32)), {}, ValueError, r"shape \[3, num_classes\]"),
        ((X1, Y1, np.ones((3, 0), np.float32)), {}, ValueError, "num_classes >= 1"),
        ((X1, np.zeros(4, np.float32), W1), {}, TypeError, "labels must be an integer"),
        ((np.ones((4,), np.float32), Y1, W1), {}, ValueError, "embeddings must have shape"),
    ],
)
def test_bad_input_raises_at_trace_time(args, kwargs, error, match):
    with pytest.raises(error, match=match):
        jax.jit(functools.partial(large_margin_softmax_loss, **kwargs)).lower(*args)


@pytest.mark.parametrize("block", [None, 2], ids=["dense", "class-blocks"])
def test_out_of_range_labels_raise_eagerly_and_are_nan_under_jit(block):
    x, y, w = random_problem(9)
    for bad_value in (C, -1):
        bad = y.copy()
        bad[2] = bad_value
        with pytest.raises(ValueError, match=r"labels must lie in \[0, 5\)"):
            large_margin_softmax_loss(x, bad, w)
        per_sample = np.asarray(loss_jit(x, bad, w, reduction="none", class_block_size=block))
        assert np.isnan(per_sample[2]) and np.isfinite(np.delete(per_sample, 2)).all()


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


@pytest.mark.parametrize("margin, scale", [(2, 1.0), (3, 2.0), (4, 1.0)])
@pytest.mark.parametrize("seed", [0, 1])
def test_matches_pml(pml, seed, margin, scale):
    torch, losses = pml
    x, y, w = random_problem(seed)
    x, w = x.astype(np.float64), w.astype(np.float64)
    loss_fn = losses.LargeMarginSoftmaxLoss(
        num_classes=C, embedding_size=D, margin=margin, scale=scale
    )
    loss_fn.W.data = torch.tensor(w)
    emb = torch.tensor(x, requires_grad=True)
    loss = loss_fn(emb, torch.tensor(y, dtype=torch.int64))
    loss.backward()
    with jax.enable_x64(True):
        value, (gx, gw) = value_and_grads(
            jnp.asarray(x), y, jnp.asarray(w), margin=margin, scale=scale
        )
    np.testing.assert_allclose(value, loss.item(), rtol=1e-10)
    for ours, theirs in ((gx, emb.grad.numpy()), (gw, loss_fn.W.grad.numpy())):
        np.testing.assert_allclose(ours, theirs, rtol=1e-8, atol=1e-10 * np.abs(theirs).max())


def test_integral_float_margin_is_the_integer_margin():
    # as SphereFace: 4.0 is m = 4 (one check, margin_softmax.integer_margin, for both)
    x = np.random.default_rng(3).normal(size=(4, 3)).astype(np.float32)
    w = np.random.default_rng(4).normal(size=(3, 2)).astype(np.float32)
    y = np.array([0, 1, 1, 0], np.int32)
    np.testing.assert_array_equal(
        large_margin_softmax_loss(x, y, w, margin=4.0), large_margin_softmax_loss(x, y, w, margin=4)
    )
