"""The open-set protocol: train on all but K held-out classes, evaluate on the classes never seen.

Which classes are held out
--------------------------
``--open-set K`` holds out the **last K classes** of the dataset (labels C−K … C−1; e.g. K = 2
on Fashion-MNIST: 8 "Bag" and 9 "Ankle boot"; on MNIST: digits 8 and 9) — a fixed choice, so
every loss and every run sees the same split. ``--held-out-classes i j …`` names them instead.
Training uses only the seen classes' training images, relabelled 0 … S−1 in increasing order of
their original label (the heads have S = C − K outputs); the held-out classes' training images
are never trained on — they serve only as *enrollment* images below.

What is reported (held-out classes only, original labels)
---------------------------------------------------------
With the objective's distance (cosine for the normalised losses, Euclidean otherwise):

* ``open_precision_at_1``, ``open_map_at_r``: retrieval among the held-out test embeddings
  (:func:`mlx_jax.metrics.retrieval_metrics`, query set = reference set).
* ``open_val_at_far``, ``open_far``: FaceNet's VAL at FAR = 1e-3 over all pairs of held-out test
  embeddings, threshold found on those pairs (:func:`mlx_jax.metrics.val_at_far`).
* ``open_auc``: area under that verification ROC (:func:`mlx_jax.metrics.roc_auc`).
* ``open_identification_rate``: open-set identification (detection and identification rate,
  DIR) at a rejection threshold chosen **on the seen classes**. A gallery holds one template per
  class — the mean embedding of its enrollment images (seen classes: their training images;
  held-out classes: their training images, never trained on). The threshold τ is set on the
  seen classes' test images: for each, its *non-mated* score is its best score against the
  templates of the other seen classes (as if its own class were not enrolled), and τ is the
  strictest threshold that accepts at most a fraction ``fpir`` (default 1%) of those — the
  false positive identification rate (FPIR) of ISO/IEC 19795-1 and NIST FRVT 1:N. Then each
  held-out test image is identified against all C templates (:func:`mlx_jax.retrieval.identify`)
  and counts as a hit when it is assigned its own class (nearest template, within τ).
* ``open_fpir``: the FPIR that the seen-class threshold actually gives on held-out test images
  (their best score against the *other* classes' templates): near ``fpir`` when the distance
  scale learned on seen classes transfers to new ones.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np

from mlx_jax import metrics, retrieval
from mlx_jax.data import Dataset
from mlx_jax.distances import Metric

FAR_TARGET = 1e-3  # FaceNet reports VAL at FAR = 1e-3 (Schroff et al. 2015, §5)
FPIR_TARGET = 1e-2  # our choice: 1% of non-mated probes falsely identified


@dataclasses.dataclass(frozen=True)
class ClassSplit:
    """Seen and held-out classes of a dataset (original labels, increasing)."""

    num_classes: int
    held_out: tuple[int, ...]

    @property
    def seen(self) -> tuple[int, ...]:
        return tuple(c for c in range(self.num_classes) if c not in self.held_out)

    def seen_label_map(self) -> np.ndarray:
        """[C] int32: original label → seen label 0 … S−1, or −1 for held-out classes."""
        table = np.full(self.num_classes, -1, np.int32)
        table[list(self.seen)] = np.arange(len(self.seen), dtype=np.int32)
        return table


def class_split(
    num_classes: int,
    *,
    open_set: int | None = None,
    held_out: Sequence[int] | None = None,
    class_names: Sequence[str] = (),
) -> ClassSplit:
    """Validates the held-out classes: the last ``open_set`` classes, or the list ``held_out``.

    Errors name the flag: classes outside 0 … C−1 (listing the dataset's classes), repeated
    classes, fewer than 2 seen or fewer than 2 held-out classes (retrieval and verification
    need pairs of different classes), and ``open_set`` disagreeing with ``held_out``.
    """
    if held_out is None:
        if open_set is None:
            raise ValueError("class_split needs open_set or held_out")
        k = open_set
        chosen = list(range(num_classes - k, num_classes)) if 0 < k < num_classes else []
    else:
        chosen = [int(c) for c in held_out]
        missing = sorted({c for c in chosen if not 0 <= c < num_classes})
        if missing:
            names = (
                ", ".join(f"{i}={n}" for i, n in enumerate(class_names[:num_classes]))
                or f"0 … {num_classes - 1}"
            )
            raise ValueError(
                f"--held-out-classes names classes the dataset lacks: {missing}; "
                f"its {num_classes} classes are {names}"
            )
        if len(set(chosen)) != len(chosen):
            raise ValueError(f"--held-out-classes repeats a class: {chosen}")
        k = len(chosen)
        if open_set is not None and open_set != k:
            raise ValueError(
                f"--open-set {open_set} disagrees with --held-out-classes ({k} classes: {chosen})"
            )
    if not 2 <= k <= num_classes - 2:
        raise ValueError(
            f"--open-set must hold out between 2 and {num_classes - 2} of the {num_classes} "
            f"classes (retrieval and verification need two classes on each side), got {k}"
        )
    return ClassSplit(num_classes, tuple(sorted(chosen)))


@dataclasses.dataclass(frozen=True, eq=False)
class OpenSetData:
    """The seen-class dataset the model trains on, and the held-out images kept aside."""

    seen: Dataset  # labels relabelled 0 … S−1
    split: ClassSplit
    seen_train_original: np.ndarray  # [N_seen_train] original labels of seen.train_labels
    seen_test_original: np.ndarray
    held_out_train_images: np.ndarray  # enrollment images of the held-out classes
    held_out_train_labels: np.ndarray  # original labels
    held_out_test_images: np.ndarray
    held_out_test_labels: np.ndarray


def split_dataset(dataset: Dataset, split: ClassSplit) -> OpenSetData:
    """Seen classes (relabelled) for training and closed-set evaluation; held-out images aside."""
    table = split.seen_label_map()
    train_seen = table[dataset.train_labels] >= 0
    test_seen = table[dataset.test_labels] >= 0
    for name, mask in (("train", train_seen), ("test", test_seen)):
        if not (~mask).any():
            raise ValueError(
                f"the {name} split has no images of the held-out classes {list(split.held_out)} "
                "(raise --limit?)"
            )
    seen = dataclasses.replace(
        dataset,
        train_images=dataset.train_images[train_seen],
        train_labels=table[dataset.train_labels[train_seen]],
        test_images=dataset.test_images[test_seen],
        test_labels=table[dataset.test_labels[test_seen]],
        num_classes=len(split.seen),
        class_names=tuple(dataset.class_names[c] for c in split.seen),
    )
    return OpenSetData(
        seen=seen,
        split=split,
        seen_train_original=dataset.train_labels[train_seen],
        seen_test_original=dataset.test_labels[test_seen],
        held_out_train_images=dataset.train_images[~train_seen],
        held_out_train_labels=dataset.train_labels[~train_seen],
        held_out_test_images=dataset.test_images[~test_seen],
        held_out_test_labels=dataset.test_labels[~test_seen],
    )


def _strictest_threshold(non_mated_scores: np.ndarray, fpir: float, metric: str) -> float:
    """The threshold accepting at most ⌊fpir·n⌋ of the non-mated scores, as strict as needed.

    Euclidean (accept d ≤ τ): τ is the largest float32 below the (m+1)-th smallest score;
    cosine (accept s ≥ τ): the smallest float32 above the (m+1)-th largest score — the rule of
    :func:`mlx_jax.metrics.val_at_far`.
    """
    scores = np.asarray(non_mated_scores, np.float32)
    allowed = math.floor(fpir * len(scores))
    if metric == "cosine":
        cutoff = np.sort(scores)[::-1][allowed]
        return float(np.nextafter(cutoff, np.float32(np.inf)))
    cutoff = np.sort(scores)[allowed]
    return float(np.nextafter(cutoff, np.float32(-np.inf)))


def _non_mated_scores(gallery: retrieval.Gallery, probes, probe_labels) -> np.ndarray:
    """Each probe's best score against templates of other identities (one template each)."""
    scores, _, ids = retrieval.search(gallery, probes, k=2)
    own_first = ids[:, 0] == np.asarray(probe_labels)
    return np.where(own_first, scores[:, 1], scores[:, 0])


def templates(embeddings: np.ndarray, labels: np.ndarray, classes: Sequence[int]) -> np.ndarray:
    """[len(classes), D]: the mean embedding of each class (its enrollment template)."""
    return np.stack([embeddings[labels == c].mean(axis=0) for c in classes])


def evaluate_open_set(
    *,
    metric: Metric,
    seen_train: np.ndarray,
    seen_train_labels: np.ndarray,
    seen_test: np.ndarray,
    seen_test_labels: np.ndarray,
    held_out_train: np.ndarray,
    held_out_train_labels: np.ndarray,
    held_out_test: np.ndarray,
    held_out_test_labels: np.ndarray,
    far: float = FAR_TARGET,
    fpir: float = FPIR_TARGET,
) -> tuple[dict[str, float], tuple[np.ndarray, np.ndarray]]:
    """The open-set metrics of the module docstring, all labels original.

    Args:
      metric: the objective's :data:`mlx_jax.distances.Metric` (``"euclidean"`` or
        ``"cosine"`` for the experiments' losses), used by every metric below.
      seen_train / held_out_train: [N, D] enrollment embeddings and labels of the seen /
        held-out classes; seen_test / held_out_test: [M, D] test embeddings and labels.
      far: verification FAR target (0, 1). fpir: identification FPIR target (0, 1).

    Returns:
      (metrics, (roc_far, roc_val)): the ``open_*`` metrics and the held-out verification ROC.
    """
    retrieval_scores = metrics.retrieval_metrics(held_out_test, held_out_test_labels, metric=metric)
    val, _, achieved_far = metrics.val_at_far(
        held_out_test, held_out_test_labels, far, metric=metric
    )
    auc = metrics.roc_auc(held_out_test, held_out_test_labels, metric=metric)
    roc_far, roc_val, _ = metrics.roc_curve(held_out_test, held_out_test_labels, metric=metric)

    seen_classes = np.unique(seen_train_labels)
    held_out_classes = np.unique(held_out_train_labels)
    seen_gallery = retrieval.Gallery.create(
        templates(seen_train, seen_train_labels, seen_classes), seen_classes, metric=metric
    )
    threshold = _strictest_threshold(
        _non_mated_scores(seen_gallery, seen_test, seen_test_labels), fpir, metric
    )
    full_gallery = retrieval.enroll(
        seen_gallery,
        templates(held_out_train, held_out_train_labels, held_out_classes),
        held_out_classes,
    )
    identified = retrieval.identify(full_gallery, held_out_test, threshold=threshold)
    non_mated = _non_mated_scores(full_gallery, held_out_test, held_out_test_labels)
    accepted = non_mated >= threshold if metric == "cosine" else non_mated <= threshold
    result = {
        "open_precision_at_1": retrieval_scores["precision_at_1"],
        "open_map_at_r": retrieval_scores["map_at_r"],
        "open_val_at_far": val,
        "open_far": achieved_far,
        "open_auc": auc,
        "open_identification_rate": float(np.mean(identified == held_out_test_labels)),
        "open_fpir": float(np.mean(accepted)),
        "open_threshold": threshold,
    }
    return {k: float(v) for k, v in result.items()}, (roc_far, roc_val)
