"""Triplet loss with online mining (FaceNet) and the triplet-center loss (He et al. 2018)."""

from __future__ import annotations

from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp

from mlx_jax import _checks, blockwise, reductions
from mlx_jax import mining as mining_lib
from mlx_jax.distances import safe_sqrt, squared_euclidean, squared_euclidean_rows
from mlx_jax.losses._common import Rows, map_anchor_rows, prepare_batch

Mining = Literal["semihard", "batch_hard", "all", "semihard_band"]
MINING: tuple[str, ...] = ("semihard", "batch_hard", "all", "semihard_band")
# triplet_center_loss's default margin m (see its docstring for the source).
TRIPLET_CENTER_MARGIN = 5.0
# Default static bound on the positives per anchor for the sort-free path: covers batches
# sampled with up to 8 samples per class (PK sampling, P×K with K <= 8); larger classes fall back
# to the sort-based path, exact too.
DEFAULT_MAX_POSITIVES = 7


def _distances(x: jax.Array, y: jax.Array | None, squared: bool) -> jax.Array:
    d2 = squared_euclidean(x, y)
    return d2 if squared else safe_sqrt(d2)


def _hinge(violation: jax.Array, soft: bool) -> jax.Array:
    return jax.nn.softplus(violation) if soft else jax.nn.relu(violation)


