"""Every loss of mlx_jax: pure functions of (embeddings, labels, explicit state) → scalar."""

from mlx_jax.losses.contrastive import contrastive_loss

__all__ = ["contrastive_loss"]
