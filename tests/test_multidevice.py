"""Runs tests/multidevice/ in a separate pytest process with 8 virtual CPU devices.

jax fixes its device count when it initialises, so the multi-device tests cannot share this
process (where jax already runs on one CPU device)."""

from __future__ import annotations

import pathlib
import subprocess
import sys

from experiments.cpu_devices import virtual_devices_env

MULTIDEVICE_DIR = pathlib.Path(__file__).parent / "multidevice"


def test_multidevice_suite_passes_on_8_virtual_cpu_devices():
    # 8 devices on the 2 CI cores: the collective timeout keeps a starved one from aborting.
    env = virtual_devices_env(8)
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(MULTIDEVICE_DIR)],
        env=env,
        capture_output=True,
        text=True,
        cwd=MULTIDEVICE_DIR.parent.parent,
    )
    tail = (result.stdout + result.stderr)[-6000:]
    # Exit code 5 means no tests were collected: that is a failure too.
    assert result.returncode == 0, tail
    assert " passed" in result.stdout, tail
