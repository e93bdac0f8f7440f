"""Triplet loss with online mining (FaceNet) and the triplet-center loss (He et al. 2018)."""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp

from mlx_jax import _checks, reductions
from mlx_jax import mining as mining_lib
from mlx_jax.distances import safe_sqrt, squared_euclidean
from mlx_jax.losses._common import prepare_batch

Mining = Literal["semihard", "batch_hard", "all", "semihard_band"]
MINING: tuple[str, ...] = ("semihard", "batch_hard", "all", "semihard_band")


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
    reduction: reductions.Reduction = "mean",
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
      negative. ``"none"`` → [B].
    * ``"all"``: every valid triplet. ``"none"`` → [B, B], summed over negatives.
    * ``"semihard_band"`` (PML ``TripletMarginMiner(type_of_triplets="semihard")``): every
      triplet with 0 < d(a, n) − d(a, p) ≤ α. ``"none"`` → [B, B], summed over negatives.

    ``"all"`` and ``"semihard_band"`` with the hinge never enumerate triplets: for each
    anchor-positive pair the hinge sums over a contiguous range of the anchor's sorted negatives,
    so Σ_n [d_ap − d_an + α]₊ = k·(d_ap + α) − (sum of those k distances), from prefix sums —
    O(B² log B) time and O(B²) memory. ``soft=True`` needs every triplet's softplus; it loops over
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
      reduction: ``"mean"`` over mined triplets (default; TF's semi-hard loss averages over
        anchor-positive pairs the same way), ``"sum"`` (FaceNet's Σ), ``"mean_nonzero"``
        (PML's default ``AvgNonZeroReducer``) or ``"none"``.

    Returns:
      float32 scalar (or the per-term array described above for ``reduction="none"``).
    """
    batch = prepare_batch(embeddings, labels, weights)
    _checks.choice(mining, "mining", MINING)
    _checks.choice(reduction, "reduction", reductions.REDUCTIONS)
    _checks.non_negative(margin, "margin")
    distances = _distances(batch.embeddings, None, squared)
    anchor_weight = batch.weights[:, None]

    if mining == "batch_hard":
        hard = mining_lib.batch_hard(distances, batch.labels, batch.valid)
        d_ap = jnp.take_along_axis(distances, hard.positive[:, None], axis=1)[:, 0]
        d_an = jnp.take_along_axis(distances, hard.negative[:, None], axis=1)[:, 0]
        losses = _hinge(d_ap - d_an + margin, soft)
        weight = jnp.where(hard.valid, batch.weights, 0.0)
        return reductions.reduce_weighted(losses, weight, reduction)

    if mining == "semihard":
        negative, pair_valid = mining_lib.semihard_negatives(
            distances, batch.labels, batch.valid, fallback=semihard_fallback
        )
        d_an = jnp.take_along_axis(distances, negative, axis=1)
        losses = _hinge(distances - d_an + margin, soft)
        weight = jnp.where(pair_valid, anchor_weight, 0.0)
        return reductions.reduce_weighted(losses, weight, reduction)

    positive, negative = mining_lib.pair_masks(batch.labels, batch.valid)
    if soft:
        loss, count, nonzero = _soft_triplet_sums(distances, positive, negative, margin, mining)
    else:
        loss, count, nonzero = _hinge_triplet_sums(distances, negative, margin, mining)
    pair_weight = jnp.where(positive, anchor_weight, 0.0)
    return reductions.reduce_terms(
        loss * pair_weight, count * pair_weight, reduction, nonzero * pair_weight
    )


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
    margin: float,
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
      margin: m, required (the paper tunes it per dataset; no universal default).
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
