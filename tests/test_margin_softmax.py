import functools
import math

import chex
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given

from mlx_jax.losses.margin_softmax import (
    arcface_loss,
    combined_margin_loss,
    combined_margin_target,
    cosface_loss,
    cosine_logits,
    margin_cross_entropy,
    sphereface_lambda,
    sphereface_loss,
)
from mlx_jax.losses.softmax import softmax_loss
from tests import references_margin as ref
from tests.helpers import assert_finite_value_and_grad, check_grads_x64

B, D, C = 12, 8, 5


def random_problem(seed, batch=B, dim=D, classes=C, x_scale=1.0, opposite=0):
    """Embeddings [batch, dim], labels [batch] (every class present), class weights [dim, C].

    The first ``opposite`` embeddings point away from their class weight (θ_y close to π), so
    that θ_y + m > π actually occurs for ArcFace-sized margins.
    """
    rng = np.random.default_rng(seed)
    labels = np.arange(batch) % classes
    rng.shuffle(labels)
    w = rng.normal(size=(dim, classes))
    x = rng.normal(size=(batch, dim)) * x_scale
    for i in range(opposite):
        w_hat = w[:, labels[i]] / np.linalg.norm(w[:, labels[i]])
        x[i] = x_scale * (-2.0 * w_hat + 0.25 * rng.normal(size=dim))
    return x.astype(np.float32), labels.astype(np.int32), w.astype(np.float32)


def target_angles(x, y, w):
    cos = ref.cosines(x, w)
    return np.arccos(np.clip(cos[np.arange(len(y)), y], -1, 1))


LOSSES = {
    "arcface": (arcface_loss, ref.arcface),
    "cosface": (cosface_loss, ref.cosface),
    "combined": (combined_margin_loss, ref.combined_margin),
    "sphereface": (sphereface_loss, ref.sphereface),
}

CONFIGS = [
    ("arcface", dict()),
    ("arcface", dict(scale=16.0, margin=0.3)),
    ("arcface", dict(scale=16.0, boundary="easy")),
    ("arcface", dict(scale=16.0, margin=0.7, boundary="none")),
    ("arcface", dict(scale=16.0, margin=0.7, boundary="monotonic")),
    ("cosface", dict()),
    ("cosface", dict(scale=30.0, margin=0.2)),
    ("combined", dict(m1=1.0, m2=0.3, m3=0.2, scale=32.0)),
    ("combined", dict(m1=0.9, m2=0.4, m3=0.15, scale=32.0)),
    ("combined", dict(m1=1.35, m2=0.25, m3=0.1, scale=16.0, boundary="monotonic")),
    ("combined", dict(m1=2.0, scale=16.0, boundary="easy")),
    ("combined", dict(m1=1.5, m2=0.3, scale=16.0, boundary="none")),
    ("combined", dict(m1=1.0, m2=0.0, m3=0.0, scale=10.0)),
    ("sphereface", dict()),
    ("sphereface", dict(margin=1)),
    ("sphereface", dict(margin=2, annealing_lambda=3.0)),
    ("sphereface", dict(margin=3, annealing_lambda=5.0, scale=12.0)),
    ("sphereface", dict(margin=4, annealing_lambda=0.5, scale=8.0, reduction="sum")),
]
CONFIG_IDS = [f"{name}-{i}" for i, (name, _) in enumerate(CONFIGS)]


@pytest.mark.parametrize("name, config", CONFIGS, ids=CONFIG_IDS)
@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("opposite", [0, 4])
def test_matches_reference(name, config, seed, opposite):
    ours, theirs = LOSSES[name]
    x, y, w = random_problem(seed, opposite=opposite)
    expected = theirs(x, y, w, **config)
    actual = ours(x, y, w, **config)
    np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-6)


