"""Label masks and triplet mining: pure functions of (distance matrix, labels).

Conventions. ``distances`` is a [B, B] matrix where *smaller is closer* (pass ``-similarity``
for a similarity). ``labels`` is [B] integer. ``valid`` is an optional [B] bool array: a sample
that is not valid (padding, another shard's dummy) is never an anchor, positive or negative.

Miners (FaceNet, Schroff et al. 2015, Sec. 3.2; Hermans et al. 2017 for batch-hard):

* :func:`batch_hard` — per anchor, the farthest positive and the closest negative.
* :func:`semihard_negatives` — FaceNet semi-hard: per anchor-positive pair, the *closest*
  negative that is farther than the positive (d_an > d_ap). When no such negative exists the
  pair falls back, by default, to the anchor's *farthest* negative — the choice of the reference
  TensorFlow implementation (``tf.contrib.losses.metric_learning.triplet_semihard_loss``,
  later ``tfa.losses.TripletSemiHardLoss``); ``fallback="drop"`` drops the pair instead.
  Cost: one sort of each anchor's negative distances and a ``searchsorted`` of its positive
  distances — O(B² log B) time, O(B²) memory (TFA tiles a B×B×B tensor).
* :class:`SortedNegatives` / :func:`negatives_in_interval` — per anchor-positive pair, the count
  and the distance sum of negatives whose distance lies in an interval, from prefix sums over the
  sorted negatives. Hinge losses summed over *all* negatives, or over PML's semi-hard band
  0 < d_an − d_ap ≤ margin, follow in O(B² log B) without enumerating triplets.
* :func:`triplet_mask` — the explicit [B, B, B] mask of valid triplets (small batches, tests).
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp

from mlx_jax import _checks


def valid_or_all(valid: jax.Array | None, batch: int) -> jax.Array:
    return jnp.ones((batch,), bool) if valid is None else valid.astype(bool)


def pair_masks(labels: jax.Array, valid: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """Positive and negative pair masks, both [B, B] bool.

    positive[i, j] = (y_i == y_j) and i != j; negative[i, j] = y_i != y_j; both require samples
    i and j to be valid.
    """
    batch = labels.shape[0]
    valid = valid_or_all(valid, batch)
    return row_pair_masks(jnp.arange(batch), labels, valid, labels, valid)


def row_pair_masks(
    row_index: jax.Array,
    row_labels: jax.Array,
    row_valid: jax.Array,
    labels: jax.Array,
    valid: jax.Array,
) -> tuple[jax.Array, jax.Array]:
    """Rows ``row_index`` [R] of :func:`pair_masks`: positive and negative masks [R, B] of the
    anchors ``row_index`` (labels ``row_labels`` [R], validity ``row_valid`` [R]) against all
    B samples (``labels`` [B], ``valid`` [B] bool). Row indices >= B (padding) match no column.
    """
    both_valid = row_valid[:, None] & valid[None, :]
    same = row_labels[:, None] == labels[None, :]
    own = row_index[:, None] == jnp.arange(labels.shape[0])
    return same & ~own & both_valid, ~same & both_valid


class ClassIndex(NamedTuple):
    """The batch sorted by label, to find each anchor's positives without a [B, B] search.

    Fields: ``order`` [B] int32 batch indices in (stable) label order, ``sorted_labels`` [B],
    ``largest`` int32 scalar, the size of the largest class in the batch (valid or not).
    """

    order: jax.Array
    sorted_labels: jax.Array
    largest: jax.Array


def class_index(labels: jax.Array) -> ClassIndex:
    """Sorts the labels once (O(B log B))."""
    order = jnp.argsort(labels, stable=True).astype(jnp.int32)
    sorted_labels = labels[order]
    size = jnp.searchsorted(sorted_labels, sorted_labels, side="right") - jnp.searchsorted(
        sorted_labels, sorted_labels, side="left"
    )
    return ClassIndex(order, sorted_labels, jnp.max(size).astype(jnp.int32))


def positive_slots(
    index: ClassIndex,
    num_slots: int,
    row_index: jax.Array,
    row_labels: jax.Array,
    row_valid: jax.Array,
    valid: jax.Array,
) -> tuple[jax.Array, jax.Array]:
    """Each anchor's positives in ``num_slots`` slots: indices [R, S] int32 and mask [R, S].

    Slot s of anchor r holds the s-th member of the anchor's class in label order (the anchor
    itself included, masked out), so the slots hold every positive iff
    ``index.largest <= num_slots``; the caller checks that. mask[r, s] is True for a valid
    positive (another valid sample of the class); indices under a False mask are arbitrary.
    """
    batch = index.order.shape[0]
    start = jnp.searchsorted(index.sorted_labels, row_labels, side="left")
    position = start[:, None] + jnp.arange(num_slots)
    clipped = jnp.minimum(position, batch - 1)
    member = (position < batch) & (index.sorted_labels[clipped] == row_labels[:, None])
    slot_index = index.order[clipped]
    mask = member & (slot_index != row_index[:, None]) & row_valid[:, None] & valid[slot_index]
    return slot_index, mask


def triplet_mask(labels: jax.Array, valid: jax.Array | None = None) -> jax.Array:
    """[B, B, B] bool: mask[a, p, n] = (p is a positive of a) and (n is a negative of a)."""
    positive, negative = pair_masks(labels, valid)
    return positive[:, :, None] & negative[:, None, :]


class BatchHardTriplets(NamedTuple):
    """One triplet per anchor: indices [B] int32 and ``valid`` [B] bool."""

    positive: jax.Array
    negative: jax.Array
    valid: jax.Array


def batch_hard(
    distances: jax.Array, labels: jax.Array, valid: jax.Array | None = None
) -> BatchHardTriplets:
    """Batch-hard mining (Hermans, Beyer & Leibe 2017, "In Defense of the Triplet Loss").

    For every anchor a: p* = argmax_{p: y_p = y_a, p != a} d(a, p) and
    n* = argmin_{n: y_n != y_a} d(a, n). An anchor without a positive or without a negative is
    marked invalid (its indices point at itself and must be ignored).
    """
    positive, negative = pair_masks(labels, valid)
    own = jnp.arange(labels.shape[0])
    hardest_positive = jnp.argmax(jnp.where(positive, distances, -jnp.inf), axis=1)
    hardest_negative = jnp.argmin(jnp.where(negative, distances, jnp.inf), axis=1)
    has_both = jnp.any(positive, axis=1) & jnp.any(negative, axis=1)
    return BatchHardTriplets(
        positive=jnp.where(has_both, hardest_positive, own).astype(jnp.int32),
        negative=jnp.where(has_both, hardest_negative, own).astype(jnp.int32),
        valid=has_both,
    )


class SortedNegatives(NamedTuple):
    """Each anchor's negative distances in ascending order, with prefix sums.

    Fields (B anchors, B candidates):
      keys: [B, B] ascending distances, +inf after the anchor's last negative.
      order: [B, B] int32 batch index of each sorted entry.
      count: [B] int32 number of negatives of each anchor.
      cumulative_distance: [B, B + 1] prefix sums of the sorted negative distances
        (``cumulative_distance[a, k]`` = sum of the k closest); differentiable in ``distances``.
    """

    keys: jax.Array
    order: jax.Array
    count: jax.Array
    cumulative_distance: jax.Array


def sort_negatives(distances: jax.Array, negative: jax.Array) -> SortedNegatives:
    """Sorts each anchor's negatives once; the basis of semi-hard and interval mining."""
    keys_unsorted = jnp.where(negative, jax.lax.stop_gradient(distances), jnp.inf)
    order = jnp.argsort(keys_unsorted, axis=1).astype(jnp.int32)
    keys = jnp.take_along_axis(keys_unsorted, order, axis=1)
    count = jnp.sum(negative, axis=1, dtype=jnp.int32)
    sorted_distances = jnp.take_along_axis(jnp.where(negative, distances, 0.0), order, axis=1)
    zeros = jnp.zeros((distances.shape[0], 1), distances.dtype)
    cumulative = jnp.concatenate([zeros, jnp.cumsum(sorted_distances, axis=1)], axis=1)
    return SortedNegatives(keys, order, count, cumulative)


