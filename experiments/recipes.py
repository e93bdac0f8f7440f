"""Choose each loss family's default recipe on a validation split, then measure seed 001's
twelve rows at those defaults over several seeds.

    python -m experiments.recipes select --out runs/recipes --jobs 2   # candidates, validation
    python -m experiments.recipes final --out runs/recipes --jobs 2    # 12 rows x 3 seeds, test
    python -m experiments.recipes table --out runs/recipes             # rewrite both tables
    python -m experiments.recipes status --out runs/recipes --jobs 2   # progress, time left
    python -m experiments.recipes publish --out runs/recipes   # records into experiments/results

**select** trains every candidate recipe of a family (``CANDIDATES``) on the family's
selection rows (Fashion-MNIST at feature dims 2 and 128, seed 0) on the first 55,000 training
images and scores it on the last 5,000 (``--val-size 5000``); no test image is evaluated. The
candidate with the highest mean validation accuracy over those rows wins (ties go to the one
listed first, the simpler). OUT/select/table.md lists every candidate's scores and the choice.
``--family`` limits the stage to one family's candidates.

**final** runs seed 001's twelve rows (MNIST and Fashion-MNIST x dims 2, 128 x xent, cent,
standalone) at the driver's defaults with ``--seed`` 0, 1, 2: all twelve rows of one seed
before the next seed starts, so a complete seed lands first. It refuses to start unless the
driver's default recipes (``experiments.config.FAMILY_RECIPES``) are the candidates ``select``
chose, so that the reported test accuracy is that of the recipe chosen on validation data.
OUT/final/table.md gives each row's mean +- standard deviation and minimum over the seeds
beside seed 001's 100-epoch accuracy.

**status** counts each stage's finished and recorded epochs and estimates the hours left from
the epochs measured so far (``--jobs`` rows at once).

**publish** copies the records BENCHMARKS.md quotes — each finished run's ``summary.json``,
``metrics.jsonl`` and ``config.json``, the final plot ``features.png`` of the final stage's
first seed, and both tables — to ``--records`` (same layout), leaving checkpoints, logs, GIFs
and per-epoch plots behind.

Both stages run through :func:`experiments.campaign.run_rows`: a finished run is skipped, a
started one resumes from its checkpoint, ``--stop-after-minutes`` time-boxes it, and
``--jobs 2`` runs two rows at once. Every stage but publish first restores into OUT the
published runs OUT lacks (``--records``, default experiments/results/recipes), so the
campaign continues on a fresh clone: publish and commit each finished run, and rerun the same
command anywhere. A run in progress is lost with its machine (checkpoints stay out of git).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import shutil
import statistics
import sys
import time
from collections.abc import Sequence
from typing import Any

from experiments import campaign, config, seed001

EPOCHS = 10  # every candidate and every final run: the budget the recipes are chosen for
VAL_SIZE = 5000
SEEDS = (0, 1, 2)
SELECTION_DATASET = "fashion_mnist"  # where recipes mattered most (BENCHMARKS.md, accuracy)
SELECTION_DIMS = (2, 128)
# The loss each family's candidates train on: seed 001's base loss of the family.
SELECTION_LOSS = {"softmax": "xent", "center": "standalone"}
# Candidate recipes per family, simplest first: {name: recipe fields (experiments.config keys)}.
# The softmax family over-fits late (train accuracy 0.994-1.000 without augmentation), so its
# candidates differ in image shifts. The center family's pre-clip gradient norms are 170-380
# (docs/notes.md), so clip 5 clips every step; its candidates all clip at 10 with eps 1.
CANDIDATES: dict[str, dict[str, dict[str, Any]]] = {
    "softmax": {
        "plain": {"epochs": EPOCHS, "augment": "none"},
        "shift1": {"epochs": EPOCHS, "augment": "shift", "max_shift": 1},
        "shift2": {"epochs": EPOCHS, "augment": "shift", "max_shift": 2},
    },
    "center": {
        "clip10-eps1": {
            "epochs": EPOCHS,
            "augment": "none",
            "clip_norm": 10.0,
            "loss_config.inter_eps": 1.0,
        },
        "clip10-eps1-shift1": {
            "epochs": EPOCHS,
            "augment": "shift",
            "max_shift": 1,
            "clip_norm": 10.0,
            "loss_config.inter_eps": 1.0,
        },
        "clip10-eps1-shift2": {
            "epochs": EPOCHS,
            "augment": "shift",
            "max_shift": 2,
            "clip_norm": 10.0,
            "loss_config.inter_eps": 1.0,
        },
    },
}
GOAL = 0.002  # within 0.2 points of seed 001's 100-epoch accuracy
NEXT_STEP = (
    f"¹ Next step for a row that misses: choose its family's recipe on validation data again at "
    f"20 epochs (`EPOCHS` in experiments/recipes.py, now {EPOCHS}), the budget at which seed 001's "
    "20-epoch recipes met all twelve rows (BENCHMARKS.md); a row that still misses gets its own "
    "candidates."
)


def recipe_flags(recipe: dict[str, Any]) -> list[str]:
    """Driver flags that set ``recipe``'s fields: ``{"loss_config.inter_eps": 1.0}`` →
    ``["--inter-eps", "1"]``."""
    flags = []
    for key, value in recipe.items():
        text = f"{value:g}" if isinstance(value, float) else str(value)
        flags += [config.flag(key.rsplit(".", 1)[-1]), text]
    return flags


# ----------------------------------------------------------------------------- select


def candidate_dir(out: pathlib.Path, family: str, name: str) -> pathlib.Path:
    return out / "select" / f"{family}-{name}"


def selection_rows(family: str) -> list[campaign.Row]:
    return [(SELECTION_DATASET, dim, SELECTION_LOSS[family]) for dim in SELECTION_DIMS]


def selection_flags(family: str, name: str) -> list[str]:
    return [*recipe_flags(CANDIDATES[family][name]), "--val-size", str(VAL_SIZE), "--seed", "0"]


def validation_scores(out: pathlib.Path, family: str, name: str) -> list[float | None]:
    """The validation accuracy of each selection row of a candidate (None: not finished)."""
    directory = candidate_dir(out, family, name)
    scores: list[float | None] = []
    for row in selection_rows(family):
        result = campaign.finished(directory, row)
        if result is not None:
            summary = json.loads((campaign.run_dir(directory, row) / "summary.json").read_text())
            if summary.get("evaluated_on") != "validation":
                raise RuntimeError(
                    f"{campaign.run_dir(directory, row)} was not evaluated on a validation split"
                )
        scores.append(None if result is None else result[0]["accuracy"])
    return scores


def chosen(out: pathlib.Path, family: str) -> str | None:
    """The candidate with the highest mean validation accuracy, once every candidate of the
    family has finished; ties go to the first listed. None while any is unfinished."""
    means = {}
    for name in CANDIDATES[family]:
        scores = validation_scores(out, family, name)
        if None in scores:
            return None
        means[name] = statistics.fmean(scores)
    return max(means, key=lambda name: (means[name], -list(CANDIDATES[family]).index(name)))


def selection_table(out: pathlib.Path) -> str:
    dims = " | ".join(f"{SELECTION_DATASET} {dim}-D val acc" for dim in SELECTION_DIMS)
    lines = [
        f"| family | candidate | flags | {dims} | mean | chosen |",
        "|---|---|---|" + "---|" * len(SELECTION_DIMS) + "---|---|",
    ]
    for family, candidates in CANDIDATES.items():
        choice = chosen(out, family)
        for name in candidates:
            scores = validation_scores(out, family, name)
            cells = ["not measured yet" if s is None else f"{s:.4f}" for s in scores]
            mean = "" if None in scores else f"{statistics.fmean(scores):.4f}"
            flags = " ".join(recipe_flags(CANDIDATES[family][name]))
            mark = "**chosen**" if name == choice else ""
            lines.append(
                f"| {family} | {name} | `{flags}` | " + " | ".join(cells) + f" | {mean} | {mark} |"
            )
    return "\n".join(lines)


def select(
    out: pathlib.Path,
    stop_after_minutes: float | None,
    jobs: int,
    retries: int,
    families: Sequence[str] = tuple(CANDIDATES),
):
    """Trains every candidate of ``families`` (in CANDIDATES' order) on its selection rows."""
    unknown = sorted(set(families) - set(CANDIDATES))
    if unknown:
        raise ValueError(f"families must be among {sorted(CANDIDATES)}, got {unknown}")
    start = time.time()
    for family in families:
        for name in CANDIDATES[family]:
            left = _minutes_left(start, stop_after_minutes)
            if left is not None and left <= 0:
                return
            campaign.run_rows(
                selection_rows(family),
                candidate_dir(out, family, name),
                selection_flags(family, name),
                left,
                jobs,
                retries,
            )


# ----------------------------------------------------------------------------- final


class RecipeMismatch(RuntimeError):
    """The driver's default recipes are not the ones chosen on validation data."""


def check_defaults(out: pathlib.Path) -> None:
    """Raises :class:`RecipeMismatch` unless every family's selection has finished and the
    driver's default recipe for each family member is the chosen candidate."""
    for family, members in config.FAMILIES.items():
        name = chosen(out, family)
        if name is None:
            raise RecipeMismatch(
                f"the {family} family's selection has not finished; run "
                f"`python -m experiments.recipes select --out {out}` first"
            )
        wanted = {**config.BASE_RECIPE, **CANDIDATES[family][name]}
        for loss in members:
            have = config.recipe(loss)
            if have != wanted:
                differing = {k: (have.get(k), v) for k, v in wanted.items() if have.get(k) != v}
                raise RecipeMismatch(
                    f"validation chose {family}-{name} for {loss}, but the driver's defaults "
                    f"differ: {differing} (default, chosen); set FAMILY_RECIPES[{family!r}] in "
                    "experiments/config.py to the chosen candidate"
                )


def final_dir(out: pathlib.Path, seed: int) -> pathlib.Path:
    return out / "final" / f"seed{seed}"


def final_rows() -> list[campaign.Row]:
    return seed001.rows(("mnist", "fashion_mnist"), (2, 128))


def final_flags(seed: int) -> list[str]:
    return ["--seed", str(seed)]


def final(out: pathlib.Path, stop_after_minutes: float | None, jobs: int, retries: int):
    check_defaults(out)
    start = time.time()
    for seed in SEEDS:
        left = _minutes_left(start, stop_after_minutes)
        if left is not None and left <= 0:
            return
        campaign.run_rows(
            final_rows(), final_dir(out, seed), final_flags(seed), left, jobs, retries
        )


def final_table(out: pathlib.Path) -> str:
    lines = [
        "| dataset | dim | loss | seed 001 (100 ep) | mean ± std | min | seeds | goal | epochs "
        "| minutes per run | command |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    missed = False
    for row in final_rows():
        dataset, dim, loss = row
        target = seed001.SEED_TABLE[(dataset, dim)][loss]
        runs = [(campaign.finished(final_dir(out, s), row), s) for s in SEEDS]
        done = [(result, s) for result, s in runs if result is not None]
        command = campaign.command(row, ["--seed", "S"])
        if not done:
            lines.append(
                f"| {dataset} | {dim} | {loss} | {target:.3f} | not measured yet | | 0 | | | | "
                f"`{command}` |"
            )
            continue
        accuracy = [result[0]["accuracy"] for result, _ in done]
        minutes = statistics.fmean(result[1] for result, _ in done)
        mean = statistics.fmean(accuracy)
        std = statistics.stdev(accuracy) if len(accuracy) > 1 else 0.0
        gap = target - mean
        missed = missed or gap > GOAL
        goal = "meets" if gap <= GOAL else f"misses by {100 * gap:.2f} points¹"
        epochs = done[0][0][0]["epoch"]
        seeds = ",".join(str(s) for _, s in done)
        lines.append(
            f"| {dataset} | {dim} | {loss} | {target:.3f} | {mean:.4f} ± {std:.4f} | "
            f"{min(accuracy):.4f} | {seeds} | {goal} | {epochs} | {minutes:.1f} | `{command}` |"
        )
    if missed:
        lines += ["", NEXT_STEP]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- publish

RECORD_FILES = ("summary.json", "metrics.jsonl", "config.json")
PLOTTED_SEED = SEEDS[0]  # its final runs keep their features.png (a few 10 KB each)


def publish(out: pathlib.Path, to: pathlib.Path) -> list[pathlib.Path]:
    """Copies the finished runs' records and both tables from ``out`` to ``to``; returns the
    files written. Unfinished runs are skipped (rerun after the campaign moves on)."""
    if to.resolve() == out.resolve():
        raise ValueError(f"--records must differ from --out, both are {out}")
    written = []
    plotted = final_dir(out, PLOTTED_SEED)
    for directory, row in (pair for runs in stage_runs(out).values() for pair in runs):
        if campaign.finished(directory, row) is None:
            continue
        source = campaign.run_dir(directory, row)
        names = RECORD_FILES + (("features.png",) if directory == plotted else ())
        for name in names:
            if (source / name).is_file():
                written.append(_copy(source / name, to / source.relative_to(out) / name))
    for stage in ("select", "final"):
        if (out / stage / "table.md").is_file():
            written.append(_copy(out / stage / "table.md", to / stage / "table.md"))
    return written


def restore(records: pathlib.Path, out: pathlib.Path) -> list[pathlib.Path]:
    """Copies into ``out`` the published runs (``records``, as :func:`publish` leaves them)
    that ``out`` has not finished; returns the run folders restored. A published run is
    finished (it has summary.json), so the stages skip it as if it had run here; a run ``out``
    has finished itself is left alone."""
    restored = []
    for directory, row in (pair for runs in stage_runs(out).values() for pair in runs):
        target = campaign.run_dir(directory, row)
        source = records / target.relative_to(out)
        if campaign.finished(directory, row) is None and (source / "summary.json").is_file():
            for name in RECORD_FILES:
                if (source / name).is_file():
                    _copy(source / name, target / name)
            restored.append(target)
    return restored


def _copy(source: pathlib.Path, target: pathlib.Path) -> pathlib.Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, target)
    return target


# ----------------------------------------------------------------------------- status


def stage_runs(out: pathlib.Path) -> dict[str, list[tuple[pathlib.Path, campaign.Row]]]:
    """Every run each stage plans, as (campaign folder, row), in the order the stage runs them."""
    return {
        "select": [
            (candidate_dir(out, family, name), row)
            for family, candidates in CANDIDATES.items()
            for name in candidates
            for row in selection_rows(family)
        ],
        "final": [(final_dir(out, seed), row) for seed in SEEDS for row in final_rows()],
    }


def status(out: pathlib.Path, jobs: int) -> str:
    """Each stage's runs finished, epochs recorded, and hours left at ``jobs`` rows at once.

    An epoch's cost is the median of every epoch the stage has recorded (a spell of sharing the
    cores with other jobs moves it little); the final stage trains on all training images, so
    before it has its own it takes the selection's epochs scaled by the training-set sizes
    (60,000 / (60,000 - VAL_SIZE): both datasets have 60,000).
    """
    lines = []
    minutes: dict[str, float | None] = {}
    for stage, runs in stage_runs(out).items():
        done = epochs = 0
        epoch_minutes = []
        for directory, row in runs:
            recorded = campaign.recorded_epochs(directory, row)
            finished = campaign.finished(directory, row) is not None
            done += finished
            epochs += EPOCHS if finished else min(len(recorded), EPOCHS)
            epoch_minutes += [r["seconds"] / 60 for r in recorded]
        left = len(runs) * EPOCHS - epochs
        minutes[stage] = statistics.median(epoch_minutes) if epoch_minutes else None
        if minutes[stage] is None and stage == "final" and minutes["select"] is not None:
            minutes[stage] = minutes["select"] * 60_000 / (60_000 - VAL_SIZE)
        total = len(runs) * EPOCHS
        line = f"{stage}: {done} of {len(runs)} runs finished, {left} of {total} epochs left"
        if minutes[stage] is not None and left:
            hours = left * minutes[stage] / 60 / jobs
            line += f", about {hours:.1f} h at {minutes[stage]:.1f} min per epoch and --jobs {jobs}"
        lines.append(line)
    return "\n".join(lines)


def _minutes_left(start: float, box: float | None) -> float | None:
    return None if box is None else box - (time.time() - start) / 60


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m experiments.recipes",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "stage", choices=("select", "final", "table", "status", "publish"), help="what to run"
    )
    p.add_argument("--out", default="runs/recipes", help="campaign folder (default: %(default)s)")
    p.add_argument(
        "--records",
        default="experiments/results/recipes",
        help="the published records: publish writes finished runs there, every other stage "
        "first restores the ones OUT lacks (default: %(default)s)",
    )
    p.add_argument(
        "--family",
        choices=tuple(CANDIDATES),
        action="append",
        help="select: only this family's candidates (repeatable; default: every family)",
    )
    p.add_argument(
        "--stop-after-minutes",
        type=float,
        default=None,
        help="time box for the whole stage; rerun the same command to continue",
    )
    p.add_argument("--jobs", type=int, default=1, help="runs at once (2 on a 2-core CPU)")
    p.add_argument("--retries", type=int, default=2, help="restarts of a run killed by a signal")
    args = p.parse_args(argv)
    campaign.check_grid_flags(args)
    out, records = pathlib.Path(args.out), pathlib.Path(args.records)
    if args.family and args.stage != "select":
        p.error("--family applies to the select stage only")
    if args.stage != "publish" and records.resolve() != out.resolve():
        restored = restore(records, out)
        if restored:
            print(f"restored {len(restored)} finished runs from {records}", flush=True)
    if args.stage == "status":
        print(status(out, args.jobs))
        return 0
    if args.stage == "publish":
        write_tables(out)
        written = publish(out, records)
        print(f"published {len(written)} files to {records}")
        return 0
    try:
        if args.stage == "select":
            families = args.family or tuple(CANDIDATES)
            select(out, args.stop_after_minutes, args.jobs, args.retries, families)
        elif args.stage == "final":
            final(out, args.stop_after_minutes, args.jobs, args.retries)
    except RecipeMismatch as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    write_tables(out)
    return 0


def write_tables(out: pathlib.Path) -> None:
    """OUT/select/table.md, and OUT/final/table.md once the final stage has started."""
    campaign.write_table(out / "select", selection_table(out))
    if (out / "final").exists():
        campaign.write_table(out / "final", final_table(out))


if __name__ == "__main__":
    sys.exit(main())