def test_large_angle_case_exercises_the_boundary():
    x, y, w = random_problem(3, opposite=4)
    theta = target_angles(x, y, w)
    margin = 0.5
    assert (theta + margin > math.pi).sum() >= 2, theta  # the construction works
    monotonic = arcface_loss(x, y, w, margin=margin, scale=16.0, reduction="none")
    raw = arcface_loss(x, y, w, margin=margin, scale=16.0, boundary="none", reduction="none")
    over = theta + margin > math.pi
    # The boundary rule changes exactly the samples past π − m …
    assert np.all(np.abs(np.asarray(monotonic - raw))[over] > 1e-3)
    np.testing.assert_allclose(monotonic[~over], raw[~over], rtol=1e-6)
    # … and agrees with the per-sample reference there.
    np.testing.assert_allclose(
        monotonic,
        ref.arcface(x, y, w, margin=margin, scale=16.0, reduction="none"),
        rtol=1e-5,
    )


@pytest.mark.parametrize(
    "m1, m2, m3",
    [
        (1.0, 0.5, 0.0),
        (1.0, 1.2, 0.1),
        (0.9, 0.4, 0.15),
        (1.35, 0.25, 0.1),
        (2.0, 0.0, 0.0),
        (3.0, 0.0, 0.0),
        (4.0, 0.0, 0.0),
        (6.0, 0.1, 0.0),
        (1.0, 2.8, 0.0),
    ],
)
def test_monotonic_boundary_is_non_increasing_in_theta(m1, m2, m3):
    with jax.enable_x64(True):
        cos = jnp.cos(jnp.linspace(0.0, math.pi, 20_001))  # θ increasing
        target = combined_margin_target(cos, m1, m2, m3, "monotonic")
        assert np.all(np.diff(np.asarray(target)) <= 1e-12)
        raw = combined_margin_target(cos, m1, m2, m3, "none")
        if (math.pi - m2) / m1 < math.pi:  # the raw margin does turn back up
            assert np.any(np.diff(np.asarray(raw)) > 0)


def test_monotonic_matches_insightface_formula_for_m1_equal_1():
    m = 0.5
    c = np.array([0.9, 0.0, -0.8, -0.9, -0.99, -1.0])
    out = combined_margin_target(jnp.asarray(c, jnp.float32), 1.0, m, 0.0, "monotonic")
    # insightface arcface_torch: where(cos > cos(π − m), cos(θ + m), cos − sin(π − m)·m)
    expected = np.where(
        c > math.cos(math.pi - m),
        np.cos(np.arccos(c) + m),
        c - math.sin(math.pi - m) * m,
    )
    np.testing.assert_allclose(out, expected, rtol=1e-6, atol=1e-6)


def test_special_cases_share_the_softmax():
    x, y, w = random_problem(4)
    cos = cosine_logits(x, w)
    np.testing.assert_allclose(cos, ref.cosines(x, w), rtol=1e-5, atol=1e-6)
    assert cos.shape == (B, C) and cos.dtype == jnp.float32
    np.testing.assert_allclose(
        combined_margin_loss(x, y, w, scale=10.0), softmax_loss(10.0 * cos, y), rtol=1e-6
    )
    np.testing.assert_allclose(
        arcface_loss(x, y, w, margin=0.3, scale=20.0),
        combined_margin_loss(x, y, w, m2=0.3, scale=20.0),
        rtol=1e-6,
    )
    np.testing.assert_allclose(
        cosface_loss(x, y, w, margin=0.3, scale=20.0),
        combined_margin_loss(x, y, w, m3=0.3, scale=20.0),
        rtol=1e-6,
    )
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    np.testing.assert_allclose(
        sphereface_loss(x, y, w, margin=1), softmax_loss(norms * cos, y), rtol=1e-5
    )


def test_sphereface_annealing_tends_to_softmax():
    x, y, w = random_problem(5)
    cos = cosine_logits(x, w)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    np.testing.assert_allclose(
        sphereface_loss(x, y, w, margin=4, annealing_lambda=1e7),
        softmax_loss(norms * cos, y),
        rtol=1e-4,
    )


