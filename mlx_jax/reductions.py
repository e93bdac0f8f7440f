"""How per-term losses become a scalar — the one place that decides it.

A loss hands over, for each of its terms (a sample, a pair, an anchor-positive pair, …):

* ``loss``: the term's loss already multiplied by its weight (0 for invalid terms),
* ``weight``: the term's total weight (how many weighted triplets/pairs/samples it stands for),
* ``nonzero_weight``: the part of ``weight`` whose loss is > 0.

Reductions (``reduction=`` on every loss):

* ``"mean"``: Σ loss / Σ weight — the average over valid terms (paper convention for batch
  averages; padded or masked samples have weight 0 so they neither add loss nor count).
* ``"sum"``: Σ loss (FaceNet writes the triplet loss as a sum).
* ``"mean_nonzero"``: Σ loss / Σ nonzero_weight — PML's ``AvgNonZeroReducer`` default.
* ``"none"``: the per-term ``loss`` array unreduced (shape documented per loss).

An empty denominator (no valid term) gives 0 with zero — not NaN — gradients.

Every public loss (``mlx_jax.losses``, the ``partial_fc_*_loss`` heads) takes ``weights=None``
(per-sample [B], 0 excludes a sample) and ``reduction: Reduction = "mean"``, validated by
:func:`check_reduction`; the building blocks that return per-sample terms for a caller to weight
and reduce (``margin_cross_entropy``, ``partial_fc_terms``) take neither. Pair losses also take
``balance: Balance`` (see :func:`mlx_jax.losses.contrastive_loss`): ``"pairs"`` reduces positive
and negative pairs together, ``"pos_neg"`` each kind on its own and adds the two.

**Reduction parts.** Every reduction above is a function of three sums over the terms —
S = Σ loss, W = Σ weight, Z = Σ nonzero_weight: ``"sum"`` is S, ``"mean"`` S / W,
``"mean_nonzero"`` S / Z. Sums of a partition of the terms add up, so a loss evaluated on
disjoint sets of terms (e.g. each device of a mesh on its own anchor rows,
:func:`mlx_jax.parallel.global_batch_loss` with ``split_rows=True``) gives the whole loss by
adding the sums and dividing once — adding the per-set *ratios* would not. ``reduction="parts"``
(:data:`PARTS`), accepted by the losses that take ``anchors=``, returns those sums as a
:class:`ReductionParts` pytree (or a tuple of them, one per kind of term, e.g. positive and
negative pairs with ``balance="pos_neg"``); :func:`finish_reduction` turns the (summed) parts
into the scalar the loss would have returned::

    loss(x, y, reduction=r) == finish_reduction(loss(x, y, reduction="parts"), r)

for r in ``"mean"``, ``"sum"``, ``"mean_nonzero"`` (to float rounding). A loss whose value is
not a function of such sums does not accept ``"parts"`` and raises
:class:`UnsupportedReduction` (a ``ValueError``).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

import jax
import jax.numpy as jnp

Reduction = Literal["mean", "sum", "mean_nonzero", "none"]
REDUCTIONS: tuple[str, ...] = ("mean", "sum", "mean_nonzero", "none")
Balance = Literal["pairs", "pos_neg"]
BALANCES: tuple[str, ...] = ("pairs", "pos_neg")
PARTS = "parts"
# The reductions of a loss that can return its sums (the losses that take ``anchors=``).
WITH_PARTS: tuple[str, ...] = (*REDUCTIONS, PARTS)
# The reductions that :func:`finish_reduction` computes from parts.
SCALAR_REDUCTIONS: tuple[str, ...] = ("mean", "sum", "mean_nonzero")


class UnsupportedReduction(ValueError):
    """A ``reduction`` the function does not accept; ``reduction`` holds the rejected value
    (``"parts"`` from a loss that cannot return reduction parts)."""

    def __init__(self, message: str, reduction: Any) -> None:
        super().__init__(message)
        self.reduction = reduction


def check_reduction(reduction, supported: tuple[str, ...] = REDUCTIONS, why: str = "") -> str:
    """``reduction`` if it is one of ``supported`` (default: all of :data:`REDUCTIONS`; a loss
    that can return its sums passes :data:`WITH_PARTS`), else :class:`UnsupportedReduction`
    (a ``ValueError``) naming the argument, the accepted values and, for a loss that supports
    only some, ``why``."""
    if not isinstance(reduction, str) or reduction not in supported:
        reason = f" ({why})" if why else ""
        raise UnsupportedReduction(
            f"reduction must be one of {list(supported)}{reason}, got {reduction!r}", reduction
        )
    return reduction


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ReductionParts:
    """The sums every reduction of a set of terms is made of (see the module docstring).

    Fields (scalars, or any shape that adds elementwise, e.g. stacked per device):

    * ``loss``: S = Σ loss (the weighted term losses),
    * ``weight``: W = Σ weight,
    * ``nonzero``: Z = Σ nonzero_weight (the weight of the terms whose loss is > 0),
    * ``reduction`` (static, not a leaf): None — reduced as the caller asks — or a fixed
      reduction for a part that is always reduced one way whatever the loss's reduction
      (the margin loss's shared-β term ν·β is ``"mean"`` of ν·β over its triplet count:
      ν·β·T / T, i.e. ν·β when the batch has a triplet and 0 otherwise).

    A pytree: ``jax.lax.psum`` / ``jax.tree.map`` act on the three sums and keep ``reduction``,
    so the parts of disjoint term sets add with ``jax.tree.map(jnp.add, a, b)``. There is no
    ``+``: adding the parts of two *kinds* of terms (``balance="pos_neg"``) would merge their
    denominators, so a loss returns the kinds as a tuple instead.
    """

    loss: jax.Array
    weight: jax.Array
    nonzero: jax.Array
    reduction: str | None = dataclasses.field(default=None, metadata={"static": True})


def reduction_parts(
    loss: jax.Array,
    weight: jax.Array,
    nonzero_weight: jax.Array | None = None,
    *,
    reduction: str | None = None,
) -> ReductionParts:
    """The :class:`ReductionParts` of per-term arrays (same conventions as
    :func:`reduce_terms`: ``loss`` already weighted; ``nonzero_weight`` defaults to the weight
    of the terms with loss > 0). ``reduction`` fixes the part's reduction (None: the
    caller's)."""
    if nonzero_weight is None:
        nonzero_weight = jnp.where(loss > 0, weight, 0.0)
    if reduction is not None:
        check_reduction(reduction, SCALAR_REDUCTIONS)
    return ReductionParts(jnp.sum(loss), jnp.sum(weight), jnp.sum(nonzero_weight), reduction)


