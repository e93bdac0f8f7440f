"""CLIP and SigLIP (mlx_jax.losses.image_text) against loop-by-loop float64 references written
from the papers' formulas, against the papers' pseudocode in vectorized NumPy, against optax's
cross-entropies, in their dense and blockwise forms, with learnable scalars, on degenerate
batches, and (CLIP) against pytorch-metric-learning's NT-Xent with reference embeddings."""

import functools
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mlx_jax.losses.image_text import clip_loss, siglip_loss
from tests.helpers import check_grads_x64

LOG_100 = math.log(100.0)
CLIP_LOG_SCALE = math.log(1 / 0.07)
SIGLIP_LOG_TEMPERATURE = math.log(10.0)

# ---------------------------------------------------------------------------------------------
# References: plain loops over pairs, float64, no code shared with the library.
# ---------------------------------------------------------------------------------------------


def _normalized(x):
    x = np.asarray(x, np.float64)
    return x / np.maximum(np.sqrt(np.sum(x * x, axis=1, keepdims=True)), 1e-12)


def _reduce(terms, weights, reduction):
    """terms: weighted per-pair losses [B]; weights [B]."""
    if reduction == "none":
        return terms
    total = float(np.sum(terms))
    if reduction == "sum":
        return total
    if reduction == "mean":
        count = float(np.sum(weights))
    else:  # mean_nonzero
        count = float(sum(w for t, w in zip(terms, weights, strict=True) if t > 0))
    return total / count if count > 0 else 0.0


def reference_clip(
    images, texts, log_scale=CLIP_LOG_SCALE, max_scale=100.0, weights=None, reduction="mean"
):
    """Radford et al. 2021, Fig. 3: the mean of the image→text and text→image cross-entropies,
    the target on the diagonal; a zero-weight pair is in no softmax."""
    u, v = _normalized(images), _normalized(texts)
    batch = len(u)
    w = np.ones(batch) if weights is None else np.asarray(weights, np.float64)
    scale = math.exp(log_scale) if max_scale is None else min(math.exp(log_scale), max_scale)
    terms = np.zeros(batch)
    for i in range(batch):
        if w[i] == 0:
            continue
        kept = [j for j in range(batch) if w[j] > 0]
        image_logits = [scale * float(u[i] @ v[j]) for j in kept]
        text_logits = [scale * float(v[i] @ u[j]) for j in kept]
        positive = scale * float(u[i] @ v[i])
        image_ce = -positive + _log_sum_exp(image_logits)
        text_ce = -positive + _log_sum_exp(text_logits)
        terms[i] = w[i] * (image_ce + text_ce) / 2
    return _reduce(terms, w, reduction)


def _log_sum_exp(values):
    top = max(values)
    return top + math.log(sum(math.exp(v - top) for v in values))


def _log_sigmoid(x):
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def reference_siglip(
    images,
    texts,
    log_temperature=SIGLIP_LOG_TEMPERATURE,
    bias=-10.0,
    weights=None,
    reduction="mean",
):
    """Zhai et al. 2023, Algorithm 1: −1/|B| Σ_i Σ_j log σ(z_ij (t x_i·y_j + b)); the term
    (i, j) weighted (w_i + w_j)/2 and counted in pair i's row."""
    x, y = _normalized(images), _normalized(texts)
    batch = len(x)
    w = np.ones(batch) if weights is None else np.asarray(weights, np.float64)
    t = math.exp(log_temperature)
    terms = np.zeros(batch)
    for i in range(batch):
        for j in range(batch):
            if w[i] == 0 or w[j] == 0:
                continue
            z = 1.0 if i == j else -1.0
            loss = -_log_sigmoid(z * (t * float(x[i] @ y[j]) + bias))
            terms[i] += (w[i] + w[j]) / 2 * loss
    return _reduce(terms, w, reduction)


def pseudocode_clip(I_e, T_e, t):  # noqa: N803 (the paper's names)
    """Fig. 3 of Radford et al. 2021 in NumPy (the encoders' projections left out)."""
    I_e, T_e = _normalized(I_e), _normalized(T_e)  # noqa: N806
    logits = np.dot(I_e, T_e.T) * np.exp(t)
    n = len(logits)
    labels = np.arange(n)

    def cross_entropy_loss(logits, labels, axis):
        shifted = logits - logits.max(axis=axis, keepdims=True)
        log_prob = shifted - np.log(np.exp(shifted).sum(axis=axis, keepdims=True))
        return -np.mean(log_prob[labels, labels])

    loss_i = cross_entropy_loss(logits, labels, axis=0)
    loss_t = cross_entropy_loss(logits, labels, axis=1)
    return (loss_i + loss_t) / 2


