"""``python -m benchmarks.multi_process`` on tiny data: a two-process layout trains through the
launcher and the report has its row (that two processes train what one does is
tests/test_multiprocess.py's). Speed is never asserted."""

from __future__ import annotations

import argparse

import numpy as np
import pytest

from benchmarks import multi_process as bench
from mlx_jax import data as D
from tests.test_data import write_idx_dir
from tests.test_experiments import learnable_images

pytestmark = pytest.mark.xdist_group("multiprocess")  # real processes: one worker at a time


def test_layouts_parse_and_reject_bad_text():
    assert bench.parse_layout("2x1") == (2, 1)
    for bad in ("2", "0x1", "axb"):
        with pytest.raises(argparse.ArgumentTypeError, match="layout"):
            bench.parse_layout(bad)


def test_a_two_process_layout_is_timed_and_reported(tmp_path, monkeypatch):
    monkeypatch.setenv(D.NO_FETCH_ENV, "1")
    data = tmp_path / "data"
    arrays = {"train": learnable_images(0, 320), "test": learnable_images(1, 160)}
    write_idx_dir(data / "fashion_mnist", arrays, gz=True)
    out = tmp_path / "multi_process.md"
    extra = f"--data-dir {data} --batch-size 32 --width 4 --conv xla"
    argv = ["--layouts", "2x1", "--limit", "320", f"--driver-args={extra}"]
    assert bench.main([*argv, "--out", str(out)]) == 0
    text = out.read_text()
    rows = [line.split("|") for line in text.splitlines() if line.startswith("| 2 × 1")]
    assert len(rows) == 1
    assert float(rows[0][2]) > 0  # ms per step
    assert np.isfinite(float(rows[0][4]))  # the epoch-2 loss
    assert "--layouts 2x1" in text  # the command that regenerates it
