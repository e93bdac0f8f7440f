"""mlx_jax: metric learning in JAX."""

__version__ = "0.2.0"
