import chex
import hypothesis.strategies as st
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given

from mlx_jax import mining
from mlx_jax.distances import pairwise_distances
from tests.helpers import random_batch


def test_pair_masks_and_triplet_mask_against_loops():
    _, y = random_batch(0, batch=9, classes=3)
    valid = np.array([1, 1, 0, 1, 1, 1, 1, 0, 1], bool)
    pos, neg = mining.pair_masks(jnp.asarray(y), jnp.asarray(valid))
    trip = mining.triplet_mask(jnp.asarray(y), jnp.asarray(valid))
    for a in range(9):
        for b in range(9):
            both = valid[a] and valid[b]
            assert bool(pos[a, b]) == (both and a != b and y[a] == y[b])
            assert bool(neg[a, b]) == (both and y[a] != y[b])
            for c in range(9):
                assert bool(trip[a, b, c]) == bool(pos[a, b] and neg[a, c])


def test_batch_hard_against_loops():
    x, y = random_batch(1, batch=10, classes=3)
    d = np.asarray(pairwise_distances(x))
    hard = mining.batch_hard(jnp.asarray(d), jnp.asarray(y))
    for a in range(10):
        pos = [p for p in range(10) if p != a and y[p] == y[a]]
        neg = [n for n in range(10) if y[n] != y[a]]
        assert bool(hard.valid[a])
        assert int(hard.positive[a]) == max(pos, key=lambda p: d[a, p])
        assert int(hard.negative[a]) == min(neg, key=lambda n: d[a, n])


def test_batch_hard_marks_anchor_without_positive_invalid():
    d = jnp.asarray(np.random.default_rng(0).random((4, 4)), jnp.float32)
    hard = mining.batch_hard(d, jnp.asarray([0, 0, 1, 2]))
    np.testing.assert_array_equal(hard.valid, [True, True, False, False])


@given(seed=st.integers(0, 100_000))
def test_semihard_negatives_against_brute_force(seed):
    x, y = random_batch(seed, batch=12, dim=2, classes=3)
    d = np.asarray(pairwise_distances(x))
    for fallback in ["farthest", "drop"]:
        neg, ok = mining.semihard_negatives(jnp.asarray(d), jnp.asarray(y), fallback=fallback)
        for a in range(12):
            for p in range(12):
                if p == a or y[p] != y[a]:
                    assert not bool(ok[a, p])
                    continue
                negs = [n for n in range(12) if y[n] != y[a]]
                farther = [n for n in negs if d[a, n] > d[a, p]]
                if farther:
                    assert bool(ok[a, p])
                    assert d[a, int(neg[a, p])] == min(d[a, n] for n in farther)
                elif fallback == "farthest":
                    assert bool(ok[a, p])
                    assert d[a, int(neg[a, p])] == max(d[a, n] for n in negs)
                else:
                    assert not bool(ok[a, p])


def test_semihard_requires_strictly_farther_negative():
    # Ties d_an == d_ap are not semi-hard (FaceNet: d_ap < d_an).
    d = jnp.asarray([[0.0, 1.0, 1.0, 2.0], [1.0, 0, 3, 3], [1.0, 3, 0, 3], [2.0, 3, 3, 0]])
    neg, ok = mining.semihard_negatives(d, jnp.asarray([0, 0, 1, 1]))
    assert bool(ok[0, 1]) and int(neg[0, 1]) == 3


def test_negatives_in_interval_against_loops():
    x, y = random_batch(2, batch=10, classes=2)
    d = np.asarray(pairwise_distances(x))
    _, negative = mining.pair_masks(jnp.asarray(y))
    sorted_negatives = mining.sort_negatives(jnp.asarray(d), negative)
    low = jnp.asarray(d)
    high = low + 1.5
    count, total = mining.negatives_in_interval(sorted_negatives, low, high)
    for a in range(10):
        for k in range(10):
            chosen = [
                d[a, n] for n in range(10) if y[n] != y[a] and d[a, k] < d[a, n] <= d[a, k] + 1.5
            ]
            assert int(count[a, k]) == len(chosen)
            np.testing.assert_allclose(float(total[a, k]), sum(chosen), rtol=1e-5, atol=1e-5)


class TestVariants(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_semihard_jit_and_eager_agree(self):
        x, y = random_batch(3, batch=16, classes=4)
        d = pairwise_distances(x)
        neg, ok = self.variant(mining.semihard_negatives)(d, y)
        neg_ref, ok_ref = mining.semihard_negatives(d, y)
        np.testing.assert_array_equal(ok, ok_ref)
        np.testing.assert_array_equal(np.where(ok, neg, -1), np.where(ok_ref, neg_ref, -1))


def test_bad_fallback():
    with pytest.raises(ValueError, match="fallback must be"):
        mining.semihard_negatives(jnp.zeros((2, 2)), jnp.zeros(2, jnp.int32), fallback="hardest")
