"""The experiments' one configuration source: :class:`Config`, a frozen dataclass.

Every field carries its command-line help, its allowed values and its checks in its metadata;
:mod:`experiments.cli` generates the command line from it, and :meth:`Config.validate` checks
it the same way for the CLI and for Python callers of
:func:`experiments.driver.train_and_evaluate`. A field marked ``run_setting`` changes how a run
is carried out (where the data lives, how many devices, when to stop) but not what it
computes, so ``--resume`` ignores it when it compares a run's stored configuration.

Fork it like flax/examples' configs: change a default here and both the CLI and the Python
entry point follow.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable, Sequence
from typing import Any

from mlx_jax.losses.center import LOG_EPS

DATASETS = ("mnist", "fashion_mnist", "cifar10")
RESUME_MODES = ("no", "yes", "auto")


class ConfigError(ValueError):
    """A configuration value is out of range or inconsistent; the message names its flag."""


def option(
    default: Any,
    help: str,
    *,
    choices: Sequence[Any] | Callable[[], Sequence[Any]] | None = None,
    minimum: float | None = None,
    above: float | None = None,
    run_setting: bool = False,
    cli: bool = True,
    metavar: str | None = None,
) -> Any:
    """A dataclass field with the metadata the CLI and :meth:`Config.validate` read.

    ``minimum``: value >= minimum; ``above``: value > above (NaN fails both). None values of
    optional fields pass. ``choices`` may be a callable (resolved lazily: the loss names live
    in :mod:`experiments.objectives`, which imports this module)."""
    metadata = {
        "help": help,
        "choices": choices,
        "minimum": minimum,
        "above": above,
        "run_setting": run_setting,
        "cli": cli,
        "metavar": metavar,
    }
    return dataclasses.field(default=default, metadata=metadata)


# ---- default recipes
# A recipe field left unset (None) takes its value from the loss's family recipe: seed 001's
# softmax-supervised losses, its center-only loss, and every other loss. The families' recipes
# are chosen on a validation split (``python -m experiments.recipes select``; BENCHMARKS.md,
# accuracy). Keys: Config field names, ``loss_config.NAME`` for loss settings.
FAMILIES = {"softmax": ("xent", "cent"), "center": ("standalone",)}
BASE_RECIPE: dict[str, Any] = {
    "epochs": 20,
    "augment": "none",
    "max_shift": 2,
    "clip_norm": 5.0,
    "loss_config.inter_eps": LOG_EPS,
}
# The candidates that ``python -m experiments.recipes select`` chose (OUT/select/table.md;
# BENCHMARKS.md): softmax "plain", mean validation accuracy 0.9073 against 0.9051 (±1 px
# shifts) and 0.9006 (±2 px); center "clip10-eps1", 0.9114 against 0.9089 (±1 px) and
# 0.8995 (±2 px).
FAMILY_RECIPES: dict[str, dict[str, Any]] = {
    "softmax": {"epochs": 10, "augment": "none"},
    "center": {"epochs": 10, "augment": "none", "clip_norm": 10.0, "loss_config.inter_eps": 1.0},
}


def family(loss: str) -> str | None:
    """The recipe family of ``loss`` (a key of :data:`FAMILIES`), or None."""
    return next((name for name, members in FAMILIES.items() if loss in members), None)


def recipe(loss: str) -> dict[str, Any]:
    """The values unset recipe fields take for ``loss``: its family's recipe over the base."""
    return {**BASE_RECIPE, **FAMILY_RECIPES.get(family(loss), {})}


def _recipe_help(key: str) -> str:
    def show(value: Any) -> str:
        return f"{value:g}" if isinstance(value, float) else str(value)

    parts = [
        f"{name} family ({', '.join(FAMILIES[name])}) {show(recipe(FAMILIES[name][0])[key])}"
        for name in FAMILIES
    ]
    return (
        "unset: the loss family's recipe: "
        + ", ".join(parts)
        + (f", other losses {show(BASE_RECIPE[key])}")
    )


