"""Parity of the pair losses with pytorch-metric-learning (loss value and gradient), float64."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mlx_jax.losses.circle import circle_loss
from mlx_jax.losses.contrastive import contrastive_loss
from tests.helpers import random_batch

torch = pytest.importorskip("torch", reason="parity tests need torch (pip install torch)")
pml_losses = pytest.importorskip(
    "pytorch_metric_learning.losses",
    reason="parity tests need pytorch-metric-learning (pip install .[parity])",
)
from pytorch_metric_learning.distances import LpDistance  # noqa: E402
from pytorch_metric_learning.reducers import MeanReducer  # noqa: E402

RTOL = 1e-5


def _batches():
    """(embeddings float64, labels int32): random batches, one with a singleton class (an
    anchor without positive) and one with near-duplicate hard negatives."""
    out = []
    for seed in range(3):
        x, y = random_batch(seed, batch=16, dim=5, classes=4, scale=0.7)
        out.append((x.astype(np.float64), y))
    x, y = random_batch(7, batch=11, dim=4, classes=3)
    y = y.copy()
    y[4] = 9
    out.append((x.astype(np.float64), y))
    rng = np.random.default_rng(3)
    x = rng.normal(size=(1, 6)) + 0.05 * rng.normal(size=(10, 6))
    out.append((x, (np.arange(10) % 3).astype(np.int32)))
    return out


BATCHES = _batches()


def _pml_value_and_grad(loss_fn, x, y):
    embeddings = torch.tensor(x, dtype=torch.float64, requires_grad=True)
    loss = loss_fn(embeddings, torch.tensor(y, dtype=torch.int64))
    loss.backward()
    return float(loss.detach()), embeddings.grad.numpy()


def _ours_value_and_grad(fn, x, y):
    with jax.enable_x64(True):
        value, grad = jax.value_and_grad(lambda e: fn(e, jnp.asarray(y)))(
            jnp.asarray(x, jnp.float64)
        )
        assert value.dtype == jnp.float64
        return float(value), np.asarray(grad)


def _assert_parity(ours, theirs):
    (value, grad), (ref_value, ref_grad) = ours, theirs
    assert ref_value != 0.0  # a meaningful comparison
    np.testing.assert_allclose(value, ref_value, rtol=RTOL)
    # Gradient entries are compared relative to the gradient's scale (some entries are ~0).
    np.testing.assert_allclose(grad, ref_grad, rtol=RTOL, atol=RTOL * np.abs(ref_grad).max())


@pytest.mark.parametrize("m, gamma", [(0.25, 256.0), (0.4, 80.0)])
@pytest.mark.parametrize("index", range(len(BATCHES)))
def test_circle_loss_matches_pml(m, gamma, index):
    x, y = BATCHES[index]
    theirs = _pml_value_and_grad(pml_losses.CircleLoss(m=m, gamma=gamma), x, y)
    ours = _ours_value_and_grad(
        lambda e, lab: circle_loss(e, lab, m=m, gamma=gamma, reduction="mean_nonzero"), x, y
    )
    _assert_parity(ours, theirs)


@pytest.mark.parametrize("pos_margin, neg_margin", [(0.0, 1.0), (0.3, 1.5), (0.5, 2.5)])
@pytest.mark.parametrize("pml_reducer, reduction", [(None, "mean_nonzero"), ("mean", "mean")])
@pytest.mark.parametrize("index", range(len(BATCHES)))
def test_contrastive_loss_matches_pml(pos_margin, neg_margin, pml_reducer, reduction, index):
    x, y = BATCHES[index]
    kwargs = dict(
        pos_margin=pos_margin,
        neg_margin=neg_margin,
        distance=LpDistance(normalize_embeddings=False),
    )
    if pml_reducer == "mean":
        kwargs["reducer"] = MeanReducer()
    theirs = _pml_value_and_grad(pml_losses.ContrastiveLoss(**kwargs), x, y)
    ours = _ours_value_and_grad(
        lambda e, lab: contrastive_loss(
            e,
            lab,
            squared=False,
            pos_margin=pos_margin,
            neg_margin=neg_margin,
            balance="pos_neg",
            reduction=reduction,
        ),
        x,
        y,
    )
    _assert_parity(ours, theirs)
