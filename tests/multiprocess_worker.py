"""One process of tests/test_multiprocess.py's library check (not a test module itself).

    JAX_NUM_CPU_DEVICES=2 python -m tests.multiprocess_worker --port P --processes 2 --id I --out DIR

Joins a ``jax.distributed`` grid (gloo CPU collectives, :mod:`experiments.distributed`), builds
one global mesh over every process's devices, feeds this process's rows of a fixed problem
(:func:`problem`), and writes DIR/process-I.npz: each loss's value (replicated) and this
process's rows of its gradients (and its columns of the Partial FC class-weight gradient), with
the global indices they belong to.
"""

from __future__ import annotations

import argparse
import functools
import pathlib

import numpy as np

BATCH, DIM, CLASSES, PFC_CLASSES = 16, 8, 4, 40
ALPHA = 0.5


def problem() -> dict[str, np.ndarray]:
    """The fixed global problem every process (and the single-process reference) builds."""
    rng = np.random.default_rng(7)
    labels = np.arange(BATCH) % CLASSES
    weights = rng.uniform(0.5, 1.5, BATCH)
    weights[[3, 10]] = 0.0  # padding rows on both processes
    return {
        "embeddings": rng.normal(size=(BATCH, DIM)).astype(np.float32),
        "labels": labels.astype(np.int32),
        "weights": weights.astype(np.float32),
        "centers": rng.normal(size=(CLASSES, DIM)).astype(np.float32),
        "class_weights": rng.normal(size=(DIM, PFC_CLASSES)).astype(np.float32),
        "pfc_labels": rng.integers(0, PFC_CLASSES, BATCH).astype(np.int32),
    }


def pair_losses():
    """name -> loss(embeddings, labels, weights=...) of the gather form."""
    from mlx_jax import losses

    return {
        "contrastive": losses.contrastive_loss,
        "triplet": losses.triplet_loss,
        "circle": losses.circle_loss,
        "multi_similarity": losses.multi_similarity_loss,
        "supcon": losses.supcon_loss,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--processes", type=int, required=True)
    parser.add_argument("--id", type=int, required=True)
    parser.add_argument("--out", type=pathlib.Path, required=True)
    args = parser.parse_args()

    from experiments import distributed

    grid = distributed.ProcessGrid(f"127.0.0.1:{args.port}", args.processes, args.id)
    distributed.initialize(grid)

    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from mlx_jax import centers as centers_lib
    from mlx_jax import parallel
    from mlx_jax import partial_fc as pfc
    from mlx_jax.losses import center_loss

    data = problem()
    mesh = parallel.data_mesh()  # every device of every process
    axis = parallel.DATA_AXIS
    rows = NamedSharding(mesh, P(axis))

    def global_rows(array):  # this process supplies only its own devices' rows
        return jax.make_array_from_callback(array.shape, rows, lambda index: array[index])

    x, y, w = (global_rows(data[k]) for k in ("embeddings", "labels", "weights"))
    c = parallel.replicate(mesh, data["centers"])
    out: dict[str, np.ndarray] = {}

    def local_rows(array, name):
        for shard in array.addressable_shards:
            start = shard.index[0].start or 0
            index = np.arange(start, start + shard.data.shape[0])
            out[f"{name}/rows/{start}"] = np.stack([index.astype(np.float32)], 1)
            out[f"{name}/grad/{start}"] = np.asarray(shard.data)

    for name, loss_fn in pair_losses().items():
        global_loss = parallel.global_batch_loss(loss_fn, axis)

        def step(x, y, w, global_loss=global_loss):
            return jax.value_and_grad(lambda e: global_loss(e, y, weights=w))(x)

        fn = jax.jit(jax.shard_map(step, mesh=mesh, in_specs=P(axis), out_specs=(P(), P(axis))))
        value, grad = fn(x, y, w)
        out[f"{name}/value"] = np.asarray(value)
        local_rows(grad, name)

    # Per-sample center loss (no gather) and the α rule with statistics summed over processes.
    center = parallel.global_batch_loss(center_loss, axis, per_sample=True)

    def center_step(x, y, w, c):
        value, (gx, gc) = jax.value_and_grad(
            lambda e, cc: center(e, y, cc, weights=w), argnums=(0, 1)
        )(x, c)
        updated = centers_lib.update_centers(c, x, y, ALPHA, weights=w, axis_name=axis)
        return value, gx, gc, updated

    fn = jax.jit(
        jax.shard_map(
            center_step,
            mesh=mesh,
            in_specs=(P(axis), P(axis), P(axis), P()),
            out_specs=(P(), P(axis), P(), P()),
        )
    )
    value, gx, gc, updated = fn(x, y, w, c)
    out["center/value"] = np.asarray(value)
    local_rows(gx, "center")
    out["center/centers_grad"] = np.asarray(distributed.local_copy(gc))
    out["center/alpha_update"] = np.asarray(distributed.local_copy(updated))

    # Partial FC: classes sharded over every device of every process, the batch sharded too.
    class_mesh = parallel.data_mesh(axis_name="model")
    wc = pfc.shard_class_weights(jnp.asarray(data["class_weights"]), class_mesh, "model")
    xb = jax.make_array_from_callback(
        x.shape, NamedSharding(class_mesh, P("model")), lambda i: data["embeddings"][i]
    )
    yb = jax.make_array_from_callback(
        y.shape, NamedSharding(class_mesh, P("model")), lambda i: data["pfc_labels"][i]
    )
    loss = functools.partial(
        pfc.partial_fc_arcface_loss, mesh=class_mesh, axis_name="model", batch_sharded=True
    )
    fn = jax.jit(jax.value_and_grad(lambda e, cw, labels: loss(e, labels, cw), argnums=(0, 1)))
    value, (gx, gw) = fn(xb, wc, yb)
    out["partial_fc/value"] = np.asarray(distributed.local_copy(value))
    local_rows(gx, "partial_fc")
    for shard in gw.addressable_shards:
        start = shard.index[1].start or 0
        out[f"partial_fc/class_grad/{start}"] = np.asarray(shard.data)

    args.out.mkdir(parents=True, exist_ok=True)
    np.savez(args.out / f"process-{args.id}.npz", **out)
    print(f"process {args.id} wrote {len(out)} arrays", flush=True)


if __name__ == "__main__":
    main()
