"""Pictures of learned features: 2-D scatter per epoch, train | test panels, animated GIFs.

Seed 001 shows, for every loss and dataset, the 2-D features of the train and validation sets as
one GIF frame per epoch, and a static picture for 128-D features. This module draws those
frames with matplotlib's object API (``matplotlib.figure.Figure`` rendered by Agg: no pyplot, no
global backend switch, no GUI) and assembles GIFs with imageio + Pillow.

* Colours: a 10-colour qualitative palette (matplotlib's ``tab10``) indexed by label; more than
  10 classes use ``tab20`` and then cycle.
* Points are drawn in one call in a fixed pseudo-random order, so no class systematically hides
  another; small markers and an alpha that falls with the number of points keep dense clouds
  readable.
* Figures have a fixed size (5×5.6 in for one panel, 10×5.6 in for two, 100 dpi) and a fixed
  layout, so all frames of a GIF have the same pixel size; with :func:`common_limits` they also
  share axes and don't jump. Axes are square with equal aspect, so angles and distances look
  right (the geometry is what the losses shape).
* Features with more than 2 dimensions are projected to their first two principal components
  (:func:`project_2d`) and the title says so.
* PNGs are stored as 8-bit palette images (class colours and greys kept exact, blends mapped to
  the nearest of 256 colours): ~40–50 kB per panel of 10k–60k points. Pillow, used for that and
  for GIFs, is a dependency of matplotlib.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np

try:
    from matplotlib import colormaps
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
except ImportError as error:  # the losses need none of this: it is the experiments' extra
    raise ImportError(
        "mlx_jax.viz needs matplotlib (and imageio for GIFs), which `pip install mlx_jax` "
        "leaves out: pip install 'mlx_jax[experiments]'"
    ) from error

__all__ = [
    "PCA2D",
    "fit_pca_2d",
    "project_2d",
    "common_limits",
    "scatter_features",
    "train_test_figure",
    "roc_figure",
    "make_gif",
]

Limits = tuple[tuple[float, float], tuple[float, float]]
ClassNames = Sequence[str] | Mapping[int, str]

DPI = 100
# Fixed layouts, in inches: a square axes of AXES_SIZE, tick labels below and left of it, the
# title(s) above, the legend (at most 3 rows for one panel, 2 for two) at the bottom.
SINGLE_SIZE = (5.0, 5.6)
DOUBLE_SIZE = (10.0, 5.6)
AXES_SIZE = 4.25
AXES_LEFT = 0.55
SINGLE_AXES_BOTTOM = 0.95
DOUBLE_AXES_BOTTOM = 0.8
MAX_LEGEND_ENTRIES = 30
GRID_GREY = "0.9"
MARGIN = 0.05  # fraction of the span added on each side by common_limits


# --------------------------------------------------------------------------------------------
# Validation


def _features(features, name: str, min_dim: int = 2) -> np.ndarray:
    x = np.asarray(features)
    if not np.issubdtype(x.dtype, np.floating):
        raise TypeError(f"{name} must be a floating-point array [num_points, dim], got {x.dtype}")
    if x.ndim != 2 or x.shape[0] < 1 or x.shape[1] < min_dim:
        raise ValueError(
            f"{name} must have shape [num_points, dim] with num_points >= 1 and dim >= {min_dim}, "
            f"got shape {list(x.shape)}"
        )
    if not np.all(np.isfinite(x)):
        raise ValueError(f"{name} must be finite, but contains NaN or inf values")
    return x.astype(np.float64)


def _labels(labels, num_points: int, name: str) -> np.ndarray:
    y = np.asarray(labels)
    if not np.issubdtype(y.dtype, np.integer):
        raise TypeError(
            f"{name} must be an integer array of class ids [{num_points}], got {y.dtype}"
        )
    if y.shape != (num_points,):
        raise ValueError(
            f"{name} must have shape [{num_points}] (one class id per point), got {list(y.shape)}"
        )
    if y.size and y.min() < 0:
        raise ValueError(f"{name} must be >= 0, got {y.min()}")
    return y.astype(np.int64)


def _hollow(hollow, num_points: int, name: str = "hollow") -> np.ndarray:
    if hollow is None:
        return np.zeros(num_points, bool)
    h = np.asarray(hollow)
    if h.dtype != np.bool_ or h.shape != (num_points,):
        raise ValueError(
            f"{name} must be a boolean mask of shape [{num_points}], "
            f"got dtype {h.dtype} and shape {list(h.shape)}"
        )
    return h


def _limits(limits) -> Limits:
    try:
        (x0, x1), (y0, y1) = limits
        x0, x1, y0, y1 = (float(v) for v in (x0, x1, y0, y1))
    except (TypeError, ValueError):
        raise ValueError(
            f"limits must be ((xmin, xmax), (ymin, ymax)) numbers, got {limits!r}"
        ) from None
    if not (np.isfinite([x0, x1, y0, y1]).all() and x0 < x1 and y0 < y1):
        raise ValueError(f"limits must be finite with xmin < xmax and ymin < ymax, got {limits!r}")
    return (x0, x1), (y0, y1)


def _class_name(class_names: ClassNames | None, label: int) -> str:
    if class_names is None:
        return str(label)
    try:
        return str(class_names[label])
    except (IndexError, KeyError):
        raise ValueError(f"class_names has no entry for label {label}") from None


# --------------------------------------------------------------------------------------------
# Projection and limits


class PCA2D(NamedTuple):
    """A 2-D PCA projection: ``(x − mean) @ components.T``."""

    mean: np.ndarray  # [D]
    components: np.ndarray  # [2, D], orthonormal rows


def fit_pca_2d(features) -> PCA2D:
    """First two principal axes of ``features`` [N, D] (D >= 2), by SVD of the centered data.

    PCA (Pearson 1901; Hotelling 1933): with X̃ = X − mean(X) = U·S·Vᵀ, the components are the
    first two rows of Vᵀ (largest singular values first). The sign of each component is fixed
    so that its entry of largest magnitude is positive (ties: the first such entry), which makes
    the projection deterministic — SVD alone defines each axis only up to sign. Degenerate data
    (rank < 2) still gives two orthonormal components.
    """
    x = _features(features, "features")
    mean = x.mean(axis=0)
    centered = x - mean
    if len(centered) < 2:  # zero rows leave the right singular vectors as they are
        centered = np.concatenate([centered, np.zeros((2 - len(centered), x.shape[1]))])
    components = np.linalg.svd(centered, full_matrices=False)[2][:2]
    signs = np.sign(components[np.arange(2), np.argmax(np.abs(components), axis=1)])
    return PCA2D(mean, components * np.where(signs == 0, 1.0, signs)[:, None])


def project_2d(features, pca: PCA2D | None = None) -> np.ndarray:
    """Projects ``features`` [N, D] onto 2 principal components → [N, 2] (float64).

    ``pca`` defaults to :func:`fit_pca_2d` of ``features`` itself; pass the PCA fitted on the
    training features to draw the test features in the same coordinates. For D = 2 this is a
    rotation (and reflection) of the centered points, not the identity — the plotting functions
    only project when D > 2.
    """
    x = _features(features, "features")
    if pca is None:
        pca = fit_pca_2d(x)
    if pca.components.shape != (2, x.shape[1]):
        raise ValueError(
            f"pca.components must have shape [2, {x.shape[1]}] (dim of features), "
            f"got {list(pca.components.shape)}"
        )
    return (x - pca.mean) @ pca.components.T


def common_limits(feature_arrays: Sequence, *, margin: float = MARGIN) -> Limits:
    """Square axis limits ((xmin, xmax), (ymin, ymax)) containing every point of every array.

    Use the result as ``limits`` for all frames of a GIF so the axes don't jump between epochs.
    The limits are centered on the bounding box of all [N_i, 2] arrays, span its larger side
    plus ``margin`` of it on each side, and are the same span on both axes (equal aspect).
    """
    if isinstance(feature_arrays, np.ndarray) or not len(feature_arrays):
        raise ValueError("feature_arrays must be a non-empty sequence of [num_points, 2] arrays")
    if margin < 0:
        raise ValueError(f"margin must be >= 0, got {margin}")
    low = np.full(2, np.inf)
    high = np.full(2, -np.inf)
    for i, features in enumerate(feature_arrays):
        x = _features(features, f"feature_arrays[{i}]")
        if x.shape[1] != 2:
            raise ValueError(
                f"feature_arrays[{i}] must have shape [num_points, 2] (project first), "
                f"got {list(x.shape)}"
            )
        low = np.minimum(low, x.min(axis=0))
        high = np.maximum(high, x.max(axis=0))
    return _square(low, high, margin)


def _square(low: np.ndarray, high: np.ndarray, margin: float) -> Limits:
    center = (low + high) / 2
    half = max(float(np.max(high - low)) / 2, 1e-6 * max(1.0, float(np.max(np.abs(center)))))
    half *= 1 + 2 * margin
    return (
        (float(center[0] - half), float(center[0] + half)),
        (float(center[1] - half), float(center[1] + half)),
    )


# --------------------------------------------------------------------------------------------
# Drawing


def _colors(labels: np.ndarray) -> np.ndarray:
    """RGBA [N, 4]: tab10 for labels < 10 when there are at most 10 classes, else tab20."""
    num = int(labels.max()) + 1
    cmap = colormaps["tab10" if num <= 10 else "tab20"]
    return np.asarray(cmap.colors)[labels % len(cmap.colors)]


def _marker_style(num_points: int) -> tuple[float, float]:
    """(marker area in pt², alpha): smaller and more transparent for dense clouds."""
    size = float(np.clip(30000 / num_points, 2.0, 16.0))
    alpha = float(np.clip(5000 / num_points, 0.3, 0.9))
    return size, alpha


def _draw(ax, x: np.ndarray, labels: np.ndarray, hollow: np.ndarray, limits: Limits) -> None:
    colors = _colors(labels)
    size, alpha = _marker_style(len(x))
    order = np.random.default_rng(0).permutation(len(x))  # fair overlap between classes
    filled = order[~hollow[order]]
    empty = order[hollow[order]]
    if len(filled):
        ax.scatter(
            x[filled, 0],
            x[filled, 1],
            s=size,
            c=colors[filled],
            alpha=alpha,
            linewidths=0,
            rasterized=True,
        )
    if len(empty):
        ax.scatter(
            x[empty, 0],
            x[empty, 1],
            s=size * 2.5,
            facecolors="none",
            edgecolors=colors[empty],
            alpha=min(1.0, alpha + 0.2),
            linewidths=0.6,
            rasterized=True,
        )
    (x0, x1), (y0, y1) = limits
    ax.set_xlim(x0, x1)
    ax.set_ylim(y0, y1)
    ax.set_aspect("equal", adjustable="box")
    ax.tick_params(labelsize=7, length=2, pad=2)
    ax.set_axisbelow(True)  # grid under the points
    # A crisp 1-pixel grid in one exact grey (survives palette reduction without tinting).
    ax.grid(True, linewidth=72 / DPI, color=GRID_GREY, antialiased=False)


def _legend(
    fig: Figure,
    labels: np.ndarray,
    class_names,
    hollow_label: str | None,
    *,
    ncols: int,
    max_rows: int,
    bottom: float,
) -> None:
    """One legend entry per class present (plus the hollow marker) centered at the bottom of the
    figure, in at most ``max_rows`` rows (more columns if needed), read row by row. With more
    than MAX_LEGEND_ENTRIES entries the legend is omitted (colours repeat anyway)."""
    classes = np.unique(labels)
    if len(classes) > MAX_LEGEND_ENTRIES:
        fig.text(0.5, bottom, f"{len(classes)} classes (legend omitted)", ha="center", fontsize=7)
        return
    handles = [
        Line2D(
            [],
            [],
            marker="o",
            linestyle="",
            markersize=5,
            color=_colors(np.array([label]))[0],
            label=_class_name(class_names, int(label)),
        )
        for label in classes
    ]
    extra = (
        []
        if hollow_label is None
        else [
            Line2D(
                [],
                [],
                marker="o",
                linestyle="",
                markersize=5,
                markerfacecolor="none",
                markeredgecolor="0.3",
                label=hollow_label,
            )
        ]
    )
    total = len(handles) + len(extra)
    ncols = min(max(ncols, -(-total // max_rows)), total)
    if extra:  # blank entries put the hollow entry in the last column (no wide first column)
        blank = Line2D([], [], linestyle="", marker="", label=" ")
        handles += [blank] * (-total % ncols) + extra
    # Legends fill column by column; reorder so that they read row by row.
    handles = [handles[i] for j in range(ncols) for i in range(j, len(handles), ncols)]
    fig.legend(
        handles=handles,
        loc="lower center",
        bbox_to_anchor=(0.5, bottom),
        ncols=ncols,
        fontsize=7,
        frameon=False,
        handletextpad=0.1,
        columnspacing=0.9,
        borderaxespad=0,
        borderpad=0,
    )


def _axes(fig: Figure, left_in: float, bottom_in: float, size_in: float):
    """A square axes placed in inches (fixed layout: every frame has the same geometry)."""
    width, height = fig.get_size_inches()
    return fig.add_axes((left_in / width, bottom_in / height, size_in / width, size_in / height))


def _fixed_colors() -> list[list[int]]:
    """Colours that must survive palette reduction exactly: the class palettes, white, black and
    a few greys (text, axes, grid)."""
    rgb = np.asarray(colormaps["tab20"].colors)  # contains all of tab10
    grid = round(255 * float(GRID_GREY))
    greys = [[g, g, g] for g in (*range(0, 256, 32), grid, 255)]
    return np.round(rgb * 255).astype(int).tolist() + greys


def _palette(sample: np.ndarray, colors: int) -> np.ndarray:
    """[colors, 3] uint8: the fixed colours + ``colors − len(fixed)`` adaptive ones
    (Pillow's maximum-coverage quantization of ``sample``, RGB pixels [..., 3])."""
    from PIL import Image

    fixed = np.asarray(_fixed_colors(), np.uint8)
    num_adaptive = colors - len(fixed)
    image = Image.fromarray(np.ascontiguousarray(sample.reshape(1, -1, 3)))
    adaptive = image.quantize(num_adaptive, method=Image.Quantize.MAXCOVERAGE).getpalette()
    adaptive = np.asarray(adaptive[: 3 * num_adaptive], np.uint8).reshape(-1, 3)
    return np.concatenate([fixed, adaptive])


def _to_palette_image(rgb: np.ndarray, palette: np.ndarray):
    """RGB pixels [H, W, 3] uint8 → Pillow "P" image, each pixel the *exactly* nearest palette
    colour (Pillow's own mapping is approximate and tints exact colours), no dithering."""
    from PIL import Image

    packed = (rgb[..., 0].astype(np.uint32) << 16) | (rgb[..., 1].astype(np.uint32) << 8)
    packed |= rgb[..., 2]
    distinct, inverse = np.unique(packed.ravel(), return_inverse=True)
    distinct_rgb = np.stack([distinct >> 16, (distinct >> 8) & 255, distinct & 255], axis=1)
    nearest = np.empty(len(distinct), np.uint8)
    pal = palette.astype(np.int32)
    for start in range(0, len(distinct), 4096):
        diff = distinct_rgb[start : start + 4096, None, :].astype(np.int32) - pal[None]
        nearest[start : start + 4096] = np.argmin(np.sum(diff * diff, axis=2), axis=1)
    height, width = rgb.shape[:2]
    image = Image.frombytes("P", (width, height), nearest[inverse].tobytes())
    image.putpalette(palette.ravel().tolist())
    return image


def _save(fig: Figure, path) -> Path:
    """Writes ``fig``; a ``.png`` is rendered by Agg and stored as an 8-bit palette PNG (the
    class colours exactly + adaptive colours for the blends, no dithering): about a third of
    the RGB size (~40–60 kB per panel instead of ~120–150 kB) and no visible change. Other
    suffixes go through ``Figure.savefig``."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    path = Path(os.fspath(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() != ".png":
        fig.savefig(path, dpi=DPI)
        return path
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    rgb = np.asarray(canvas.buffer_rgba())[..., :3]
    _to_palette_image(rgb, _palette(rgb, 256)).save(path, format="PNG", optimize=True)
    return path


def scatter_features(
    features,
    labels,
    path,
    *,
    title: str,
    class_names: ClassNames | None = None,
    hollow=None,
    hollow_label: str = "unseen (hollow)",
    limits: Limits | None = None,
) -> Path:
    """Saves a 2-D scatter of ``features`` [N, D] coloured by class to ``path`` (PNG by suffix).

    Args:
      features: [N, D] float, D >= 2; D > 2 is projected by PCA (:func:`project_2d`) and the
        title says "PCA of D-D features".
      labels: [N] int >= 0, the colour index (tab10).
      path: output file; the format comes from its suffix (``.png``). Parent folders are made.
      title: figure title (e.g. "center loss · MNIST · epoch 12").
      class_names: names for the legend, indexed by label (sequence or mapping); default the
        label numbers.
      hollow: optional [N] bool mask of points drawn as hollow circles (e.g. unseen classes);
        the legend then explains them with ``hollow_label``.
      limits: ((xmin, xmax), (ymin, ymax)), e.g. from :func:`common_limits`; default square
        limits around these points.

    Returns:
      The path written. The image is 500×560 px (5×5.6 in at 100 dpi).
    """
    x = _features(features, "features")
    y = _labels(labels, len(x), "labels")
    dim = x.shape[1]
    if dim > 2:
        x = project_2d(x)
    h = _hollow(hollow, len(x))
    limits = _limits(limits) if limits is not None else _square(x.min(0), x.max(0), MARGIN)
    fig = Figure(figsize=SINGLE_SIZE, dpi=DPI)
    ax = _axes(fig, AXES_LEFT, SINGLE_AXES_BOTTOM, AXES_SIZE)
    _draw(ax, x, y, h, limits)
    ax.set_title(title + (f"\n(PCA of {dim}-D features)" if dim > 2 else ""), fontsize=10)
    hollow_label = hollow_label if h.any() else None
    _legend(fig, y, class_names, hollow_label, ncols=5, max_rows=3, bottom=0.02)
    return _save(fig, path)


def train_test_figure(
    train_feats,
    train_labels,
    test_feats,
    test_labels,
    path,
    *,
    title: str,
    limits: Limits | None = None,
    class_names: ClassNames | None = None,
    train_hollow=None,
    test_hollow=None,
    hollow_label: str = "unseen (hollow)",
    test_name: str = "test",
) -> Path:
    """Saves two scatter panels side by side — train | test — sharing axes, colours and legend.

    Features with D > 2 are projected with the PCA fitted on the *train* features (both panels
    in the same coordinates) and the title says so. ``limits`` default to
    :func:`common_limits` of both (projected) sets; pass fixed limits for GIF frames.

    Args:
      train_feats: [N, D] float. train_labels: [N] int >= 0.
      test_feats: [M, D] float (same D). test_labels: [M] int >= 0.
      path: output file (``.png``). title: figure title above both panels.
      limits: ((xmin, xmax), (ymin, ymax)) for both panels, or None.
      class_names: legend names indexed by label. train_hollow / test_hollow: optional bool
        masks of points drawn hollow; ``hollow_label`` explains them in the legend.
      test_name: the second panel's name (``"validation"`` for held-out training images).

    Returns:
      The path written. The image is 1000×560 px (10×5.6 in at 100 dpi).
    """
    train = _features(train_feats, "train_feats")
    test = _features(test_feats, "test_feats")
    if test.shape[1] != train.shape[1]:
        raise ValueError(
            f"test_feats must have shape [num_points, {train.shape[1]}] (dim of train_feats), "
            f"got {list(test.shape)}"
        )
    train_y = _labels(train_labels, len(train), "train_labels")
    test_y = _labels(test_labels, len(test), "test_labels")
    train_h = _hollow(train_hollow, len(train), "train_hollow")
    test_h = _hollow(test_hollow, len(test), "test_hollow")
    dim = train.shape[1]
    if dim > 2:
        pca = fit_pca_2d(train)
        train, test = project_2d(train, pca), project_2d(test, pca)
    limits = _limits(limits) if limits is not None else common_limits([train, test])

    fig = Figure(figsize=DOUBLE_SIZE, dpi=DPI)
    for i, (name, x, y, h) in enumerate(
        [("train", train, train_y, train_h), (test_name, test, test_y, test_h)]
    ):
        ax = _axes(fig, AXES_LEFT + i * DOUBLE_SIZE[0] / 2, DOUBLE_AXES_BOTTOM, AXES_SIZE)
        _draw(ax, x, y, h, limits)
        ax.set_title(f"{name} ({len(x):,} points)", fontsize=9)
    suffix = f" (PCA of {dim}-D features, fitted on train)" if dim > 2 else ""
    fig.suptitle(title + suffix, fontsize=11, y=0.985, va="top")
    hollow_any = bool(train_h.any() or test_h.any())
    _legend(
        fig,
        np.concatenate([train_y, test_y]),
        class_names,
        hollow_label if hollow_any else None,
        ncols=11,
        max_rows=2,
        bottom=0.02,
    )
    return _save(fig, path)


# --------------------------------------------------------------------------------------------
# ROC


def roc_figure(
    curves: Mapping[str, tuple],
    path,
    *,
    title: str,
    far_target: float | None = 1e-3,
) -> Path:
    """Saves verification ROC curves — VAL against FAR, FAR on a log axis — to ``path``.

    Args:
      curves: name → ``(far, val)``, two [P] float arrays in [0, 1] of one length (e.g. the
        first two outputs of :func:`mlx_jax.metrics.roc_curve`). Points at FAR = 0 are not
        drawn (log axis); the axis starts at 1e-5 or the smallest positive FAR, if larger.
      path: output file (``.png``). title: figure title.
      far_target: a FAR to mark with a dotted vertical line (FaceNet's 1e-3), or None.

    Returns:
      The path written. The image is 500×560 px (5×5.6 in at 100 dpi).
    """
    if not curves:
        raise ValueError("curves must name at least one (far, val) curve")
    fig = Figure(figsize=SINGLE_SIZE, dpi=DPI)
    ax = _axes(fig, AXES_LEFT + 0.1, SINGLE_AXES_BOTTOM, AXES_SIZE - 0.1)
    smallest = 1.0
    for i, (name, (far, val)) in enumerate(curves.items()):
        far, val = np.asarray(far, np.float64), np.asarray(val, np.float64)
        if far.ndim != 1 or far.shape != val.shape:
            raise ValueError(
                f"curves[{name!r}] must be (far, val) of one shape [P], got "
                f"{list(far.shape)} and {list(val.shape)}"
            )
        bad = ~((far >= 0) & (far <= 1) & (val >= 0) & (val <= 1))
        if bad.any():
            raise ValueError(f"curves[{name!r}]: far and val must lie in [0, 1]")
        shown = far > 0
        if shown.any():
            smallest = min(smallest, float(far[shown].min()))
        ax.plot(far[shown], val[shown], color=colormaps["tab10"](i % 10), lw=1.5, label=name)
    ax.set_xscale("log")
    ax.set_xlim(max(1e-5, min(smallest, 1e-3)), 1.0)
    ax.set_ylim(0.0, 1.0)
    if far_target is not None:
        ax.axvline(far_target, color="0.5", ls=":", lw=1)
    ax.set_xlabel("FAR (false accept rate)", fontsize=9)
    ax.set_ylabel("VAL (validation rate)", fontsize=9)
    ax.grid(True, color=GRID_GREY, lw=0.6)
    ax.legend(loc="lower right", fontsize=8)
    ax.set_title(title, fontsize=10)
    return _save(fig, path)


# --------------------------------------------------------------------------------------------
# GIF


def make_gif(
    frame_paths: Sequence, path, *, duration: float = 0.5, loop: int = 0, colors: int = 128
) -> Path:
    """Assembles PNG frames (all the same size) into an animated GIF.

    The frames are read with imageio, flattened onto white, and reduced to one palette of
    ``colors`` colours shared by all frames (the class colours exactly + maximum-coverage
    colours of all frames, no dithering: flat colours compress well and don't flicker between
    frames); Pillow writes the GIF. Twenty 1000×560 px two-panel frames of 60k + 10k points
    take about 0.4 MB.

    Args:
      frame_paths: sequence of image paths (>= 1), in display order.
      path: output ``.gif`` path (parent folders are made).
      duration: seconds per frame (> 0; GIF stores hundredths of a second).
      loop: number of repeats, 0 = forever.
      colors: palette size, 64..256 (27 are reserved for the class colours and greys).

    Returns:
      The path written.
    """
    import imageio.v3 as iio

    if isinstance(frame_paths, str | os.PathLike) or not len(frame_paths):
        raise ValueError("frame_paths must be a non-empty sequence of image paths")
    if not duration > 0:
        raise ValueError(f"duration must be > 0 seconds, got {duration}")
    if not isinstance(colors, int) or not 64 <= colors <= 256:
        raise ValueError(f"colors must be an int in [64, 256], got {colors!r}")
    if not isinstance(loop, int) or loop < 0:
        raise ValueError(f"loop must be an int >= 0, got {loop!r}")
    frames = []
    for i, frame_path in enumerate(frame_paths):
        image = np.asarray(iio.imread(frame_path))
        if image.ndim == 2:
            image = np.repeat(image[..., None], 3, axis=2)
        if image.shape[2] == 4:  # composite onto white
            alpha = image[..., 3:4].astype(np.float64) / 255
            image = image[..., :3] * alpha + 255 * (1 - alpha)
        image = np.asarray(np.round(image[..., :3]), np.uint8)
        if frames and image.shape != frames[0].shape:
            raise ValueError(
                f"frame_paths[{i}] is {image.shape[1]}×{image.shape[0]} px but frame 0 is "
                f"{frames[0].shape[1]}×{frames[0].shape[0]} px; all frames must have one size"
            )
        frames.append(image)
    # One palette for all frames (no flicker), from a subsample of every frame's pixels.
    sample = np.concatenate([f[::4, ::4].reshape(-1, 3) for f in frames])
    palette = _palette(sample, colors)
    images = [_to_palette_image(f, palette) for f in frames]
    path = Path(os.fspath(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    images[0].save(
        path,
        format="GIF",
        save_all=True,
        append_images=images[1:],
        duration=int(round(duration * 1000)),
        loop=loop,
        optimize=True,
    )
    return path
