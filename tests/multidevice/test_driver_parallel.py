"""The experiments driver's --devices: a data-parallel tiny run on 8 devices gives the metrics of
the single-device run (same batches, exact global losses), and bad device counts are refused."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from experiments import cli, driver, onednn_conv
from experiments.augment import augment
from experiments.config import ConfigError
from mlx_jax import data as D
from mlx_jax import parallel
from tests.test_data import cifar_members, write_cifar_tarball
from tests.test_experiments import data_dir, history, train  # noqa: F401  (data_dir: fixture)

CONTINUOUS = ["loss", "intra_inter_ratio", "map_at_r"]
DISCRETE = ["accuracy", "knn_accuracy", "precision_at_1"]


@pytest.mark.parametrize(
    ("loss", "extra"),
    [
        ("cent", []),  # softmax + center loss, α-rule centers from psum-ed class statistics
        ("triplet", ["--mining", "batch_hard"]),  # global negatives across devices
    ],
)
def test_eight_devices_give_the_single_device_metrics(loss, extra, data_dir, tmp_path):  # noqa: F811
    common = ["--loss", loss, "--epochs", "2", "--lr", "0.05", *extra]
    train(data_dir, tmp_path / "one", *common, "--devices", "1")
    train(data_dir, tmp_path / "eight", *common, "--devices", "8")
    one, eight = history(tmp_path / "one"), history(tmp_path / "eight")
    assert [r["step"] for r in eight] == [r["step"] for r in one]
    for r1, r8 in zip(one, eight, strict=True):
        for key in CONTINUOUS:
            np.testing.assert_allclose(r8[key], r1[key], rtol=1e-3, err_msg=key)
        for key in DISCRETE:  # 160 test images: allow one borderline sample to flip
            assert abs(r8[key] - r1[key]) <= 1 / 160 + 1e-9, (key, r1[key], r8[key])


@pytest.mark.skipif(
    onednn_conv.unavailable_reason() is not None,
    reason=f"oneDNN unavailable: {onednn_conv.unavailable_reason()}",
)
def test_onednn_convolutions_on_eight_devices_give_xla_single_device_metrics(data_dir, tmp_path):  # noqa: F811
    """oneDNN's FFI convolutions under shard_map: the replicated kernels' gradients are summed
    over the devices, as XLA's convolution's are."""
    common = ["--loss", "cent", "--epochs", "2", "--lr", "0.05"]
    train(data_dir, tmp_path / "xla", *common, "--devices", "1", "--conv", "xla")
    train(data_dir, tmp_path / "onednn", *common, "--devices", "8", "--conv", "onednn")
    one, eight = history(tmp_path / "xla"), history(tmp_path / "onednn")
    for r1, r8 in zip(one, eight, strict=True):
        for key in CONTINUOUS:
            np.testing.assert_allclose(r8[key], r1[key], rtol=1e-3, err_msg=key)
        for key in DISCRETE:
            assert abs(r8[key] - r1[key]) <= 1 / 160 + 1e-9, (key, r1[key], r8[key])


def test_augmented_batches_do_not_depend_on_the_sharding():
    """The driver augments the gathered batch under jit; sharding it must not change the draw."""
    images = np.random.default_rng(0).uniform(size=(320, 28, 28, 1)).astype(np.float32)
    order = np.random.default_rng(1).permutation(320)[:32]
    step = jax.jit(lambda im, o, key: augment(im[o], key, "shift-flip", 2))
    one = step(images, order, jax.random.key(5))
    mesh = parallel.data_mesh(8)
    sharded = step(
        jax.device_put(images, NamedSharding(mesh, P())),
        jax.device_put(order, NamedSharding(mesh, P(mesh.axis_names[0]))),
        jax.random.key(5),
    )
    assert len(sharded.sharding.device_set) == 8
    np.testing.assert_array_equal(np.asarray(sharded), np.asarray(one))


def test_a_run_stopped_on_eight_devices_resumes_on_one(data_dir, tmp_path):  # noqa: F811
    """--devices is not part of the run's configuration: the math is the same."""
    common = ["--loss", "cent", "--epochs", "2", "--lr", "0.05"]
    train(data_dir, tmp_path / "straight", *common, "--devices", "1")
    train(data_dir, tmp_path / "split", *common, "--devices", "8", "--stop-after", "1")
    train(data_dir, tmp_path / "split", *common, "--devices", "1", "--resume")
    straight, split = history(tmp_path / "straight"), history(tmp_path / "split")
    assert [r["epoch"] for r in split] == [1, 2]
    for key in CONTINUOUS:
        np.testing.assert_allclose(split[-1][key], straight[-1][key], rtol=1e-3, err_msg=key)


def test_cifar_resnet_batchnorm_statistics_are_synchronised(tmp_path, monkeypatch):
    """SmallResNet's BatchNorm averages its batch statistics over the devices (one image per
    device here), so the 8-device run trains like the single-device one."""
    monkeypatch.setenv(D.NO_FETCH_ENV, "1")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))
    rng = np.random.default_rng(0)
    arrays = {
        split: (rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8), np.arange(n) % 10)
        for split, n in (("train", 40), ("test", 20))
    }
    write_cifar_tarball(tmp_path / "data" / "cifar-10-python.tar.gz", cifar_members(arrays, 8))
    runs = {}
    for devices in ("1", "8"):
        out = tmp_path / f"run{devices}"
        argv = ["--data-dir", str(tmp_path / "data"), "--workdir", str(out), "--batch-size", "8"]
        argv += ["--epochs", "1", "--quiet", "--loss", "xent", "--devices", devices]
        driver.train_and_evaluate(*cli.parse("cifar10", argv))
        runs[devices] = history(out)[0]
    # Unsynchronised statistics of one image normalise every activation to zero: an order-1
    # change. Synchronised ones differ by summation order only, which five clipped steps grow
    # to ~1e-3 in the intra/inter ratio on jax 0.12.1 (1e-4 in the loss and gradient norm).
    for key in CONTINUOUS:
        np.testing.assert_allclose(runs["8"][key], runs["1"][key], rtol=5e-3, err_msg=key)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--devices", "3"], r"--batch-size \(32\) must be divisible by --devices \(3\)"),
        (["--devices", "16"], r"--devices must be in \[1, 8\] \(local devices\), got 16"),
        (["--devices", "0"], r"--devices must be >= 1, got 0"),
    ],
)
def test_bad_device_counts_are_refused(argv, message):
    argv = ["--batch-size", "32", *argv]
    with pytest.raises(ConfigError, match=message):
        driver.num_devices(cli.config_from_args("fashion_mnist", argv))


@pytest.mark.parametrize(("batch_size", "devices"), [(32, 8), (20, 4), (6, 2), (7, 1)])
def test_default_takes_the_most_devices_that_split_the_batch(
    batch_size,
    devices,
    data_dir,  # noqa: F811
    tmp_path,
):
    argv = ["--loss", "xent", "--epochs", "1", "--batch-size", str(batch_size)]
    summary = train(data_dir, tmp_path / "run", *argv)
    assert summary["devices"] == devices
    assert driver.default_devices(batch_size, 8) == devices


def test_an_explicit_device_count_must_split_the_batch(data_dir, tmp_path):  # noqa: F811
    with pytest.raises(ConfigError, match=r"must be divisible by --devices \(8\)"):
        argv = ["--loss", "xent", "--epochs", "1", "--batch-size", "20", "--devices", "8"]
        train(data_dir, tmp_path / "run", *argv)
