"""Tests for mlx_jax.viz: files written and valid, projection correct, bad inputs raise."""

import subprocess
import sys

import numpy as np
import pytest
from matplotlib import colormaps
from PIL import Image

from mlx_jax import viz


def clusters(seed, n, dim=2, classes=10, spread=0.5):
    rng = np.random.default_rng(seed)
    centers = np.random.default_rng(dim).normal(size=(classes, dim)) * 4
    labels = rng.integers(0, classes, n)
    return (centers[labels] + spread * rng.normal(size=(n, dim))).astype(np.float32), labels


@pytest.fixture
def figures(monkeypatch):
    """Records every Figure the module saves (to inspect titles, legends, limits)."""
    saved = []
    original = viz._save

    def record(fig, path):
        saved.append(fig)
        return original(fig, path)

    monkeypatch.setattr(viz, "_save", record)
    return saved


def legend_texts(fig):
    return [t.get_text() for t in fig.legends[0].get_texts()]


# --------------------------------------------------------------------------------------------
# scatter_features


def test_scatter_writes_a_small_png(tmp_path, figures):
    x, y = clusters(0, 10_000)
    path = viz.scatter_features(x, y, tmp_path / "sub" / "scatter.png", title="epoch 3")
    assert path == tmp_path / "sub" / "scatter.png"
    with Image.open(path) as image:
        assert image.format == "PNG"
        assert image.size == (500, 560)
        image.verify()
    assert 10_000 < path.stat().st_size < 150_000
    (fig,) = figures
    (ax,) = fig.axes
    assert ax.get_title() == "epoch 3"
    assert legend_texts(fig) == [str(c) for c in [0, 5, 1, 6, 2, 7, 3, 8, 4, 9]]  # row by row
    # all points drawn, limits square and containing every point
    assert sum(len(c.get_offsets()) for c in ax.collections) == len(x)
    (x0, x1), (y0, y1) = ax.get_xlim(), ax.get_ylim()
    assert x1 - x0 == pytest.approx(y1 - y0)
    assert x0 < x[:, 0].min() and x[:, 0].max() < x1 and y0 < x[:, 1].min() and x[:, 1].max() < y1


