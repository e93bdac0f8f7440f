"""Networks of the experiments, in Flax NNX.

* :class:`LeNetPlusPlus` — the LeNet++ of Wen et al. 2016 (Fig. 2 / Sec. 3.1 of the Center Loss
  paper) as in pytorch-center-loss, which seed 001 follows: three stages of two 5×5 convolutions
  (32, 64, 128 channels, padding 2) with PReLU, each stage followed by 2×2 max-pooling, then a
  linear embedding of ``feat_dim`` with PReLU. ``init="torch"`` draws the weights as PyTorch
  does (what seed 001's model got); the default is Flax's.
* :class:`SmallResNet` — a ResNet-20-style network (He et al. 2016, CIFAR variant: 3 stages of
  basic blocks, 16/32/64 channels) ending in a ``feat_dim`` embedding, for CIFAR-10.

Both return the embedding; heads (a linear classifier for the softmax family, class weights for
margin losses, class centers) live beside them in :class:`EmbeddingModel`.

LeNet++ pools with :func:`max_pool_2x2`, equal to ``nnx.max_pool(x, (2, 2), (2, 2))`` in value
and gradient but much cheaper to differentiate on CPU (see its docstring;
``python -m benchmarks.train_step`` measures the step).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from mlx_jax.heads import CenterStore, ClassWeights


@jax.custom_vjp
def max_pool_2x2(x: jax.Array) -> jax.Array:
    """2×2 max-pooling with stride 2 of NHWC ``x`` (VALID: an odd last row/column is dropped),
    equal to ``nnx.max_pool(x, (2, 2), (2, 2))`` in value and gradient.

    The gradient goes, as reduce-window's and PyTorch's, to one element per window: the first
    maximum in row-major window order, which matters for ties (constant background regions of
    MNIST give many). XLA differentiates reduce-window max on CPU with an argmax reduce-window
    (four int32 index arrays) and a scatter; here the forward pass is a reshape and a max and
    the backward pass one elementwise loop, which costs less CPU time in the LeNet++ step.
    """
    return _windows(x).max(axis=(2, 4))


def _windows(x: jax.Array) -> jax.Array:
    """[B, H, W, C] → [B, H//2, 2, W//2, 2, C] (the 2×2 windows)."""
    b, h, w, c = x.shape
    return x[:, : h - h % 2, : w - w % 2].reshape(b, h // 2, 2, w // 2, 2, c)


def _max_pool_2x2_fwd(x):
    y = max_pool_2x2(x)
    return y, (x, y)


def _max_pool_2x2_bwd(residuals, g):
    x, y = residuals
    win = _windows(x)
    zero = jnp.zeros_like(g)
    taken = jnp.zeros(g.shape, bool)
    rows = []
    for i in range(2):
        row = []
        for j in range(2):
            last = i == 1 and j == 1
            pick = ~taken if last else (win[:, :, i, :, j] == y) & ~taken
            taken = taken | pick
            row.append(jnp.where(pick, g, zero))
        rows.append(jnp.stack(row, axis=3))  # [B, H//2, W//2, 2, C]
    dx = jnp.stack(rows, axis=2).reshape(win.shape[0], 2 * g.shape[1], 2 * g.shape[2], -1)
    pad = ((0, 0), (0, x.shape[1] - dx.shape[1]), (0, x.shape[2] - dx.shape[2]), (0, 0))
    return (jnp.pad(dx, pad),)


max_pool_2x2.defvjp(_max_pool_2x2_fwd, _max_pool_2x2_bwd)


INITS = ("flax", "torch")


def _torch_init(fan_in: int) -> dict:
    """PyTorch's default Conv/Linear initialisation: weight ``kaiming_uniform_(a=√5)`` and bias,
    both U(−1/√fan_in, 1/√fan_in) (torch.nn.Conv2d / Linear ``reset_parameters``). Flax's
    default (LeCun normal weights, zero bias) has √3 times the weight standard deviation."""
    bound = fan_in**-0.5

    def uniform(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return {"kernel_init": uniform, "bias_init": uniform}


CONVS = ("xla", "onednn")


class LeNetPlusPlus(nnx.Module):
    """``init``: ``"flax"`` (LeCun normal weights, zero biases) or ``"torch"``
    (:func:`_torch_init`, the initialisation of pytorch-center-loss's model).

    ``conv``: ``"xla"`` (``lax.conv_general_dilated``) or ``"onednn"``
    (:func:`experiments.onednn_conv.conv_general_dilated`: oneDNN's kernels through XLA's FFI
    on CPU, same math; the 1-channel first layer stays on XLA), on ``conv_threads`` OpenMP
    threads (default: the cores shared among the local CPU devices)."""

    def __init__(
        self,
        in_channels: int,
        feat_dim: int,
        *,
        width: int = 32,
        init: str = "flax",
        conv: str = "xla",
        conv_threads: int | None = None,
        rngs: nnx.Rngs,
    ):
        if init not in INITS:
            raise ValueError(f"init must be one of {list(INITS)}, got {init!r}")
        if conv not in CONVS:
            raise ValueError(f"conv must be one of {list(CONVS)}, got {conv!r}")
        conv_options = {}
        if conv == "onednn":
            from experiments import onednn_conv

            conv_options["conv_general_dilated"] = functools.partial(
                onednn_conv.conv_general_dilated, threads=conv_threads
            )

        def initializers(fan_in: int) -> dict:
            return _torch_init(fan_in) if init == "torch" else {}

        channels = [width, width, 2 * width, 2 * width, 4 * width, 4 * width]
        convs, acts = [], []
        previous = in_channels
        for c in channels:
            convs.append(
                nnx.Conv(
                    previous,
                    c,
                    (5, 5),
                    padding=2,
                    rngs=rngs,
                    **initializers(25 * previous),
                    **conv_options,
                )
            )
            acts.append(nnx.PReLU(0.25))  # PyTorch's PReLU init (pytorch-center-loss)
            previous = c
        self.convs = nnx.List(convs)
        self.acts = nnx.List(acts)
        self.flat_channels = previous
        flat = previous * 3 * 3
        self.embed = nnx.Linear(flat, feat_dim, rngs=rngs, **initializers(flat))
        self.embed_act = nnx.PReLU(0.25)

    def __call__(self, images: jax.Array) -> jax.Array:
        x = images
        for i, (conv, act) in enumerate(zip(self.convs, self.acts, strict=True)):
            x = act(conv(x))
            if i % 2 == 1:
                x = max_pool_2x2(x)
        if x.shape[1:3] != (3, 3):
            # 28×28 inputs give 3×3 after three poolings; others are pooled to 3×3.
            x = jax.image.resize(x, (x.shape[0], 3, 3, x.shape[3]), "linear")
        return self.embed_act(self.embed(x.reshape(x.shape[0], -1)))


class _BasicBlock(nnx.Module):
    def __init__(self, cin: int, cout: int, stride: int, *, axis_name: str | None, rngs: nnx.Rngs):
        self.conv1 = nnx.Conv(
            cin, cout, (3, 3), strides=stride, padding=1, use_bias=False, rngs=rngs
        )
        self.bn1 = nnx.BatchNorm(cout, axis_name=axis_name, rngs=rngs)
        self.conv2 = nnx.Conv(cout, cout, (3, 3), padding=1, use_bias=False, rngs=rngs)
        self.bn2 = nnx.BatchNorm(cout, axis_name=axis_name, rngs=rngs)
        self.project = (
            nnx.Conv(cin, cout, (1, 1), strides=stride, use_bias=False, rngs=rngs)
            if stride != 1 or cin != cout
            else None
        )

    def __call__(self, x):
        shortcut = x if self.project is None else self.project(x)
        y = jax.nn.relu(self.bn1(self.conv1(x)))
        return jax.nn.relu(self.bn2(self.conv2(y)) + shortcut)


class SmallResNet(nnx.Module):
    """``axis_name``: when training data-parallel under ``jax.shard_map``, the batch axis; the
    BatchNorm batch statistics are then averaged over it (synchronised BatchNorm), so they are
    the statistics of the global batch, as on one device."""

    def __init__(
        self,
        in_channels: int,
        feat_dim: int,
        *,
        blocks: int = 3,
        axis_name: str | None = None,
        rngs: nnx.Rngs,
    ):
        self.stem = nnx.Conv(in_channels, 16, (3, 3), padding=1, use_bias=False, rngs=rngs)
        self.stem_bn = nnx.BatchNorm(16, axis_name=axis_name, rngs=rngs)
        layers, cin = [], 16
        for stage, cout in enumerate([16, 32, 64]):
            for b in range(blocks):
                stride = 2 if (stage > 0 and b == 0) else 1
                layers.append(_BasicBlock(cin, cout, stride, axis_name=axis_name, rngs=rngs))
                cin = cout
        self.blocks = nnx.List(layers)
        self.embed = nnx.Linear(cin, feat_dim, rngs=rngs)

    def __call__(self, images: jax.Array) -> jax.Array:
        x = jax.nn.relu(self.stem_bn(self.stem(images)))
        for block in self.blocks:
            x = block(x)
        return self.embed(jnp.mean(x, axis=(1, 2)))


class EmbeddingModel(nnx.Module):
    """Backbone plus the heads a loss needs: ``classifier`` (linear, softmax family),
    ``class_weights`` (margin and proxy losses, ``class_weights_per_class`` columns per class),
    ``centers`` (center family) and ``loss_params`` (a loss's own trained values, e.g. the
    margin loss's β)."""

    def __init__(
        self,
        backbone: nnx.Module,
        feat_dim: int,
        num_classes: int,
        *,
        classifier: bool,
        class_weights: bool,
        centers: bool,
        trainable_centers: bool,
        rngs: nnx.Rngs,
        class_weights_per_class: int = 1,
        loss_params: dict[str, jax.Array] | None = None,
    ):
        self.backbone = backbone
        self.classifier = nnx.Linear(feat_dim, num_classes, rngs=rngs) if classifier else None
        self.class_weights = (
            ClassWeights(feat_dim, num_classes, per_class=class_weights_per_class, rngs=rngs)
            if class_weights
            else None
        )
        # Trained scalars or vectors of the loss itself (margin loss's β), by name.
        self.loss_params = (
            nnx.Dict({k: nnx.Param(jnp.asarray(v)) for k, v in loss_params.items()})
            if loss_params
            else None
        )
        self.centers = (
            CenterStore(
                num_classes,
                feat_dim,
                trainable=trainable_centers,
                rngs=rngs if trainable_centers else None,
            )
            if centers
            else None
        )

    def __call__(self, images: jax.Array) -> jax.Array:
        return self.backbone(images)
