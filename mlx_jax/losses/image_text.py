"""Contrastive losses over a batch of (image, text) embedding pairs: CLIP's bidirectional softmax
loss (Radford et al. 2021, "Learning Transferable Visual Models From Natural Language
Supervision", ICML) and SigLIP's pairwise sigmoid loss (Zhai et al. 2023, "Sigmoid Loss for
Language Image Pre-Training", ICCV).

Row i of the two [B, D] arrays is the pair (image_i, text_i); every other text of the batch is a
negative of image_i and every other image a negative of text_i. No class labels: the diagonal
of the B × B logit matrix holds the positives. Both losses are over all B² (image, text) pairs
and have the dense and the row-block form of :func:`mlx_jax.blockwise.map_row_blocks`
(``block_size``; O(B·block_size) memory in the forward and the backward pass, the same value
and gradients): CLIP's column cross-entropy (each text against all images) is a second blocked
pass over the transposed problem (text rows against all images), so the blockwise form never
holds a [B, B] matrix.

The learnable scalars (CLIP's log-scale t, SigLIP's log-temperature t' and bias b) are
keyword arguments that accept traced arrays: pass them from the model's parameters and they get
gradients.

Per-pair ``weights`` [B]: a term's weight is its anchor's pair weight (CLIP: the image's for
the image→text cross-entropy, the text's for the text→image one; SigLIP: a term (image_i,
text_j) counts half for pair i and half for pair j). A zero weight removes the pair everywhere
— as a positive, as an anchor in either direction and as a negative of every other pair — so
a padded batch gives exactly the loss of the batch without the padding.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from mlx_jax import _checks, blockwise, reductions
from mlx_jax.distances import HIGHEST, l2_normalize

CLIP_LOG_SCALE = math.log(1 / 0.07)  # t at initialisation: a temperature of 0.07 (CLIP, §2.5)
CLIP_MAX_SCALE = 100.0  # exp(t) is clipped at 100 (CLIP, §2.5)
SIGLIP_LOG_TEMPERATURE = math.log(10.0)  # t' at initialisation (SigLIP, §3.2 and Algorithm 1)
SIGLIP_BIAS = -10.0  # b at initialisation (SigLIP, §3.2 and Algorithm 1)


def _embedding_pairs(image_embeddings, text_embeddings) -> tuple[jax.Array, jax.Array]:
    """Both [B, D] arrays checked, of one shape, in their common compute dtype."""
    images = _checks.embeddings_array(image_embeddings, "image_embeddings")
    texts = _checks.embeddings_array(text_embeddings, "text_embeddings")
    if images.shape != texts.shape:
        raise ValueError(
            "text_embeddings must have the shape of image_embeddings "
            f"[{images.shape[0]}, {images.shape[1]}] (row i is the pair (image_i, text_i)), "
            f"got shape [{texts.shape[0]}, {texts.shape[1]}]"
        )
    return _checks.promote_all(images, texts)


def _scalar(value, name: str, dtype) -> jax.Array:
    """A learnable scalar (Python number or 0-d array, traced or not) in the compute dtype;
    a concrete non-finite value raises."""
    try:
        array = jnp.asarray(value)
    except TypeError:
        raise TypeError(f"{name} must be a real number, got {value!r}") from None
    if array.ndim != 0:
        raise ValueError(f"{name} must be a scalar, got shape {list(array.shape)}")
    if not (jnp.issubdtype(array.dtype, jnp.floating) or jnp.issubdtype(array.dtype, jnp.integer)):
        raise TypeError(f"{name} must be a real number, got dtype {array.dtype}")
    if _checks.is_concrete(value) and not np.isfinite(np.asarray(value, np.float64)):
        raise ValueError(f"{name} must be finite, got {value}")
    return array.astype(dtype)


def _pair_mask(index: jax.Array, size: int) -> jax.Array:
    """[R, B]: whether column j is row r's own pair (the diagonal; none for padding rows)."""
    return index[:, None] == jnp.arange(size, dtype=index.dtype)[None, :]