def test_scatter_palette_png_keeps_exact_colours(tmp_path, figures):
    """Palette reduction keeps every pixel of a fixed colour (class colours, greys) exact and
    moves no pixel far."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    x, y = clusters(1, 5000)
    path = viz.scatter_features(x, y, tmp_path / "s.png", title="t")
    with Image.open(path) as image:
        assert image.mode == "P"
        saved = np.asarray(image.convert("RGB"), np.int64)
    canvas = FigureCanvasAgg(figures[0])
    canvas.draw()
    rendered = np.asarray(canvas.buffer_rgba())[..., :3].astype(np.int64)
    fixed = {tuple(c) for c in viz._fixed_colors()}
    tab10 = {tuple(c) for c in np.round(np.asarray(colormaps["tab10"].colors) * 255).astype(int)}
    assert tab10 <= fixed
    exact = np.array([tuple(p) in fixed for p in rendered.reshape(-1, 3)]).reshape(saved.shape[:2])
    assert exact.sum() > 0.5 * exact.size  # white background, text, legend markers
    np.testing.assert_array_equal(saved[exact], rendered[exact])
    rendered_colors = {tuple(p) for p in rendered[exact]}
    assert len(rendered_colors & tab10) == 10  # the legend markers, drawn opaque
    assert np.abs(saved - rendered).max() <= 40
    assert np.abs(saved - rendered).mean() < 1.0


def test_scatter_projects_high_dimensional_features(tmp_path, figures):
    x, y = clusters(2, 500, dim=128)
    viz.scatter_features(x, y, tmp_path / "s.png", title="test set")
    (ax,) = figures[0].axes
    assert ax.get_title() == "test set\n(PCA of 128-D features)"
    offsets = np.concatenate([c.get_offsets() for c in ax.collections])
    np.testing.assert_allclose(
        np.sort(offsets[:, 0]), np.sort(viz.project_2d(x)[:, 0]), rtol=1e-6, atol=1e-6
    )


def test_scatter_hollow_points_and_class_names(tmp_path, figures):
    x, y = clusters(3, 300)
    names = [f"class {c}" for c in range(10)]
    hollow = y >= 8
    viz.scatter_features(x, y, tmp_path / "s.png", title="t", class_names=names, hollow=hollow)
    (ax,) = figures[0].axes
    filled, empty = ax.collections
    assert len(filled.get_offsets()) == (~hollow).sum()
    assert len(empty.get_offsets()) == hollow.sum()
    assert len(empty.get_facecolors()) == 0  # hollow: no face
    texts = legend_texts(figures[0])
    assert set(names) <= set(texts)
    assert texts[-1] == "unseen (hollow)"  # in the last column, not widening the first
    # a mapping works too, and only present classes are listed
    viz.scatter_features(
        x[y < 3], y[y < 3], tmp_path / "m.png", title="t", class_names={0: "a", 1: "b", 2: "c"}
    )
    assert legend_texts(figures[1]) == ["a", "b", "c"]


def test_scatter_many_classes_omit_the_legend(tmp_path, figures):
    x, y = clusters(4, 400, classes=40)
    viz.scatter_features(x, y, tmp_path / "s.png", title="t")
    assert not figures[0].legends
    assert any("40 classes" in t.get_text() for t in figures[0].texts)


def test_scatter_fixed_limits(tmp_path, figures):
    x, y = clusters(5, 100)
    viz.scatter_features(x, y, tmp_path / "s.png", title="t", limits=((-30, 30), (-30, 30)))
    (ax,) = figures[0].axes
    assert ax.get_xlim() == (-30, 30) and ax.get_ylim() == (-30, 30)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"features": np.zeros((5, 1), np.float32)}, ValueError, "features must have shape"),
        ({"features": np.zeros((5, 2), np.int32)}, TypeError, "features must be a floating-point"),
        ({"features": np.full((5, 2), np.nan, np.float32)}, ValueError, "features must be finite"),
        ({"labels": np.zeros(4, np.int32)}, ValueError, r"labels must have shape \[5\]"),
        ({"labels": np.zeros(5, np.float32)}, TypeError, "labels must be an integer array"),
        ({"labels": -np.ones(5, np.int32)}, ValueError, "labels must be >= 0"),
        (
            {"hollow": np.zeros(5, np.int32)},
            ValueError,
            r"hollow must be a boolean mask of shape \[5\]",
        ),
        ({"hollow": np.zeros(4, bool)}, ValueError, "hollow must be a boolean mask"),
        ({"class_names": ["a"]}, ValueError, "class_names has no entry for label 1"),
        ({"limits": (0, 1)}, ValueError, r"limits must be \(\(xmin, xmax\), \(ymin, ymax\)\)"),
        ({"limits": ((1, 0), (0, 1))}, ValueError, "xmin < xmax"),
    ],
)
def test_scatter_bad_inputs(tmp_path, kwargs, error, match):
    args = {"features": np.zeros((5, 2), np.float32), "labels": np.array([0, 1, 0, 1, 0])}
    args.update(kwargs)
    with pytest.raises(error, match=match):
        viz.scatter_features(path=tmp_path / "x.png", title="t", **args)
    assert not (tmp_path / "x.png").exists()


def test_no_pyplot_and_no_backend_switch(tmp_path):
    code = (
        "import sys, numpy as np, matplotlib\n"
        "backend = dict.__getitem__(matplotlib.rcParams, 'backend')\n"  # get_backend imports pyplot
        "from mlx_jax import viz\n"
        "viz.scatter_features(np.eye(3, 2), np.arange(3), sys.argv[1], title='t')\n"
        "assert 'matplotlib.pyplot' not in sys.modules\n"
        "assert dict.__getitem__(matplotlib.rcParams, 'backend') == backend\n"
    )
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "a.png")], check=True)


# --------------------------------------------------------------------------------------------
# train_test_figure and common_limits


def test_train_test_figure_two_panels_with_shared_limits(tmp_path, figures):
    train_x, train_y = clusters(6, 3000)
    test_x, test_y = clusters(7, 500)
    path = viz.train_test_figure(
        train_x, train_y, test_x, test_y, tmp_path / "tt.png", title="epoch 1"
    )
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size == (1000, 560)
    assert path.stat().st_size < 250_000
    fig = figures[0]
    left, right = fig.axes
    assert left.get_title() == "train (3,000 points)" and right.get_title() == "test (500 points)"
    assert fig.get_suptitle() == "epoch 1"
    assert left.get_xlim() == right.get_xlim() and left.get_ylim() == right.get_ylim()
    limits = viz.common_limits([train_x, test_x])
    np.testing.assert_allclose(left.get_xlim(), limits[0])
    # legend on one row, reading order = label order
    assert legend_texts(fig) == [str(c) for c in range(10)]


def test_train_test_figure_projects_both_with_the_train_pca(tmp_path, figures):
    train_x, train_y = clusters(8, 400, dim=16)
    test_x, test_y = clusters(9, 100, dim=16)
    viz.train_test_figure(
        train_x, train_y, test_x, test_y, tmp_path / "tt.png", title="t", limits=((-9, 9), (-9, 9))
    )
    fig = figures[0]
    assert fig.get_suptitle() == "t (PCA of 16-D features, fitted on train)"
    test_offsets = np.concatenate([c.get_offsets() for c in fig.axes[1].collections])
    want = viz.project_2d(test_x, viz.fit_pca_2d(train_x))
    np.testing.assert_allclose(np.sort(test_offsets[:, 0]), np.sort(want[:, 0]), atol=1e-6)
    assert fig.axes[1].get_xlim() == (-9, 9)


def test_train_test_figure_bad_inputs(tmp_path):
    x, y = clusters(10, 20)
    with pytest.raises(ValueError, match=r"test_feats must have shape \[num_points, 2\]"):
        viz.train_test_figure(
            x, y, np.zeros((3, 3), np.float32), y[:3], tmp_path / "a.png", title="t"
        )
    with pytest.raises(ValueError, match=r"test_labels must have shape \[20\]"):
        viz.train_test_figure(x, y, x, y[:5], tmp_path / "a.png", title="t")
    with pytest.raises(ValueError, match="train_hollow must be a boolean mask"):
        viz.train_test_figure(x, y, x, y, tmp_path / "a.png", title="t", train_hollow=y)


def test_common_limits():
    a = np.array([[0.0, 0.0], [2.0, 1.0]])
    b = np.array([[-1.0, 0.5], [1.0, 5.0]])
    (x0, x1), (y0, y1) = viz.common_limits([a, b], margin=0.0)
    assert (x1 - x0) == pytest.approx(5.0) and (y1 - y0) == pytest.approx(
        5.0
    )  # square: larger side
    assert (y0, y1) == pytest.approx((0.0, 5.0))
    assert (x0 + x1) / 2 == pytest.approx(0.5)  # centered on the bounding box
    (x0, x1), _ = viz.common_limits([a, b])
    assert x1 - x0 == pytest.approx(5.0 * 1.1)
    # a single point still gets a non-empty box
    (x0, x1), (y0, y1) = viz.common_limits([np.ones((1, 2))])
    assert x0 < 1 < x1 and y0 < 1 < y1
    with pytest.raises(ValueError, match="non-empty sequence"):
        viz.common_limits([])
    with pytest.raises(ValueError, match=r"feature_arrays\[1\] must have shape \[num_points, 2\]"):
        viz.common_limits([a, np.zeros((3, 3))])
    with pytest.raises(ValueError, match="margin must be >= 0"):
        viz.common_limits([a], margin=-1)


# --------------------------------------------------------------------------------------------
# project_2d


def test_project_2d_recovers_a_plane():
    rng = np.random.default_rng(11)
    basis = np.linalg.qr(rng.normal(size=(10, 2)))[0].T  # orthonormal [2, 10]
    coefficients = rng.normal(size=(200, 2)) * [5.0, 1.0]
    offset = rng.normal(size=10) * 3
    x = coefficients @ basis + offset
    pca = viz.fit_pca_2d(x)
    np.testing.assert_allclose(pca.components @ pca.components.T, np.eye(2), atol=1e-12)
    # the components span the plane: their projection onto the basis keeps their length
    np.testing.assert_allclose(np.linalg.svd(pca.components @ basis.T)[1], [1, 1], atol=1e-10)
    projected = viz.project_2d(x)
    np.testing.assert_allclose(projected @ pca.components + pca.mean, x, atol=1e-10)  # lossless
    assert projected[:, 0].var() > projected[:, 1].var()
    assert projected.mean(axis=0) == pytest.approx([0, 0], abs=1e-10)


def test_project_2d_matches_sklearn_up_to_sign_and_sign_is_fixed():
    from sklearn.decomposition import PCA

    x = np.random.default_rng(12).normal(size=(100, 6)) * [4, 3, 2, 1, 1, 1]
    ours = viz.project_2d(x)
    np.testing.assert_allclose(np.abs(ours), np.abs(PCA(2).fit_transform(x)), atol=1e-8)
    pca = viz.fit_pca_2d(x)
    for row in pca.components:
        assert row[np.argmax(np.abs(row))] > 0
    # deterministic, and independent of the SVD's sign choices: −x has the same components
    np.testing.assert_array_equal(viz.project_2d(x), ours)
    np.testing.assert_allclose(viz.fit_pca_2d(-x).components, pca.components, atol=1e-12)
    np.testing.assert_allclose(viz.project_2d(-x), -ours, atol=1e-10)


def test_project_2d_degenerate_and_bad_inputs():
    assert viz.project_2d(np.ones((1, 4))).shape == (1, 2)
    assert np.all(viz.project_2d(np.ones((5, 3))) == 0)
    pca = viz.fit_pca_2d(np.random.default_rng(0).normal(size=(10, 5)))
    with pytest.raises(ValueError, match=r"pca.components must have shape \[2, 4\]"):
        viz.project_2d(np.zeros((3, 4)), pca)
    with pytest.raises(ValueError, match="features must have shape"):
        viz.project_2d(np.zeros(4))
    with pytest.raises(ValueError, match="features must be finite"):
        viz.fit_pca_2d(np.full((3, 3), np.inf))


# --------------------------------------------------------------------------------------------
# make_gif


def frames(tmp_path, count, n=2000):
    x, y = clusters(13, n)
    limits = viz.common_limits([x * 2])
    return [
        viz.scatter_features(
            x * (1 + i / count), y, tmp_path / f"f{i:02d}.png", title=f"epoch {i}", limits=limits
        )
        for i in range(count)
    ]


def test_make_gif_frames_duration_and_fidelity(tmp_path):
    paths = frames(tmp_path, 4)
    gif = viz.make_gif(paths, tmp_path / "out" / "a.gif", duration=0.25)
    with Image.open(gif) as image:
        assert image.format == "GIF"
        assert image.n_frames == 4
        assert image.size == (500, 560)
        assert image.info["loop"] == 0
        for i in range(4):
            image.seek(i)
            assert image.info["duration"] == 250
            decoded = np.asarray(image.convert("RGB"), np.int64)
            original = np.asarray(Image.open(paths[i]).convert("RGB"), np.int64)
            assert np.abs(decoded - original).mean() < 1.0


def test_make_gif_of_twenty_frames_stays_small(tmp_path):
    gif = viz.make_gif(frames(tmp_path, 20), tmp_path / "a.gif")
    with Image.open(gif) as image:
        assert image.n_frames == 20
    assert gif.stat().st_size < 3_000_000


def test_make_gif_bad_inputs(tmp_path):
    (one,) = frames(tmp_path, 1, n=50)
    other = tmp_path / "other.png"
    Image.new("RGB", (10, 10), "white").save(other)
    with pytest.raises(ValueError, match="non-empty sequence"):
        viz.make_gif([], tmp_path / "a.gif")
    with pytest.raises(ValueError, match="non-empty sequence"):
        viz.make_gif(str(one), tmp_path / "a.gif")
    with pytest.raises(ValueError, match=r"frame_paths\[1\] is 10×10 px but frame 0 is 500×560"):
        viz.make_gif([one, other], tmp_path / "a.gif")
    with pytest.raises(ValueError, match="duration must be > 0"):
        viz.make_gif([one], tmp_path / "a.gif", duration=0)
    with pytest.raises(ValueError, match="colors must be an int in"):
        viz.make_gif([one], tmp_path / "a.gif", colors=16)
    with pytest.raises(FileNotFoundError):
        viz.make_gif([tmp_path / "missing.png"], tmp_path / "a.gif")
