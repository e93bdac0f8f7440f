"""Runnable studies: one shared driver and thin per-dataset entry points."""