def _cross_entropy(logits: jax.Array, own: jax.Array, column_valid: jax.Array) -> jax.Array:
    """Row-wise −log softmax(logits)[own pair] over the valid columns, [R].

    Max-subtracted logsumexp (a scale of 100 cannot overflow); the positive logit is taken from
    the same matrix, so a row whose only valid column is its own pair gives 0 (to rounding)."""
    valid = jnp.broadcast_to(column_valid[None, :], logits.shape)
    safe = jnp.where(valid, logits, -jnp.inf)
    has_any = jnp.any(valid, axis=1, keepdims=True)
    # a row without valid columns (every weight 0) stays finite; its term is masked by the caller
    log_norm = jax.nn.logsumexp(jnp.where(has_any, safe, 0.0), axis=1)
    return log_norm - jnp.sum(jnp.where(own, logits, 0.0), axis=1)


def _clip_scale(log_scale, max_scale, dtype) -> jax.Array:
    t = _scalar(log_scale, "log_scale", dtype)
    if max_scale is None:
        return jnp.exp(t)
    if not _checks.is_concrete(max_scale):
        raise TypeError("max_scale must be a Python float or None (static), got a traced value")
    _checks.positive(max_scale, "max_scale")
    if not math.isfinite(max_scale):
        raise ValueError(f"max_scale must be finite or None, got {max_scale}")
    # clipped in log space and with `>`: exp never sees an overflowing t (whose gradient would be
    # 0·inf), and a t held exactly at the clip by the training loop keeps its gradient
    log_max = math.log(max_scale)
    return jnp.exp(jnp.where(t > log_max, log_max, t))


