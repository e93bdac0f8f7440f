"""Checks of the causes that the per-op profiles in this folder point to (see README.md).

``python benchmarks/results/profiles/checks.py`` times, in one process, each suspect pattern
next to an alternative that computes the same values, forward + backward (VJP), jitted, and
prints a markdown table: the best of N calls (the machine these ran on was shared with other
jobs; the minimum is the least disturbed call), their ratio, and the largest difference between
the two results relative to the largest value. Standalone JAX; no mlx_jax code is changed.

1. Column norms of a class-weight matrix W [D, C] (``l2_normalize(w, axis=0)``): a reduce over
   axis 0, forward and backward, vs a custom VJP whose two column sums are ones-vector matmuls.
2. A max / softmax-weighted sum over K per-class columns (sub-centers, SoftTriple centers):
   over the minor axis of [B, C, K] vs over the middle axis of [B, K, C].
3. The column-gradient matmul of a pair loss's row block, Gᵀ·x_rows ([64, 4096]ᵀ × [64, 128]):
   XLA:CPU's Eigen ``dot`` (contraction over dimension 0 of both operands) vs YNNPACK after an
   explicit transpose copy.
4. The gradient of an all-pairs Gram matrix x·xᵀ: autodiff (G·x and Gᵀ·x) vs one matmul
   (G + Gᵀ)·x in a custom VJP.
5. The same for a covariance zᵀz [D, D] (VICReg's covariance term, per view): autodiff's two
   [B, D]×[D, D] matmuls vs one, z·(G + Gᵀ).
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

HIGHEST = lax.Precision.HIGHEST


def best_ms(fn, *args, calls: int) -> float:
    jax.block_until_ready(fn(*args))
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return 1e3 * min(times)


def compare(name, a, b, args, calls):
    fa, fb = jax.jit(a), jax.jit(b)
    ra, rb = fa(*args), fb(*args)
    diff = float(jnp.max(jnp.abs(ra - rb)) / jnp.max(jnp.abs(ra)))
    ta, tb = best_ms(fa, *args, calls=calls), best_ms(fb, *args, calls=calls)
    print(f"| {name} | {ta:.1f} | {tb:.1f} | {ta / tb:.2f} | {diff:.1e} |", flush=True)


# 1. column norms ------------------------------------------------------------------------------
def normalize_columns(w):
    return w * lax.rsqrt(jnp.maximum(jnp.sum(w * w, axis=0, keepdims=True), 1e-12))


def column_sum(a):
    return jnp.matmul(jnp.ones((1, a.shape[0]), a.dtype), a, precision=HIGHEST)


@jax.custom_vjp
def normalize_columns_dot(w):
    return w * lax.rsqrt(jnp.maximum(column_sum(w * w), 1e-12))


def _ncd_fwd(w):
    inv = lax.rsqrt(jnp.maximum(column_sum(w * w), 1e-12))
    return w * inv, (w, inv)


def _ncd_bwd(residuals, g):
    w, inv = residuals
    unit = w * inv
    # (g − ŵ·Σ_d g·ŵ)/‖w‖; a sketch: the gradient where the 1e-12 clamp binds is not handled
    return ((g - unit * column_sum(g * unit)) * inv,)


normalize_columns_dot.defvjp(_ncd_fwd, _ncd_bwd)


# 4. Gram matrix -------------------------------------------------------------------------------
@jax.custom_vjp
def gram(x):
    return jnp.matmul(x, x.T, precision=HIGHEST)


def _gram_fwd(x):
    return gram(x), x


def _gram_bwd(x, g):
    return (jnp.matmul(g + g.T, x, precision=HIGHEST),)


gram.defvjp(_gram_fwd, _gram_bwd)


@jax.custom_vjp
def covariance(z):
    return jnp.matmul(z.T, z, precision=HIGHEST)


def _cov_fwd(z):
    return covariance(z), z


def _cov_bwd(z, g):
    return (jnp.matmul(z, g + g.T, precision=HIGHEST),)


covariance.defvjp(_cov_fwd, _cov_bwd)


def off_diagonal_square_sum(matrix):
    return jnp.sum(jnp.where(jnp.eye(matrix.shape[0], dtype=bool), 0.0, jnp.square(matrix)))


def main() -> None:
    rng = np.random.default_rng(0)
    print(f"jax {jax.__version__}, {jax.devices()[0].platform}; {time.strftime('%F %T')} UTC\n")
    print("| check | as the losses do it, ms | alternative, ms | ratio | max diff / max value |")
    print("|---|---|---|---|---|")

    for columns in (10_000, 30_000, 100_000):
        w = jnp.asarray(rng.standard_normal((128, columns), dtype=np.float32))
        g = jnp.asarray(rng.standard_normal((128, columns), dtype=np.float32))
        compare(
            f"1. normalize W [128, {columns}] columns, fwd+VJP: reduce axis 0 vs ones-matmuls",
            lambda w, g: jax.vjp(normalize_columns, w)[1](g)[0],
            lambda w, g: jax.vjp(normalize_columns_dot, w)[1](g)[0],
            (w, g),
            calls=7,
        )

    batch, classes = 1024, 10_000
    for k in (3, 10):
        minor = rng.standard_normal((batch, classes, k), dtype=np.float32) * 0.3
        middle = jnp.asarray(np.ascontiguousarray(np.moveaxis(minor, 2, 1)))
        minor = jnp.asarray(minor)
        if k == 3:
            label = "max over K = 3"

            def over(c, axis):
                return jnp.max(c, axis=axis)
        else:
            label = "softmax(c/0.1)-weighted sum over K = 10"

            def over(c, axis):
                return jnp.sum(jax.nn.softmax(c / 0.1, axis=axis) * c, axis=axis)

        a = jax.jit(jax.grad(lambda c, over=over: jnp.sum(over(c, 2) ** 2)))
        b = jax.jit(jax.grad(lambda c, over=over: jnp.sum(over(c, 1) ** 2)))
        ra = jnp.moveaxis(a(minor), 2, 1)
        diff = float(jnp.max(jnp.abs(ra - b(middle))) / jnp.max(jnp.abs(ra)))
        ta, tb = best_ms(a, minor, calls=3), best_ms(b, middle, calls=3)
        print(
            f"| 2. {label}, fwd+grad: [1024, 10000, K] vs [1024, K, 10000] | {ta:.0f} | "
            f"{tb:.0f} | {ta / tb:.2f} | {diff:.1e} |",
            flush=True,
        )

    g_rows = jnp.asarray(rng.standard_normal((64, 4096), dtype=np.float32))
    x_rows = jnp.asarray(rng.standard_normal((64, 128), dtype=np.float32))
    compare(
        "3. Gᵀ·x_rows [64, 4096]ᵀ × [64, 128]: Eigen dot vs transpose copy + YNNPACK",
        lambda g, x: jnp.matmul(g.T, x, precision=HIGHEST),
        lambda g, x: jnp.matmul(lax.optimization_barrier(g.T), x, precision=HIGHEST),
        (g_rows, x_rows),
        calls=50,
    )

    x = jnp.asarray(rng.standard_normal((1024, 128), dtype=np.float32) / np.sqrt(128))

    def logsumexp_loss(f):
        return jax.grad(lambda x: jnp.sum(jax.nn.logsumexp(4.0 * f(x), axis=1)))

    compare(
        "4. grad of Σ logsumexp(4·x·xᵀ), x [1024, 128]: autodiff vs (G + Gᵀ)·x VJP",
        logsumexp_loss(lambda x: jnp.matmul(x, x.T, precision=HIGHEST)),
        logsumexp_loss(gram),
        (x,),
        calls=40,
    )

    z = jnp.asarray(rng.standard_normal((1024, 128), dtype=np.float32))
    compare(
        "5. grad of Σ_{i≠j} (zᵀz)²_ij, z [1024, 128]: autodiff vs z·(G + Gᵀ) VJP",
        jax.grad(lambda z: off_diagonal_square_sum(jnp.matmul(z.T, z, precision=HIGHEST))),
        jax.grad(lambda z: off_diagonal_square_sum(covariance(z))),
        (z,),
        calls=100,
    )


if __name__ == "__main__":
    main()