GRAD_CONFIGS = [
    ("arcface", dict(scale=16.0), 4),
    ("arcface", dict(scale=64.0), 0),
    ("arcface", dict(scale=16.0, margin=0.7, boundary="easy"), 4),
    ("arcface", dict(scale=16.0, margin=0.7, boundary="none"), 4),
    ("cosface", dict(scale=16.0), 0),
    ("combined", dict(m1=0.9, m2=0.4, m3=0.15, scale=16.0), 4),
    ("combined", dict(m1=1.35, m2=0.25, m3=0.1, scale=16.0), 4),
    ("sphereface", dict(), 4),
    ("sphereface", dict(margin=3, annealing_lambda=2.5, scale=10.0), 4),
]


@pytest.mark.parametrize("name, config, opposite", GRAD_CONFIGS)
def test_gradients(name, config, opposite):
    ours, _ = LOSSES[name]
    x, y, w = random_problem(6, batch=8, dim=4, classes=3, opposite=opposite)
    check_grads_x64(lambda e, cw: ours(e, y, cw, **config), x, w)


def test_gradients_with_weights():
    x, y, w = random_problem(7, batch=8, dim=4, classes=3)
    sw = np.linspace(0.5, 2.0, 8)
    check_grads_x64(lambda e, cw, s: arcface_loss(e, y, cw, scale=16.0, weights=s), x, w, sw)


class TestVariants(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_jit_and_eager_agree(self):
        x, y, w = random_problem(8, opposite=3)
        for name, config in CONFIGS[::3]:
            ours, theirs = LOSSES[name]
            fn = self.variant(functools.partial(ours, **config))
            np.testing.assert_allclose(fn(x, y, w), theirs(x, y, w, **config), rtol=1e-5)

    @chex.variants(with_jit=True, without_jit=True)
    def test_cosine_logits(self):
        x, _, w = random_problem(9)
        np.testing.assert_allclose(
            self.variant(cosine_logits)(x, w), ref.cosines(x, w), rtol=1e-5, atol=1e-6
        )


DEGENERATE_LOSSES = [
    functools.partial(arcface_loss, scale=64.0),
    functools.partial(arcface_loss, scale=64.0, boundary="easy"),
    functools.partial(arcface_loss, scale=64.0, boundary="none"),
    functools.partial(cosface_loss, scale=64.0),
    functools.partial(combined_margin_loss, m1=0.9, m2=0.4, m3=0.15),
    functools.partial(combined_margin_loss, m1=2.0, boundary="none"),
    functools.partial(sphereface_loss),
    functools.partial(sphereface_loss, margin=3, annealing_lambda=5.0, scale=30.0),
]
DEGENERATE_IDS = [
    "arcface",
    "arcface-easy",
    "arcface-none",
    "cosface",
    "combined-m1<1",
    "combined-m1=2",
    "sphereface",
    "sphereface-scaled",
]


def degenerate_cases():
    x, y, w = random_problem(10, batch=6, dim=4, classes=3)
    zero_x = x.copy()
    zero_x[[0, 3]] = 0.0
    zero_w = w.copy()
    zero_w[:, 1] = 0.0
    dup_x = np.repeat(x[:1], 6, axis=0)
    aligned_x = w[:, y].T.copy()  # every embedding exactly its class weight: cos θ_y = 1
    opposed_x = -w[:, y].T  # cos θ_y = −1
    return {
        "zero-embedding": (zero_x, y, w),
        "zero-class-weight": (x, y, zero_w),
        "duplicates": (dup_x, np.zeros(6, np.int32), w),
        "aligned": (aligned_x, y, w),
        "opposed": (opposed_x, y, w),
        "aligned-all-equal": (
            np.ones((4, 3), np.float32),
            np.zeros(4, np.int32),
            np.ones((3, 2), np.float32),
        ),
        "one-class": (x, np.zeros(6, np.int32), w[:, :1]),
        "all-zero": (
            np.zeros((3, 4), np.float32),
            np.array([0, 1, 2], np.int32),
            np.zeros((4, 3), np.float32),
        ),
    }


@pytest.mark.parametrize("case", list(degenerate_cases()))
@pytest.mark.parametrize("loss", DEGENERATE_LOSSES, ids=DEGENERATE_IDS)
def test_degenerate_inputs_are_finite(loss, case):
    x, y, w = degenerate_cases()[case]
    assert_finite_value_and_grad(lambda e, cw: loss(e, y, cw), x, w)
    assert_finite_value_and_grad(jax.jit(lambda e, cw: loss(e, y, cw)), x, w)


def test_one_class_loss_is_zero():
    x, _, w = random_problem(11, batch=6, dim=4, classes=3)
    assert float(arcface_loss(x, np.zeros(6, np.int32), w[:, :1])) == 0.0


@pytest.mark.parametrize(
    "loss",
    [arcface_loss, cosface_loss, combined_margin_loss, sphereface_loss, softmax_loss],
)
def test_low_precision_inputs_compute_in_float32(loss):
    x, y, w = random_problem(12)
    xb, wb = jnp.asarray(x, jnp.bfloat16), jnp.asarray(w, jnp.bfloat16)
    if loss is softmax_loss:
        out = loss(cosine_logits(xb, wb), y)
        assert cosine_logits(xb, wb).dtype == jnp.float32
    else:
        out = loss(xb, y, wb)
    assert out.dtype == jnp.float32
    x64, w64 = np.asarray(xb, np.float64), np.asarray(wb, np.float64)
    expected = {
        arcface_loss: lambda: ref.arcface(x64, y, w64),
        cosface_loss: lambda: ref.cosface(x64, y, w64),
        combined_margin_loss: lambda: ref.combined_margin(x64, y, w64),
        sphereface_loss: lambda: ref.sphereface(x64, y, w64),
        softmax_loss: lambda: ref.softmax(ref.cosines(x64, w64), y),
    }[loss]()
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)


