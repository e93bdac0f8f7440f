"""Plain NumPy float64 references for the softmax and margin-softmax losses.

Written straight from the papers' formulas with explicit per-sample loops: θ from math.acos,
cos(θ + m) from math.cos, ψ with its explicit branch index k, an explicit logsumexp. They share
no code with mlx_jax.
"""

from __future__ import annotations

import math

import numpy as np


def _reduce(losses: list[float], weights: list[float], reduction: str):
    total = sum(loss * w for loss, w in zip(losses, weights, strict=True))
    if reduction == "none":
        return np.array([loss * w for loss, w in zip(losses, weights, strict=True)])
    if reduction == "sum":
        return total
    if reduction == "mean":
        den = sum(weights)
    elif reduction == "mean_nonzero":
        den = sum(w for loss, w in zip(losses, weights, strict=True) if loss > 0)
    else:
        raise ValueError(reduction)
    return total / den if den > 0 else 0.0


def _logsumexp(values: list[float]) -> float:
    top = max(values)
    return top + math.log(sum(math.exp(v - top) for v in values))


def _norm(v) -> float:
    return math.sqrt(sum(float(a) * float(a) for a in v))


def _cosine(x, w_col) -> float:
    nx, nw = _norm(x), _norm(w_col)
    if nx == 0 or nw == 0:
        return 0.0
    return sum(float(a) * float(b) for a, b in zip(x, w_col, strict=True)) / (nx * nw)


def _weights(n, weights):
    return [1.0] * n if weights is None else [float(w) for w in weights]


def softmax(logits, labels, weights=None, reduction="mean"):
    logits = np.asarray(logits, np.float64)
    losses = []
    for i, y in enumerate(labels):
        row = [float(v) for v in logits[i]]
        losses.append(_logsumexp(row) - row[int(y)])
    return _reduce(losses, _weights(len(labels), weights), reduction)


def cosines(x, class_weights) -> np.ndarray:
    x = np.asarray(x, np.float64)
    w = np.asarray(class_weights, np.float64)
    out = np.zeros((x.shape[0], w.shape[1]))
    for i in range(x.shape[0]):
        for j in range(w.shape[1]):
            out[i, j] = _cosine(x[i], w[:, j])
    return out


def _margin_softmax(x, labels, class_weights, target_fn, row_scale_fn, weights, reduction):
    """target_fn(cos θ_y) → penalized target cosine; row_scale_fn(x_i) → the logit scale."""
    cos = cosines(x, class_weights)
    losses = []
    for i, y in enumerate(labels):
        s = row_scale_fn(np.asarray(x[i], np.float64))
        logits = [s * float(c) for c in cos[i]]
        logits[int(y)] = s * target_fn(float(cos[i, int(y)]))
        losses.append(_logsumexp(logits) - logits[int(y)])
    return _reduce(losses, _weights(len(labels), weights), reduction)


def _theta(c: float) -> float:
    return math.acos(min(1.0, max(-1.0, c)))


def combined_target(c, m1, m2, m3, boundary):
    theta = _theta(c)
    margin_cos = math.cos(m1 * theta + m2)
    if boundary == "none":
        value = margin_cos
    elif boundary == "easy":
        value = margin_cos if c > 0 else c
    elif boundary == "monotonic":
        # θ_b where m1·θ + m2 = π; beyond it: cos θ − (π − θ_b)·sin θ_b
        # (insightface / PML for m1 = 1: cos θ − m2·sin m2).
        theta_b = min(math.pi, max(0.0, (math.pi - m2) / m1))
        if theta_b >= math.pi or theta < theta_b:
            value = margin_cos
        else:
            # Step down from cos(π) = −1 at θ_b: the first-order form, or the continuous one.
            value = min(c - (math.pi - theta_b) * math.sin(theta_b), c - 1.0 - math.cos(theta_b))
    else:
        raise ValueError(boundary)
    return value - m3


def combined_margin(
    x,
    labels,
    class_weights,
    m1=1.0,
    m2=0.0,
    m3=0.0,
    scale=64.0,
    boundary="monotonic",
    weights=None,
    reduction="mean",
):
    return _margin_softmax(
        x,
        labels,
        class_weights,
        lambda c: combined_target(c, m1, m2, m3, boundary),
        lambda _: scale,
        weights,
        reduction,
    )


def arcface(x, labels, class_weights, scale=64.0, margin=0.5, boundary="monotonic", **kw):
    """Deng et al. 2019: target s·cos(θ + m)."""
    return combined_margin(x, labels, class_weights, 1.0, margin, 0.0, scale, boundary, **kw)


def cosface(x, labels, class_weights, scale=64.0, margin=0.35, **kw):
    """Wang et al. 2018: target s·(cos θ − m)."""
    return _margin_softmax(
        x,
        labels,
        class_weights,
        lambda c: c - margin,
        lambda _: scale,
        kw.get("weights"),
        kw.get("reduction", "mean"),
    )


def sphereface_psi(c: float, m: int) -> float:
    """ψ(θ) = (−1)^k cos(mθ) − 2k for θ ∈ [kπ/m, (k+1)π/m] (Liu et al. 2017, Eq. 7)."""
    theta = _theta(c)
    k = min(int(math.floor(m * theta / math.pi)), m - 1)
    return (-1) ** k * math.cos(m * theta) - 2 * k


def sphereface(
    x,
    labels,
    class_weights,
    margin=4,
    annealing_lambda=0.0,
    scale=None,
    weights=None,
    reduction="mean",
):
    lam = annealing_lambda
    return _margin_softmax(
        x,
        labels,
        class_weights,
        lambda c: (lam * c + sphereface_psi(c, margin)) / (1.0 + lam),
        (lambda xi: _norm(xi)) if scale is None else (lambda _: scale),
        weights,
        reduction,
    )


def sphereface_lambda(step, base=1000.0, gamma=0.12, power=1.0, minimum=5.0) -> float:
    return max(minimum, base * (1.0 + gamma * step) ** (-power))