def _loss_names() -> list[str]:
    from experiments.objectives import OBJECTIVES

    return list(OBJECTIVES)


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """Loss hyperparameters; ``None`` means the loss's own default (see mlx_jax.losses)."""

    weight_cent: float = option(
        1.0, "cent: λ of softmax + λ·center loss (seed 001: 1.0)", minimum=0.0
    )
    alpha: float = option(
        0.5, "center learning rate α of the α rule (Wen et al. 2016: 0.5)", minimum=0.0
    )
    weight_intra: float = option(1.0, "standalone: weight of the intra term (seed 001: 1.0)")
    weight_inter: float = option(0.1, "standalone: weight of the inter term (seed 001: 0.1)")
    inter_eps: float | None = option(
        None,
        "standalone: ε in the inter term's log(‖x_i − x_j‖² + ε); a pair's gradient is at "
        f"most 1/sqrt(ε) (base: {LOG_EPS:g}, pytorch-center-loss's distance floor); "
        + _recipe_help("loss_config.inter_eps"),
        above=0.0,
    )
    margin: float | None = option(
        None,
        "loss margin (contrastive m, triplet α, triplet-center m, circle m, CosFace/ArcFace and "
        "sub-center m, lifted negative margin, angular α in degrees, margin-loss α, tuplet β "
        "in degrees, Proxy-Anchor δ, SoftTriple δ); unset: the loss's own default",
    )
    scale: float | None = option(
        None,
        "loss scale (circle γ, CosFace/ArcFace/SphereFace/sub-center/tuplet/L-Softmax s, "
        "NT-Xent/SupCon/normalized-softmax temperature τ, Proxy-Anchor α, Proxy-NCA scale, "
        "SoftTriple λ); unset: the loss's own default",
    )
    mining: str = option(
        "semihard",
        "triplet mining",
        choices=("semihard", "batch_hard", "all", "semihard_band"),
    )


