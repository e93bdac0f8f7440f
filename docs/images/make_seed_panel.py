"""Regenerates docs/images/seed001_features.png from the kept run records.

    python docs/images/make_seed_panel.py

Six panels: the final epoch's 2-D test-set features of seed 001's rows (MNIST and
Fashion-MNIST × xent / cent / standalone, feature dim 2), cropped from each run's
``features.png`` under experiments/results, titled with the row's final test accuracy
(``summary.json``) and its recipe (``config.json``). Needs matplotlib and Pillow.
"""

from __future__ import annotations

import json
import pathlib
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from PIL import Image  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere in the checkout
from experiments.config import Config, LossConfig  # noqa: E402
from mlx_jax.data import CLASS_NAMES  # noqa: E402

RESULTS = ROOT / "experiments" / "results"
OUT = pathlib.Path(__file__).resolve().parent / "seed001_features.png"

# The run BENCHMARKS.md's accuracy table quotes for each row (its recipe where one was needed).
RUNS = {
    "MNIST": {
        "xent": "seed001-20ep-shift/mnist-xent-feat2",
        "cent": "seed001-20ep/mnist-cent-feat2",
        "standalone": "seed001-20ep-shift/mnist-standalone-feat2",
    },
    "Fashion-MNIST": {
        "xent": "seed001-20ep-shift1-rerun/fashion_mnist-xent-feat2",
        "cent": "seed001-20ep/fashion_mnist-cent-feat2",
        "standalone": "seed001-20ep-clip10-eps1-shift1/fashion_mnist-standalone-feat2",
    },
}
# the plots colour label i with tab10's i-th colour
CLASSES = {"MNIST": CLASS_NAMES["mnist"], "Fashion-MNIST": CLASS_NAMES["fashion_mnist"]}
DEFAULT_CLIP, DEFAULT_EPS = Config.clip_norm, LossConfig.inter_eps


def recipe(config: dict) -> str:
    """The flags a row changed from the driver's defaults, in words."""
    parts = []
    if config.get("augment", "none") != "none":
        parts.append(f"±{config['max_shift']} px shifts")
    if config["clip_norm"] != DEFAULT_CLIP:
        parts.append(f"clip {config['clip_norm']:g}")
    eps = config["loss_config"].get("inter_eps")
    if eps is not None and eps != DEFAULT_EPS:
        parts.append(f"ε {eps:g}")
    return ", ".join(parts) or "defaults"


def test_panel(image: Image.Image) -> Image.Image:
    """The right (test-set) half of a features.png, without the figure title and its legend."""
    w, h = image.size
    return image.crop((w // 2, int(0.05 * h), w, int(0.89 * h)))


def main() -> None:
    datasets = list(RUNS)
    fig = plt.figure(figsize=(11.4, 10.2), dpi=100)
    grid = fig.add_gridspec(
        2 * len(datasets), 3, height_ratios=[1, 0.07] * len(datasets), hspace=0.3, wspace=0.02
    )
    for row, dataset in enumerate(datasets):
        for col, (loss, run) in enumerate(RUNS[dataset].items()):
            directory = RESULTS / run
            image = Image.open(directory / "features.png").convert("RGB")
            final = json.loads((directory / "summary.json").read_text())["final"]
            config = json.loads((directory / "config.json").read_text())
            ax = fig.add_subplot(grid[2 * row, col])
            ax.imshow(test_panel(image))
            ax.set_axis_off()
            ax.set_title(
                f"{dataset} {loss}: {final['accuracy']:.4f}\n"
                f"({recipe(config)}, {final['epoch']} epochs)",
                fontsize=10,
            )
        ax = fig.add_subplot(grid[2 * row + 1, :])
        ax.set_axis_off()
        colors = matplotlib.colormaps["tab10"].colors
        handles = [
            Line2D([], [], marker="o", linestyle="", color=colors[i], label=name)
            for i, name in enumerate(CLASSES[dataset])
        ]
        ax.legend(
            handles=handles,
            loc="center",
            ncol=10,
            frameon=False,
            fontsize=9,
            handletextpad=0.1,
            columnspacing=1.0,
        )
    fig.suptitle(
        "Seed 001's rows, feature dim 2: test-set features after the last epoch "
        "(title: test accuracy)",
        fontsize=12,
    )
    fig.savefig(OUT, bbox_inches="tight", pad_inches=0.1)
    plt.close(fig)
    # A palette keeps the picture small; 128 colours keep the ten classes apart.
    Image.open(OUT).convert("RGB").quantize(128, method=Image.Quantize.FASTOCTREE).save(
        OUT, optimize=True
    )
    print(f"wrote {OUT} ({OUT.stat().st_size:,} bytes)")


if __name__ == "__main__":
    main()
