"""Benchmarks of mlx_jax (run as modules, e.g. ``python -m benchmarks.losses --help``).

Speed is measured here, never asserted in unit tests (see DEVELOPERS.md).
"""
