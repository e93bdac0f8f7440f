"""The open-set protocol (experiments/open_set.py) and its wiring into the driver.

The identification metrics are checked against plain loops over probes and templates written
here from the definitions in the module docstring."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from experiments import cli, driver
from experiments import open_set as O
from experiments.config import ConfigError
from mlx_jax import data as D
from mlx_jax import metrics, viz
from tests.test_experiments import data_dir, history, train  # noqa: F401  (fixture)


def toy_dataset(num_classes=10, per_class=6, seed=0) -> D.Dataset:
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(num_classes), per_class).astype(np.int32)
    rng.shuffle(labels)
    images = rng.random((len(labels), 28, 28, 1), np.float32)
    images[:, 0, 0, 0] = labels  # each image remembers its label
    return D.Dataset(
        "toy",
        images,
        labels,
        images[::2].copy(),
        labels[::2].copy(),
        num_classes,
        tuple(f"c{i}" for i in range(num_classes)),
        "memory",
    )


# ---------------------------------------------------------------------------- class split


def test_default_split_holds_out_the_last_k_classes():
    split = O.class_split(10, open_set=2)
    assert split.held_out == (8, 9) and split.seen == tuple(range(8))
    table = split.seen_label_map()
    assert table.tolist() == [0, 1, 2, 3, 4, 5, 6, 7, -1, -1]


def test_explicit_held_out_classes_are_relabelled_in_order():
    split = O.class_split(10, held_out=[7, 2])
    assert split.held_out == (2, 7)
    assert split.seen_label_map().tolist() == [0, 1, -1, 2, 3, 4, 5, -1, 6, 7]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(held_out=[3, 11, -1]), r"lacks: \[-1, 11\]; its 10 classes are 0=c0, 1=c1"),
        (dict(held_out=[3, 3]), "repeats a class"),
        (dict(open_set=1), "between 2 and 8 .* got 1"),
        (dict(open_set=9), "between 2 and 8 .* got 9"),
        (dict(held_out=[1]), "got 1"),
        (dict(open_set=3, held_out=[1, 2]), "--open-set 3 disagrees"),
    ],
)
def test_bad_held_out_classes_name_the_flag(kwargs, match):
    with pytest.raises(ValueError, match=match):
        O.class_split(10, class_names=[f"c{i}" for i in range(10)], **kwargs)


def test_split_dataset_separates_and_relabels():
    ds = toy_dataset()
    data = O.split_dataset(ds, O.class_split(10, held_out=[0, 5]))
    seen = data.seen
    assert seen.num_classes == 8 and seen.class_names == (
        "c1",
        "c2",
        "c3",
        "c4",
        "c6",
        "c7",
        "c8",
        "c9",
    )
    original = seen.train_images[:, 0, 0, 0].astype(int)
    assert np.array_equal(data.seen_train_original, original)
    assert np.array_equal(seen.train_labels, np.searchsorted([1, 2, 3, 4, 6, 7, 8, 9], original))
    assert set(data.held_out_train_labels.tolist()) == {0, 5}
    assert np.array_equal(
        data.held_out_train_images[:, 0, 0, 0].astype(int), data.held_out_train_labels
    )
    assert set(data.held_out_test_labels.tolist()) == {0, 5}
    assert len(seen.train_labels) + len(data.held_out_train_labels) == len(ds.train_labels)
    assert len(seen.test_labels) + len(data.held_out_test_labels) == len(ds.test_labels)


def test_split_dataset_without_held_out_images_is_an_error():
    ds = toy_dataset()
    keep = ds.test_labels < 8
    ds = D.Dataset(
        "toy", ds.train_images, ds.train_labels, ds.test_images[keep], ds.test_labels[keep],
        10, ds.class_names, "memory",
    )  # fmt: skip
    with pytest.raises(
        ValueError, match=r"test split has no images of the held-out classes \[8, 9\]"
    ):
        O.split_dataset(ds, O.class_split(10, open_set=2))


# ---------------------------------------------------------------------------- metrics


def plain_scores(probes, templates, metric):
    """[P, T] cosine similarities or Euclidean distances, one pair at a time (float64)."""
    out = np.empty((len(probes), len(templates)))
    for i, p in enumerate(probes):
        for j, t in enumerate(templates):
            if metric == "cosine":
                out[i, j] = p @ t / (np.linalg.norm(p) * np.linalg.norm(t))
            else:
                out[i, j] = np.sqrt(np.sum((p - t) ** 2))
    return out


def test_evaluate_open_set_matches_plain_loops():
    rng = np.random.default_rng(3)
    centers = rng.normal(size=(6, 3)) * 3

    def sample(classes, n):
        y = rng.choice(classes, n).astype(np.int64)
        return (centers[y] + rng.normal(size=(n, 3))).astype(np.float32), y

    seen_train, seen_train_y = sample([0, 1, 2, 3], 200)
    seen_test, seen_test_y = sample([0, 1, 2, 3], 300)
    held_train, held_train_y = sample([4, 5], 60)
    held_test, held_test_y = sample([4, 5], 90)
    for metric in ("euclidean", "cosine"):
        result, (roc_far, roc_val) = O.evaluate_open_set(
            metric=metric,
            seen_train=seen_train, seen_train_labels=seen_train_y,
            seen_test=seen_test, seen_test_labels=seen_test_y,
            held_out_train=held_train, held_out_train_labels=held_train_y,
            held_out_test=held_test, held_out_test_labels=held_test_y,
            fpir=0.05,
        )  # fmt: skip
        cosine = metric == "cosine"
        seen_classes, classes = [0, 1, 2, 3], [0, 1, 2, 3, 4, 5]
        tmpl = [seen_train[seen_train_y == c].mean(0) for c in seen_classes]
        tmpl += [held_train[held_train_y == c].mean(0) for c in (4, 5)]
        s = plain_scores(seen_test, tmpl[:4], metric)
        non_mated = np.array(
            [max(s[i, j] for j in range(4) if j != y) if cosine
             else min(s[i, j] for j in range(4) if j != y) for i, y in enumerate(seen_test_y)]
        )  # fmt: skip
        t = result["open_threshold"]
        accepted = non_mated >= t if cosine else non_mated <= t
        # At most 5% accepted, and the threshold is the strictest such: moving it to the next
        # non-mated score would accept one more.
        assert accepted.sum() <= int(0.05 * len(non_mated))
        nxt = non_mated[~accepted].max() if cosine else non_mated[~accepted].min()
        assert accepted.sum() + np.sum(non_mated == nxt) > int(0.05 * len(non_mated))
        assert abs(nxt - t) < 1e-5 * max(1.0, abs(t))
        h = plain_scores(held_test, tmpl, metric)
        hits, false_pos = 0, 0
        for i, y in enumerate(held_test_y):
            j = int(np.argmax(h[i]) if cosine else np.argmin(h[i]))
            ok = h[i, j] >= t if cosine else h[i, j] <= t
            hits += ok and classes[j] == y
            others = [h[i, k] for k in range(6) if classes[k] != y]
            best_other = max(others) if cosine else min(others)
            false_pos += best_other >= t if cosine else best_other <= t
        assert result["open_identification_rate"] == pytest.approx(hits / len(held_test_y))
        assert result["open_fpir"] == pytest.approx(false_pos / len(held_test_y))
        assert 0 < result["open_identification_rate"] < 1
        vmetric = "cosine" if cosine else "euclidean"
        r = metrics.retrieval_metrics(held_test, held_test_y, metric=metric)
        assert result["open_precision_at_1"] == r["precision_at_1"]
        assert result["open_map_at_r"] == r["map_at_r"]
        val, _, achieved = metrics.val_at_far(held_test, held_test_y, 1e-3, metric=vmetric)
        assert (result["open_val_at_far"], result["open_far"]) == (val, achieved)
        assert result["open_auc"] == metrics.roc_auc(held_test, held_test_y, metric=vmetric)
        assert roc_far[0] == 0 and roc_far[-1] == 1 and roc_val[-1] == 1
        assert np.all(np.diff(roc_far) >= 0) and np.all(np.diff(roc_val) >= 0)


def test_open_set_separated_classes_are_identified_and_rejected():
    """Held-out classes farther from every other class than seen classes are from each other:
    every held-out probe identified, none falsely accepted at the seen-class threshold."""
    rng = np.random.default_rng(0)
    centers = np.eye(6, dtype=np.float32) * np.array([20, 20, 20, 20, 40, 40], np.float32)[:, None]

    def sample(classes, n):
        y = np.repeat(classes, n).astype(np.int64)
        return centers[y] + rng.normal(scale=0.1, size=(len(y), 6)).astype(np.float32), y

    result, _ = O.evaluate_open_set(
        metric="euclidean",
        **dict(zip(["seen_train", "seen_train_labels"], sample([0, 1, 2, 3], 50), strict=True)),
        **dict(zip(["seen_test", "seen_test_labels"], sample([0, 1, 2, 3], 50), strict=True)),
        **dict(zip(["held_out_train", "held_out_train_labels"], sample([4, 5], 50), strict=True)),
        **dict(zip(["held_out_test", "held_out_test_labels"], sample([4, 5], 50), strict=True)),
    )
    assert result["open_identification_rate"] == 1.0 and result["open_fpir"] == 0.0
    assert result["open_precision_at_1"] == 1.0 and result["open_auc"] == 1.0


def test_roc_figure_writes_a_png_and_rejects_bad_curves(tmp_path):
    far = np.array([0.0, 1e-4, 1e-2, 1.0])
    val = np.array([0.0, 0.5, 0.9, 1.0])
    path = viz.roc_figure({"a": (far, val), "b": (far, val**2)}, tmp_path / "roc.png", title="t")
    assert Image.open(path).size == (500, 560)
    with pytest.raises(ValueError, match=r"curves\['a'\] must be \(far, val\) of one shape"):
        viz.roc_figure({"a": (far, val[:2])}, tmp_path / "x.png", title="t")
    with pytest.raises(ValueError, match=r"far and val must lie in \[0, 1\]"):
        viz.roc_figure({"a": (far, val + 1)}, tmp_path / "x.png", title="t")
    with pytest.raises(ValueError, match="at least one"):
        viz.roc_figure({}, tmp_path / "x.png", title="t")


# ---------------------------------------------------------------------------- the driver


@pytest.mark.parametrize("loss", ["standalone", "triplet", "arcface"])
def test_open_set_run_reports_held_out_metrics_and_pictures(loss, data_dir, tmp_path):  # noqa: F811
    out = tmp_path / "run"
    extra = [] if loss == "arcface" else ["--lr", "0.05"]
    summary = train(data_dir, out, "--loss", loss, "--epochs", "2", "--open-set", "2", *extra)
    config = json.loads((out / "config.json").read_text())
    assert config["open_set"] == 2
    for row in history(out):
        for key in (
            "open_precision_at_1", "open_map_at_r", "open_val_at_far", "open_auc",
            "open_identification_rate", "open_fpir", "open_threshold", "accuracy",
        ):  # fmt: skip
            assert np.isfinite(row[key]), (key, row)
    assert "open_auc" in (out / "summary.md").read_text()
    assert Image.open(out / "roc.png").size == (500, 560)
    assert summary["final"]["open_auc"] > 0.5


def test_open_set_run_resumes_exactly(data_dir, tmp_path):  # noqa: F811
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    common = ["--loss", "triplet", "--epochs", "2", "--lr", "0.05", "--held-out-classes", "1", "6"]
    train(data_dir, straight, *common)
    train(data_dir, stopped, *common, "--stop-after", "1")
    train(data_dir, stopped, *common, "--resume")

    def strip(rows):
        return [{k: v for k, v in r.items() if "seconds" not in k} for r in rows]

    assert strip(history(stopped)) == strip(history(straight))


def test_open_set_bad_classes_fail_before_training(data_dir, tmp_path, capsys):  # noqa: F811
    with pytest.raises(ConfigError, match=r"lacks: \[10\]; its 10 classes are 0=T-shirt/top"):
        train(data_dir, tmp_path / "run", "--held-out-classes", "3", "10")
    assert not (tmp_path / "run" / "checkpoints").exists()
    with pytest.raises(ConfigError, match="--open-set must be >= 2, got 1"):
        cli.config_from_args("mnist", ["--open-set", "1"])


def test_default_samples_per_class_fits_ten_classes(data_dir, tmp_path):  # noqa: F811
    cfg = cli.config_from_args("fashion_mnist", ["--loss", "triplet"])
    assert driver._samples_per_class(cfg, 10) == 16  # 8 classes × 16 in a batch of 128
    assert driver._samples_per_class(cfg, 100) == 4
    too_many = cli.config_from_args(
        "fashion_mnist", ["--loss", "triplet", "--samples-per-class", "4"]
    )
    with pytest.raises(ConfigError, match="32 classes per batch, but the training set has 10"):
        driver._samples_per_class(too_many, 10)
    prime = cli.config_from_args("fashion_mnist", ["--loss", "triplet", "--batch-size", "31"])
    with pytest.raises(ConfigError, match="--batch-size 31 cannot be split into 2 to 10 classes"):
        driver._samples_per_class(prime, 10)