@given(seed=st.integers(0, 10_000), name=st.sampled_from(sorted(LOSSES)))
def test_invariant_to_batch_and_class_permutation(seed, name):
    ours, _ = LOSSES[name]
    x, y, w = random_problem(seed, opposite=2)
    base = ours(x, y, w, reduction="none")
    rng = np.random.default_rng(seed)
    rows = rng.permutation(B)
    np.testing.assert_allclose(
        ours(x[rows], y[rows], w, reduction="none"), base[rows], rtol=1e-5, atol=1e-6
    )
    cols = rng.permutation(C)  # new column j is old class cols[j]
    relabel = np.argsort(cols).astype(np.int32)
    np.testing.assert_allclose(
        ours(x, relabel[y], w[:, cols], reduction="none"), base, rtol=1e-5, atol=1e-6
    )


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_weights_match_reference_and_padding_is_exact(name):
    ours, theirs = LOSSES[name]
    x, y, w = random_problem(13, opposite=2)
    sw = np.array([1.0, 0.5, 2.0, 0.0, 1.0, 1.0, 3.0, 0.0, 1.0, 1.0, 0.25, 1.0], np.float32)
    for reduction in ("mean", "sum", "none"):
        np.testing.assert_allclose(
            ours(x, y, w, weights=sw, reduction=reduction),
            theirs(x, y, w, weights=sw, reduction=reduction),
            rtol=1e-5,
            atol=1e-6,
        )
    mask = (sw > 0).astype(np.float32)
    keep = sw > 0
    np.testing.assert_allclose(ours(x, y, w, weights=mask), ours(x[keep], y[keep], w), rtol=1e-6)
    # Zero-weight padding rows may hold any finite values.
    padded_x = np.concatenate([x, np.full((3, D), 1e3, np.float32)])
    padded_y = np.concatenate([y, np.zeros(3, np.int32)])
    padded_w = np.concatenate([np.ones(B, np.float32), np.zeros(3, np.float32)])
    np.testing.assert_allclose(
        ours(padded_x, padded_y, w, weights=padded_w), ours(x, y, w), rtol=1e-6
    )
    per_sample = ours(x, y, w, reduction="none")
    assert per_sample.shape == (B,)


