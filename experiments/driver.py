"""One driver for every experiment: config → data → model → train loop → eval → plots/checkpoints.

The train state is one explicit pytree (:class:`TrainState`): the NNX state of the model and its
optimizer (parameters, PReLU slopes, BatchNorm statistics, class weights, centers, optimizer
state and step), the global step, a health record for divergence, and the data-order seed. One
jitted step does forward, loss, gradient, optimizer update and the centers' α update; it gathers
its batch from device-resident data by an index table uploaded once per epoch, so nothing
crosses between host and device inside an epoch except the progress bar's periodic read.

A non-finite loss or gradient, or a loss beyond ``--max-loss`` (a finite blow-up), freezes the
state at the last good step (no NaN is ever written into the weights); the host sees the flag at
its next progress read and stops the run with the step, the bad loss, the last good loss terms
and the last good checkpoint.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import pathlib
import sys
import time
from collections.abc import Sequence
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx
from tqdm import tqdm

from experiments import onednn_conv
from experiments import open_set as open_set_lib
from experiments.allocator import reuse_freed_memory
from experiments.augment import AUGMENTATIONS, augment
from experiments.cpu_devices import use_one_device_per_core
from experiments.models import CONVS, INITS, EmbeddingModel, LeNetPlusPlus, SmallResNet
from experiments.objectives import OBJECTIVES, LossConfig, Objective
from mlx_jax import data as data_lib
from mlx_jax import metrics, parallel, viz

# ----------------------------------------------------------------------------- configuration


@dataclasses.dataclass(frozen=True)
class Config:
    dataset: str
    loss: str = "standalone"
    feat_dim: int = 2
    epochs: int = 20
    batch_size: int = 128  # seed 001
    lr: float = 0.01  # seed 001
    momentum: float = 0.9  # pytorch-center-loss's SGD
    weight_decay: float = 5e-4  # pytorch-center-loss's SGD
    warmup_epochs: float = 0.5
    clip_norm: float = 5.0
    augment: str = "none"  # seed 001 trains on the plain images
    max_shift: int = 2
    center_update: str = "alpha"  # or "sgd": centers as parameters (pytorch-center-loss)
    center_lr: float = 0.5  # pytorch-center-loss's lr for centers
    samples_per_class: int = 4
    loss_config: LossConfig = LossConfig()
    seed: int = 0
    out: str | None = None
    resume: bool = False
    data_dir: str | None = None
    limit: int | None = None
    eval_train_limit: int = 10_000
    knn_k: int = 5
    open_set: int | None = None  # hold out the last K classes (experiments/open_set.py)
    held_out_classes: tuple[int, ...] | None = None  # or hold out these classes
    width: int = 32
    init: str = "flax"  # LeNet++ initialisation: Flax's or PyTorch's (seed 001's)
    conv: str = "auto"  # LeNet++ convolution kernels: auto, xla or onednn (same math)
    max_loss: float = 1e6  # |loss| above this counts as divergence, like a non-finite loss
    keep_checkpoints: int = 3
    stop_after: int | None = None  # stop (as if killed) after this epoch; --resume continues
    stop_after_minutes: float | None = None  # time box: stop before an epoch that would pass it
    progress_every: int = 20
    quiet: bool = False
    devices: int | None = None  # data-parallel devices (None: default_devices)

    @property
    def objective(self) -> Objective:
        return OBJECTIVES[self.loss]

    def out_dir(self) -> pathlib.Path:
        if self.out:
            return pathlib.Path(self.out)
        return pathlib.Path("runs") / f"{self.dataset}-{self.loss}-feat{self.feat_dim}"

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        # run settings, not the experiment: "conv" picks kernels for the same math
        for key in ("resume", "quiet", "stop_after", "stop_after_minutes", "devices", "conv"):
            d.pop(key)
        return json.loads(json.dumps(d))  # tuples as lists, as read back from config.json


def build_parser(dataset: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=f"python -m experiments.{dataset}",
        description=f"Train and evaluate a metric-learning loss on {dataset} (LeNet++ for "
        "MNIST-likes, a small ResNet for CIFAR-10). Writes metrics (JSON lines), a summary, "
        "feature plots and orbax checkpoints to --out.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    losses_help = "; ".join(f"{k}: {o.help}" for k, o in OBJECTIVES.items())
    p.add_argument("--loss", default="standalone", choices=list(OBJECTIVES), help=losses_help)
    p.add_argument("--feat-dim", type=int, default=2, help="embedding dimension (seed 001: 2, 128)")
    p.add_argument("--epochs", type=int, default=20, help="training epochs")
    p.add_argument("--batch-size", type=int, default=128, help="batch size (seed 001: 128)")
    p.add_argument("--lr", type=float, default=0.01, help="peak learning rate (seed 001: 0.01)")
    p.add_argument("--momentum", type=float, default=0.9, help="SGD (Nesterov) momentum")
    p.add_argument("--weight-decay", type=float, default=5e-4, help="L2 weight decay")
    p.add_argument(
        "--warmup-epochs",
        type=float,
        default=0.5,
        help="linear warm-up length before cosine decay to 0",
    )
    p.add_argument(
        "--clip-norm",
        type=float,
        default=5.0,
        help="clip gradients to this global norm; each epoch's metrics give the mean norm "
        "before clipping (grad_norm) and the share of steps clipped (clipped_fraction)",
    )
    p.add_argument(
        "--augment",
        default="none",
        choices=list(AUGMENTATIONS),
        help="random augmentation of training batches (experiments/augment.py): shift moves "
        "each image by up to --max-shift pixels; shift-flip also mirrors half of them "
        "(clothes, CIFAR; not digits). Seed 001 uses none",
    )
    p.add_argument("--max-shift", type=int, default=2, help="largest --augment shift in pixels")
    p.add_argument("--weight-cent", type=float, default=1.0, help="λ of softmax + λ·center (cent)")
    p.add_argument("--alpha", type=float, default=0.5, help="center learning rate α (Wen et al.)")
    p.add_argument("--weight-intra", type=float, default=1.0, help="standalone: intra weight")
    p.add_argument("--weight-inter", type=float, default=0.1, help="standalone: inter weight")
    p.add_argument(
        "--inter-eps",
        type=float,
        default=LossConfig.inter_eps,
        help="standalone: ε in the inter term's log(‖x_i − x_j‖² + ε); a pair's gradient is "
        "at most 1/sqrt(ε) (1e-12: pytorch-center-loss's distance floor)",
    )
    p.add_argument(
        "--margin",
        type=float,
        default=None,
        help="loss margin (contrastive m, triplet α, triplet-center m, circle m, "
        "CosFace/ArcFace m); default: the loss's own",
    )
    p.add_argument(
        "--scale",
        type=float,
        default=None,
        help="loss scale (circle γ, CosFace/ArcFace s, SphereFace s); default: the loss's own",
    )
    p.add_argument(
        "--mining",
        default="semihard",
        choices=["semihard", "batch_hard", "all", "semihard_band"],
        help="triplet mining",
    )
    p.add_argument(
        "--center-update",
        default="alpha",
        choices=["alpha", "sgd"],
        help="alpha: Wen et al.'s α rule; sgd: centers as parameters (pytorch-center-loss, "
        "SGD lr --center-lr, gradients scaled by 1/weight_cent)",
    )
    p.add_argument("--center-lr", type=float, default=0.5, help="lr of centers with sgd update")
    p.add_argument(
        "--samples-per-class",
        type=int,
        default=None,
        help="pair/triplet losses: batches of batch_size/samples_per_class classes, "
        "samples_per_class images each; default: the smallest m >= 4 dividing --batch-size "
        "with at most as many classes per batch as the dataset has (128 on 10 classes: 16)",
    )
    p.add_argument("--seed", type=int, default=0, help="random seed (init and data order)")
    p.add_argument("--out", default=None, help="output directory (default runs/DATASET-LOSS-featD)")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint")
    p.add_argument(
        "--data-dir",
        default=None,
        help="directory with IDX files or a TFDS data_dir (see mlx_jax.data for sources)",
    )
    p.add_argument("--limit", type=int, default=None, help="use the first N examples per split")
    p.add_argument(
        "--eval-train-limit",
        type=int,
        default=10_000,
        help="training examples embedded at evaluation (class means, kNN, plots)",
    )
    p.add_argument("--knn-k", type=int, default=5, help="k of the k-NN accuracy")
    p.add_argument(
        "--open-set",
        type=int,
        default=None,
        metavar="K",
        help="open-set protocol: train without the last K classes and report retrieval, "
        "VAL@FAR=1e-3, ROC AUC and open-set identification on them (experiments/open_set.py)",
    )
    p.add_argument(
        "--held-out-classes",
        type=int,
        nargs="+",
        default=None,
        metavar="CLASS",
        help="open-set protocol with these held-out class ids instead of the last K",
    )
    p.add_argument("--width", type=int, default=32, help="LeNet++ first-stage channels (paper 32)")
    p.add_argument(
        "--init",
        default=Config.init,
        choices=list(INITS),
        help="LeNet++ weight initialisation: flax (LeCun normal, zero bias) or torch "
        "(PyTorch's uniform ±1/sqrt(fan_in) weights and biases, as seed 001's model)",
    )
    p.add_argument(
        "--conv",
        default=Config.conv,
        choices=["auto", *CONVS],
        help="LeNet++'s convolution kernels (same math): xla (XLA's own), onednn (oneDNN's, "
        "through XLA's FFI; CPU only, needs pip install 'mlx_jax[onednn]' and a C++ compiler "
        "for a one-time build; 0.63x XLA's time on LeNet++'s layers on a 2-core AVX2 CPU) or "
        "auto (default: onednn where it can run, else xla)",
    )
    p.add_argument(
        "--max-loss",
        type=float,
        default=Config.max_loss,
        help="a step whose loss is non-finite or larger than this in magnitude stops the run "
        "as diverged (finite blow-ups of the standalone loss reached 6e10 here); the "
        "state stays at the last good step",
    )
    p.add_argument(
        "--stop-after",
        type=int,
        default=None,
        help="stop after this epoch (its checkpoint written), e.g. to time-box a session; "
        "run again with --resume to continue",
    )
    p.add_argument(
        "--stop-after-minutes",
        type=float,
        default=None,
        metavar="MIN",
        help="time box for this run: stop (checkpoint written) before an epoch that, going by "
        "the last epoch's duration, would end after MIN minutes from the start; the first "
        "epoch of a fresh run always runs. Continue with --resume",
    )
    p.add_argument(
        "--devices",
        type=int,
        default=None,
        help="train data-parallel on the first N local devices (default: all of them, or the "
        "most that divide both the batch and the device count; on a CPU one device per core, "
        "experiments/cpu_devices.py): each embeds "
        "batch_size/N images, the loss sees the whole batch (exact global negatives); "
        "--batch-size must be divisible by N",
    )
    p.add_argument(
        "--quiet",
        action="store_true",
        help="no progress bar or per-epoch lines (the bar shows only on a terminal anyway)",
    )
    return p


def config_from_args(dataset: str, argv: Sequence[str] | None = None) -> Config:
    args = build_parser(dataset).parse_args(argv)
    positive = {
        "--feat-dim": args.feat_dim,
        "--epochs": args.epochs,
        "--batch-size": args.batch_size,
        "--samples-per-class": 4 if args.samples_per_class is None else args.samples_per_class,
        "--knn-k": args.knn_k,
        "--width": args.width,
        "--eval-train-limit": args.eval_train_limit,
    }
    for flag, value in positive.items():
        if value < 1:
            raise SystemExit(f"error: {flag} must be >= 1, got {value}")
    if args.limit is not None and args.limit < 1:
        raise SystemExit(f"error: --limit must be >= 1, got {args.limit}")
    if args.stop_after_minutes is not None and not args.stop_after_minutes > 0:
        raise SystemExit(f"error: --stop-after-minutes must be > 0, got {args.stop_after_minutes}")
    if args.max_shift < 0:
        raise SystemExit(f"error: --max-shift must be >= 0, got {args.max_shift}")
    if args.lr <= 0:
        raise SystemExit(f"error: --lr must be > 0, got {args.lr}")
    if not args.inter_eps > 0:
        raise SystemExit(f"error: --inter-eps must be > 0, got {args.inter_eps}")
    if not args.max_loss > 0:
        raise SystemExit(f"error: --max-loss must be > 0, got {args.max_loss}")
    if not args.clip_norm > 0:  # also refuses NaN
        raise SystemExit(f"error: --clip-norm must be > 0, got {args.clip_norm}")
    if args.devices is not None:
        _check_devices(args.devices, args.batch_size, "--devices")
    if args.open_set is not None and args.open_set < 2:
        raise SystemExit(
            f"error: --open-set must hold out at least 2 classes (verification needs pairs of "
            f"different held-out classes), got {args.open_set}"
        )
    if (
        OBJECTIVES[args.loss].balanced_batches
        and args.samples_per_class is not None
        and args.batch_size % args.samples_per_class
    ):
        raise SystemExit(
            f"error: --batch-size ({args.batch_size}) must be a multiple of "
            f"--samples-per-class ({args.samples_per_class}) for --loss {args.loss}"
        )
    loss_config = LossConfig(
        weight_cent=args.weight_cent,
        alpha=args.alpha,
        weight_intra=args.weight_intra,
        weight_inter=args.weight_inter,
        inter_eps=args.inter_eps,
        margin=args.margin,
        scale=args.scale,
        mining=args.mining,
    )
    return Config(
        dataset=dataset,
        loss=args.loss,
        feat_dim=args.feat_dim,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        momentum=args.momentum,
        weight_decay=args.weight_decay,
        warmup_epochs=args.warmup_epochs,
        clip_norm=args.clip_norm,
        augment=args.augment,
        max_shift=args.max_shift,
        center_update=args.center_update,
        center_lr=args.center_lr,
        samples_per_class=args.samples_per_class,
        loss_config=loss_config,
        seed=args.seed,
        out=args.out,
        resume=args.resume,
        data_dir=args.data_dir,
        limit=args.limit,
        eval_train_limit=args.eval_train_limit,
        knn_k=args.knn_k,
        open_set=args.open_set,
        held_out_classes=tuple(args.held_out_classes) if args.held_out_classes else None,
        width=args.width,
        init=args.init,
        conv=args.conv,
        max_loss=args.max_loss,
        quiet=args.quiet,
        stop_after=args.stop_after,
        stop_after_minutes=args.stop_after_minutes,
        devices=args.devices,
    )


# ----------------------------------------------------------------------------- devices


def _check_devices(devices: int, batch_size: int, flag: str) -> None:
    available = jax.local_device_count()
    if not 1 <= devices <= available:
        raise SystemExit(
            f"error: {flag} must be in [1, {available}] (local devices), got {devices}"
        )
    if batch_size % devices:
        raise SystemExit(
            f"error: --batch-size ({batch_size}) must be divisible by the number of devices "
            f"({devices}, {flag}) so that every device embeds an equal shard"
        )


def default_devices(batch_size: int, available: int) -> int:
    """The most devices that split both ``batch_size`` and the ``available`` local devices
    evenly (all of them when they divide the batch). Meshes over an odd subset of the devices
    are avoided: 7 of 8 virtual CPU devices deadlocked XLA's all-gather rendezvous here."""
    return max(n for n in range(1, available + 1) if batch_size % n == 0 and available % n == 0)


