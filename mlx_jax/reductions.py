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
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp

Reduction = Literal["mean", "sum", "mean_nonzero", "none"]
REDUCTIONS: tuple[str, ...] = ("mean", "sum", "mean_nonzero", "none")
Balance = Literal["pairs", "pos_neg"]
BALANCES: tuple[str, ...] = ("pairs", "pos_neg")


def check_reduction(reduction, supported: tuple[str, ...] = REDUCTIONS, why: str = "") -> str:
    """``reduction`` if it is one of ``supported`` (default: all of :data:`REDUCTIONS`), else
    ``ValueError`` naming the argument, the accepted values and, for a loss that supports only
    some, ``why``."""
    if reduction not in supported:
        reason = f" ({why})" if why else ""
        raise ValueError(f"reduction must be one of {list(supported)}{reason}, got {reduction!r}")
    return reduction


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
    """Reduces weighted per-term losses; see the module docstring for the conventions."""
    check_reduction(reduction)
    if reduction == "none":
        return loss
    total = jnp.sum(loss)
    if reduction == "sum":
        return total
    if reduction == "mean":
        return safe_divide(total, jnp.sum(weight))
    if nonzero_weight is None:
        nonzero_weight = jnp.where(loss > 0, weight, 0.0)
    return safe_divide(total, jnp.sum(nonzero_weight))


def reduce_weighted(losses: jax.Array, weights: jax.Array, reduction: str) -> jax.Array:
    """Reduces plain per-term losses with per-term weights (a zero weight masks the term)."""
    masked = jnp.where(weights > 0, losses * weights, 0.0)
    return reduce_terms(masked, weights, reduction, jnp.where(losses > 0, weights, 0.0))