@pytest.mark.parametrize("step", [0, 1, 7, 100, 1000, 10_000, 1_000_000])
def test_sphereface_lambda(step):
    expected = ref.sphereface_lambda(step)
    np.testing.assert_allclose(sphereface_lambda(step), expected, rtol=1e-6)
    np.testing.assert_allclose(jax.jit(sphereface_lambda)(step), expected, rtol=1e-6)
    np.testing.assert_allclose(
        jax.jit(sphereface_lambda)(jnp.asarray(step, jnp.int32)), expected, rtol=1e-6
    )
    custom = dict(base=500.0, gamma=0.5, power=2.0, minimum=0.1)
    np.testing.assert_allclose(
        sphereface_lambda(step, **custom), ref.sphereface_lambda(step, **custom), rtol=1e-5
    )


def test_sphereface_lambda_schedule_shape():
    lam = np.asarray(jax.vmap(sphereface_lambda)(jnp.arange(0, 5000, 50)))
    assert lam[0] == 1000.0 and lam.dtype == np.float32
    assert np.all(np.diff(lam) <= 0) and lam[-1] == 5.0
    # usable as the traced annealing_lambda of a jitted loss
    x, y, w = random_problem(14)
    fn = jax.jit(lambda step: sphereface_loss(x, y, w, annealing_lambda=sphereface_lambda(step)))
    np.testing.assert_allclose(
        fn(jnp.asarray(20)),
        ref.sphereface(x, y, w, annealing_lambda=ref.sphereface_lambda(20)),
        rtol=1e-5,
    )


@pytest.mark.parametrize("class_block_size", [None, 2], ids=["dense", "class-blocks"])
def test_out_of_range_labels_raise_eagerly_and_are_nan_under_jit(class_block_size):
    x, y, w = random_problem(15, batch=6, classes=3)
    for loss in (arcface_loss, cosface_loss, combined_margin_loss, sphereface_loss):
        loss = functools.partial(loss, class_block_size=class_block_size)
        for bad_value in (3, -1):
            bad = y.copy()
            bad[2] = bad_value
            with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\)"):
                loss(x, bad, w)
            per_sample = jax.jit(functools.partial(loss, reduction="none"))(x, bad, w)
            assert np.isnan(per_sample[2])
            assert np.isfinite(np.delete(per_sample, 2)).all()


BAD_ARGS = [
    (
        (np.ones((4,), np.float32), np.zeros(4, np.int32), np.ones((3, 2), np.float32)),
        ValueError,
        "embeddings must have shape",
    ),
    (
        (np.ones((4, 3), np.int32), np.zeros(4, np.int32), np.ones((3, 2), np.float32)),
        TypeError,
        "embeddings must be a floating",
    ),
    (
        (np.ones((4, 3), np.float32), np.zeros(3, np.int32), np.ones((3, 2), np.float32)),
        ValueError,
        r"labels must have shape \[4\]",
    ),
    (
        (np.ones((4, 3), np.float32), np.zeros(4, np.float32), np.ones((3, 2), np.float32)),
        TypeError,
        "labels must be an integer",
    ),
    (
        (np.ones((4, 3), np.float32), np.zeros(4, np.int32), np.ones((2, 3), np.float32)),
        ValueError,
        r"class_weights must have shape \[3, num_classes\]",
    ),
    (
        (np.ones((4, 3), np.float32), np.zeros(4, np.int32), np.ones((3,), np.float32)),
        ValueError,
        r"class_weights must have shape \[3, num_classes\]",
    ),
    (
        (np.ones((4, 3), np.float32), np.zeros(4, np.int32), np.ones((3, 2), np.int32)),
        TypeError,
        "class_weights must be a floating",
    ),
    (
        (np.ones((4, 3), np.float32), np.zeros(4, np.int32), np.ones((3, 0), np.float32)),
        ValueError,
        "num_classes >= 1",
    ),
]


@pytest.mark.parametrize("args, error, match", BAD_ARGS)
@pytest.mark.parametrize(
    "loss", [arcface_loss, cosface_loss, combined_margin_loss, sphereface_loss]
)
def test_bad_input_raises_at_trace_time(loss, args, error, match):
    with pytest.raises(error, match=match):
        jax.jit(loss).lower(*args)


