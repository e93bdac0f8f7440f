"""Sub-center ArcFace and its outlier filter (Deng, Guo, Liu, Zafeiriou & Zafeiriou 2020,
"Sub-center ArcFace: Boosting Face Recognition by Large-Scale Noisy Web Faces", ECCV).

Each class c has K sub-centers instead of one class weight. ``class_weights`` is [D, C·K] with
the K sub-centers of class c in the consecutive columns c·K, …, c·K + K − 1 (class-major: a
``reshape(D, C, K)`` groups them). This is the layout of pytorch-metric-learning's
``SubCenterArcFaceLoss.W`` (``cosine.view(-1, C, K)``) and of the authors' released weights
(``W.reshape(-1, K, D)`` of the [C·K, D] fully connected weight), so trained weights carry over.

A sample's cosine to class c is its cosine to the nearest of the class's sub-centers,

    cos θ_ic = max_k x̂_i · ŵ_{cK+k},

and ArcFace is applied to those class cosines (the paper's Eq. 2). Training thus lets a class's
noisy or atypical samples settle on non-dominant sub-centers. The paper's cleaning step (Sec.
3.2) then keeps, per class, the *dominant* sub-center — the one that most of the class's
training samples are nearest to (:func:`dominant_sub_centers`) — drops the samples whose angle
to it exceeds a threshold (75° in the paper; :func:`sub_center_outliers`) and retrains with one
center per class on the cleaned data (:func:`collapse_sub_centers` gives those centers).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from mlx_jax import _checks, reductions
from mlx_jax.blockwise import check_block_size
from mlx_jax.distances import HIGHEST, l2_normalize
from mlx_jax.losses import class_blocks
from mlx_jax.losses._common import prepare_batch
from mlx_jax.losses.margin_softmax import (
    Boundary,
    check_margins,
    combined_margin_target,
    margin_cross_entropy,
)

__all__ = [
    "collapse_sub_centers",
    "dominant_sub_centers",
    "sub_center_arcface_loss",
    "sub_center_cosines",
    "sub_center_counts",
    "sub_center_outliers",
]


# --------------------------------------------------------------------------------------------
# Shared pieces
# --------------------------------------------------------------------------------------------


def _num_classes(w: jax.Array, sub_centers: int, name: str = "class_weights") -> int:
    """C from the [D, C·K] weights; ``ValueError`` unless the columns are a positive multiple
    of K."""
    columns = w.shape[1]
    if columns < sub_centers or columns % sub_centers:
        raise ValueError(
            f"{name} must have shape [{w.shape[0]}, num_classes * sub_centers] (sub_centers="
            f"{sub_centers} columns per class, num_classes >= 1), got shape {tuple(w.shape)}"
        )
    return columns // sub_centers


def _check_inputs(embeddings, labels, class_weights, weights, sub_centers):
    """Checks and promotes; returns (x [B, D], labels [B], W [D, C·K], weights [B], K)."""
    k = _checks.positive_int(sub_centers, "sub_centers")
    x = _checks.embeddings_array(embeddings)
    w = _checks.class_weights_array(class_weights, x.shape[1])
    batch = prepare_batch(x, labels, weights, num_classes=_num_classes(w, k))
    x, w = _checks.promote_all(batch.embeddings, w)
    return x, batch.labels, w, batch.weights.astype(x.dtype), k


def _nearest_sub_center(cosines: jax.Array, axis: int) -> jax.Array:
    """max over the sub-centers' ``axis``, with the whole gradient on the nearest one: the
    lowest index among exact ties, as ``torch.max`` and so pytorch-metric-learning do (and as
    :func:`sub_center_counts` votes). The forward pass keeps the argmax, so the backward pass
    is one select over the cosines where autodiff of ``jnp.max`` (which splits a tie) makes
    several passes. Reverse mode only."""
    return _nearest(cosines, axis, cosines.shape[axis])


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _nearest(cosines: jax.Array, axis: int, count: int) -> jax.Array:
    return jnp.max(cosines, axis=axis)


def _nearest_forward(cosines, axis, count):
    index = jnp.argmax(cosines, axis=axis)
    index = index.astype(jnp.int8 if count <= 127 else jnp.int32)  # a quarter of the bytes
    return jnp.max(cosines, axis=axis), index


def _nearest_backward(axis, count, index, grad):
    shape = [1] * (index.ndim + 1)
    shape[axis] = count
    slots = jnp.arange(count, dtype=index.dtype).reshape(shape)
    nearest = slots == jnp.expand_dims(index, axis)
    return (jnp.where(nearest, jnp.expand_dims(grad, axis), 0.0).astype(grad.dtype),)


_nearest.defvjp(_nearest_forward, _nearest_backward)


def _class_cosines(x_hat: jax.Array, w_hat: jax.Array, sub_centers: int) -> jax.Array:
    """Class cosines max_k x̂_i·ŵ_{jK+k} [B, C] of unit rows x̂ [B, D] and unit class-major
    sub-center columns ŵ [D, C·K].

    The columns are reordered sub-center-major ([D, K·C], a copy of W) before the matmul, so
    the max runs over the major axis of [B, K, C] cosines: XLA:CPU takes about twice as long
    for a max (and its gradient) over a minor axis of length K."""
    dim, columns = w_hat.shape
    classes = columns // sub_centers
    k_major = w_hat.reshape(dim, classes, sub_centers).transpose(0, 2, 1).reshape(dim, columns)
    cosines = jnp.matmul(x_hat, k_major, precision=HIGHEST)
    return _nearest_sub_center(cosines.reshape(x_hat.shape[0], sub_centers, classes), 1)


def _own_sub_center_cosines(x_hat, w_hat, labels, sub_centers):
    """x̂_i · ŵ_{y_i·K + k} [B, K]: each sample against its own class's sub-centers (a gather,
    O(B·D·K)); NaN rows for a label outside [0, C)."""
    columns = [
        class_blocks.target_cosines(x_hat, w_hat, labels * sub_centers + k)
        for k in range(sub_centers)
    ]
    return jnp.stack(columns, axis=1)


def _blockwise_cross_entropy(x_hat, w_hat, target, labels, row_scale, sub_centers, block_size):
    """Per-sample ``logsumexp_j z_ij − s_i·t_i`` [B] with z_ij = s_i·(t_i if j = y_i else
    max_k x̂_i·ŵ_{jK+k}), over blocks of ``block_size`` whole classes (block_size·K columns), so
    that the max over a class's sub-centers is taken inside its block and no [B, C] array
    exists. An online log-sum-exp as in :mod:`mlx_jax.losses.class_blocks`; the gradient is
    JAX's, with each block's body rematerialized (``jax.checkpoint``) so the backward pass also
    holds one [B, block_size·K] tile at a time."""
    dim, columns = w_hat.shape
    num_classes = columns // sub_centers
    width = block_size * sub_centers
    num_blocks = -(-num_classes // block_size)
    padded = jnp.pad(w_hat, ((0, 0), (0, num_blocks * width - columns)))
    blocks = padded.reshape(dim, num_blocks, width).transpose(1, 0, 2)
    starts = (jnp.arange(num_blocks) * block_size).astype(labels.dtype)

    @jax.checkpoint
    def step(carry, inputs):
        running_max, running_sum = carry
        start, w_block = inputs
        classes = start + jnp.arange(block_size, dtype=labels.dtype)
        replaced = jnp.where(
            labels[:, None] == classes[None, :],
            target[:, None],
            _class_cosines(x_hat, w_block, sub_centers),
        )
        logits = jnp.where(
            (classes < num_classes)[None, :], row_scale[:, None] * replaced, -jnp.inf
        )
        # the shift only keeps exp in range; log-sum-exp's gradient does not depend on it
        new_max = jax.lax.stop_gradient(jnp.maximum(running_max, jnp.max(logits, axis=1)))
        rescaled = running_sum * jnp.exp(running_max - new_max)
        new_sum = rescaled + jnp.sum(jnp.exp(logits - new_max[:, None]), axis=1)
        return (new_max, new_sum), None

    # *_like keeps the rows' shard_map varying axes, which scan requires of its carry
    start = (jnp.full_like(target, -jnp.inf), jnp.zeros_like(target))
    (row_max, row_sum), _ = jax.lax.scan(step, start, (starts, blocks))
    return row_max + jnp.log(row_sum) - row_scale * target


def _dominant_array(dominant, num_classes: int, sub_centers: int) -> jax.Array:
    """``dominant`` [C] int sub-center indices, range-checked in [0, K) when concrete."""
    dominant = jnp.asarray(dominant)
    if not jnp.issubdtype(dominant.dtype, jnp.integer) or dominant.shape != (num_classes,):
        raise ValueError(
            f"dominant must be an int array of shape [{num_classes}] (one sub-center index per "
            f"class), got {dominant.dtype} of shape {tuple(dominant.shape)}"
        )
    if _checks.is_concrete(dominant) and dominant.size:
        values = np.asarray(dominant)
        if values.min() < 0 or values.max() >= sub_centers:
            raise ValueError(
                f"dominant must lie in [0, {sub_centers}) (sub_centers), got values from "
                f"{values.min()} to {values.max()}"
            )
    return dominant


def _threshold_cosine(threshold_degrees) -> float:
    if not (
        isinstance(threshold_degrees, int | float | np.integer | np.floating)
        and not isinstance(threshold_degrees, bool)
        and 0.0 <= float(threshold_degrees) <= 180.0
    ):
        raise ValueError(
            f"threshold_degrees must be a number in [0, 180] degrees, got {threshold_degrees!r}"
        )
    return math.cos(math.radians(float(threshold_degrees)))


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


def sub_center_arcface_loss(
    embeddings: jax.Array,
    labels: jax.Array,
    class_weights: jax.Array,
    *,
    sub_centers: int = 3,
    margin: float = 0.5,
    scale: float = 64.0,
    boundary: Boundary = "monotonic",
    weights: jax.Array | None = None,
    reduction: reductions.Reduction = "mean",
    class_block_size: int | None = None,
) -> jax.Array:
    """Sub-center ArcFace (Deng et al. 2020, Eq. 2)::

        cos θ_ij = max_{k ∈ 1..K} x̂_i · ŵ_{jK+k}
        L_i = −log( e^{s·cos(θ_{i,y} + m)} / (e^{s·cos(θ_{i,y} + m)} + Σ_{j≠y} e^{s·cos θ_ij}) )

    i.e. :func:`~mlx_jax.losses.margin_softmax.arcface_loss` on the class cosines, each the
    cosine to the class's nearest sub-center (layout of ``class_weights`` in the module
    docstring). The margin goes through
    :func:`~mlx_jax.losses.margin_softmax.combined_margin_target` (no arccos on the gradient
    path, so cos θ = ±1 has finite gradients) and the cross-entropy through
    :func:`~mlx_jax.losses.margin_softmax.margin_cross_entropy`. The gradient of the max goes to
    the nearest sub-center (the lowest index among exactly tied ones, as in PML).

    Equals pytorch-metric-learning's ``SubCenterArcFaceLoss(num_classes=C, embedding_size=D,
    margin=np.degrees(margin), scale=scale, sub_centers=K)`` with its default ``MeanReducer``
    and ``W`` = ``class_weights`` (value and gradients; PML's margin is in degrees, its
    default 28.6° ≈ 0.5 rad).

    Degenerate inputs: a zero-norm embedding or sub-center has cosine 0 to everything, finite
    loss and gradients; a one-class problem (C = 1) has loss 0 with zero gradients; all
    weights zero give 0. ``sub_centers=1`` is ArcFace.

    Args:
      embeddings: [B, D] float (any float dtype; computed in at least float32); normalized
        inside.
      labels: [B] int class ids in ``[0, C)`` (checked when concrete; NaN loss under ``jit``).
      class_weights: [D, C·K] float, the K sub-centers of class c in columns c·K … c·K + K − 1;
        normalized inside.
      sub_centers: K >= 1 (a static Python int); default 3 (the paper's choice; also PML's).
      margin: m, the additive angular margin in **radians**, 0 <= m < π; default 0.5 (the
        paper, as ArcFace).
      scale: s, the logit scale; default 64 (the paper).
      boundary: the target logit where θ + m > π; default ``"monotonic"`` (insightface / PML;
        see :func:`~mlx_jax.losses.margin_softmax.combined_margin_loss`).
      weights: optional [B] per-sample weights (None → ones; zero excludes a sample).
      reduction: see :mod:`mlx_jax.reductions`; default ``"mean"`` (the paper's batch mean and
        PML's ``MeanReducer``). ``"none"`` returns the [B] weighted per-sample losses.
      class_block_size: None (default) forms the [B, C·K] cosines at once; an int visits the
        classes in blocks of that many whole classes (block_size·K columns, the max over
        sub-centers taken inside the block): memory O(B·class_block_size·K) instead of
        O(B·C·K), same value and gradients (reverse mode). For K = 1 this is
        :func:`mlx_jax.losses.class_blocks.blockwise_margin_cross_entropy`.

    Returns:
      float32 (or wider) scalar, or [B] for ``reduction="none"``.
    """
    _checks.non_negative(margin, "margin")
    if _checks.is_concrete(margin) and np.ndim(margin) == 0 and float(margin) >= math.pi:
        raise ValueError(f"margin must be in [0, π) radians, got {margin}")
    check_margins(1.0, margin, 0.0, scale, boundary)
    reductions.check_reduction(reduction)
    class_block_size = check_block_size(class_block_size, "class_block_size")
    x, y, w, sample_w, k = _check_inputs(embeddings, labels, class_weights, weights, sub_centers)
    num_classes = w.shape[1] // k
    x_hat, w_hat = l2_normalize(x, axis=1), l2_normalize(w, axis=0)
    cos_y = _nearest_sub_center(_own_sub_center_cosines(x_hat, w_hat, y, k), 1)
    target = combined_margin_target(cos_y, 1.0, margin, 0.0, boundary)
    row_scale = jnp.broadcast_to(jnp.asarray(scale, x.dtype), y.shape)
    if class_block_size is None or class_block_size >= num_classes:
        terms = margin_cross_entropy(_class_cosines(x_hat, w_hat, k), target, y, row_scale)
    elif k == 1:
        terms = class_blocks.blockwise_margin_cross_entropy(
            x_hat, w_hat, target, y, row_scale, class_block_size
        )
    else:
        terms = _blockwise_cross_entropy(x_hat, w_hat, target, y, row_scale, k, class_block_size)
    return reductions.reduce_weighted(terms, sample_w, reduction)


def sub_center_cosines(
    embeddings: jax.Array, class_weights: jax.Array, *, sub_centers: int = 3
) -> jax.Array:
    """Class cosines max_k x̂_i · ŵ_{jK+k} [B, C], the unscaled logits of
    :func:`sub_center_arcface_loss` (for accuracy / argmax predictions).

    Args:
      embeddings: [B, D] float; class_weights: [D, C·K] float (layout in the module
      docstring); sub_centers: K (static int).

    Returns:
      [B, C] in the compute dtype (at least float32).
    """
    k = _checks.positive_int(sub_centers, "sub_centers")
    x = _checks.embeddings_array(embeddings)
    w = _checks.class_weights_array(class_weights, x.shape[1])
    _num_classes(w, k)
    x, w = _checks.promote_all(x, w)
    return _class_cosines(l2_normalize(x, axis=1), l2_normalize(w, axis=0), k)


def sub_center_counts(
    embeddings: jax.Array,
    labels: jax.Array,
    class_weights: jax.Array,
    *,
    sub_centers: int = 3,
    weights: jax.Array | None = None,
) -> jax.Array:
    """How many samples of each class are nearest to each of its sub-centers, [C, K].

    Sample i votes for argmax_k x̂_i · ŵ_{y_i·K + k} (its nearest sub-center of its own class;
    the lowest k on exact ties, as ``np.argmax``). Counts add up over chunks of a data set, so
    a training set too large for one call is counted chunk by chunk and the sums passed to
    ``jnp.argmax(counts, axis=1)`` (which is :func:`dominant_sub_centers`).

    Args:
      embeddings: [B, D] float (trained-model embeddings of training samples).
      labels: [B] int class ids in ``[0, C)``.
      class_weights: [D, C·K] float, the trained sub-centers (layout in the module docstring).
      sub_centers: K (static int); default 3.
      weights: optional [B] per-sample vote weights (None → ones; zero excludes a sample, e.g.
        the padding of a last chunk).

    Returns:
      [C, K] float (at least float32): Σ of the weights of the samples voting for each
      sub-center (the number of samples for ``weights=None``). A sample whose label is outside
      ``[0, C)`` (possible only under ``jit``; eagerly it raises) votes nowhere.
    """
    x, y, w, sample_w, k = _check_inputs(embeddings, labels, class_weights, weights, sub_centers)
    num_classes = w.shape[1] // k
    own = _own_sub_center_cosines(l2_normalize(x, axis=1), l2_normalize(w, axis=0), y, k)
    nearest = jnp.argmax(own, axis=1)
    in_range = (y >= 0) & (y < num_classes)
    votes = jnp.where(in_range, sample_w, 0.0)
    index = jnp.where(in_range, y * k + nearest, 0)
    return jnp.zeros(num_classes * k, x.dtype).at[index].add(votes).reshape(num_classes, k)


def dominant_sub_centers(
    embeddings: jax.Array,
    labels: jax.Array,
    class_weights: jax.Array,
    *,
    sub_centers: int = 3,
    weights: jax.Array | None = None,
) -> jax.Array:
    """Each class's dominant sub-center, [C] int32: the one most of the class's samples are
    nearest to (Deng et al. 2020, Sec. 3.2; ``argmax`` of :func:`sub_center_counts`, the lowest
    index on a tie, as the authors' ``drop.py`` and PML's ``get_outliers``). A class without
    samples here gets 0. Arguments as :func:`sub_center_counts`."""
    counts = sub_center_counts(
        embeddings, labels, class_weights, sub_centers=sub_centers, weights=weights
    )
    return jnp.argmax(counts, axis=1).astype(jnp.int32)


def sub_center_outliers(
    embeddings: jax.Array,
    labels: jax.Array,
    class_weights: jax.Array,
    *,
    sub_centers: int = 3,
    threshold_degrees: float = 75.0,
    dominant: jax.Array | None = None,
    weights: jax.Array | None = None,
) -> jax.Array:
    """The paper's data cleaning (Deng et al. 2020, Sec. 3.2): True for the samples whose angle
    to their class's **dominant** sub-center exceeds ``threshold_degrees``, [B] bool.

    A sample is compared with the dominant sub-center of its class, not with its own nearest
    sub-center: a sample that sits on a non-dominant sub-center far (> threshold) from the
    dominant one is flagged, though it is close to *a* sub-center of its class — such samples
    are the label noise the sub-centers were introduced to absorb. A sample nearest to a
    non-dominant sub-center but within the threshold of the dominant one is kept (a stricter
    reading that drops every sample of a non-dominant sub-center was proposed on
    pytorch-metric-learning's tracker, #740; neither the paper's code nor PML does that).

    Same flags as the authors' ``drop.py`` (which also drops an angle exactly equal to the
    threshold) and as pytorch-metric-learning 2.9's ``SubCenterArcFaceLoss.get_outliers(
    embeddings, labels, threshold)``: PML returns the flagged indices (``jnp.flatnonzero`` of
    this mask) and ``dominant_centers`` [D, C], which for the classes present is
    :func:`collapse_sub_centers` of :func:`dominant_sub_centers` (for absent classes PML's
    columns are uninitialized memory; here sub-center 0).

    Args:
      embeddings: [B, D] float (trained-model embeddings of training samples).
      labels: [B] int class ids in ``[0, C)``.
      class_weights: [D, C·K] float, the trained sub-centers (layout in the module docstring).
      sub_centers: K (static int); default 3.
      threshold_degrees: the angle in degrees, in [0, 180]; default 75 (the paper; also
        ``drop.py`` and PML). Flagged: angle > threshold, i.e. cos < cos(threshold).
      dominant: optional [C] int, each class's dominant sub-center; None (default) computes it
        from this batch (:func:`dominant_sub_centers`). Pass the argmax of
        :func:`sub_center_counts` summed over the whole training set when it is processed in
        chunks.
      weights: optional [B]; a zero-weight sample neither votes for the dominant sub-center
        nor is flagged (padding).

    Returns:
      [B] bool. A zero-norm embedding (cosine 0, 90°) is flagged for thresholds below 90°; a
      label outside ``[0, C)`` (only under ``jit``) is not flagged.
    """
    cos_threshold = _threshold_cosine(threshold_degrees)
    x, y, w, sample_w, k = _check_inputs(embeddings, labels, class_weights, weights, sub_centers)
    num_classes = w.shape[1] // k
    if dominant is None:
        dominant = dominant_sub_centers(x, y, w, sub_centers=k, weights=sample_w)
    else:
        dominant = _dominant_array(dominant, num_classes, k)
    own = _own_sub_center_cosines(l2_normalize(x, axis=1), l2_normalize(w, axis=0), y, k)
    index = jnp.clip(jnp.where(y < 0, 0, y), 0, num_classes - 1)
    chosen = jnp.clip(dominant[index], 0, k - 1)  # traced indices are not range-checked
    cos_dominant = jnp.take_along_axis(own, chosen[:, None], axis=1)[:, 0]
    return (cos_dominant < cos_threshold) & (sample_w > 0)


def collapse_sub_centers(
    class_weights: jax.Array, dominant: jax.Array, *, sub_centers: int = 3
) -> jax.Array:
    """Keeps each class's dominant sub-center, [D, C·K] → [D, C] (the paper's final step:
    "drop non-dominant sub-centers", Deng et al. 2020, Sec. 3.2), e.g. as the class weights of
    :func:`~mlx_jax.losses.margin_softmax.arcface_loss` or of this loss with ``sub_centers=1``.

    Args:
      class_weights: [D, C·K] float (layout in the module docstring).
      dominant: [C] int sub-center index per class (:func:`dominant_sub_centers`).
      sub_centers: K (static int); default 3.

    Returns:
      [D, C] in the dtype of ``class_weights`` (columns as stored, not normalized).
    """
    k = _checks.positive_int(sub_centers, "sub_centers")
    w = jnp.asarray(class_weights)
    if w.ndim != 2 or not jnp.issubdtype(w.dtype, jnp.floating):
        raise ValueError(
            f"class_weights must be a float array of shape [dim, num_classes * sub_centers], "
            f"got {w.dtype} of shape {tuple(w.shape)}"
        )
    num_classes = _num_classes(w, k)
    dominant = _dominant_array(dominant, num_classes, k)
    grouped = w.reshape(w.shape[0], num_classes, k)
    return jnp.take_along_axis(grouped, dominant[None, :, None], axis=2, mode="clip")[:, :, 0]
