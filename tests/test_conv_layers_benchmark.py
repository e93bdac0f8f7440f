"""``python -m benchmarks.conv_layers`` on a tiny batch: every LeNet++ layer and operation is
timed on both sides, and a mismatch between XLA's and PyTorch's results stops it. Speed itself
is never asserted."""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks import conv_layers as bench

torch = pytest.importorskip("torch")


def test_times_every_layer_and_operation_on_both_sides():
    rows = bench.measure(batch=2, repeats=1, block=1, pause=0.0)
    # the first layer's input is the image: no input gradient there
    assert len(rows) == 3 * len(bench.LAYERS) - 1
    assert {r["op"] for r in rows} == set(bench.OPERATIONS)
    for r in rows:
        assert r["xla_ms"] > 0 and r["torch_ms"] > 0
        assert all(r[f"{k}_ms"] > 0 for k in bench.jax_sides())  # oneDNN too, where it runs
    table = bench.table(rows)
    assert table.count("\n") == len(rows) + 2 and "| all | all |" in table
    assert table.splitlines()[0].count("/PyTorch") == len(bench.jax_sides())


def test_a_result_that_differs_from_pytorch_is_refused():
    x = np.ones((1, 7, 7, 2), np.float32)
    w = np.ones((5, 5, 2, 3), np.float32)
    g = np.ones((1, 7, 7, 3), np.float32)
    sides = {f"xla {k}": f for k, f in bench.xla_operations(x, w, g).items()}
    sides.update({f"torch {k}": f for k, f in bench.torch_operations(x, w, g).items()})
    bench.check_same_results(sides)  # the same arrays pass
    sides["xla dw"] = lambda: 2 * np.asarray(bench.xla_operations(x, w, g)["dw"]())
    with pytest.raises(AssertionError, match="dw: XLA and PyTorch differ"):
        bench.check_same_results(sides)


def test_a_onednn_result_that_differs_from_pytorch_is_refused():
    if "onednn" not in bench.jax_sides():
        pytest.skip("oneDNN's convolutions cannot run here")
    x = np.ones((1, 7, 7, 2), np.float32)
    w = np.ones((5, 5, 2, 3), np.float32)
    g = np.ones((1, 7, 7, 3), np.float32)
    sides = {f"onednn {k}": f for k, f in bench.xla_operations(x, w, g, "onednn").items()}
    sides.update({f"torch {k}": f for k, f in bench.torch_operations(x, w, g).items()})
    bench.check_same_results(sides)
    sides["onednn dx"] = lambda: 1.01 * np.asarray(bench.xla_operations(x, w, g, "onednn")["dx"]())
    with pytest.raises(AssertionError, match="dx: oneDNN and PyTorch differ"):
        bench.check_same_results(sides)