def test_cosine_logits_bad_input():
    with pytest.raises(ValueError, match=r"class_weights must have shape \[3, num_classes\]"):
        jax.jit(cosine_logits).lower(np.ones((4, 3), np.float32), np.ones((4, 3), np.float32))


@pytest.mark.parametrize(
    "loss, kwargs, match",
    [
        (sphereface_loss, dict(margin=2.5), "margin must be an integer >= 1"),
        (sphereface_loss, dict(margin=0), "margin must be an integer >= 1"),
        (sphereface_loss, dict(margin=True), "margin must be an integer >= 1"),
        (sphereface_loss, dict(annealing_lambda=-1.0), "annealing_lambda must be >= 0"),
        (sphereface_loss, dict(scale=0.0), "scale must be > 0"),
        (arcface_loss, dict(boundary="clip"), "boundary must be one of"),
        (arcface_loss, dict(margin=-0.1), "margin must be >= 0"),
        (cosface_loss, dict(scale=-1.0), "scale must be > 0"),
        (combined_margin_loss, dict(m1=0.0), "m1 must be > 0"),
        (combined_margin_loss, dict(m3=-0.2), "m3 must be >= 0"),
        (combined_margin_loss, dict(reduction="avg"), "reduction must be one of"),
        (sphereface_loss, dict(reduction="avg"), "reduction must be one of"),
        (arcface_loss, dict(weights=np.ones(3, np.float32)), r"weights must have shape \[4\]"),
    ],
)
def test_bad_options_raise_at_trace_time(loss, kwargs, match):
    args = (np.ones((4, 3), np.float32), np.zeros(4, np.int32), np.ones((3, 2), np.float32))
    with pytest.raises(ValueError, match=match):
        jax.jit(functools.partial(loss, **kwargs)).lower(*args)


def test_integral_float_sphereface_margin_and_m2_range():
    x = np.random.default_rng(0).normal(size=(6, 3)).astype(np.float32)
    w = np.random.default_rng(1).normal(size=(3, 4)).astype(np.float32)
    y = np.arange(6, dtype=np.int32) % 4
    np.testing.assert_allclose(
        sphereface_loss(x, y, w, margin=4.0), sphereface_loss(x, y, w, margin=4), rtol=1e-7
    )
    with pytest.raises(ValueError, match=r"m2 must be in \[0, π\)"):
        combined_margin_loss(x, y, w, m2=3.2)


def test_margin_cross_entropy_vjp_equals_autodiff_with_a_per_sample_scale():
    """The dense heads' hand-written VJP against autodiff of the plain expression, w.r.t. the
    cosines, the target cosines and a per-sample scale (SphereFace's ‖x‖ path)."""
    rng = np.random.default_rng(3)
    batch, classes = 6, 9
    labels = np.arange(batch) % classes
    cosines = np.tanh(rng.normal(size=(batch, classes))).astype(np.float32)
    target = (cosines[np.arange(batch), labels] - 0.3).astype(np.float32)
    scale = np.linspace(2.0, 9.0, batch).astype(np.float32)
    g = rng.uniform(0.5, 1.5, size=batch).astype(np.float32)  # a non-uniform cotangent

    def plain(cos, t, s):
        z = s[:, None] * jnp.where(np.arange(classes)[None, :] == labels[:, None], t[:, None], cos)
        return jnp.sum(g * (jax.nn.logsumexp(z, axis=1) - s * t))

    def ours(cos, t, s):
        return jnp.sum(g * margin_cross_entropy(cos, t, labels, s))

    args = (cosines, target, scale)
    np.testing.assert_allclose(ours(*args), plain(*args), rtol=1e-6)
    for mine, theirs in zip(
        jax.grad(ours, argnums=(0, 1, 2))(*args),
        jax.grad(plain, argnums=(0, 1, 2))(*args),
        strict=True,
    ):
        assert np.max(np.abs(theirs)) > 0
        np.testing.assert_allclose(mine, theirs, rtol=1e-5, atol=1e-6)
