"""The command line of ``python -m experiments.{mnist,fashion_mnist,cifar10}``.

The flags are generated from :class:`experiments.config.Config` (one flag per field, help and
choices from the field's metadata). :func:`main` applies the process tuning of
:mod:`experiments.tuning` (unless ``--no-process-tuning``), calls
:func:`experiments.driver.train_and_evaluate`, and maps its exceptions to one-line messages
and exit codes (:data:`EXIT_CODES`). Ctrl-C or SIGTERM stops the run at its next safe point
(:class:`StopRequest`) and prints the command that continues it from its last checkpoint.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shlex
import signal
import sys
import typing
from collections.abc import Sequence
from typing import Any

from experiments import distributed, tuning
from experiments.config import Config, ConfigError, LossConfig, flag

# Set by experiments.launch (which imports it from here): the command that resumes its run.
RESUME_COMMAND_ENV = "MLX_JAX_RESUME_COMMAND"

# Exit codes: 2 bad configuration (as argparse), 3 no data, 4 diverged or refused to resume,
# 128 + N stopped by signal N (the shell's convention: Ctrl-C gives 130, SIGTERM 143).
EXIT_CODES = {"config": 2, "data": 3, "run": 4}


def _field_type(owner: type, field: dataclasses.Field) -> Any:
    hint = typing.get_type_hints(owner)[field.name]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if args and typing.get_origin(hint) is not tuple else hint


def _help(field: dataclasses.Field) -> str:
    text = field.metadata["help"]
    if field.default is None or isinstance(field.default, bool):
        return text  # the help says what "unset" means; a switch has no value to show
    return (
        f"{text} (default: {field.default:g})"
        if isinstance(field.default, float)
        else f"{text} (default: {field.default})"
    )


def _add_field(parser: argparse.ArgumentParser, owner: type, field: dataclasses.Field) -> None:
    meta = field.metadata
    kind = _field_type(owner, field)
    kwargs: dict[str, Any] = {"dest": field.name, "help": _help(field)}
    if meta.get("metavar"):
        kwargs["metavar"] = meta["metavar"]
    choices = meta.get("choices")
    if choices is not None:
        kwargs["choices"] = list(choices() if callable(choices) else choices)
    if field.name == "resume":
        kwargs.update(nargs="?", const="yes", default="no", metavar="auto")
        kwargs["help"] = field.metadata["help"]
    elif kind is bool:
        action = argparse.BooleanOptionalAction if field.default else "store_true"
        kwargs.update(action=action, default=field.default)
    elif typing.get_origin(kind) is tuple:
        kwargs.update(nargs="+", type=typing.get_args(kind)[0], default=field.default)
    else:
        kwargs.update(type=kind, default=field.default)
    names = [flag(field.name)]
    if field.name == "loss":
        from experiments.objectives import OBJECTIVES

        kwargs["help"] = "the loss to train (default: standalone); " + "; ".join(
            f"{k}: {o.help}" for k, o in OBJECTIVES.items()
        )
    parser.add_argument(*names, **kwargs)


def build_parser(dataset: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=f"python -m experiments.{dataset}",
        description=f"Train and evaluate a metric-learning loss on {dataset} (LeNet++ for "
        "MNIST-likes, a small ResNet for CIFAR-10). Writes config.json, metrics.jsonl (one line "
        "per epoch), summary.json/summary.md, features.png, features.gif and orbax checkpoints "
        "to the workdir, and prints the workdir first and last.",
    )
    parser.add_argument(
        "--workdir",
        "--out",
        dest="workdir",
        metavar="DIR",
        default=None,
        help="run folder (default: runs/DATASET-LOSS-featD)",
    )
    for owner in (Config, LossConfig):
        for field in dataclasses.fields(owner):
            if field.name != "loss_config" and field.metadata.get("cli", True):
                _add_field(parser, owner, field)
    return parser


def parse(dataset: str, argv: Sequence[str] | None = None) -> tuple[Config, str]:
    """(config, workdir) from the command line; no JAX work, so process tuning can follow.

    Raises:
      SystemExit: argparse's own errors (unknown flag, bad choice, --help).
      ConfigError: a value out of range (named by its flag).
    """
    args = vars(build_parser(dataset).parse_args(argv))
    workdir = args.pop("workdir")
    loss_names = {f.name for f in dataclasses.fields(LossConfig)}
    loss_config = LossConfig(**{k: args.pop(k) for k in loss_names})
    if args.get("held_out_classes") is not None:
        args["held_out_classes"] = tuple(args["held_out_classes"])
    config = Config(dataset=dataset, loss_config=loss_config, **args).validate()
    return config, workdir or config.default_workdir()


def config_from_args(dataset: str, argv: Sequence[str] | None = None) -> Config:
    """The :class:`Config` of a command line (tests, notebooks); see :func:`parse`."""
    return parse(dataset, argv)[0]


class StopRequest:
    """The CLI's Ctrl-C and SIGTERM handler: the first signal asks the run to stop at its next
    safe point (between steps or evaluation chunks, never inside a checkpoint save, where an
    exception could land in a library's cleanup); a second one stops it at once."""

    def __init__(self) -> None:
        self.signum: int | None = None

    def __call__(self, signum: int, frame: Any) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt  # asked twice: do not wait for a safe point
        self.signum = signum

    def check(self) -> None:
        """Raises KeyboardInterrupt once a stop was requested (the driver's ``check_stop``)."""
        if self.signum is not None:
            raise KeyboardInterrupt


def resume_command(dataset: str, argv: Sequence[str]) -> str:
    """The command that continues the run of ``argv`` from its last checkpoint (a launcher's
    own, when :mod:`experiments.launch` started this process)."""
    launched = os.environ.get(RESUME_COMMAND_ENV)
    if launched:
        return launched
    kept = [a for a in argv if a != "--resume" and not a.startswith("--resume=")]
    return shlex.join(["python", "-m", f"experiments.{dataset}", *kept, "--resume"])


def main(dataset: str, argv: Sequence[str] | None = None) -> int:
    """Runs the experiment of the command line; returns the process exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        config, workdir = parse(dataset, argv)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_CODES["config"]
    tuning.apply(config.process_tuning)  # before JAX starts its backend
    try:
        grid = distributed.process_grid(
            config.coordinator_address, config.num_processes, config.process_id
        )
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_CODES["config"]
    distributed.initialize(grid)  # also before the backend starts
    from experiments import driver  # imports JAX: after the tuning
    from mlx_jax import data as data_lib

    stop = StopRequest()
    # A signal the process was started with ignored (a background job's SIGINT) stays ignored.
    previous = {
        s: signal.signal(s, stop)
        for s in (signal.SIGINT, signal.SIGTERM)
        if signal.getsignal(s) is not signal.SIG_IGN
    }
    # Processes must stop at the same step: a lone stop leaves the others in a collective.
    check_stop = distributed.agreed_stop(lambda: stop.signum) if grid.multi_process else stop.check
    try:
        driver.train_and_evaluate(config, workdir, check_stop=check_stop)
    except KeyboardInterrupt as err:
        signum = stop.signum or getattr(err, "signum", None) or signal.SIGINT
        source = "" if stop.signum or not getattr(err, "signum", None) else " on another process"
        last = driver.latest_checkpoint(workdir)
        where = (
            f"the last checkpoint is epoch {last[0]} in {last[1]}"
            if last is not None
            else "no checkpoint was written yet (the first epoch had not finished)"
        )
        print(
            f"\nstopped by {signal.Signals(signum).name}{source}; {where}.\n"
            f"continue with: {resume_command(dataset, argv)}",
            file=sys.stderr,
        )
        return 128 + signum
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_CODES["config"]
    except data_lib.DatasetUnavailableError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_CODES["data"]
    except driver.RunError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_CODES["run"]
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    return 0
