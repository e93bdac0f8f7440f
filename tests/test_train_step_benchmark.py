"""``python -m benchmarks.train_step`` on a tiny batch: it times the driver's step and the
PyTorch twin, writes its table and JSON, and the twin is the same network (parameter count and,
with our weights copied in, the same embeddings). Speed itself is never asserted."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

from benchmarks import train_step as bench
from experiments import driver, onednn_conv

torch = pytest.importorskip("torch")

TINY = "--batch 8 --repeats 2 --block 1 --pause 0 --warmup 1 --settle 0".split()
# the default --convs: XLA's kernels, and oneDNN's where they can run here
KERNELS = onednn_conv.runnable_kernels()


def test_times_ours_and_pytorch_and_writes_the_table(tmp_path, capsys):
    out = tmp_path / "train_step.md"
    assert bench.main([*TINY, "--nnx-pool", "--out", str(out)]) == 0
    rows = json.loads(out.with_suffix(".json").read_text())["rows"]
    sides = {(r["loss"], r["side"]) for r in rows}
    for loss in ("xent", "standalone"):
        ours = {(loss, f"ours, {kernels}") for kernels in KERNELS}
        assert ours | {(loss, "ours, nnx.max_pool"), (loss, "PyTorch")} <= sides
        params = {r["params"] for r in rows if r["loss"] == loss}
        assert len(params) == 1, params  # the same parameter count on every side
    for r in rows:
        assert len(r["times"]) == 2 and all(t > 0 for t in r["times"])
        assert np.isfinite(r["images_per_s"])
    table = out.read_text()
    assert "| xent | ours, xla |" in table and "| standalone | PyTorch |" in table


def test_without_torch_only_ours(tmp_path):
    out = tmp_path / "t.md"
    assert bench.main([*TINY, "--losses", "xent", "--no-torch", "--out", str(out)]) == 0
    rows = json.loads(out.with_suffix(".json").read_text())["rows"]
    assert [r["side"] for r in rows] == [f"ours, {kernels}" for kernels in KERNELS]


def test_convs_picks_the_kernels_and_refuses_onednn_where_it_cannot_run(
    tmp_path, monkeypatch, capsys
):
    out = tmp_path / "t.md"
    argv = [*TINY, "--losses", "xent", "--no-torch", "--out", str(out)]
    assert bench.main([*argv, "--convs", "xla"]) == 0
    rows = json.loads(out.with_suffix(".json").read_text())["rows"]
    assert [r["side"] for r in rows] == ["ours, xla"]
    monkeypatch.setattr(onednn_conv, "unavailable_reason", lambda: "no oneDNN in this test")
    with pytest.raises(SystemExit):
        bench.main([*argv, "--convs", "onednn"])
    assert "--convs onednn cannot run here: no oneDNN in this test" in capsys.readouterr().err


def test_pytorch_twin_is_the_same_network():
    cfg = driver.Config(dataset="mnist", loss="xent", devices=1)
    backbone = driver.build_model(cfg, bench.IMAGE_SHAPE, bench.NUM_CLASSES).backbone
    net = bench.torch_lenet(torch, cfg.feat_dim)
    convs = [m for m in net.features if isinstance(m, torch.nn.Conv2d)]
    acts = [m for m in net.features if isinstance(m, torch.nn.PReLU)]
    with torch.no_grad():
        for conv, act, ours, ours_act in zip(
            convs, acts, backbone.convs, backbone.acts, strict=True
        ):
            conv.weight.copy_(
                torch.from_numpy(np.array(ours.kernel[...]).transpose(3, 2, 0, 1).copy())
            )
            conv.bias.copy_(torch.from_numpy(np.array(ours.bias[...])))
            act.weight.fill_(float(ours_act.negative_slope[...]))
        # ours flattens [3, 3, C] (NHWC), torch [C, 3, 3]
        kernel = np.array(backbone.embed.kernel[...])
        kernel = kernel.reshape(9, -1, cfg.feat_dim).transpose(1, 0, 2).reshape(kernel.shape)
        net.embed.weight.copy_(torch.from_numpy(np.ascontiguousarray(kernel.T)))
        net.embed.bias.copy_(torch.from_numpy(np.array(backbone.embed.bias[...])))
    params = sum(int(p.size) for p in jax.tree.leaves(nnx.state(backbone, nnx.Param)))
    assert params == sum(p.numel() for p in net.parameters())
    images, _, _ = bench._data(4, seed=1)
    ours = np.asarray(backbone(images))
    with torch.no_grad():
        theirs = net(torch.from_numpy(images.transpose(0, 3, 1, 2).copy())).numpy()
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("opt_out", ["", "1"])
def test_reuse_freed_memory_applies_or_opts_out(opt_out):
    """In a fresh process (the setting is process-wide): glibc accepts it on Linux, and
    MLX_JAX_DEFAULT_MALLOC=1 leaves the defaults."""
    code = "from experiments.allocator import reuse_freed_memory as r; print(r())"
    env = {**os.environ, "MLX_JAX_DEFAULT_MALLOC": opt_out}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    ).stdout.strip()
    if opt_out:
        assert out == "False"
    elif sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc":
        assert out == "True"
