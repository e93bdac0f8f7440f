"""SoftTriple loss: a softmax over classes that each have several centers (Qian, Shang, Sun, Hu,
Li & Jin 2019, "SoftTriple Loss: Deep Metric Learning Without Triplet Sampling", ICCV).

The centers are an explicit parameter ``centers`` [D, C·K] (like the class weights [D, C] of
:mod:`mlx_jax.losses.margin_softmax`), K = ``centers_per_class``, in class-major column layout:
column c·K + k holds center k of class c, i.e. ``centers.reshape(D, C, K)[:, c, k]``. This is the
layout of pytorch-metric-learning's ``SoftTripleLoss.fc`` and of the authors' released code
(idstcv/SoftTriple), so their weights load unchanged. :func:`soft_triple_centers` initializes
them as both do.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from mlx_jax import _checks, reductions
from mlx_jax.blockwise import check_block_size
from mlx_jax.distances import HIGHEST, l2_normalize, safe_sqrt
from mlx_jax.losses._common import prepare_batch
from mlx_jax.losses.softmax import cross_entropy_terms, target_mask

__all__ = ["soft_triple_centers", "soft_triple_loss", "soft_triple_regularizer"]

_SCALAR_REDUCTIONS = ("mean", "sum", "mean_nonzero")


def soft_triple_centers(
    key: jax.Array,
    dim: int,
    num_classes: int,
    centers_per_class: int = 10,
    *,
    dtype=jnp.float32,
) -> jax.Array:
    """Initial centers [dim, num_classes·centers_per_class] for :func:`soft_triple_loss`.

    Uniform on [−1/√(C·K), 1/√(C·K)]: ``torch.nn.init.kaiming_uniform_(a=√5)`` of a
    [dim, C·K] tensor (its fan-in is C·K), the initialization of the authors' code and of
    pytorch-metric-learning's ``SoftTripleLoss``. The loss normalizes each column, so only the
    directions matter: independent uniform columns are distinct centers almost surely.
    """
    dim = _checks.positive_int(dim, "dim")
    num_classes = _checks.positive_int(num_classes, "num_classes")
    per_class = _checks.positive_int(centers_per_class, "centers_per_class")
    bound = 1.0 / np.sqrt(num_classes * per_class)
    shape = (dim, num_classes * per_class)
    return jax.random.uniform(key, shape, dtype, minval=-bound, maxval=bound)


def _check_centers(centers, dim: int, per_class: int) -> jax.Array:
    """``centers`` [dim, C·K] float with C >= 1 → compute dtype."""
    w = _checks.float_array(centers, "centers", 2, f"[{dim}, num_classes * centers_per_class]")
    if w.shape[0] != dim or w.shape[1] < per_class or w.shape[1] % per_class:
        raise ValueError(
            f"centers must have shape [{dim}, num_classes * centers_per_class] with "
            f"centers_per_class = {per_class} and num_classes >= 1 (class-major columns), "
            f"got shape {list(w.shape)}"
        )
    return w


def _unit_centers(w: jax.Array, per_class: int) -> jax.Array:
    """Columns L2-normalized and split by class: [D, C, K]."""
    return l2_normalize(w, axis=0).reshape(w.shape[0], -1, per_class)


def _relaxed_similarity(cosines: jax.Array, gamma, axis: int = -1) -> jax.Array:
    """S' = Σ_k softmax_k(cos_k / γ)·cos_k over the centers' ``axis`` (Eq. 8)."""
    return _relaxed(cosines, jnp.asarray(gamma, cosines.dtype), axis)


# A hand-written VJP: with p_k = softmax_k(cos_k / γ), ∂S'/∂cos_k = p_k·(1 + (cos_k − S')/γ) and
# ∂S'/∂γ = −Σ_k p_k·(cos_k − S')²/γ², one pass over the [B, K, C] cosines in the backward pass
# where autodiff of the softmax makes several (docs/notes.md, speed targets).
# Reverse mode only: jax.jvp through it raises, as for the margin heads.
@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _relaxed(cosines: jax.Array, gamma: jax.Array, axis: int) -> jax.Array:
    return _relaxed_forward(cosines, gamma, axis)[0]


def _relaxed_forward(cosines, gamma, axis):
    peak = jnp.max(cosines, axis=axis, keepdims=True)  # max-subtracted: any γ is safe
    exps = jnp.exp((cosines - peak) / gamma)
    total = jnp.sum(exps, axis=axis)
    similarity = jnp.sum(exps * cosines, axis=axis) / total
    return similarity, (cosines, gamma, peak, total, similarity)


def _relaxed_backward(axis, residuals, grad):
    cosines, gamma, peak, total, similarity = residuals
    weight = jnp.expand_dims(grad / total, axis) * jnp.exp((cosines - peak) / gamma)  # g·p_k
    centered = cosines - jnp.expand_dims(similarity, axis)
    grad_gamma = -jnp.sum(weight * centered * centered) / (gamma * gamma)
    return weight * (1.0 + centered / gamma), grad_gamma.astype(gamma.dtype)


_relaxed.defvjp(_relaxed_forward, _relaxed_backward)


def _class_similarities(x_hat: jax.Array, w_hat: jax.Array, gamma) -> jax.Array:
    """S'_{i,c} [B, C] of unit rows x̂ [B, D] and unit centers ŵ [D, C, K].

    The centers are reordered center-major ([D, K, C], a copy of W) so the matmul yields
    [B, K, C] cosines and the softmax over a class's K centers runs over a major axis: XLA:CPU
    takes 1.7–2.8× longer over a minor axis of length K."""
    dim, num_classes, per_class = w_hat.shape
    k_major = w_hat.transpose(0, 2, 1).reshape(dim, per_class * num_classes)
    cosines = jnp.matmul(x_hat, k_major, precision=HIGHEST)
    return _relaxed_similarity(cosines.reshape(-1, per_class, num_classes), gamma, axis=1)


def _target_similarity(x_hat, w_hat, labels, gamma) -> jax.Array:
    """S'_{i, y_i} [B] from a gather of the label's K centers (O(B·D·K)); NaN for a label
    outside ``[0, C)`` (negative labels must not wrap)."""
    num_classes = w_hat.shape[1]
    index = jnp.where(labels < 0, num_classes, labels)
    own = jnp.take(w_hat, index, axis=1, mode="fill", fill_value=jnp.nan)  # [D, B, K]
    return _relaxed_similarity(jnp.einsum("bd,dbk->bk", x_hat, own, precision=HIGHEST), gamma)


def _dense_terms(x_hat, w_hat, labels, la, gamma, margin) -> jax.Array:
    """Per-sample cross-entropy [B] from the whole [B, C] relaxed-similarity matrix."""
    similarity = _class_similarities(x_hat, w_hat, gamma)
    logits = la * (similarity - margin * target_mask(labels, w_hat.shape[1]))
    return cross_entropy_terms(logits, labels)


def _blockwise_terms(x_hat, w_hat, labels, la, gamma, margin, class_block_size) -> jax.Array:
    """The same [B] terms, visiting the classes in blocks of ``class_block_size``.

    Each block's log-sum-exp [B] is computed from a [B, block, K] tile under
    ``jax.checkpoint`` (the backward pass recomputes the tile instead of storing it), and the
    blocks' log-sum-exps are combined at the end: O(B·block·K + B·C/block) memory, no [B, C]
    array. (:mod:`mlx_jax.losses.class_blocks` cannot be reused: its hand-written VJP assumes
    each logit is one cosine x̂·ŵ_c, while a SoftTriple logit mixes K of them.)"""
    dim, num_classes, per_class = w_hat.shape
    num_blocks = -(-num_classes // class_block_size)
    padded = jnp.pad(w_hat, ((0, 0), (0, num_blocks * class_block_size - num_classes), (0, 0)))
    blocks = padded.reshape(dim, num_blocks, class_block_size, per_class).transpose(1, 0, 2, 3)

    def block_logsumexp(inputs):
        start, w_block = inputs
        similarity = _class_similarities(x_hat, w_block, gamma)
        classes = start + jnp.arange(class_block_size, dtype=labels.dtype)
        is_target = labels[:, None] == classes[None, :]
        logits = la * (similarity - margin * is_target)
        # padding classes (past C, only in the last block) take no part in the softmax
        logits = jnp.where((classes < num_classes)[None, :], logits, -jnp.inf)
        return jax.nn.logsumexp(logits, axis=1)

    starts = jnp.arange(num_blocks, dtype=labels.dtype) * class_block_size
    per_block = jax.lax.map(jax.checkpoint(block_logsumexp), (starts, blocks))  # [blocks, B]
    target = la * (_target_similarity(x_hat, w_hat, labels, gamma) - margin)
    return jax.nn.logsumexp(per_block, axis=0) - target


def _regularizer(w_hat: jax.Array) -> jax.Array:
    """Σ_c Σ_{k<k'} √(2 − 2·ŵ_c^k·ŵ_c^k') / (C·K·(K − 1)) of unit centers [D, C, K]."""
    _, num_classes, per_class = w_hat.shape
    if per_class == 1:
        return jnp.zeros((), w_hat.dtype)
    gram = jnp.einsum("dck,dcl->ckl", w_hat, w_hat, precision=HIGHEST)  # [C, K, K]
    # cos <= 1 as PML clamps it; a square root with derivative 0 (not ∞) at coincident centers
    distance = safe_sqrt(2.0 - 2.0 * jnp.minimum(gram, 1.0))
    upper = np.triu(np.ones((per_class, per_class), bool), k=1)
    total = jnp.sum(jnp.where(upper, distance, 0.0))
    return total / (num_classes * per_class * (per_class - 1))


def soft_triple_regularizer(centers: jax.Array, *, centers_per_class: int = 10) -> jax.Array:
    """SoftTriple's center regularizer (Qian et al. 2019, Eq. 12–13, without the τ)::

        R = Σ_c Σ_{k<k'} ‖ŵ_c^k − ŵ_c^k'‖ / (C·K·(K − 1)),   ‖ŵ − ŵ'‖ = √(2 − 2·ŵ·ŵ')

    over the L2-normalized centers of each class: the L2,1 norm that lets similar centers of a
    class merge, so a class keeps only the centers it needs. 0 for K = 1 (no pair).

    Equal to pytorch-metric-learning's ``SparseCentersRegularizer(C, K)`` applied to
    ``centers.T`` (``SoftTripleLoss(..., weight_regularizer=...)`` does so to its ``fc``).
    PML adds the smallest normal float under the root and the authors' code adds 1e-5; the
    former rounds away (2 + tiny == 2) and the latter shifts the value, so neither is added
    here. Coincident centers (distance exactly 0) get a zero gradient instead of PML's
    infinite one; near-coincident ones have the true, large gradient of the distance.

    Args:
      centers: [D, C·K] float, class-major columns (see the module docstring).
      centers_per_class: K >= 1; default 10 (the paper's K).

    Returns:
      scalar in the compute dtype (at least float32).
    """
    per_class = _checks.positive_int(centers_per_class, "centers_per_class")
    w = _checks.float_array(centers, "centers", 2, "[dim, num_classes * centers_per_class]")
    w = _check_centers(w, w.shape[0], per_class)
    return _regularizer(_unit_centers(w, per_class))


def soft_triple_loss(
    embeddings: jax.Array,
    labels: jax.Array,
    centers: jax.Array,
    *,
    centers_per_class: int = 10,
    la: float = 20.0,
    gamma: float = 0.1,
    margin: float = 0.01,
    tau: float = 0.2,
    weights: jax.Array | None = None,
    reduction: reductions.Reduction = "mean",
    class_block_size: int | None = None,
) -> jax.Array:
    """SoftTriple loss: softmax cross-entropy over classes, each represented by K centers.

    With x̂_i the L2-normalized embedding and ŵ_c^k the L2-normalized centers, the relaxed
    similarity of sample i to class c is a softmax-weighted mean of its K cosines (Qian et al.
    2019, Eq. 8)::

        S'_{i,c} = Σ_k exp(x̂_i·ŵ_c^k / γ) / Σ_k' exp(x̂_i·ŵ_c^k' / γ) · x̂_i·ŵ_c^k

    and the per-sample loss is the cross-entropy with scale λ and margin δ on the target (Eq. 9)::

        ℓ_i = −log( exp(λ(S'_{i,y_i} − δ)) /
                    (exp(λ(S'_{i,y_i} − δ)) + Σ_{c≠y_i} exp(λ·S'_{i,c})) )

    The objective adds τ times the center regularizer :func:`soft_triple_regularizer` (Eq. 13)::

        L = 1/N Σ_i ℓ_i + τ · Σ_c Σ_{k<k'} √(2 − 2·ŵ_c^k·ŵ_c^k') / (C·K·(K − 1))

    K = 1 is the normalized softmax with margin (no regularizer: a class has no pair of
    centers). Both softmaxes are max-subtracted, so any λ and γ are safe.

    Relation to pytorch-metric-learning: ``SoftTripleLoss(C, D, centers_per_class=K, la=λ,
    gamma=γ, margin=δ)`` has no regularizer by default: it equals ``tau=0`` here. With
    ``weight_regularizer=SparseCentersRegularizer(C, K), weight_reg_weight=τ`` it equals this
    loss with ``tau=τ`` (values and gradients for embeddings and centers; its ``fc`` is
    ``centers``), except at coincident centers (see :func:`soft_triple_regularizer`). The
    authors' code (idstcv/SoftTriple) computes the same objective with 1e-5 added under the
    regularizer's root.

    Degenerate batches: a batch of one class (C = 1) has ℓ_i = 0; all-zero weights leave only
    τ·R (which does not depend on the batch); a zero embedding has cosine 0 to every center.
    All finite, with finite gradients.

    Args:
      embeddings: [B, D] float (any float dtype; computed in at least float32); normalized here.
      labels: [B] int class ids in ``[0, C)``; checked when concrete. Under ``jit`` an
        out-of-range label gives a NaN loss (never a clamped, wrong class).
      centers: [D, C·K] float, class-major: column c·K + k is center k of class c (see the
        module docstring; :func:`soft_triple_centers` initializes it). Columns normalized here.
      centers_per_class: K >= 1; default 10 (the paper's K and PML's default).
      la: λ > 0, the scale of the class logits; default 20 (the paper, the authors' code, PML).
      gamma: γ > 0, the temperature of the softmax over a class's centers; default 0.1 (idem).
      margin: δ >= 0, subtracted from the target's relaxed similarity; default 0.01 (idem).
      tau: τ >= 0, the weight of the center regularizer; default 0.2 (the paper and the
        authors' code; PML's ``SoftTripleLoss`` has none unless given a weight regularizer).
      weights: optional [B] per-sample weights (None → ones; 0 excludes a sample).
      reduction: see :mod:`mlx_jax.reductions`, over the samples' ℓ_i; the regularizer is
        added once to the reduced value (``"mean"``, default: Eq. 13 and PML's ``MeanReducer``;
        ``"sum"``: Σ w_i·ℓ_i + τ·R; ``"mean_nonzero"``). ``"none"`` returns the [B] weighted
        ℓ_i and needs ``tau=0``: the regularizer is a term of the centers, not of a sample (add
        ``tau * soft_triple_regularizer(centers, centers_per_class=K)`` yourself).
      class_block_size: None (default): the [B, C] relaxed similarities at once (and a
        [B, C, K] cosine tensor); an int: classes per block, O(B·block·K) memory in the
        forward and backward pass, the same value and gradients (for many classes).

    Returns:
      scalar (or [B] for ``reduction="none"``) in the compute dtype (at least float32);
      differentiable in ``embeddings``, ``centers`` and ``gamma`` in reverse mode
      (``jax.grad``, ``jax.vjp``; the relaxed similarity has a hand-written VJP, so
      ``jax.jvp`` raises).
    """
    per_class = _checks.positive_int(centers_per_class, "centers_per_class")
    _checks.positive(la, "la")
    _checks.positive(gamma, "gamma")
    _checks.non_negative(margin, "margin")
    _checks.non_negative(tau, "tau")
    class_block_size = check_block_size(class_block_size, "class_block_size")
    no_regularizer = _checks.is_concrete(tau) and np.ndim(tau) == 0 and float(tau) == 0.0
    if no_regularizer:
        reductions.check_reduction(reduction)
    else:
        reductions.check_reduction(
            reduction,
            _SCALAR_REDUCTIONS,
            why="'none' needs tau=0: the center regularizer is not a per-sample term",
        )
    x = _checks.embeddings_array(embeddings)
    w = _check_centers(centers, x.shape[1], per_class)
    batch = prepare_batch(x, labels, weights, num_classes=w.shape[1] // per_class)
    x, w = _checks.promote_all(batch.embeddings, w)
    x_hat = l2_normalize(x, axis=1)
    w_hat = _unit_centers(w, per_class)
    num_classes = w_hat.shape[1]

    if class_block_size is None or class_block_size >= num_classes:
        terms = _dense_terms(x_hat, w_hat, batch.labels, la, gamma, margin)
    else:
        terms = _blockwise_terms(x_hat, w_hat, batch.labels, la, gamma, margin, class_block_size)
    loss = reductions.reduce_weighted(terms, batch.weights.astype(x.dtype), reduction)
    if no_regularizer:
        return loss
    return loss + tau * _regularizer(w_hat)
