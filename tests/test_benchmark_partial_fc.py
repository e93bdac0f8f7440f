"""``python -m benchmarks.partial_fc`` on tiny sizes: both modes run in their worker processes
(8 virtual devices for the sharded one), write the table and JSON, and the sharded and unsharded
steps train the same W on the same batches. Speed is never asserted (DEVELOPERS.md)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from benchmarks import partial_fc as bench


@pytest.mark.parametrize("batch_sharded", [False, True])
def test_tiny_run_writes_both_modes_with_equal_losses(tmp_path, batch_sharded):
    out = tmp_path / "partial_fc.md"
    argv = "--classes 1001 --dim 16 --batch 32 --steps 2 --warmup 1".split()
    argv += ["--out", str(out)] + (["--batch-sharded"] if batch_sharded else [])
    assert bench.main(argv) == 0
    rows = {r["mode"]: r for r in json.loads(out.with_suffix(".json").read_text())}
    sharded, unsharded = rows["sharded"], rows["unsharded"]
    assert sharded["status"] == unsharded["status"] == "ok"
    # 1001 classes padded to 1008 columns, 126 per device.
    assert sharded["devices"] == 8 and sharded["w_shard_shape"] == [[16, 126]]
    assert unsharded["w_shard_shape"] == [[16, 1001]]
    np.testing.assert_allclose(sharded["losses"], unsharded["losses"], rtol=1e-5)
    assert len(sharded["step_times_s"]) == 2 and sharded["grad_x_finite"]
    # One device's program holds an eighth of W: its XLA arguments are far below the unsharded.
    assert sharded["xla_bytes"]["argument"] < unsharded["xla_bytes"]["argument"] / 4
    text = out.read_text()
    assert "| sharded | 8 | [16, 126] |" in text and "| unsharded | 1 |" in text


def test_max_gb_skips_a_mode_before_running_it(tmp_path):
    out = tmp_path / "partial_fc.md"
    argv = "--classes 64 --dim 8 --batch 8 --steps 1 --max-gb 0 --no-unsharded".split()
    assert bench.main([*argv, "--out", str(out)]) == 0
    (row,) = json.loads(out.with_suffix(".json").read_text())
    assert row["status"].startswith("skipped") and "losses" not in row


def test_sampled_sharded_step_runs(tmp_path):
    out = tmp_path / "partial_fc.md"
    argv = "--classes 2000 --dim 8 --batch 16 --steps 2 --sample-rate 0.2 --no-unsharded".split()
    assert bench.main([*argv, "--out", str(out)]) == 0
    (row,) = json.loads(out.with_suffix(".json").read_text())
    assert row["status"] == "ok" and np.all(np.isfinite(row["losses"]))
    assert "sample rate 0.2" in out.read_text()
