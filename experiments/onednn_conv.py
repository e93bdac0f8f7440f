"""LeNet++'s convolutions on oneDNN, for the experiments' models on XLA:CPU.

Why: XLA:CPU's convolution kernels are slower than oneDNN's (what PyTorch runs) on LeNet++'s
small layers, the gap that kept our train step behind PyTorch's (BENCHMARKS.md, train step;
per-layer numbers in docs/notes.md). Called through XLA's FFI, oneDNN's kernels run inside the
jitted step, with no host round-trip.

How: ``onednn_conv.cc`` (next to this file) defines three XLA FFI handlers — forward, input
gradient (backward data), weight gradient (backward weights) — for a stride-1 convolution with
the same zero padding on every side, NHWC input, HWIO kernel, float32. oneDNN picks its own
layout (blocked, e.g. nChw8c on AVX2) and the handler reorders XLA's buffers into and out of it;
primitives are cached per shape. The library is compiled on first use with ``$CXX`` (default
``g++``) against jaxlib's FFI headers and oneDNN from the ``onednn-cpu-gomp`` and
``onednn-devel-cpu-gomp`` wheels (``pip install 'mlx_jax[onednn]'``), and cached under
``$MLX_JAX_CACHE`` (default ``$XDG_CACHE_HOME/mlx_jax`` or ``~/.cache/mlx_jax``) by a hash of
the source, the jaxlib version and oneDNN's location.

:func:`conv_general_dilated` is a drop-in for :func:`jax.lax.conv_general_dilated` (Flax's
``nnx.Conv(..., conv_general_dilated=...)``): it sends the convolutions oneDNN handles here to
it and everything else (strides, dilation, groups, other dtypes or layouts, one input channel —
LeNet++'s first layer, where neither kernel won clearly — or a non-CPU backend) to XLA.
Each call runs oneDNN on ``threads`` OpenMP threads — the driver passes cores // devices of its
data-parallel step (one per device with its one-device-per-core split), so devices do not fight
over the cores. Each call brings its own scratchpad, so one-thread calls (one per device) run at
once; calls on several threads take turns.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import importlib.metadata
import os
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from mlx_jax.parallel import match_varying_axes

__all__ = [
    "OneDNNUnavailable",
    "available",
    "conv_general_dilated",
    "conv_nhwc",
    "runnable_kernels",
    "threads_per_device",
    "unavailable_reason",
]

SOURCE = Path(__file__).with_name("onednn_conv.cc")
TARGETS = ("MlxConvForward", "MlxConvBackwardData", "MlxConvBackwardWeights")
LIBRARY_DIST, HEADERS_DIST = "onednn-cpu-gomp", "onednn-devel-cpu-gomp"
NHWC = ("NHWC", "HWIO", "NHWC")


class OneDNNUnavailable(RuntimeError):
    """oneDNN's convolutions cannot be used here (missing wheels, compiler or build failure)."""


def _dist_file(dist: str, suffix: str) -> Path:
    """The installed file of distribution ``dist`` whose path ends with ``suffix``."""
    try:
        files = importlib.metadata.files(dist) or []
    except importlib.metadata.PackageNotFoundError:
        raise OneDNNUnavailable(
            f"the {dist!r} wheel is not installed (pip install 'mlx_jax[onednn]')"
        ) from None
    for f in files:  # RECORD paths, relative to site-packages ("../../libdnnl.so.3")
        if f"/{f.as_posix()}".endswith(f"/{suffix}"):
            return Path(f.locate()).resolve()
    raise OneDNNUnavailable(f"the {dist!r} wheel has no file ending in {suffix!r}")