def pseudocode_siglip(img_emb, txt_emb, t_prime, b):
    """Algorithm 1 of Zhai et al. 2023 in NumPy."""
    n = len(img_emb)
    t = np.exp(t_prime)
    zimg, ztxt = _normalized(img_emb), _normalized(txt_emb)
    logits = np.dot(zimg, ztxt.T) * t + b
    labels = 2 * np.eye(n) - np.ones(n)
    return -np.sum(-np.logaddexp(0.0, -labels * logits)) / n  # log_sigmoid(x) = −log(1 + e^−x)


def _pairs(seed, batch=12, dim=4):
    rng = np.random.default_rng(seed)
    images = rng.normal(size=(batch, dim))
    texts = images + rng.normal(size=(batch, dim))  # correlated: a meaningful diagonal
    return images.astype(np.float32), texts.astype(np.float32)


LOSSES = {"clip": clip_loss, "siglip": siglip_loss}
REFERENCES = {"clip": reference_clip, "siglip": reference_siglip}
# the learnable scalars of each loss, with a non-default value for tests
PARAMS = {"clip": dict(log_scale=3.0), "siglip": dict(log_temperature=1.5, bias=-4.0)}
DEFAULTS = {
    "clip": dict(log_scale=CLIP_LOG_SCALE),
    "siglip": dict(log_temperature=SIGLIP_LOG_TEMPERATURE, bias=-10.0),
}
WEIGHTS = np.array([1.0, 2.0, 0.0, 0.5, 1.0, 1.0, 3.0, 0.0, 1.0, 1.0, 0.25, 1.0], np.float32)


# ---------------------------------------------------------------------------------------------
# Values
# ---------------------------------------------------------------------------------------------


def _jitted(name, reduction):
    """A jitted loss of (images, texts, weights, **scalars)."""

    def loss(images, texts, weights, **scalars):
        return LOSSES[name](images, texts, weights=weights, reduction=reduction, **scalars)

    return jax.jit(loss)


@functools.cache
def _value_and_grads(name, reduction="mean", block_size=None):
    """Jitted (images, texts, weights, scalars, cotangent) → ((Σ value·cotangent, value),
    gradients of the first w.r.t. (images, texts, scalars)); ``scalars`` is a dict of the
    loss's learnable scalars. Cached, so that the tests share compilations."""

    def loss(images, texts, weights, scalars, cotangent):
        value = LOSSES[name](
            images, texts, weights=weights, reduction=reduction, block_size=block_size, **scalars
        )
        return jnp.sum(value * cotangent), value

    return jax.jit(jax.value_and_grad(loss, (0, 1, 3), has_aux=True))


def _scalars(params):
    return {k: jnp.float32(v) for k, v in params.items()}


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_matches_loop_reference_in_float64(name):
    images, texts = _pairs(1)
    with jax.enable_x64(True):
        for reduction in ("mean", "sum", "mean_nonzero", "none"):
            fn = _jitted(name, reduction)
            for weights in (None, WEIGHTS):
                w = np.ones(12) if weights is None else weights.astype(np.float64)
                for params in (DEFAULTS[name], PARAMS[name]):
                    actual = fn(
                        jnp.asarray(images, jnp.float64),
                        jnp.asarray(texts, jnp.float64),
                        jnp.asarray(w),
                        **params,
                    )
                    assert actual.dtype == jnp.float64
                    expected = REFERENCES[name](
                        images, texts, weights=weights, reduction=reduction, **params
                    )
                    np.testing.assert_allclose(actual, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_matches_loop_reference_in_float32(name):
    images, texts = _pairs(2)
    # eager; the default scalars are checked in float32 by test_defaults_are_the_papers
    actual = LOSSES[name](images, texts, weights=WEIGHTS, reduction="none", **PARAMS[name])
    assert actual.dtype == jnp.float32
    expected = REFERENCES[name](images, texts, weights=WEIGHTS, reduction="none", **PARAMS[name])
    np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-6)


