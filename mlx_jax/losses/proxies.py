"""Proxy-based losses: each class has a learned proxy, and samples are compared with the proxies
instead of with each other (O(B·C) terms instead of O(B²)).

* Proxy-Anchor (Kim, Kim, Cho & Kwak 2020, "Proxy Anchor Loss for Deep Metric Learning", CVPR):
  each proxy is an anchor that pulls its batch positives and pushes its batch negatives.
* Proxy-NCA (Movshovitz-Attias, Toshev, Leung, Ioffe & Singh 2017, "No Fuss Distance Metric
  Learning using Proxies", ICCV): NCA of each sample over the proxies.
* Normalized softmax (Zhai & Wu 2019, "Classification is a Strong Baseline for Deep Metric
  Learning", BMVC): softmax cross-entropy over cosine logits / temperature.

The proxies are an explicit [D, C] array, a Flax ``Dense`` kernel's layout (the
``class_weights`` of :mod:`mlx_jax.losses.margin_softmax`; pytorch-metric-learning's
``ProxyAnchorLoss`` and ``ProxyNCALoss`` store [C, D]: pass the transpose). All three work on
the one cosine matrix cos_ij = x̂_i · p̂_j of L2-normalized embeddings and proxy columns
(:func:`~mlx_jax.losses.margin_softmax.cosine_logits`; a zero vector is normalized with an eps,
so it has cosine 0 to everything and finite gradients). Proxy-NCA and the normalized softmax are
softmax cross-entropies over these cosines at a fixed scale, so both are
:func:`~mlx_jax.losses.margin_softmax.combined_margin_loss` without a margin: the same
hand-written cross-entropy VJP and the same ``class_block_size`` option
(:mod:`mlx_jax.losses.class_blocks`: no [B, C] array, same value and gradients).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mlx_jax import _checks, reductions
from mlx_jax.blockwise import check_block_size
from mlx_jax.losses._common import Batch, log_one_plus_sum_exp, prepare_batch
from mlx_jax.losses.margin_softmax import combined_margin_loss, cosine_logits
from mlx_jax.losses.softmax import target_mask

__all__ = ["normalized_softmax_loss", "proxy_anchor_loss", "proxy_nca_loss"]

PROXY_ANCHOR_REDUCTIONS: tuple[str, ...] = ("mean", "sum", "none")


def _check_inputs(embeddings, labels, proxies, weights, name: str) -> tuple[Batch, jax.Array]:
    """Checks (errors name ``name`` for the [D, C] array) and promotes; returns the batch and
    the proxies [D, C] in the common compute dtype."""
    x = _checks.embeddings_array(embeddings)
    p = _checks.class_weights_array(proxies, x.shape[1], name=name)
    if p.shape[1] < 1:
        raise ValueError(
            f"{name} must have shape [{x.shape[1]}, num_classes] with num_classes >= 1, "
            f"got shape {tuple(p.shape)}"
        )
    batch = prepare_batch(x, labels, weights, num_classes=p.shape[1])
    x, p = _checks.promote_all(batch.embeddings, p)
    return batch._replace(embeddings=x, weights=batch.weights.astype(x.dtype)), p


def _cosine_softmax_loss(batch: Batch, p, scale, reduction, class_block_size) -> jax.Array:
    """Per-sample softmax cross-entropy of the logits s·cos_ij, weighted and reduced: the
    margin heads' loss with no margin (cos(1·θ + 0) − 0 is the plain target cosine)."""
    return combined_margin_loss(
        batch.embeddings,
        batch.labels,
        p,
        m1=1.0,
        m2=0.0,
        m3=0.0,
        scale=scale,
        boundary="none",
        weights=batch.weights,
        reduction=reduction,
        class_block_size=class_block_size,
    )


