"""N-pair losses over a batch: the multi-class N-pair loss (Sohn 2016, "Improved Deep Metric
Learning with Multi-class N-pair Loss Objective", NeurIPS) and the angular loss in its N-pair
form (Wang, Zhou, Wen, Liu & Lin 2017, "Deep Metric Learning with Angular Loss", ICCV).

Both are a sum over (anchor a, positive p) tuples of::

    ℓ(a, p) = log(1 + Σ_{n ∈ N(a, p)} exp(z_apn))

and differ only in the logit z_apn. They share the tuple construction (``pairs=``):

* ``"one_per_class"``: Sohn's N-pair batch. Each class with two or more (nonzero-weight)
  samples gives one tuple: the class's first sample in batch order is the anchor, its second
  the positive; later samples of the class are not used. The negatives of a tuple are the
  positives of the *other* tuples (Sohn's f_j+, j != i). This is pytorch-metric-learning's
  ``convert_to_pos_pairs_with_unique_labels``: of all positive pairs (a, p) in row-major
  order it keeps the first of each anchor label, i.e. (first, second) of each class.
* ``"all"``: every ordered positive pair (a, p), a != p, same label; the negatives are every
  sample of another class. This is pytorch-metric-learning's ``AngularLoss`` construction
  (``get_all_pairs_indices``), and it uses every sample of the batch.

One row-blocked mechanism evaluates both (:func:`mlx_jax.losses._common.map_anchor_rows`):
each anchor row gets its positives and its negative mask, and each tuple's log(1 + Σ exp) is a
max-subtracted log-sum-exp over that mask followed by a softplus, so no logit overflows and a
tuple without negatives is log(1) = 0 with zero gradient. For ``"all"`` the rows are the
batch's samples against all B columns (every member of the anchor's class in label order,
:func:`mlx_jax.mining.positive_slots`, as positives). ``"one_per_class"`` gathers its tuples
into T = max(B // 2, 1) slots first — anchors as rows, their positives as columns — so its
logits are [T, T], a quarter of the [B, B] products.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from mlx_jax import _checks, blockwise, reductions
from mlx_jax.distances import HIGHEST, l2_normalize
from mlx_jax.losses._common import (
    Batch,
    Rows,
    log_one_plus_sum_exp,
    map_anchor_rows,
    masked_logsumexp,
    pair_row_sums,
    prepare_batch,
)
from mlx_jax.mining import class_index, positive_slots

__all__ = ["PAIRS", "Pairs", "angular_loss", "npairs_loss"]

Pairs = Literal["one_per_class", "all"]
PAIRS: tuple[str, ...] = ("one_per_class", "all")

# The angular logit depends on the positive (x_a + x_p), so each (anchor, positive) needs its
# own [B] row of logits: positives are visited this many at a time ([R, 8, B] per step).
_POSITIVE_CHUNK = 8
_SMALLEST_WIDTH = 4  # slots of the narrowest branch: 4 per class gives 3 positives


class _Tuples(NamedTuple):
    """The tuples of a block of R anchor rows: ``positive`` [R, K] int32 batch indices,
    ``mask`` [R, K] bool (which of them are tuples), ``negative`` [R, B] bool, and ``used``
    (int32 scalar): only the first ``used`` of the K slots can hold a tuple."""

    positive: jax.Array
    mask: jax.Array
    negative: jax.Array
    used: jax.Array | int


class _FirstPairs(NamedTuple):
    """``"one_per_class"`` selection, [B] each: ``anchor`` (the first valid sample of a class
    with two or more), ``partner`` (its positive: the class's second valid sample; arbitrary
    elsewhere) and ``positive`` (a selected positive)."""

    anchor: jax.Array
    partner: jax.Array
    positive: jax.Array


def _first_pairs(labels: jax.Array, valid: jax.Array) -> _FirstPairs:
    """The first and second valid sample of every class, in batch order: O(B log B), no
    [B, B] matrix (a stable sort keeps batch order within a class)."""
    size = labels.shape[0]
    order = jnp.argsort(labels, stable=True).astype(jnp.int32)
    sorted_labels = labels[order]
    sorted_valid = valid[order]
    # valid samples among the first k of the sorted batch, k = 0..B
    before = jnp.concatenate(
        [jnp.zeros((1,), jnp.int32), jnp.cumsum(sorted_valid.astype(jnp.int32))]
    )
    start = jnp.searchsorted(sorted_labels, sorted_labels, side="left")
    stop = jnp.searchsorted(sorted_labels, sorted_labels, side="right")
    rank = before[:-1] - before[start]  # valid members of the class before this one
    count = before[stop] - before[start]
    # sorted position s of the class's second valid member: before[s + 1] - before[start] = 2
    second = jnp.searchsorted(before, before[start] + 2, side="left") - 1
    partner = order[jnp.clip(second, 0, size - 1)]
    anchor = sorted_valid & (rank == 0) & (count >= 2)
    positive = sorted_valid & (rank == 1)
    return _FirstPairs(
        jnp.zeros(size, bool).at[order].set(anchor),
        jnp.zeros(size, jnp.int32).at[order].set(partner),
        jnp.zeros(size, bool).at[order].set(positive),
    )


# terms(rows, tuples, columns): the [R, K] tuple losses of a block of anchor rows, where
# ``columns`` [N, D] are the raw embeddings that ``tuples.positive`` and ``tuples.negative``
# index (the whole batch, or the tuples' positives in the compact form).
TermsFn = Callable[[Rows, _Tuples, jax.Array], jax.Array]


def _tuple_loss(
    batch: Batch,
    pairs: str,
    reduction: str,
    block_size: blockwise.BlockSize,
    terms: TermsFn,
) -> jax.Array:
    """Builds each anchor row's tuples, evaluates ``terms(rows, tuples, columns)`` ([R, K]
    losses) and reduces them over tuples; a tuple's weight is its anchor's weight. ``"none"``
    gives the [B, B] matrix of weighted tuple losses, entry (a, p).

    ``"all"``: the rows are the batch's samples, the columns the whole batch. ``"one_per_class"``
    runs on its tuples alone: the T = max(B // 2, 1) slots (a tuple takes two samples) hold
    the tuples' anchors as rows and their positives as columns, so the logits are [T, T]
    instead of [B, B] — a quarter of the products; PML's ``NPairsLoss`` works on the same
    [N, N] — and slot i's negatives are the other slots' positives."""
    size = batch.labels.shape[0]

    if pairs == "one_per_class":
        slots = max(size // 2, 1)
        first = _first_pairs(batch.labels, batch.valid)
        (anchor,) = jnp.nonzero(first.anchor, size=slots, fill_value=0)
        anchor = anchor.astype(jnp.int32)
        partner = first.partner[anchor]
        used = jnp.arange(slots) < jnp.sum(first.anchor)
        rows_of = Batch(
            batch.embeddings[anchor],
            batch.labels[anchor],
            jnp.where(used, batch.weights[anchor], 0.0),
            used,
            jnp.where(used, batch.anchor_weights[anchor], 0.0),
        )
        columns = batch.embeddings[partner]
        slot = jnp.arange(slots, dtype=jnp.int32)

        def tuples_of(rows: Rows) -> tuple[Rows, _Tuples]:
            own = jnp.minimum(rows.index, slots - 1)[:, None]  # blockwise padding: any slot
            negative = rows.valid[:, None] & used[None, :] & (rows.index[:, None] != slot)
            # the rows are anchors and the columns their positives: never the dense symmetric form
            return rows._replace(every_row=False), _Tuples(own, rows.valid[:, None], negative, 1)

    else:
        rows_of, columns = batch, batch.embeddings
        index = class_index(batch.labels)

        def tuples_of(rows: Rows) -> tuple[Rows, _Tuples]:
            # every member of the anchor's class, in label order (slot s: the s-th member)
            slot, mask = positive_slots(
                index, size, rows.index, rows.labels, rows.valid, batch.valid
            )
            return rows, _Tuples(slot, mask, rows.pair_masks(batch)[1], index.largest)

    def per_rows(rows: Rows):
        rows, tuples = tuples_of(rows)
        losses = jnp.where(tuples.mask, terms(rows, tuples, columns), 0.0)
        if reduction == "none":
            weighted = jnp.where(tuples.mask, losses * rows.weights[:, None], 0.0)
            row = jnp.arange(losses.shape[0])[:, None]
            return (
                jnp.zeros((losses.shape[0], columns.shape[0]), losses.dtype)
                .at[row, tuples.positive]
                .add(weighted)
            )
        return pair_row_sums(tuples.mask, losses, rows.weights)

    result = map_anchor_rows(per_rows, rows_of, block_size)
    if reduction == "none" and pairs == "one_per_class":
        # slot i's loss sits at (i, i): entry (anchor_i, partner_i) of the batch matrix
        return jnp.zeros((size, size), result.dtype).at[anchor, partner].add(jnp.diagonal(result))
    if reduction == "none":
        return result
    return reductions.reduce_terms(result.loss, result.weight, reduction, result.nonzero)


def _over_positive_chunks(
    chunk_terms: Callable[[jax.Array, jax.Array], jax.Array], tuples: _Tuples
) -> jax.Array:
    """``chunk_terms(positive [R, C], mask [R, C]) -> [R, C]`` over the K positive slots of
    the rows, at most C = 8 at a time, each chunk rematerialised when differentiating
    (O(R·8·B) memory).

    Only the first ``tuples.used`` slots can hold a tuple. The slots run are the smallest width
    of 4, 8, 16, 32, … (and K) that covers them, picked at run time (``lax.switch`` over static
    widths): one chunk of 4 for classes of up to 5 samples (the usual 4 per class of a
    class-balanced batch: 3 of 4 slots used, where a chunk of 8 wastes 5), one of 8 up to 9,
    then chunks of 8; no batch runs more than twice the slots it needs. (A scan over all
    ⌈K/8⌉ chunks would also add each skipped chunk's zero cotangent of the [R, B] anchor
    logits.)
    """
    rows, count = tuples.positive.shape
    widths = [min(_SMALLEST_WIDTH, count)]
    while widths[-1] < count:
        widths.append(min(2 * widths[-1], count))
    if len(widths) == 1:
        return chunk_terms(tuples.positive, tuples.mask)

    def run(width: int) -> Callable[[jax.Array, jax.Array], jax.Array]:
        chunks = -(-width // _POSITIVE_CHUNK)

        def terms(positive: jax.Array, mask: jax.Array) -> jax.Array:
            positive, mask = positive[:, :width], mask[:, :width]
            if chunks == 1:
                out = chunk_terms(positive, mask)
            else:
                pad = [(0, 0), (0, chunks * _POSITIVE_CHUNK - width)]

                def split(a: jax.Array) -> jax.Array:
                    return jnp.pad(a, pad).reshape(rows, chunks, _POSITIVE_CHUNK).swapaxes(0, 1)

                step = jax.checkpoint(lambda args: chunk_terms(*args))
                out = jax.lax.map(step, (split(positive), split(mask)))
                out = out.swapaxes(0, 1).reshape(rows, chunks * _POSITIVE_CHUNK)[:, :width]
            return jnp.pad(out, [(0, 0), (0, count - width)])

        return terms

    branch = jnp.searchsorted(jnp.asarray(widths), tuples.used, side="left")
    branches = [run(width) for width in widths]
    return jax.lax.switch(branch, branches, tuples.positive, tuples.mask)


def npairs_loss(
    embeddings: jax.Array,
    labels: jax.Array,
    *,
    normalize: bool = True,
    l2_reg: float = 0.0,
    pairs: Pairs = "one_per_class",
    weights: jax.Array | None = None,
    reduction: reductions.Reduction = "mean",
    block_size: blockwise.BlockSize = "auto",
) -> jax.Array:
    """Multi-class N-pair loss (N-pair-mc), one (anchor, positive) tuple per class by default.

    With f the embeddings and tuples (f_i, f_i+), i = 1..N, from N different classes, tuple i's
    loss is (Sohn 2016, Eq. 3 for one (N+1)-tuplet, Eq. 6 for the N-pair-mc batch)::

        ℓ_i = log(1 + Σ_{k≠i} exp(f_iᵀf_k+ − f_iᵀf_i+))  [+ λ/4·(‖f_i‖² + ‖f_i+‖²)]

    i.e. a softmax cross-entropy of anchor i over the N positives with target i+, and the batch
    loss is their mean (Eq. 6's 1/N). It is evaluated as softplus(logsumexp_k(f_iᵀf_k+) −
    f_iᵀf_i+) with the maximum subtracted, so large logits do not overflow.

    Tuples (``pairs``, see :mod:`mlx_jax.losses.npairs`): ``"one_per_class"`` (default) takes
    the first two nonzero-weight samples of each class in batch order, as
    pytorch-metric-learning's ``NPairsLoss`` does; the negatives of tuple i are the other
    tuples' positives. Only two samples per class are used: with m > 2 samples per class the
    other m − 2 contribute nothing. ``"all"`` makes every ordered positive pair (a, p) a tuple
    with every sample of another class as a negative — ℓ(a, p) = log(1 + Σ_{y_n≠y_a}
    exp(f_aᵀf_n − f_aᵀf_p)) — so every sample counts, and on a batch of exactly two samples
    per class each class gives two tuples (both orders) with 2(N − 1) negatives each instead of
    N − 1.

    Normalization. Sohn's f are unnormalized and the paper keeps their norms in check with the
    L2 regularizer (λ = 0.002): pass ``normalize=False, l2_reg=0.002`` for that form. The
    default ``normalize=True, l2_reg=0`` is pytorch-metric-learning's ``NPairsLoss()``, whose
    default ``DotProductSimilarity`` L2-normalizes the embeddings (cosine logits, temperature 1)
    and which has no regularizer: without normalization and without the regularizer the loss
    can be driven to 0 by growing the embeddings, so the unnormalized form is offered only
    with an explicit ``l2_reg``.

    The regularizer term of a tuple is λ/4·(‖f_a‖² + ‖f_p‖²) on the *raw* embeddings, so that
    ``"mean"`` adds λ/4·(mean_a ‖f_a‖² + mean_p ‖f_p‖²), the form of TensorFlow's
    ``tf.contrib.losses.metric_learning.npairs_loss(reg_lambda=0.002)`` (the paper gives λ, not
    the normalization). On a batch of exactly two samples per class this equals PML's
    ``NPairsLoss(embedding_regularizer=LpRegularizer(power=2), embedding_reg_weight=λ/2)``
    (PML regularizes every sample of the batch; here only tuple members).

    Degenerate batches: no positive pair (every sample its own class, all weights zero) → no
    tuple, loss 0 with zero gradients. One class → one tuple (every ordered pair with
    ``"all"``) without negatives: log(1) = 0, plus the regularizer if any. Zero-norm
    embeddings have cosine 0 to everything (``normalize=True``) and finite gradients.

    Args:
      embeddings: [B, D] float (any float dtype; computed in at least float32).
      labels: [B] int class ids.
      normalize: L2-normalize the embeddings (cosine logits); default True, PML's
        ``NPairsLoss`` (its ``DotProductSimilarity(normalize_embeddings=True)``). False: the
        paper's raw dot products.
      l2_reg: λ >= 0, the weight of the embedding regularizer above; default 0, PML's
        ``NPairsLoss()`` (no regularizer). The paper uses λ = 0.002 with ``normalize=False``.
      pairs: ``"one_per_class"`` (default; Sohn's N-pair batch and PML's selection) or
        ``"all"``, see above.
      weights: optional [B] per-sample weights; a tuple's term carries its anchor's weight,
        and a zero-weight sample is excluded everywhere (it is skipped by the selection, and is
        never a positive or a negative), so padding a batch leaves the loss unchanged.
      reduction: see :mod:`mlx_jax.reductions`, over tuples. ``"mean"`` (default) is Eq. 6's
        1/N and PML's ``MeanReducer`` (its default for this loss). ``"none"`` returns the
        [B, B] matrix of weighted tuple losses (entry (a, p) for each tuple, 0 elsewhere).
      block_size: over the anchor rows: the T = max(B // 2, 1) tuple slots for
        ``"one_per_class"`` (their [T, T] logits), the B samples for ``"all"`` ([B, B]).
        ``"auto"`` (default): dense up to 2048 rows, blocks of about 2^18 / rows above on CPU,
        dense on GPU/TPU (:func:`mlx_jax.blockwise.auto_block_size`); None: all rows at once;
        an int: blocks of that many anchor rows with O(columns·block_size) memory in the
        forward and backward pass (:mod:`mlx_jax.blockwise`). The same value and gradients in
        every form.

    Returns:
      scalar (or [B, B] for ``reduction="none"``) in the compute dtype (at least float32).
    """
    batch = prepare_batch(embeddings, labels, weights)
    if not isinstance(normalize, bool):
        raise TypeError(f"normalize must be a bool, got {normalize!r}")
    _checks.non_negative(l2_reg, "l2_reg")
    _checks.choice(pairs, "pairs", PAIRS)
    reductions.check_reduction(reduction)

    def terms(rows: Rows, tuples: _Tuples, raw_columns: jax.Array) -> jax.Array:
        columns = l2_normalize(raw_columns) if normalize else raw_columns
        if rows.every_row:
            anchors = columns
        else:
            anchors = l2_normalize(rows.embeddings) if normalize else rows.embeddings
        logits = jnp.matmul(anchors, columns.T, precision=HIGHEST)
        # the negatives do not depend on the positive: one log-sum-exp per anchor
        log_negatives, has_negative = masked_logsumexp(logits, tuples.negative)
        positive_logits = jnp.take_along_axis(logits, tuples.positive, axis=1)
        losses = jnp.where(
            has_negative[:, None], jax.nn.softplus(log_negatives[:, None] - positive_logits), 0.0
        )
        if _checks.is_concrete(l2_reg) and np.ndim(l2_reg) == 0 and float(l2_reg) == 0.0:
            return losses  # no 0·‖f‖² term (it would be NaN for an overflowing norm)
        anchor_norms = jnp.sum(rows.embeddings * rows.embeddings, axis=1)
        squared_norms = jnp.sum(raw_columns * raw_columns, axis=1)
        penalty = anchor_norms[:, None] + squared_norms[tuples.positive]
        return losses + (0.25 * l2_reg) * penalty

    return _tuple_loss(batch, pairs, reduction, block_size, terms)


def _check_alpha(alpha) -> None:
    """0 < alpha < 90 degrees when concrete (traced values pass through)."""
    if _checks.is_concrete(alpha) and np.ndim(alpha) == 0 and not 0.0 < float(alpha) < 90.0:
        raise ValueError(f"alpha must be in (0, 90) degrees, got {alpha}")


def angular_loss(
    embeddings: jax.Array,
    labels: jax.Array,
    *,
    alpha: float = 40.0,
    pairs: Pairs = "all",
    weights: jax.Array | None = None,
    reduction: reductions.Reduction = "mean",
    block_size: blockwise.BlockSize = "auto",
) -> jax.Array:
    """Angular loss in its N-pair form, every positive pair a tuple by default.

    With x the L2-normalized embeddings and α the angle at the negative, the tuple (x_a, x_p)
    has (Wang et al. 2017, Eq. 8)::

        ℓ(a, p) = log(1 + Σ_{n ∈ N(a)} exp(4·tan²α·(x_a + x_p)ᵀx_n − 2·(1 + tan²α)·x_aᵀx_p))

    For unit vectors the exponent is the angular hinge ‖x_a − x_p‖² − 4·tan²α·‖x_n − x_c‖²
    (x_c = (x_a + x_p)/2) less the constant 2 − 6·tan²α, which the paper drops; the identity
    needs ‖x‖ = 1 for every sample, so a, p *and* n are normalized here. The batch loss is the
    mean over tuples. Each tuple's logits form one log-sum-exp with the maximum subtracted, so
    α near 90° (tan²α large) does not overflow.

    Tuples (``pairs``, see :mod:`mlx_jax.losses.npairs`): ``"all"`` (default) makes every
    ordered positive pair a tuple with every sample of another class as a negative, as
    pytorch-metric-learning's ``AngularLoss`` does; ``"one_per_class"`` is Sohn's N-pair batch
    (the first two samples of each class; the negatives are the other tuples' positives), the
    tuples of :func:`npairs_loss`'s default. The paper's combined objective, N-pair loss plus
    λ·angular loss with λ = 2, is the sum of the two functions on the same tuples, e.g.
    ``npairs_loss(e, y) + 2.0 * angular_loss(e, y, pairs="one_per_class")``; it is not a
    separate option.

    pytorch-metric-learning's ``AngularLoss(alpha=40)`` (``MeanReducer``, over positive pairs)
    normalizes the anchors and positives but uses the *raw* embeddings as the negatives x_n,
    which is Eq. 8 only for unit-norm inputs. This function normalizes all three: it equals PML
    on L2-normalized inputs (value and gradient, e.g. PML applied to
    ``torch.nn.functional.normalize(x)``) and differs otherwise.

    Degenerate batches: no positive pair → no tuple, loss 0 with zero gradients; a one-class
    batch has tuples without negatives: log(1) = 0 each, loss 0 with zero gradients (PML
    returns 0 too). A zero-norm embedding stays a zero vector (finite gradients).

    Cost: a tuple's logits depend on x_p, so each anchor row visits its positives 8 at a time
    ([R, 8, B] logits per step, as many steps as the largest class of the batch needs, rounded
    up to a power of two): one step, 8·B² logits, for classes of up to 8 samples, and
    O(R·8·B) memory for R anchor rows at a time. ``"one_per_class"`` has one positive per
    tuple and runs on its T = max(B // 2, 1) tuples alone: T² logits.

    Args:
      embeddings: [B, D] float (any float dtype; computed in at least float32).
      labels: [B] int class ids.
      alpha: α in degrees, 0 < α < 90; default 40, pytorch-metric-learning's ``AngularLoss``
        default.
      pairs: ``"all"`` (default; PML's construction) or ``"one_per_class"``, see above.
      weights: optional [B] per-sample weights; a tuple's term carries its anchor's weight,
        and a zero-weight sample is excluded everywhere (anchor, positive, negative).
      reduction: see :mod:`mlx_jax.reductions`, over tuples. ``"mean"`` (default) is PML's
        ``MeanReducer``. ``"none"`` returns the [B, B] matrix of weighted tuple losses (entry
        (a, p) for each tuple, 0 elsewhere).
      block_size: over the anchor rows (B samples, or T tuples for ``"one_per_class"``).
        ``"auto"`` (default): dense up to 2048 rows, blocks of about 2^18 / rows above on CPU,
        dense on GPU/TPU (:func:`mlx_jax.blockwise.auto_block_size`); None: all anchor rows at
        once; an int: blocks of that many anchor rows with O(block_size·8·B) memory in the
        forward and backward pass (:mod:`mlx_jax.blockwise`).
        The same value and gradients in every form.

    Returns:
      scalar (or [B, B] for ``reduction="none"``) in the compute dtype (at least float32).
    """
    batch = prepare_batch(embeddings, labels, weights)
    _check_alpha(alpha)
    _checks.choice(pairs, "pairs", PAIRS)
    reductions.check_reduction(reduction)
    dtype = batch.embeddings.dtype
    tan_squared = jnp.tan(jnp.deg2rad(jnp.asarray(alpha, dtype))) ** 2
    negative_scale = 4.0 * tan_squared
    positive_scale = 2.0 * (1.0 + tan_squared)

    def terms(rows: Rows, tuples: _Tuples, columns: jax.Array) -> jax.Array:
        x = l2_normalize(columns)
        anchors = x if rows.every_row else l2_normalize(rows.embeddings)
        anchor_cosines = jnp.matmul(anchors, x.T, precision=HIGHEST)  # x_aᵀx_n, [R, B]

        def chunk_terms(positive: jax.Array, mask: jax.Array) -> jax.Array:
            ap = jnp.take_along_axis(anchor_cosines, positive, axis=1)  # x_aᵀx_p, [R, C]
            # x_pᵀx_n, [R, C, B]
            if rows.every_row:  # the rows are the whole batch: x_pᵀx_n is a row of it
                pn = anchor_cosines[positive]
            else:
                pn = jnp.einsum("rcd,bd->rcb", x[positive], x, precision=HIGHEST)
            logits = (
                negative_scale * (anchor_cosines[:, None, :] + pn) - positive_scale * ap[:, :, None]
            )
            keep = mask[:, :, None] & tuples.negative[:, None, :]
            shape = logits.shape
            flat = log_one_plus_sum_exp(logits.reshape(-1, shape[2]), keep.reshape(-1, shape[2]))
            return flat.reshape(shape[:2])

        return _over_positive_chunks(chunk_terms, tuples)

    return _tuple_loss(batch, pairs, reduction, block_size, terms)