def finish_reduction(parts: Any, reduction: str) -> jax.Array:
    """The loss from its :class:`ReductionParts`: S for ``"sum"``, S / W for ``"mean"``,
    S / Z for ``"mean_nonzero"`` (0, with zero gradients, for an empty denominator).

    ``parts`` is one :class:`ReductionParts` or a pytree (tuple) of them, e.g. positive and
    negative pairs with ``balance="pos_neg"``: each is reduced (with its own fixed
    ``reduction`` where it has one) and the results are added.
    """
    check_reduction(
        reduction, SCALAR_REDUCTIONS, why="parts reduce to a scalar; 'none' keeps the terms"
    )
    leaves = jax.tree_util.tree_leaves(parts, is_leaf=lambda p: isinstance(p, ReductionParts))
    if not leaves or not all(isinstance(p, ReductionParts) for p in leaves):
        raise TypeError(
            "parts must be a ReductionParts or a tuple of them (a loss's reduction='parts' "
            f"result), got {type(parts).__name__}"
        )
    total = None
    for part in leaves:
        value = _finish_one(part, part.reduction or reduction)
        total = value if total is None else total + value
    return total


def _finish_one(part: ReductionParts, reduction: str) -> jax.Array:
    if reduction == "sum":
        return part.loss
    if reduction == "mean":
        return safe_divide(part.loss, part.weight)
    return safe_divide(part.loss, part.nonzero)


def safe_divide(numerator: jax.Array, denominator: jax.Array) -> jax.Array:
    """numerator / denominator, or 0 where denominator == 0 (gradients stay finite)."""
    nonzero = denominator != 0
    return jnp.where(nonzero, numerator / jnp.where(nonzero, denominator, 1.0), 0.0)


def reduce_terms(
    loss: jax.Array,
    weight: jax.Array,
    reduction: str,
    nonzero_weight: jax.Array | None = None,
) -> jax.Array:
    """Reduces weighted per-term losses; see the module docstring for the conventions.
    ``reduction="parts"`` returns their :class:`ReductionParts`. Whether a loss accepts
    ``"parts"`` is its own ``check_reduction`` call's decision (:data:`WITH_PARTS`); a loss
    that returns this function's result unchanged (e.g. ``center_loss``) passes it through,
    correctly: its value is these sums' reduction."""
    check_reduction(reduction, WITH_PARTS)
    if reduction == "none":
        return loss
    parts = reduction_parts(loss, weight, nonzero_weight)
    if reduction == PARTS:
        return parts
    return finish_reduction(parts, reduction)


def reduce_weighted(losses: jax.Array, weights: jax.Array, reduction: str) -> jax.Array:
    """Reduces plain per-term losses with per-term weights (a zero weight masks the term)."""
    masked = jnp.where(weights > 0, losses * weights, 0.0)
    return reduce_terms(masked, weights, reduction, jnp.where(losses > 0, weights, 0.0))
