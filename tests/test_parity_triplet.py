"""Parity with pytorch-metric-learning (PML) where PML has the same math.

Skipped, with the reason shown, when torch or PML is not installed; CI installs both.
"""

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="parity tests need torch (pip install torch==2.13.0)")
pml = pytest.importorskip(
    "pytorch_metric_learning",
    reason="parity tests need the 'parity' extra (pytorch-metric-learning)",
)
from pytorch_metric_learning import distances, losses, miners, reducers  # noqa: E402

from mlx_jax.losses import triplet_loss  # noqa: E402
from tests.helpers import random_batch  # noqa: E402

LARGEST_ERRORS: dict[str, float] = {}


def pml_value_and_grad(loss_fn, miner, x, y):
    emb = torch.tensor(np.asarray(x, np.float64), requires_grad=True)
    lab = torch.tensor(np.asarray(y, np.int64))
    indices = miner(emb, lab) if miner is not None else None
    loss = loss_fn(emb, lab, indices)
    loss.backward()
    return loss.item(), emb.grad.numpy()


def ours_value_and_grad(fn, x):
    with jax.enable_x64(True):
        value, grad = jax.value_and_grad(fn)(np.asarray(x, np.float64))
        return float(value), np.asarray(grad)


def assert_parity(name, ours, theirs, rtol=1e-6):
    (v1, g1), (v2, g2) = ours, theirs
    np.testing.assert_allclose(v1, v2, rtol=rtol, atol=1e-9)
    np.testing.assert_allclose(g1, g2, rtol=rtol, atol=1e-9)
    err = max(abs(v1 - v2) / max(abs(v2), 1e-12), float(np.max(np.abs(g1 - g2))))
    LARGEST_ERRORS[name] = max(LARGEST_ERRORS.get(name, 0.0), err)


@pytest.mark.parametrize("squared", [False, True])
@pytest.mark.parametrize("margin", [0.1, 0.5])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_batch_hard(squared, margin, seed):
    x, y = random_batch(seed, batch=32, dim=8, classes=8, scale=0.5)
    dist = distances.LpDistance(normalize_embeddings=False, power=2 if squared else 1)
    for reducer, reduction in [
        (reducers.MeanReducer(), "mean"),
        (reducers.AvgNonZeroReducer(), "mean_nonzero"),
    ]:
        loss_fn = losses.TripletMarginLoss(margin=margin, distance=dist, reducer=reducer)
        theirs = pml_value_and_grad(loss_fn, miners.BatchHardMiner(distance=dist), x, y)
        ours = ours_value_and_grad(
            lambda e, r=reduction: triplet_loss(
                e, y, margin=margin, mining="batch_hard", squared=squared, reduction=r
            ),
            x,
        )
        assert_parity("triplet batch_hard", ours, theirs)


@pytest.mark.parametrize("squared", [False, True])
@pytest.mark.parametrize("margin", [0.2, 1.0])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_semihard_band(squared, margin, seed):
    x, y = random_batch(seed, batch=32, dim=8, classes=8, scale=0.5)
    dist = distances.LpDistance(normalize_embeddings=False, power=2 if squared else 1)
    miner = miners.TripletMarginMiner(margin=margin, type_of_triplets="semihard", distance=dist)
    for reducer, reduction in [
        (reducers.MeanReducer(), "mean"),
        (reducers.AvgNonZeroReducer(), "mean_nonzero"),
    ]:
        loss_fn = losses.TripletMarginLoss(margin=margin, distance=dist, reducer=reducer)
        theirs = pml_value_and_grad(loss_fn, miner, x, y)
        ours = ours_value_and_grad(
            lambda e, r=reduction: triplet_loss(
                e, y, margin=margin, mining="semihard_band", squared=squared, reduction=r
            ),
            x,
        )
        assert_parity("triplet semihard_band", ours, theirs)


@pytest.mark.parametrize("soft", [False, True])
@pytest.mark.parametrize("seed", [0, 1])
def test_all_triplets(soft, seed):
    x, y = random_batch(seed, batch=24, dim=8, classes=6, scale=0.5)
    dist = distances.LpDistance(normalize_embeddings=False)
    loss_fn = losses.TripletMarginLoss(
        margin=0.3, distance=dist, smooth_loss=soft, reducer=reducers.MeanReducer()
    )
    theirs = pml_value_and_grad(loss_fn, None, x, y)
    ours = ours_value_and_grad(
        lambda e: triplet_loss(e, y, margin=0.3, mining="all", squared=False, soft=soft), x
    )
    assert_parity("triplet all" + (" soft" if soft else ""), ours, theirs)


def test_report_largest_errors():
    """Runs last in this module; prints the largest parity error per loss (-s to see it)."""
    if not LARGEST_ERRORS:
        pytest.skip("run the whole module: the comparisons above record the errors")
    for name, err in sorted(LARGEST_ERRORS.items()):
        print(f"PARITY {name}: largest error {err:.2e}")
    assert max(LARGEST_ERRORS.values()) < 1e-5
