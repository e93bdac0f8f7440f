"""Class-sharded margin-softmax heads: exact Partial FC for very many classes.

With C classes the class-weight matrix W [D, C] of a margin head (ArcFace, CosFace, insightface's
combined margin; :mod:`mlx_jax.losses.margin_softmax`) and its logits [B, C] outgrow one device
long before the backbone does. Partial FC (An et al. 2021, "Partial FC: Training 10 Million
Identities on a Single Machine", ICCVW; insightface ``arcface_torch/partial_fc.py``) shards W
along C over N devices: device k holds the columns [k·C/N, (k+1)·C/N) and computes only its
cosines [B, C/N]. Softmax cross-entropy needs three numbers per sample from all shards:

    M_i   = max_k max_{j ∈ shard k} z_ij                      (pmax; a stabiliser, no gradient)
    S_i   = Σ_k Σ_{j ∈ shard k} exp(z_ij − M_i)               (psum)
    z_iy  = s·(cos(m1·θ_iy + m2) − m3),  cos θ_iy from the owner of class y_i   (psum)
    L_i   = M_i + log S_i − z_iy

where z_ij = s·cos θ_ij for j ≠ y_i and the target logit z_iy replaces the owner's column y_i
(ArcFace paper, Deng et al. 2019, Eq. 4). The target cosine is summed over devices with every
non-owner contributing 0, so each device sees the same z_iy and applies the margin with the very
function the unsharded losses use (:func:`mlx_jax.losses.margin_softmax.combined_margin_target`);
the value and the gradients w.r.t. the embeddings and every W shard equal
:func:`~mlx_jax.losses.margin_softmax.combined_margin_loss` up to float rounding. This is the
*exact* Partial FC (sample rate r = 1, the paper's "model parallel" baseline); no [B, C] array
exists anywhere: per device O(B·C/N + D·C/N) memory, and the collectives move O(B) floats
(plus the [B, D] embeddings for a data-sharded batch).

**Shapes.** ``class_weights`` [D, C_pad] is sharded along its columns over the mesh axis
``axis_name`` (N devices); C_pad must be divisible by N. When the real class count C is not,
keep W padded to :func:`padded_num_classes` columns and pass ``num_classes=C``: columns ≥ C are
left out of the normaliser (exp → 0) and get zero gradient, so the loss is exactly that of
W[:, :C]. :func:`shard_class_weights` pads and places W.

**Batch.** ``batch_sharded=False`` (default): embeddings [B, D], labels [B] and weights [B] are
replicated on every device of the axis. ``batch_sharded=True``: they are sharded along the
batch over the same axis (data parallel, as insightface) and gathered inside: the loss is that
of the whole global batch, and each device's embedding gradient is its own rows of it
(insightface's ``AllGather`` backward, a reduce-scatter).

**Sampled Partial FC** (``sample_rate`` r < 1, the paper's method; insightface ``PartialFC_V2``):
each device keeps the classes of its shard that occur in the batch's labels plus uniformly random
other classes, floor(r·C/N) columns in all, and the softmax runs over the kept classes only
(positives are always kept, so every target logit is exact). It is an approximation of the
loss above — equal to the unsharded loss over the sampled classes — that saves the B·(1 − r)·C/N
logits and their exps; only the sampled columns of W get a gradient.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from mlx_jax import _checks, reductions
from mlx_jax.losses.margin_softmax import (
    Boundary,
    check_margins,
    combined_margin_target,
    cosine_logits,
)

__all__ = [
    "class_sharding",
    "padded_num_classes",
    "partial_fc_arcface_loss",
    "partial_fc_cosface_loss",
    "partial_fc_loss",
    "partial_fc_predict",
    "partial_fc_terms",
    "shard_class_weights",
]


# --------------------------------------------------------------------------------------------
# Placement helpers
# --------------------------------------------------------------------------------------------


def _axis_size(mesh: Mesh, axis_name: str) -> int:
    if not isinstance(mesh, Mesh):
        raise TypeError(f"mesh must be a jax.sharding.Mesh, got {type(mesh).__name__}")
    if axis_name not in mesh.axis_names:
        raise ValueError(
            f"axis_name must be one of the mesh's axes {list(mesh.axis_names)}, got {axis_name!r}"
        )
    return int(mesh.shape[axis_name])


def padded_num_classes(num_classes: int, num_shards: int) -> int:
    """Smallest multiple of ``num_shards`` that is >= ``num_classes`` (columns of padded W)."""
    if num_classes < 1 or num_shards < 1:
        raise ValueError(
            f"num_classes and num_shards must be >= 1, got {num_classes} and {num_shards}"
        )
    return -(-num_classes // num_shards) * num_shards


def class_sharding(mesh: Mesh, axis_name: str = "model") -> NamedSharding:
    """``NamedSharding`` of W [D, C]: columns split over ``axis_name``, rows replicated."""
    _axis_size(mesh, axis_name)
    return NamedSharding(mesh, P(None, axis_name))


def shard_class_weights(
    class_weights: jax.Array, mesh: Mesh, axis_name: str = "model"
) -> jax.Array:
    """Pads W [D, C] with zero columns to :func:`padded_num_classes` and shards it by class.

    Returns [D, C_pad] placed with :func:`class_sharding`; pass ``num_classes=C`` to the losses.
    Zero columns are harmless: they are masked out of the normaliser and never updated by a
    gradient step (their gradient is exactly 0). For a W too large for one device, build it
    sharded instead (e.g. ``jax.jit(init, out_shardings=class_sharding(mesh))``).
    """
    _checks.float_array(class_weights, "class_weights", 2, "[dim, num_classes]")
    w = jnp.asarray(class_weights)  # the caller's dtype: bf16 storage stays bf16
    num_shards = _axis_size(mesh, axis_name)
    extra = padded_num_classes(w.shape[1], num_shards) - w.shape[1]
    if extra:
        w = jnp.pad(w, ((0, 0), (0, extra)))
    return jax.device_put(w, class_sharding(mesh, axis_name))


# --------------------------------------------------------------------------------------------
# The per-device computation (call inside shard_map)
# --------------------------------------------------------------------------------------------


def _shard_columns(w_local: jax.Array, axis_name: str) -> jax.Array:
    """Global class ids [C_local] of this device's shard: [k·C_local, (k+1)·C_local)."""
    local_classes = w_local.shape[1]
    offset = jax.lax.axis_index(axis_name) * local_classes
    return offset + jnp.arange(local_classes, dtype=jnp.int32)