def triplet_loss(
    embeddings: jax.Array,
    labels: jax.Array,
    *,
    margin: float = 0.2,
    mining: Mining = "semihard",
    squared: bool = True,
    soft: bool = False,
    semihard_fallback: mining_lib.SemihardFallback = "farthest",
    weights: jax.Array | None = None,
    anchors: jax.Array | None = None,
    reduction: reductions.Reduction = "mean",
    max_positives: int | None = DEFAULT_MAX_POSITIVES,
    block_size: blockwise.BlockSize = "auto",
) -> jax.Array:
    """Triplet loss over triplets mined online from the batch (Schroff et al. 2015, Eq. 1/2).

    For a triplet (anchor a, positive p of a's class, negative n of another class)::

        L(a, p, n) = [ d(a, p) − d(a, n) + α ]₊

    with d = ‖·‖² (FaceNet, ``squared=True``) or ‖·‖ (``squared=False``, PML's
    ``LpDistance``). The loss is taken on the embeddings as given — FaceNet L2-normalizes its
    embeddings; normalize them yourself if you want that.

    Mining (see :mod:`mlx_jax.mining`):

    * ``"semihard"`` (default, FaceNet): every anchor-positive pair with the closest negative
      farther than the positive; pairs with no such negative use ``semihard_fallback``
      (``"farthest"`` negative, as TF's reference implementation, or ``"drop"``).
      ``reduction="none"`` → [B, B] (anchor, positive).
    * ``"batch_hard"`` (Hermans et al. 2017): per anchor, farthest positive and closest
      negative. ``"none"`` → [B]. The two are picked on the distance matrix (a tie goes to the
      smallest batch index, as ``torch.max`` in PML) and their distances are recomputed from
      the embeddings by direct subtraction, so gradients flow through those 2·B pairs only —
      the usual subgradient of the max/min, O(B·D) in the backward pass.
    * ``"all"``: every valid triplet. ``"none"`` → [B, B], summed over negatives.
    * ``"semihard_band"`` (PML ``TripletMarginMiner(type_of_triplets="semihard")``): every
      triplet with 0 < d(a, n) − d(a, p) ≤ α. ``"none"`` → [B, B], summed over negatives.

    Cost. ``"semihard"``, ``"all"`` and ``"semihard_band"`` visit each anchor's positives in
    ``max_positives + 1`` slots found from the sorted labels and compare each positive distance
    with all of the anchor's distances: O(B²·max_positives) time, no sort, no B×B×B tensor.
    When some class of the batch has more than ``max_positives + 1`` samples (or
    ``max_positives=None``) they use the sort-based path instead (chosen at run time with
    ``lax.cond``, same result): each anchor's negatives sorted once, semi-hard negatives by
    binary search, and for the hinge Σ_n [d_ap − d_an + α]₊ = k·(d_ap + α) − (sum of those k
    distances) from prefix sums — O(B² log B) time, O(B²) memory; ``soft=True`` there loops over
    anchors with O(B²) memory per step.

    Args:
      embeddings: [B, D] float (computed in at least float32).
      labels: [B] int class ids.
      margin: α; default 0.2 (FaceNet, Sec. 3). Must be >= 0.
      mining: one of ``"semihard"``, ``"batch_hard"``, ``"all"``, ``"semihard_band"``.
      squared: squared Euclidean (FaceNet, default) or Euclidean distances.
      soft: replace [·]₊ by softplus (Hermans et al. 2017's soft margin is this with
        ``margin=0``; PML's ``smooth_loss=True`` keeps the margin, as here).
      semihard_fallback: ``"farthest"`` (default) or ``"drop"``; only for ``"semihard"``.
      weights: optional [B] per-sample weights; a triplet's weight is its anchor's weight and
        zero-weight samples are never anchor, positive or negative.
      anchors: optional [B] bool, which samples anchor loss terms (None: every sample).
        A sample with ``anchors`` False anchors nothing but is still a positive or
        negative of the anchors: scoring a batch against a reference set, e.g. the
        cross-batch memory of :func:`mlx_jax.memory.memory_loss`.
      reduction: ``"mean"`` over mined triplets (default; TF's semi-hard loss averages over
        anchor-positive pairs the same way), ``"sum"`` (FaceNet's Σ), ``"mean_nonzero"``
        (PML's default ``AvgNonZeroReducer``) or ``"none"``.
      max_positives: static bound on positives per anchor for the sort-free path (default 7:
        batches with up to 8 samples per class, our choice for PK sampling); larger classes
        or None → the sort-based path. Not used by ``"batch_hard"``.
      block_size: ``"auto"`` (default): dense up to B = 2048, blocks of about 2^18 / B
        anchor rows above on CPU, dense on GPU/TPU (:func:`mlx_jax.blockwise.auto_block_size`);
        None: the [B, B] distance matrix at once; an int: blocks of that many anchor rows with
        O(B·block_size) memory in the forward and backward pass (:mod:`mlx_jax.blockwise`;
        times ``max_positives + 1`` for the sort-free path).
        The same value and gradients in every form.

    Returns:
      float32 scalar (or the per-term array described above for ``reduction="none"``).
    """
    batch = prepare_batch(embeddings, labels, weights, anchors=anchors)
    _checks.choice(mining, "mining", MINING)
    reductions.check_reduction(reduction, reductions.WITH_PARTS)
    _checks.non_negative(margin, "margin")
    if semihard_fallback not in ("farthest", "drop"):
        raise ValueError(
            f"semihard_fallback must be 'farthest' or 'drop', got {semihard_fallback!r}"
        )
    if max_positives is not None and (
        isinstance(max_positives, bool) or not isinstance(max_positives, int) or max_positives < 1
    ):
        raise ValueError(f"max_positives must be None or an int >= 1, got {max_positives!r}")
    x = batch.embeddings

    if mining == "batch_hard":

        def hardest(rows: Rows):
            # Mining only picks indices: the selected distances are recomputed from the two
            # embeddings, so the backward pass is a gather (O(B·D)), not a pass over the
            # [R, B] matrix and a second B×B matmul. Selection uses squared distances (sqrt is
            # monotonic); a tie goes to the smallest index (as torch.max in PML).
            d2 = jax.lax.stop_gradient(squared_euclidean_rows(x, rows.index, rows.embeddings))
            positive, negative = rows.pair_masks(batch)
            farthest, farthest_d2 = _first_extreme_index(jnp.where(positive, d2, -jnp.inf), jnp.max)
            closest, closest_d2 = _first_extreme_index(jnp.where(negative, d2, jnp.inf), jnp.min)
            # A row with no positive (negative) picks index 0: check it is a real pair.
            has_both = _picked(positive, farthest) & _picked(negative, closest)
            # A NaN distance (NaN embeddings) must show in the loss, not drop the anchor.
            poisoned = jnp.isnan(farthest_d2) | jnp.isnan(closest_d2)
            # Blockwise, the backward pass reuses these instead of recomputing the block.
            farthest, closest, has_both, poisoned = blockwise.keep_for_backward(
                (farthest, closest, has_both, poisoned)
            )
            d_ap = _squared_distance_to(rows.embeddings, x, farthest, has_both)
            d_an = _squared_distance_to(rows.embeddings, x, closest, has_both)
            if not squared:
                d_ap, d_an = safe_sqrt(d_ap), safe_sqrt(d_an)
            loss = jnp.where(poisoned, jnp.nan, _hinge(d_ap - d_an + margin, soft))
            return loss, jnp.where(has_both | poisoned, rows.weights, 0.0)

        losses, weight = map_anchor_rows(hardest, batch, block_size)
        return reductions.reduce_weighted(losses, weight, reduction)

    options = _Options(margin, mining, soft, semihard_fallback, reduction == "none")
    slots = None if max_positives is None else min(max_positives + 1, x.shape[0])
    index = None if slots is None else mining_lib.class_index(batch.labels)

    def per_rows(rows: Rows):
        d2 = rows.squared_distances(batch)
        distances = d2 if squared else safe_sqrt(d2)
        positive, negative = rows.pair_masks(batch)

        def every_pair():
            terms = _all_positive_terms(distances, positive, negative, options)
            return _row_result(terms, rows.weights, None, x.shape[0], reduction)

        if index is None:
            return every_pair()

        def slotted():
            slot_index, slot_mask = mining_lib.positive_slots(
                index, slots, rows.index, rows.labels, rows.valid, batch.valid
            )
            d_ap = jnp.take_along_axis(distances, slot_index, axis=1)
            terms = _direct_terms(distances, d_ap, slot_mask, negative, options)
            return _row_result(terms, rows.weights, slot_index, x.shape[0], reduction)

        return jax.lax.cond(index.largest <= slots, slotted, every_pair)

    result = map_anchor_rows(per_rows, batch, block_size)
    if reduction == "none":
        return result
    return reductions.reduce_terms(*result[:2], reduction, result[2])