def test_defaults_are_the_papers():
    images, texts = _pairs(3)
    # CLIP: t = log(1/0.07), scale clipped at 100; SigLIP: t' = log 10, b = −10
    np.testing.assert_allclose(
        clip_loss(images, texts), pseudocode_clip(images, texts, math.log(1 / 0.07)), rtol=1e-5
    )
    np.testing.assert_allclose(
        siglip_loss(images, texts),
        pseudocode_siglip(images, texts, math.log(10.0), -10.0),
        rtol=1e-5,
    )


def test_matches_the_papers_pseudocode():
    images, texts = _pairs(4, batch=9, dim=6)
    with jax.enable_x64(True):
        x, y = jnp.asarray(images, jnp.float64), jnp.asarray(texts, jnp.float64)
        clip = jax.jit(lambda t: clip_loss(x, y, log_scale=t))
        for t in (0.0, 2.5, LOG_100 - 0.1):
            np.testing.assert_allclose(clip(t), pseudocode_clip(images, texts, t), rtol=1e-10)
        siglip = jax.jit(lambda t, b: siglip_loss(x, y, log_temperature=t, bias=b))
        for t_prime, b in ((math.log(10.0), -10.0), (0.5, 2.0), (4.0, -1.0)):
            np.testing.assert_allclose(
                siglip(t_prime, b), pseudocode_siglip(images, texts, t_prime, b), rtol=1e-10
            )


def _optax_clip(images, texts, log_scale):
    u = images / jnp.linalg.norm(images, axis=1, keepdims=True)
    v = texts / jnp.linalg.norm(texts, axis=1, keepdims=True)
    logits = jnp.exp(log_scale) * u @ v.T
    labels = jnp.arange(len(u))
    ce = optax.losses.softmax_cross_entropy_with_integer_labels
    return (jnp.mean(ce(logits, labels)) + jnp.mean(ce(logits.T, labels))) / 2


def _optax_siglip(images, texts, log_temperature, bias):
    u = images / jnp.linalg.norm(images, axis=1, keepdims=True)
    v = texts / jnp.linalg.norm(texts, axis=1, keepdims=True)
    logits = jnp.exp(log_temperature) * u @ v.T + bias
    targets = jnp.eye(len(u))
    return jnp.sum(optax.losses.sigmoid_binary_cross_entropy(logits, targets)) / len(u)


def test_values_and_all_gradients_match_optax_in_float64():
    images, texts = _pairs(6)
    with jax.enable_x64(True):
        x, y = jnp.asarray(images, jnp.float64), jnp.asarray(texts, jnp.float64)
        t = jnp.float64(2.0)
        ours = jax.jit(jax.value_and_grad(lambda a, b, s: clip_loss(a, b, log_scale=s), (0, 1, 2)))
        theirs = jax.jit(jax.value_and_grad(_optax_clip, (0, 1, 2)))
        chex.assert_trees_all_close(ours(x, y, t), theirs(x, y, t), rtol=1e-10, atol=1e-13)
        t_prime, b = jnp.float64(1.0), jnp.float64(-3.0)
        ours = jax.jit(
            jax.value_and_grad(
                lambda a, c, s, d: siglip_loss(a, c, log_temperature=s, bias=d), (0, 1, 2, 3)
            )
        )
        theirs = jax.jit(jax.value_and_grad(_optax_siglip, (0, 1, 2, 3)))
        chex.assert_trees_all_close(
            ours(x, y, t_prime, b), theirs(x, y, t_prime, b), rtol=1e-10, atol=1e-13
        )


def test_reduction_none_sums_to_sum_and_mean():
    images, texts = _pairs(7)
    for fn in LOSSES.values():
        terms = fn(images, texts, weights=WEIGHTS, reduction="none")
        assert terms.shape == (12,)
        np.testing.assert_array_equal(terms[WEIGHTS == 0], 0.0)
        total = fn(images, texts, weights=WEIGHTS, reduction="sum")
        np.testing.assert_allclose(np.sum(terms), total, rtol=1e-6)
        np.testing.assert_allclose(
            fn(images, texts, weights=WEIGHTS), total / WEIGHTS.sum(), rtol=1e-6
        )


def test_swapping_images_and_texts_gives_the_same_loss():
    # both losses are symmetric in the two modalities, weighted ones included
    images, texts = _pairs(8)
    for name, fn in LOSSES.items():
        np.testing.assert_allclose(
            fn(images, texts, weights=WEIGHTS, **PARAMS[name]),
            fn(texts, images, weights=WEIGHTS, **PARAMS[name]),
            rtol=1e-6,
        )