def clip_loss(
    image_embeddings: jax.Array,
    text_embeddings: jax.Array,
    *,
    log_scale: float | jax.Array = CLIP_LOG_SCALE,
    max_scale: float | None = CLIP_MAX_SCALE,
    weights: jax.Array | None = None,
    reduction: reductions.Reduction = "mean",
    block_size: blockwise.BlockSize = "auto",
) -> jax.Array:
    """CLIP's symmetric cross-entropy over the B × B image–text similarities.

    With u_i, v_i the L2-normalised image and text embeddings of pair i, s = exp(t) the logit
    scale and l_ij = s · u_i·v_j, the loss of pair i is the mean of its two cross-entropies
    with the target on the diagonal (Radford et al. 2021, Fig. 3)::

        ℓ_i = ½ [ −log( exp(l_ii) / Σ_j exp(l_ij) )      image i against every text
                + −log( exp(l_ii) / Σ_j exp(l_ji) ) ]    text i against every image

    and the batch loss is 1/B Σ_i ℓ_i — Fig. 3's ``(loss_i + loss_t) / 2`` with each
    cross-entropy averaged over the batch. Every logsumexp subtracts its maximum, so s = 100
    never overflows, in float32 either.

    The same value and gradients as pytorch-metric-learning's
    ``SelfSupervisedLoss(NTXentLoss(temperature=1 / s), symmetric=False)`` averaged over both
    directions, ``(loss(images, texts) + loss(texts, images)) / 2``: with ``ref_emb`` NT-Xent
    is exactly the row cross-entropy (its MeanReducer averages over the B pairs). There is no
    CLIP class in pytorch-metric-learning.

    The temperature: ``log_scale`` is t, the learnable log of the scale (CLIP's
    ``logit_scale`` parameter; Fig. 3 ``np.exp(t)``), a Python number or a traced 0-d array
    (pass the model parameter and it gets a gradient). Default log(1/0.07) ≈ 2.659, CLIP's
    initialisation "to the equivalent of 0.07 from (Wu et al., 2018)" (§2.5). The paper clips
    it "to prevent scaling the logits by more than 100": here ``max_scale`` (default 100) caps
    s = min(exp(t), max_scale) inside the loss, so the paper's bound holds whatever the
    training loop does. Above the cap t's gradient is 0: t stays where it is and s at 100
    (where the released CLIP models end). OpenCLIP's training loop instead clamps the
    parameter, t ← clip(t, 0, log 100), after each optimizer step, so that t can come back
    down; do that in the training loop to reproduce it — the cap then never binds (t exactly
    at log 100 keeps its gradient) — or pass ``max_scale=None`` to leave s unclipped.

    Degenerate batches: B = 1 gives 0 (a softmax over one logit; to rounding) with zero
    gradients; duplicate pairs are each other's negatives (a batch of B identical pairs gives
    log B); a zero embedding has similarity 0 to everything; all weights zero gives 0 with zero
    gradients. Never NaN.

    Args:
      image_embeddings: [B, D] float (any float dtype; computed in at least float32).
        L2-normalised here.
      text_embeddings: [B, D] float, text_embeddings[i] the caption of image_embeddings[i].
      log_scale: t (float or 0-d array, finite); s = exp(t). Default log(1/0.07) (CLIP §2.5).
      max_scale: upper bound of s (a Python float > 0, static), default 100 (CLIP §2.5);
        None: no bound.
      weights: optional [B] per-pair weights. The image→text cross-entropy of pair i is
        weighted by w_i, and so is its text→image one; a zero-weight pair drops out of every
        softmax (as the positive and as a negative), so padding is exact.
      reduction: ``"mean"`` (default, the paper's): Σ_i w_i ℓ_i / Σ_i w_i; ``"sum"``:
        Σ_i w_i ℓ_i; ``"mean_nonzero"``: over pairs with ℓ_i > 0; ``"none"``: the [B]
        weighted per-pair losses w_i ℓ_i (0 for zero-weight pairs).
        See :mod:`mlx_jax.reductions`.
      block_size: ``"auto"`` (default): dense up to B = 2048, blocks of about 2^18 / B rows
        above on CPU, dense on GPU/TPU (:func:`mlx_jax.blockwise.auto_block_size`; for a batch
        whose [B, B] logits do not fit an accelerator, pass an int); None: the [B, B] logit
        matrix at once (one matmul for both directions); an int: image rows against all texts,
        then text rows against all images, in blocks of that many rows, with O(B·block_size)
        memory in the forward and backward pass (:mod:`mlx_jax.blockwise`). The same value and
        gradients in every form.

    Returns:
      scalar (or [B] for ``reduction="none"``) in the compute dtype (at least float32).
    """
    images, texts = _embedding_pairs(image_embeddings, text_embeddings)
    size = images.shape[0]
    w = _checks.sample_weights(weights, size, images.dtype)
    reductions.check_reduction(reduction)
    scale = _clip_scale(log_scale, max_scale, images.dtype)
    block_size = blockwise.resolve_block_size(block_size, size)
    images, texts = l2_normalize(images), l2_normalize(texts)
    valid = w > 0

    if blockwise.runs_dense(block_size, size):
        logits = scale * jnp.matmul(images, texts.T, precision=HIGHEST)
        own = _pair_mask(jnp.arange(size), size)
        image_terms = _cross_entropy(logits, own, valid)
        text_terms = _cross_entropy(logits.T, own, valid)
    else:

        def against(columns: jax.Array):
            def rows(index: jax.Array, anchors: jax.Array) -> jax.Array:
                logits = scale * jnp.matmul(anchors, columns.T, precision=HIGHEST)
                return _cross_entropy(logits, _pair_mask(index, size), valid)

            return rows

        image_terms = blockwise.map_row_blocks(against(texts), (images,), block_size=block_size)
        text_terms = blockwise.map_row_blocks(against(images), (texts,), block_size=block_size)

    terms = jnp.where(valid, w * 0.5 * (image_terms + text_terms), 0.0)
    return reductions.reduce_terms(terms, w, reduction)


