"""Plain NumPy float64 references for the pair losses (circle, siamese cosine).

Written from the papers' formulas with explicit loops over anchors and pairs; they share no
code with mlx_jax (nor with tests/references.py).
"""

from __future__ import annotations

import math

import numpy as np

from tests.references import _reduce

EPS = 1e-12  # a zero vector's norm is taken as EPS (torch.nn.functional.normalize's eps)


def cosine(a, b) -> float:
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    norm_a = max(math.sqrt(float(np.sum(a * a))), EPS)
    norm_b = max(math.sqrt(float(np.sum(b * b))), EPS)
    return float(np.sum(a * b)) / (norm_a * norm_b)


def log1p_sum_exp(exponents: list[float]) -> float:
    """log(1 + Σ_k exp(z_k)), shifted by max(0, max z) so that no exp overflows."""
    shift = max([0.0, *exponents])
    total = math.exp(-shift)
    for z in exponents:
        total += math.exp(z - shift)
    return shift + math.log(total)


def circle(
    x,
    y,
    m=0.25,
    gamma=256.0,
    weights=None,
    reduction="mean",
    alpha_from=None,
):
    """Circle loss (Sun et al. 2020, Eq. 6/8), one anchor at a time.

    L_i = log[1 + Σ_n exp(γ α_n (s_n − Δ_n)) · Σ_p exp(−γ α_p (s_p − Δ_p))], computed as
    log(1 + Σ_{n, p} exp(a_n + b_p)). ``alpha_from`` (embeddings, default ``x``) is where the
    weights α are evaluated: passing a fixed point holds α constant, as the paper's
    back-propagation does, so finite differences of this function check the gradient.
    ``reduction="none"`` gives the [B] weighted per-anchor losses.
    """
    x = np.asarray(x, np.float64)
    xa = x if alpha_from is None else np.asarray(alpha_from, np.float64)
    n = len(y)
    w = np.ones(n) if weights is None else np.asarray(weights, np.float64)
    o_p, o_n, delta_p, delta_n = 1.0 + m, -m, 1.0 - m, m
    terms = []
    per_anchor = np.zeros(n)
    for i in range(n):
        if w[i] == 0:
            continue
        pos_exponents, neg_exponents = [], []
        for j in range(n):
            if j == i or w[j] == 0:
                continue
            s = cosine(x[i], x[j])
            s_alpha = cosine(xa[i], xa[j])
            if y[j] == y[i]:
                alpha = max(0.0, o_p - s_alpha)
                pos_exponents.append(-gamma * alpha * (s - delta_p))
            else:
                alpha = max(0.0, s_alpha - o_n)
                neg_exponents.append(gamma * alpha * (s - delta_n))
        if not pos_exponents or not neg_exponents:
            continue
        loss = log1p_sum_exp([a + b for a in neg_exponents for b in pos_exponents])
        terms.append((loss, w[i]))
        per_anchor[i] = loss * w[i]
    if reduction == "none":
        return per_anchor
    return _reduce(terms, reduction)


def siamese_cosine(
    x,
    y,
    positive_target=1.0,
    negative_target=-0.9,
    balance="pairs",
    weights=None,
    reduction="mean",
):
    """Bromley et al. 1993: (cos(x_i, x_j) − target)² over ordered pairs i != j.

    ``reduction="none"`` gives the [B, B] weighted pair losses.
    """
    n = len(y)
    w = np.ones(n) if weights is None else np.asarray(weights, np.float64)
    pos_terms, neg_terms = [], []
    matrix = np.zeros((n, n))
    for i in range(n):
        for j in range(n):
            if i == j or w[i] == 0 or w[j] == 0:
                continue
            c = cosine(x[i], x[j])
            if y[i] == y[j]:
                loss = (c - positive_target) ** 2
                pos_terms.append((loss, w[i]))
            else:
                loss = (c - negative_target) ** 2
                neg_terms.append((loss, w[i]))
            matrix[i, j] = loss * w[i]
    if reduction == "none":
        return matrix
    if balance == "pos_neg":
        return _reduce(pos_terms, reduction) + _reduce(neg_terms, reduction)
    return _reduce(pos_terms + neg_terms, reduction)


def numerical_gradient(fn, x, eps: float = 1e-6) -> np.ndarray:
    """Central differences of a scalar ``fn`` at ``x`` (float64), one coordinate at a time."""
    x = np.asarray(x, np.float64)
    grad = np.zeros_like(x)
    for index in np.ndindex(x.shape):
        step = np.zeros_like(x)
        step[index] = eps
        grad[index] = (fn(x + step) - fn(x - step)) / (2 * eps)
    return grad