def test_zero_weight_is_removal():
    # the two zero-weight rows of WEIGHTS are padding: the loss and the gradients of the other
    # pairs are those of the batch without them, and the padding gets no gradient
    images, texts = _pairs(9)
    keep = WEIGHTS > 0
    for name in LOSSES:
        fn = _value_and_grads(name)
        scalars = _scalars(PARAMS[name])
        (value, _), grads = fn(images, texts, WEIGHTS, scalars, 1.0)
        (removed, _), removed_grads = fn(images[keep], texts[keep], WEIGHTS[keep], scalars, 1.0)
        np.testing.assert_allclose(value, removed, rtol=1e-6)
        for grad, removed_grad in zip(grads[:2], removed_grads[:2], strict=True):
            np.testing.assert_array_equal(grad[~keep], 0.0)
            np.testing.assert_allclose(grad[keep], removed_grad, rtol=1e-5, atol=1e-7)
        chex.assert_trees_all_close(grads[2], removed_grads[2], rtol=1e-5)


def test_large_scales_do_not_overflow_in_float32():
    # scale 100 (CLIP's cap) and t = 1000 (SigLIP) on near-duplicate pairs: exp(100) and
    # exp(1000) are beyond float32's range, the losses are not
    rng = np.random.default_rng(10)
    centre = rng.normal(size=(1, 4))
    images = (centre + 0.01 * rng.normal(size=(12, 4))).astype(np.float32)
    texts = (centre + 0.01 * rng.normal(size=(12, 4))).astype(np.float32)
    texts[5] = images[4]  # an exact duplicate across modalities
    cases = {
        "clip": dict(log_scale=LOG_100 + 1.0),  # clipped: s = 100
        "siglip": dict(log_temperature=math.log(1000.0), bias=-10.0),
    }
    for name, params in cases.items():
        for block_size in (None, 5):
            fn = _value_and_grads(name, "mean", block_size)
            (value, _), grads = fn(images, texts, np.ones(12, np.float32), _scalars(params), 1.0)
            expected = REFERENCES[name](images, texts, **params)
            np.testing.assert_allclose(value, expected, rtol=1e-4)
            assert all(np.isfinite(g).all() for g in jax.tree_util.tree_leaves(grads))


# ---------------------------------------------------------------------------------------------
# Learnable scalars
# ---------------------------------------------------------------------------------------------


def test_gradients_match_finite_differences():
    images, texts = _pairs(11, batch=7, dim=3)
    w = np.array([1.0, 2.0, 0.0, 0.5, 1.0, 1.0, 3.0])
    check_grads_x64(
        jax.jit(lambda a, b, t: clip_loss(a, b, log_scale=t, weights=w)),
        images,
        texts,
        np.float64(2.2),
    )
    check_grads_x64(
        jax.jit(
            lambda a, b, t, c: siglip_loss(a, b, log_temperature=t, bias=c, weights=w, block_size=3)
        ),
        images,
        texts,
        np.float64(1.3),
        np.float64(-2.0),
    )


def test_clip_scale_clip():
    images, texts = _pairs(12)

    @functools.cache
    def jitted(max_scale):
        return jax.jit(
            jax.value_and_grad(lambda t: clip_loss(images, texts, log_scale=t, max_scale=max_scale))
        )

    def value_and_grad(t, max_scale=100.0):
        return jitted(max_scale)(jnp.float32(t))

    # t exactly at the clip (a training loop that clamps t there) keeps its full gradient
    at_clip, at_clip_grad = value_and_grad(LOG_100)
    free, free_grad = value_and_grad(LOG_100, max_scale=None)
    assert at_clip == free and at_clip_grad == free_grad != 0.0
    # above it the scale stays 100 and t gets no gradient, however large t is (no 0·inf)
    for t in (LOG_100 + 0.5, 1000.0):
        value, t_grad = value_and_grad(t)
        assert value == at_clip and t_grad == 0.0
    # a smaller cap, and none: exp(t) itself
    np.testing.assert_allclose(
        value_and_grad(3.0, max_scale=5.0)[0],
        reference_clip(images, texts, math.log(5.0), None),
        rtol=1e-5,
    )
    np.testing.assert_allclose(
        value_and_grad(5.0, max_scale=None)[0], reference_clip(images, texts, 5.0, None), rtol=1e-5
    )