def _margin_terms(x, labels, w_columns, columns, axis_name, num_classes, margins):
    """L_i [B] from this device's columns ``w_columns`` [D, K] of W with global ids ``columns``
    [K] (its whole shard, or the classes it sampled); ids >= num_classes are padding.
    ``margins`` = (m1, m2, m3, scale, boundary)."""
    m1, m2, m3, scale, boundary = margins
    cosines = cosine_logits(x, w_columns)
    owner = labels[:, None] == columns[None, :]  # at most one True per row, on one device
    cos_y = jax.lax.psum(jnp.sum(jnp.where(owner, cosines, 0.0), axis=1), axis_name)
    in_range = jnp.logical_and(labels >= 0, labels < num_classes)
    cos_y = jnp.where(in_range, cos_y, jnp.nan)  # no owner: NaN, as take_target unsharded
    target = combined_margin_target(cos_y, m1, m2, m3, boundary)
    logits = scale * jnp.where(owner, target[:, None], cosines)
    logits = jnp.where((columns < num_classes)[None, :], logits, -jnp.inf)
    # The max only keeps exp() in range: any M gives the same log-sum-exp, so it carries no
    # gradient (as jax.nn.logsumexp); a shard of padding columns only has max −inf.
    local_max = jax.lax.stop_gradient(jnp.max(logits, axis=1))
    row_max = jax.lax.pmax(local_max, axis_name)
    sum_exp = jax.lax.psum(jnp.sum(jnp.exp(logits - row_max[:, None]), axis=1), axis_name)
    return row_max + jnp.log(sum_exp) - scale * target


def partial_fc_terms(
    embeddings: jax.Array,
    labels: jax.Array,
    class_weights_shard: jax.Array,
    *,
    axis_name: str,
    num_classes: int,
    m1: float = 1.0,
    m2: float = 0.0,
    m3: float = 0.0,
    scale: float = 64.0,
    boundary: Boundary = "monotonic",
) -> jax.Array:
    """Per-sample combined-margin cross-entropy L_i [B], for use **inside** ``jax.shard_map``.

    The building block of :func:`partial_fc_loss` for callers that write their own
    ``shard_map`` (e.g. on a larger mesh). Every device of ``axis_name`` must pass the same
    ``embeddings`` [B, D] and ``labels`` [B] and its own shard [D, C_pad/N] of W (device k
    owns the global classes [k·C_pad/N, (k+1)·C_pad/N)); the result [B] is the same on every
    device (see the module docstring for the math). Hyperparameters as in
    :func:`~mlx_jax.losses.margin_softmax.combined_margin_loss`; no argument checks here.
    """
    columns = _shard_columns(class_weights_shard, axis_name)
    margins = (m1, m2, m3, scale, boundary)
    return _margin_terms(
        embeddings, labels, class_weights_shard, columns, axis_name, num_classes, margins
    )


