"""Training and evaluation of one experiment: ``train_and_evaluate(config, workdir) -> summary``.

The run is split into readable units, in the order an epoch uses them:

- :func:`prepare` loads the data, builds the model, optimizer, jitted step and evaluation
  function, and opens the checkpoints (:class:`Experiment`);
- :func:`restore_or_start` resumes from the newest checkpoint, or starts afresh;
- :func:`train_epoch` runs one epoch of jitted steps;
- :func:`evaluate_epoch` embeds the evaluation images and computes the metrics (a fixed subset
  after every epoch but the last, everything after the last);
- :func:`record_epoch` appends the epoch's metrics line, saves its plot points and then its
  checkpoint;
- :func:`finish` draws features.png and features.gif and writes summary.json / summary.md.

The train state is one explicit pytree (:class:`TrainState`): the NNX state of the model and
its optimizer (parameters, PReLU slopes, BatchNorm statistics, class weights, centers,
optimizer state and step), the global step and a health record for divergence. One jitted
step does forward, loss, gradient, optimizer update and the centers' α update; it gathers its
batch from device-resident data by an index table uploaded once per epoch.

A non-finite loss or gradient, or a loss beyond ``config.max_loss``, freezes the state at the
last good step (no NaN is ever written into the weights) and raises :class:`TrainingDiverged`
naming the step, the bad loss, the last good loss terms and the last good checkpoint. Every
error is an exception (:class:`RunError`, :class:`~experiments.config.ConfigError`,
:class:`mlx_jax.data.DatasetUnavailableError`); :mod:`experiments.cli` maps them to messages.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
import time
from collections.abc import Callable, Sequence
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec
from tqdm import tqdm

from experiments import distributed, onednn_conv, tuning
from experiments import open_set as open_set_lib
from experiments.augment import augment
from experiments.config import Config, ConfigError, stored_differences
from experiments.models import CONVS, EmbeddingModel, LeNetPlusPlus, SmallResNet
from experiments.objectives import Objective
from mlx_jax import data as data_lib
from mlx_jax import metrics, parallel, viz


class RunError(RuntimeError):
    """The run cannot go on: the message says why and what to do."""


class ResumeError(RunError):
    """``--resume`` found no checkpoint, another configuration, or an unreadable train state."""


class TrainingDiverged(RunError):
    """The loss or its gradient became non-finite, or exceeded ``max_loss``."""


# ----------------------------------------------------------------------------- devices


def default_devices(batch_size: int, available: int) -> int:
    """The most devices that split both ``batch_size`` and the ``available`` local devices
    evenly (all of them when they divide the batch). Meshes over an odd subset of the devices
    are avoided: 7 of 8 virtual CPU devices deadlocked XLA's all-gather rendezvous."""
    return max(n for n in range(1, available + 1) if batch_size % n == 0 and available % n == 0)


def num_devices(config: Config) -> int:
    """Data-parallel device count: ``config.devices`` (checked), else :func:`default_devices`;
    in a multi-process run every device of every process (:mod:`experiments.distributed`)."""
    if jax.process_count() > 1:
        total = jax.device_count()
        if config.devices not in (None, total):
            raise ConfigError(
                f"--devices must be unset or {total} in a run of {jax.process_count()} "
                f"processes (it uses every device of every process), got {config.devices}"
            )
        parallel.check_batch_divisible(config.batch_size, total, "--batch-size")
        return total
    available = jax.local_device_count()
    if config.devices is None:
        return default_devices(config.batch_size, available)
    if not 1 <= config.devices <= available:
        raise ConfigError(
            f"--devices must be in [1, {available}] (local devices), got {config.devices}"
        )
    return config.devices


def _batch_axis(config: Config) -> str | None:
    """The mesh axis the batch is split over, or None on one device."""
    return parallel.DATA_AXIS if num_devices(config) > 1 else None


def place_on_devices(config: Config, tree):
    """Host arrays to the device, replicated over the data-parallel mesh when there is one
    (every process passes the same values)."""
    devices = num_devices(config)
    if devices == 1:
        return jax.tree.map(jnp.asarray, tree)
    return parallel.replicate(parallel.data_mesh(devices), tree)


def epoch_batches(config: Config, source: np.ndarray, order: np.ndarray) -> jax.Array:
    """``source[order]``: an epoch's batches [steps, batch, ...] of host rows ``source``.

    With a data-parallel mesh the batch axis is split over it (``PartitionSpec(None, "data")``)
    and each process gathers and sends only its own devices' rows
    (``jax.make_array_from_callback``), so no device holds the whole training set."""
    devices = num_devices(config)
    if devices == 1:
        return jnp.asarray(source[order])
    mesh = parallel.data_mesh(devices)
    sharding = NamedSharding(mesh, PartitionSpec(None, parallel.DATA_AXIS))
    shape = (*order.shape, *source.shape[1:])
    return jax.make_array_from_callback(shape, sharding, lambda index: source[order[index[:2]]])


# ----------------------------------------------------------------------------- model and state


def resolve_conv(conv: str, process_tuning: bool = True) -> str:
    """``--conv``: "auto" becomes "onednn" where oneDNN's convolutions can run
    (:mod:`experiments.onednn_conv`) and process tuning is on (:mod:`experiments.tuning`),
    else "xla"; "onednn" where they cannot run is a :class:`ConfigError` with the reason."""
    if conv not in ("auto", *CONVS):
        raise ConfigError(f"--conv must be one of {['auto', *CONVS]}, got {conv!r}")
    if conv == "xla" or (conv == "auto" and not tuning.enabled(process_tuning)):
        return "xla"
    reason = onednn_conv.unavailable_reason()
    if reason is None:
        return "onednn"
    if conv == "onednn":
        raise ConfigError(f"--conv onednn cannot run here: {reason}")
    return "xla"