def _cache_dir() -> Path:
    if "MLX_JAX_CACHE" in os.environ:
        return Path(os.environ["MLX_JAX_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "mlx_jax"


def build() -> Path:
    """Compiles ``onednn_conv.cc`` (once per source, jaxlib and oneDNN) and returns the path of
    the shared library. Raises :class:`OneDNNUnavailable` naming what is missing."""
    library = _dist_file(LIBRARY_DIST, "libdnnl.so.3")
    headers = _dist_file(HEADERS_DIST, "include/oneapi/dnnl/dnnl.hpp").parents[2]
    compiler = os.environ.get("CXX", "g++")
    if shutil.which(compiler) is None:
        raise OneDNNUnavailable(f"no C++ compiler {compiler!r} on PATH (set $CXX)")
    ffi_headers = jax.ffi.include_dir()
    source = SOURCE.read_bytes()
    inputs = [source, importlib.metadata.version("jaxlib"), str(library), compiler]
    key = hashlib.sha256(repr(inputs).encode()).hexdigest()[:16]
    target = _cache_dir() / f"onednn_conv-{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        partial = Path(tmp) / target.name
        command = [
            compiler, "-O2", "-std=c++17", "-shared", "-fPIC", "-fopenmp", "-w",
            "-I", ffi_headers, "-I", str(headers), str(SOURCE),
            "-L", str(library.parent), f"-l:{library.name}", f"-Wl,-rpath,{library.parent}",
            "-o", str(partial),
        ]  # fmt: skip
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            raise OneDNNUnavailable(
                f"compiling {SOURCE.name} failed ({' '.join(command)}):\n{done.stderr[-2000:]}"
            )
        os.replace(partial, target)  # atomic: concurrent builders never see half a library
    return target


@functools.cache
def _register() -> str | None:
    """Builds, loads and registers the FFI targets once; the reason on failure, else None."""
    try:
        lib = ctypes.CDLL(str(build()))
    except (OneDNNUnavailable, OSError) as e:
        return str(e)
    for name in TARGETS:
        jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(lib, name)), platform="cpu")
    return None


def unavailable_reason() -> str | None:
    """Why oneDNN's convolutions cannot run here, or None when they can."""
    if jax.default_backend() != "cpu":
        return f"the default JAX backend is {jax.default_backend()!r}, not 'cpu'"
    return _register()


def runnable_kernels() -> list[str]:
    """The convolution kernels that can run here: ``["xla"]``, plus ``"onednn"`` where
    :func:`available` (what the benchmarks time by default)."""
    return ["xla", "onednn"] if available() else ["xla"]


def available() -> bool:
    """Whether :func:`conv_nhwc` can run here (CPU backend, wheels installed, library built)."""
    return unavailable_reason() is None


def _require() -> None:
    reason = unavailable_reason()
    if reason is not None:
        raise OneDNNUnavailable(reason)