@dataclasses.dataclass(frozen=True)
class Config:
    """One experiment: what is trained and evaluated, and how the run is carried out."""

    dataset: str = option("mnist", "dataset", choices=DATASETS, cli=False)
    loss: str = option("standalone", "the loss to train", choices=_loss_names)
    feat_dim: int = option(2, "embedding dimension (seed 001: 2, 128)", minimum=1)
    epochs: int | None = option(
        None, "training epochs (cosine schedule); " + _recipe_help("epochs"), minimum=1
    )
    batch_size: int = option(128, "batch size (seed 001: 128)", minimum=1)
    lr: float = option(0.01, "peak learning rate (seed 001: 0.01)", above=0.0)
    momentum: float = option(0.9, "SGD Nesterov momentum (pytorch-center-loss)", minimum=0.0)
    weight_decay: float = option(5e-4, "L2 weight decay (pytorch-center-loss)", minimum=0.0)
    warmup_epochs: float = option(
        0.5, "linear warm-up length in epochs before the cosine decay to 0", minimum=0.0
    )
    clip_norm: float | None = option(
        None,
        "clip gradients to this global norm; each epoch's metrics give the mean norm before "
        "clipping (grad_norm) and the share of steps clipped (clipped_fraction); "
        + _recipe_help("clip_norm"),
        above=0.0,
    )
    augment: str | None = option(
        None,
        "random augmentation of training batches: shift moves each image by up to "
        "--max-shift pixels; shift-flip also mirrors half of them (clothes, CIFAR; not "
        "digits); seed 001 uses none; " + _recipe_help("augment"),
        choices=("none", "shift", "shift-flip"),
    )
    max_shift: int | None = option(
        None, "largest --augment shift in pixels; " + _recipe_help("max_shift"), minimum=0
    )
    center_update: str = option(
        "alpha",
        "alpha: Wen et al.'s α rule; sgd: centers as parameters (pytorch-center-loss, SGD at "
        "--center-lr, gradients scaled by 1/weight_cent)",
        choices=("alpha", "sgd"),
    )
    center_lr: float = option(0.5, "lr of the centers with --center-update sgd", above=0.0)
    samples_per_class: int | None = option(
        None,
        "pair/triplet losses: batches of batch_size/m classes, m images each; unset: the "
        "smallest m >= 4 dividing --batch-size with at most as many classes per batch as the "
        "dataset has (128 on 10 classes: 16)",
        minimum=1,
        metavar="M",
    )
    loss_config: LossConfig = dataclasses.field(default_factory=LossConfig)
    seed: int = option(0, "random seed (initialisation and data order)")
    limit: int | None = option(
        None, "use only the first N examples of each split (quick runs)", minimum=1, metavar="N"
    )
    val_size: int | None = option(
        None,
        "hold out the last N training images as a validation set: train on the rest and "
        "evaluate on them instead of the test set (choose recipes here; report test accuracy "
        "only for the final choice)",
        minimum=1,
        metavar="N",
    )
    eval_examples: int = option(
        2000,
        "test and training images evaluated after every epoch but the last (a fixed subset: "
        "the first N); the last epoch evaluates the whole test set and --eval-train-limit "
        "training images",
        minimum=1,
        metavar="N",
    )
    eval_train_limit: int = option(
        10_000,
        "training images embedded at the final evaluation (class means, kNN, plots)",
        minimum=1,
        metavar="N",
    )
    knn_k: int = option(5, "k of the k-NN accuracy", minimum=1)
    open_set: int | None = option(
        None,
        "open-set protocol: train without the last K classes and report retrieval, "
        "VAL@FAR=1e-3, ROC AUC and open-set identification on them (experiments/open_set.py)",
        minimum=2,
        metavar="K",
    )
    held_out_classes: tuple[int, ...] | None = option(
        None,
        "open-set protocol with these held-out class ids instead of the last K",
        metavar="CLASS",
    )
    width: int = option(32, "LeNet++ first-stage channels (paper: 32)", minimum=1)
    init: str = option(
        "flax",
        "LeNet++ initialisation: flax (LeCun normal, zero bias) or torch (PyTorch's uniform "
        "±1/sqrt(fan_in) weights and biases, as seed 001's model)",
        choices=("flax", "torch"),
    )
    max_loss: float = option(
        1e6,
        "a step whose loss is non-finite or larger than this in magnitude stops the run as "
        "diverged; the state stays at the last good step",
        above=0.0,
    )
    # ---- run settings: how the run is carried out, not what it computes
    data_dir: str | None = option(
        None,
        "an existing directory with the dataset's IDX files, a CIFAR-10 tarball or a TFDS "
        "data_dir (unset: $TFDS_DATA_DIR or ~/tensorflow_datasets; see mlx_jax.data)",
        run_setting=True,
        metavar="DIR",
    )
    create_data_dir: bool = option(
        False,
        "create --data-dir if it does not exist and prepare the dataset there",
        run_setting=True,
    )
    resume: str = option(
        "no",
        "--resume continues from the newest checkpoint in the workdir (an error when there "
        "is none); --resume=auto continues if there is one and starts afresh otherwise",
        choices=RESUME_MODES,
        run_setting=True,
    )
    conv: str = option(
        "auto",
        "LeNet++'s convolution kernels (same math): xla (XLA's own), onednn (oneDNN's, through "
        "XLA's FFI; CPU only, needs the onednn extra and a C++ compiler for a one-time build) "
        "or auto (onednn where it can run, else xla)",
        choices=("auto", "xla", "onednn"),
        run_setting=True,
    )
    devices: int | None = option(
        None,
        "train data-parallel on the first N local devices; the loss sees the whole batch "
        "(exact global negatives); unset: all of them, or the most that divide both the batch "
        "and the device count; a multi-process run uses every device of every process",
        minimum=1,
        run_setting=True,
        metavar="N",
    )
    coordinator_address: str | None = option(
        None,
        "multi-process run (jax.distributed): process 0's HOST:PORT, the same for every "
        "process (unset: $JAX_COORDINATOR_ADDRESS, else one process); see "
        "experiments/distributed.py and python -m experiments.launch",
        run_setting=True,
        metavar="HOST:PORT",
    )
    num_processes: int | None = option(
        None,
        "multi-process run: how many processes (unset: $JAX_NUM_PROCESSES, else 1)",
        minimum=1,
        run_setting=True,
        metavar="P",
    )
    process_id: int | None = option(
        None,
        "multi-process run: this process's index in [0, P) (unset: $JAX_PROCESS_ID)",
        minimum=0,
        run_setting=True,
        metavar="I",
    )
    keep_checkpoints: int = option(
        3, "newest checkpoints kept (plus the best)", minimum=1, run_setting=True
    )
    stop_after: int | None = option(
        None,
        "stop after this epoch (its checkpoint written); continue with --resume",
        minimum=1,
        run_setting=True,
        metavar="EPOCH",
    )
    stop_after_minutes: float | None = option(
        None,
        "time box: stop (checkpoint written) before an epoch that, going by the last epoch's "
        "duration, would end after MIN minutes from the start; a fresh run always trains its "
        "first epoch. Continue with --resume",
        above=0.0,
        run_setting=True,
        metavar="MIN",
    )
    process_tuning: bool = option(
        True,
        "CLI only: tune the process before JAX starts (experiments/tuning.py: glibc malloc "
        "reuse, one CPU device per core, a 10-minute collective timeout, oneDNN convolutions "
        "for --conv auto); --no-process-tuning leaves glibc's, JAX's and XLA's defaults",
        run_setting=True,
    )
    progress_every: int = option(
        20, "steps between progress reads", minimum=1, run_setting=True, cli=False
    )
    quiet: bool = option(
        False,
        "no progress bars or per-epoch lines; the run folder and the final table still print",
        run_setting=True,
    )

    @property
    def objective(self):
        from experiments.objectives import OBJECTIVES

        return OBJECTIVES[self.loss]

    def default_workdir(self) -> str:
        """``runs/DATASET-LOSS-featD``: where a run goes when no workdir is given."""
        return f"runs/{self.dataset}-{self.loss}-feat{self.feat_dim}"

    def with_recipe(self) -> Config:
        """This configuration with its unset recipe fields set from :func:`recipe`."""
        values = recipe(self.loss)
        top = {k: v for k, v in values.items() if "." not in k and getattr(self, k) is None}
        nested = {
            k.split(".", 1)[1]: v
            for k, v in values.items()
            if k.startswith("loss_config.")
            and getattr(self.loss_config, k.split(".", 1)[1]) is None
        }
        loss_config = dataclasses.replace(self.loss_config, **nested)
        return dataclasses.replace(self, loss_config=loss_config, **top)

    def validate(self) -> Config:
        """Sets the unset recipe fields (:meth:`with_recipe`), checks every field against its
        metadata and the cross-field rules, and returns the completed configuration.

        Raises:
          ConfigError: naming the flag, the allowed range or values, and the value given.
        """
        config = self.with_recipe()
        for owner in (config, config.loss_config):
            for field in dataclasses.fields(owner):
                if field.name == "loss_config":  # checked as its own dataclass
                    continue
                _check_field(field, getattr(owner, field.name))
        if config.held_out_classes is not None:
            if not config.held_out_classes:
                raise ConfigError("--held-out-classes needs at least one class id")
        balanced = config.objective.balanced_batches
        if balanced and config.samples_per_class and config.batch_size % config.samples_per_class:
            raise ConfigError(
                f"--batch-size ({config.batch_size}) must be a multiple of --samples-per-class "
                f"({config.samples_per_class}) for --loss {config.loss}"
            )
        if config.devices is not None and config.batch_size % config.devices:
            raise ConfigError(
                f"--batch-size ({config.batch_size}) must be divisible by --devices "
                f"({config.devices}) so that every device embeds an equal shard"
            )
        return config

    def to_json(self) -> dict:
        """What the run computes (run settings left out), as written to config.json."""
        data = dataclasses.asdict(self)
        for field in dataclasses.fields(self):
            if field.metadata.get("run_setting"):
                data.pop(field.name)
        return json.loads(json.dumps(data))  # tuples as lists, as read back from config.json


