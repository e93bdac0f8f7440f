"""Data-parallel training with global negatives: meshes, batch shardings and exact global losses.

A batch of B samples is split over the N devices of a 1-D mesh axis (``"data"``): each device
holds a shard [B/N, D] of the embeddings, labels and weights. Pair and triplet losses need the
other devices' samples as positives and negatives ("global negatives", as in CLIP/SimCLR-style
training or PML's ``CrossBatchMemory``-free data parallelism), so inside ``jax.shard_map``:

* :func:`global_batch_loss` turns any loss ``loss(embeddings, labels, *state, weights=...)``
  into its global-batch form: embeddings, labels and weights are all-gathered along the axis
  (``jax.lax.all_gather(..., tiled=True)``, device order = batch order), every device computes
  the loss of the whole global batch, and the results are averaged over devices
  (``jax.lax.pmean``). The value equals the single-device loss on the concatenated batch, and
  so does the gradient, *exactly* — by the transposes of the two collectives:

      L = (1/N)·Σ_k L_k,   L_k = loss(gather(x))  computed on device k (all equal)
      ∂L/∂x_j = Σ_k (1/N)·[∂loss/∂gather(x)]_{rows of shard j}      (psum_scatter of all_gather)
              = [∂loss/∂X]_{rows of shard j}

  i.e. pmean's transpose hands each device 1/N of the cotangent and all_gather's transpose
  (a reduce-scatter) sums the N copies back onto the device that owns the rows. Without the
  1/N (every device returning its own full loss) the gradients would be N times too large.
  Replicated state (class weights, centers) used by every device gets the ``psum`` of the
  per-device contributions from the same rule (the transpose of the implicit broadcast), so its
  gradient is exact too. Cost: every device evaluates the whole B×B loss — O(B²·D) per device
  instead of O(B²·D/N) — while the network's forward and backward (usually the bulk of a
  step) stay split N ways. Weight-0 rows (padding) are excluded everywhere, as in every loss.

* ``global_batch_loss(..., split_rows=True)`` is the row-split form of the same gathered
  loss, for the losses that take ``anchors=``: each device evaluates only the terms anchored
  by its own b = B/N rows (against all B gathered samples as positives and negatives), so its
  loss work is O(B²·D/N). It is exact because every reduction is a function of three sums over
  the terms (:mod:`mlx_jax.reductions`): with A_k the rows of device k (a partition of the
  batch) and S_k, W_k, Z_k the loss, weight and nonzero-weight sums of the terms anchored in
  A_k (``reduction="parts"``, ``anchors=AnchorRows(k·b, b)``),

      S = Σ_k S_k,  W = Σ_k W_k,  Z = Σ_k Z_k   (psum of the parts)
      L = S  ("sum"),  S / W  ("mean"),  S / Z  ("mean_nonzero")

  reduced once after the ``psum`` — averaging per-device *ratios* S_k / W_k would weight the
  devices wrongly. (With ``balance="pos_neg"`` the positive and negative kinds keep their own
  sums; the margin loss's shared-β term ν·β enters as ν·β·T / T over its triplet count T.)
  Gradients: S_k(X) is a function of the whole gathered batch X (its anchors' partners live on
  every device), and the parts of a partition add up *as functions of X*, Σ_k S_k(X) = S(X),
  so Σ_k ∂S_k/∂X = ∂S/∂X. The transposes deliver exactly that sum:

      ∂L/∂x_j = Σ_k [∂S_k/∂X · ∂L/∂S + ∂W_k/∂X · ∂L/∂W + …]_{rows of shard j}
              = [∂L/∂X]_{rows of shard j}

  — ``psum``'s transpose hands every device the (replicated) cotangent of the summed parts
  unchanged, each device pulls it back through its own S_k, W_k, Z_k, and all_gather's
  transpose sums the N contributions onto the owner of the rows (replicated state such as the
  margin loss's β: summed over devices, as above). No 1/N appears: each term is computed on
  exactly one device. (W and Z sum sample weights over masks: no gradient reaches the
  embeddings through them.) A loss without ``anchors=``, or one whose value is not such a ratio
  of sums (it rejects ``reduction="parts"``), raises ``ValueError`` naming it;
  ``reduction="none"`` is refused. Cost: the all_gather as before, then [b, B] row blocks
  instead of [B, B] on each device; two losses keep a B×B share: the lifted structure loss's
  first pass (every sample's negative log-sum-exp, which a pair needs for both its samples)
  and the Siamese loss's cosine matrix (computed whole, then sliced to the device's rows).

* ``global_batch_loss(..., per_sample=True)`` is the cheaper exact form for *per-sample*
  losses (center loss, softmax, the margin-softmax heads, triplet-center): no gather; each
  device reduces its own rows and the numerator and denominator of the reduction are summed
  over devices — Σ_i w_i·l_i / Σ_i w_i for ``"mean"``, Σ_i w_i·l_i / Σ_{i: l_i>0} w_i for
  ``"mean_nonzero"``, Σ_i w_i·l_i for ``"sum"``.

* The center α rule (Wen et al. 2016, Eq. 4) with global statistics is
  :func:`mlx_jax.centers.update_centers` with ``axis_name=``: per-class sums and counts are
  computed locally and ``psum``-ed before the update, which then equals the update on the
  concatenated batch on every device.

* :func:`data_parallel` wraps a step function in ``jax.shard_map``: batch arguments sharded
  along the axis, everything else (parameters, optimizer state, centers) replicated, outputs
  replicated. Inside, compute local embeddings, a global loss and ``jax.grad`` as usual: with
  shard_map's replication checking (``check_vma``, the default) the gradient with respect to a
  replicated parameter is already summed over devices, i.e. equal to the single-device
  gradient of the global loss; no extra ``pmean`` of gradients is needed (adding one would be
  harmless but redundant, the gradients are replicated).

Every helper takes ``axis_name=None`` to mean "one device, the whole batch here", so one step
function serves both cases (see ``experiments/driver.py``).

Meshes use ``AxisType.Auto`` (``jax.make_mesh`` defaults to ``Explicit`` axes, where a global
distance matrix of sharded embeddings outside shard_map raises ``ShardingTypeError``).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from mlx_jax import reductions

__all__ = [
    "DATA_AXIS",
    "AnchorRows",
    "batch_sharding",
    "check_batch_divisible",
    "data_mesh",
    "data_parallel",
    "device_rows",
    "gather_batch",
    "global_batch_loss",
    "loss_parts",
    "match_varying_axes",
    "mean_over_devices",
    "replicate",
    "replicated_sharding",
    "shard_batch",
    "sum_over_devices",
]

DATA_AXIS = "data"


# ----------------------------------------------------------------------------- meshes, shardings


def data_mesh(
    num_devices: int | None = None,
    axis_name: str = DATA_AXIS,
    *,
    devices: Sequence[jax.Device] | None = None,
) -> Mesh:
    """A 1-D mesh over the first ``num_devices`` of ``devices`` (default: all), axis type Auto.

    Args:
      num_devices: how many of ``devices`` to use, in [1, len(devices)].
      axis_name: the mesh axis name (default ``"data"``).
      devices: default ``jax.devices()``: every device of every process, in process order
        (one process: its local devices). Under ``jax.distributed`` with several processes a
        mesh must span every process's devices for a collective over all of them; pass
        ``jax.local_devices()`` for a mesh of this process alone (e.g. evaluation).

    Returns:
      ``jax.sharding.Mesh`` of shape {axis_name: num_devices}; batch row order = device order,
      so process p's devices hold a contiguous block of the global batch.
    """
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices) if num_devices is None else num_devices
    if isinstance(n, bool) or not isinstance(n, int | np.integer) or not 1 <= n <= len(devices):
        raise ValueError(
            f"num_devices must be an int in [1, {len(devices)}] (the device count), got {n!r}"
        )
    return jax.make_mesh((int(n),), (axis_name,), axis_types=(AxisType.Auto,), devices=devices[:n])


def batch_sharding(mesh: Mesh, axis_name: str = DATA_AXIS) -> NamedSharding:
    """Sharding of a batch array: leading dimension split over ``axis_name``, the rest whole."""
    _check_axis(mesh, axis_name)
    return NamedSharding(mesh, PartitionSpec(axis_name))


def replicated_sharding(mesh: Mesh) -> NamedSharding:
    """Sharding of replicated state (parameters, optimizer state, centers, data tables)."""
    return NamedSharding(mesh, PartitionSpec())


def check_batch_divisible(batch_size: int, num_devices: int, name: str = "batch_size") -> None:
    """Raises ``ValueError`` naming ``name`` unless ``batch_size`` is a multiple of
    ``num_devices`` (each device must hold an equal shard)."""
    if batch_size % num_devices:
        raise ValueError(
            f"{name} must be divisible by the number of devices ({num_devices}) so that every "
            f"device holds an equal shard, got {batch_size} (pad with weight-0 rows, or change "
            "the batch size or the device count)"
        )


def shard_batch(mesh: Mesh, batch: Any, axis_name: str = DATA_AXIS) -> Any:
    """``jax.device_put`` of a pytree of [B, ...] arrays with B split over ``axis_name``."""
    size = _axis_size(mesh, axis_name)
    for path, leaf in jax.tree_util.tree_leaves_with_path(batch):
        _check_leading(leaf, size, "batch" + jax.tree_util.keystr(path))
    return jax.device_put(batch, batch_sharding(mesh, axis_name))


def replicate(mesh: Mesh, tree: Any) -> Any:
    """``jax.device_put`` of a pytree onto every device of ``mesh`` (replicated)."""
    return jax.device_put(tree, replicated_sharding(mesh))


# ----------------------------------------------------------------------------- anchor rows


class AnchorRows(NamedTuple):
    """The anchor rows [start, start + size) of a batch, as a loss's ``anchors=`` argument.

    Like a boolean ``anchors`` mask that is True on those rows only — the other samples anchor
    no term but are every anchor's positives and negatives — with one difference: the losses
    built on ``mlx_jax.losses._common.map_anchor_rows`` evaluate only these ``size`` rows,
    [size, B] instead of [B, B], so their work falls by B / size. The row-split global loss
    (:func:`mlx_jax.parallel.global_batch_loss` with ``split_rows=True``) gives each of N
    devices its own B/N rows of the gathered batch this way.

    Fields:
      start: int scalar, the first anchor row; may be traced (e.g. from
        ``jax.lax.axis_index``). A concrete value is checked to lie in [0, B − size]; a traced
        one is clamped into it (``jax.lax.dynamic_slice``).
      size: static Python int in [1, B], the number of anchor rows (it sets shapes).

    With ``reduction="none"`` a loss returns the terms of these ``size`` rows only ([size] or
    [size, B]); the scalar reductions and ``"parts"`` are those of the boolean mask. Checked
    and applied by :func:`mlx_jax.losses._common.prepare_batch` and ``map_anchor_rows``.
    """

    start: Any
    size: int


# ----------------------------------------------------------------------------- collectives


def gather_batch(tree: Any, axis_name: str | None) -> Any:
    """Concatenates every device's shard [b, ...] into the global batch [N·b, ...], in device
    order (``jax.lax.all_gather(..., tiled=True)``; its transpose is a reduce-scatter, so
    gradients return to the device that owns the rows). Identity for ``axis_name=None``."""
    if axis_name is None:
        return tree
    return jax.lax.all_gather(tree, axis_name, tiled=True)


def mean_over_devices(tree: Any, axis_name: str | None) -> Any:
    """``jax.lax.pmean`` over ``axis_name`` (identity for ``None``): turns N equal per-device
    copies of a global quantity into one replicated value with exact gradients (see the module
    docstring)."""
    return tree if axis_name is None else jax.lax.pmean(tree, axis_name)


def sum_over_devices(tree: Any, axis_name: str | None) -> Any:
    """``jax.lax.psum`` over ``axis_name`` (identity for ``None``), e.g. per-device counts."""
    return tree if axis_name is None else jax.lax.psum(tree, axis_name)


def match_varying_axes(*arrays: jax.Array) -> tuple[jax.Array, ...]:
    """Casts every array to vary over each ``shard_map`` axis that any of them varies over.

    For ``jax.custom_vjp`` functions called inside ``shard_map`` (the margin heads' fused
    cross-entropy, :mod:`mlx_jax.losses.class_blocks`): a custom backward pass must return each
    cotangent with its input's varying axes, and an input that is the same on every device (a
    fixed scale, replicated class weights) combined with sharded rows would get a varying
    cotangent, which shard_map rejects. Casting first (``lax.pcast(..., to="varying")``) is what
    JAX's own autodiff inserts: its transpose sums the cotangent over the axis — the exact
    gradient of a replicated input. Outside shard_map (no varying axes) the arrays come back
    unchanged.
    """
    varying = [_varying_axes(a) for a in arrays]
    axes = frozenset().union(*varying)
    return tuple(
        jax.lax.pcast(a, tuple(sorted(axes - own)), to="varying") if axes - own else a
        for a, own in zip(arrays, varying, strict=True)
    )


def _varying_axes(array: jax.Array) -> frozenset[str]:
    """The shard_map axes ``array`` varies over (empty outside shard_map)."""
    return frozenset(jax.typeof(array).manual_axis_type.varying)


# ----------------------------------------------------------------------------- global losses


def global_batch_loss(
    loss_fn: Callable[..., jax.Array],
    axis_name: str | None = DATA_AXIS,
    *,
    per_sample: bool = False,
    split_rows: bool = False,
) -> Callable[..., jax.Array]:
    """The global-batch form of ``loss_fn(embeddings, labels, *state, weights=..., **hyper)``,
    for use inside ``jax.shard_map`` over the batch axis ``axis_name``.

    The returned function takes the local shards — embeddings [b, D], labels [b], optional
    ``weights`` [b] — plus the loss's replicated state (centers [C, D], class weights [D, C],
    the margin loss's β) and keyword hyperparameters, and returns the loss of the *global*
    batch [N·b] (replicated on every device); gradients with respect to the local embeddings
    and the state equal the single-device gradients on the concatenated batch (see the module
    docstring for why).

    Args:
      loss_fn: an mlx_jax loss (or any function with that signature).
      axis_name: the mesh axis the batch is sharded over; ``None`` returns the loss as is
        (single device).
      per_sample: ``False`` (default): gather the global batch and evaluate the full loss —
        needed by every loss that compares samples (contrastive, triplet, circle, Siamese,
        standalone center). ``True``: no gather; for losses whose terms are per sample and
        whose ``"mean"`` divides by Σ_i w_i (center_loss, softmax_loss, arcface/cosface/
        sphereface/combined_margin_loss, triplet_center_loss): the local ``reduction="none"``
        terms are summed over devices, as are the reduction's denominators. Using it for a
        pairwise loss silently drops the cross-device pairs, so it must be asked for.
      split_rows: ``False`` (default): with ``per_sample=False``, every device evaluates the
        whole B×B loss of the gathered batch. ``True``: the row-split form for the losses that
        take ``anchors=`` (contrastive, Siamese, triplet, circle, multi-similarity, NT-Xent,
        SupCon, the two lifted structure losses, margin, tuplet margin, FastAP): the batch is
        gathered, but device k evaluates only the terms anchored by its own rows — the k-th
        block of b rows of the global batch, ``anchors=AnchorRows(k·b, b)``, against all N·b
        samples as positives and negatives — with ``reduction="parts"``; the parts (the
        reduction's sums, :class:`mlx_jax.reductions.ReductionParts`) are ``psum``-ed over
        the devices and reduced once. The value and gradients are those of the gather form
        (module docstring), and each device's loss work is [b, N·b] instead of [N·b, N·b].
        Reductions ``"mean"``, ``"sum"``, ``"mean_nonzero"``; ``"none"`` raises
        ``ValueError`` (use the gather form for the global per-term array), as does a loss
        that cannot return parts (one without ``anchors=``, or whose value is not a ratio of
        sums over anchor rows), naming the loss. ``anchors=`` is set here, so the caller may
        not pass it. Cannot be combined with ``per_sample``.

    Returns:
      ``f(embeddings, labels, *state, weights=None, **hyper) -> scalar``. With
      ``reduction="none"`` the gather form returns the global per-term array (replicated) and
      the per-sample form the local [b] terms (varying: use ``out_specs=P(axis_name)``).
    """
    if per_sample and split_rows:
        raise ValueError(
            "per_sample=True and split_rows=True exclude each other: per-sample losses need no "
            "gather at all, and split_rows is the gathered form of the anchors= losses"
        )
    if split_rows:
        _check_takes_anchors(loss_fn)
    if axis_name is None:
        return loss_fn

    if split_rows:

        def split(embeddings, labels, *state, weights=None, reduction="mean", **hyper):
            reductions.check_reduction(
                reduction,
                reductions.SCALAR_REDUCTIONS,
                why="the row-split form adds every device's sums and reduces once; use "
                "split_rows=False for the global per-term array of reduction='none'",
            )
            if "anchors" in hyper:
                raise ValueError(
                    "global_batch_loss(split_rows=True) sets anchors= itself (each device's "
                    "own rows); do not pass it"
                )
            x, y = gather_batch((embeddings, labels), axis_name)
            if weights is not None:
                hyper["weights"] = gather_batch(weights, axis_name)
            rows = device_rows(np.shape(embeddings)[0], axis_name)
            parts = loss_parts(loss_fn, x, y, *state, anchors=rows, **hyper)
            return reductions.finish_reduction(sum_over_devices(parts, axis_name), reduction)

        return split

    if not per_sample:

        def gathered(embeddings, labels, *state, weights=None, **hyper):
            x, y = gather_batch((embeddings, labels), axis_name)
            if weights is not None:
                hyper["weights"] = gather_batch(weights, axis_name)
            return mean_over_devices(loss_fn(x, y, *state, **hyper), axis_name)

        return gathered

    def summed(embeddings, labels, *state, weights=None, reduction="mean", **hyper):
        reductions.check_reduction(reduction)
        terms = loss_fn(embeddings, labels, *state, weights=weights, reduction="none", **hyper)
        if reduction == "none":
            return terms
        w = jnp.ones(terms.shape, terms.dtype) if weights is None else jnp.asarray(weights)
        w = w.astype(terms.dtype)
        if reduction == "mean_nonzero":
            w = jnp.where(terms > 0, w, 0.0)
        total, denominator = sum_over_devices((jnp.sum(terms), jnp.sum(w)), axis_name)
        if reduction == "sum":
            return total
        return reductions.safe_divide(total, denominator)

    return summed


def device_rows(rows_per_device: int, axis_name: str) -> AnchorRows:
    """This device's rows of the gathered batch, ``AnchorRows(k·b, b)`` on device k of
    ``axis_name`` (b = ``rows_per_device``; :func:`gather_batch` concatenates in device
    order). Call inside ``shard_map``."""
    start = jax.lax.axis_index(axis_name).astype(jnp.int32) * rows_per_device
    return AnchorRows(start, int(rows_per_device))


def loss_parts(loss_fn: Callable[..., Any], *args, anchors: Any, **hyper) -> Any:
    """``loss_fn(*args, anchors=anchors, reduction="parts", **hyper)``: the loss's
    :class:`~mlx_jax.reductions.ReductionParts` over the terms that ``anchors`` (a [B] mask or
    an :class:`AnchorRows` range) anchors. Parts of disjoint anchor sets add up to the parts
    of their union, and :func:`mlx_jax.reductions.finish_reduction` turns them into the loss.

    Raises ``ValueError`` naming the loss when it takes no ``anchors=`` or cannot return parts
    (its value is not a reduction of sums over anchor rows)."""
    _check_takes_anchors(loss_fn)
    if hyper.get("reduction", reductions.PARTS) != reductions.PARTS:
        raise ValueError("loss_parts sets reduction='parts' itself; do not pass reduction=")
    hyper["reduction"] = reductions.PARTS
    try:
        return loss_fn(*args, anchors=anchors, **hyper)
    except TypeError as error:
        if "unexpected keyword argument 'anchors'" not in str(error):
            raise
        raise ValueError(  # a **kwargs wrapper passed anchors= to a loss without it
            f"{_name(loss_fn)} cannot be split by anchor rows: it takes no anchors= argument "
            f"({error}), so a device cannot evaluate only its own rows' terms; use "
            "global_batch_loss with split_rows=False"
        ) from error
    except reductions.UnsupportedReduction as error:
        if error.reduction != reductions.PARTS:
            raise
        raise ValueError(
            f"{_name(loss_fn)} cannot be split by anchor rows: it does not return reduction "
            "parts (reduction='parts'), i.e. its value is not a ratio of sums over the terms "
            "each anchor row adds; use global_batch_loss with split_rows=False (every device "
            "evaluates the whole gathered batch)"
        ) from error


def _check_takes_anchors(loss_fn: Callable[..., Any]) -> None:
    """``ValueError`` naming ``loss_fn`` unless it has an ``anchors=`` parameter (or takes
    ``**kwargs``, which :func:`loss_parts` passes on and checks by calling)."""
    try:
        params = inspect.signature(loss_fn).parameters
    except (TypeError, ValueError):
        return  # no signature to read: the call decides
    if "anchors" in params or any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return
    raise ValueError(
        f"{_name(loss_fn)} cannot be split by anchor rows: it takes no anchors= argument, so a "
        "device cannot evaluate only its own rows' terms; use global_batch_loss with "
        "split_rows=False (or per_sample=True for a per-sample loss)"
    )


def _name(fn: Callable[..., Any]) -> str:
    inner = getattr(fn, "func", fn)  # functools.partial
    return getattr(inner, "__qualname__", None) or getattr(inner, "__name__", None) or repr(fn)


# ----------------------------------------------------------------------------- the step wrapper


def data_parallel(
    fn: Callable[..., Any],
    mesh: Mesh,
    *,
    batch_argnums: int | Sequence[int],
    axis_name: str = DATA_AXIS,
    out_specs: Any = None,
) -> Callable[..., Any]:
    """``jax.shard_map`` of a step function over a data-parallel mesh.

    The arguments at ``batch_argnums`` (pytrees of [B, ...] arrays: images, labels, weights)
    are split along their leading dimension over ``axis_name``; every other argument (train
    state, hyperparameter arrays) is replicated; outputs are replicated by default
    (``out_specs``). ``fn`` sees the local shards and must make its outputs replicated — use
    :func:`global_batch_loss`, ``update_centers(..., axis_name=)``, :func:`sum_over_devices`;
    gradients of replicated parameters are summed over devices by shard_map itself. Call the
    result under ``jax.jit`` (and pass ``axis_name`` to those helpers inside ``fn``).

    Args:
      fn: ``fn(*args) -> outputs``, written for one shard.
      mesh: e.g. :func:`data_mesh`.
      batch_argnums: positions of the batch arguments.
      axis_name: the batch axis of ``mesh``.
      out_specs: shard_map ``out_specs``; ``None`` (default): ``PartitionSpec()``, every
        output replicated.

    Returns:
      the wrapped function. It raises ``ValueError`` naming the argument when a batch
      argument's leading dimension is not divisible by the number of devices on the axis.
    """
    argnums = (batch_argnums,) if isinstance(batch_argnums, int) else tuple(batch_argnums)
    size = _axis_size(mesh, axis_name)
    names = _parameter_names(fn)

    def wrapped(*args):
        for i in argnums:
            if not 0 <= i < len(args):
                raise ValueError(
                    f"batch_argnums must index the {len(args)} positional arguments, got {i}"
                )
            name = names[i] if i < len(names) else f"argument {i}"
            for path, leaf in jax.tree_util.tree_leaves_with_path(args[i]):
                _check_leading(leaf, size, name + jax.tree_util.keystr(path))
        in_specs = tuple(
            PartitionSpec(axis_name) if i in argnums else PartitionSpec() for i in range(len(args))
        )
        specs = PartitionSpec() if out_specs is None else out_specs
        return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=specs)(*args)

    return wrapped


# ----------------------------------------------------------------------------- helpers


def _check_axis(mesh: Mesh, axis_name: str) -> None:
    if axis_name not in mesh.axis_names:
        raise ValueError(f"axis_name must be an axis of mesh {mesh.axis_names}, got {axis_name!r}")


def _axis_size(mesh: Mesh, axis_name: str) -> int:
    _check_axis(mesh, axis_name)
    return int(mesh.shape[axis_name])


def _check_leading(leaf, num_devices: int, name: str) -> None:
    shape = np.shape(leaf)
    if not shape:
        raise ValueError(f"{name} must have a leading batch dimension [batch, ...], got a scalar")
    check_batch_divisible(shape[0], num_devices, f"{name} (leading dimension)")


def _parameter_names(fn) -> list[str]:
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return []
    return [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