def _num_devices(cfg: Config) -> int:
    """Data-parallel device count: ``--devices`` (checked), else :func:`default_devices`."""
    if cfg.devices is None:
        return default_devices(cfg.batch_size, jax.local_device_count())
    _check_devices(cfg.devices, cfg.batch_size, "--devices")
    return cfg.devices


def _batch_axis(cfg: Config) -> str | None:
    """The mesh axis the batch is split over, or None on one device."""
    return parallel.DATA_AXIS if _num_devices(cfg) > 1 else None


def place_on_devices(cfg: Config, tree):
    """Host arrays to the device, replicated over the data-parallel mesh when there is one."""
    devices = _num_devices(cfg)
    if devices == 1:
        return jax.tree.map(jnp.asarray, tree)
    return parallel.replicate(parallel.data_mesh(devices), tree)


# ----------------------------------------------------------------------------- model and state


def resolve_conv(conv: str) -> str:
    """``--conv``: "auto" becomes "onednn" where oneDNN's convolutions can run
    (:mod:`experiments.onednn_conv`), else "xla"; "onednn" where they cannot is an error."""
    if conv not in ("auto", *CONVS):
        raise ValueError(f"conv must be one of {['auto', *CONVS]}, got {conv!r}")
    if conv == "xla":
        return conv
    reason = onednn_conv.unavailable_reason()
    if reason is None:
        return "onednn"
    if conv == "onednn":
        raise SystemExit(f"error: --conv onednn cannot run here: {reason}")
    return "xla"


