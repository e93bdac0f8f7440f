"""Bad input to every loss over (embeddings, labels) raises at trace time, naming the argument."""

import functools

import jax
import numpy as np
import pytest

from mlx_jax import losses as L

X = np.ones((4, 2), np.float32)
Y = np.zeros(4, np.int32)
CENTERS = np.zeros((3, 2), np.float32)
KERNEL = np.ones((2, 3), np.float32)

LOSSES = {
    "contrastive": L.contrastive_loss,
    "siamese": L.siamese_cosine_loss,
    "circle": L.circle_loss,
    "triplet": L.triplet_loss,
    "center": functools.partial(L.center_loss, centers=CENTERS),
    "standalone": functools.partial(L.standalone_center_loss, centers=CENTERS),
    "triplet_center": functools.partial(L.triplet_center_loss, centers=CENTERS, margin=1.0),
    "arcface": functools.partial(L.arcface_loss, class_weights=KERNEL),
    "cosface": functools.partial(L.cosface_loss, class_weights=KERNEL),
    "sphereface": functools.partial(L.sphereface_loss, class_weights=KERNEL),
    "multi_similarity": L.multi_similarity_loss,
    "ntxent": L.ntxent_loss,
    "supcon": L.supcon_loss,
    "lifted_structure": L.lifted_structure_loss,
    "generalized_lifted_structure": L.generalized_lifted_structure_loss,
    "npairs": L.npairs_loss,
    "angular": L.angular_loss,
    "margin": functools.partial(L.margin_loss, beta=np.float32(1.2)),
    "tuplet_margin": L.tuplet_margin_loss,
    "fast_ap": L.fast_ap_loss,
    "proxy_anchor": functools.partial(L.proxy_anchor_loss, proxies=KERNEL),
    "proxy_nca": functools.partial(L.proxy_nca_loss, proxies=KERNEL),
    "normalized_softmax": functools.partial(L.normalized_softmax_loss, class_weights=KERNEL),
    "soft_triple": functools.partial(
        L.soft_triple_loss, centers=np.ones((2, 6), np.float32), centers_per_class=2
    ),
    "sub_center_arcface": functools.partial(
        L.sub_center_arcface_loss, class_weights=np.ones((2, 6), np.float32), sub_centers=2
    ),
    "large_margin_softmax": functools.partial(L.large_margin_softmax_loss, class_weights=KERNEL),
}

CASES = [
    ((np.ones((4,), np.float32), Y), ValueError, r"embeddings must have shape \[batch, dim\]"),
    ((np.ones((4, 2, 1), np.float32), Y), ValueError, r"embeddings must have shape \[batch, dim\]"),
    ((X, np.zeros(3, np.int32)), ValueError, r"labels must have shape \[4\]"),
    ((X, np.zeros(4, np.float32)), TypeError, "labels must be an integer"),
    ((np.ones((4, 2), np.int32), Y), TypeError, "embeddings must be a floating"),
    ((np.ones((0, 2), np.float32), np.zeros(0, np.int32)), ValueError, "batch, dim >= 1"),
]


@pytest.mark.parametrize("name", sorted(LOSSES))
@pytest.mark.parametrize("args, error, match", CASES)
def test_bad_input_raises_at_trace_time(name, args, error, match):
    with pytest.raises(error, match=match):
        jax.jit(LOSSES[name]).lower(*args)


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_weights_of_the_wrong_shape(name):
    with pytest.raises(ValueError, match=r"weights must have shape \[4\]"):
        jax.jit(LOSSES[name]).lower(X, Y, weights=np.ones(3, np.float32))


@pytest.mark.parametrize("name", ["arcface", "cosface", "sphereface"])
def test_class_weights_of_the_wrong_shape(name):
    fn = getattr(L, f"{name}_loss")
    with pytest.raises(ValueError, match=r"class_weights must have shape \[2, num_classes\]"):
        jax.jit(fn).lower(X, Y, np.ones((3, 3), np.float32))