def build_model(
    config: Config,
    image_shape: tuple[int, ...],
    num_classes: int,
    conv_threads: int | None = None,
) -> EmbeddingModel:
    """The experiment's model; oneDNN convolutions run on ``conv_threads`` OpenMP threads
    (default: this process's cores shared among the data-parallel devices)."""
    rngs = nnx.Rngs(config.seed)
    channels = image_shape[-1]
    if config.dataset == "cifar10":
        backbone = SmallResNet(channels, config.feat_dim, axis_name=_batch_axis(config), rngs=rngs)
    else:
        backbone = LeNetPlusPlus(
            channels,
            config.feat_dim,
            width=config.width,
            init=config.init,
            conv=resolve_conv(config.conv, config.process_tuning),
            conv_threads=conv_threads or onednn_conv.threads_per_device(num_devices(config)),
            rngs=rngs,
        )
    objective = config.objective
    return EmbeddingModel(
        backbone,
        config.feat_dim,
        num_classes,
        classifier=objective.classifier,
        class_weights=objective.class_weights,
        centers=objective.centers,
        trainable_centers=config.center_update == "sgd",
        rngs=rngs,
        class_weights_per_class=objective.class_weights_per_class,
        loss_params=objective.loss_params(num_classes) if objective.loss_params else None,
    )


def _is_center_path(path) -> bool:
    return any(getattr(k, "key", None) == "centers" for k in path)


def build_optimizer(config: Config, steps_per_epoch: int) -> optax.GradientTransformation:
    """SGD with Nesterov momentum, weight decay, warm-up + cosine decay, global-norm clipping.

    Trainable centers (``--center-update sgd``) get their own plain SGD (pytorch-center-loss:
    lr 0.5, gradients scaled by 1/weight_cent so λ does not change how fast centers move).
    """
    total = max(config.epochs * steps_per_epoch, 1)
    warmup = min(int(config.warmup_epochs * steps_per_epoch), total - 1)
    schedule = optax.warmup_cosine_decay_schedule(0.0, config.lr, max(warmup, 0), total)
    net = optax.chain(
        optax.clip_by_global_norm(config.clip_norm),
        optax.add_decayed_weights(config.weight_decay),
        optax.sgd(schedule, momentum=config.momentum, nesterov=True),
    )
    if not (config.objective.centers and config.center_update == "sgd"):
        return net
    weight_cent = config.loss_config.weight_cent
    center_scale = 1.0 / weight_cent if config.loss == "cent" and weight_cent > 0 else 1.0
    centers = optax.chain(optax.scale(center_scale), optax.sgd(config.center_lr))

    def labels(params):
        return jax.tree_util.tree_map_with_path(
            lambda path, _: "centers" if _is_center_path(path) else "net", params
        )

    return optax.partition({"net": net, "centers": centers}, labels)


@flax.struct.dataclass
class Health:
    """Divergence record, carried in the train state (all device scalars)."""

    diverged: jax.Array  # bool: a non-finite or exploding (|loss| > max_loss) step was seen
    bad_step: jax.Array  # int32: the first such step
    bad_loss: jax.Array  # float32: its loss (NaN, ±inf or beyond max_loss)
    last_good_step: jax.Array  # int32: the last step applied
    last_terms: dict[str, jax.Array]  # the loss terms at last_good_step


@flax.struct.dataclass
class TrainState:
    graph: Any  # nnx.State of (model, optimizer)
    step: jax.Array
    health: Health


def term_names(objective: Objective) -> list[str]:
    """Names of the objective's loss terms, as logged and kept in :class:`Health`."""
    names = {
        "xent": ["softmax"],
        "cent": ["softmax", "center"],
        "standalone": ["intra", "inter"],
    }
    return names.get(objective.name, [objective.name])


def initial_state(graph, objective: Objective) -> TrainState:
    zero = jnp.zeros((), jnp.int32)
    health = Health(
        diverged=jnp.zeros((), bool),
        bad_step=zero - 1,
        bad_loss=jnp.zeros((), jnp.float32),
        last_good_step=zero - 1,
        last_terms={n: jnp.zeros((), jnp.float32) for n in term_names(objective)},
    )
    return TrainState(graph=graph, step=zero, health=health)


def make_train_step(config: Config, graphdef):
    """The jitted step ``(state, images, labels, index) -> (state, stats)`` on batch ``index``
    of an epoch's batches ``images`` [steps, batch, ...] and ``labels`` [steps, batch]
    (:func:`epoch_batches`).

    ``stats`` is a [5] float32 vector, zero where the step was skipped (diverged): the loss,
    the batch's correct predictions (NaN without a scorer), whether the step was applied, the
    global gradient norm before clipping, and whether clipping scaled it down.

    With more than one device the step body runs under ``jax.shard_map`` over a 1-D
    ``"data"`` mesh (:mod:`mlx_jax.parallel`): each device embeds its batch_size/N images,
    the loss terms see the all-gathered global batch (``pmean`` keeps the gradients exact),
    gradients of the replicated parameters are summed over the devices, and the centers'
    α rule sums its per-class statistics over them — so the step equals the single-device step
    on the same batch. On one device the helpers are identities.
    """
    objective = config.objective
    alpha_centers = objective.centers and config.center_update == "alpha"
    axis = _batch_axis(config)

    def step_on_shard(state: TrainState, x, y, *views):
        model, optimizer = nnx.merge(graphdef, state.graph)

        def loss_fn(model):
            paired = {}
            if views:
                # Both views in one forward pass (as SimCLR batches them): one convolution per
                # layer rather than two that XLA could run at once, which hangs oneDNN's.
                both = model(jnp.concatenate([x, views[0]]))
                features, second = both[: x.shape[0]], both[x.shape[0] :]
                # Two-view losses see the second view's embeddings, gathered the same way.
                paired["paired"] = parallel.gather_batch(second, axis)
            else:
                features = model(x)
            batch_features, batch_labels = parallel.gather_batch((features, y), axis)
            terms = objective.terms(
                model, batch_features, batch_labels, state.step, config.loss_config, **paired
            )
            terms = parallel.mean_over_devices(terms, axis)
            return sum(terms.values()), (features, terms)

        (loss, (features, terms)), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
        optimizer.update(model, grads)
        if alpha_centers:
            model.centers.update(features, y, config.loss_config.alpha, axis_name=axis)
        new_graph = nnx.state((model, optimizer))
        grad_norm = optax.tree.norm(grads)  # before clipping: how hard --clip-norm bites
        # A finite blow-up is as lost as a NaN: stop on either.
        healthy = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & (jnp.abs(loss) <= config.max_loss)
        ok = healthy & ~state.health.diverged
        graph = jax.tree.map(lambda new, old: jnp.where(ok, new, old), new_graph, state.graph)
        h = state.health
        health = Health(
            diverged=h.diverged | ~healthy,
            bad_step=jnp.where(~healthy & ~h.diverged, state.step, h.bad_step),
            bad_loss=jnp.where(~healthy & ~h.diverged, loss.astype(jnp.float32), h.bad_loss),
            last_good_step=jnp.where(ok, state.step, h.last_good_step),
            last_terms={k: jnp.where(ok, terms[k], h.last_terms[k]) for k in h.last_terms},
        )
        correct = parallel.sum_over_devices(_batch_correct(objective, model, features, y), axis)
        stats = jnp.stack(
            [
                jnp.where(ok, loss, 0.0),
                correct,
                ok.astype(jnp.float32),
                jnp.where(ok, grad_norm, 0.0),
                (ok & (grad_norm > config.clip_norm)).astype(jnp.float32),
            ]
        )
        return TrainState(graph=graph, step=state.step + ok, health=health), stats

    if axis is not None:
        mesh = parallel.data_mesh(num_devices(config))
        batch_argnums = (1, 2, 3) if objective.two_views else (1, 2)
        step_on_shard = parallel.data_parallel(step_on_shard, mesh, batch_argnums=batch_argnums)

    def train_step(state: TrainState, images, labels, index):
        batch_images, batch_labels = images[index], labels[index]
        key = jax.random.fold_in(jax.random.key(config.seed), state.step)
        if not objective.two_views:
            batch = augment(batch_images, key, config.augment, config.max_shift)
            return step_on_shard(state, batch, batch_labels)
        # Two independently augmented views of the same images (shifts at least: two
        # identical views would make the invariance terms trivial).
        kind = config.augment if config.augment != "none" else "shift"
        first, second = jax.random.split(key)
        views = [augment(batch_images, k, kind, config.max_shift) for k in (first, second)]
        return step_on_shard(state, views[0], batch_labels, views[1])

    return jax.jit(train_step, donate_argnums=0)