Side = Literal["left", "right"]


def rank_in_negatives(sorted_negatives: SortedNegatives, thresholds: jax.Array, side: Side):
    """Per anchor row a and threshold t[a, k]: the number of negatives with d < t ("left") or
    d <= t ("right"). ``thresholds`` is [B, K]; returns [B, K] int32."""

    def one_row(keys, row_thresholds):
        # "scan" (binary search, O(log B) per query) rather than "sort" (a sort per row).
        return jnp.searchsorted(keys, row_thresholds, side=side, method="scan")

    ranks = jax.vmap(one_row)(sorted_negatives.keys, jax.lax.stop_gradient(thresholds))
    return jnp.minimum(ranks, sorted_negatives.count[:, None]).astype(jnp.int32)


def negatives_in_interval(
    sorted_negatives: SortedNegatives,
    low: jax.Array,
    high: jax.Array,
    *,
    low_side: Side = "right",
    high_side: Side = "right",
) -> tuple[jax.Array, jax.Array]:
    """Count and distance sum of each anchor's negatives with ``low < d <= high``.

    ``low``/``high`` are [B, K] (K thresholds per anchor, e.g. one per positive). With the
    default sides the interval is (low, high]; ``low_side="left"`` makes it [low, high] and
    ``high_side="left"`` makes the top open. Returns (count [B, K] float, distance_sum [B, K]).
    """
    start = rank_in_negatives(sorted_negatives, low, low_side)
    stop = jnp.maximum(rank_in_negatives(sorted_negatives, high, high_side), start)
    cumulative = sorted_negatives.cumulative_distance
    distance_sum = jnp.take_along_axis(cumulative, stop, axis=1) - jnp.take_along_axis(
        cumulative, start, axis=1
    )
    return (stop - start).astype(cumulative.dtype), distance_sum


