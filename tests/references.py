"""Plain NumPy references, written from the papers' formulas with explicit loops.

They share no code with mlx_jax: every distance is computed from its definition, every pair or
triplet visited one by one, and results are in float64.
"""

from __future__ import annotations

import math

import numpy as np


def _reduce(terms: list[tuple[float, float]], reduction: str) -> float:
    """terms: (loss, weight) per term."""
    total = sum(loss * w for loss, w in terms)
    if reduction == "sum":
        return total
    if reduction == "mean":
        den = sum(w for _, w in terms)
    elif reduction == "mean_nonzero":
        den = sum(w for loss, w in terms if loss > 0)
    else:
        raise ValueError(reduction)
    return total / den if den > 0 else 0.0


def euclidean(a, b) -> float:
    return math.sqrt(float(np.sum((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2)))


def contrastive(
    x,
    y,
    margin=1.0,
    squared=True,
    pos_margin=0.0,
    neg_margin=None,
    balance="pairs",
    weights=None,
    reduction="mean",
) -> float:
    n = len(y)
    w = np.ones(n) if weights is None else np.asarray(weights, np.float64)
    neg_margin = margin if neg_margin is None else neg_margin
    pos_terms, neg_terms = [], []
    for i in range(n):
        for j in range(n):
            if i == j or w[i] == 0 or w[j] == 0:
                continue
            d = euclidean(x[i], x[j])
            if y[i] == y[j]:
                loss = 0.5 * d * d if squared else max(0.0, d - pos_margin)
                pos_terms.append((loss, w[i]))
            else:
                loss = 0.5 * max(0.0, margin - d) ** 2 if squared else max(0.0, neg_margin - d)
                neg_terms.append((loss, w[i]))
    if balance == "pos_neg":
        return _reduce(pos_terms, reduction) + _reduce(neg_terms, reduction)
    return _reduce(pos_terms + neg_terms, reduction)