def proxy_anchor_loss(
    embeddings: jax.Array,
    labels: jax.Array,
    proxies: jax.Array,
    *,
    alpha: float = 32.0,
    delta: float = 0.1,
    weights: jax.Array | None = None,
    reduction: reductions.Reduction = "mean",
) -> jax.Array:
    """Proxy-Anchor loss: every proxy is an anchor over the batch (Kim, Kim, Cho & Kwak 2020,
    "Proxy Anchor Loss for Deep Metric Learning", CVPR, Eq. 4)::

        L = 1/|P⁺| Σ_{p∈P⁺} log(1 + Σ_{x∈X_p⁺} exp(−α·(s(x, p) − δ)))
          + 1/|P|  Σ_{p∈P}  log(1 + Σ_{x∈X_p⁻} exp( α·(s(x, p) + δ)))

    with s the cosine similarity, P all C proxies, P⁺ the proxies with at least one positive
    (a sample of their class) in the batch, X_p⁺ / X_p⁻ the batch samples of / not of p's
    class. Each log(1 + Σ exp) is a max-shifted logsumexp with an extra 0 logit, so α = 32
    (or far larger) cannot overflow, in float32 either.

    Weights act *inside* the sums: sample x contributes w_x·exp(…), so an integer weight k is
    the same as k copies of the sample, and a zero weight removes it (from X_p⁺, X_p⁻, and from
    P⁺ if it was its proxy's only positive). The 1/|P⁺| and 1/|P| average proxies, not samples.

    Degenerate batches: a class absent from the batch has only its negative term (its proxy
    is not in P⁺ but counts in |P| = C); a one-class batch has no negatives for its proxy
    (log 1 = 0 for that term); a batch whose weights are all zero gives 0 with zero gradients.
    A zero-norm embedding or proxy has cosine 0 to everything (finite gradients).

    Equal, with the default reduction, to pytorch-metric-learning's
    ``ProxyAnchorLoss(num_classes=C, embedding_size=D, margin=delta, alpha=alpha)`` (its
    ``DivisorReducer`` divides the positive sum by the number of proxies with positives and the
    negative sum by ``num_classes``) with its ``proxies`` [C, D] set to ``proxies.T``; PML has
    no per-sample weights.

    Args:
      embeddings: [B, D] float (any float dtype; computed in at least float32); normalized
        inside.
      labels: [B] int class ids in ``[0, C)`` (checked when concrete; NaN loss under ``jit``).
      proxies: [D, C] float, one proxy per class as columns (a Flax ``Dense`` kernel);
        normalized inside.
      alpha: α > 0, the scale; default 32 (the paper's experiments; also PML's ``alpha``).
      delta: δ >= 0, the margin; default 0.1 (the paper and PML's ``margin``).
      weights: optional [B] per-sample weights inside the sums (above; None → ones).
      reduction: ``"mean"`` (default): Eq. 4 above. ``"sum"``: the two sums over proxies
        without the 1/|P⁺| and 1/|P|. ``"none"``: [2, C], the positive terms (row 0; 0 for a
        proxy not in P⁺) and the negative terms (row 1) per proxy, so that ``"sum"`` is their
        total and ``"mean"`` is ``none[0].sum() / |P⁺| + none[1].sum() / C``. ``"mean_nonzero"``
        is not supported (Eq. 4 fixes how proxies are averaged).

    Returns:
      scalar (or [2, C] for ``reduction="none"``) in the compute dtype (at least float32).
    """
    _checks.positive(alpha, "alpha")
    _checks.non_negative(delta, "delta")
    reductions.check_reduction(
        reduction,
        supported=PROXY_ANCHOR_REDUCTIONS,
        why="Eq. 4 averages the positive terms over P⁺ and the negative terms over all proxies",
    )
    batch, p = _check_inputs(embeddings, labels, proxies, weights, "proxies")
    num_classes = p.shape[1]
    cosines = cosine_logits(batch.embeddings, p)
    # an out-of-range label (possible only under jit) is in every negative set: NaN shows it
    in_range = (batch.labels >= 0) & (batch.labels < num_classes)
    cosines = jnp.where(in_range[:, None], cosines, jnp.nan)
    same_class = target_mask(batch.labels, num_classes)
    valid = batch.valid[:, None]
    # w·exp(z) = exp(z + log w); zero weights are masked out, their log is never taken
    log_w = jnp.log(jnp.where(batch.valid, batch.weights, 1.0))[:, None]
    positive, negative = (same_class & valid).T, (~same_class & valid).T  # [C, B]
    positive_terms = log_one_plus_sum_exp((log_w - alpha * (cosines - delta)).T, positive)
    negative_terms = log_one_plus_sum_exp((log_w + alpha * (cosines + delta)).T, negative)
    if reduction == "none":
        return jnp.stack([positive_terms, negative_terms])
    positive_total, negative_total = jnp.sum(positive_terms), jnp.sum(negative_terms)
    if reduction == "sum":
        return positive_total + negative_total
    with_positives = jnp.sum(jnp.any(positive, axis=1), dtype=positive_terms.dtype)
    return reductions.safe_divide(positive_total, with_positives) + negative_total / num_classes