def test_learnable_scalars_train():
    # a few SGD steps on the scalars alone lower the loss: the gradients point the right way
    images, texts = _pairs(13)

    @jax.jit
    def step(params):
        loss, grads = jax.value_and_grad(
            lambda p: (
                clip_loss(images, texts, log_scale=p["t"])
                + siglip_loss(images, texts, log_temperature=p["t_prime"], bias=p["b"])
            )
        )(params)
        return loss, jax.tree_util.tree_map(lambda p, g: p - 0.1 * g, params, grads)

    params = {"t": jnp.float32(0.0), "t_prime": jnp.float32(0.0), "b": jnp.float32(0.0)}
    losses = []
    for _ in range(5):
        loss, params = step(params)
        losses.append(float(loss))
    assert all(b < a for a, b in zip(losses, losses[1:], strict=False)), losses


# ---------------------------------------------------------------------------------------------
# jit, blocks, dtypes
# ---------------------------------------------------------------------------------------------


@functools.cache
def _grads_x64(name, seed):
    with jax.enable_x64(True):
        images, texts = (jnp.asarray(a, jnp.float64) for a in _pairs(seed))
        grad = jax.jit(jax.grad(lambda a, b: LOSSES[name](a, b, **PARAMS[name]), (0, 1)))
        return [np.asarray(g) for g in grad(images, texts)]


