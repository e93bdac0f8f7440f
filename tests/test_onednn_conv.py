"""experiments/onednn_conv.py: oneDNN's convolutions through XLA's FFI equal XLA's convolution
in value and in both gradients, are used exactly where they apply, and fail by name."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from experiments import driver, onednn_conv
from experiments.config import ConfigError
from experiments.models import LeNetPlusPlus
from tests.test_experiments import data_dir, history, train  # noqa: F401  (data_dir: fixture)

NHWC = ("NHWC", "HWIO", "NHWC")
REASON = onednn_conv.unavailable_reason()
needs_onednn = pytest.mark.skipif(REASON is not None, reason=f"oneDNN unavailable: {REASON}")


def xla_conv(x, w, padding):
    return jax.lax.conv_general_dilated(
        x, w, (1, 1), ((padding, padding), (padding, padding)), dimension_numbers=NHWC
    )


def random(shape, seed):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape, dtype=np.float32))


def assert_close(actual, expected, what):
    scale = float(jnp.max(jnp.abs(expected))) or 1.0
    error = float(jnp.max(jnp.abs(actual - expected))) / scale
    assert error < 2e-6, f"{what}: relative error {error:.2e}"


@needs_onednn
@pytest.mark.parametrize(
    ("x_shape", "kernel", "c_out", "padding"),
    [
        ((2, 9, 11, 3), (5, 3), 4, 0),  # non-square image and kernel, no padding
        ((2, 9, 11, 3), (5, 3), 4, 1),
        ((3, 7, 7, 8), (5, 5), 6, 2),  # LeNet++'s 7×7 stage: padded image 11×11
        ((2, 28, 28, 32), (5, 5), 32, 2),  # LeNet++'s widest layer
        ((1, 4, 4, 2), (3, 3), 1, 3),  # padding wider than the kernel's reach
    ],
)
@pytest.mark.parametrize("jit", [False, True])
def test_value_and_both_gradients_equal_xla(x_shape, kernel, c_out, padding, jit):
    x = random(x_shape, 0)
    w = random((*kernel, x_shape[3], c_out), 1)

    def ours(x, w):
        return onednn_conv.conv_nhwc(x, w, padding)

    def theirs(x, w):
        return xla_conv(x, w, padding)

    expected, xla_vjp = jax.vjp(theirs, x, w)
    cotangent = random(expected.shape, 2)
    value_and_vjp = jax.jit(lambda x, w, g: (ours(x, w), jax.vjp(ours, x, w)[1](g)))
    if not jit:
        value_and_vjp = value_and_vjp.__wrapped__
    value, (dx, dw) = value_and_vjp(x, w, cotangent)
    expected_dx, expected_dw = xla_vjp(cotangent)
    assert value.shape == expected.shape and value.dtype == jnp.float32
    assert_close(value, expected, "y")
    assert_close(dx, expected_dx, "dx")
    assert_close(dw, expected_dw, "dw")


@needs_onednn
def test_thread_count_does_not_change_the_result():
    x, w = random((4, 14, 14, 8), 3), random((5, 5, 8, 16), 4)
    one = onednn_conv.conv_nhwc(x, w, 2, threads=1)
    two = onednn_conv.conv_nhwc(x, w, 2, threads=2)
    assert_close(two, one, "y")


def _custom_calls(fn, *args) -> int:
    return jax.jit(fn).lower(*args).as_text().count("MlxConvForward")


@needs_onednn
def test_conv_general_dilated_uses_onednn_only_where_it_applies():
    x, w = random((2, 8, 8, 4), 5), random((3, 3, 4, 5), 6)

    defaults = {"window_strides": (1, 1), "padding": ((1, 1), (1, 1)), "dimension_numbers": NHWC}

    def call(x, w, **options):
        return onednn_conv.conv_general_dilated(x, w, **{**defaults, **options})

    supported = [{}, {"padding": "SAME"}, {"padding": "VALID"}, {"padding": ((0, 0), (0, 0))}]
    for options in supported:
        assert _custom_calls(lambda x, w, o=options: call(x, w, **o), x, w) == 1, options
    x_nchw = jnp.transpose(x, (0, 3, 1, 2))
    unsupported = [
        (x, w, {"window_strides": (2, 2)}),
        (x, w, {"rhs_dilation": (2, 2)}),
        (x, w, {"lhs_dilation": (2, 2)}),
        (x, w, {"padding": ((1, 1), (0, 0))}),  # different padding per side
        (x, w, {"padding": ((1, 0), (1, 0))}),
        (x, w[:, :, :2, :4], {"feature_group_count": 2}),
        (x[..., :1], w[:, :, :1], {}),  # one input channel: XLA's is faster
        (x.astype(jnp.bfloat16), w.astype(jnp.bfloat16), {}),
        (x_nchw, w, {"dimension_numbers": ("NCHW", "HWIO", "NCHW")}),
    ]
    for a, b, options in unsupported:
        ours = call(a, b, **options)
        theirs = jax.lax.conv_general_dilated(a, b, **{**defaults, **options})
        np.testing.assert_array_equal(np.asarray(ours), np.asarray(theirs))
        assert _custom_calls(lambda a, b, o=options: call(a, b, **o), a, b) == 0, options


@needs_onednn
def test_lenet_gives_the_same_embeddings_and_gradients_with_either_convolution():
    images = jnp.asarray(np.random.default_rng(7).random((4, 28, 28, 1), dtype=np.float32))
    results = []
    for conv in ("xla", "onednn"):
        model = LeNetPlusPlus(1, 2, width=8, conv=conv, rngs=nnx.Rngs(0))
        graphdef, params = nnx.split(model)

        def loss(p, graphdef=graphdef):
            return jnp.sum(nnx.merge(graphdef, p)(images) ** 2)

        value, grads = jax.jit(jax.value_and_grad(loss))(params)
        results.append((nnx.merge(graphdef, params)(images), value, grads))
    (out_x, loss_x, grads_x), (out_o, loss_o, grads_o) = results
    np.testing.assert_allclose(out_o, out_x, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(loss_o, loss_x, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(grads_o), jax.tree.leaves(grads_x), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * float(np.abs(b).max()))


@needs_onednn
def test_the_driver_trains_the_same_with_either_convolution(data_dir, tmp_path):  # noqa: F811
    common = ["--loss", "cent", "--epochs", "2", "--lr", "0.05"]
    train(data_dir, tmp_path / "xla", *common, "--conv", "xla")
    train(data_dir, tmp_path / "onednn", *common, "--conv", "onednn")
    xla, onednn = history(tmp_path / "xla"), history(tmp_path / "onednn")
    for a, b in zip(onednn, xla, strict=True):
        np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-3)
        assert abs(a["accuracy"] - b["accuracy"]) <= 1 / 160 + 1e-9


TWO_PASSES = """
import sys
import jax, jax.numpy as jnp, numpy as np
from flax import nnx
from experiments.models import LeNetPlusPlus
threads = int(sys.argv[1])
a, b = (jnp.asarray(np.random.default_rng(s).normal(size=(32, 28, 28, 1)), jnp.float32) for s in (0, 1))
step = nnx.jit(lambda m: nnx.value_and_grad(lambda m: jnp.sum(m(a) * m(b)))(m))
reference = jax.tree.leaves(step(LeNetPlusPlus(1, 8, width=4, conv="xla", rngs=nnx.Rngs(0))))
model = LeNetPlusPlus(1, 8, width=4, conv="onednn", conv_threads=threads, rngs=nnx.Rngs(0))
for _ in range(100):
    # calls at once must not share scratch memory: every step equals XLA's convolutions
    for x, y in zip(jax.tree.leaves(step(model)), reference, strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-4 * float(np.abs(y).max()))
