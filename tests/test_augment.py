"""Training-batch augmentation: every output is a shifted (and maybe mirrored) copy of its input."""

from __future__ import annotations

import itertools

import jax
import numpy as np
import pytest

from experiments.augment import augment


def shifted(image: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """Plain reference: image moved by (dy, dx), vacated pixels 0."""
    h, w, _ = image.shape
    out = np.zeros_like(image)
    for r, c in itertools.product(range(h), range(w)):
        if 0 <= r - dy < h and 0 <= c - dx < w:
            out[r, c] = image[r - dy, c - dx]
    return out


def explain(original: np.ndarray, result: np.ndarray, max_shift: int, flips: bool):
    """The (dy, dx, flipped) that turn ``original`` into ``result``, or None."""
    for flipped in (False, True) if flips else (False,):
        for dy, dx in itertools.product(range(-max_shift, max_shift + 1), repeat=2):
            candidate = shifted(original, dy, dx)
            if flipped:
                candidate = candidate[:, ::-1]
            if np.array_equal(candidate, result):
                return dy, dx, flipped
    return None


@pytest.mark.parametrize("kind", ["shift", "shift-flip"])
def test_each_image_is_a_shifted_or_mirrored_copy_and_all_moves_occur(kind):
    rng = np.random.default_rng(0)
    images = rng.uniform(0.1, 1.0, (200, 9, 7, 2)).astype(np.float32)  # no zeros: moves show
    out = np.asarray(jax.jit(augment, static_argnums=(2, 3))(images, jax.random.key(3), kind, 2))
    assert out.shape == images.shape and out.dtype == images.dtype
    moves = [explain(a, b, 2, kind == "shift-flip") for a, b in zip(images, out, strict=True)]
    assert None not in moves
    assert {(dy, dx) for dy, dx, _ in moves} == set(itertools.product(range(-2, 3), repeat=2))
    flipped = sum(f for _, _, f in moves)
    assert (flipped == 0) if kind == "shift" else (60 < flipped < 140)


def test_same_key_same_batch_other_key_other_batch_none_is_identity():
    images = np.random.default_rng(1).uniform(size=(16, 28, 28, 1)).astype(np.float32)
    a = augment(images, jax.random.key(0), "shift-flip")
    np.testing.assert_array_equal(a, augment(images, jax.random.key(0), "shift-flip"))
    assert not np.array_equal(a, augment(images, jax.random.key(1), "shift-flip"))
    np.testing.assert_array_equal(augment(images, jax.random.key(0), "none"), images)
    np.testing.assert_array_equal(augment(images, jax.random.key(0), "shift", 0), images)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"kind": "rotate"}, "kind must be one of"),
        ({"kind": "shift", "max_shift": 5}, r"max_shift must be in \[0, 5\)"),
        ({"kind": "shift", "max_shift": -1}, "max_shift must be"),
    ],
)
def test_bad_arguments_are_named(kwargs, match):
    images = np.zeros((2, 5, 6, 1), np.float32)
    with pytest.raises(ValueError, match=match):
        augment(images, jax.random.key(0), **kwargs)
    with pytest.raises(ValueError, match=r"images must have shape \[B, H, W, C\]"):
        augment(images[0], jax.random.key(0), "shift")
