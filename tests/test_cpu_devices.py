"""experiments.cpu_devices: one JAX CPU device per core, decided before JAX starts. Each case
runs in a fresh process (JAX's device count is fixed once its backend exists)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from experiments import cpu_devices
from tests.conftest import ORIGINAL_CPUS_ENV

# this process's CPUs before a pytest-xdist worker was pinned to its share (tests/conftest.py)
ALL_CPUS = (
    [int(c) for c in os.environ[ORIGINAL_CPUS_ENV].split(",")]
    if os.environ.get(ORIGINAL_CPUS_ENV)
    else sorted(os.sched_getaffinity(0))
)

PROBE = """
import json, os, sys
from experiments.cpu_devices import use_one_device_per_core
cores = json.loads(sys.argv[1])
if cores:
    os.sched_setaffinity(0, set(json.loads(sys.argv[2])[:cores]))
first = use_one_device_per_core()
import jax
print(json.dumps([first, jax.local_device_count(), use_one_device_per_core()]))
"""


def probe(env_extra: dict[str, str], cores: int | None = None) -> list:
    env = {k: v for k, v in os.environ.items() if k not in ("JAX_NUM_CPU_DEVICES", "XLA_FLAGS")}
    env.update(env_extra, JAX_PLATFORMS="cpu")
    out = subprocess.run(
        [sys.executable, "-c", PROBE, json.dumps(cores), json.dumps(ALL_CPUS)],
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


@pytest.mark.skipif(len(ALL_CPUS) < 2, reason="needs 2 CPUs to pin to 1")
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


LATE_DEVICE = """
import sys, time
import numpy as np
from experiments.cpu_devices import tolerate_slow_collectives
tolerate_slow_collectives(int(sys.argv[1]))
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P


def sleep_then(x):
    time.sleep(float(sys.argv[2]))
    return x


def body(x):
    late = lambda x: jax.pure_callback(sleep_then, jax.ShapeDtypeStruct(x.shape, x.dtype), x)
    x = jax.lax.cond(jax.lax.axis_index("d") == 0, late, lambda x: x, x)
    return jax.lax.all_gather(x, "d", tiled=True)


mesh = jax.make_mesh((2,), ("d",), axis_types=(jax.sharding.AxisType.Auto,))
f = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=P("d"), out_specs=P(), check_vma=False))
print("gathered", np.asarray(f(jnp.arange(4.0))).tolist())
"""


def late_device(terminate_seconds: int, late_seconds: float) -> subprocess.CompletedProcess:
    """Two CPU devices all-gather while device 0 arrives ``late_seconds`` late (a starved core),
    with XLA's stuck warning at 1 s so its abort timer starts early."""
    env = {k: v for k, v in os.environ.items() if k != "JAX_NUM_CPU_DEVICES"}
    env.update(
        JAX_PLATFORMS="cpu",
        JAX_NUM_CPU_DEVICES="2",
        XLA_FLAGS="--xla_cpu_collective_call_warn_stuck_timeout_seconds=1",
    )
    args = [sys.executable, "-c", LATE_DEVICE, str(terminate_seconds), str(late_seconds)]
    return subprocess.run(args, env=env, capture_output=True, text=True, timeout=120)


def test_the_collective_timeout_we_set_decides_whether_a_late_device_aborts_the_process():
    # The limit reaches XLA: 1 s aborts (SIGABRT) a collective that waits 4 s ...
    aborted = late_device(terminate_seconds=1, late_seconds=4)
    assert aborted.returncode != 0 and "Termination timeout" in aborted.stderr
    # ... and a longer one lets the late device finish the step.
    survived = late_device(terminate_seconds=60, late_seconds=4)
    assert survived.returncode == 0, survived.stderr[-2000:]
    assert "gathered [0.0, 1.0, 2.0, 3.0]" in survived.stdout


def test_the_collective_timeout_is_set_before_jax_starts_and_an_explicit_one_is_kept():
    code = (
        "import os, json; from experiments import cpu_devices as c; "
        "first = c.tolerate_slow_collectives(); second = c.tolerate_slow_collectives(); "
        "import jax; jax.devices(); "
        "print(json.dumps([first, second, os.environ['XLA_FLAGS']]))"
    )
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    first, second, flags = json.loads(out.stdout.strip().splitlines()[-1])
    expected = f"{cpu_devices.TERMINATE_FLAG}={cpu_devices.COLLECTIVE_TERMINATE_SECONDS}"
    assert (first, second, flags) == (True, False, expected)
    env["XLA_FLAGS"] = f"{cpu_devices.TERMINATE_FLAG}=7"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == [False, False, env["XLA_FLAGS"]]


def test_bad_collective_timeout_is_refused():
    with pytest.raises(ValueError, match="seconds must be >= 1, got 0"):
        cpu_devices.tolerate_slow_collectives(0)


def test_virtual_devices_env_sets_the_count_both_ways_and_keeps_other_flags():
    base = {"XLA_FLAGS": "--xla_force_host_platform_device_count=3 --xla_cpu_foo=1", "A": "b"}
    env = cpu_devices.virtual_devices_env(8, base)
    assert env["A"] == "b" and env["JAX_NUM_CPU_DEVICES"] == "8" and env["JAX_PLATFORMS"] == "cpu"
    terminate = f"{cpu_devices.TERMINATE_FLAG}={cpu_devices.COLLECTIVE_TERMINATE_SECONDS}"
    assert env["XLA_FLAGS"].split() == [
        "--xla_cpu_foo=1",
        "--xla_force_host_platform_device_count=8",
        terminate,
    ]
    explicit = {"XLA_FLAGS": f"{cpu_devices.TERMINATE_FLAG}=5"}
    assert (
        f"{cpu_devices.TERMINATE_FLAG}=5"
        in cpu_devices.virtual_devices_env(2, explicit)["XLA_FLAGS"]
    )
    assert terminate not in cpu_devices.virtual_devices_env(2, explicit)["XLA_FLAGS"]
    with pytest.raises(ValueError, match="devices must be >= 1, got 0"):
        cpu_devices.virtual_devices_env(0)
