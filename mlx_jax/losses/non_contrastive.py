"""Non-contrastive two-view losses on batch statistics: VICReg (Bardes, Ponce & LeCun 2022,
"VICReg: Variance-Invariance-Covariance Regularization for Self-Supervised Learning", ICLR) and
Barlow Twins (Zbontar, Jing, Misra, LeCun & Deny 2021, "Barlow Twins: Self-Supervised Learning
via Redundancy Reduction", ICML).

Both take two augmented views ``view_a``, ``view_b`` [B, D] of one batch (row i of each is a
view of sample i) — the calling convention of :func:`mlx_jax.losses.info_nce.self_supervised`,
so a two-view training step calls ``vicreg_loss``, ``barlow_twins_loss`` or
``self_supervised(ntxent_loss)`` alike, as ``loss(view_a, view_b, weights=w)`` — and neither
needs labels or negatives: collapse is prevented by terms on the per-dimension statistics of
the batch. The loss is one value per batch, not a mean of
per-sample terms, so ``reduction`` accepts only ``"mean"`` (the loss itself).

Weighted batch statistics. With per-sample weights w_b >= 0 (``weights``, one per sample, for
both of its views) and W = Σ_b w_b, every statistic is a weighted one:

* mean: μ = Σ_b w_b z_b / W;
* VICReg's covariance, unbiased with "reliability" weights (``numpy.cov(z.T, aweights=w)``,
  ``ddof=1``)::

      C = Σ_b w_b (z_b − μ)(z_b − μ)ᵀ / (W − Σ_b w_b² / W)

  which is the paper's 1/(n − 1) estimate (Eq. 3) when the n non-zero weights are equal, and
  its diagonal is the unbiased variance of Eq. 1;
* Barlow Twins' per-dimension normalization, biased as in batch normalization::

      σ² = Σ_b w_b (z_b − μ)² / W,   ẑ_b = (z_b − μ) / √(σ² + ε),
      C = Σ_b w_b ẑ^A_b ẑ^B_bᵀ / W

  (an integer weight k is exactly k copies of the sample).

A zero weight removes the sample exactly (its rows are replaced by zeros before any arithmetic,
so even non-finite padding cannot leak), and multiplying every weight by the same c > 0 changes
nothing. The statistics need two samples: with fewer than two samples of positive weight the
batch terms (VICReg's variance and covariance, all of Barlow Twins) are 0 with zero gradient,
and what remains is VICReg's invariance term (0 too when every weight is 0).

Cost: each loss forms D×D matrices (two covariances, or one cross-correlation): O(B·D²) time and
O(D²) memory in the forward and the backward pass (D = 8192 in both papers: 2^26 entries per
matrix).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from mlx_jax import _checks, reductions
from mlx_jax.distances import HIGHEST

_BATCH_LEVEL = (
    "a batch-level loss on batch statistics (means, variances, covariances): one value per "
    "batch, not a reduction of per-sample terms"
)


class _Views(NamedTuple):
    """Two checked views [B, D] in compute dtype, zero-weight rows zeroed; weights [B]; their
    total W; and whether two or more samples have positive weight (batch statistics exist)."""

    a: jax.Array
    b: jax.Array
    weights: jax.Array
    total: jax.Array
    has_statistics: jax.Array


def _prepare_views(view_a, view_b, weights) -> _Views:
    a = _checks.embeddings_array(view_a, "view_a")
    b = _checks.embeddings_array(view_b, "view_b")
    if a.shape != b.shape:
        raise ValueError(
            f"view_b must have the shape of view_a {list(a.shape)} (one augmentation per "
            f"sample), got shape {list(b.shape)}"
        )
    a, b = _checks.promote_all(a, b)
    w = _checks.sample_weights(weights, a.shape[0], a.dtype)
    valid = w > 0
    # where, not w·z: a zero-weight row may hold anything (padding), even inf or NaN
    a = jnp.where(valid[:, None], a, 0.0)
    b = jnp.where(valid[:, None], b, 0.0)
    return _Views(a, b, w, jnp.sum(w), jnp.sum(valid) >= 2)


def _centered(z: jax.Array, views: _Views) -> jax.Array:
    """z − μ (weighted mean over the batch); zero-weight rows stay 0.

    A dimension whose samples are all equal centers to exactly 0, not to the rounding residue
    of μ (which Barlow Twins' normalization would blow up to ±1 at ε = 0); only its value is
    corrected, so the gradient that moves it away from the constant still flows.
    """
    valid = views.weights[:, None] > 0
    mean = reductions.safe_divide(jnp.sum(views.weights[:, None] * z, axis=0), views.total)
    centered = z - mean
    constant = jnp.max(jnp.where(valid, z, -jnp.inf), axis=0) == jnp.min(
        jnp.where(valid, z, jnp.inf), axis=0
    )
    centered = jnp.where(constant, centered - jax.lax.stop_gradient(centered), centered)
    return jnp.where(valid, centered, 0.0)


def _weighted_gram(x: jax.Array, y: jax.Array, weights: jax.Array) -> jax.Array:
    """Σ_b w_b x_b y_bᵀ [D, D]."""
    return jnp.matmul((weights[:, None] * x).T, y, precision=HIGHEST)


def _off_diagonal_square_sum(matrix: jax.Array) -> jax.Array:
    """Σ_{i≠j} M_ij² (masked rather than Σ M² − Σ M_ii², which cancels when the diagonal
    dominates)."""
    diagonal = jnp.eye(matrix.shape[0], dtype=bool)
    return jnp.sum(jnp.where(diagonal, 0.0, jnp.square(matrix)))


def _vicreg_regularizers(z: jax.Array, views: _Views, target_std, eps):
    """v(Z) (Eq. 1-2) and c(Z) (Eq. 3-4) of one view, with the weighted covariance."""
    w = views.weights
    centered = _centered(z, views)
    # W − Σw²/W = Σ_b w_b (W − w_b) / W; the sum form is exactly 0 for a single positive weight
    bessel = reductions.safe_divide(jnp.sum(w * (views.total - w)), views.total)
    covariance = reductions.safe_divide(_weighted_gram(centered, centered, w), bessel)
    std = jnp.sqrt(jnp.diagonal(covariance) + eps)
    variance_term = jnp.mean(jax.nn.relu(target_std - std))
    covariance_term = _off_diagonal_square_sum(covariance) / z.shape[1]
    return variance_term, covariance_term


def vicreg_loss(
    view_a: jax.Array,
    view_b: jax.Array,
    *,
    invariance_weight: float = 25.0,
    variance_weight: float = 25.0,
    covariance_weight: float = 1.0,
    target_std: float = 1.0,
    eps: float = 1e-4,
    weights: jax.Array | None = None,
    reduction: reductions.Reduction = "mean",
) -> jax.Array:
    """VICReg: invariance, variance and covariance terms of two views of a batch.

    With Z = ``view_a`` and Z' = ``view_b`` [n, d], z^j the j-th dimension (column) of Z and
    C(Z) its covariance (Bardes, Ponce & LeCun 2022, Eq. 1-6)::

        v(Z)     = 1/d Σ_j max(0, γ − √(Var(z^j) + ε))            (Eq. 1-2, unbiased Var)
        C(Z)     = 1/(n−1) Σ_i (z_i − z̄)(z_i − z̄)ᵀ                 (Eq. 3)
        c(Z)     = 1/d Σ_{i≠j} C(Z)_ij²                            (Eq. 4)
        s(Z, Z') = 1/(n·d) Σ_i ‖z_i − z'_i‖²                        (Eq. 5 as in Algorithm 1)
        ℓ        = λ s(Z, Z') + μ [v(Z) + v(Z')] + ν [c(Z) + c(Z')]  (Eq. 6)

    The invariance term: Eq. 5 prints s = 1/n Σ_i ‖z_i − z'_i‖², but the paper's Algorithm 1
    and the authors' code compute ``mse_loss(z_a, z_b)``, the mean over the n·d entries; λ = 25
    was chosen with that scale, so it is the one used here (Eq. 5 as printed is d times it).

    With ``weights``, n is replaced by the weighted statistics of the module docstring (the mean
    over samples in s, the reliability-weighted unbiased covariance in v and c).

    Degenerate batches: a constant (or collapsed) dimension has Var = 0 and costs
    μ·max(0, γ − √ε) per view (0.99·μ at the defaults), with finite gradients (ε > 0 keeps √
    differentiable); all-zero embeddings give 2·μ·(γ − √ε) = 49.5 at the defaults. With fewer
    than two samples of positive weight (B = 1 included) the variance and covariance are
    undefined (n − 1 = 0): those terms are 0 with zero gradient and the loss is λ·s (0 when
    every weight is 0).

    Relation to pytorch-metric-learning's ``VICRegLoss(invariance_lambda=25, variance_mu=25,
    covariance_v=1, eps=1e-4)`` (called as ``loss(view_a, ref_emb=view_b)``; its default
    ``MeanReducer``): the same s, c and unbiased variance, but it halves the variance term,
    μ/2·[v(Z) + v(Z')], as the authors' released code does (``std_loss = mean(relu(1 −
    std_x)) / 2 + mean(relu(1 − std_y)) / 2``). Eq. 6 and the paper's Algorithm 1 do not halve
    it, and this function follows the paper: ``vicreg_loss(a, b, variance_weight=μ / 2)``
    equals PML's (and the released code's) loss with μ exactly. PML returns NaN for B = 1;
    see above for this function.

    Cost: two D×D covariances, O(B·D²) time and O(D²) memory (see the module docstring).

    Args:
      view_a: [B, D] float, one view of each sample (any float dtype; computed in at least
        float32).
      view_b: [B, D] float, the other view (row i: the same sample as row i of ``view_a``).
      invariance_weight: λ >= 0; default 25, the paper's (λ = μ = 25, ν = 1 in its ImageNet
        experiments).
      variance_weight: μ >= 0; default 25, the paper's.
      covariance_weight: ν >= 0; default 1, the paper's.
      target_std: γ >= 0, the target standard deviation of each dimension; default 1, the
        paper's (fixed to 1 in its experiments).
      eps: ε > 0 under the square root of the variance; default 1e-4, the paper's.
      weights: optional [B] per-sample weights for both views (see the module docstring for the
        weighted statistics); a zero weight removes the sample exactly.
      reduction: ``"mean"`` only (the loss of the batch); other values raise ``ValueError``, as
        the loss is not a reduction of per-sample terms.

    Returns:
      scalar in the compute dtype (at least float32).
    """
    views = _prepare_views(view_a, view_b, weights)
    reductions.check_reduction(reduction, supported=("mean",), why=_BATCH_LEVEL)
    for value, name in [
        (invariance_weight, "invariance_weight"),
        (variance_weight, "variance_weight"),
        (covariance_weight, "covariance_weight"),
        (target_std, "target_std"),
    ]:
        _checks.non_negative(value, name)
    _checks.positive(eps, "eps")

    w = views.weights
    squared_error = jnp.sum(jnp.square(views.a - views.b), axis=1)
    invariance = reductions.safe_divide(jnp.sum(w * squared_error), views.total * views.a.shape[1])
    variance_a, covariance_a = _vicreg_regularizers(views.a, views, target_std, eps)
    variance_b, covariance_b = _vicreg_regularizers(views.b, views, target_std, eps)
    regularizers = variance_weight * (variance_a + variance_b) + covariance_weight * (
        covariance_a + covariance_b
    )
    return invariance_weight * invariance + jnp.where(views.has_statistics, regularizers, 0.0)


def _batch_normalized(z: jax.Array, views: _Views, eps) -> jax.Array:
    """(z − μ) / √(σ² + ε) per dimension with the biased weighted variance (batch
    normalization without affine parameters); a dimension with σ² + ε = 0 (only possible for
    ε = 0) becomes 0."""
    centered = _centered(z, views)
    variance = reductions.safe_divide(
        jnp.sum(views.weights[:, None] * jnp.square(centered), axis=0), views.total
    )
    scale = variance + eps
    positive = scale > 0
    inverse_std = jnp.where(positive, jax.lax.rsqrt(jnp.where(positive, scale, 1.0)), 0.0)
    return centered * inverse_std


def barlow_twins_loss(
    view_a: jax.Array,
    view_b: jax.Array,
    *,
    off_diagonal_weight: float = 5e-3,
    eps: float = 1e-5,
    weights: jax.Array | None = None,
    reduction: reductions.Reduction = "mean",
) -> jax.Array:
    """Barlow Twins: drives the cross-correlation of the two views' dimensions to the identity.

    With Z^A = ``view_a``, Z^B = ``view_b`` [n, d] mean-centered along the batch, C the d×d
    cross-correlation of their dimensions (Zbontar et al. 2021, Eq. 1-2)::

        C_ij = Σ_b z^A_{b,i} z^B_{b,j} / ( √(Σ_b (z^A_{b,i})²) · √(Σ_b (z^B_{b,j})²) )   (Eq. 2)
        L_BT = Σ_i (1 − C_ii)² + λ Σ_i Σ_{j≠i} C_ij²                                       (Eq. 1)

    computed as the official implementation does: each view batch-normalized per dimension
    (biased variance, ``torch.nn.BatchNorm1d(d, affine=False)``, whose ε = 1e-5 is ``eps``), then
    C = ẑ^Aᵀ ẑ^B / n. With ``eps=0`` this is Eq. 2 exactly (the Pearson correlation of
    dimension i of one view and dimension j of the other); ε > 0 scales C by
    σ_iσ_j/√((σ_i² + ε)(σ_j² + ε)), negligible for σ² ≫ ε, and keeps a constant dimension
    differentiable. The loss is symmetric in the views.

    Other forms, not followed: the paper's Algorithm 1 normalizes with ``z.std(0)``
    (torch's unbiased std) but divides by n, which scales Eq. 2's C by (n − 1)/n (so C_ii
    never exceeds (n − 1)/n and the diagonal term never reaches 0); the first release of the
    official code multiplied the loss by ``--scale-loss`` 1/32 with λ = 3.9e-3, the current one
    uses λ = 0.0051 and no scale. pytorch-metric-learning 2.9 has no Barlow Twins loss.

    With ``weights``: the weighted mean, biased variance and cross-correlation of the module
    docstring (an integer weight k counts the sample k times).

    Degenerate batches: a constant (collapsed) dimension normalizes to exactly 0, so its row
    and column of C are 0 and it costs 1 on the diagonal. With ε > 0 its gradient (∝ 1/√ε)
    still pulls it towards the other view's dimension, as in the official code; with ε = 0 its
    correlation is 0/0, taken as 0 with zero gradient. All-zero embeddings give d (4 for
    d = 4) with zero gradient. With fewer than two samples of positive weight (B = 1, or every
    weight 0) there is no correlation to take: the loss is 0 with zero gradient.

    Cost: one D×D cross-correlation, O(B·D²) time and O(D²) memory (see the module docstring).

    Args:
      view_a: [B, D] float, one view of each sample (any float dtype; computed in at least
        float32).
      view_b: [B, D] float, the other view (row i: the same sample as row i of ``view_a``).
      off_diagonal_weight: λ >= 0; default 5e-3, the paper's (Sec. 4, "λ = 5·10⁻³").
      eps: ε >= 0 added to the variance in the normalization; default 1e-5, the official
        code's (``BatchNorm1d``'s default); the paper's Eq. 2 has none (``eps=0``).
      weights: optional [B] per-sample weights for both views; a zero weight removes the
        sample exactly.
      reduction: ``"mean"`` only (the loss of the batch); other values raise ``ValueError``, as
        the loss is not a reduction of per-sample terms.

    Returns:
      scalar in the compute dtype (at least float32).
    """
    views = _prepare_views(view_a, view_b, weights)
    reductions.check_reduction(reduction, supported=("mean",), why=_BATCH_LEVEL)
    _checks.non_negative(off_diagonal_weight, "off_diagonal_weight")
    _checks.non_negative(eps, "eps")

    normalized_a = _batch_normalized(views.a, views, eps)
    normalized_b = _batch_normalized(views.b, views, eps)
    correlation = reductions.safe_divide(
        _weighted_gram(normalized_a, normalized_b, views.weights), views.total
    )
    on_diagonal = jnp.sum(jnp.square(1.0 - jnp.diagonal(correlation)))
    loss = on_diagonal + off_diagonal_weight * _off_diagonal_square_sum(correlation)
    return jnp.where(views.has_statistics, loss, 0.0)