def _first_extreme_index(values: jax.Array, extreme) -> tuple[jax.Array, jax.Array]:
    """Per row of ``values`` [R, B], the smallest column index holding ``extreme`` (jnp.max or
    jnp.min) of the row and that value; [R] int32 and [R]. Two float reductions (column ids as
    float32, exact for B < 2²⁴) instead of jnp.argmax, which XLA:CPU lowers to a scalar loop.
    A row holding NaN has value NaN and index 0."""
    best = extreme(values, axis=1, keepdims=True)
    columns = jnp.arange(values.shape[1], dtype=jnp.float32)
    first = jnp.min(jnp.where(values == best, columns, jnp.inf), axis=1)
    return jnp.where(first < values.shape[1], first, 0).astype(jnp.int32), best[:, 0]


def _picked(mask: jax.Array, index: jax.Array) -> jax.Array:
    """``mask[r, index[r]]`` for each row r, [R] bool."""
    return jnp.take_along_axis(mask, index[:, None], axis=1)[:, 0]


def _squared_distance_to(
    anchors: jax.Array, x: jax.Array, index: jax.Array, keep: jax.Array
) -> jax.Array:
    """‖anchors[r] − x[index[r]]‖² by direct subtraction (exact to rounding), 0 where not
    ``keep``; [R]."""
    diff = anchors - x[index]
    return jnp.where(keep, jnp.sum(diff * diff, axis=1), 0.0)


class _Options(NamedTuple):
    margin: float
    mining: str
    soft: bool
    fallback: str
    per_pair: bool  # per-(anchor, positive) losses needed (reduction="none"), not just sums


def _row_result(terms, row_weights, slot_index, columns: int, reduction: str):
    """Weights per-(anchor, positive) (loss, count, nonzero) [R, K] by the anchor's weight:
    the [R, B] loss matrix (slots scattered to their batch columns) for ``reduction="none"``,
    else the per-row sums ([R] each) that :func:`reductions.reduce_terms` reduces."""
    loss, count, nonzero = (t * row_weights[:, None] for t in terms)
    if reduction != "none":
        return jnp.sum(loss, axis=1), jnp.sum(count, axis=1), jnp.sum(nonzero, axis=1)
    if slot_index is None:
        return loss
    rows = jnp.arange(loss.shape[0])[:, None]
    return jnp.zeros((loss.shape[0], columns), loss.dtype).at[rows, slot_index].add(loss)


