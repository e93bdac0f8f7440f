"""Large-margin softmax, L-Softmax (Liu, Wen, Yu & Yang 2016, "Large-Margin Softmax Loss for
Convolutional Neural Networks", ICML).

The softmax over the logits W_jᵀx = ‖W_j‖‖x‖cos θ_j of a bias-free linear layer, with the
target class's cos θ_y replaced by ψ(θ_y), a multiplicative angular margin. Unlike SphereFace
(:func:`~mlx_jax.losses.margin_softmax.sphereface_loss`, the same ψ) neither the features nor
the class weights are normalized, so the class-weight norms stay in the logits.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mlx_jax import _checks, reductions
from mlx_jax.blockwise import check_block_size
from mlx_jax.distances import HIGHEST, l2_normalize, safe_sqrt
from mlx_jax.losses import class_blocks
from mlx_jax.losses._common import prepare_batch
from mlx_jax.losses.margin_softmax import (
    integer_margin,
    margin_cross_entropy,
    multiplicative_margin_psi,
)

__all__ = ["large_margin_softmax_loss"]


def large_margin_softmax_loss(
    embeddings: jax.Array,
    labels: jax.Array,
    class_weights: jax.Array,
    *,
    margin: int = 4,
    scale: float = 1.0,
    annealing_lambda: float = 0.0,
    weights: jax.Array | None = None,
    reduction: reductions.Reduction = "mean",
    class_block_size: int | None = None,
) -> jax.Array:
    """L-Softmax (Liu et al. 2016, Eqs. 4–7)::

        ψ(θ) = (−1)^k·cos(mθ) − 2k,   θ ∈ [kπ/m, (k+1)π/m],  k ∈ {0, …, m − 1}
        f_j = s·W_jᵀx = s·‖W_j‖‖x‖·cos θ_j                          (j ≠ y)
        f_y = s·‖W_y‖‖x‖·(λ·cos θ_y + ψ(θ_y)) / (1 + λ)
        L_i = −log( e^{f_y} / Σ_j e^{f_j} )

    with the class weights W [D, C] and features x used as they are (not normalized). With
    s = 1 and λ = 0 this is the paper's Eq. 4 with Eq. 6's ψ; m = 1 is the plain softmax of the
    linear layer's logits x·W. cos(mθ) is the Chebyshev polynomial T_m(cos θ) (the paper's
    multiple-angle formula, Eq. 7) and k is computed without gradient, so cos θ_y = ±1 has
    finite gradients. λ blends in the plain logit as in the paper's training (a large λ
    decreased towards 0; the authors' Caffe layer uses
    λ = max(λ_min, base·(1 + γ·iteration)^(−power)), which
    :func:`~mlx_jax.losses.margin_softmax.sphereface_lambda` computes with their arguments,
    e.g. ``base=1000, gamma=0.000025, power=35, minimum=0`` for their MNIST example).

    Equals pytorch-metric-learning's ``LargeMarginSoftmaxLoss(num_classes=C,
    embedding_size=D, margin=m, scale=s)`` (default ``MeanReducer``, ``W`` = ``class_weights``;
    PML has no λ), value and gradients: PML computes cos θ from normalized vectors, ψ from the
    same multiple-angle formula and k, and multiplies the logits by ‖W_j‖‖x‖·s.

    Degenerate inputs: a zero-norm embedding or class weight makes its logits 0 (finite
    gradients); cos θ_y = 1 gives ψ = 1 and cos θ_y = −1 gives ψ = 1 − 2m; a one-class problem
    (C = 1) has loss 0 with zero gradients; all weights zero give 0.

    Args:
      embeddings: [B, D] float (any float dtype; computed in at least float32); not normalized.
      labels: [B] int class ids in ``[0, C)`` (checked when concrete; NaN loss under ``jit``).
      class_weights: [D, C] float, a bias-free Flax ``Dense`` kernel; not normalized.
      margin: the integer m >= 1 (a static Python int); default 4 (PML's default and the
        largest margin of the paper's experiments, whose best results it gives).
      scale: s > 0 multiplying every logit; default 1 (the paper has no scale; PML's default).
      annealing_lambda: λ >= 0; default 0 (the loss itself, the end of the paper's annealing).
      weights: optional [B] per-sample weights (None → ones; zero excludes a sample).
      reduction: see :mod:`mlx_jax.reductions`; default ``"mean"`` (the paper's batch mean and
        PML's ``MeanReducer``). ``"none"`` returns the [B] weighted per-sample losses.
      class_block_size: None (default) forms the [B, C] logits at once; an int visits the
        classes in blocks of that many (:mod:`mlx_jax.losses.class_blocks`, with the raw
        features and weights in place of the normalized ones): memory O(B·class_block_size)
        instead of O(B·C), same value and gradients (reverse mode).

    Returns:
      float32 (or wider) scalar, or [B] for ``reduction="none"``.
    """
    m = integer_margin(margin)
    _checks.positive(scale, "scale")
    _checks.non_negative(annealing_lambda, "annealing_lambda")
    reductions.check_reduction(reduction)
    class_block_size = check_block_size(class_block_size, "class_block_size")
    x = _checks.embeddings_array(embeddings)
    w = _checks.class_weights_array(class_weights, x.shape[1])
    if w.shape[1] < 1:
        raise ValueError(
            f"class_weights must have shape [{x.shape[1]}, num_classes] with num_classes >= 1, "
            f"got shape {tuple(w.shape)}"
        )
    batch = prepare_batch(x, labels, weights, num_classes=w.shape[1])
    x, w = _checks.promote_all(batch.embeddings, w)
    y, sample_w = batch.labels, batch.weights.astype(x.dtype)

    # target logit / s: ‖W_y‖‖x‖·ψ(θ_y); the other logits / s are x·W_j, so the blocks take the
    # raw x and W where the normalized heads take x̂ and ŵ, with the fixed row scale s
    cos_y = class_blocks.target_cosines(l2_normalize(x, axis=1), l2_normalize(w, axis=0), y)
    penalized = (annealing_lambda * cos_y + multiplicative_margin_psi(cos_y, m)) / (
        1.0 + annealing_lambda
    )
    x_norm = safe_sqrt(jnp.sum(x * x, axis=1))
    w_norm_y = _checks.gather_rows(safe_sqrt(jnp.sum(w * w, axis=0)), y)
    target = x_norm * w_norm_y * penalized
    row_scale = jnp.broadcast_to(jnp.asarray(scale, x.dtype), y.shape)
    if class_block_size is None or class_block_size >= w.shape[1]:
        logits = jnp.matmul(x, w, precision=HIGHEST)
        terms = margin_cross_entropy(logits, target, y, row_scale)
    else:
        terms = class_blocks.blockwise_margin_cross_entropy(
            x, w, target, y, row_scale, class_block_size
        )
    return reductions.reduce_weighted(terms, sample_w, reduction)