print("done")
"""


@needs_onednn
@pytest.mark.parametrize("threads", [1, 2])
def test_independent_convolutions_in_one_program_do_not_hang(threads):
    # Two forward passes in one step: XLA may run their convolutions at once — on one thread
    # each truly at once (as two devices do), on two threads each in turn. While oneDNN's
    # shared scratchpad held the weight-gradient barrier this hung within a few dozen steps
    # (a subprocess, so a regression fails by timeout instead of hanging the suite).
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-c", TWO_PASSES, str(threads)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0 and "done" in done.stdout, done.stderr[-2000:]


@pytest.mark.parametrize(
    ("x_shape", "w_shape", "dtype", "padding", "message"),
    [
        ((2, 8, 8), (3, 3, 4, 5), "float32", 1, r"x must be \[N, H, W, C_in\]"),
        ((2, 8, 8, 3), (3, 3, 4, 5), "float32", 1, r"same C_in, got x \(2, 8, 8, 3\)"),
        ((2, 8, 8, 4), (3, 3, 4, 5), "float16", 1, "x and w must be float32, got float16"),
        ((2, 8, 8, 4), (3, 3, 4, 5), "float32", -1, "padding must be an integer >= 0, got -1"),
        ((2, 2, 2, 4), (5, 5, 4, 5), "float32", 1, r"smaller than the 5×5 kernel"),
    ],
)
def test_bad_arguments_are_refused_by_name(x_shape, w_shape, dtype, padding, message):
    x, w = jnp.zeros(x_shape, dtype), jnp.zeros(w_shape, dtype)
    with pytest.raises(ValueError, match=message):
        onednn_conv.conv_nhwc(x, w, padding)
    with pytest.raises(ValueError, match="threads must be an integer >= 1, got 0"):
        onednn_conv.conv_nhwc(jnp.zeros((1, 4, 4, 2)), jnp.zeros((3, 3, 2, 2)), 1, threads=0)


def test_unknown_convolution_is_refused_by_name():
    with pytest.raises(ValueError, match=r"conv must be one of \['xla', 'onednn'\], got 'cudnn'"):
        LeNetPlusPlus(1, 2, conv="cudnn", rngs=nnx.Rngs(0))


def test_a_missing_wheel_is_named(monkeypatch):
    monkeypatch.setattr(onednn_conv, "LIBRARY_DIST", "no-such-onednn-wheel")
    with pytest.raises(onednn_conv.OneDNNUnavailable, match="'no-such-onednn-wheel' wheel is not"):
        onednn_conv.build()


def test_a_missing_compiler_is_named(monkeypatch):
    if REASON is not None and "wheel" in REASON:
        pytest.skip(f"the oneDNN wheels are needed to reach the compiler check: {REASON}")
    monkeypatch.setenv("CXX", "no-such-compiler++")
    with pytest.raises(onednn_conv.OneDNNUnavailable, match="no C\\+\\+ compiler 'no-such-"):
        onednn_conv.build()


def test_driver_conv_flag_falls_back_or_fails_by_name(monkeypatch):
    monkeypatch.setattr(onednn_conv, "unavailable_reason", lambda: "no oneDNN in this test")
    assert driver.resolve_conv("auto") == "xla"
    assert driver.resolve_conv("xla") == "xla"
    with pytest.raises(ConfigError, match="--conv onednn cannot run here: no oneDNN in this test"):
        driver.resolve_conv("onednn")
    monkeypatch.setattr(onednn_conv, "unavailable_reason", lambda: None)
    assert driver.resolve_conv("auto") == "onednn"