def build_model(cfg: Config, image_shape: tuple[int, ...], num_classes: int) -> EmbeddingModel:
    rngs = nnx.Rngs(cfg.seed)
    channels = image_shape[-1]
    if cfg.dataset == "cifar10":
        backbone = SmallResNet(channels, cfg.feat_dim, axis_name=_batch_axis(cfg), rngs=rngs)
    else:
        backbone = LeNetPlusPlus(
            channels,
            cfg.feat_dim,
            width=cfg.width,
            init=cfg.init,
            conv=resolve_conv(cfg.conv),
            conv_threads=onednn_conv.threads_per_device(_num_devices(cfg)),
            rngs=rngs,
        )
    objective = cfg.objective
    return EmbeddingModel(
        backbone,
        cfg.feat_dim,
        num_classes,
        classifier=objective.classifier,
        class_weights=objective.class_weights,
        centers=objective.centers,
        trainable_centers=cfg.center_update == "sgd",
        rngs=rngs,
    )


def _is_center_path(path) -> bool:
    return any(getattr(k, "key", None) == "centers" for k in path)


def build_optimizer(cfg: Config, steps_per_epoch: int) -> optax.GradientTransformation:
    """SGD with Nesterov momentum, weight decay, warm-up + cosine decay, global-norm clipping.

    Trainable centers (``--center-update sgd``) get their own plain SGD (pytorch-center-loss:
    lr 0.5, gradients scaled by 1/weight_cent so λ does not change how fast centers move).
    """
    total = max(cfg.epochs * steps_per_epoch, 1)
    warmup = min(int(cfg.warmup_epochs * steps_per_epoch), total - 1)
    schedule = optax.warmup_cosine_decay_schedule(0.0, cfg.lr, max(warmup, 0), total)
    net = optax.chain(
        optax.clip_by_global_norm(cfg.clip_norm),
        optax.add_decayed_weights(cfg.weight_decay),
        optax.sgd(schedule, momentum=cfg.momentum, nesterov=True),
    )
    if not (cfg.objective.centers and cfg.center_update == "sgd"):
        return net
    center_scale = 1.0 / cfg.loss_config.weight_cent if cfg.loss == "cent" else 1.0
    centers = optax.chain(optax.scale(center_scale), optax.sgd(cfg.center_lr))

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