def _direct_terms(distances, d_ap, positive, negative, options: _Options):
    """Per anchor-positive pair, by comparing d_ap [R, K] with every distance [R, B] of the
    anchor (O(R·K·B), no sort): (loss summed over the pair's triplets, number of triplets,
    number with a loss > 0), each [R, K], 0 where ``positive`` [R, K] is False. Without
    ``options.per_pair`` the hinge losses come as [R, 1] per-anchor sums.

    The comparisons are those of the sort-based path (:func:`_all_positive_terms`): the band is
    d_ap < d_an <= d_ap + α with d_ap + α rounded first, semi-hard takes the closest d_an > d_ap.
    """
    d_an = distances[:, None, :]
    if options.mining == "semihard":
        farther = negative[:, None, :] & (d_an > d_ap[:, :, None])
        closest = jnp.min(jnp.where(farther, d_an, jnp.inf), axis=2)
        found = closest < jnp.inf
        farthest = jnp.max(jnp.where(negative, distances, -jnp.inf), axis=1)[:, None]
        pair_valid = positive & (farthest > -jnp.inf)
        if options.fallback == "drop":
            pair_valid = pair_valid & found
        chosen = jnp.where(pair_valid, jnp.where(found, closest, farthest), 0.0)
        loss = jnp.where(pair_valid, _hinge(d_ap - chosen + options.margin, options.soft), 0.0)
        count = pair_valid.astype(loss.dtype)
        return loss, count, jnp.where(loss > 0, count, 0.0)
    threshold = (d_ap + options.margin)[:, :, None]
    selected = negative[:, None, :] & positive[:, :, None]
    if options.mining == "semihard_band":
        selected = selected & (d_an > d_ap[:, :, None]) & (d_an <= threshold)
    dtype = distances.dtype
    count = jnp.sum(selected, axis=2, dtype=dtype)
    if options.soft:
        loss = jnp.sum(jnp.where(selected, jax.nn.softplus(threshold - d_an), 0.0), axis=2)
        return loss, count, count
    active = selected & (d_an < threshold)  # the triplets with a positive hinge
    nonzero = jnp.sum(active, axis=2, dtype=dtype)
    if not options.per_pair:
        # Only the anchor's total is needed: Σ_k Σ_n h·(t_k − d_n) = Σ_k k_k·t_k − Σ_n c_n·d_n
        # with k_k = Σ_n h and c_n = Σ_k h, both piecewise constant. Same value, and the
        # backward pass is [R, K] + [R, B] work instead of going through [R, K, B].
        per_negative = jnp.sum(active, axis=1, dtype=dtype)  # c_n, [R, B]
        loss = jnp.sum(nonzero * (d_ap + options.margin), axis=1) - jnp.sum(
            per_negative * distances, axis=1
        )
        return loss[:, None], count, nonzero
    loss = jnp.sum(jnp.where(active, threshold - d_an, 0.0), axis=2)
    return loss, count, nonzero


def _all_positive_terms(distances, positive, negative, options: _Options):
    """:func:`_direct_terms` for every column as a candidate positive (K = B), in
    O(B log B) per anchor: sorted negatives with prefix sums (no R×B×B tensor)."""
    if options.mining == "semihard":
        selected, pair_valid = mining_lib.semihard_negatives_rows(
            distances, distances, positive, negative, fallback=options.fallback
        )
        d_an = jnp.take_along_axis(distances, selected, axis=1)
        losses = _hinge(distances - d_an + options.margin, options.soft)
        loss = jnp.where(pair_valid, losses, 0.0)
        count = pair_valid.astype(loss.dtype)
        return loss, count, jnp.where(loss > 0, count, 0.0)
    if options.soft:
        terms = _soft_triplet_sums(distances, positive, negative, options.margin, options.mining)
    else:
        terms = _hinge_triplet_sums(distances, negative, options.margin, options.mining)
    return tuple(jnp.where(positive, t, 0.0) for t in terms)


def _hinge_triplet_sums(distances, negative, margin, mining):
    """Per (a, p): Σ_n [d_ap − d_an + α]₊, the number of triplets, and how many are > 0."""
    sorted_negatives = mining_lib.sort_negatives(distances, negative)
    threshold = distances + margin
    if mining == "all":
        low = jnp.full_like(distances, -jnp.inf)
        count = jnp.broadcast_to(sorted_negatives.count[:, None], distances.shape)
        count = count.astype(distances.dtype)
    else:  # semihard_band: d_ap < d_an <= d_ap + α
        low = distances
        count, _ = mining_lib.negatives_in_interval(sorted_negatives, low, threshold)
    # Triplets with a positive hinge: d_an < d_ap + α (and above ``low`` for the band).
    nonzero, distance_sum = mining_lib.negatives_in_interval(
        sorted_negatives, low, threshold, high_side="left"
    )
    loss = nonzero * threshold - distance_sum
    return loss, count, nonzero


