"""Thin Flax NNX layers for users who want modules: they hold state, the math lives elsewhere.

* :class:`ClassWeights` — the [D, C] class-weight matrix of the margin-softmax losses
  (SphereFace/CosFace/ArcFace), an ``nnx.Param``; calling it gives cosine logits.
* :class:`CenterStore` — class centers [C, D] kept as :class:`Centers`, a *non-parameter*
  ``nnx.Variable``: ``nnx.Optimizer(..., wrt=nnx.Param)`` leaves them alone and
  :meth:`CenterStore.update` moves them by the Center Loss α rule
  (:func:`mlx_jax.centers.update_centers`). With ``trainable=True`` the centers are an
  ``nnx.Param`` instead, trained by gradient (pytorch-center-loss's variant).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from mlx_jax.centers import update_centers
from mlx_jax.losses.margin_softmax import cosine_logits


class Centers(nnx.Variable):
    """Class centers updated outside the gradient (the α rule); not an ``nnx.Param``."""


class ClassWeights(nnx.Module):
    """Class weights W [dim, num_classes·per_class] for margin-softmax and proxy losses.

    Glorot-normal initialised; the losses normalize each column, so only directions matter.
    ``per_class`` > 1 holds several columns per class in class-major order (column c·K + k is
    sub-center / center k of class c), as Sub-center ArcFace and SoftTriple use them.
    """

    def __init__(self, dim: int, num_classes: int, *, per_class: int = 1, rngs: nnx.Rngs):
        init = jax.nn.initializers.glorot_normal()
        self.per_class = per_class
        shape = (dim, num_classes * per_class)
        self.kernel = nnx.Param(init(rngs.params(), shape, jnp.float32))

    def __call__(self, embeddings: jax.Array) -> jax.Array:
        """cos θ [B, C] between L2-normalized embeddings and L2-normalized class columns (the
        largest over a class's ``per_class`` columns)."""
        cosines = cosine_logits(embeddings, self.kernel[...])
        if self.per_class == 1:
            return cosines
        return jnp.max(cosines.reshape(cosines.shape[0], -1, self.per_class), axis=2)

    def logits(self, embeddings: jax.Array) -> jax.Array:
        """x·W [B, C]: the linear logits (L-Softmax predicts by them); ``per_class`` must be 1."""
        if self.per_class != 1:
            raise ValueError("linear logits need one column per class (per_class = 1)")
        return embeddings @ self.kernel[...]


class CenterStore(nnx.Module):
    """Class centers [num_classes, dim], zero-initialised as in Wen et al.'s Caffe layer
    (``center_filler`` constant) unless ``rngs`` is given (then standard normal, as
    pytorch-center-loss)."""

    def __init__(
        self,
        num_classes: int,
        dim: int,
        *,
        trainable: bool = False,
        rngs: nnx.Rngs | None = None,
    ):
        if rngs is None:
            value = jnp.zeros((num_classes, dim), jnp.float32)
        else:
            value = jax.random.normal(rngs.params(), (num_classes, dim), jnp.float32)
        self.trainable = trainable
        self.centers = nnx.Param(value) if trainable else Centers(value)

    def __call__(self) -> jax.Array:
        return self.centers[...]

    def update(
        self,
        embeddings: jax.Array,
        labels: jax.Array,
        alpha: float | jax.Array,
        *,
        weights: jax.Array | None = None,
        axis_name: str | None = None,
    ) -> None:
        """Applies the α rule in place (Wen et al. 2016, Eq. 4). No-op for trainable centers.

        ``axis_name``: the batch-sharded axis inside ``jax.shard_map``; the per-class
        statistics are summed over it (see :func:`mlx_jax.centers.update_centers`)."""
        if self.trainable:
            return
        self.centers[...] = update_centers(
            self.centers[...], embeddings, labels, alpha, weights=weights, axis_name=axis_name
        )