class TestVariants(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_jit_and_eager_agree(self):
        images, texts = _pairs(14)
        for name, fn in LOSSES.items():
            params = PARAMS[name]
            value_and_grad = self.variant(
                jax.value_and_grad(lambda a, b, f=fn, p=params: f(a, b, **p), (0, 1))
            )
            value, grads = value_and_grad(images, texts)
            expected = _grads_x64(name, 14)
            np.testing.assert_allclose(value, REFERENCES[name](images, texts, **params), rtol=1e-5)
            for grad, grad64 in zip(grads, expected, strict=True):
                np.testing.assert_allclose(grad, grad64, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_block_sizes_give_the_same_value_and_gradients(name):
    # B = 12 is no multiple of 5: padding rows are cut off. Random cotangents weigh every
    # per-pair term; the scalars' gradients are compared too.
    images, texts = _pairs(15)
    cotangent = np.random.default_rng(15).uniform(0.5, 1.5, size=12).astype(np.float32)
    scalars = _scalars(PARAMS[name])
    for reduction, weight in (("mean", 1.0), ("none", cotangent)):
        (_, dense_value), dense_grads = _value_and_grads(name, reduction, None)(
            images, texts, WEIGHTS, scalars, weight
        )
        (_, value), grads = _value_and_grads(name, reduction, 5)(
            images, texts, WEIGHTS, scalars, weight
        )
        np.testing.assert_allclose(value, dense_value, rtol=1e-5, atol=1e-6)
        for grad, dense_grad in zip(
            jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(dense_grads), strict=True
        ):
            scale = np.abs(dense_grad).max()
            assert scale > 0
            np.testing.assert_allclose(grad, dense_grad, rtol=1e-4, atol=1e-6 * scale)


def _temp_bytes(name, batch, block_size):
    x = jax.ShapeDtypeStruct((batch, 16), jnp.float32)
    step = jax.jit(
        jax.value_and_grad(lambda a, b: LOSSES[name](a, b, block_size=block_size), (0, 1))
    )
    return step.lower(x, x).compile().memory_analysis().temp_size_in_bytes


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_memory_of_a_65536_batch_is_per_block(name):
    # XLA's buffer assignment of the compiled value-and-gradient step (compiled, not run): a
    # [B, B] float32 matrix at B = 65,536 is 16 GiB; blocks of 16 rows hold [16, B] planes
    # (4 MiB each) and the [B, D] inputs and gradients (4 MiB each).
    batch = 1 << 16
    matrix = 4 * batch * batch
    # "auto" picks blocks of 16 rows on CPU (dense on accelerators)
    block_size = "auto" if jax.default_backend() == "cpu" else 16
    assert _temp_bytes(name, batch, block_size) < matrix / 256  # 64 MiB


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_low_precision_inputs_compute_in_float32(dtype):
    images, texts = _pairs(16)
    low_images, low_texts = jnp.asarray(images, dtype), jnp.asarray(texts, dtype)
    for name, fn in LOSSES.items():
        value, grads = jax.value_and_grad(lambda a, b, f=fn: f(a, b), (0, 1))(low_images, low_texts)
        assert value.dtype == jnp.float32
        assert all(g.dtype == dtype for g in grads)
        assert all(np.isfinite(np.asarray(g, np.float32)).all() for g in grads)
        # exact on the rounded inputs, close to the float32 loss of the unrounded ones
        rounded = (np.asarray(low_images, np.float64), np.asarray(low_texts, np.float64))
        np.testing.assert_allclose(value, REFERENCES[name](*rounded), rtol=1e-5)
        np.testing.assert_allclose(value, fn(images, texts), rtol=3e-2)


# ---------------------------------------------------------------------------------------------
# Degenerate batches
# ---------------------------------------------------------------------------------------------

_rng = np.random.default_rng(17)
DEGENERATE = {
    "single_pair": (_rng.normal(size=(1, 3)), _rng.normal(size=(1, 3))),
    "zero_vectors": (np.zeros((6, 3)), _rng.normal(size=(6, 3))),
    "identical_pairs": (np.ones((6, 3)), np.ones((6, 3))),
    "duplicate_images": (np.ones((6, 3)), _rng.normal(size=(6, 3))),
}


def _degenerate(name, images, texts, block_size=None, weights=None):
    """(value, gradients w.r.t. images, texts and the default scalars), jitted and cached."""
    weights = np.ones(len(images), np.float32) if weights is None else weights
    fn = _value_and_grads(name, "mean", block_size)
    (value, _), grads = fn(images, texts, weights, _scalars(DEFAULTS[name]), 1.0)
    return value, grads


@pytest.mark.parametrize("case", sorted(DEGENERATE))
def test_degenerate_batches_are_finite_and_match_reference(case):
    images, texts = (a.astype(np.float32) for a in DEGENERATE[case])
    for name in LOSSES:
        for block_size in (None, 5):
            value, grads = _degenerate(name, images, texts, block_size)
            assert np.isfinite(np.asarray(value))
            assert all(np.isfinite(g).all() for g in jax.tree_util.tree_leaves(grads))
            expected = REFERENCES[name](images, texts)
            np.testing.assert_allclose(value, expected, rtol=1e-5, atol=1e-6)


def test_hand_derived_degenerate_values():
    # one pair: CLIP's softmaxes have one logit each, so 0, with zero gradients
    one_image, one_text = (a.astype(np.float32) for a in DEGENERATE["single_pair"])
    value, grads = _degenerate("clip", one_image, one_text)
    np.testing.assert_allclose(value, 0.0, atol=1e-6)  # XLA's fused exp(0) may round
    for g in jax.tree_util.tree_leaves(grads):
        np.testing.assert_allclose(g, 0.0, atol=1e-6)
    # B identical pairs: every CLIP logit is the same, each cross-entropy log B
    same = np.ones((6, 3), np.float32)
    np.testing.assert_allclose(_degenerate("clip", same, same)[0], math.log(6), rtol=1e-6)
    # ... and SigLIP's are t + b (cos = 1): one positive term softplus(−(t + b)) and five
    # negative terms softplus(t + b) per row; with t = 10, b = −10 both are log 2
    np.testing.assert_allclose(_degenerate("siglip", same, same)[0], 6 * math.log(2.0), rtol=1e-6)


def test_all_weights_zero_give_zero_with_zero_gradients():
    images, texts = _pairs(18)
    for name in LOSSES:
        for block_size in (None, 5):
            value, grads = _degenerate(name, images, texts, block_size, np.zeros(12, np.float32))
            assert value == 0.0
            for g in jax.tree_util.tree_leaves(grads):
                np.testing.assert_array_equal(g, 0.0)


# ---------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------

X = np.ones((4, 2), np.float32)


@pytest.mark.parametrize("name", sorted(LOSSES))
@pytest.mark.parametrize(
    "args, kwargs, error, match",
    [
        ((np.ones(4, np.float32), X), {}, ValueError, r"image_embeddings must have shape \[batch"),
        ((X, np.ones((4, 2, 1), np.float32)), {}, ValueError, r"text_embeddings must have shape"),
        (
            (X, np.ones((5, 2), np.float32)),
            {},
            ValueError,
            r"text_embeddings must have the shape of image_embeddings \[4, 2\]",
        ),
        (
            (X, np.ones((4, 3), np.float32)),
            {},
            ValueError,
            r"text_embeddings must have the shape of image_embeddings \[4, 2\].*got shape \[4, 3\]",
        ),
        ((np.ones((4, 2), np.int32), X), {}, TypeError, "image_embeddings must be a floating"),
        (
            (X, X),
            dict(weights=np.ones(3, np.float32)),
            ValueError,
            r"weights must have shape \[4\]",
        ),
        ((X, X), dict(reduction="avg"), ValueError, "reduction must be one of"),
        ((X, X), dict(block_size=0), ValueError, "block_size must be >= 1"),
    ],
)
def test_bad_input_raises_at_trace_time(name, args, kwargs, error, match):
    with pytest.raises(error, match=match):
        jax.jit(lambda *a: LOSSES[name](*a, **kwargs)).lower(*args)


@pytest.mark.parametrize(
    "name, kwargs, error, match",
    [
        ("clip", dict(log_scale=float("nan")), ValueError, "log_scale must be finite"),
        ("clip", dict(log_scale=np.float32(np.inf)), ValueError, "log_scale must be finite"),
        ("clip", dict(log_scale=np.ones(2)), ValueError, r"log_scale must be a scalar"),
        ("clip", dict(max_scale=0.0), ValueError, "max_scale must be > 0"),
        ("clip", dict(max_scale=float("inf")), ValueError, "max_scale must be finite or None"),
        ("siglip", dict(log_temperature=float("inf")), ValueError, "log_temperature must be fin"),
        ("siglip", dict(bias=float("-inf")), ValueError, "bias must be finite"),
        ("siglip", dict(bias=jnp.ones((1,))), ValueError, r"bias must be a scalar"),
        ("siglip", dict(log_temperature="10"), TypeError, "log_temperature must be a real"),
    ],
)
def test_bad_scalars_raise_naming_the_argument(name, kwargs, error, match):
    with pytest.raises(error, match=match):
        jax.jit(lambda a, b: LOSSES[name](a, b, **kwargs)).lower(X, X)


def test_traced_max_scale_is_refused():
    with pytest.raises(TypeError, match=r"max_scale must be a Python float or None \(static\)"):
        jax.jit(lambda a, b, m: clip_loss(a, b, max_scale=m)).lower(X, X, 100.0)


# ---------------------------------------------------------------------------------------------
# Parity with pytorch-metric-learning (CLIP), float64
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pml():
    torch = pytest.importorskip("torch", reason="parity tests need torch (pip install torch)")
    losses = pytest.importorskip(
        "pytorch_metric_learning.losses",
        reason="parity tests need pytorch-metric-learning (pip install .[parity])",
    )
    return torch, losses


_clip_value_and_grads = jax.jit(
    jax.value_and_grad(lambda a, b, t: clip_loss(a, b, log_scale=t, max_scale=None), (0, 1, 2))
)


@pytest.mark.parametrize("seed, log_scale", [(0, math.log(1 / 0.07)), (1, 1.0), (2, LOG_100)])
def test_clip_matches_pml_ntxent_with_reference_embeddings(pml, seed, log_scale):
    # image→text is NT-Xent with images as anchors and texts as ref_emb (labels = pair index),
    # text→image the same with the roles swapped; CLIP is their mean. PML's temperature is a
    # tensor here, so the gradient of the log-scale is compared too.
    torch, losses = pml
    rng = np.random.default_rng(seed)
    images = rng.normal(size=(10, 5))
    texts = images + 0.8 * rng.normal(size=(10, 5))
    a = torch.tensor(images, requires_grad=True)
    b = torch.tensor(texts, requires_grad=True)
    t = torch.tensor(log_scale, dtype=torch.float64, requires_grad=True)
    ntxent = losses.SelfSupervisedLoss(
        losses.NTXentLoss(temperature=1 / torch.exp(t)), symmetric=False
    )
    theirs = (ntxent(a, b) + ntxent(b, a)) / 2
    theirs.backward()
    with jax.enable_x64(True):
        value, grads = _clip_value_and_grads(
            jnp.asarray(images), jnp.asarray(texts), jnp.float64(log_scale)
        )
        assert value.dtype == jnp.float64
    theirs = float(theirs.detach())
    assert theirs > 0.0
    np.testing.assert_allclose(value, theirs, rtol=1e-10)
    for grad, ref in zip(grads, (a.grad, b.grad, t.grad), strict=True):
        ref = ref.numpy()
        np.testing.assert_allclose(grad, ref, rtol=1e-8, atol=1e-10 * np.abs(ref).max())