def _batch_correct(objective: Objective, model, features, labels) -> jax.Array:
    """Correct predictions in the batch by the objective's scorer (NaN when it has none)."""
    if objective.accuracy == "argmax":
        scores = model.classifier(features)
    elif objective.accuracy == "cosine":
        scores = model.class_weights(features)
    elif objective.accuracy == "linear":
        scores = model.class_weights.logits(features)
    elif objective.accuracy == "centers":
        c = model.centers()
        scores = -jnp.sum((features[:, None, :] - c[None]) ** 2, axis=-1)
    else:
        return jnp.asarray(jnp.nan)
    return jnp.sum(jnp.argmax(scores, axis=1) == labels).astype(jnp.float32)


# ----------------------------------------------------------------------------- evaluation

Embed = Callable[[Any, np.ndarray, str], np.ndarray]


def make_embed(
    graphdef,
    config: Config,
    devices: int,
    chunk: int = 1000,
    check_stop: Callable[[], None] = lambda: None,
) -> Embed:
    """``embed(graph, images, description) -> features``: the model of ``graphdef`` (eval
    mode) over chunks of images (one compiled shape: the last chunk is padded), split over
    ``devices`` data-parallel devices of this process, or on its first device when
    ``devices`` is 1 (the graph is copied there: in a multi-process run every process embeds
    on its own devices, no collective); a progress bar named ``description`` on a terminal;
    ``check_stop`` runs between chunks."""
    chunk = -(-chunk // devices) * devices
    local = jax.local_devices()
    mesh = parallel.data_mesh(devices, devices=local) if devices > 1 else None
    sharding = parallel.batch_sharding(mesh) if mesh is not None else None

    @jax.jit
    def embed_chunk(graph, images):
        model, _ = nnx.merge(graphdef, graph)
        return model(images)

    def embed(graph, images: np.ndarray, description: str) -> np.ndarray:
        placement = local[0] if mesh is None else parallel.replicated_sharding(mesh)
        graph = jax.device_put(distributed.local_copy(graph), placement)
        out = []
        starts = range(0, len(images), chunk)
        for start in _progress(starts, description, config.quiet):
            check_stop()
            part = images[start : start + chunk]
            pad = chunk - len(part)
            if pad:
                part = np.concatenate([part, np.zeros((pad, *part.shape[1:]), part.dtype)])
            part = jax.device_put(part, sharding) if sharding is not None else part
            out.append(np.asarray(embed_chunk(graph, part))[: chunk - pad])
        return np.concatenate(out)

    return embed


def _progress(iterable, description: str, quiet: bool):
    """A tqdm bar on a terminal (none when quiet or when stderr is not a terminal)."""
    return tqdm(
        iterable,
        desc=description,
        disable=quiet or None,  # None: no bar when stderr is not a terminal
        leave=False,
        dynamic_ncols=True,
    )


def closed_set_metrics(
    config: Config, model: EmbeddingModel, train_f, train_y, test_f, test_y, num_classes: int
) -> dict[str, float]:
    """The closed-set metrics of one evaluation; ``accuracy`` is the objective's own scorer."""
    objective = config.objective
    result: dict[str, float] = {}
    if objective.classifier:
        result["argmax_accuracy"] = metrics.argmax_accuracy(model.classifier(test_f), test_y)
    if objective.class_weights:
        result["cosine_accuracy"] = metrics.argmax_accuracy(model.class_weights(test_f), test_y)
    if objective.accuracy == "linear":
        logits = model.class_weights.logits(test_f)
        result["linear_accuracy"] = metrics.argmax_accuracy(logits, test_y)
    if objective.centers:
        result["center_accuracy"] = metrics.nearest_center_accuracy(test_f, test_y, model.centers())
    means = metrics.class_means(train_f, train_y, num_classes)
    result["class_mean_accuracy"] = metrics.nearest_center_accuracy(test_f, test_y, means)
    result["knn_accuracy"] = metrics.knn_accuracy(test_f, test_y, train_f, train_y, k=config.knn_k)
    retrieval = metrics.retrieval_metrics(test_f, test_y, metric=objective.metric)
    result["precision_at_1"] = retrieval["precision_at_1"]
    result["map_at_r"] = retrieval["map_at_r"]
    result["intra_inter_ratio"] = metrics.intra_inter_distance_ratio(test_f, test_y)
    primary = {
        "argmax": "argmax_accuracy",
        "cosine": "cosine_accuracy",
        "linear": "linear_accuracy",
        "centers": "center_accuracy",
        "class_means": "class_mean_accuracy",
    }[objective.accuracy]
    result["accuracy"] = result[primary]
    return {k: float(v) for k, v in result.items()}


# ----------------------------------------------------------------------------- the run


@dataclasses.dataclass
class Experiment:
    """Everything a run builds once: data, model functions, checkpoints, output paths."""

    config: Config
    workdir: pathlib.Path
    dataset: data_lib.Dataset  # the training classes (seen classes with --open-set)
    open_data: open_set_lib.OpenSetData | None
    class_names: Sequence[str]  # of every class, held-out ones included
    steps: int  # per epoch
    eval_graphdef: Any
    train_step: Callable
    embed: Embed
    manager: ocp.CheckpointManager
    log: Callable[..., None]
    started: float
    check_stop: Callable[[], None]  # raises KeyboardInterrupt when a stop was requested
    # Steps between stop checks: every step in one process; in several, every progress read,
    # at the same steps on every process (the check may be a collective there).
    stop_check_every: int = 1

    @property
    def num_classes(self) -> int:
        return self.dataset.num_classes

    @property
    def metrics_path(self) -> pathlib.Path:
        return self.workdir / "metrics.jsonl"

    def frame_path(self, epoch: int) -> pathlib.Path:
        return self.workdir / "plots" / f"epoch_{epoch:03d}.npz"


def _samples_per_class(config: Config, num_classes: int) -> int:
    """m of class-balanced batches: --samples-per-class, else the smallest m >= 4 (FaceNet and
    PML's MPerClassSampler use few per class) that divides the batch into 2 to ``num_classes``
    classes (a batch needs two classes for negatives)."""
    if config.samples_per_class is not None:
        m = config.samples_per_class
        if config.batch_size // m > num_classes:
            raise ConfigError(
                f"--batch-size {config.batch_size} / --samples-per-class {m} = "
                f"{config.batch_size // m} classes per batch, but the training set has "
                f"{num_classes}; raise --samples-per-class"
            )
        return m
    for m in range(4, config.batch_size // 2 + 1):
        if config.batch_size % m == 0 and 2 <= config.batch_size // m <= num_classes:
            return m
    raise ConfigError(
        f"--batch-size {config.batch_size} cannot be split into 2 to {num_classes} classes "
        "of at least 4 samples each; choose another --batch-size or set --samples-per-class"
    )


def _open_set_data(config: Config, dataset: data_lib.Dataset) -> open_set_lib.OpenSetData | None:
    """The open-set split of --open-set / --held-out-classes, or None (closed set)."""
    if config.open_set is None and config.held_out_classes is None:
        return None
    try:
        split = open_set_lib.class_split(
            dataset.num_classes,
            open_set=config.open_set,
            held_out=config.held_out_classes,
            class_names=dataset.class_names,
        )
    except ValueError as err:
        raise ConfigError(str(err)) from None
    return open_set_lib.split_dataset(dataset, split)


def _check_data_dir(config: Config) -> None:
    """A --data-dir that does not exist is a typo more often than a wish for a new folder."""
    if config.data_dir is None or config.create_data_dir:
        return
    path = pathlib.Path(config.data_dir).expanduser()
    if not path.exists():
        raise ConfigError(
            f"--data-dir {config.data_dir} does not exist; give an existing folder, or add "
            "--create-data-dir to create it and prepare the dataset there"
        )


def checkpoint_manager(directory: pathlib.Path, keep: int) -> ocp.CheckpointManager:
    """Keeps the ``keep`` newest epochs plus the best by accuracy; saves synchronously, so an
    epoch's checkpoint is complete when :func:`record_epoch` returns."""
    policy = ocp.checkpoint_managers.AnyPreservationPolicy(
        [
            ocp.checkpoint_managers.LatestN(keep),
            ocp.checkpoint_managers.BestN(get_metric_fn=lambda m: m["accuracy"], n=1),
        ]
    )
    options = ocp.CheckpointManagerOptions(
        preservation_policy=policy, enable_async_checkpointing=False
    )
    return ocp.CheckpointManager(directory.resolve(), options=options)


def latest_checkpoint(workdir: str | os.PathLike) -> tuple[int, pathlib.Path] | None:
    """(epoch, folder) of the newest complete checkpoint in ``workdir``, or None."""
    directory = pathlib.Path(workdir) / "checkpoints"
    if not directory.is_dir():
        return None
    latest = ocp.step.latest_step_metadata(directory, ocp.step.standard_name_format())
    if latest is None:
        return None
    return latest.step, directory / latest.path.name


def prepare(
    config: Config,
    workdir: pathlib.Path,
    log: Callable[..., None],
    check_stop: Callable[[], None] = lambda: None,
) -> Experiment:
    """Loads the data and builds everything the epochs use (see :class:`Experiment`)."""
    started = time.time()
    _check_data_dir(config)
    num_devices(config)  # --devices within the local devices: fail before loading data
    if config.quiet:
        data_lib.disable_progress_bars()
    dataset = data_lib.load_dataset(
        config.dataset,
        data_dir=config.data_dir,
        limit=config.limit,
        create_data_dir=config.create_data_dir,
    )
    if config.val_size is not None:
        if config.val_size >= len(dataset.train_labels):
            raise ConfigError(
                f"--val-size must be below the {len(dataset.train_labels)} training images, "
                f"got {config.val_size}"
            )
        dataset = data_lib.validation_split(dataset, config.val_size)
    log(
        f"data: {dataset.source}: {len(dataset.train_labels)} train, "
        f"{len(dataset.test_labels)} {dataset.evaluation}"
        + ("; the test set is not used" if dataset.evaluation != "test" else "")
    )
    class_names = dataset.class_names
    open_data = _open_set_data(config, dataset)
    if open_data is not None:
        dataset = open_data.seen
        held_out = ", ".join(f"{c} ({class_names[c]})" for c in open_data.split.held_out)
        log(f"open set: training on {dataset.num_classes} classes, held out: {held_out}")
    side = min(dataset.train_images.shape[1:3])
    if config.max_shift >= side:
        raise ConfigError(f"--max-shift must be < the image side {side}, got {config.max_shift}")
    if config.objective.balanced_batches:
        m = _samples_per_class(config, dataset.num_classes)
        config = dataclasses.replace(config, samples_per_class=m)
    steps = len(dataset.train_labels) // config.batch_size
    if steps < 1:
        raise ConfigError(
            f"{len(dataset.train_labels)} training examples make no batch of "
            f"{config.batch_size}; raise --limit or lower --batch-size"
        )

    image_shape = dataset.train_images.shape[1:]
    model = build_model(config, image_shape, dataset.num_classes)
    model.train()
    graphdef, _ = nnx.split(
        (model, nnx.Optimizer(model, build_optimizer(config, steps), wrt=nnx.Param))
    )
    devices = num_devices(config)
    kernels = (
        None if config.dataset == "cifar10" else resolve_conv(config.conv, config.process_tuning)
    )
    multi = jax.process_count() > 1
    # Evaluation: oneDNN runs faster on one device with every core as its threads than split
    # over the devices; XLA's kernels run faster split. Each process evaluates on its own.
    eval_devices = 1 if kernels == "onednn" else min(devices, jax.local_device_count())
    eval_model = build_model(
        config,
        image_shape,
        dataset.num_classes,
        conv_threads=onednn_conv.cores() if eval_devices == 1 else None,
    )
    eval_model.eval()
    eval_graphdef, _ = nnx.split(
        (eval_model, nnx.Optimizer(eval_model, build_optimizer(config, steps), wrt=nnx.Param))
    )
    conv = "" if kernels is None else f"; convolutions: {kernels}"
    processes = f" in {jax.process_count()} processes" if jax.process_count() > 1 else ""
    log(
        f"devices: {devices} × {jax.devices()[0].platform}{processes}, "
        f"{config.batch_size // devices} images each{conv}"
    )
    return Experiment(
        config=config,
        workdir=workdir,
        dataset=dataset,
        open_data=open_data,
        class_names=class_names,
        steps=steps,
        eval_graphdef=eval_graphdef,
        train_step=make_train_step(config, graphdef),
        # A multi-process evaluation runs per process: no stop check (a collective) there.
        embed=make_embed(
            eval_graphdef, config, eval_devices, check_stop=(lambda: None) if multi else check_stop
        ),
        manager=checkpoint_manager(workdir / "checkpoints", config.keep_checkpoints),
        log=log,
        started=started,
        check_stop=check_stop,
        stop_check_every=config.progress_every if multi else 1,
    )


def _initial_train_state(exp: Experiment) -> TrainState:
    model = build_model(exp.config, exp.dataset.train_images.shape[1:], exp.num_classes)
    optimizer = nnx.Optimizer(model, build_optimizer(exp.config, exp.steps), wrt=nnx.Param)
    model.train()
    _, graph = nnx.split((model, optimizer))
    return place_on_devices(exp.config, initial_state(graph, exp.config.objective))


def restore_or_start(exp: Experiment) -> tuple[TrainState, list[dict]]:
    """The state to train from and the metrics of the epochs already done.

    ``resume="no"`` refuses a workdir with checkpoints; ``"yes"`` needs one; ``"auto"``
    resumes when there is one. A resumed run must have the stored configuration (run settings
    aside): every differing key is named with its stored and new value.
    """
    config, workdir = exp.config, exp.workdir
    state = _initial_train_state(exp)
    latest = resume_point(config, workdir)
    config_path = workdir / "config.json"
    if latest is None:
        history: list[dict] = []
    else:
        stored = json.loads(config_path.read_text()) if config_path.exists() else {}
        differences = stored_differences(stored, config)
        if differences:
            listed = "; ".join(
                f"{key}: stored {old!r}, now {new!r}" for key, (old, new) in differences.items()
            )
            raise ResumeError(
                f"--resume with a different configuration than the run in {workdir}: {listed}. "
                "Use the stored values, or start afresh in another --workdir"
            )
        try:
            state = exp.manager.restore(latest, args=ocp.args.StandardRestore(state))
        except ValueError as error:  # orbax: tree structure, shape or dtype mismatch
            reason = str(error).strip().splitlines()[0]  # the rest is pages of tree dumps
            raise ResumeError(
                f"--resume cannot read the epoch-{latest} checkpoint in "
                f"{exp.manager.directory}: its train state does not match this version's "
                f"({reason}); it was written by another version of mlx_jax: rerun that "
                "version to finish it, or start afresh in another --workdir"
            ) from error
        history = [h for h in _read_history(workdir) if h["epoch"] <= latest]
        # said even with --quiet: what --resume found is part of the run's record
        if distributed.is_primary():
            print(f"resumed from epoch {latest} (step {int(state.step)})", flush=True)
    distributed.barrier("read the stored configuration and metrics")  # before they are rewritten
    if distributed.is_primary():
        config_path.write_text(json.dumps(config.to_json(), indent=2))
        exp.metrics_path.write_text("".join(json.dumps(h) + "\n" for h in history))
    return state, history


def resume_point(config: Config, workdir: pathlib.Path) -> int | None:
    """The epoch to resume from, or None to start afresh, by ``config.resume``.

    Raises:
      ResumeError: ``"yes"`` without a checkpoint, or ``"no"`` over an earlier run's.
    """
    latest = latest_checkpoint(workdir)
    if latest is None and config.resume == "yes":
        raise ResumeError(
            f"--resume: there is no checkpoint in {workdir / 'checkpoints'} to continue "
            "from; drop --resume to start afresh, or use --resume=auto"
        )
    if latest is not None and config.resume == "no":
        raise ResumeError(
            f"{workdir} holds checkpoints of an earlier run (newest: epoch {latest[0]}); pass "
            "--resume to continue it or choose another --workdir"
        )
    return None if latest is None else latest[0]


def _epoch_order(config: Config, labels: np.ndarray, epoch: int, steps: int) -> np.ndarray:
    """[steps, batch] indices of one epoch, a pure function of (seed, epoch)."""
    seed = config.seed * 100_003 + epoch
    if config.objective.balanced_batches:
        batches = data_lib.class_balanced_batches(
            labels, config.batch_size, config.samples_per_class, seed, num_batches=steps
        )
        order = np.stack([np.asarray(b) for b in batches])
    else:
        permutation = np.random.default_rng(seed).permutation(len(labels))
        order = permutation[: steps * config.batch_size].reshape(steps, config.batch_size)
    return order.astype(np.int32)


def train_epoch(exp: Experiment, state: TrainState, epoch: int) -> tuple[TrainState, dict]:
    """One epoch of steps; returns the new state and the epoch's training statistics.

    Raises:
      TrainingDiverged: at the first progress read after a bad step.
    """
    config = exp.config
    t0 = time.time()
    order = _epoch_order(config, exp.dataset.train_labels, epoch, exp.steps)
    images = epoch_batches(config, exp.dataset.train_images, order)
    labels = epoch_batches(config, exp.dataset.train_labels, order)
    totals = jnp.zeros(5)
    bar = _progress(range(exp.steps), f"epoch {epoch}/{config.epochs}", config.quiet)
    for i in bar:
        if i % exp.stop_check_every == 0:
            exp.check_stop()
        state, stats = exp.train_step(state, images, labels, i)
        totals = totals + stats
        if (i + 1) % config.progress_every == 0 or i + 1 == exp.steps:
            loss_sum, correct, good = (float(v) for v in totals[:3])
            if bool(state.health.diverged):
                bar.close()
                _raise_divergence(exp, state, epoch)
            acc = correct / max(good * config.batch_size, 1)
            bar.set_postfix(
                loss=f"{loss_sum / max(good, 1):.4f}",
                **({} if math.isnan(acc) else {"acc": f"{acc:.4f}"}),
            )
    bar.close()
    loss_sum, correct, good, norm_sum, clipped = (float(v) for v in totals)
    row = {"epoch": epoch, "step": int(state.step), "loss": loss_sum / max(good, 1)}
    if not math.isnan(correct):
        row["train_accuracy"] = correct / max(good * config.batch_size, 1)
    # Mean pre-clip gradient norm and the share of steps --clip-norm scaled down: a share
    # near 1 means the step size is set by the clip, not by --lr.
    row["grad_norm"] = norm_sum / max(good, 1)
    row["clipped_fraction"] = clipped / max(good, 1)
    row["train_seconds"] = time.time() - t0
    return state, row


def _raise_divergence(exp: Experiment, state: TrainState, epoch: int):
    h = state.health
    terms = ", ".join(f"{k}={float(v):.6g}" for k, v in h.last_terms.items())
    latest = exp.manager.latest_step()
    where = (
        f"{exp.workdir / 'checkpoints' / str(latest)} (end of epoch {latest})"
        if latest is not None
        else "none (diverged before the first checkpoint)"
    )
    bad_loss = float(h.bad_loss)
    what = (
        f"exploded to {bad_loss:.3g} (beyond --max-loss {exp.config.max_loss:g})"
        if math.isfinite(bad_loss)
        else f"became non-finite ({bad_loss}, or its gradient did)"
    )
    raise TrainingDiverged(
        f"loss {what} at step {int(h.bad_step)} (epoch {epoch}); training stopped "
        f"and the state was kept from step {int(h.last_good_step)}.\n"
        f"  last good loss terms (step {int(h.last_good_step)}): {terms}\n"
        f"  last good checkpoint: {where}\n"
        "  try a lower --lr, a longer --warmup-epochs or a smaller --clip-norm"
    )


@dataclasses.dataclass
class Frame:
    """The points of one epoch's feature plot (2-D: projected by PCA when D > 2)."""

    train: np.ndarray  # [N, 2]
    train_labels: np.ndarray
    test: np.ndarray  # [M, 2]
    test_labels: np.ndarray
    train_hollow: np.ndarray  # [N] bool: held-out classes (open set)
    test_hollow: np.ndarray
    dim: int  # the features' own dimension

    def save(self, path: pathlib.Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(path, **dataclasses.asdict(self))

    @classmethod
    def load(cls, path: pathlib.Path) -> Frame:
        with np.load(path) as data:
            fields = {k: data[k] for k in data.files}
        return cls(**{**fields, "dim": int(fields["dim"])})

    def first(self, n: int) -> Frame:
        """The first ``n`` points of each set: the per-epoch subset of a full evaluation."""
        return dataclasses.replace(
            self,
            train=self.train[:n],
            train_labels=self.train_labels[:n],
            train_hollow=self.train_hollow[:n],
            test=self.test[:n],
            test_labels=self.test_labels[:n],
            test_hollow=self.test_hollow[:n],
        )


def _frame(train_f, train_y, test_f, test_y, train_hollow=None, test_hollow=None) -> Frame:
    dim = train_f.shape[1]
    if dim > 2:
        pca = viz.fit_pca_2d(train_f)
        train_f, test_f = viz.project_2d(train_f, pca), viz.project_2d(test_f, pca)
    return Frame(
        train=np.asarray(train_f, np.float32),
        train_labels=np.asarray(train_y),
        test=np.asarray(test_f, np.float32),
        test_labels=np.asarray(test_y),
        train_hollow=np.zeros(len(train_f), bool) if train_hollow is None else train_hollow,
        test_hollow=np.zeros(len(test_f), bool) if test_hollow is None else test_hollow,
        dim=dim,
    )


def evaluate_epoch(
    exp: Experiment, state: TrainState, epoch: int, *, full: bool
) -> tuple[dict, Frame]:
    """The epoch's metrics and plot points.

    ``full``: the whole test set and ``eval_train_limit`` training images (the last epoch);
    else the first ``eval_examples`` of each (a fixed subset, so epochs compare)."""
    config, dataset = exp.config, exp.dataset
    train_n = min(config.eval_train_limit, len(dataset.train_labels))
    test_n = len(dataset.test_labels)
    if not full:
        train_n, test_n = min(train_n, config.eval_examples), min(test_n, config.eval_examples)
    what = "final evaluation" if full else f"evaluating epoch {epoch}"
    if full:
        exp.log(f"{what}: {test_n} {dataset.evaluation} and {train_n} training images")
    graph = distributed.local_copy(state.graph)  # this process's copy
    model, _ = nnx.merge(exp.eval_graphdef, graph)
    train_f = exp.embed(graph, dataset.train_images[:train_n], f"{what}: train")
    test_f = exp.embed(graph, dataset.test_images[:test_n], f"{what}: {dataset.evaluation}")
    train_y, test_y = dataset.train_labels[:train_n], dataset.test_labels[:test_n]
    row = closed_set_metrics(config, model, train_f, train_y, test_f, test_y, exp.num_classes)
    row["eval_test_examples"] = test_n
    if exp.open_data is None:
        return row, _frame(train_f, train_y, test_f, test_y)
    return _evaluate_open_set(exp, state, train_f, test_f, row, full, what)


def _evaluate_open_set(
    exp: Experiment, state: TrainState, seen_train_f, seen_test_f, row: dict, full: bool, what: str
) -> tuple[dict, Frame]:
    """Adds the open-set metrics on the held-out classes; the frame shows them hollow.

    Enrollment images per held-out class match the seen classes' (the evaluation subset of
    training images spread over the seen classes)."""
    data = exp.open_data
    seen_train_y = data.seen_train_original[: len(seen_train_f)]
    seen_test_y = data.seen_test_original[: len(seen_test_f)]
    enroll_n = len(seen_train_f) * len(data.split.held_out) // len(data.split.seen)
    test_n = len(data.held_out_test_labels)
    if not full:
        test_n = min(test_n, exp.config.eval_examples)
    held_train_f = exp.embed(
        state.graph, data.held_out_train_images[:enroll_n], f"{what}: held out"
    )
    held_train_y = data.held_out_train_labels[:enroll_n]
    held_test_f = exp.embed(state.graph, data.held_out_test_images[:test_n], f"{what}: held out")
    held_test_y = data.held_out_test_labels[:test_n]
    result, (roc_far, roc_val) = open_set_lib.evaluate_open_set(
        metric=exp.config.objective.metric,
        seen_train=seen_train_f,
        seen_train_labels=seen_train_y,
        seen_test=seen_test_f,
        seen_test_labels=seen_test_y,
        held_out_train=held_train_f,
        held_out_train_labels=held_train_y,
        held_out_test=held_test_f,
        held_out_test_labels=held_test_y,
    )
    row.update(result)
    if full:
        held_out = ", ".join(exp.class_names[c] for c in data.split.held_out)
        viz.roc_figure(
            {f"held-out classes ({held_out})": (roc_far, roc_val)},
            exp.workdir / "roc.png",
            title=f"{_title(exp.config)}\nheld out: VAL@FAR=1e-3 "
            f"{result['open_val_at_far']:.3f}, AUC {result['open_auc']:.4f}",
        )
    frame = _frame(
        np.concatenate([seen_train_f, held_train_f]),
        np.concatenate([seen_train_y, held_train_y]),
        np.concatenate([seen_test_f, held_test_f]),
        np.concatenate([seen_test_y, held_test_y]),
        np.arange(len(seen_train_f) + len(held_train_f)) >= len(seen_train_f),
        np.arange(len(seen_test_f) + len(held_test_f)) >= len(seen_test_f),
    )
    return row, frame


def record_epoch(exp: Experiment, state: TrainState, row: dict, frame: Frame) -> None:
    """Appends the epoch's metrics line and saves its plot points, then its checkpoint.

    The line comes before the checkpoint: a run killed between the two resumes from the
    previous checkpoint and rewrites the line, instead of skipping the epoch's metrics. Process
    0 writes the files; every process takes part in the checkpoint."""
    if distributed.is_primary():
        with exp.metrics_path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        frame.save(exp.frame_path(row["epoch"]))
    exp.manager.save(
        row["epoch"], args=ocp.args.StandardSave(state), metrics={"accuracy": row["accuracy"]}
    )
    exp.manager.wait_until_finished()


def _title(config: Config, epoch: int | None = None) -> str:
    title = f"{config.dataset} {config.loss} feat={config.feat_dim}"
    return title if epoch is None else f"{title} epoch {epoch}"


def _draw(exp: Experiment, frame: Frame, path: pathlib.Path, epoch: int, limits=None) -> None:
    pca = f" (PCA of {frame.dim}-D features)" if frame.dim > 2 else ""
    viz.train_test_figure(
        frame.train,
        frame.train_labels,
        frame.test,
        frame.test_labels,
        path,
        title=_title(exp.config, epoch) + pca,
        limits=limits,
        class_names=exp.class_names,
        train_hollow=frame.train_hollow if frame.train_hollow.any() else None,
        test_hollow=frame.test_hollow if frame.test_hollow.any() else None,
        hollow_label="held out (hollow)",
        test_name=exp.dataset.evaluation,
    )


def draw_features(exp: Experiment, history: list[dict]) -> None:
    """features.png of the last epoch and features.gif of every epoch on fixed axes (the same
    limits in every frame, so the animation shows the clusters move rather than zooming)."""
    epochs = [h["epoch"] for h in history if exp.frame_path(h["epoch"]).exists()]
    if not epochs:
        return
    frames = [Frame.load(exp.frame_path(e)) for e in epochs]
    _draw(exp, frames[-1], exp.workdir / "features.png", epochs[-1])
    subsets = [f.first(exp.config.eval_examples) for f in frames]
    limits = viz.common_limits([p for f in subsets for p in (f.train, f.test)])
    paths = []
    for epoch, frame in zip(epochs, subsets, strict=True):
        paths.append(exp.workdir / "plots" / f"epoch_{epoch:03d}.png")
        _draw(exp, frame, paths[-1], epoch, limits)
    viz.make_gif(paths, exp.workdir / "features.gif")
    for path in paths:  # the GIF holds them; the points stay in the .npz files
        path.unlink()


SUMMARY_COLUMNS = [
    "epoch",
    "loss",
    "train_accuracy",
    "accuracy",
    "knn_accuracy",
    "precision_at_1",
    "map_at_r",
    "intra_inter_ratio",
    "grad_norm",
    "clipped_fraction",
    "open_precision_at_1",
    "open_map_at_r",
    "open_val_at_far",
    "open_auc",
    "open_identification_rate",
    "open_fpir",
    "eval_test_examples",
    "seconds",
]


def summary_table(rows: list[dict]) -> str:
    """A Markdown table of the epochs' main metrics."""
    keys = [k for k in SUMMARY_COLUMNS if any(k in r for r in rows)]
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for r in rows:
        cells = []
        for k in keys:
            v = r.get(k, "")
            cells.append(f"{v:.4f}" if isinstance(v, float) else str(v))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def finish(exp: Experiment, history: list[dict]) -> dict:
    """Draws the features, writes summary.json and summary.md (process 0); returns the
    summary."""
    exp.log("drawing features.png and features.gif")
    summary = {
        "dataset": exp.config.dataset,
        "loss": exp.config.loss,
        "feat_dim": exp.config.feat_dim,
        "epochs": len(history),
        "complete": True,
        # what "accuracy" and the other metrics were measured on: "test" or "validation"
        "evaluated_on": exp.dataset.evaluation,
        "final": history[-1],
        # per-epoch subsets before the last epoch: the best by the same fixed subset
        "best": max(history, key=lambda h: h["accuracy"]),
        "data_source": exp.dataset.source,
        "devices": num_devices(exp.config),  # of this (last) segment; the math is the same
        "processes": jax.process_count(),
        "workdir": str(exp.workdir.resolve()),
    }
    if distributed.is_primary():
        draw_features(exp, history)
        (exp.workdir / "summary.json").write_text(json.dumps(summary, indent=2))
        (exp.workdir / "summary.md").write_text(summary_table(history) + "\n")
    return summary


def _next_epoch_passes_time_box(exp: Experiment, history: list[dict]) -> bool:
    """Whether an epoch as long as the last one (resumed ones count) would end past the time
    box. Without a finished epoch there is no estimate, so a fresh run trains its first."""
    minutes = exp.config.stop_after_minutes
    if minutes is None or not history:
        return False
    return time.time() - exp.started + history[-1]["seconds"] > 60 * minutes


def _stopped(exp: Experiment, history: list[dict], why: str) -> dict:
    epoch = history[-1]["epoch"] if history else 0
    exp.log(f"{why}; continue with --resume")
    return {
        "complete": False,
        "stopped_after": epoch,
        "epochs": len(history),
        "history": history,
        "workdir": str(exp.workdir.resolve()),
    }


def _already_complete(config: Config, workdir: pathlib.Path) -> dict | None:
    """The stored summary of a finished run of this configuration, resumed again."""
    summary_path, config_path = workdir / "summary.json", workdir / "config.json"
    if config.resume == "no" or not summary_path.exists() or not config_path.exists():
        return None
    last = latest_checkpoint(workdir)
    stored = json.loads(config_path.read_text())
    if last is None or last[0] != config.epochs or stored_differences(stored, config):
        return None
    return json.loads(summary_path.read_text())


def train_and_evaluate(
    config: Config,
    workdir: str | os.PathLike | None = None,
    *,
    check_stop: Callable[[], None] = lambda: None,
) -> dict:
    """Trains and evaluates ``config`` in ``workdir`` (default ``config.default_workdir()``).

    ``check_stop`` is called between steps and evaluation chunks (never inside a checkpoint
    save) and may raise KeyboardInterrupt to stop there: the CLI's Ctrl-C and SIGTERM
    handlers request a stop this way (:class:`experiments.cli.StopRequest`). In a
    multi-process run it is called before every ``progress_every``-th step only, at the same
    steps on every process, so it may be a collective
    (:func:`experiments.distributed.agreed_stop`).

    Returns:
      The summary (also in WORKDIR/summary.json): ``final`` and ``best`` epoch metrics,
      ``epochs``, ``complete``. A run stopped early by ``stop_after``/``stop_after_minutes``
      returns ``{"complete": False, "stopped_after": epoch, "history": [...]}``; a finished
      run resumed again returns its stored summary without training.

    Raises:
      ConfigError: a bad value (named by its flag), also ones that need the data to check.
      mlx_jax.data.DatasetUnavailableError: no source for the dataset.
      ResumeError: see :func:`restore_or_start`.
      TrainingDiverged: see :func:`train_epoch`.
      KeyboardInterrupt: Ctrl-C or ``check_stop``; the newest checkpoint is
        :func:`latest_checkpoint`.
    """
    config = config.validate()
    workdir = pathlib.Path(workdir if workdir is not None else config.default_workdir())
    primary = distributed.is_primary()
    if not primary:  # process 0 speaks for the run (run settings: the math is the same)
        config = dataclasses.replace(config, quiet=True)
    log = (lambda *a: None) if config.quiet else (lambda *a: print(*a, flush=True))
    say = print if primary else (lambda *a, **k: None)
    say(f"run folder: {workdir}", flush=True)
    done = _already_complete(config, workdir)
    if done is not None:
        say(f"already complete: {done['epochs']} epochs; results in {workdir}", flush=True)
        say(summary_table(_read_history(workdir)), flush=True)
        return done
    _check_data_dir(config)  # refuse before making the workdir or loading anything
    resume_point(config, workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    exp = prepare(config, workdir, log, check_stop)
    state, history = restore_or_start(exp)
    config = exp.config
    for epoch in range(len(history) + 1, config.epochs + 1):
        if _next_epoch_passes_time_box(exp, history):
            return _stopped(
                exp,
                history,
                f"stopped before epoch {epoch}: it would end after --stop-after-minutes "
                f"{config.stop_after_minutes:g}",
            )
        t0 = time.time()
        state, row = train_epoch(exp, state, epoch)
        metrics_row, frame = evaluate_epoch(exp, state, epoch, full=epoch == config.epochs)
        row.update(metrics_row)
        row["seconds"] = time.time() - t0
        row["eval_seconds"] = row["seconds"] - row["train_seconds"]
        record_epoch(exp, state, row, frame)
        history.append(row)
        log(
            f"epoch {epoch}: loss {row['loss']:.4f} accuracy {row['accuracy']:.4f} "
            f"knn {row['knn_accuracy']:.4f} P@1 {row['precision_at_1']:.4f} "
            f"({row['train_seconds']:.0f}s training, {row['eval_seconds']:.0f}s evaluation "
            f"of {row['eval_test_examples']} {exp.dataset.evaluation} images)"
        )
        if config.stop_after is not None and config.stop_after <= epoch < config.epochs:
            return _stopped(exp, history, f"stopped after epoch {epoch} (--stop-after)")
    summary = finish(exp, history)
    say(summary_table(history), flush=True)
    say(f"results in {workdir}: summary.json, metrics.jsonl, features.png", flush=True)
    return summary


def _read_history(workdir: pathlib.Path) -> list[dict]:
    path = workdir / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    return [json.loads(line) for line in lines if line.strip()]