def _sample_columns(labels, w_local, key, axis_name, num_classes, num_sample):
    """insightface ``PartialFC_V2.sample``: this device's positive classes (labels in its
    shard) plus uniformly random other real classes, ``num_sample`` in all, in class order.

    Returns (W[:, sampled] [D, num_sample], sampled global ids [num_sample]).
    """
    columns = _shard_columns(w_local, axis_name)
    positive = jnp.any(labels[:, None] == columns[None, :], axis=0)
    key = jax.random.fold_in(key, jax.lax.axis_index(axis_name))
    score = jax.random.uniform(key, columns.shape)
    # Positives first (score 2 > any uniform), padding last (−1).
    score = jnp.where(positive, 2.0, jnp.where(columns < num_classes, score, -1.0))
    index = jnp.sort(jax.lax.top_k(score, num_sample)[1])
    return jnp.take(w_local, index, axis=1), columns[index]


def _gather_rows(local: jax.Array, axis_name: str) -> jax.Array:
    """The global [N·b, ...] array from every device's rows [b, ...], as a psum of zero-padded
    slices: exact (it adds zeros), typed device-invariant (``jax.lax.all_gather``'s result is
    typed varying, and ``all_gather_invariant`` is not public in jax 0.10), and its transpose
    hands each device its rows of the summed cotangent (insightface's AllGather backward)."""
    rows = local.shape[0]
    size = jax.lax.axis_size(axis_name)
    start = jax.lax.axis_index(axis_name) * rows
    full = jnp.zeros((size * rows, *local.shape[1:]), local.dtype)
    full = jax.lax.dynamic_update_slice_in_dim(full, local, start, axis=0)
    return jax.lax.psum(full, axis_name)


# --------------------------------------------------------------------------------------------
# Public losses
# --------------------------------------------------------------------------------------------


def _check_sharded_weights(embeddings, class_weights, mesh, axis_name, num_classes):
    """Checks x [B, D] and the class-sharded W [D, C_pad]; returns (x, W, num_classes, N)."""
    num_shards = _axis_size(mesh, axis_name)
    x = _checks.embeddings_array(embeddings)
    w = _checks.class_weights_array(class_weights, x.shape[1])
    if w.shape[1] % num_shards:
        raise ValueError(
            f"class_weights must have a number of columns divisible by the {num_shards} devices "
            f"of mesh axis {axis_name!r}, got shape {tuple(w.shape)}: pad it to "
            f"[{w.shape[0]}, {padded_num_classes(w.shape[1], num_shards)}] "
            "(shard_class_weights) and pass num_classes"
        )
    if num_classes is None:
        num_classes = w.shape[1]
    if not 1 <= num_classes <= w.shape[1]:
        raise ValueError(
            f"num_classes must be in [1, {w.shape[1]}] (columns of class_weights), "
            f"got {num_classes}"
        )
    return x, w, int(num_classes), num_shards


def _check_sharded_inputs(
    embeddings, labels, class_weights, weights, mesh, axis_name, num_classes, batch_sharded
):
    x, w, num_classes, num_shards = _check_sharded_weights(
        embeddings, class_weights, mesh, axis_name, num_classes
    )
    if batch_sharded and x.shape[0] % num_shards:
        raise ValueError(
            f"embeddings must have a batch divisible by the {num_shards} devices of mesh axis "
            f"{axis_name!r} when batch_sharded=True, got shape {tuple(x.shape)}"
        )
    y = _checks.labels_array(labels, x.shape[0], num_classes=num_classes)
    sample_w = _checks.sample_weights(weights, x.shape[0], x.dtype)
    return x, y, w, sample_w, num_classes


