"""Parity of the margin softmax losses with pytorch-metric-learning (PML) 2.9.

Loss values and gradients w.r.t. the embeddings and the class-weight matrix W, in float64 on
both sides. Run with ``-s`` to see the largest errors per loss.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="parity tests need torch (see DEVELOPERS.md)")
pml_losses = pytest.importorskip(
    "pytorch_metric_learning.losses", reason="parity tests need pytorch-metric-learning"
)
pml_reducers = pytest.importorskip(
    "pytorch_metric_learning.reducers", reason="parity tests need pytorch-metric-learning"
)

from mlx_jax.losses.margin_softmax import (  # noqa: E402
    arcface_loss,
    cosface_loss,
    sphereface_loss,
)

RTOL = 1e-5
LARGEST_ERRORS: dict[str, dict[str, float]] = {}


def _record(name: str, kind: str, actual, expected) -> None:
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    denom = np.maximum(np.abs(expected), 1e-3 * np.max(np.abs(expected)) + 1e-300)
    error = float(np.max(np.abs(actual - expected) / denom))
    slot = LARGEST_ERRORS.setdefault(name, {})
    slot[kind] = max(slot.get(kind, 0.0), error)


@pytest.fixture(scope="module", autouse=True)
def report_largest_errors():
    yield
    print("\nLargest relative errors vs PML (grad errors relative to max(|g_i|, 1e-3·max|g|)):")
    for name, errors in sorted(LARGEST_ERRORS.items()):
        print(f"  {name:12s} " + "  ".join(f"{k}={v:.2e}" for k, v in sorted(errors.items())))


def problem(seed, batch=16, dim=8, classes=6, opposite=0, x_scale=1.0):
    """Random float64 data; the first ``opposite`` rows have θ_y near π (θ + m > π)."""
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.arange(batch) % classes)
    w = rng.normal(size=(dim, classes))
    x = rng.normal(size=(batch, dim)) * x_scale
    for i in range(opposite):
        w_hat = w[:, labels[i]] / np.linalg.norm(w[:, labels[i]])
        x[i] = x_scale * (-2.0 * w_hat + 0.25 * rng.normal(size=dim))
    return x, labels, w


def pml_value_and_grads(loss_fn, x, labels, w):
    loss_fn.W.data = torch.tensor(w, dtype=torch.float64)
    emb = torch.tensor(x, dtype=torch.float64, requires_grad=True)
    loss = loss_fn(emb, torch.tensor(labels, dtype=torch.int64))
    loss.backward()
    return loss.item(), emb.grad.numpy(), loss_fn.W.grad.numpy()


def ours_value_and_grads(fn, x, labels, w):
    with jax.enable_x64(True):
        lab = jnp.asarray(labels, jnp.int32)
        value, (gx, gw) = jax.value_and_grad(lambda e, cw: fn(e, lab, cw), argnums=(0, 1))(
            jnp.asarray(x), jnp.asarray(w)
        )
        assert value.dtype == jnp.float64
        return float(value), np.asarray(gx), np.asarray(gw)


def assert_parity(name, ours, theirs):
    (v, gx, gw), (tv, tgx, tgw) = ours, theirs
    _record(name, "loss", v, tv)
    _record(name, "grad_x", gx, tgx)
    _record(name, "grad_W", gw, tgw)
    np.testing.assert_allclose(v, tv, rtol=RTOL)
    for g, tg in ((gx, tgx), (gw, tgw)):
        np.testing.assert_allclose(g, tg, rtol=RTOL, atol=RTOL * 1e-3 * np.max(np.abs(tg)))


@pytest.mark.parametrize("scale", [64.0, 16.0])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_cosface(seed, scale):
    x, y, w = problem(seed)
    loss_fn = pml_losses.CosFaceLoss(
        num_classes=w.shape[1],
        embedding_size=w.shape[0],
        margin=0.35,
        scale=scale,
        reducer=pml_reducers.MeanReducer(),
    )
    assert_parity(
        "CosFace",
        ours_value_and_grads(lambda e, lab, cw: cosface_loss(e, lab, cw, scale=scale), x, y, w),
        pml_value_and_grads(loss_fn, x, y, w),
    )


@pytest.mark.parametrize("opposite", [0, 6])
@pytest.mark.parametrize("scale", [64.0, 16.0])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_arcface(seed, scale, opposite):
    margin = 0.5
    x, y, w = problem(seed, opposite=opposite)
    if opposite:
        cos = (x / np.linalg.norm(x, axis=1, keepdims=True)) @ (w / np.linalg.norm(w, axis=0))
        theta = np.arccos(cos[np.arange(len(y)), y])
        assert np.sum(theta > math.pi - margin) >= 3  # the boundary rule is exercised
    loss_fn = pml_losses.ArcFaceLoss(
        num_classes=w.shape[1],
        embedding_size=w.shape[0],
        margin=np.degrees(margin),
        scale=scale,
        reducer=pml_reducers.MeanReducer(),
    )
    assert_parity(
        "ArcFace",
        ours_value_and_grads(
            lambda e, lab, cw: arcface_loss(
                e, lab, cw, scale=scale, margin=margin, boundary="monotonic"
            ),
            x,
            y,
            w,
        ),
        pml_value_and_grads(loss_fn, x, y, w),
    )


@pytest.mark.parametrize("margin", [1, 2, 3, 4])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sphereface(seed, margin):
    x, y, w = problem(seed, opposite=4, x_scale=1.5)
    loss_fn = pml_losses.SphereFaceLoss(
        num_classes=w.shape[1],
        embedding_size=w.shape[0],
        margin=margin,
        scale=1,
        reducer=pml_reducers.MeanReducer(),
    )
    assert_parity(
        "SphereFace",
        ours_value_and_grads(
            lambda e, lab, cw: sphereface_loss(
                e, lab, cw, margin=margin, annealing_lambda=0.0, scale=None
            ),
            x,
            y,
            w,
        ),
        pml_value_and_grads(loss_fn, x, y, w),
    )


F32_CASES = {
    "ArcFace": (
        lambda y, s: lambda e, cw: arcface_loss(e, y, cw, scale=s, margin=0.5),
        lambda s: pml_losses.ArcFaceLoss(
            num_classes=6,
            embedding_size=8,
            margin=np.degrees(0.5),
            scale=s,
            reducer=pml_reducers.MeanReducer(),
        ),
    ),
    "CosFace": (
        lambda y, s: lambda e, cw: cosface_loss(e, y, cw, scale=s, margin=0.35),
        lambda s: pml_losses.CosFaceLoss(
            num_classes=6,
            embedding_size=8,
            margin=0.35,
            scale=s,
            reducer=pml_reducers.MeanReducer(),
        ),
    ),
    "SphereFace": (
        lambda y, s: lambda e, cw: sphereface_loss(e, y, cw, margin=4),
        lambda s: pml_losses.SphereFaceLoss(
            num_classes=6,
            embedding_size=8,
            margin=4,
            scale=1,
            reducer=pml_reducers.MeanReducer(),
        ),
    ),
}


@pytest.mark.parametrize("name", sorted(F32_CASES))
@pytest.mark.parametrize("seed", [0, 1])
def test_float32_default_path_against_float64_pml(name, seed):
    """Our default float32 computation against PML in float64: the loss to ~1e-7 relative,
    gradients to ~1e-4 (float32 rounding amplified by the scale)."""
    ours, theirs = F32_CASES[name]
    for scale in (64.0, 16.0):
        x, y, w = problem(seed, opposite=6)
        value, (gx, gw) = jax.value_and_grad(ours(jnp.asarray(y, jnp.int32), scale), (0, 1))(
            jnp.asarray(x, jnp.float32), jnp.asarray(w, jnp.float32)
        )
        assert value.dtype == jnp.float32
        tv, tgx, tgw = pml_value_and_grads(theirs(scale), x, y, w)
        _record(name, "f32_loss", value, tv)
        _record(name, "f32_grad_x", gx, tgx)
        _record(name, "f32_grad_W", gw, tgw)
        np.testing.assert_allclose(value, tv, rtol=1e-5)
        for g, tg in ((gx, tgx), (gw, tgw)):
            np.testing.assert_allclose(g, tg, rtol=1e-3, atol=1e-3 * 1e-3 * np.max(np.abs(tg)))
