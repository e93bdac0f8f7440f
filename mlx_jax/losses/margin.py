"""Margin-based loss with a learnable boundary β (Wu, Manmatha, Smola & Krähenbühl 2017,
"Sampling Matters in Deep Embedding Learning", ICCV)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mlx_jax import _checks, blockwise, reductions
from mlx_jax.distances import l2_normalize, safe_sqrt
from mlx_jax.losses._common import Rows, map_anchor_rows, pair_row_sums, prepare_batch

__all__ = ["margin_loss", "margin_loss_beta"]

BETA_INIT = 1.2  # β^(0) of the paper's Sec. 5 (and pytorch-metric-learning's default)


def margin_loss_beta(num_classes: int | None = None, init: float = BETA_INIT) -> jax.Array:
    """The initial β of :func:`margin_loss`, for a train state: a float32 scalar (one β shared
    by every class) or, with ``num_classes``, a [num_classes] array (one β per class, the
    paper's β^(class)), every entry ``init``.

    ``init`` defaults to 1.2, the paper's initial β (Wu et al. 2017, Sec. 5) and
    pytorch-metric-learning's ``MarginLoss(beta=1.2)``.
    """
    if num_classes is None:
        return jnp.asarray(init, jnp.float32)
    return jnp.full((_checks.positive_int(num_classes, "num_classes"),), init, jnp.float32)


def _beta_array(beta) -> jax.Array:
    """``beta`` as a float array of shape [] (shared) or [C] (per class), C >= 1."""
    beta = jnp.asarray(beta)
    expected = "[] (one β shared by every class) or [num_classes] (one β per class)"
    if not jnp.issubdtype(beta.dtype, jnp.floating):
        raise TypeError(
            f"beta must be a floating-point array of shape {expected}, got {beta.dtype}"
        )
    if beta.ndim > 1 or (beta.ndim == 1 and beta.shape[0] < 1):
        raise ValueError(f"beta must have shape {expected}, got shape {list(beta.shape)}")
    return beta


def margin_loss(
    embeddings: jax.Array,
    labels: jax.Array,
    beta: jax.Array,
    *,
    margin: float = 0.2,
    nu: float = 0.0,
    weights: jax.Array | None = None,
    anchors: jax.Array | None = None,
    reduction: reductions.Reduction = "mean",
    block_size: blockwise.BlockSize = "auto",
) -> jax.Array:
    """Margin-based loss over every triplet of the batch, with a learnable boundary β.

    With D_ij = ‖x̂_i − x̂_j‖ the Euclidean distance of the L2-normalised embeddings and
    y_ij = +1 for a positive pair (same label), −1 for a negative pair, each pair term is
    (Wu et al. 2017, Eq. 4)::

        ℓ(i, j) = (α + y_ij·(D_ij − β))₊

    i.e. a positive pair is penalised beyond β − α, a negative pair inside β + α. The paper
    learns β jointly with the embedding (Eq. 5), one β shared by all classes or one per class,
    and adds ν·β to the objective, so a ν > 0 pulls β down.

    **Pair set.** As pytorch-metric-learning's ``MarginLoss`` (``triplets_per_anchor="all"``),
    the pairs come from every triplet (a, p, n) of the batch (y_p = y_a, p != a, y_n != y_a):
    each triplet contributes its positive term ℓ(a, p) and its negative term ℓ(a, n), both with
    the anchor's β. So a positive pair counts once per negative of its anchor and a negative
    pair once per positive; an anchor without positives or without negatives has no term.
    (The paper samples one negative per anchor-positive pair by distance-weighted sampling,
    Sec. 4; that sampler is not part of this function: the all-triplet set is the sampler-free
    form that PML computes.)

    With β_a the anchor's β (the shared one, or β[y_a] for a per-class β) and T the set of
    triplets, the reductions over the 2·|T| pair terms, each with its anchor's weight w_a, are

    * ``"mean"`` (default): Σ_T w_a·(ℓ(a,p) + ℓ(a,n)) / Σ_T 2·w_a — the mean pair term;
    * ``"mean_nonzero"``: the same sum over the weight of the terms that are > 0 — PML's
      default ``DivisorReducer`` (its divisor is the number of non-zero pair terms);
    * ``"sum"``: the sum;
    * ``"none"``: [B] per anchor, w_a·Σ over the anchor's triplets of ℓ(a,p) + ℓ(a,n)
      (0 for anchors without triplets), without the ν term below.

    **The ν term** (when ν > 0), added to the reduced loss:

    * shared β (a 0-d array): ν·β, once (PML's ``"already_reduced"`` form), if the batch has
      at least one triplet, else nothing;
    * per-class β ([C]): ν·Σ_T w_a·β_{y_a}, divided by the reduction's denominator (the same
      one as the pair terms: PML's ``"element"`` form with its divisor).

    **PML parity.** ``reduction="mean_nonzero"`` equals ``MarginLoss(margin=α, nu=ν,
    beta=β, learn_beta=True, num_classes=C or None)`` in value and gradients (embeddings and β),
    and ``MarginLoss(..., learn_beta=False)`` with ``nu=0`` (PML ignores ν for a fixed β, where
    ν·β is a constant anyway). PML's ``MeanReducer`` divides by the number of triplets, not of
    pair terms: it gives twice our ``"mean"``.

    Degenerate batches: no triplet (one class, every sample its own class, all weights zero, or
    a single sample) gives 0 with zero gradients, ν term included. Duplicate embeddings have
    D = 0 with a zero (not NaN) derivative of the square root; a zero-norm embedding is
    normalised with an eps and lies at distance 1 from every unit vector.

    Args:
      embeddings: [B, D] float (any float dtype; computed in at least float32). L2-normalised
        here.
      labels: [B] int class ids; in [0, C) for a per-class β (checked when concrete; a NaN
        loss under ``jit``).
      beta: β, positional and learnable (differentiate the loss with respect to it): a 0-d
        float array, one β for every class, or a [C] float array, β per class (the anchor's
        class selects it). :func:`margin_loss_beta` makes the initial value, 1.2 everywhere
        (the paper's initial β, Sec. 5, and PML's default).
        Computed in the common float dtype of ``embeddings`` and ``beta`` (at least float32).
      margin: α >= 0, the half-width of the margin around β; default 0.2, the paper's value
        (Sec. 5) and PML's default.
      nu: ν >= 0, the weight of the β regulariser; default 0 (no regularisation), PML's
        default.
      weights: optional [B] per-sample weights; a triplet's terms carry its anchor's weight,
        and a zero-weight sample is excluded everywhere (anchor, positive, negative, and the
        counts of positives and negatives).
      anchors: optional [B] bool, which samples anchor loss terms (None: every sample).
        A sample with ``anchors`` False anchors nothing but is still a positive or
        negative of the anchors: scoring a batch against a reference set, e.g. the
        cross-batch memory of :func:`mlx_jax.memory.memory_loss`.
      reduction: ``"mean"``, ``"sum"``, ``"mean_nonzero"`` or ``"none"`` (above).
      block_size: ``"auto"`` (default): dense up to B = 2048, blocks of about 2^18 / B
        anchor rows above on CPU, dense on GPU/TPU (:func:`mlx_jax.blockwise.auto_block_size`);
        None: the [B, B] distance matrix at once; an int: blocks of that many anchor rows with
        O(B·block_size) memory in the forward and backward pass (:mod:`mlx_jax.blockwise`).
        The same value and gradients in every form.

    Returns:
      scalar (or [B] for ``reduction="none"``) in the compute dtype.
    """
    beta = _beta_array(beta)
    per_class = beta.ndim == 1
    batch = prepare_batch(
        embeddings,
        labels,
        weights,
        num_classes=beta.shape[0] if per_class else None,
        anchors=anchors,
    )
    _checks.non_negative(margin, "margin")
    _checks.non_negative(nu, "nu")
    reductions.check_reduction(reduction, reductions.WITH_PARTS)
    x, beta = _checks.promote_all(batch.embeddings, beta)
    batch = batch._replace(embeddings=l2_normalize(x), weights=batch.weights.astype(x.dtype))
    size = batch.labels.shape[0]
    if per_class:
        anchor_beta = _checks.gather_rows(beta, batch.labels)
    else:
        anchor_beta = jnp.broadcast_to(beta, (size,))

    def per_rows(rows: Rows, row_beta: jax.Array):
        positive, negative = rows.pair_masks(batch)
        distance = safe_sqrt(rows.squared_distances(batch))
        boundary = row_beta[:, None]
        positive_terms = jax.nn.relu(margin + distance - boundary)
        negative_terms = jax.nn.relu(margin - (distance - boundary))
        positives = jnp.sum(positive, axis=1, dtype=x.dtype)
        negatives = jnp.sum(negative, axis=1, dtype=x.dtype)
        # every triplet (a, p, n) holds one positive and one negative term: a positive pair
        # counts once per negative of its anchor, a negative pair once per positive
        positive_sums = pair_row_sums(positive, positive_terms, rows.weights * negatives)
        negative_sums = pair_row_sums(negative, negative_terms, rows.weights * positives)
        triplets = rows.weights * positives * negatives
        # Σ over the row's triplets of w_a·β_{y_a} (zero-triplet anchors add 0; the where
        # keeps an out-of-range label's NaN β out of those)
        triplet_beta = jnp.where(triplets > 0, triplets * row_beta, 0.0)
        return positive_sums, negative_sums, triplets, triplet_beta

    positive_sums, negative_sums, triplets, triplet_beta = map_anchor_rows(
        per_rows, batch, block_size, anchor_beta
    )
    loss = positive_sums.loss + negative_sums.loss
    if reduction == "none":
        return loss
    weight = positive_sums.weight + negative_sums.weight
    nonzero = positive_sums.nonzero + negative_sums.nonzero
    if per_class:
        # Σ_T ν·w_a·β_{y_a} shares the pair terms' denominator
        return reductions.reduce_terms(loss + nu * triplet_beta, weight, reduction, nonzero)
    value = reductions.reduce_terms(loss, weight, reduction, nonzero)
    count = jnp.sum(triplets)
    if reduction == reductions.PARTS:
        # ν·β once if the whole batch has a triplet: ν·β·T / T as a fixed "mean" part
        shared = reductions.ReductionParts(nu * beta * count, count, count, reduction="mean")
        return value, shared
    return value + jnp.where(count > 0, nu * beta, 0.0)
