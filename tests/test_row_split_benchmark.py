"""``python -m benchmarks.row_split`` on tiny sizes: the worker (2 virtual devices) times a
loss at every device count, the row-split and gather forms give the same loss, and the record is
written as markdown and JSON. Speed itself is never asserted (DEVELOPERS.md)."""

from __future__ import annotations

import argparse
import json

import pytest

from benchmarks import row_split as bench


def test_tiny_run_writes_every_loss_and_device_count(tmp_path):
    out = tmp_path / "row_split.md"
    argv = "--batch 16 --dim 4 --devices 1 2 --losses triplet_batch_hard".split()
    argv += "--repeats 1 --wall-repeats 1 --warmup 0 --pause 0".split() + ["--out", str(out)]
    assert bench.main(argv) == 0
    rows = json.loads(out.with_suffix(".json").read_text())
    assert [(r["loss"], r["devices"]) for r in rows] == [
        ("triplet_batch_hard", 1),
        ("triplet_batch_hard", 2),
    ]
    for r in rows:
        assert r["rows_per_device"] == 16 // r["devices"]
        assert min(r["gather_ms"], r["split_ms"], r["wall_gather_ms"], r["wall_split_ms"]) > 0
        assert r["value"] > 0
        assert r["wall_rel_diff"] < 1e-5 and r["wall_value_vs_single"] < 1e-5
    assert all(r["per_device_rel_diff"] < 1e-5 for r in rows if r["devices"] == 1)
    text = out.read_text()
    assert "| triplet_batch_hard | 2 | 8 |" in text and "| triplet_batch_hard | 1 | 16 |" in text
    assert "2 virtual CPU devices" in text and "--batch 16" in text
    assert "1-minute load average" in text and all(len(r["load_1min"]) == 2 for r in rows)


def test_report_ratio_and_difference_columns():
    args = argparse.Namespace(
        batch=8, dim=2, per_class=4, devices=[1, 4], repeats=3, block=1, wall_repeats=1,
        warmup=1, pause=0.0,
    )  # fmt: skip
    row = dict(
        loss="circle", devices=4, rows_per_device=2, gather_ms=12.0, split_ms=4.0,
        wall_gather_ms=50.0, wall_split_ms=13.0, wall_rel_diff=2e-7,
    )  # fmt: skip
    text = bench.format_report(args, ["--batch", "8"], [row])
    assert "| circle | 4 | 2 | 12.00 | 4.00 | 3.00 | 50.00 | 13.00 | 2.0e-07 |" in text


def test_bad_device_counts_are_refused():
    with pytest.raises(SystemExit):
        bench.main(["--batch", "10", "--devices", "4"])
