"""Tests that need several devices. They run in their own pytest process (see
tests/test_multidevice.py), which sets JAX_NUM_CPU_DEVICES before jax initialises, so the
virtual devices never leak into the single-device tests."""

import jax
import pytest

NUM_DEVICES = 8


@pytest.fixture(scope="session", autouse=True)
def _require_virtual_devices():
    if jax.device_count() < NUM_DEVICES:
        pytest.fail(
            f"multi-device tests need {NUM_DEVICES} devices, found {jax.device_count()}: run them "
            "through tests/test_multidevice.py or with JAX_NUM_CPU_DEVICES=8"
        )