def proxy_nca_loss(
    embeddings: jax.Array,
    labels: jax.Array,
    proxies: jax.Array,
    *,
    softmax_scale: float = 1.0,
    weights: jax.Array | None = None,
    reduction: reductions.Reduction = "mean",
    class_block_size: int | None = None,
) -> jax.Array:
    """Proxy-NCA: NCA of each sample over the class proxies, with squared Euclidean distances
    of the L2-normalized embedding and proxies (Movshovitz-Attias, Toshev, Leung, Ioffe & Singh
    2017, "No Fuss Distance Metric Learning using Proxies", ICCV: the NCA form of the proxy
    loss), as pytorch-metric-learning computes it::

        L_i = −log( exp(−s·‖x̂_i − p̂_{y_i}‖²) / Σ_{j=1..C} exp(−s·‖x̂_i − p̂_j‖²) )

    The denominator holds every proxy, the positive one included: a softmax cross-entropy over
    the logits −s·d_ij, bounded below by 0. The paper's NCA form sums over the *other* proxies
    only, Σ_{j≠y_i}, which is −log(p_iy / (1 − p_iy)) with p the softmax above: it is
    unbounded below (→ −∞ as the sample reaches its proxy). This function follows PML, the
    common practice.

    For unit vectors ‖x̂ − p̂‖² = 2 − 2·cos, so the logits are 2s·cos_ij − 2s; the −2s is the
    same for every class of a row and cancels in the softmax. The loss is therefore the
    cosine softmax cross-entropy at scale 2s (:func:`normalized_softmax_loss` with temperature
    1/(2s)), computed without forming distances: same value, the same ``class_block_size``
    option, no cancellation in 2 − 2·cos.

    Degenerate batches: the proxy of a class absent from the batch is only in denominators; a
    zero-norm embedding has cosine 0 to every proxy (uniform softmax: L = log C, as in PML);
    all weights zero give 0 with zero gradients. A zero-norm proxy (never a trained one) has
    cosine 0 here, i.e. squared distance 2, where PML's ‖x̂ − 0‖² is 1: there the two differ.

    Equal, with the default reduction and finite per-sample losses, to
    ``ProxyNCALoss(num_classes=C, embedding_size=D, softmax_scale=s)`` with its ``proxies``
    [C, D] set to ``proxies.T`` (``MeanReducer``). PML drops a sample whose target
    probability underflows to exactly 0 (s·Δd beyond ~745 in float64, ~100 in float32) from
    the loss and from the mean; here it keeps its exact, finite loss.

    Args:
      embeddings: [B, D] float (any float dtype; computed in at least float32); normalized
        inside.
      labels: [B] int class ids in ``[0, C)`` (checked when concrete; NaN loss under ``jit``).
      proxies: [D, C] float, one proxy per class as columns (a Flax ``Dense`` kernel);
        normalized inside.
      softmax_scale: s > 0, the scale of the negative squared distances (an inverse
        temperature); default 1 (PML's ``softmax_scale``; the paper has none).
      weights: optional [B] per-sample weights (None → ones; zero excludes a sample).
      reduction: see :mod:`mlx_jax.reductions`; default ``"mean"`` (PML's ``MeanReducer``).
        ``"none"`` returns the [B] weighted per-sample losses.
      class_block_size: None (default) forms the [B, C] cosines at once; an int visits the
        classes in blocks of that many (:mod:`mlx_jax.losses.class_blocks`): memory
        O(B·class_block_size), same value and gradients (reverse mode).

    Returns:
      scalar (or [B] for ``reduction="none"``) in the compute dtype (at least float32).
    """
    _checks.positive(softmax_scale, "softmax_scale")
    reductions.check_reduction(reduction)
    class_block_size = check_block_size(class_block_size, "class_block_size")
    batch, p = _check_inputs(embeddings, labels, proxies, weights, "proxies")
    return _cosine_softmax_loss(batch, p, 2.0 * softmax_scale, reduction, class_block_size)


