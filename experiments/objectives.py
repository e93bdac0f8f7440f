"""The losses of the experiments, each registered with the state it needs and how it scores.

An :class:`Objective` maps (model, embeddings, labels, step) to *named, already weighted* loss
terms (their sum is the training loss; the names appear in logs and divergence reports). It
declares the heads it needs (linear classifier, class weights, centers) and its primary
accuracy: ``"argmax"`` (classifier logits), ``"cosine"`` (argmax of cosine logits),
``"centers"`` (nearest center, seed 001's protocol) or ``"class_means"`` (nearest mean of the
training embeddings, for losses without centers).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax

from mlx_jax import losses as L

Terms = dict[str, jax.Array]


def _kw(**pairs) -> dict:
    return {k: v for k, v in pairs.items() if v is not None}


@dataclasses.dataclass(frozen=True)
class Objective:
    name: str
    terms: Callable[..., Terms]
    accuracy: str
    classifier: bool = False
    class_weights: bool = False
    centers: bool = False
    balanced_batches: bool = False  # pair/triplet losses need several samples per class
    # Distance the loss shapes, used for retrieval, verification and open-set identification.
    metric: str = "euclidean"
    help: str = ""


def _xent(model, f, y, step, cfg):
    return {"softmax": L.softmax_loss(model.classifier(f), y)}


def _cent(model, f, y, step, cfg):
    return {
        "softmax": L.softmax_loss(model.classifier(f), y),
        "center": cfg.weight_cent * L.center_loss(f, y, model.centers()),
    }


def _standalone(model, f, y, step, cfg):
    c = model.centers()
    total = L.standalone_center_loss(
        f,
        y,
        c,
        weight_intra=cfg.weight_intra,
        weight_inter=cfg.weight_inter,
        eps=cfg.inter_eps,
    )
    # Split for the logs without a second pairwise matrix: the intra term is
    # w_intra·mean‖x − c_y‖² = w_intra·2·center_loss (no pairs involved).
    intra = cfg.weight_intra * 2.0 * L.center_loss(f, y, c)
    return {"intra": intra, "inter": total - intra}


def _contrastive(model, f, y, step, cfg):
    return {"contrastive": L.contrastive_loss(f, y, **_kw(margin=cfg.margin))}


def _siamese(model, f, y, step, cfg):
    return {"siamese": L.siamese_cosine_loss(f, y)}


def _triplet(model, f, y, step, cfg):
    return {"triplet": L.triplet_loss(f, y, mining=cfg.mining, **_kw(margin=cfg.margin))}


def _triplet_center(model, f, y, step, cfg):
    loss = L.triplet_center_loss(f, y, model.centers(), **_kw(margin=cfg.margin))
    return {"triplet_center": loss}


def _circle(model, f, y, step, cfg):
    return {"circle": L.circle_loss(f, y, **_kw(m=cfg.margin, gamma=cfg.scale))}


def _multi_similarity(model, f, y, step, cfg):
    return {"multi_similarity": L.multi_similarity_loss(f, y, mining="multi_similarity")}


def _ntxent(model, f, y, step, cfg):
    return {"ntxent": L.ntxent_loss(f, y, **_kw(temperature=cfg.scale))}


def _supcon(model, f, y, step, cfg):
    return {"supcon": L.supcon_loss(f, y, **_kw(temperature=cfg.scale))}


def _sphereface(model, f, y, step, cfg):
    lam = L.sphereface_lambda(step)
    return {
        "sphereface": L.sphereface_loss(
            f, y, model.class_weights.kernel[...], annealing_lambda=lam, **_kw(scale=cfg.scale)
        )
    }


def _cosface(model, f, y, step, cfg):
    kw = _kw(margin=cfg.margin, scale=cfg.scale)
    return {"cosface": L.cosface_loss(f, y, model.class_weights.kernel[...], **kw)}


def _arcface(model, f, y, step, cfg):
    kw = _kw(margin=cfg.margin, scale=cfg.scale)
    return {"arcface": L.arcface_loss(f, y, model.class_weights.kernel[...], **kw)}


OBJECTIVES: dict[str, Objective] = {
    o.name: o
    for o in [
        Objective("xent", _xent, "argmax", classifier=True, help="softmax cross-entropy"),
        Objective(
            "cent",
            _cent,
            "argmax",
            classifier=True,
            centers=True,
            help="softmax + weight_cent·center loss (Wen et al. 2016), centers by the α rule",
        ),
        Objective(
            "standalone",
            _standalone,
            "centers",
            centers=True,
            help="standalone center loss (seed 001): intra + log inter, no softmax",
        ),
        Objective(
            "contrastive",
            _contrastive,
            "class_means",
            balanced_batches=True,
            help="contrastive loss (Hadsell et al. 2006), margin 1",
        ),
        Objective(
            "siamese",
            _siamese,
            "class_means",
            metric="cosine",
            balanced_batches=True,
            help="Siamese cosine regression (Bromley et al. 1993)",
        ),
        Objective(
            "triplet",
            _triplet,
            "class_means",
            balanced_batches=True,
            help="triplet loss (FaceNet), semi-hard mining, margin 0.2",
        ),
        Objective(
            "triplet_center",
            _triplet_center,
            "centers",
            centers=True,
            help="triplet-center loss (He et al. 2018), margin 5",
        ),
        Objective(
            "circle",
            _circle,
            "class_means",
            metric="cosine",
            balanced_batches=True,
            help="circle loss (Sun et al. 2020), m 0.25, gamma 256",
        ),
        Objective(
            "multi_similarity",
            _multi_similarity,
            "class_means",
            metric="cosine",
            balanced_batches=True,
            help="multi-similarity loss (Wang et al. 2019), α 2, β 50, λ 0.5, with its pair "
            "mining (ε 0.1)",
        ),
        Objective(
            "ntxent",
            _ntxent,
            "class_means",
            metric="cosine",
            balanced_batches=True,
            help="NT-Xent with labels (Chen et al. 2020, as PML's NTXentLoss), τ 0.07 "
            "(--scale sets τ)",
        ),
        Objective(
            "supcon",
            _supcon,
            "class_means",
            metric="cosine",
            balanced_batches=True,
            help="supervised contrastive loss (Khosla et al. 2020), τ 0.1 (--scale sets τ)",
        ),
        Objective(
            "sphereface",
            _sphereface,
            "cosine",
            metric="cosine",
            class_weights=True,
            help="A-Softmax (Liu et al. 2017), m 4, λ annealed",
        ),
        Objective(
            "cosface",
            _cosface,
            "cosine",
            metric="cosine",
            class_weights=True,
            help="CosFace (Wang et al. 2018), s 64, m 0.35",
        ),
        Objective(
            "arcface",
            _arcface,
            "cosine",
            metric="cosine",
            class_weights=True,
            help="ArcFace (Deng et al. 2019), s 64, m 0.5 rad",
        ),
    ]
}
