"""Softmax cross-entropy over class logits (the "xent" baseline), and the shared math that the
margin-based softmax losses (:mod:`mlx_jax.losses.margin_softmax`) reuse.

For logits z [B, C] and class labels y [B] the per-sample loss is the negative log-likelihood of
the softmax (Bridle 1990; Goodfellow, Bengio & Courville 2016, Eq. 6.33)::

    L_i = −log softmax(z_i)_{y_i} = logsumexp_j(z_ij) − z_{i,y_i}

computed stably (``logsumexp`` subtracts the row maximum) in at least float32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mlx_jax import _checks, reductions

__all__ = ["softmax_loss"]


def take_target(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """``logits[i, labels[i]]`` [B]; a label outside ``[0, C)`` gives NaN.

    ``jnp.take_along_axis(..., mode="fill")`` fills indices >= C but wraps negative ones
    (−1 → C − 1, silently wrong), so negative labels are first moved out of range.
    """
    num_classes = logits.shape[1]
    index = jnp.where(labels < 0, num_classes, labels)
    target = jnp.take_along_axis(logits, index[:, None], axis=1, mode="fill", fill_value=jnp.nan)
    return target[:, 0]


def target_mask(labels: jax.Array, num_classes: int) -> jax.Array:
    """[B, C] bool, True at (i, labels[i]); an out-of-range label's row is all False."""
    return labels[:, None] == jnp.arange(num_classes, dtype=labels.dtype)[None, :]


def cross_entropy_terms(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Per-sample ``logsumexp(z_i) − z_{i, y_i}`` [B] (NaN for an out-of-range label)."""
    return jax.nn.logsumexp(logits, axis=1) - take_target(logits, labels)


def weighted_cross_entropy(
    logits: jax.Array,
    labels: jax.Array,
    weights: jax.Array | None,
    reduction: str,
) -> jax.Array:
    """Cross-entropy of checked ``logits`` [B, C] (compute dtype) and ``labels`` [B],
    weighted per sample and reduced with :func:`mlx_jax.reductions.reduce_weighted`."""
    reductions.check_reduction(reduction)
    w = _checks.sample_weights(weights, logits.shape[0], logits.dtype)
    return reductions.reduce_weighted(cross_entropy_terms(logits, labels), w, reduction)


def softmax_loss(
    logits: jax.Array,
    labels: jax.Array,
    *,
    weights: jax.Array | None = None,
    reduction: reductions.Reduction = "mean",
) -> jax.Array:
    """Softmax cross-entropy ("xent"): ``L_i = logsumexp_j(z_ij) − z_{i, y_i}``.

    The standard classification loss (Goodfellow et al. 2016, Eq. 6.33), the baseline that the
    margin softmax losses modify. Computed stably in at least float32.

    Args:
      logits: [B, C] float (any float dtype; bf16/f16 are computed in float32).
      labels: [B] int class ids in ``[0, C)``; checked when concrete. Under ``jit`` an
        out-of-range label cannot raise, so its loss is NaN (never a clamped, wrong class).
      weights: optional [B] per-sample weights (None → ones; zero excludes a sample).
      reduction: see :mod:`mlx_jax.reductions`; default ``"mean"`` (Σ wᵢLᵢ / Σ wᵢ, as
        ``torch.nn.CrossEntropyLoss`` and ``optax.softmax_cross_entropy`` followed by a mean).
        ``"none"`` returns the [B] weighted per-sample losses.

    Returns:
      float32 (or wider) scalar, or [B] for ``reduction="none"``.
    """
    z = _checks.float_array(logits, "logits", 2, "[batch, num_classes]")
    if z.shape[0] < 1 or z.shape[1] < 1:
        raise ValueError(
            f"logits must have shape [batch, num_classes] with batch, num_classes >= 1, "
            f"got {z.shape}"
        )
    y = _checks.labels_array(labels, z.shape[0], num_classes=z.shape[1])
    return weighted_cross_entropy(z, y, weights, reduction)
