"""The losses of the experiments, each registered with the state it needs and how it scores.

An :class:`Objective` maps (model, embeddings, labels, step) to *named, already weighted* loss
terms (their sum is the training loss; the names appear in logs and divergence reports). It
declares the heads it needs (linear classifier, class weights, centers) and its primary
accuracy: ``"argmax"`` (classifier logits), ``"cosine"`` (argmax of cosine logits),
``"linear"`` (argmax of x·W over the class weights, L-Softmax's prediction),
``"centers"`` (nearest center, seed 001's protocol) or ``"class_means"`` (nearest mean of the
training embeddings, for losses without centers).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax

from mlx_jax import losses as L
from mlx_jax.distances import l2_normalize

Terms = dict[str, jax.Array]
SOFT_TRIPLE_K = 10  # SoftTriple's centers per class (Qian et al. 2019; PML's default)
SUB_CENTERS = 3  # Sub-center ArcFace's K (Deng et al. 2020)


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
    # Columns of class_weights per class (sub-centers, SoftTriple's centers), class-major.
    class_weights_per_class: int = 1
    # The loss's own trained values, initialised from the number of classes (margin loss's β).
    loss_params: Callable[[int], dict[str, jax.Array]] | None = None
    # Self-supervised two-view losses: terms get a second augmented view as ``paired=``.
    two_views: bool = False


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


# The lifted losses see unit vectors, as with PML's default distance: on raw embeddings a
# network can drive them to 0 by scaling every embedding up.
def _lifted_structure(model, f, y, step, cfg):
    loss = L.lifted_structure_loss(l2_normalize(f), y, **_kw(neg_margin=cfg.margin))
    return {"lifted_structure": loss}


def _generalized_lifted_structure(model, f, y, step, cfg):
    loss = L.generalized_lifted_structure_loss(l2_normalize(f), y, **_kw(neg_margin=cfg.margin))
    return {"generalized_lifted_structure": loss}


def _npairs(model, f, y, step, cfg):
    return {"npairs": L.npairs_loss(f, y)}


def _angular(model, f, y, step, cfg):
    return {"angular": L.angular_loss(f, y, **_kw(alpha=cfg.margin))}


def _margin(model, f, y, step, cfg):
    beta = model.loss_params["beta"][...]
    return {"margin": L.margin_loss(f, y, beta, **_kw(margin=cfg.margin))}


def _margin_beta(num_classes: int) -> dict[str, jax.Array]:
    return {"beta": L.margin_loss_beta(num_classes)}


def _tuplet_margin(model, f, y, step, cfg):
    kw = _kw(margin=cfg.margin, scale=cfg.scale)
    return {"tuplet_margin": L.tuplet_margin_loss(f, y, **kw)}


def _fast_ap(model, f, y, step, cfg):
    return {"fast_ap": L.fast_ap_loss(f, y)}


def _clip(model, f, y, step, cfg, paired):
    return {"clip": L.clip_loss(f, paired)}


def _siglip(model, f, y, step, cfg, paired):
    return {"siglip": L.siglip_loss(f, paired)}


def _vicreg(model, f, y, step, cfg, paired):
    return {"vicreg": L.vicreg_loss(f, paired)}


def _barlow_twins(model, f, y, step, cfg, paired):
    return {"barlow_twins": L.barlow_twins_loss(f, paired)}


def _proxy_anchor(model, f, y, step, cfg):
    kw = _kw(delta=cfg.margin, alpha=cfg.scale)
    return {"proxy_anchor": L.proxy_anchor_loss(f, y, model.class_weights.kernel[...], **kw)}


def _proxy_nca(model, f, y, step, cfg):
    kw = _kw(softmax_scale=cfg.scale)
    return {"proxy_nca": L.proxy_nca_loss(f, y, model.class_weights.kernel[...], **kw)}


def _normalized_softmax(model, f, y, step, cfg):
    kw = _kw(temperature=cfg.scale)
    w = model.class_weights.kernel[...]
    return {"normalized_softmax": L.normalized_softmax_loss(f, y, w, **kw)}


def _soft_triple(model, f, y, step, cfg):
    kw = _kw(margin=cfg.margin, la=cfg.scale)
    w = model.class_weights.kernel[...]
    return {"soft_triple": L.soft_triple_loss(f, y, w, centers_per_class=SOFT_TRIPLE_K, **kw)}


def _sub_center_arcface(model, f, y, step, cfg):
    kw = _kw(margin=cfg.margin, scale=cfg.scale)
    w = model.class_weights.kernel[...]
    loss = L.sub_center_arcface_loss(f, y, w, sub_centers=SUB_CENTERS, **kw)
    return {"sub_center_arcface": loss}


def _large_margin_softmax(model, f, y, step, cfg):
    # λ = 1000·(1 + 2.5e-5·step)^−35, floor 0: the authors' Caffe LargeMarginInnerProduct
    # schedule (the layer SphereFace's schedule, with other constants, comes from).
    lam = L.sphereface_lambda(step, base=1000.0, gamma=2.5e-5, power=35.0, minimum=0.0)
    w = model.class_weights.kernel[...]
    kw = _kw(scale=cfg.scale)
    loss = L.large_margin_softmax_loss(f, y, w, annealing_lambda=lam, **kw)
    return {"large_margin_softmax": loss}


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
            "lifted_structure",
            _lifted_structure,
            "class_means",
            metric="cosine",
            balanced_batches=True,
            help="lifted structured loss (Song et al. 2016) on unit embeddings, margin 1",
        ),
        Objective(
            "generalized_lifted_structure",
            _generalized_lifted_structure,
            "class_means",
            metric="cosine",
            balanced_batches=True,
            help="generalized lifted structure loss (Hermans et al. 2017) on unit embeddings, "
            "margin 1",
        ),
        Objective(
            "npairs",
            _npairs,
            "class_means",
            metric="cosine",
            balanced_batches=True,
            help="multi-class N-pair loss (Sohn 2016), one pair per class",
        ),
        Objective(
            "angular",
            _angular,
            "class_means",
            metric="cosine",
            balanced_batches=True,
            help="angular loss (Wang et al. 2017), α 40° (--margin sets α in degrees)",
        ),
        Objective(
            "margin",
            _margin,
            "class_means",
            metric="cosine",
            balanced_batches=True,
            loss_params=_margin_beta,
            help="margin loss (Wu et al. 2017), α 0.2, β learned per class from 1.2",
        ),
        Objective(
            "tuplet_margin",
            _tuplet_margin,
            "class_means",
            metric="cosine",
            balanced_batches=True,
            help="tuplet margin loss (Yu & Tao 2019), β 5.73°, s 64",
        ),
        Objective(
            "fast_ap",
            _fast_ap,
            "class_means",
            metric="cosine",
            balanced_batches=True,
            help="FastAP (Cakir et al. 2019), 10 bins",
        ),
        Objective(
            "clip",
            _clip,
            "class_means",
            metric="cosine",
            two_views=True,
            help="CLIP's symmetric softmax loss (Radford et al. 2021) between two augmented "
            "views, no labels; learned scale fixed at 1/0.07",
        ),
        Objective(
            "siglip",
            _siglip,
            "class_means",
            metric="cosine",
            two_views=True,
            help="SigLIP's sigmoid loss (Zhai et al. 2023) between two augmented views, no "
            "labels; t 10, b −10",
        ),
        Objective(
            "vicreg",
            _vicreg,
            "class_means",
            two_views=True,
            help="VICReg (Bardes et al. 2022) between two augmented views, no labels; "
            "λ 25, μ 25, ν 1",
        ),
        Objective(
            "barlow_twins",
            _barlow_twins,
            "class_means",
            two_views=True,
            help="Barlow Twins (Zbontar et al. 2021) between two augmented views, no labels; "
            "λ 0.005",
        ),
        Objective(
            "proxy_anchor",
            _proxy_anchor,
            "cosine",
            metric="cosine",
            class_weights=True,
            help="Proxy Anchor (Kim et al. 2020), α 32, δ 0.1, one proxy per class",
        ),
        Objective(
            "proxy_nca",
            _proxy_nca,
            "cosine",
            metric="cosine",
            class_weights=True,
            help="ProxyNCA (Movshovitz-Attias et al. 2017, as PML), softmax scale 1",
        ),
        Objective(
            "normalized_softmax",
            _normalized_softmax,
            "cosine",
            metric="cosine",
            class_weights=True,
            help="normalized softmax (Zhai & Wu 2019), τ 0.05 (--scale sets τ)",
        ),
        Objective(
            "soft_triple",
            _soft_triple,
            "cosine",
            metric="cosine",
            class_weights=True,
            class_weights_per_class=SOFT_TRIPLE_K,
            help=f"SoftTriple (Qian et al. 2019), {SOFT_TRIPLE_K} centers per class, λ 20, "
            "γ 0.1, δ 0.01, τ 0.2",
        ),
        Objective(
            "sub_center_arcface",
            _sub_center_arcface,
            "cosine",
            metric="cosine",
            class_weights=True,
            class_weights_per_class=SUB_CENTERS,
            help=f"Sub-center ArcFace (Deng et al. 2020), K {SUB_CENTERS}, s 64, m 0.5 rad",
        ),
        Objective(
            "large_margin_softmax",
            _large_margin_softmax,
            "linear",
            metric="cosine",
            class_weights=True,
            help="L-Softmax (Liu et al. 2016), m 4, λ annealed from 1000 as in the authors' code",
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