def _soft_triplet_sums(distances, positive, negative, margin, mining):
    """Per (a, p) sums of softplus over negatives, one anchor at a time (O(B²) memory)."""

    def per_anchor(row):
        d, pos, neg = row
        violation = d[:, None] - d[None, :] + margin  # [p, n]
        selected = pos[:, None] & neg[None, :]
        if mining == "semihard_band":
            gap = d[None, :] - d[:, None]
            selected = selected & (gap > 0) & (gap <= margin)
        losses = jnp.where(selected, jax.nn.softplus(violation), 0.0)
        count = jnp.sum(selected, axis=1).astype(d.dtype)
        return jnp.sum(losses, axis=1), count, count

    return jax.lax.map(per_anchor, (distances, positive, negative))


def triplet_center_loss(
    embeddings: jax.Array,
    labels: jax.Array,
    centers: jax.Array,
    *,
    margin: float = TRIPLET_CENTER_MARGIN,
    squared: bool = True,
    weights: jax.Array | None = None,
    reduction: reductions.Reduction = "mean",
) -> jax.Array:
    """Triplet-center loss (He et al. 2018, "Triplet-Center Loss for Multi-View 3D Object
    Retrieval", Eq. 3)::

        L_i = max( D(x_i, c_{y_i}) + m − min_{j != y_i} D(x_i, c_j), 0 )

    with D(x, c) = ½‖x − c‖² (the paper's squared Euclidean distance, ``squared=True``) or
    ‖x − c‖ (``squared=False``, as the authors' released PyTorch code computes it). The paper
    sums over the batch; the default here averages (the released code's ``MarginRankingLoss``
    mean) — use ``reduction="sum"`` for the paper's Σ. The paper learns the centers by gradient
    descent (pass them as parameters and differentiate), or update them with
    :func:`mlx_jax.centers.update_centers`.

    Args:
      embeddings: [B, D] float.
      labels: [B] int in [0, C).
      centers: [C, D] float, C >= 2.
      margin: m >= 0, in the units of D; default 5.0 — our choice, not a published value
        (the experiments train with it): the paper tunes m per dataset, the authors' released
        PyTorch code
        (``cvpr_2018_TCL.pytorch``, ``TripletCenter40Loss``) defaults to 0, and
        pytorch-metric-learning has no triplet-center loss. Scale it to the distances of
        your embeddings.
      squared: ½‖·‖² (paper) or ‖·‖ (released code).
      weights: optional [B] per-sample weights.
      reduction: ``"mean"``, ``"sum"``, ``"mean_nonzero"`` or ``"none"`` ([B]).

    Returns:
      float32 scalar ([B] for ``reduction="none"``); gradients flow to embeddings and centers.
    """
    x = _checks.embeddings_array(embeddings)
    centers = _checks.centers_array(centers, x.shape[1])
    if centers.shape[0] < 2:
        raise ValueError(f"centers must have at least 2 classes, got shape {centers.shape}")
    batch = prepare_batch(x, labels, weights, num_classes=centers.shape[0])
    x, centers = _checks.promote_all(batch.embeddings, centers)
    _checks.non_negative(margin, "margin")
    to_centers = _distances(x, centers, squared)
    if squared:
        to_centers = 0.5 * to_centers
    own = jax.nn.one_hot(batch.labels, centers.shape[0], dtype=bool)
    in_range = jnp.any(own, axis=1)  # out-of-range labels (traced) → NaN, never silent
    d_own = jnp.where(in_range, jnp.sum(jnp.where(own, to_centers, 0.0), axis=1), jnp.nan)
    d_nearest_other = jnp.min(jnp.where(own, jnp.inf, to_centers), axis=1)
    losses = jax.nn.relu(d_own + margin - d_nearest_other)
    return reductions.reduce_weighted(losses, batch.weights, reduction)
