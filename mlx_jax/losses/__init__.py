"""Every loss of mlx_jax: pure functions of (embeddings, labels, explicit state) → scalar."""

from mlx_jax.losses.center import center_loss, standalone_center_loss
from mlx_jax.losses.circle import circle_loss
from mlx_jax.losses.contrastive import contrastive_loss
from mlx_jax.losses.info_nce import ntxent_loss, positive_counts, self_supervised, supcon_loss
from mlx_jax.losses.margin_softmax import (
    arcface_loss,
    combined_margin_loss,
    cosface_loss,
    cosine_logits,
    sphereface_lambda,
    sphereface_loss,
)
from mlx_jax.losses.multi_similarity import multi_similarity_loss
from mlx_jax.losses.siamese import siamese_cosine_loss
from mlx_jax.losses.softmax import softmax_loss
from mlx_jax.losses.triplet import triplet_center_loss, triplet_loss

__all__ = [
    "arcface_loss",
    "center_loss",
    "circle_loss",
    "combined_margin_loss",
    "contrastive_loss",
    "cosface_loss",
    "cosine_logits",
    "multi_similarity_loss",
    "ntxent_loss",
    "positive_counts",
    "self_supervised",
    "siamese_cosine_loss",
    "softmax_loss",
    "sphereface_lambda",
    "sphereface_loss",
    "standalone_center_loss",
    "supcon_loss",
    "triplet_center_loss",
    "triplet_loss",
]