def normalized_softmax_loss(
    embeddings: jax.Array,
    labels: jax.Array,
    class_weights: jax.Array,
    *,
    temperature: float = 0.05,
    weights: jax.Array | None = None,
    reduction: reductions.Reduction = "mean",
    class_block_size: int | None = None,
) -> jax.Array:
    """Normalized softmax (Zhai & Wu 2019, "Classification is a Strong Baseline for Deep Metric
    Learning", BMVC, Eqs. 1–2): softmax cross-entropy over the cosines of the normalized
    embedding and class weights, divided by a temperature σ::

        L_i = −log( exp(x̂_i · ŵ_{y_i} / σ) / Σ_{j=1..C} exp(x̂_i · ŵ_j / σ) )

    The margin heads of :mod:`mlx_jax.losses.margin_softmax` without a margin, at scale 1/σ
    (:func:`~mlx_jax.losses.margin_softmax.cosface_loss` with ``margin=0``,
    ``scale=1/temperature``). A zero-norm embedding has cosine 0 to every class (L = log C), a
    zero-norm class weight cosine 0 to every embedding; gradients stay finite. Classes absent
    from the batch are only in denominators; all weights zero give 0 with zero gradients.

    Equal to pytorch-metric-learning's
    ``NormalizedSoftmaxLoss(num_classes=C, embedding_size=D, temperature=σ)`` with its ``W``
    [D, C] set to ``class_weights`` (same layout; ``MeanReducer``).

    Args:
      embeddings: [B, D] float (any float dtype; computed in at least float32); normalized
        inside.
      labels: [B] int class ids in ``[0, C)`` (checked when concrete; NaN loss under ``jit``).
      class_weights: [D, C] float (a Flax ``Dense`` kernel); columns normalized inside.
      temperature: σ > 0; default 0.05 (the paper; also PML's default).
      weights: optional [B] per-sample weights (None → ones; zero excludes a sample).
      reduction: see :mod:`mlx_jax.reductions`; default ``"mean"`` (PML's ``MeanReducer``).
        ``"none"`` returns the [B] weighted per-sample losses.
      class_block_size: None (default) forms the [B, C] cosines at once; an int visits the
        classes in blocks of that many (:mod:`mlx_jax.losses.class_blocks`): memory
        O(B·class_block_size), same value and gradients (reverse mode).

    Returns:
      scalar (or [B] for ``reduction="none"``) in the compute dtype (at least float32).
    """
    _checks.positive(temperature, "temperature")
    reductions.check_reduction(reduction)
    class_block_size = check_block_size(class_block_size, "class_block_size")
    batch, w = _check_inputs(embeddings, labels, class_weights, weights, "class_weights")
    return _cosine_softmax_loss(batch, w, 1.0 / temperature, reduction, class_block_size)
