"""Run a grid of experiments (loss × dataset × feature dim) and write their result table.

    python -m experiments.campaign --out runs/all-losses --epochs 2
    python -m experiments.campaign --out runs/open-set --open-set 2 --epochs 1 --limit 20000
    python -m experiments.campaign --out runs/shift --epochs 20 --driver-args='--augment shift'

Every row runs the driver with its defaults plus the flags given here, in its own process
(``--jobs`` at a time, output in the row's log.txt), into ``OUT/DATASET-LOSS-featDIM``. A
finished row (summary.json present) is skipped and an unfinished one resumes from its
checkpoint, so a campaign can be stopped and continued; a row killed by a signal (XLA's abort
of a stuck collective, the OOM killer) restarts from its checkpoint up to ``--retries`` times;
``--stop-after-minutes`` is a time box (rows stop after their last epoch that fits; unfinished
ones are listed with the checkpoint to carry to another machine). OUT/table.md gets one line
per row with the command that reproduces it: closed-set metrics, or with ``--open-set K`` the
held-out-class metrics of ``experiments/open_set.py``; a row stopped short shows its last
epoch, marked "K of N, unfinished". ``python -m experiments.seed001`` is this runner on seed
001's rows.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shlex
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence

import orbax.checkpoint as ocp

from experiments.objectives import OBJECTIVES

DATASETS = ("fashion_mnist", "mnist", "cifar10")

Row = tuple[str, int, str]  # dataset, feature dim, loss


def run_dir(out: pathlib.Path, row: Row) -> pathlib.Path:
    dataset, dim, loss = row
    return out / f"{dataset}-{loss}-feat{dim}"


def row_flags(row: Row, extra: Sequence[str]) -> list[str]:
    dataset, dim, loss = row
    return ["--loss", loss, "--feat-dim", str(dim), *extra]


def command(row: Row, extra: Sequence[str]) -> str:
    return f"python -m experiments.{row[0]} " + " ".join(row_flags(row, extra))


# Signals that mean "a person stopped it" rather than "it crashed": never retried.
STOP_SIGNALS = frozenset({signal.SIGINT, signal.SIGTERM, signal.SIGHUP})
PYTHON = sys.executable  # the interpreter each row's process runs on


def run_rows(
    rows: Iterable[Row],
    out: pathlib.Path,
    extra: Sequence[str],
    stop_after_minutes: float | None = None,
    jobs: int = 1,
    retries: int = 2,
) -> None:
    """Runs every unfinished row (resuming a started one) until the time box is reached.

    Each row runs as its own ``python -m experiments.DATASET`` process, output in the row's
    ``log.txt``, ``jobs`` rows at a time, each pinned to its share of this process's CPUs (XLA
    sizes its thread pool from the CPU affinity). Why ``jobs=2`` on 2 cores: XLA:CPU keeps only
    ~1.4 of 2 cores busy in the small LeNet++ convolutions, so two one-core runs finish more
    rows per hour than two-core runs in turn.

    A row whose process is killed by a signal — XLA:CPU aborting a collective stuck past its
    timeout (SIGABRT; docs/notes.md), the kernel's OOM killer
    (SIGKILL), a crash — starts again from its newest checkpoint, up to ``retries`` times; the
    resumed row ends as an uninterrupted one would (the driver's resume is exact). An error
    the driver reports itself (bad flags, divergence, missing data: exit code > 0) and a stop
    by SIGINT/SIGTERM/SIGHUP are not retried: a rerun would repeat the first, and a person
    asked for the second. Rows that fail for good are listed in the RuntimeError raised at
    the end, after the others have run.

    ``stop_after_minutes`` is a time box: a row starts only if one epoch fits in the time left
    (estimated by :func:`epoch_minutes`; without any finished epoch yet there is no estimate and
    the row starts), and it gets the time left as its driver's ``--stop-after-minutes``, so it
    stops after its last epoch that fits. Rows left unfinished are listed with their newest
    checkpoint (:func:`newest_checkpoints`).
    """
    for name, value, least in (("jobs", jobs, 1), ("retries", retries, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ValueError(f"{name} must be an int >= {least}, got {value!r}")
    cpus = sorted(os.sched_getaffinity(0))
    if jobs > len(cpus):
        raise ValueError(f"jobs must be <= the {len(cpus)} CPUs this process may use, got {jobs}")
    start = time.time()
    rows = list(rows)
    pending = [row for row in rows if not (run_dir(out, row) / "summary.json").exists()]
    stopped = False

    def may_start(row: Row) -> bool:
        nonlocal stopped
        if stopped or not stop_after_minutes:
            return not stopped
        left = stop_after_minutes - (time.time() - start) / 60
        epoch = epoch_minutes(out, rows, row)
        if left <= 0 or (epoch is not None and epoch > left):
            fit = "" if epoch is None else f" (one epoch takes ~{epoch:.1f} min)"
            print(f"time box reached{fit}; run again to continue", flush=True)
            stopped = True
        return not stopped

    def driver_argv(row: Row) -> list[str]:
        directory = run_dir(out, row)
        argv = [*row_flags(row, extra), "--out", str(directory)]  # epoch lines to log.txt
        if stop_after_minutes:
            left = max(stop_after_minutes - (time.time() - start) / 60, 1e-3)
            argv += ["--stop-after-minutes", f"{left:.4g}"]
        return [*argv, "--resume=auto"]  # a started row continues, a new one starts

    free_slots = [cpus[slot::jobs] for slot in range(jobs)]
    running: list[tuple[subprocess.Popen, Row, list[int]]] = []
    failed: list[str] = []
    retried: dict[Row, int] = {}
    while running or (pending and may_start(pending[0])):
        while free_slots and pending and may_start(pending[0]):
            row, slot = pending.pop(0), free_slots.pop(0)
            directory = run_dir(out, row)
            directory.mkdir(parents=True, exist_ok=True)
            argv = [PYTHON, "-m", f"experiments.{row[0]}", *driver_argv(row)]
            print(f"== {' '.join(map(str, row))} on CPUs {slot}", flush=True)
            # Pinning runs in the forked child before exec; with every CPU there is nothing to pin.
            pin = None if slot == cpus else (lambda cpus=slot: os.sched_setaffinity(0, cpus))
            with open(directory / "log.txt", "a") as log:
                process = subprocess.Popen(
                    argv, stdout=log, stderr=subprocess.STDOUT, preexec_fn=pin
                )
            running.append((process, row, slot))
        time.sleep(0.5)
        for entry in [e for e in running if e[0].poll() is not None]:
            running.remove(entry)
            process, row, slot = entry
            free_slots.append(slot)
            code = process.returncode
            if code == 0:
                continue
            log_path = run_dir(out, row) / "log.txt"
            signum = _stopping_signal(code)
            crash = signum is not None and signum not in STOP_SIGNALS
            # real-time signals (34+) have no Signals member: named by number
            how = f"killed by SIG{_signal_name(signum)}" if signum else f"exit {code}"
            if crash and retried.get(row, 0) < retries:
                retried[row] = retried.get(row, 0) + 1
                print(
                    f"!! {' '.join(map(str, row))} {how} ({log_path}); restarting from its "
                    f"newest checkpoint (retry {retried[row]} of {retries})",
                    flush=True,
                )
                pending.insert(0, row)
                continue
            failed.append(f"{' '.join(map(str, row))} ({how}, {log_path})")
            print(f"!! {failed[-1]}", flush=True)
    if failed:
        raise RuntimeError("campaign rows failed: " + "; ".join(failed))
    _report_unfinished(out, rows)


def _stopping_signal(code: int) -> int | None:
    """The signal that ended a row's process, from its exit code: -N when it died of signal
    N, 128 + N when the CLI caught Ctrl-C or SIGTERM and exited (experiments/cli.py); else
    None (the driver reported an error itself, exit codes 1-4)."""
    if code < 0:
        return -code
    if code - 128 in (signal.SIGINT, signal.SIGTERM):
        return code - 128
    return None


def _signal_name(number: int) -> str:
    """ "ABRT" for 6: the Signals member's name without "SIG", else the number."""
    try:
        return signal.Signals(number).name.removeprefix("SIG")
    except ValueError:
        return str(number)


def epoch_minutes(out: pathlib.Path, rows: Iterable[Row], row: Row) -> float | None:
    """Expected minutes of ``row``'s next epoch: its own last epoch's, else the median of the
    other rows' last epochs (rows of one campaign share the data and the network's cost; last
    epochs, because a host's load changes over a campaign), else None when no epoch has
    finished yet."""
    own = _epoch_minutes(out, row)
    if own:
        return own[-1]
    last = [minutes[-1] for minutes in (_epoch_minutes(out, r) for r in rows) if minutes]
    return statistics.median(last) if last else None


def recorded_epochs(out: pathlib.Path, row: Row) -> list[dict]:
    """The metrics of every epoch the row has recorded (``metrics.jsonl``); [] if none."""
    path = run_dir(out, row) / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    return [json.loads(line) for line in lines if line.strip()]


def _epoch_minutes(out: pathlib.Path, row: Row) -> list[float]:
    """Wall minutes of each epoch the row has recorded (evaluation included); [] if none."""
    return [epoch["seconds"] / 60 for epoch in recorded_epochs(out, row)]


def unfinished(out: pathlib.Path, row: Row) -> tuple[dict, int, float] | None:
    """(last recorded epoch's metrics, epochs planned, minutes so far) of a row that has
    recorded epochs but no summary (stopped by a time box or a killed process), else None.
    Why: a row cut off one epoch short still measured something worth reporting, marked so."""
    directory = run_dir(out, row)
    epochs = recorded_epochs(out, row)
    if (directory / "summary.json").exists() or not epochs:
        return None
    planned = json.loads((directory / "config.json").read_text())["epochs"]
    return epochs[-1], planned, sum(epoch["seconds"] for epoch in epochs) / 60


def newest_checkpoints(out: pathlib.Path, rows: Iterable[Row]) -> list[pathlib.Path]:
    """The newest checkpoint (step directory) of every started but unfinished row.

    That one directory is all another clone needs to resume the row with the same result
    (checkpoints are git-ignored; ``git add -f`` these to carry a campaign to a fresh machine).
    """
    newest = []
    for row in rows:
        directory = run_dir(out, row)
        checkpoints = directory / "checkpoints"
        if (directory / "summary.json").exists() or not checkpoints.is_dir():
            continue
        # orbax's own notion of the newest finalized step (what CheckpointManager resumes from)
        latest = ocp.step.latest_step_metadata(checkpoints, ocp.step.standard_name_format())
        if latest is not None:
            newest.append(checkpoints / latest.path.name)
    return newest


def _report_unfinished(out: pathlib.Path, rows: Iterable[Row]) -> None:
    for checkpoint in newest_checkpoints(out, rows):
        print(f"unfinished, resumes from epoch {checkpoint.name}: {checkpoint}", flush=True)


def finished(out: pathlib.Path, row: Row) -> tuple[dict, float] | None:
    """(final metrics, training minutes incl. evaluation) of a finished row, else None."""
    directory = run_dir(out, row)
    if not (directory / "summary.json").exists():
        return None
    summary = json.loads((directory / "summary.json").read_text())
    return summary["final"], sum(_epoch_minutes(out, row))


def best(out: pathlib.Path, row: Row) -> dict:
    """The metrics of a finished row's epoch with the highest accuracy."""
    return json.loads((run_dir(out, row) / "summary.json").read_text())["best"]


CLOSED_COLUMNS = {
    "accuracy": "accuracy",
    "knn_accuracy": "kNN acc",
    "precision_at_1": "P@1",
    "map_at_r": "MAP@R",
}
OPEN_COLUMNS = {
    "accuracy": "seen-class acc",
    "open_precision_at_1": "P@1",
    "open_map_at_r": "MAP@R",
    "open_val_at_far": "VAL@FAR=1e-3",
    "open_auc": "ROC AUC",
    "open_identification_rate": "DIR@FPIR=1%",
    "open_fpir": "FPIR",
}


def table(out: pathlib.Path, rows: Iterable[Row], extra: Sequence[str], open_set: bool) -> str:
    columns = OPEN_COLUMNS if open_set else CLOSED_COLUMNS
    head = ["loss", "dataset", "feat_dim", *columns.values(), "epochs", "minutes", "command"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        dataset, dim, loss = row
        result, partial = finished(out, row), unfinished(out, row)
        if result is not None:
            final, minutes = result
            cells = [f"{final[k]:.4f}" for k in columns]
            cells += [str(final["epoch"]), f"{minutes:.1f}", f"`{command(row, extra)}`"]
        elif partial is not None:
            last, planned, minutes = partial
            cells = [f"{last[k]:.4f}" for k in columns]
            cells += [unfinished_epochs(last, planned), f"{minutes:.1f}"]
            cells += [f"`{command(row, extra)}`"]
        else:
            status = "needs network" if dataset == "cifar10" else "not measured yet"
            cells = [status] + [""] * (len(columns) + 2)
        lines.append(f"| {loss} | {dataset} | {dim} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def unfinished_epochs(last: dict, planned: int) -> str:
    """The epochs cell of an unfinished row: which epoch its numbers come from."""
    return f"{last['epoch']} of {planned}, unfinished"


def write_table(out: pathlib.Path, text: str) -> None:
    """Writes OUT/table.md and prints it."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "table.md").write_text(text + "\n")
    print(text)


def add_grid_flags(parser: argparse.ArgumentParser) -> None:
    """The flags campaign and seed001 share: which datasets and dims, time box, parallel rows."""
    parser.add_argument(
        "--datasets",
        nargs="+",
        default=["fashion_mnist", "mnist"],
        choices=list(DATASETS),
        help="datasets to run (default: fashion_mnist mnist; cifar10 needs a network)",
    )
    parser.add_argument(
        "--dims", nargs="+", type=int, default=[2, 128], help="feature dims (default: 2 128)"
    )
    parser.add_argument(
        "--stop-after-minutes",
        type=float,
        default=None,
        help="time box in minutes: a row starts only if one epoch (as long as its own last, "
        "else the other rows' median) fits in the time left, and stops after its last epoch "
        "that fits; rerun to resume",
    )
    parser.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="rows run at once, each in its own process pinned to its share of the CPUs, "
        "output in the row's log.txt (default: 1, on every CPU); on a 2-core CPU --jobs 2 "
        "finishes more rows per hour",
    )
    parser.add_argument(
        "--retries",
        type=int,
        default=2,
        help="times a row killed by a signal (XLA's abort of a stuck collective, the OOM "
        "killer, a crash) restarts from its newest checkpoint (default: 2); errors the driver "
        "reports (exit code > 0) and Ctrl-C are not retried",
    )


def check_grid_flags(args: argparse.Namespace) -> None:
    """Rejects bad :func:`add_grid_flags` values with a message naming the flag."""
    for flag, value, least in (("--jobs", args.jobs, 1), ("--retries", args.retries, 0)):
        if value < least:
            raise SystemExit(f"error: {flag} must be >= {least}, got {value}")


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m experiments.campaign",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--out", required=True, help="campaign directory (one sub-directory per row)")
    p.add_argument(
        "--losses",
        nargs="+",
        default=list(OBJECTIVES),
        choices=list(OBJECTIVES),
        metavar="LOSS",
        help=f"losses to run (default: all: {', '.join(OBJECTIVES)})",
    )
    p.add_argument("--epochs", type=int, required=True, help="epochs per row")
    p.add_argument("--limit", type=int, default=None, help="first N examples per split")
    p.add_argument("--open-set", type=int, default=None, metavar="K", help="hold out K classes")
    p.add_argument(
        "--driver-args",
        default="",
        metavar="FLAGS",
        help="more driver flags for every row, written with '=': --driver-args='--augment shift'",
    )
    add_grid_flags(p)
    p.add_argument("--table-only", action="store_true", help="only rewrite OUT/table.md")
    args = p.parse_args(argv)
    for flag, value in (("--epochs", args.epochs), ("--limit", args.limit)):
        if value is not None and value < 1:
            raise SystemExit(f"error: {flag} must be >= 1, got {value}")
    check_grid_flags(args)
    extra = ["--epochs", str(args.epochs)]
    extra += ["--limit", str(args.limit)] if args.limit else []
    extra += ["--open-set", str(args.open_set)] if args.open_set else []
    extra += shlex.split(args.driver_args)
    rows = [(d, dim, loss) for d in args.datasets for dim in args.dims for loss in args.losses]
    out = pathlib.Path(args.out)
    if not args.table_only:
        run_rows(rows, out, extra, args.stop_after_minutes, args.jobs, args.retries)
    write_table(out, table(out, rows, extra, open_set=args.open_set is not None))
    return 0


if __name__ == "__main__":
    sys.exit(main())