SemihardFallback = Literal["farthest", "drop"]


def semihard_negatives(
    distances: jax.Array,
    labels: jax.Array,
    valid: jax.Array | None = None,
    *,
    fallback: SemihardFallback = "farthest",
) -> tuple[jax.Array, jax.Array]:
    """FaceNet semi-hard negatives for every anchor-positive pair, without a B×B×B tensor.

    negative[a, p] = argmin_{n: y_n != y_a, d(a, n) > d(a, p)} d(a, n)   (Schroff et al. 2015,
    Eq. 4's "semi-hard" condition d_ap < d_an). If no negative is farther than the positive:
    ``fallback="farthest"`` uses argmax_n d(a, n) (TF's reference implementation),
    ``fallback="drop"`` marks the pair invalid.

    Returns:
      negative: [B, B] int32 batch index (meaningless where not ``valid``).
      valid: [B, B] bool, True for positive pairs (a, p) that have a selected negative.
    """
    positive, negative = pair_masks(labels, valid)
    return semihard_negatives_rows(distances, distances, positive, negative, fallback=fallback)


def semihard_negatives_rows(
    distances: jax.Array,
    positive_distances: jax.Array,
    positive: jax.Array,
    negative: jax.Array,
    *,
    fallback: SemihardFallback = "farthest",
) -> tuple[jax.Array, jax.Array]:
    """:func:`semihard_negatives` for anchor rows: ``distances`` [R, B] of R anchors to all
    samples, ``negative`` [R, B] their negative mask, and K positive distances per anchor
    (``positive_distances`` [R, K] with mask ``positive`` [R, K]; K = B with
    ``positive_distances = distances`` for all pairs). Returns (negative index [R, K] int32,
    valid [R, K] bool)."""
    if fallback not in ("farthest", "drop"):
        raise ValueError(f"fallback must be 'farthest' or 'drop', got {fallback!r}")
    sorted_negatives = sort_negatives(distances, negative)
    # Index of the first negative strictly farther than d(a, p).
    first_farther = rank_in_negatives(sorted_negatives, positive_distances, "right")
    count = sorted_negatives.count[:, None]
    found = first_farther < count
    farthest = jnp.maximum(count - 1, 0)
    slot = jnp.where(found, first_farther, farthest)
    selected = jnp.take_along_axis(sorted_negatives.order, slot, axis=1)
    pair_valid = positive & (count > 0)
    if fallback == "drop":
        pair_valid = pair_valid & found
    return selected, pair_valid


