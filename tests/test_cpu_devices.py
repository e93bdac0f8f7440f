"""experiments.cpu_devices: one JAX CPU device per core, decided before JAX starts. Each case
runs in a fresh process (JAX's device count is fixed once its backend exists)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from experiments import cpu_devices

PROBE = """
import json, os, sys
from experiments.cpu_devices import use_one_device_per_core
cores = json.loads(sys.argv[1])
if cores:
    os.sched_setaffinity(0, set(sorted(os.sched_getaffinity(0))[:cores]))
first = use_one_device_per_core()
import jax
print(json.dumps([first, jax.local_device_count(), use_one_device_per_core()]))
"""


def probe(env_extra: dict[str, str], cores: int | None = None) -> list:
    env = {k: v for k, v in os.environ.items() if k not in ("JAX_NUM_CPU_DEVICES", "XLA_FLAGS")}
    env.update(env_extra, JAX_PLATFORMS="cpu")
    out = subprocess.run(
        [sys.executable, "-c", PROBE, json.dumps(cores)],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return json.loads(out.strip().splitlines()[-1])


def test_one_device_per_core_of_the_affinity_mask():
    cores = len(os.sched_getaffinity(0))
    # set before JAX starts; a second call, after the backend exists, changes nothing
    assert probe({}) == [cores, cores, None]


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs 2 CPUs to pin to 1")
def test_a_pinned_process_gets_one_device_per_pinned_core():
    assert probe({}, cores=1) == [1, 1, None]


@pytest.mark.parametrize(
    ("env", "devices"),
    [
        ({"JAX_NUM_CPU_DEVICES": "3"}, 3),
        ({"XLA_FLAGS": "--xla_force_host_platform_device_count=5"}, 5),
        ({cpu_devices.OPT_OUT_ENV: "1"}, 1),
    ],
)
def test_an_explicit_choice_or_the_opt_out_is_left_alone(env, devices):
    assert probe(env) == [None, devices, None]


def test_bad_core_count_is_refused():
    code = "from experiments.cpu_devices import use_one_device_per_core as u; u(0)"
    env = {k: v for k, v in os.environ.items() if k != "JAX_NUM_CPU_DEVICES"}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert result.returncode != 0 and "cores must be >= 1, got 0" in result.stderr