def partial_fc_loss(
    embeddings: jax.Array,
    labels: jax.Array,
    class_weights: jax.Array,
    *,
    mesh: Mesh,
    axis_name: str = "model",
    num_classes: int | None = None,
    batch_sharded: bool = False,
    m1: float = 1.0,
    m2: float = 0.0,
    m3: float = 0.0,
    scale: float = 64.0,
    boundary: Boundary = "monotonic",
    weights: jax.Array | None = None,
    reduction: reductions.Reduction = "mean",
    sample_rate: float = 1.0,
    key: jax.Array | None = None,
) -> jax.Array:
    """insightface's combined margin softmax with W sharded by class (exact Partial FC).

    Equals :func:`~mlx_jax.losses.margin_softmax.combined_margin_loss` on
    ``class_weights[:, :num_classes]`` (value and gradients), computed as in the module
    docstring: local cosines [B, C/N] per device, a ``pmax`` of the row max, a ``psum`` of the
    exps and a ``psum`` of the owner's target cosine (An et al. 2021, Partial FC, with sample
    rate 1; Deng et al. 2019, Eq. 4 for the margin)::

        L_i = −log( e^{s·(cos(m1·θ_y + m2) − m3)} /
                    (e^{s·(cos(m1·θ_y + m2) − m3)} + Σ_{j≠y, j<C} e^{s·cos θ_j}) )

    Use it inside ``jax.jit`` with W placed by :func:`class_sharding` (or
    :func:`shard_class_weights`); its gradient then stays sharded the same way.

    Args:
      embeddings: [B, D] float (computed in at least float32); normalized inside. Replicated,
        or sharded along B over ``axis_name`` with ``batch_sharded=True``.
      labels: [B] int class ids in ``[0, num_classes)`` (checked when concrete; NaN loss under
        ``jit``), placed like ``embeddings``.
      class_weights: [D, C_pad] float, columns sharded over ``axis_name``; C_pad divisible by
        the axis size N (else ``ValueError``). Each column is normalized inside.
      mesh: the ``jax.sharding.Mesh`` (other axes, if any, see everything replicated).
      axis_name: the mesh axis that shards the classes; default ``"model"``.
      num_classes: the real class count C <= C_pad; columns ≥ C are padding (excluded from the
        normaliser, zero gradient). Default None: C = C_pad.
      batch_sharded: False (default): batch replicated; True: batch sharded over
        ``axis_name`` and gathered inside (B divisible by N).
      m1, m2, m3, scale, boundary: as :func:`~mlx_jax.losses.margin_softmax.combined_margin_loss`
        (defaults m1 = 1, m2 = m3 = 0, s = 64, ``"monotonic"``: insightface).
      weights: optional [B] per-sample weights, placed like ``embeddings`` (zero excludes).
      reduction: see :mod:`mlx_jax.reductions`; default ``"mean"``. ``"none"`` returns the
        [B] weighted per-sample losses, replicated.
      sample_rate: r in (0, 1]; default 1 (exact). r < 1 is Partial FC's sampled softmax (An
        et al. 2021; insightface ``PartialFC_V2``): each device keeps the classes of
        the batch's labels in its shard plus random other classes, floor(r·C_pad/N) in all
        (which must be >= min(B, C_pad/N) so that every positive fits), and the normaliser
        runs over the sampled classes only. No longer equal to the unsharded loss, and only
        sampled columns of W get a gradient.
      key: a ``jax.random`` key for r < 1 (device k folds in k); ignored for r = 1.

    Returns:
      float32 (or wider) scalar, or [B] for ``reduction="none"``; replicated.
    """
    check_margins(m1, m2, m3, scale, boundary)
    reductions.check_reduction(reduction)
    x, y, w, sample_w, num_classes = _check_sharded_inputs(
        embeddings, labels, class_weights, weights, mesh, axis_name, num_classes, batch_sharded
    )
    num_sample = _num_sample(sample_rate, key, x.shape[0], w.shape[1] // mesh.shape[axis_name])
    batch_spec = P(axis_name) if batch_sharded else P()

    def per_device(x, y, w_local, sample_w, key):
        if batch_sharded:
            x, y, sample_w = (_gather_rows(a, axis_name) for a in (x, y, sample_w))
        if num_sample < w_local.shape[1]:
            w_local, columns = _sample_columns(y, w_local, key, axis_name, num_classes, num_sample)
        else:
            columns = _shard_columns(w_local, axis_name)
        margins = (m1, m2, m3, scale, boundary)
        terms = _margin_terms(x, y, w_local, columns, axis_name, num_classes, margins)
        return reductions.reduce_weighted(terms, sample_w.astype(terms.dtype), reduction)

    sharded = jax.shard_map(
        per_device,
        mesh=mesh,
        in_specs=(batch_spec, batch_spec, P(None, axis_name), batch_spec, P()),
        out_specs=P(),
    )
    return sharded(x, y, w, sample_w, jax.random.key(0) if key is None else key)


def _num_sample(sample_rate, key, batch: int, local_classes: int) -> int:
    """Classes kept per device: floor(r·C_local) (insightface), checked to fit the positives."""
    if not 0.0 < float(sample_rate) <= 1.0:
        raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
    num_sample = max(int(float(sample_rate) * local_classes), 1)
    if num_sample >= local_classes:
        return local_classes
    if key is None:
        raise ValueError("key must be a jax.random key when sample_rate < 1 (random negatives)")
    if num_sample < min(batch, local_classes):
        raise ValueError(
            f"sample_rate must keep at least min(batch, classes per device) = "
            f"{min(batch, local_classes)} classes per device so that every positive class "
            f"fits, got sample_rate={sample_rate}: {num_sample} of {local_classes}"
        )
    return num_sample


def partial_fc_arcface_loss(
    embeddings: jax.Array,
    labels: jax.Array,
    class_weights: jax.Array,
    *,
    mesh: Mesh,
    axis_name: str = "model",
    num_classes: int | None = None,
    batch_sharded: bool = False,
    scale: float = 64.0,
    margin: float = 0.5,
    boundary: Boundary = "monotonic",
    weights: jax.Array | None = None,
    reduction: reductions.Reduction = "mean",
    sample_rate: float = 1.0,
    key: jax.Array | None = None,
) -> jax.Array:
    """ArcFace (Deng et al. 2019, Eq. 3) with W sharded by class: :func:`partial_fc_loss` with
    (m1, m2, m3) = (1, margin, 0); equals :func:`~mlx_jax.losses.margin_softmax.arcface_loss`.

    Defaults as the paper and insightface: s = 64, margin = 0.5 rad, ``"monotonic"`` boundary.
    Other arguments (``sample_rate`` and ``key`` too) as :func:`partial_fc_loss`.
    """
    _checks.non_negative(margin, "margin")
    return partial_fc_loss(
        embeddings,
        labels,
        class_weights,
        mesh=mesh,
        axis_name=axis_name,
        num_classes=num_classes,
        batch_sharded=batch_sharded,
        m2=margin,
        scale=scale,
        boundary=boundary,
        weights=weights,
        reduction=reduction,
        sample_rate=sample_rate,
        key=key,
    )


def partial_fc_cosface_loss(
    embeddings: jax.Array,
    labels: jax.Array,
    class_weights: jax.Array,
    *,
    mesh: Mesh,
    axis_name: str = "model",
    num_classes: int | None = None,
    batch_sharded: bool = False,
    scale: float = 64.0,
    margin: float = 0.35,
    weights: jax.Array | None = None,
    reduction: reductions.Reduction = "mean",
    sample_rate: float = 1.0,
    key: jax.Array | None = None,
) -> jax.Array:
    """CosFace (Wang et al. 2018, Eq. 4) with W sharded by class: :func:`partial_fc_loss` with
    (m1, m2, m3) = (1, 0, margin); equals :func:`~mlx_jax.losses.margin_softmax.cosface_loss`.

    Defaults as the paper: s = 64, margin = 0.35. Other arguments (``sample_rate`` and ``key``
    too) as :func:`partial_fc_loss`.
    """
    _checks.non_negative(margin, "margin")
    return partial_fc_loss(
        embeddings,
        labels,
        class_weights,
        mesh=mesh,
        axis_name=axis_name,
        num_classes=num_classes,
        batch_sharded=batch_sharded,
        m3=margin,
        scale=scale,
        boundary="none",
        weights=weights,
        reduction=reduction,
        sample_rate=sample_rate,
        key=key,
    )


def partial_fc_predict(
    embeddings: jax.Array,
    class_weights: jax.Array,
    *,
    mesh: Mesh,
    axis_name: str = "model",
    num_classes: int | None = None,
) -> jax.Array:
    """argmax_j cos θ_ij over the sharded W [D, C_pad] (columns < ``num_classes``): [B] int32.

    Equals ``jnp.argmax(cosine_logits(embeddings, class_weights[:, :num_classes]), axis=1)``
    including its tie rule (lowest class id), without gathering the [B, C] cosines: each
    device reduces its shard to (max, argmax) and a ``pmax`` / ``pmin`` pair picks the winner.
    ``embeddings`` [B, D] replicated; other arguments as :func:`partial_fc_loss`.
    """
    x, w, num_classes, _ = _check_sharded_weights(
        embeddings, class_weights, mesh, axis_name, num_classes
    )

    def per_device(x, w_local):
        columns = _shard_columns(w_local, axis_name)
        cosines = cosine_logits(x, w_local)
        cosines = jnp.where((columns < num_classes)[None, :], cosines, -jnp.inf)
        local_best = jnp.max(cosines, axis=1)
        best = jax.lax.pmax(local_best, axis_name)
        local_index = columns[jnp.argmax(cosines, axis=1)]
        candidate = jnp.where(local_best == best, local_index, jnp.iinfo(jnp.int32).max)
        return jax.lax.pmin(candidate, axis_name)

    in_specs = (P(), P(None, axis_name))
    return jax.shard_map(per_device, mesh=mesh, in_specs=in_specs, out_specs=P())(x, w)
