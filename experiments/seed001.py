"""Reproduce seed 001's table: xent / cent / standalone × dataset × feature dim 2 and 128.

    python -m experiments.seed001 --epochs 20 --out runs/seed001 [--datasets mnist fashion_mnist]

Runs each row with the driver's defaults (seed 001's lr 0.01, batch 128, weight_cent 1.0,
weight_intra 1.0, weight_inter 0.1), one after another, through
:func:`experiments.campaign.run_rows`: a finished row (summary.json present) is skipped and an
unfinished one resumes from its checkpoint, so a campaign can be stopped and continued;
``--stop-after-minutes`` time-boxes it (rows stop cleanly after an epoch). Writes OUT/table.md
with the seed's accuracy beside ours.
"""

from __future__ import annotations

import argparse
import pathlib
import sys

from experiments import campaign

# Seed 001's accuracies (100 epochs, lr 0.01, batch 128).
SEED_TABLE = {
    ("mnist", 2): {"xent": 0.991, "cent": 0.990, "standalone": 0.994},
    ("mnist", 128): {"xent": 0.994, "cent": 0.996, "standalone": 0.996},
    ("fashion_mnist", 2): {"xent": 0.913, "cent": 0.913, "standalone": 0.921},
    ("fashion_mnist", 128): {"xent": 0.926, "cent": 0.932, "standalone": 0.922},
    ("cifar10", 2): {"xent": 0.815, "cent": 0.775, "standalone": 0.787},
    ("cifar10", 128): {"xent": 0.866, "cent": 0.858, "standalone": 0.806},
}
LOSSES = ("xent", "cent", "standalone")


def rows(datasets, dims) -> list[campaign.Row]:
    return [(dataset, dim, loss) for dim in dims for dataset in datasets for loss in LOSSES]


def table(out: pathlib.Path, datasets, dims, epochs: int) -> str:
    lines = [
        "| loss | dataset | feat_dim | seed 001 acc (100 ep) | ours acc | ours best | epochs "
        "| train min | command |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows(datasets, dims):
        dataset, dim, loss = row
        seed = SEED_TABLE[(dataset, dim)][loss]
        result, partial = campaign.finished(out, row), campaign.unfinished(out, row)
        if partial is not None:
            last, planned, minutes = partial
            epochs = campaign.unfinished_epochs(last, planned)
            command = campaign.command(row, ["--epochs", str(planned)])
            lines.append(
                f"| {loss} | {dataset} | {dim} | {seed:.3f} | {last['accuracy']:.4f} | | "
                f"{epochs} | {minutes:.1f} | `{command}` |"
            )
            continue
        if result is None:
            status = "needs network" if dataset == "cifar10" else "not measured yet"
            lines.append(f"| {loss} | {dataset} | {dim} | {seed:.3f} | {status} | | | | |")
            continue
        final, minutes = result
        best = campaign.best(out, row)
        command = campaign.command(row, ["--epochs", str(final["epoch"])])
        lines.append(
            f"| {loss} | {dataset} | {dim} | {seed:.3f} | {final['accuracy']:.4f} | "
            f"{best['accuracy']:.4f} | {final['epoch']} | {minutes:.1f} | `{command}` |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--epochs", type=int, default=20, help="epochs per row (default: 20, our goal's budget)"
    )
    p.add_argument(
        "--out", default="runs/seed001", help="one sub-directory per row plus table.md there"
    )
    campaign.add_grid_flags(p)
    p.add_argument("--table-only", action="store_true", help="only rewrite OUT/table.md")
    args = p.parse_args(argv)
    campaign.check_grid_flags(args)
    out = pathlib.Path(args.out)
    if not args.table_only:
        extra = ["--epochs", str(args.epochs)]
        campaign.run_rows(
            rows(args.datasets, args.dims),
            out,
            extra,
            args.stop_after_minutes,
            args.jobs,
            args.retries,
        )
    campaign.write_table(out, table(out, args.datasets, args.dims, args.epochs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
