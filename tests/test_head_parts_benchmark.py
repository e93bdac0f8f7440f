"""``python -m benchmarks.head_parts`` on tiny sizes: every part is timed, XLA's matmuls must
equal torch's, and the report derives its bound from the measured parts. Speed itself is never
asserted."""

from __future__ import annotations

import argparse

import numpy as np
import pytest

from benchmarks import head_parts as bench
from benchmarks import losses as losses_bench

TINY = dict(batch=8, dim=4, classes=16, repeats=1, block=1, pause=0.0)


def _args(**overrides) -> argparse.Namespace:
    return argparse.Namespace(**{"loss": "cosface", **TINY, **overrides})


@pytest.mark.parametrize("loss", bench.HEADS)
def test_times_every_part_and_both_losses(loss):
    pytest.importorskip("torch")
    result = bench.measure(_args(loss=loss))
    assert set(result["xla"]) == set(bench.MATMULS) | set(bench.PASSES)
    assert set(result["torch"]) == set(bench.MATMULS)
    assert all(ms > 0 for group in result.values() for ms in group.values())
    expected_loss_sides = {"ours", "PML"} if losses_bench.load_pml()[0] else {"ours"}
    assert set(result["loss"]) == expected_loss_sides


def test_report_derives_the_bound_from_the_parts():
    result = {
        "xla": {
            "x̂·Ŵ": 10.0,
            "G·Ŵᵀ": 12.0,
            "x̂ᵀ·G": 18.0,
            "log-sum-exp": 3.0,
            "softmax gradient": 2.0,
        },
        "torch": {"x̂·Ŵ": 11.0, "G·Ŵᵀ": 13.0, "x̂ᵀ·G": 14.0},
        "loss": {"ours": 50.0, "PML": 130.0},
    }
    text = bench.report(result)
    assert "| three matmuls | 40.00 | 38.00 |" in text
    assert "ours − XLA's three matmuls: 10.00 ms (1.25× the matmuls)" in text
    assert "PML/ours 2.60; PML / XLA's three matmuls 3.25" in text


def test_without_torch_only_our_side_is_reported(monkeypatch):
    monkeypatch.setattr(bench, "torch_matmuls", lambda *a: None)
    monkeypatch.setattr(losses_bench, "load_pml", lambda: (None, "absent"))
    result = bench.measure(_args())
    assert result["torch"] == {} and set(result["loss"]) == {"ours"}
    text = bench.report(result)
    assert "| three matmuls |" in text and "PML/ours" not in text
    assert text.count("| – |") >= len(bench.MATMULS)


def test_a_matmul_that_differs_from_torch_is_refused():
    pytest.importorskip("torch")
    x, w, g = bench._operands(8, 4, 16)
    ours, theirs = bench.xla_parts(x, w, g), bench.torch_matmuls(x, w, g)
    bench.check_same_matmuls(ours, theirs)  # the same arrays pass
    ours["G·Ŵᵀ"] = lambda: 1.01 * np.asarray(bench.xla_parts(x, w, g)["G·Ŵᵀ"]())
    with pytest.raises(AssertionError, match="G·Ŵᵀ: XLA and torch differ"):
        bench.check_same_matmuls(ours, theirs)


def test_summary_compares_each_head_with_its_three_matmuls():
    parts = {name: 10.0 for name in bench.MATMULS}  # 30 ms of matmuls
    results = {
        ("cosface", 10_000): {"xla": parts, "torch": {}, "loss": {"ours": 33.0, "PML": 66.0}},
        ("arcface", 100_000): {"xla": parts, "torch": {}, "loss": {"ours": 60.0}},
    }
    lines = bench.summary_table(results).splitlines()
    assert "| cosface | 10,000 | 33.00 | 30.00 | 1.10 (met) | 66.00 | 2.00 |" in lines
    assert "| arcface | 100,000 | 60.00 | 30.00 | 2.00 (missed) | – | – |" in lines


def test_main_writes_every_configuration_to_out(tmp_path):
    out = tmp_path / "heads.md"
    argv = ["--loss", "cosface", "arcface", "--classes", "16", "24", "--batch", "8"]
    argv += ["--dim", "4", "--repeats", "1", "--block", "1", "--pause", "0", "--out", str(out)]
    assert bench.main(argv) == 0
    text = out.read_text()
    for head in ("cosface", "arcface"):
        for classes in (16, 24):
            assert f"### {head}, B = 8, D = 4, C = {classes}" in text
            assert f"| {head} | {classes} |" in text
    assert "python -m benchmarks.head_parts --loss cosface arcface" in text
