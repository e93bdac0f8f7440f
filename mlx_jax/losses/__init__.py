"""Every loss of mlx_jax: pure functions of (embeddings, labels, explicit state) → scalar."""

from mlx_jax.losses.center import center_loss, standalone_center_loss
from mlx_jax.losses.circle import circle_loss
from mlx_jax.losses.contrastive import contrastive_loss
from mlx_jax.losses.fast_ap import fast_ap_loss
from mlx_jax.losses.image_text import clip_loss, siglip_loss
from mlx_jax.losses.info_nce import ntxent_loss, positive_counts, self_supervised, supcon_loss
from mlx_jax.losses.large_margin_softmax import large_margin_softmax_loss
from mlx_jax.losses.lifted_structure import (
    generalized_lifted_structure_loss,
    lifted_structure_loss,
)
from mlx_jax.losses.margin import margin_loss, margin_loss_beta
from mlx_jax.losses.margin_softmax import (
    arcface_loss,
    combined_margin_loss,
    cosface_loss,
    cosine_logits,
    sphereface_lambda,
    sphereface_loss,
)
from mlx_jax.losses.multi_similarity import multi_similarity_loss
from mlx_jax.losses.non_contrastive import barlow_twins_loss, vicreg_loss
from mlx_jax.losses.npairs import angular_loss, npairs_loss
from mlx_jax.losses.proxies import normalized_softmax_loss, proxy_anchor_loss, proxy_nca_loss
from mlx_jax.losses.siamese import siamese_cosine_loss
from mlx_jax.losses.soft_triple import soft_triple_centers, soft_triple_loss
from mlx_jax.losses.softmax import softmax_loss
from mlx_jax.losses.sub_center import (
    collapse_sub_centers,
    dominant_sub_centers,
    sub_center_arcface_loss,
    sub_center_outliers,
)
from mlx_jax.losses.triplet import triplet_center_loss, triplet_loss
from mlx_jax.losses.tuplet_margin import tuplet_margin_loss

__all__ = [
    "angular_loss",
    "arcface_loss",
    "barlow_twins_loss",
    "center_loss",
    "circle_loss",
    "clip_loss",
    "collapse_sub_centers",
    "combined_margin_loss",
    "contrastive_loss",
    "cosface_loss",
    "cosine_logits",
    "dominant_sub_centers",
    "fast_ap_loss",
    "generalized_lifted_structure_loss",
    "large_margin_softmax_loss",
    "lifted_structure_loss",
    "margin_loss",
    "margin_loss_beta",
    "multi_similarity_loss",
    "normalized_softmax_loss",
    "npairs_loss",
    "ntxent_loss",
    "positive_counts",
    "proxy_anchor_loss",
    "proxy_nca_loss",
    "self_supervised",
    "siamese_cosine_loss",
    "siglip_loss",
    "soft_triple_centers",
    "soft_triple_loss",
    "softmax_loss",
    "sphereface_lambda",
    "sphereface_loss",
    "standalone_center_loss",
    "sub_center_arcface_loss",
    "sub_center_outliers",
    "supcon_loss",
    "triplet_center_loss",
    "triplet_loss",
    "tuplet_margin_loss",
    "vicreg_loss",
]