def cores() -> int:
    """The cores this process may run on."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def threads_per_device(devices: int | None = None) -> int:
    """OpenMP threads per call: this process's cores shared among ``devices`` devices that run
    at once (default: every local CPU device)."""
    devices = jax.local_device_count("cpu") if devices is None else devices
    return max(1, cores() // max(1, devices))


def _call(target: str, shape: tuple[int, ...], a, b, padding: int, threads: int) -> jax.Array:
    result = jax.ShapeDtypeStruct(shape, jnp.float32)
    call = jax.ffi.ffi_call(target, result, vmap_method="sequential")
    out = call(a, b, padding=np.int64(padding), threads=np.int64(threads))
    # ffi_call types its result as the same on every shard_map device; it varies as the
    # (matched) inputs do, and custom_vjp checks that the cotangents say so
    axes = tuple(sorted(jax.typeof(a).manual_axis_type.varying))
    return jax.lax.pcast(out, axes, to="varying") if axes else out


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _conv(x, w, padding: int, threads: int):
    n, h, width, _ = x.shape
    kh, kw, _, c_out = w.shape
    shape = (n, h + 2 * padding - kh + 1, width + 2 * padding - kw + 1, c_out)
    return _call("MlxConvForward", shape, x, w, padding, threads)


def _conv_fwd(x, w, padding, threads):
    return _conv(x, w, padding, threads), (x, w)


def _conv_bwd(padding, threads, residuals, dy):
    x, w = residuals
    dx = _call("MlxConvBackwardData", x.shape, dy, w, padding, threads)
    dw = _call("MlxConvBackwardWeights", w.shape, x, dy, padding, threads)
    return dx, dw


_conv.defvjp(_conv_fwd, _conv_bwd)


def conv_nhwc(x: jax.Array, w: jax.Array, padding: int, threads: int | None = None) -> jax.Array:
    """y = x ⋆ w on oneDNN: stride 1, ``padding`` zeros on every side of the image.

    Args:
      x: [N, H, W, C_in] float32 images.
      w: [KH, KW, C_in, C_out] float32 kernel (Flax's HWIO).
      padding: zero rows/columns added on each side, >= 0.
      threads: OpenMP threads for oneDNN; default :func:`threads_per_device`.

    Returns:
      [N, H + 2p − KH + 1, W + 2p − KW + 1, C_out] float32, equal to
      ``lax.conv_general_dilated(x, w, (1, 1), ((p, p), (p, p)), dimension_numbers=("NHWC",
      "HWIO", "NHWC"))`` to float32 rounding. Reverse-mode differentiable (``jax.grad``); the
      gradients are oneDNN's backward-data and backward-weights convolutions.

    Raises :class:`OneDNNUnavailable` where oneDNN cannot run and ``ValueError`` for bad shapes.
    """
    x, w = jnp.asarray(x), jnp.asarray(w)
    if x.ndim != 4 or w.ndim != 4 or x.shape[3] != w.shape[2]:
        raise ValueError(
            f"x must be [N, H, W, C_in] and w [KH, KW, C_in, C_out] with the same C_in, got "
            f"x {tuple(x.shape)} and w {tuple(w.shape)}"
        )
    if x.dtype != jnp.float32 or w.dtype != jnp.float32:
        raise ValueError(f"x and w must be float32, got {x.dtype} and {w.dtype}")
    if int(padding) != padding or padding < 0:
        raise ValueError(f"padding must be an integer >= 0, got {padding!r}")
    for side, k in ((x.shape[1], w.shape[0]), (x.shape[2], w.shape[1])):
        if side + 2 * padding < k:
            raise ValueError(
                f"the padded image ({x.shape[1]}×{x.shape[2]} + 2·{padding}) is smaller than "
                f"the {w.shape[0]}×{w.shape[1]} kernel"
            )
    if threads is not None and (int(threads) != threads or threads < 1):
        raise ValueError(f"threads must be an integer >= 1, got {threads!r}")
    _require()
    # Under shard_map, replicated weights beside sharded images: cast them to varying as JAX's
    # own autodiff does, so the weight gradient is summed over the devices (the exact gradient)
    x, w = match_varying_axes(x, w)
    return _conv(x, w, int(padding), threads or threads_per_device())


def _symmetric_padding(padding, kernel: Sequence[int]) -> int | None:
    """The single per-side padding p that ``padding`` means, or None if sides differ."""
    if isinstance(padding, str):
        if padding.upper() == "VALID":
            return 0
        if padding.upper() == "SAME" and all(k % 2 == 1 for k in kernel):
            pads = {(k - 1) // 2 for k in kernel}
            return pads.pop() if len(pads) == 1 else None
        return None
    pairs = [tuple(int(v) for v in pair) for pair in padding]
    values = {v for pair in pairs for v in pair}
    return values.pop() if len(pairs) == 2 and len(values) == 1 else None


def _onednn_padding(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                    dimension_numbers, feature_group_count, batch_group_count,
                    preferred_element_type, out_sharding) -> int | None:  # fmt: skip
    """p when oneDNN's convolution computes this call, None when XLA's must."""
    if lhs.ndim != 4 or rhs.ndim != 4 or lhs.dtype != jnp.float32 or rhs.dtype != jnp.float32:
        return None
    if tuple(window_strides) != (1, 1) or feature_group_count != 1 or batch_group_count != 1:
        return None
    for dilation in (lhs_dilation, rhs_dilation):
        if dilation is not None and tuple(dilation) != (1, 1):
            return None
    if preferred_element_type not in (None, jnp.float32) or out_sharding is not None:
        return None
    nhwc = jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, NHWC)
    if jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers) != nhwc:
        return None
    if rhs.shape[2] < 2:  # one input channel: left to XLA (module docstring)
        return None
    pad = _symmetric_padding(padding, rhs.shape[:2])
    if pad is None or pad < 0 or not available():
        return None
    return pad


def conv_general_dilated(
    lhs,
    rhs,
    window_strides,
    padding,
    lhs_dilation=None,
    rhs_dilation=None,
    dimension_numbers=None,
    feature_group_count: int = 1,
    batch_group_count: int = 1,
    precision=None,
    preferred_element_type=None,
    out_sharding=None,
    *,
    threads: int | None = None,
) -> jax.Array:
    """:func:`jax.lax.conv_general_dilated` with the same arguments, run on oneDNN
    (:func:`conv_nhwc`, ``threads`` OpenMP threads, default :func:`threads_per_device`) where
    it applies (module docstring) and on XLA otherwise.

    ``precision`` is ignored on the oneDNN path (float32 throughout, as XLA:CPU computes
    float32 convolutions at every precision setting)."""
    pad = _onednn_padding(
        lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
        feature_group_count, batch_group_count, preferred_element_type, out_sharding,
    )  # fmt: skip
    if pad is not None:
        return conv_nhwc(lhs, rhs, pad, threads)
    return jax.lax.conv_general_dilated(
        lhs,
        rhs,
        window_strides,
        padding,
        lhs_dilation=lhs_dilation,
        rhs_dilation=rhs_dilation,
        dimension_numbers=dimension_numbers,
        feature_group_count=feature_group_count,
        batch_group_count=batch_group_count,
        precision=precision,
        preferred_element_type=preferred_element_type,
        out_sharding=out_sharding,
    )