def siglip_loss(
    image_embeddings: jax.Array,
    text_embeddings: jax.Array,
    *,
    log_temperature: float | jax.Array = SIGLIP_LOG_TEMPERATURE,
    bias: float | jax.Array = SIGLIP_BIAS,
    weights: jax.Array | None = None,
    reduction: reductions.Reduction = "mean",
    block_size: blockwise.BlockSize = "auto",
) -> jax.Array:
    """SigLIP's pairwise sigmoid loss: every (image, text) pair of the batch is a binary
    classification, positive on the diagonal and negative elsewhere.

    With x_i, y_j the L2-normalised image and text embeddings, t = exp(t') and
    z_ij = +1 if i = j else −1 (Zhai et al. 2023, §3.2, Algorithm 1)::

        L = −1/|B| Σ_i Σ_j log σ( z_ij · (t · x_i·y_j + b) )

    evaluated with ``jax.nn.log_sigmoid`` (−softplus(−x): no overflow for any logit). Both
    t' (``log_temperature``) and b (``bias``) are learnable: pass traced 0-d arrays (the model
    parameters) and they get gradients. Neither is clipped here.

    pytorch-metric-learning has no sigmoid image–text loss, so there is no class to match.

    Degenerate batches: B = 1 gives the single positive term softplus(−(t·x·y + b))
    (softplus(10 − 10·cos) with the defaults); duplicate pairs are each other's negatives; a zero
    embedding has similarity 0 to everything (logit b); all weights zero gives 0 with zero
    gradients. Never NaN for finite t' and b.

    Args:
      image_embeddings: [B, D] float (any float dtype; computed in at least float32).
        L2-normalised here.
      text_embeddings: [B, D] float, text_embeddings[i] the caption of image_embeddings[i].
      log_temperature: t' (float or 0-d array, finite); t = exp(t'). Default log 10, the
        paper's initialisation (§3.2, Algorithm 1).
      bias: b (float or 0-d array, finite). Default −10, the paper's initialisation (§3.2):
        with B − 1 negatives per positive, a large negative bias starts training close to the
        prior (few positives) instead of correcting it first.
      weights: optional [B] per-pair weights w. The term of (image_i, text_j) has the weight
        (w_i + w_j) / 2 — half from each pair, so swapping images and texts gives the same
        loss, as in the unweighted loss, and the positive (i, i) has w_i; a zero-weight pair
        drops out of every term (as the positive and as a negative), so padding is exact.
      reduction: ``"mean"`` (default, the paper's 1/|B|): Σ weighted terms / Σ_i w_i;
        ``"sum"``: Σ weighted terms; ``"mean_nonzero"``: over pairs whose row sum is > 0;
        ``"none"``: [B], for pair i the weighted sum of image i's row,
        Σ_j (w_i + w_j)/2 · ℓ_ij (0 for zero-weight pairs; with unit weights the row sum of
        Algorithm 1's per-pair losses), whose total is the ``"sum"``. See
        :mod:`mlx_jax.reductions`.
      block_size: ``"auto"`` (default): dense up to B = 2048, blocks of about 2^18 / B image
        rows above on CPU, dense on GPU/TPU (:func:`mlx_jax.blockwise.auto_block_size`; for a
        batch whose [B, B] logits do not fit an accelerator, pass an int); None: the [B, B]
        logit matrix at once; an int: blocks of that many image rows against all texts, with
        O(B·block_size) memory in the forward and backward pass (:mod:`mlx_jax.blockwise`).
        The same value and gradients in every form.

    Returns:
      scalar (or [B] for ``reduction="none"``) in the compute dtype (at least float32).
    """
    images, texts = _embedding_pairs(image_embeddings, text_embeddings)
    size = images.shape[0]
    w = _checks.sample_weights(weights, size, images.dtype)
    reductions.check_reduction(reduction)
    temperature = jnp.exp(_scalar(log_temperature, "log_temperature", images.dtype))
    b = _scalar(bias, "bias", images.dtype)
    block_size = blockwise.resolve_block_size(block_size, size)
    images, texts = l2_normalize(images), l2_normalize(texts)
    valid = w > 0

    def rows(index: jax.Array, anchors: jax.Array, anchor_weights: jax.Array) -> jax.Array:
        logits = temperature * jnp.matmul(anchors, texts.T, precision=HIGHEST) + b
        own = _pair_mask(index, size)
        terms = -jax.nn.log_sigmoid(jnp.where(own, logits, -logits))
        pair_weights = 0.5 * (anchor_weights[:, None] + w[None, :])
        keep = (anchor_weights > 0)[:, None] & valid[None, :]
        return jnp.sum(jnp.where(keep, pair_weights * terms, 0.0), axis=1)

    terms = blockwise.map_row_blocks(rows, (images, w), block_size=block_size)
    return reductions.reduce_terms(terms, w, reduction)