def _term_names(objective: Objective) -> list[str]:
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
        last_terms={n: jnp.zeros((), jnp.float32) for n in _term_names(objective)},
    )
    return TrainState(graph=graph, step=zero, health=health)


def make_train_step(cfg: Config, graphdef):
    """The jitted step ``(state, images, labels, order, index) -> (state, stats)``.

    ``stats`` is a [5] float32 vector, zero where the step was skipped (diverged): the loss,
    the batch's correct predictions (NaN without a scorer), whether the step was applied, the
    global gradient norm before clipping, and whether clipping scaled it down.

    With more than one device (``--devices``) the step body runs under ``jax.shard_map`` over a
    1-D ``"data"`` mesh (:mod:`mlx_jax.parallel`): each device embeds its batch_size/N images,
    the loss terms see the all-gathered global batch (every device evaluates them; ``pmean``
    keeps the gradients exact), gradients of the replicated parameters are summed over the
    devices by shard_map, and the centers' α rule sums its per-class statistics over them — so
    the step equals the single-device step on the same batch. On one device the helpers are
    identities and the step is the plain one.
    """
    objective = cfg.objective
    alpha_centers = objective.centers and cfg.center_update == "alpha"
    axis = _batch_axis(cfg)

    def step_on_shard(state: TrainState, x, y):
        model, optimizer = nnx.merge(graphdef, state.graph)

        def loss_fn(model):
            features = model(x)
            batch_features, batch_labels = parallel.gather_batch((features, y), axis)
            terms = objective.terms(
                model, batch_features, batch_labels, state.step, cfg.loss_config
            )
            terms = parallel.mean_over_devices(terms, axis)
            return sum(terms.values()), (features, terms)

        (loss, (features, terms)), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
        optimizer.update(model, grads)
        if alpha_centers:
            model.centers.update(features, y, cfg.loss_config.alpha, axis_name=axis)
        new_graph = nnx.state((model, optimizer))
        grad_norm = optax.tree.norm(grads)  # before clipping: how hard --clip-norm bites
        # A finite blow-up (loss 6e10 here) is as lost as a NaN: stop on either.
        healthy = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & (jnp.abs(loss) <= cfg.max_loss)
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
                (ok & (grad_norm > cfg.clip_norm)).astype(jnp.float32),
            ]
        )
        return TrainState(graph=graph, step=state.step + ok, health=health), stats

    if axis is not None:
        mesh = parallel.data_mesh(_num_devices(cfg))
        step_on_shard = parallel.data_parallel(step_on_shard, mesh, batch_argnums=(1, 2))

    def train_step(state: TrainState, images, labels, order, index):
        idx = order[index]
        key = jax.random.fold_in(jax.random.key(cfg.seed), state.step)
        batch = augment(images[idx], key, cfg.augment, cfg.max_shift)
        return step_on_shard(state, batch, labels[idx])

    return jax.jit(train_step, donate_argnums=0)