def flag(name: str) -> str:
    """The command-line flag of a field: ``feat_dim`` → ``--feat-dim``."""
    return "--" + name.replace("_", "-")


def _check_field(field: dataclasses.Field, value: Any) -> None:
    meta = field.metadata
    if value is None or not meta:
        return
    name = flag(field.name)
    choices = meta.get("choices")
    if choices is not None:
        allowed = list(choices() if callable(choices) else choices)
        if value not in allowed:
            raise ConfigError(f"{name} must be one of {allowed}, got {value!r}")
    if isinstance(value, bool) or not isinstance(value, int | float):
        return
    minimum, above = meta.get("minimum"), meta.get("above")
    if minimum is not None and not value >= minimum:  # `not >=` also refuses NaN
        raise ConfigError(f"{name} must be >= {minimum:g}, got {value}")
    if above is not None and not value > above:
        raise ConfigError(f"{name} must be > {above:g}, got {value}")
    if isinstance(value, float) and math.isinf(value) and field.name != "max_loss":
        raise ConfigError(f"{name} must be finite, got {value}")


def stored_differences(stored: dict, config: Config) -> dict[str, tuple[Any, Any]]:
    """Keys whose stored value (config.json of an earlier run) differs from ``config``'s:
    ``{key: (stored, new)}``; nested loss settings appear as ``loss_config.margin``.

    A key missing from ``stored`` was added to :class:`Config` after that run started; it
    ran at the default then, so the default stands in for it. Keys that are run settings now
    (older runs stored ``out`` and ``data_dir``) are ignored, and so is an unset
    ``samples_per_class`` (the run stored the number it chose)."""
    current = config.with_recipe().to_json()
    defaults = Config(dataset=config.dataset, loss=config.loss).with_recipe().to_json()
    diff: dict[str, tuple[Any, Any]] = {}
    for key, new in current.items():
        if key == "samples_per_class" and new is None:
            continue  # unset = the automatic choice, which the run stored as a number
        old = stored.get(key, defaults[key])
        if isinstance(new, dict):
            old = {**defaults[key], **(old or {})}
            diff.update({f"{key}.{k}": (old.get(k), v) for k, v in new.items() if old.get(k) != v})
        elif old != new:
            diff[key] = (old, new)
    return diff
