"""Reduction parts (mlx_jax.reductions: ReductionParts, reduction="parts", finish_reduction)
and anchor-row ranges (mlx_jax.parallel.AnchorRows) on one device: the parts of disjoint
anchor ranges add up to the whole loss, in value and gradients, for every loss that takes
``anchors=``; a range equals the boolean mask it stands for; the range form evaluates fewer
rows. The mesh form (global_batch_loss(split_rows=True)) is in
tests/multidevice/test_row_split.py, which reuses SPLIT_CASES."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mlx_jax import losses as L
from mlx_jax import parallel, reductions
from mlx_jax.parallel import AnchorRows

SCALAR = ("mean", "sum", "mean_nonzero")
C = 16  # classes (the per-class β of the margin loss; singleton batches up to 16)

# (id, loss, hyperparameters, state): every loss with an anchors= argument, with the options
# that change how its sums are formed (pos_neg's two kinds, mining, β and its ν term).
SPLIT_CASES = [
    ("contrastive_pos_neg", L.contrastive_loss, {"balance": "pos_neg", "squared": False}, ()),
    ("siamese", L.siamese_cosine_loss, {}, ()),
    ("triplet_batch_hard", L.triplet_loss, {"mining": "batch_hard"}, ()),
    ("triplet_semihard", L.triplet_loss, {"mining": "semihard"}, ()),
    ("circle", L.circle_loss, {"m": 0.4, "gamma": 30.0}, ()),
    ("multi_similarity_mined", L.multi_similarity_loss, {"mining": "multi_similarity"}, ()),
    ("ntxent", L.ntxent_loss, {"temperature": 0.2}, ()),
    ("supcon", L.supcon_loss, {}, ()),
    ("lifted_structure", L.lifted_structure_loss, {}, ()),
    ("generalized_lifted", L.generalized_lifted_structure_loss, {}, ()),
    ("margin_shared_beta", L.margin_loss, {"nu": 0.3}, (np.float32(0.9),)),
    (
        "margin_class_beta",
        L.margin_loss,
        {"nu": 0.2},
        (np.linspace(0.7, 1.3, C, dtype=np.float32),),
    ),
    ("tuplet_margin", L.tuplet_margin_loss, {"scale": 8.0}, ()),
    ("fast_ap", L.fast_ap_loss, {}, ()),
]
IDS = [case[0] for case in SPLIT_CASES]
# XLA's optimisations cost more compile time than these small programs run.
FAST_COMPILE = {"xla_backend_optimization_level": 0}


def cases(*names):
    """The SPLIT_CASES named, for a parametrization that needs only some."""
    chosen = [case for case in SPLIT_CASES if case[0] in names]
    assert len(chosen) == len(names)
    return {"argvalues": chosen, "ids": [case[0] for case in chosen]}


def takes_block_size(loss) -> bool:
    return loss is not L.siamese_cosine_loss


def split_batch(kind: str, batch: int, seed: int = 0):
    """Embeddings [B, 5], labels [B] in [0, C), weights [B] with zeros.

    ``"mixed"``: classes spread over the batch, uneven weights, weight-0 rows holding huge
    embeddings; ``"one_class"``: every sample in one class (no negatives), the second half
    weight 0; ``"singletons"``: every label different (no positive pairs)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(batch, 5)).astype(np.float32)
    w = rng.uniform(0.5, 2.0, size=batch).astype(np.float32)
    if kind == "mixed":
        y = rng.permutation(np.arange(batch) % 5)
        zero = rng.choice(batch, size=max(1, batch // 8), replace=False)
        w[zero] = 0.0
        x[zero] = 50.0
    elif kind == "one_class":
        y = np.zeros(batch)
        w[batch // 2 :] = 0.0
    elif kind == "singletons":
        y = np.arange(batch) % C
        assert batch <= C
    else:
        raise ValueError(kind)
    return x, y.astype(np.int32), w


def assert_close(actual, expected, what, rtol=1e-5, floor=1e-3):
    """Relative to the largest |expected| (at least ``floor``): float32 sums in another order."""
    expected = np.asarray(expected)
    scale = max(float(np.max(np.abs(expected))), floor)
    np.testing.assert_allclose(
        np.asarray(actual), expected, rtol=rtol, atol=rtol * scale, err_msg=what
    )


# ----------------------------------------------------------------------------- the parts


def test_parts_hold_the_three_sums_and_finish_every_reduction():
    loss = jnp.array([2.0, 0.0, 3.0, 1.0])  # already weighted
    weight = jnp.array([1.0, 2.0, 0.5, 0.5])
    parts = reductions.reduction_parts(loss, weight)
    np.testing.assert_allclose([parts.loss, parts.weight, parts.nonzero], [6.0, 4.0, 2.0])
    assert parts.reduction is None
    for reduction, expected in (("sum", 6.0), ("mean", 1.5), ("mean_nonzero", 3.0)):
        value = reductions.finish_reduction(parts, reduction)
        np.testing.assert_allclose(value, expected, rtol=1e-7)
        np.testing.assert_allclose(
            reductions.reduce_terms(loss, weight, reduction), expected, rtol=1e-7
        )
    same = reductions.reduce_terms(loss, weight, "parts")
    np.testing.assert_allclose([same.loss, same.weight, same.nonzero], [6.0, 4.0, 2.0])


def test_parts_of_disjoint_terms_add_up_where_ratios_do_not():
    loss = jnp.array([8.0, 2.0, 0.0, 1.0, 1.0])
    weight = jnp.array([1.0, 1.0, 2.0, 3.0, 3.0])
    halves = [reductions.reduction_parts(loss[s], weight[s]) for s in (slice(0, 2), slice(2, 5))]
    total = jax.tree.map(jnp.add, *halves)
    for reduction in SCALAR:
        np.testing.assert_allclose(
            reductions.finish_reduction(total, reduction),
            reductions.reduce_terms(loss, weight, reduction),
            rtol=1e-7,
        )
    mean_of_ratios = sum(reductions.finish_reduction(h, "mean") for h in halves) / 2
    np.testing.assert_allclose(reductions.finish_reduction(total, "mean"), 12.0 / 10.0)
    assert abs(float(mean_of_ratios) - 1.2) > 1.0  # (5 + 0.25) / 2: why the sums must travel


def test_parts_are_a_pytree_and_a_tuple_finishes_to_the_sum_of_its_kinds():
    a = reductions.ReductionParts(jnp.float32(6.0), jnp.float32(3.0), jnp.float32(2.0))
    b = reductions.ReductionParts(jnp.float32(1.0), jnp.float32(4.0), jnp.float32(1.0))
    doubled = jax.tree.map(lambda v: 2 * v, (a, b))
    assert isinstance(doubled[0], reductions.ReductionParts)
    assert len(jax.tree.leaves((a, b))) == 6
    np.testing.assert_allclose(reductions.finish_reduction((a, b), "mean"), 2.0 + 0.25)
    np.testing.assert_allclose(reductions.finish_reduction((a, b), "sum"), 7.0)
    np.testing.assert_allclose(reductions.finish_reduction(doubled, "mean_nonzero"), 3.0 + 1.0)


def test_a_fixed_part_keeps_its_reduction_and_an_empty_one_is_zero_with_zero_gradient():
    def value(beta, count, reduction):
        fixed = reductions.ReductionParts(beta * count, count, count, reduction="mean")
        terms = reductions.ReductionParts(jnp.float32(5.0), jnp.float32(2.0), jnp.float32(1.0))
        return reductions.finish_reduction((terms, fixed), reduction)

    for reduction, base in (("sum", 5.0), ("mean", 2.5), ("mean_nonzero", 5.0)):
        np.testing.assert_allclose(value(jnp.float32(0.7), 3.0, reduction), base + 0.7, rtol=1e-6)
    np.testing.assert_allclose(jax.grad(value)(jnp.float32(0.7), 3.0, "sum"), 1.0)
    np.testing.assert_allclose(value(jnp.float32(0.7), 0.0, "sum"), 5.0)
    assert float(jax.grad(value)(jnp.float32(0.7), 0.0, "sum")) == 0.0
    with pytest.raises(TypeError):  # no "+": two kinds must not merge their denominators
        reductions.ReductionParts(1.0, 1.0, 1.0) + reductions.ReductionParts(1.0, 1.0, 1.0)


def test_finish_rejects_none_and_anything_but_parts():
    parts = reductions.reduction_parts(jnp.ones(3), jnp.ones(3))
    with pytest.raises(ValueError, match="reduction must be one of .*'none' keeps the terms"):
        reductions.finish_reduction(parts, "none")
    with pytest.raises(TypeError, match="parts must be a ReductionParts"):
        reductions.finish_reduction(jnp.ones(3), "mean")


def test_a_loss_that_cannot_return_parts_raises_unsupported_reduction():
    x, y, w = split_batch("mixed", 8)
    with pytest.raises(reductions.UnsupportedReduction, match="got 'parts'") as caught:
        L.npairs_loss(x, y, weights=w, reduction="parts")
    assert caught.value.reduction == "parts" and isinstance(caught.value, ValueError)


# ----------------------------------------------------------------------------- anchor rows


def _parts_of_ranges(loss, hyper, state, x, y, w, ranges, block_size):
    options = {"block_size": block_size} if takes_block_size(loss) else {}
    return [
        loss(
            x,
            y,
            *state,
            weights=w,
            anchors=AnchorRows(start, size),
            reduction="parts",
            **options,
            **hyper,
        )
        for start, size in ranges
    ]


@pytest.mark.parametrize(
    ("name", "loss", "hyper", "state"),
    **cases("contrastive_pos_neg", "margin_shared_beta"),
)
def test_parts_of_anchor_ranges_add_up_to_the_loss_and_its_gradients(name, loss, hyper, state):
    """Uneven ranges (3 + 5 + 4 rows) and block_size=2 (padding rows inside a range); the
    two kinds of pos_neg, the margin loss's fixed ν·β part and β's gradient. Every loss on a
    mesh: tests/multidevice/test_row_split.py."""
    x, y, w = split_batch("mixed", 12)
    ranges = [(0, 3), (3, 5), (8, 4)]

    @functools.partial(jax.jit, compiler_options=FAST_COMPILE)
    def both(x, state):
        values = {}
        for reduction in SCALAR:

            def whole(x, state, reduction=reduction):
                return loss(x, y, *state, weights=w, reduction=reduction, **hyper)

            def split(x, state, reduction=reduction):
                parts = _parts_of_ranges(loss, hyper, state, x, y, w, ranges, block_size=2)
                total = functools.reduce(lambda a, b: jax.tree.map(jnp.add, a, b), parts)
                return reductions.finish_reduction(total, reduction)

            values[reduction] = (
                jax.value_and_grad(whole, argnums=(0, 1))(x, state),
                jax.value_and_grad(split, argnums=(0, 1))(x, state),
            )
        return values

    for reduction, (expected, actual) in both(x, state).items():
        (value, grads), (split_value, split_grads) = expected, actual
        assert_close(split_value, value, f"{name} {reduction} value")
        (gx_split, gstate_split), (gx, gstate) = split_grads, grads
        assert_close(gx_split, gx, f"{name} {reduction} d/d embeddings")
        for i, (g_split, g) in enumerate(zip(gstate_split, gstate, strict=True)):
            assert_close(g_split, g, f"{name} {reduction} d/d state {i}")
    value, grads = both(x, state)["mean"][0]
    assert float(value) != 0.0 and np.any(np.asarray(grads[0]) != 0)  # not vacuous


def test_a_range_equals_its_boolean_mask():
    _, loss, hyper, state = cases("contrastive_pos_neg")["argvalues"][0]
    x, y, w = split_batch("mixed", 12)
    start, size = 4, 5
    mask = (np.arange(12) >= start) & (np.arange(12) < start + size)

    def run(anchors, reduction):
        return loss(x, y, *state, weights=w, anchors=anchors, reduction=reduction, **hyper)

    for reduction in SCALAR:
        assert_close(run(AnchorRows(start, size), reduction), run(mask, reduction), reduction)
    ranged = jax.tree.leaves(run(AnchorRows(start, size), "parts"))
    masked = jax.tree.leaves(run(mask, "parts"))
    for a, b in zip(ranged, masked, strict=True):
        assert_close(a, b, "parts")
    # "none": the range's rows of the mask's per-term array
    assert_close(
        run(AnchorRows(start, size), "none"), run(mask, "none")[start : start + size], "none"
    )


def test_a_traced_start_picks_the_rows():
    x, y, w = split_batch("mixed", 12)
    loss = jax.jit(
        lambda start: L.circle_loss(x, y, weights=w, anchors=AnchorRows(start, 4), reduction="none")
    )
    full = L.circle_loss(x, y, weights=w, reduction="none")
    for start in (0, 5, 8):
        assert_close(loss(jnp.int32(start)), full[start : start + 4], f"start {start}")


def test_anchor_rows_are_checked():
    x, y, w = split_batch("mixed", 8)
    with pytest.raises(ValueError, match=r"start must be in \[0, 5\].*got 6"):
        L.contrastive_loss(x, y, anchors=AnchorRows(6, 3))
    with pytest.raises(ValueError, match=r"size must be a static int in \[1, 8\]"):
        L.contrastive_loss(x, y, anchors=AnchorRows(0, 9))
    with pytest.raises(ValueError, match="size must be a static int"):
        L.contrastive_loss(x, y, anchors=AnchorRows(0, 0))
    with pytest.raises(TypeError, match="start must be an int scalar"):
        L.contrastive_loss(x, y, anchors=AnchorRows(1.5, 2))


@pytest.mark.parametrize(
    ("loss", "hyper"),
    [(L.contrastive_loss, {}), (L.triplet_loss, {"mining": "batch_hard"})],
    ids=["contrastive", "triplet_batch_hard"],
)
def test_a_range_of_an_eighth_of_the_rows_costs_a_fraction_of_the_flops(loss, hyper):
    """XLA's cost analysis of forward+backward: [B/8, B] blocks instead of [B, B]."""
    x, y, w = split_batch("mixed", 64)

    def flops(anchors):
        def value(x):
            options = dict(anchors=anchors, reduction="parts", block_size=None)
            parts = loss(x, y, weights=w, **options, **hyper)
            return reductions.finish_reduction(parts, "mean")

        cost = jax.jit(jax.grad(value)).lower(x).compile().cost_analysis()
        cost = cost[0] if isinstance(cost, list | tuple) else cost
        return float(cost["flops"])

    whole, eighth = flops(None), flops(AnchorRows(8, 8))
    assert whole > 0 and eighth < whole / 4, (whole, eighth)


def test_loss_parts_names_a_loss_that_cannot_be_split():
    x, y, w = split_batch("mixed", 8)
    with pytest.raises(ValueError, match="npairs_loss cannot be split by anchor rows: it takes no"):
        parallel.loss_parts(L.npairs_loss, x, y, anchors=AnchorRows(0, 4))

    def unsplittable(x, y, *, weights=None, anchors=None, reduction="mean"):
        reductions.check_reduction(reduction)  # no "parts": a value that is not a sum ratio
        return jnp.sum(x)

    with pytest.raises(ValueError, match="unsplittable cannot be split .* not a ratio of sums"):
        parallel.loss_parts(unsplittable, x, y, anchors=AnchorRows(0, 4))

    def forwards(x, y, **kwargs):  # **kwargs reach a loss without anchors=
        return L.npairs_loss(x, y, **kwargs)

    with pytest.raises(ValueError, match="forwards cannot be split .* no anchors="):
        parallel.loss_parts(forwards, x, y, anchors=AnchorRows(0, 4))
    parts = parallel.loss_parts(L.contrastive_loss, x, y, weights=w, anchors=AnchorRows(0, 8))
    assert_close(
        reductions.finish_reduction(parts, "mean"), L.contrastive_loss(x, y, weights=w), ""
    )
