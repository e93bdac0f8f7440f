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


def sq_euclidean(a, b) -> float:
    return float(np.sum((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2))


def _softplus(v: float) -> float:
    return max(v, 0.0) + math.log1p(math.exp(-abs(v)))


def triplet(
    x,
    y,
    margin=0.2,
    mining="semihard",
    squared=True,
    soft=False,
    semihard_fallback="farthest",
    weights=None,
    reduction="mean",
) -> float:
    """FaceNet triplet loss with each miner written as a search over the batch."""
    n = len(y)
    w = np.ones(n) if weights is None else np.asarray(weights, np.float64)
    dist = sq_euclidean if squared else euclidean
    hinge = _softplus if soft else (lambda v: max(v, 0.0))
    ok = [w[i] > 0 for i in range(n)]
    terms = []  # (loss, weight)
    for a in range(n):
        if not ok[a]:
            continue
        positives = [p for p in range(n) if p != a and ok[p] and y[p] == y[a]]
        negatives = [k for k in range(n) if ok[k] and y[k] != y[a]]
        if not positives or not negatives:
            continue
        if mining == "batch_hard":
            d_ap = max(dist(x[a], x[p]) for p in positives)
            d_an = min(dist(x[a], x[k]) for k in negatives)
            terms.append((hinge(d_ap - d_an + margin), w[a]))
            continue
        for p in positives:
            d_ap = dist(x[a], x[p])
            if mining == "semihard":
                farther = [dist(x[a], x[k]) for k in negatives if dist(x[a], x[k]) > d_ap]
                if farther:
                    d_an = min(farther)
                elif semihard_fallback == "farthest":
                    d_an = max(dist(x[a], x[k]) for k in negatives)
                else:
                    continue
                terms.append((hinge(d_ap - d_an + margin), w[a]))
                continue
            for k in negatives:
                d_an = dist(x[a], x[k])
                if mining == "semihard_band" and not (0 < d_an - d_ap <= margin):
                    continue
                terms.append((hinge(d_ap - d_an + margin), w[a]))
    return _reduce(terms, reduction)


def center(x, y, centers, weights=None, reduction="mean") -> float:
    """Wen et al. 2016 Eq. 2 averaged over the batch: ½·mean ‖x_i − c_{y_i}‖²."""
    n = len(y)
    w = np.ones(n) if weights is None else np.asarray(weights, np.float64)
    terms = [(0.5 * sq_euclidean(x[i], centers[y[i]]), w[i]) for i in range(n) if w[i] > 0]
    return _reduce(terms, reduction)


def update_centers(centers, x, y, alpha, weights=None):
    """Wen et al. 2016 Eq. 4, looping over classes."""
    c = np.asarray(centers, np.float64).copy()
    n = len(y)
    w = np.ones(n) if weights is None else np.asarray(weights, np.float64)
    new = c.copy()
    for j in range(len(c)):
        numerator = np.zeros(c.shape[1])
        count = 0.0
        for i in range(n):
            if y[i] == j:
                numerator += w[i] * (c[j] - np.asarray(x[i], np.float64))
                count += w[i]
        new[j] = c[j] - alpha * numerator / (1.0 + count)
    return new


def standalone(x, y, centers, weight_intra=1.0, weight_inter=0.1, eps=1e-12, weights=None):
    """Seed 001: w_intra·Σ‖x_i − c_{y_i}‖²/m − w_inter·ΣΣ I(y_i≠y_j)·log‖x_i − x_j‖²/m."""
    n = len(y)
    w = np.ones(n) if weights is None else np.asarray(weights, np.float64)
    m = sum(w[i] for i in range(n) if w[i] > 0)
    intra = sum(w[i] * sq_euclidean(x[i], centers[y[i]]) for i in range(n) if w[i] > 0) / m
    inter = 0.0
    for i in range(n):
        for j in range(n):
            if w[i] > 0 and w[j] > 0 and y[i] != y[j]:
                inter -= w[i] * math.log(sq_euclidean(x[i], x[j]) + eps)
    return weight_intra * intra + weight_inter * inter / m


def triplet_center(x, y, centers, margin, squared=True, reduction="mean") -> float:
    """He et al. 2018: max(D(x_i, c_{y_i}) + m − min_{j≠y_i} D(x_i, c_j), 0)."""

    def dist(a, b):
        return 0.5 * sq_euclidean(a, b) if squared else euclidean(a, b)

    terms = []
    for i in range(len(y)):
        own = dist(x[i], centers[y[i]])
        other = min(dist(x[i], centers[j]) for j in range(len(centers)) if j != y[i])
        terms.append((max(own + margin - other, 0.0), 1.0))
    return _reduce(terms, reduction)