def _batch_correct(objective: Objective, model, features, labels) -> jax.Array:
    """Correct predictions in the batch by the objective's scorer (NaN when it has none)."""
    if objective.accuracy == "argmax":
        scores = model.classifier(features)
    elif objective.accuracy == "cosine":
        scores = model.class_weights(features)
    elif objective.accuracy == "centers":
        c = model.centers()
        scores = -jnp.sum((features[:, None, :] - c[None]) ** 2, axis=-1)
    else:
        return jnp.asarray(jnp.nan)
    return jnp.sum(jnp.argmax(scores, axis=1) == labels).astype(jnp.float32)


# ----------------------------------------------------------------------------- evaluation


def make_embed(graphdef, batch_size: int = 1000):
    @jax.jit
    def embed_chunk(graph, images):
        model, _ = nnx.merge(graphdef, graph)
        return model(images)

    def embed(graph, images: np.ndarray) -> np.ndarray:
        out = []
        for start in range(0, len(images), batch_size):
            chunk = images[start : start + batch_size]
            pad = batch_size - len(chunk)
            if pad:  # one compiled shape: pad the last chunk
                chunk = np.concatenate([chunk, np.zeros((pad, *chunk.shape[1:]), chunk.dtype)])
            out.append(np.asarray(embed_chunk(graph, chunk))[: batch_size - pad])
        return np.concatenate(out)

    return embed


def evaluate(cfg: Config, model: EmbeddingModel, train_f, train_y, test_f, test_y, num_classes):
    objective = cfg.objective
    result: dict[str, float] = {}
    if objective.classifier:
        result["argmax_accuracy"] = metrics.argmax_accuracy(model.classifier(test_f), test_y)
    if objective.class_weights:
        result["cosine_accuracy"] = metrics.argmax_accuracy(model.class_weights(test_f), test_y)
    if objective.centers:
        result["center_accuracy"] = metrics.nearest_center_accuracy(test_f, test_y, model.centers())
    means = metrics.class_means(train_f, train_y, num_classes)
    result["class_mean_accuracy"] = metrics.nearest_center_accuracy(test_f, test_y, means)
    result["knn_accuracy"] = metrics.knn_accuracy(test_f, test_y, train_f, train_y, k=cfg.knn_k)
    retrieval = metrics.retrieval_metrics(test_f, test_y, metric=objective.metric)
    result["precision_at_1"] = retrieval["precision_at_1"]
    result["map_at_r"] = retrieval["map_at_r"]
    result["intra_inter_ratio"] = metrics.intra_inter_distance_ratio(test_f, test_y)
    primary = {
        "argmax": "argmax_accuracy",
        "cosine": "cosine_accuracy",
        "centers": "center_accuracy",
        "class_means": "class_mean_accuracy",
    }[objective.accuracy]
    result["accuracy"] = result[primary]
    return {k: float(v) for k, v in result.items()}


# ----------------------------------------------------------------------------- the run


class TrainingDiverged(RuntimeError):
    pass


def _epoch_order(cfg: Config, labels: np.ndarray, epoch: int, steps: int) -> np.ndarray:
    """[steps, batch] indices of one epoch, a pure function of (seed, epoch)."""
    seed = cfg.seed * 100_003 + epoch
    if cfg.objective.balanced_batches:
        batches = data_lib.class_balanced_batches(
            labels, cfg.batch_size, cfg.samples_per_class, seed, num_batches=steps
        )
        order = np.stack([np.asarray(b) for b in batches])
    else:
        permutation = np.random.default_rng(seed).permutation(len(labels))
        order = permutation[: steps * cfg.batch_size].reshape(steps, cfg.batch_size)
    return order.astype(np.int32)


