"""``python -m benchmarks.huge_batch`` at tiny sizes: every configuration runs in its own
process, blockwise and dense agree, PML (when installed) computes the same loss. Speed and
memory are reported, never asserted."""

from __future__ import annotations

import json

import numpy as np

from benchmarks import huge_batch
from benchmarks.losses import load_pml

PML, _ = load_pml()


def test_tiny_run_writes_table_and_agrees(tmp_path):
    out = tmp_path / "huge.md"
    argv = "--batch 64 --compare-batch 40 --block-size 24 --repeats 1 --dim 8".split()
    assert huge_batch.main([*argv, "--out", str(out)] + ([] if PML else ["--no-pml"])) == 0
    results = json.loads(out.with_suffix(".json").read_text())
    assert not [r for r in results if "error" in r]
    for loss in huge_batch.LOSSES:
        rows = [r for r in results if r["loss"] == loss]
        dense, blocked = (r for r in rows if r["batch"] == 40)
        np.testing.assert_allclose(blocked["loss_value"], dense["loss_value"], rtol=1e-5)
        assert all(r["peak_rss"] > 0 and r["seconds"] > 0 for r in rows)
        if PML:
            ours, pml = (r for r in rows if r["batch"] == 64)
            np.testing.assert_allclose(ours["loss_value"], pml["loss_value"], rtol=1e-4)
    assert "peak RSS GiB" in out.read_text()