def multi_similarity_pairs(
    similarity: jax.Array,
    labels: jax.Array,
    *,
    epsilon: float = 0.1,
    valid: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Multi-Similarity pair mining (Wang et al. 2019, "Multi-Similarity Loss with General Pair
    Weighting for Deep Metric Learning", CVPR, Eq. 9 and 10).

    ``similarity`` is a [B, B] matrix where *larger is closer* (cosine similarity S). For anchor
    i with positives P_i = {j != i: y_j = y_i} and negatives N_i = {k: y_k != y_i}:

    * a negative pair (i, k) is kept if  S_ik + ε > min_{j∈P_i} S_ij   (Eq. 9),
    * a positive pair (i, j) is kept if  S_ij − ε < max_{k∈N_i} S_ik   (Eq. 10).

    Each side is compared with the other side's hardest pair, so an anchor without positives
    keeps no negative and an anchor without negatives keeps no positive (a minimum over an empty
    set is +inf, a maximum −inf): that anchor keeps no pair at all. pytorch-metric-learning's
    ``MultiSimilarityMiner`` does the same (its sorted rows put +inf/−inf where the other side is
    empty), and the authors' code skips such an anchor. A NaN similarity is never kept, and a NaN
    among an anchor's positives (negatives) keeps none of its negatives (positives).

    The masks are the label masks of :func:`pair_masks` restricted by these conditions, so a
    mined positive always has the anchor's label and is never the anchor itself. (PML's miner was
    reported, on an Apple MPS device, to return positives with different labels:
    KevinMusgrave/pytorch-metric-learning#723.)

    Args:
      similarity: [B, B] float similarities (any float dtype).
      labels: [B] int class ids.
      epsilon: the margin ε; default 0.1 (the paper's value and PML's default). Must be >= 0.
      valid: optional [B] bool; invalid samples are never anchor, positive or negative.

    Returns:
      (positive, negative): the mined [B, B] bool masks, subsets of :func:`pair_masks`.
    """
    similarity = _checks.float_array(similarity, "similarity", 2, "[batch, batch]")
    batch = similarity.shape[0]
    if similarity.shape[1] != batch:
        raise ValueError(f"similarity must be square [batch, batch], got {similarity.shape}")
    labels = _checks.labels_array(labels, batch)
    if valid is not None and jnp.shape(valid) != (batch,):
        raise ValueError(f"valid must have shape [{batch}], got {jnp.shape(valid)}")
    positive, negative = pair_masks(labels, valid)
    return multi_similarity_pairs_rows(similarity, positive, negative, epsilon=epsilon)


def multi_similarity_pairs_rows(
    similarity: jax.Array,
    positive: jax.Array,
    negative: jax.Array,
    *,
    epsilon: float = 0.1,
) -> tuple[jax.Array, jax.Array]:
    """:func:`multi_similarity_pairs` for anchor rows: ``similarity`` [R, B] of R anchors to all
    samples and their label masks ``positive``, ``negative`` [R, B] (e.g. from
    :func:`row_pair_masks`). Returns the mined (positive, negative) [R, B] bool masks."""
    _checks.non_negative(epsilon, "epsilon")
    similarity = jax.lax.stop_gradient(similarity)
    hardest_positive = jnp.min(jnp.where(positive, similarity, jnp.inf), axis=1, keepdims=True)
    hardest_negative = jnp.max(jnp.where(negative, similarity, -jnp.inf), axis=1, keepdims=True)
    keep_negative = negative & (similarity + epsilon > hardest_positive)
    keep_positive = positive & (similarity - epsilon < hardest_negative)
    return keep_positive, keep_negative