def _checkpoint_manager(directory: pathlib.Path, keep: int) -> ocp.CheckpointManager:
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


def _summary_table(rows: list[dict]) -> str:
    keys = [
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
        "seconds",
    ]
    keys = [k for k in keys if any(k in r for r in rows)]
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for r in rows:
        cells = []
        for k in keys:
            v = r.get(k, "")
            cells.append(f"{v:.4f}" if isinstance(v, float) else str(v))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run(cfg: Config) -> dict:
    """Trains and evaluates; returns the final summary (also written to OUT/summary.json)."""
    started = time.time()
    out = cfg.out_dir()
    out.mkdir(parents=True, exist_ok=True)
    log = (lambda *a: None) if cfg.quiet else (lambda *a: print(*a, flush=True))
    if cfg.quiet:
        import tensorflow_datasets as tfds

        tfds.disable_progress_bar()  # its one-time dataset preparation bars
    dataset = data_lib.load_dataset(cfg.dataset, data_dir=cfg.data_dir, limit=cfg.limit)
    log(
        f"data: {dataset.source}: {len(dataset.train_labels)} train, "
        f"{len(dataset.test_labels)} test"
    )
    all_class_names = dataset.class_names
    open_data = _open_set_data(cfg, dataset)
    if open_data is not None:
        dataset = open_data.seen
        held_out = ", ".join(f"{c} ({all_class_names[c]})" for c in open_data.split.held_out)
        log(f"open set: training on {dataset.num_classes} classes, held out: {held_out}")
    num_classes = dataset.num_classes
    side = min(dataset.train_images.shape[1:3])
    if cfg.max_shift >= side:
        raise SystemExit(f"error: --max-shift must be < the image side {side}, got {cfg.max_shift}")
    if cfg.objective.balanced_batches:
        cfg = dataclasses.replace(cfg, samples_per_class=_samples_per_class(cfg, num_classes))
    steps = len(dataset.train_labels) // cfg.batch_size
    if steps < 1:
        raise SystemExit(
            f"error: {len(dataset.train_labels)} training examples make no batch of "
            f"{cfg.batch_size}; raise --limit or lower --batch-size"
        )

    model = build_model(cfg, dataset.train_images.shape[1:], num_classes)
    optimizer = nnx.Optimizer(model, build_optimizer(cfg, steps), wrt=nnx.Param)
    model.eval()
    eval_graphdef, _ = nnx.split((model, optimizer))
    model.train()
    graphdef, graph = nnx.split((model, optimizer))
    state = place_on_devices(cfg, initial_state(graph, cfg.objective))
    devices = _num_devices(cfg)
    conv = "" if cfg.dataset == "cifar10" else f"; convolutions: {resolve_conv(cfg.conv)}"
    log(
        f"devices: {devices} × {jax.devices()[0].platform}, {cfg.batch_size // devices} images "
        f"each{conv}"
    )

    config_path = out / "config.json"
    metrics_path = out / "metrics.jsonl"
    manager = _checkpoint_manager(out / "checkpoints", cfg.keep_checkpoints)
    start_epoch = 0
    history: list[dict] = []
    if cfg.resume and manager.latest_step() is not None:
        saved = json.loads(config_path.read_text())
        current = cfg.to_json()
        # A flag added after the run started was at its default there.
        defaults = Config(dataset=cfg.dataset).to_json()
        saved = {**{k: defaults[k] for k in current.keys() - saved.keys()}, **saved}
        saved["out"] = current["out"]  # a run directory may move (another clone, a copy)
        if saved != current:
            diff = {k for k in saved if saved[k] != current.get(k)}
            raise SystemExit(f"error: --resume with a different configuration ({sorted(diff)})")
        latest = manager.latest_step()
        try:
            state = manager.restore(latest, args=ocp.args.StandardRestore(state))
        except ValueError as error:  # orbax: tree structure, shape or dtype mismatch
            reason = str(error).strip().splitlines()[0]  # the rest is pages of tree dumps
            raise SystemExit(
                f"error: --resume cannot read the epoch-{latest} checkpoint in "
                f"{manager.directory}: its train state does not match this version's "
                f"({reason}); it was written by another version of mlx_jax: rerun that "
                "version to finish it, or start afresh in another --out"
            ) from error
        start_epoch = latest
        history = [json.loads(line) for line in metrics_path.read_text().splitlines()]
        history = [h for h in history if h["epoch"] <= latest]
        log(f"resumed from epoch {latest} (step {int(state.step)})")
    elif manager.latest_step() is not None:
        raise SystemExit(
            f"error: {out} holds checkpoints of an earlier run; pass --resume to continue it "
            "or choose another --out"
        )
    config_path.write_text(json.dumps(cfg.to_json(), indent=2))
    metrics_path.write_text("".join(json.dumps(h) + "\n" for h in history))

    train_step = make_train_step(cfg, graphdef)
    embed = make_embed(eval_graphdef)
    images = place_on_devices(cfg, dataset.train_images)
    labels = place_on_devices(cfg, dataset.train_labels)
    eval_n = min(cfg.eval_train_limit, len(dataset.train_labels))
    frames: list[pathlib.Path] = sorted((out / "plots").glob("epoch_*.png"))
    frames = [f for f in frames if int(f.stem.split("_")[1]) <= start_epoch]

    for epoch in range(start_epoch + 1, cfg.epochs + 1):
        if _next_epoch_passes_time_box(cfg, started, history):
            log(
                f"stopped before epoch {epoch}: it would end after --stop-after-minutes "
                f"{cfg.stop_after_minutes:g}; continue with --resume"
            )
            return {"stopped_after": epoch - 1, "history": history}
        t0 = time.time()
        order = place_on_devices(cfg, _epoch_order(cfg, dataset.train_labels, epoch, steps))
        totals = jnp.zeros(5)
        bar = tqdm(
            range(steps),
            desc=f"epoch {epoch}/{cfg.epochs}",
            disable=cfg.quiet or None,  # None: no bar when stderr is not a terminal
            leave=False,
            dynamic_ncols=True,
        )
        for i in bar:
            state, stats = train_step(state, images, labels, order, i)
            totals = totals + stats
            if (i + 1) % cfg.progress_every == 0 or i + 1 == steps:
                loss_sum, correct, good = (float(v) for v in totals[:3])
                if bool(state.health.diverged):
                    bar.close()
                    _report_divergence(cfg, state, manager, epoch)
                acc = correct / max(good * cfg.batch_size, 1)
                bar.set_postfix(
                    loss=f"{loss_sum / max(good, 1):.4f}",
                    **({} if math.isnan(acc) else {"acc": f"{acc:.4f}"}),
                )
        bar.close()
        loss_sum, correct, good, norm_sum, clipped = (float(v) for v in totals)
        train_seconds = time.time() - t0

        model, _ = nnx.merge(eval_graphdef, state.graph)
        train_f = embed(state.graph, dataset.train_images[:eval_n])
        test_f = embed(state.graph, dataset.test_images)
        train_y, test_y = dataset.train_labels[:eval_n], dataset.test_labels
        row = {"epoch": epoch, "step": int(state.step), "loss": loss_sum / max(good, 1)}
        if not math.isnan(correct):
            row["train_accuracy"] = correct / max(good * cfg.batch_size, 1)
        # Mean pre-clip gradient norm and the share of steps --clip-norm scaled down: a share
        # near 1 means the step size is set by the clip, not by --lr (BENCHMARKS.md, standalone).
        row["grad_norm"] = norm_sum / max(good, 1)
        row["clipped_fraction"] = clipped / max(good, 1)
        row.update(evaluate(cfg, model, train_f, train_y, test_f, test_y, num_classes))
        frame = out / "plots" / f"epoch_{epoch:03d}.png"
        frame.parent.mkdir(exist_ok=True)
        title = f"{cfg.dataset} {cfg.loss} feat={cfg.feat_dim} epoch {epoch}"
        if open_data is None:
            viz.train_test_figure(
                train_f,
                train_y,
                test_f,
                test_y,
                frame,
                title=title,
                class_names=dataset.class_names,
            )
        else:
            row.update(
                _evaluate_open_set(
                    cfg,
                    open_data,
                    embed,
                    state.graph,
                    train_f,
                    test_f,
                    frame,
                    title,
                    all_class_names,
                )
            )
        frames.append(frame)
        row["seconds"] = time.time() - t0
        row["train_seconds"] = train_seconds
        # The epoch's line before its checkpoint: a run killed between the two resumes from
        # the previous checkpoint and drops the line, instead of skipping the epoch's metrics.
        history.append(row)
        with metrics_path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        manager.save(
            epoch, args=ocp.args.StandardSave(state), metrics={"accuracy": row["accuracy"]}
        )
        manager.wait_until_finished()
        log(
            f"epoch {epoch}: loss {row['loss']:.4f} accuracy {row['accuracy']:.4f} "
            f"knn {row['knn_accuracy']:.4f} P@1 {row['precision_at_1']:.4f} "
            f"({row['seconds']:.0f}s)"
        )
        if cfg.stop_after is not None and epoch >= cfg.stop_after and epoch < cfg.epochs:
            log(f"stopped after epoch {epoch} (--stop-after); continue with --resume")
            return {"stopped_after": epoch, "history": history}

    if frames:
        viz.make_gif(frames, out / "features.gif")
    best = max(history, key=lambda h: h["accuracy"]) if history else {}
    summary = {
        "dataset": cfg.dataset,
        "loss": cfg.loss,
        "feat_dim": cfg.feat_dim,
        "epochs": len(history),
        "final": history[-1] if history else {},
        "best": best,
        "data_source": dataset.source,
        "devices": _num_devices(cfg),  # of this (last) segment; the math is the same on any
        "checkpoints": str((out / "checkpoints").resolve()),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    table = _summary_table(history)
    (out / "summary.md").write_text(table + "\n")
    log(table)
    return summary


def _next_epoch_passes_time_box(cfg: Config, started: float, history: list[dict]) -> bool:
    """Whether an epoch as long as the last one (resumed ones count) would end past the time box.

    Without a finished epoch there is no estimate, so a fresh run always trains its first epoch.
    """
    if cfg.stop_after_minutes is None or not history:
        return False
    return time.time() - started + history[-1]["seconds"] > 60 * cfg.stop_after_minutes


def _samples_per_class(cfg: Config, num_classes: int) -> int:
    """m of class-balanced batches: --samples-per-class, else the smallest m >= 4 (FaceNet and
    PML's MPerClassSampler use few per class) that divides the batch into 2 to ``num_classes``
    classes (a batch needs two classes for negatives)."""
    if cfg.samples_per_class is not None:
        m = cfg.samples_per_class
        if cfg.batch_size // m > num_classes:
            raise SystemExit(
                f"error: --batch-size {cfg.batch_size} / --samples-per-class {m} = "
                f"{cfg.batch_size // m} classes per batch, but the training set has "
                f"{num_classes}; raise --samples-per-class"
            )
        return m
    for m in range(4, cfg.batch_size // 2 + 1):
        if cfg.batch_size % m == 0 and 2 <= cfg.batch_size // m <= num_classes:
            return m
    raise SystemExit(
        f"error: --batch-size {cfg.batch_size} cannot be split into 2 to {num_classes} classes "
        "of at least 4 samples each; choose another --batch-size or set --samples-per-class"
    )


def _open_set_data(cfg: Config, dataset: data_lib.Dataset) -> open_set_lib.OpenSetData | None:
    """The open-set split of --open-set / --held-out-classes, or None (closed set)."""
    if cfg.open_set is None and cfg.held_out_classes is None:
        return None
    try:
        split = open_set_lib.class_split(
            dataset.num_classes,
            open_set=cfg.open_set,
            held_out=cfg.held_out_classes,
            class_names=dataset.class_names,
        )
        return open_set_lib.split_dataset(dataset, split)
    except ValueError as err:
        raise SystemExit(f"error: {err}") from None


def _evaluate_open_set(
    cfg: Config,
    data: open_set_lib.OpenSetData,
    embed,
    graph,
    seen_train_f: np.ndarray,
    seen_test_f: np.ndarray,
    frame: pathlib.Path,
    title: str,
    class_names: Sequence[str],
) -> dict[str, float]:
    """Open-set metrics on the held-out classes; the feature plot with them hollow; ROC PNG.

    Enrollment images per held-out class match the seen classes' (the evaluation subset of
    ``--eval-train-limit`` training images spread over the seen classes)."""
    seen_train_y = data.seen_train_original[: len(seen_train_f)]
    seen_test_y = data.seen_test_original
    enroll_n = len(seen_train_f) * len(data.split.held_out) // len(data.split.seen)
    held_train_f = embed(graph, data.held_out_train_images[:enroll_n])
    held_train_y = data.held_out_train_labels[:enroll_n]
    held_test_f = embed(graph, data.held_out_test_images)
    held_test_y = data.held_out_test_labels
    result, (roc_far, roc_val) = open_set_lib.evaluate_open_set(
        metric=cfg.objective.metric,
        seen_train=seen_train_f,
        seen_train_labels=seen_train_y,
        seen_test=seen_test_f,
        seen_test_labels=seen_test_y,
        held_out_train=held_train_f,
        held_out_train_labels=held_train_y,
        held_out_test=held_test_f,
        held_out_test_labels=held_test_y,
    )
    viz.train_test_figure(
        np.concatenate([seen_train_f, held_train_f]),
        np.concatenate([seen_train_y, held_train_y]),
        np.concatenate([seen_test_f, held_test_f]),
        np.concatenate([seen_test_y, held_test_y]),
        frame,
        title=title,
        class_names=class_names,
        train_hollow=np.arange(len(seen_train_f) + len(held_train_f)) >= len(seen_train_f),
        test_hollow=np.arange(len(seen_test_f) + len(held_test_f)) >= len(seen_test_f),
        hollow_label="held out (hollow)",
    )
    held_out = ", ".join(class_names[c] for c in data.split.held_out)
    viz.roc_figure(
        {f"held-out classes ({held_out})": (roc_far, roc_val)},
        frame.parent.parent / "roc.png",
        title=f"{title}\nheld out: VAL@FAR=1e-3 {result['open_val_at_far']:.3f}, "
        f"AUC {result['open_auc']:.4f}",
    )
    return result


def _report_divergence(cfg: Config, state: TrainState, manager, epoch: int):
    h = state.health
    terms = ", ".join(f"{k}={float(v):.6g}" for k, v in h.last_terms.items())
    latest = manager.latest_step()
    where = (
        f"{cfg.out_dir() / 'checkpoints' / str(latest)} (end of epoch {latest})"
        if latest is not None
        else "none (diverged before the first checkpoint)"
    )
    bad_loss = float(h.bad_loss)
    what = (
        f"exploded to {bad_loss:.3g} (beyond --max-loss {cfg.max_loss:g})"
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


def main(dataset: str, argv: Sequence[str] | None = None) -> int:
    reuse_freed_memory()  # before JAX starts its CPU backend (experiments/allocator.py)
    use_one_device_per_core()  # likewise: the step fills every core (experiments/cpu_devices.py)
    cfg = config_from_args(dataset, argv)
    try:
        run(cfg)
    except TrainingDiverged as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except data_lib.DatasetUnavailableError as err:
        print(f"error: {err}", file=sys.stderr)
        return 3
    return 0
