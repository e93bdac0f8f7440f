"""Random image augmentation inside the jitted train step: shifts and horizontal flips.

Each step draws its randomness from ``jax.random.fold_in(key(seed), step)``, so a resumed run
sees the same augmented batches as an uninterrupted one.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

AUGMENTATIONS = ("none", "shift", "shift-flip")


def augment(images: jax.Array, key: jax.Array, kind: str, max_shift: int = 2) -> jax.Array:
    """Randomly shifts (and mirrors) each image of a batch.

    - ``shift``: image ``i`` moves by ``(dy_i, dx_i)``, each drawn uniformly from
      ``[-max_shift, max_shift]``; vacated pixels are 0 — the background of MNIST-like digits
      and clothes, and the zero padding of CIFAR's pad-and-crop (He et al. 2016, §4.2: 4 px).
    - ``shift-flip``: as ``shift``, then each image is mirrored left-right with probability 1/2
      (right for clothes and CIFAR's objects, wrong for digits).
    - ``none``: the batch unchanged.

    Args:
      images: [B, H, W, C] floats.
      key: a JAX PRNG key.
      kind: one of :data:`AUGMENTATIONS`.
      max_shift: largest shift in pixels, ``0 <= max_shift < min(H, W)``.

    Returns:
      [B, H, W, C], same dtype.
    """
    if kind not in AUGMENTATIONS:
        raise ValueError(f"kind must be one of {AUGMENTATIONS}, got {kind!r}")
    if images.ndim != 4:
        raise ValueError(f"images must have shape [B, H, W, C], got {images.shape}")
    _, height, width, channels = images.shape
    if not 0 <= max_shift < min(height, width):
        raise ValueError(f"max_shift must be in [0, {min(height, width)}), got {max_shift}")
    if kind == "none":
        return images
    shift_key, flip_key = jax.random.split(key)
    m = max_shift
    padded = jnp.pad(images, ((0, 0), (m, m), (m, m), (0, 0)))
    # Crop offset o in [0, 2m] moves the image by m - o.
    offsets = jax.random.randint(shift_key, (images.shape[0], 2), 0, 2 * m + 1)

    def crop(image, offset):
        return lax.dynamic_slice(image, (offset[0], offset[1], 0), (height, width, channels))

    out = jax.vmap(crop)(padded, offsets)
    if kind == "shift-flip":
        flip = jax.random.bernoulli(flip_key, 0.5, (images.shape[0],))
        out = jnp.where(flip[:, None, None, None], out[:, :, ::-1, :], out)
    return out
