"""InfoNCE-style losses over a batch: NT-Xent (Chen et al. 2020, "A Simple Framework for
Contrastive Learning of Visual Representations", ICML — SimCLR) and the supervised contrastive
loss (Khosla et al. 2020, "Supervised Contrastive Learning", NeurIPS — SupCon).

Both are a log-softmax of temperature-scaled cosine similarities l_ij = s_ij / τ evaluated at
each positive pair (i, p) (same label, p != i); they differ only in the denominator:

* NT-Xent: {p} ∪ N(i) — the pair's own positive and the anchor's negatives (other positives
  of the anchor are left out);
* SupCon: A(i) = every j != i — all other positives included.

One row function (:func:`_positive_log_probs`) computes that masked log-softmax for a block of
anchor rows, so both losses have the dense and the blockwise (``block_size``) form of
:func:`mlx_jax.losses._common.map_anchor_rows`.

Anchors without positives: both losses give such an anchor no term (loss 0, weight 0, zero
gradient), and a batch without any positive pair gives 0 with zero gradients. Unlike a silent
0 (pytorch-metric-learning's ``SupConLoss`` returns 0 for such batches with nothing telling
why: https://github.com/KevinMusgrave/pytorch-metric-learning/issues/744),
:func:`positive_counts` says which anchors had terms, and ``reduction="none"`` returns the
per-anchor (SupCon) or per-pair (NT-Xent) terms.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from mlx_jax import _checks, blockwise, reductions
from mlx_jax.distances import HIGHEST, l2_normalize
from mlx_jax.losses._common import (
    Batch,
    Rows,
    map_anchor_rows,
    masked_logsumexp,
    pair_row_sums,
    prepare_batch,
)


def positive_counts(labels: jax.Array, weights: jax.Array | None = None) -> jax.Array:
    """|P(i)| [B] int32: for each anchor, how many other samples share its label.

    Samples of zero weight count for nothing (a zero-weight anchor has count 0, and a
    zero-weight sample is no one's positive), as in the losses. An anchor has a term in
    :func:`ntxent_loss` and :func:`supcon_loss` iff its count is > 0, so

    * ``supcon_loss(..., reduction="mean") == sum(supcon_loss(..., reduction="none")) /
      sum(w · (positive_counts(labels, w) > 0))``;
    * ``ntxent_loss(..., reduction="mean") == sum(ntxent_loss(..., reduction="none")) /
      sum(w · positive_counts(labels, w))`` (one term per positive pair).

    O(B log B) time and O(B) memory (a sort of the labels), so it is cheap next to the losses.

    Args:
      labels: [B] int class ids.
      weights: optional [B] per-sample weights (None: all ones).
    """
    labels = jnp.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(
            f"labels must have shape [batch] (rank 1), got shape {list(jnp.shape(labels))}"
        )
    labels = _checks.labels_array(labels, labels.shape[0])
    valid = _checks.sample_weights(weights, labels.shape[0], jnp.float32) > 0
    order = jnp.argsort(labels, stable=True)
    sorted_labels = labels[order]
    # valid samples among the first k of the sorted batch, k = 0..B
    valid_before = jnp.concatenate(
        [jnp.zeros((1,), jnp.int32), jnp.cumsum(valid[order].astype(jnp.int32))]
    )
    start = jnp.searchsorted(sorted_labels, labels, side="left")
    stop = jnp.searchsorted(sorted_labels, labels, side="right")
    same_label = valid_before[stop] - valid_before[start]  # the anchor itself included
    return jnp.where(valid, same_label - 1, 0).astype(jnp.int32)


def _positive_log_probs(
    rows: Rows,
    batch: Batch,
    normalized: jax.Array,
    temperature,
    *,
    other_positives: bool,
) -> tuple[jax.Array, jax.Array]:
    """The masked log-softmax both losses share, for a block of R anchor rows.

    With l_ij = cos(x_i, x_j) / τ, returns ``log_prob`` [R, B] and the positive mask [R, B]:
    for each positive pair (i, p)::

        log_prob_ip = l_ip − log( exp(l_ip) + Σ_{k ∈ D(i), k != p} exp(l_ik) )

    with D(i) = A(i) = {j != i} (``other_positives=True``, SupCon) or D(i) = N(i), the
    anchor's negatives (``other_positives=False``, NT-Xent). ``log_prob`` is 0 off the
    positive pairs (and for a pair whose denominator holds only itself), with zero gradient.
    """
    positive, negative = rows.pair_masks(batch)
    anchors = normalized if rows.every_row else l2_normalize(rows.embeddings)
    logits = jnp.matmul(anchors, normalized.T, precision=HIGHEST) / temperature
    if other_positives:
        # log-softmax over A(i) = P(i) ∪ N(i); p ∈ A(i), so the denominator is per row
        log_norm, _ = masked_logsumexp(logits, positive | negative)
        log_prob = logits - log_norm[:, None]
    else:
        # log-softmax over {p} ∪ N(i): l_p − logaddexp(l_p, lse_N) = −softplus(lse_N − l_p);
        # without negatives the pair is alone in its denominator: log_prob = 0
        log_norm, has_negative = masked_logsumexp(logits, negative)
        log_prob = -jnp.where(
            has_negative[:, None], jax.nn.softplus(log_norm[:, None] - logits), 0.0
        )
    return jnp.where(positive, log_prob, 0.0), positive


def _check_temperature(temperature) -> None:
    _checks.positive(temperature, "temperature")


def ntxent_loss(
    embeddings: jax.Array,
    labels: jax.Array,
    *,
    temperature: float = 0.07,
    weights: jax.Array | None = None,
    anchors: jax.Array | None = None,
    reduction: reductions.Reduction = "mean",
    block_size: blockwise.BlockSize = "auto",
) -> jax.Array:
    """NT-Xent (normalized temperature-scaled cross-entropy) over every positive pair.

    With s_ij the cosine similarity of samples i and j, P(i) = {j != i: y_j = y_i} and
    N(i) = {j: y_j != y_i}, the term of the positive pair (i, p) is (Chen et al. 2020, Eq. 1,
    whose 2N augmented views are N classes of two samples; generalised to class labels as
    pytorch-metric-learning's ``NTXentLoss`` does — other positives of the anchor are not in
    the denominator)::

        ℓ(i, p) = −log( exp(s_ip/τ) / (exp(s_ip/τ) + Σ_{n∈N(i)} exp(s_in/τ)) )

    evaluated as softplus(logsumexp_n(s_in/τ) − s_ip/τ) (max-subtracted, so τ = 0.07 cannot
    overflow even for duplicate embeddings). For SimCLR's two-view setting use
    ``self_supervised(ntxent_loss)(view_a, view_b)``.

    Every ordered positive pair is a term; an anchor without positives has none, and a positive
    pair whose anchor has no negative has the term 0 (it counts in ``"mean"``). A batch
    without positive pairs gives 0 with zero gradients; :func:`positive_counts` gives the
    number of terms of each anchor.

    Args:
      embeddings: [B, D] float (any float dtype; computed in at least float32). Normalized
        here (cosine similarity); a zero vector has similarity 0 to everything.
      labels: [B] int class ids.
      temperature: τ > 0; default 0.07, pytorch-metric-learning's ``NTXentLoss`` default.
        The SimCLR paper (Chen et al. 2020) trains with τ = 0.1 on ImageNet and τ = 0.5 on
        CIFAR-10 (Appendix B.9), and compares τ from 0.05 to 1 in its Table 5.
      weights: optional [B] per-sample weights; a pair's weight is its anchor's weight, and a
        zero-weight sample is excluded everywhere (anchor, positive, negative).
      anchors: optional [B] bool, which samples anchor loss terms (None: every sample).
        A sample with ``anchors`` False anchors nothing but is still a positive or
        negative of the anchors: scoring a batch against a reference set, e.g. the
        cross-batch memory of :func:`mlx_jax.memory.memory_loss`.
      reduction: see :mod:`mlx_jax.reductions`, over positive pairs. ``"mean"`` (default) is
        pytorch-metric-learning's ``NTXentLoss`` with its default ``MeanReducer``: the
        average over all positive pairs. ``"none"`` returns the [B, B] matrix of weighted pair
        terms (entry (i, p) for positive pairs, 0 elsewhere).
      block_size: ``"auto"`` (default): dense up to B = 2048, blocks of about 2^18 / B
        anchor rows above on CPU, dense on GPU/TPU (:func:`mlx_jax.blockwise.auto_block_size`);
        None: the [B, B] similarity matrix at once; an int: blocks of that many anchor rows with
        O(B·block_size) memory in the forward and backward pass (:mod:`mlx_jax.blockwise`).
        The same value and gradients in every form.

    Returns:
      scalar (or [B, B] for ``reduction="none"``) in the compute dtype (at least float32).
    """
    batch = prepare_batch(embeddings, labels, weights, anchors=anchors)
    _check_temperature(temperature)
    reductions.check_reduction(reduction, reductions.WITH_PARTS)
    normalized = l2_normalize(batch.embeddings)

    def per_rows(rows: Rows):
        log_prob, positive = _positive_log_probs(
            rows, batch, normalized, temperature, other_positives=False
        )
        terms = -log_prob
        if reduction == "none":
            return terms * rows.weights[:, None]
        return pair_row_sums(positive, terms, rows.weights)

    result = map_anchor_rows(per_rows, batch, block_size)
    if reduction == "none":
        return result
    return reductions.reduce_terms(result.loss, result.weight, reduction, result.nonzero)


def supcon_loss(
    embeddings: jax.Array,
    labels: jax.Array,
    *,
    temperature: float = 0.1,
    weights: jax.Array | None = None,
    anchors: jax.Array | None = None,
    reduction: reductions.Reduction = "mean",
    block_size: blockwise.BlockSize = "auto",
) -> jax.Array:
    """Supervised contrastive loss, each batch sample in turn the anchor.

    With s_ij the cosine similarity of samples i and j, P(i) = {p != i: y_p = y_i} and
    A(i) = {a != i}, anchor i's loss is (Khosla et al. 2020, Eq. 2, the L_out form, which the
    paper finds better than L_in)::

        L_i = −(1/|P(i)|) Σ_{p∈P(i)} log( exp(s_ip/τ) / Σ_{a∈A(i)} exp(s_ia/τ) )

    with a max-subtracted logsumexp for the denominator (no overflow at small τ). The batch may
    hold several views per sample (the paper's multiviewed batch): give views of one sample —
    or of one class — the same label.

    Anchors without positives: such an anchor has no term (loss 0, weight 0, zero gradient),
    ``"mean"`` averages over the anchors *with* positives, and a batch in which no anchor has
    a positive gives 0 with zero gradients. That 0 is not a silent one: ``reduction="none"``
    returns the per-anchor losses, and :func:`positive_counts` ``(labels, weights) > 0`` says
    which anchors had a term (pytorch-metric-learning returns the same 0 with no such way to
    tell, e.g. for batches of distinct labels; see the module docstring).

    pytorch-metric-learning's ``SupConLoss`` (default reducer ``AvgNonZeroReducer``, i.e.
    ``reduction="mean_nonzero"``) equals ``"mean"`` here whenever every anchor with positives
    has a positive loss, which holds for any batch with two or more classes. For a batch of one
    class it returns 0 (it needs a negative pair), while this function gives Eq. 2's value.

    Args:
      embeddings: [B, D] float (any float dtype; computed in at least float32). Normalized
        here (cosine similarity); a zero vector has similarity 0 to everything.
      labels: [B] int class ids.
      temperature: τ > 0; default 0.1, the temperature Khosla et al. found best and
        pytorch-metric-learning's ``SupConLoss`` default.
      weights: optional [B] per-sample weights; an anchor's term is weighted by the anchor's
        weight, and a zero-weight sample is excluded everywhere (anchor, positive, A(i)).
      anchors: optional [B] bool, which samples anchor loss terms (None: every sample).
        A sample with ``anchors`` False anchors nothing but is still a positive or
        negative of the anchors: scoring a batch against a reference set, e.g. the
        cross-batch memory of :func:`mlx_jax.memory.memory_loss`.
      reduction: see :mod:`mlx_jax.reductions`, over anchors with positives. ``"none"``
        returns the [B] per-anchor weighted losses (0 for anchors without a term).
      block_size: ``"auto"`` (default): dense up to B = 2048, blocks of about 2^18 / B
        anchor rows above on CPU, dense on GPU/TPU (:func:`mlx_jax.blockwise.auto_block_size`);
        None: the [B, B] similarity matrix at once; an int: blocks of that many anchor rows with
        O(B·block_size) memory in the forward and backward pass (:mod:`mlx_jax.blockwise`).
        The same value and gradients in every form.

    Returns:
      scalar (or [B] for ``reduction="none"``) in the compute dtype (at least float32).
    """
    batch = prepare_batch(embeddings, labels, weights, anchors=anchors)
    _check_temperature(temperature)
    reductions.check_reduction(reduction, reductions.WITH_PARTS)
    normalized = l2_normalize(batch.embeddings)

    def per_rows(rows: Rows):
        log_prob, positive = _positive_log_probs(
            rows, batch, normalized, temperature, other_positives=True
        )
        count = jnp.sum(positive, axis=1, dtype=log_prob.dtype)
        losses = -reductions.safe_divide(jnp.sum(log_prob, axis=1), count)
        return losses, jnp.where(count > 0, rows.weights, 0.0)

    losses, anchor_weight = map_anchor_rows(per_rows, batch, block_size)
    return reductions.reduce_weighted(losses, anchor_weight, reduction)


def self_supervised(loss_fn: Callable[..., jax.Array]) -> Callable[..., jax.Array]:
    """Turns a loss over (embeddings, labels) into one over two augmented views of a batch.

    ``self_supervised(loss_fn)(view_a, view_b, *, weights=None, **kwargs)`` with
    ``view_a``, ``view_b`` [B, D] (view_b[i] another augmentation of the sample of
    view_a[i]) labels sample i of both views with i and returns
    ``loss_fn(concat([view_a, view_b]), concat([arange(B), arange(B)]), **kwargs)`` — so
    ``self_supervised(ntxent_loss)`` is SimCLR's loss over its 2N views (Chen et al. 2020,
    Eq. 1, averaged over all 2N ordered positive pairs as in their Algorithm 1), the same as
    pytorch-metric-learning's ``SelfSupervisedLoss(NTXentLoss())`` (``symmetric=True``, its
    default).

    ``weights``, if given, is [B], one weight per sample, applied to both of its views (0 drops
    the sample, e.g. padding). Other keyword arguments go to ``loss_fn`` unchanged; with
    ``reduction="none"`` the result is indexed by the 2B concatenated views (view_a first).

    Raises ``ValueError`` (at trace time) when a view is not [B, D] or the views' shapes differ.
    """

    def loss(view_a: jax.Array, view_b: jax.Array, *, weights=None, **kwargs) -> jax.Array:
        a = _checks.embeddings_array(view_a, "view_a")
        b = _checks.embeddings_array(view_b, "view_b")
        if a.shape != b.shape:
            raise ValueError(
                f"view_b must have the shape of view_a {list(a.shape)} (one augmentation per "
                f"sample), got shape {list(b.shape)}"
            )
        a, b = _checks.promote_all(a, b)
        size = a.shape[0]
        index = jnp.arange(size, dtype=jnp.int32)
        if weights is not None:
            w = _checks.sample_weights(weights, size, a.dtype)
            kwargs["weights"] = jnp.concatenate([w, w])
        return loss_fn(jnp.concatenate([a, b]), jnp.concatenate([index, index]), **kwargs)

    name = getattr(loss_fn, "__name__", type(loss_fn).__name__)
    loss.__name__ = loss.__qualname__ = f"self_supervised({name})"
    loss.__doc__ = f"``{name}`` over two views [B, D] of a batch; see :func:`self_supervised`."
    return loss
