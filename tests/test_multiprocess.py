"""Multi-process runs on jax.distributed, with real processes: 2 processes × 2 CPU devices on
localhost (gloo collectives).

* the library: global-batch losses, the per-sample center loss with the α rule summed over
  processes, and Partial FC with classes sharded over both processes give the single-process
  values and gradients of the concatenated batch (tests/multiprocess_worker.py);
* the experiments: ``python -m experiments.launch`` trains what one process on 4 devices trains;
  a process killed mid-run fails the job at once with a message naming it and the resume
  command, and the resumed run ends exactly where the uninterrupted one does;
* the settings: flags and JAX_* variables, with errors naming the flag.
"""

from __future__ import annotations

import os
import pathlib
import re
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from experiments import distributed, driver, launch
from experiments.config import ConfigError
from mlx_jax import centers as centers_lib
from mlx_jax import data as D
from mlx_jax.losses import arcface_loss, center_loss
from tests import multiprocess_worker as worker
from tests.test_data import write_idx_dir
from tests.test_experiments import TINY, history, learnable_images

# One worker runs this module (pytest -n N --dist loadgroup): its module fixtures are costly.
pytestmark = pytest.mark.xdist_group("multiprocess")

ROOT = pathlib.Path(__file__).resolve().parents[1]
PROCESS_TIMEOUT_S = 300


def _env(devices: int) -> dict[str, str]:
    """The subprocesses' environment: ``devices`` CPU devices, no data fetching, no stale
    process settings."""
    env = {**os.environ, "JAX_NUM_CPU_DEVICES": str(devices), D.NO_FETCH_ENV: "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    for variable in distributed.ENV.values():
        env.pop(variable, None)
    return env


def assert_close(actual, expected, what, rtol=2e-5):
    """|a − e| <= rtol·max|e| elementwise: float32 summation order differs across processes."""
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
    assert np.all(np.isfinite(actual)), what
    scale = max(float(np.max(np.abs(expected))), 1e-12)
    error = float(np.max(np.abs(actual - expected)))
    assert error <= rtol * scale, f"{what}: max |diff| {error:.3g} vs scale {scale:.3g}"


# ----------------------------------------------------------------------------- the library


@pytest.fixture(scope="module")
def worker_results(tmp_path_factory) -> dict[str, np.ndarray]:
    """Both workers' arrays, merged: values from process 0, gradient rows from both."""
    out = tmp_path_factory.mktemp("workers")
    port = launch.free_port()
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "tests.multiprocess_worker", "--port", str(port)]
            + ["--processes", "2", "--id", str(i), "--out", str(out)],
            env=_env(2),
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for i in range(2)
    ]
    logs = []
    for proc in procs:
        try:
            logs.append(proc.communicate(timeout=PROCESS_TIMEOUT_S)[0].decode(errors="replace"))
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            pytest.fail("the worker processes did not finish in time (a collective hung?)")
    for i, proc in enumerate(procs):
        assert proc.returncode == 0, f"worker {i} failed:\n{logs[i][-3000:]}"
    merged: dict[str, np.ndarray] = {}
    for i in range(2):
        with np.load(out / f"process-{i}.npz") as arrays:
            for key in arrays.files:
                if key.endswith("value") or "/centers_grad" in key or "/alpha_update" in key:
                    if i == 1:  # replicated: both processes must hold the same value
                        np.testing.assert_array_equal(arrays[key], merged[key], err_msg=key)
                        continue
                merged[key] = arrays[key]
    return merged


def _rows(results: dict[str, np.ndarray], name: str, kind: str = "grad") -> np.ndarray:
    """The global [B, ...] array assembled from both processes' row shards."""
    starts = sorted(int(k.rsplit("/", 1)[1]) for k in results if k.startswith(f"{name}/{kind}/"))
    parts = [results[f"{name}/{kind}/{s}"] for s in starts]
    assembled = np.concatenate(parts, axis=1 if kind == "class_grad" else 0)
    if kind == "grad":
        covered = np.concatenate([results[f"{name}/rows/{s}"][:, 0] for s in starts])
        np.testing.assert_array_equal(covered, np.arange(worker.BATCH))
    return assembled


@pytest.mark.parametrize("name", sorted(worker.pair_losses()))
def test_global_batch_losses_across_processes_equal_one_process(worker_results, name):
    data = worker.problem()
    loss_fn = worker.pair_losses()[name]
    x, y, w = data["embeddings"], data["labels"], data["weights"]
    value, grad = jax.value_and_grad(lambda e: loss_fn(e, y, weights=w))(x)
    assert float(value) > 0  # a problem with something to learn: the check can fail
    assert_close(worker_results[f"{name}/value"], value, f"{name} value")
    assert_close(_rows(worker_results, name), grad, f"{name} gradient")


def test_center_loss_and_alpha_rule_sum_over_processes(worker_results):
    data = worker.problem()
    x, y, w, c = (data[k] for k in ("embeddings", "labels", "weights", "centers"))
    value, (gx, gc) = jax.value_and_grad(
        lambda e, cc: center_loss(e, y, cc, weights=w), argnums=(0, 1)
    )(x, c)
    assert_close(worker_results["center/value"], value, "center value")
    assert_close(_rows(worker_results, "center"), gx, "center embedding gradient")
    assert_close(worker_results["center/centers_grad"], gc, "center centers gradient")
    updated = centers_lib.update_centers(c, x, y, worker.ALPHA, weights=w)
    assert_close(worker_results["center/alpha_update"], updated, "alpha rule")
    assert not np.allclose(updated, c)  # the rule moved the centers


def test_partial_fc_with_classes_on_both_processes_equals_arcface(worker_results):
    data = worker.problem()
    x, y, cw = data["embeddings"], data["pfc_labels"], data["class_weights"]
    value, (gx, gw) = jax.value_and_grad(lambda e, W: arcface_loss(e, y, W), argnums=(0, 1))(x, cw)
    assert_close(worker_results["partial_fc/value"], value, "Partial FC value")
    assert_close(_rows(worker_results, "partial_fc"), gx, "Partial FC embedding gradient")
    assert_close(_rows(worker_results, "partial_fc", "class_grad"), gw, "Partial FC class gradient")


# ----------------------------------------------------------------------------- the experiments

RUN = ["--loss", "triplet", "--epochs", "2", "--lr", "0.05", "--conv", "xla", *TINY]
CONTINUOUS = ["loss", "intra_inter_ratio", "map_at_r"]
DISCRETE = ["accuracy", "knn_accuracy", "precision_at_1"]


def _launch_command(data_dir, workdir, *extra):
    return [sys.executable, "-m", "experiments.launch", "--processes", "2"] + [
        "--devices-per-process",
        "2",
        "fashion_mnist",
        "--data-dir",
        str(data_dir),
        "--workdir",
        str(workdir),
        *RUN,
        *extra,
    ]


def _run(argv, devices=1) -> subprocess.CompletedProcess:
    return subprocess.run(
        argv, env=_env(devices), cwd=ROOT, capture_output=True, text=True, timeout=600
    )


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    """An uninterrupted 2-process run and a 1-process run on 4 devices of the same config."""
    root = tmp_path_factory.mktemp("launched")
    data = root / "data"
    arrays = {"train": learnable_images(0, 320), "test": learnable_images(1, 160)}
    write_idx_dir(data / "fashion_mnist", arrays, gz=True)
    two = _run(_launch_command(data, root / "two"))
    assert two.returncode == 0, two.stderr[-3000:]
    single = [sys.executable, "-m", "experiments.fashion_mnist", "--data-dir", str(data)]
    one = _run([*single, "--workdir", str(root / "one"), *RUN, "--devices", "4"], devices=4)
    assert one.returncode == 0, one.stderr[-3000:]
    return {"root": root, "data": data, "two": two, "one": one}


def test_two_processes_train_what_one_process_on_four_devices_trains(launched):
    root = launched["root"]
    two, one = history(root / "two"), history(root / "one")
    assert [r["step"] for r in two] == [r["step"] for r in one] == [10, 20]
    for r2, r1 in zip(two, one, strict=True):
        for key in CONTINUOUS:
            np.testing.assert_allclose(r2[key], r1[key], rtol=1e-4, err_msg=key)
        for key in DISCRETE:  # 160 test images: one borderline sample may flip
            assert abs(r2[key] - r1[key]) <= 1 / 160 + 1e-9, (key, r1[key], r2[key])
    summary = (root / "two" / "summary.json").read_text()
    assert '"processes": 2' in summary and '"devices": 4' in summary
    out = launched["two"].stdout
    assert out.count("run folder:") == 1, out  # process 0 speaks for the run


def _children(pid: int) -> list[int]:
    path = pathlib.Path(f"/proc/{pid}/task/{pid}/children")
    return [int(p) for p in path.read_text().split()] if path.exists() else []


def _process_with_id(launcher_pid: int, index: int) -> int | None:
    for pid in _children(launcher_pid):
        try:
            argv = pathlib.Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except FileNotFoundError:
            continue
        if b"--process-id" in argv and argv[argv.index(b"--process-id") + 1] == str(index).encode():
            return pid
    return None


def _launch_until_first_checkpoint(data_dir, workdir, *extra) -> subprocess.Popen:
    """A launched 2-process run, returned once its epoch-1 checkpoint exists (it is in epoch 2)."""
    launcher = subprocess.Popen(
        _launch_command(data_dir, workdir, *extra),
        env=_env(1),
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + PROCESS_TIMEOUT_S
    while driver.latest_checkpoint(workdir) is None:
        assert launcher.poll() is None, launcher.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "no epoch-1 checkpoint in time"
        time.sleep(0.05)
    return launcher


@pytest.mark.skipif(not pathlib.Path("/proc/self/task").exists(), reason="needs Linux /proc")
def test_a_killed_process_fails_the_job_and_the_resumed_run_is_exact(launched):
    root, data = launched["root"], launched["data"]
    workdir = root / "killed"
    launcher = _launch_until_first_checkpoint(data, workdir)
    victim = _process_with_id(launcher.pid, 1)
    assert victim is not None
    os.kill(victim, signal.SIGKILL)
    killed_at = time.monotonic()
    _, err = launcher.communicate(timeout=120)
    assert time.monotonic() - killed_at < 60  # the survivor is stopped, not left waiting
    assert launcher.returncode == 128 + signal.SIGKILL, err[-3000:]
    assert f"process 1 (pid {victim}) was killed by SIGKILL" in err
    assert "experiments.launch" in err and "--resume" in err  # the command to continue
    assert not (workdir / "summary.json").exists()

    resumed = _run(_launch_command(data, workdir, "--resume"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from epoch 1" in resumed.stdout
    straight, again = history(root / "two"), history(workdir)
    assert [r["epoch"] for r in again] == [1, 2]
    for r_straight, r_again in zip(straight, again, strict=True):
        for key in CONTINUOUS + DISCRETE + ["step"]:
            assert r_again[key] == r_straight[key], (key, r_straight[key], r_again[key])


@pytest.mark.skipif(not pathlib.Path("/proc/self/task").exists(), reason="needs Linux /proc")
def test_sigterm_to_the_launcher_stops_every_process_at_a_safe_point(launched):
    root, data = launched["root"], launched["data"]
    workdir = root / "stopped"
    launcher = _launch_until_first_checkpoint(data, workdir, "--epochs", "20")
    launcher.terminate()
    _, err = launcher.communicate(timeout=120)
    assert launcher.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert "stopped by SIGTERM (passed on to every process); continue with:" in err
    # every process names the launcher's command, not its own per-process one
    continued = [line for line in err.splitlines() if "continue with:" in line]
    assert continued and all("python -m experiments.launch" in line for line in continued)
    assert all("--resume" in line and "--process-id" not in line for line in continued)
    assert driver.latest_checkpoint(workdir)[0] < 20


@pytest.mark.skipif(not pathlib.Path("/proc/self/task").exists(), reason="needs Linux /proc")
def test_a_stop_signal_to_one_process_stops_every_process_at_the_same_step(launched):
    """Without an agreed stop the job hangs: process 0 waits in the next step's collective
    for the stopped process 1, which waits for it in jax.distributed's shutdown."""
    root, data = launched["root"], launched["data"]
    workdir = root / "one-stopped"
    launcher = _launch_until_first_checkpoint(data, workdir, "--epochs", "20")
    victim = _process_with_id(launcher.pid, 1)
    assert victim is not None
    os.kill(victim, signal.SIGTERM)
    _, err = launcher.communicate(timeout=120)
    assert launcher.returncode == 128 + signal.SIGTERM, err[-3000:]
    # both end at once: the launcher names the first it sees
    assert re.search(r"process [01] \(pid \d+\) stopped by SIGTERM", err), err[-3000:]
    assert "was killed" not in err, err[-3000:]
    # process 0's own lines are not prefixed: it stopped at the same step and said so
    own = [line for line in err.splitlines() if line.startswith("stopped by SIGTERM")]
    assert own and "continue with:" in err, err[-3000:]
    assert driver.latest_checkpoint(workdir)[0] < 20


def test_agreed_stop_in_one_process_raises_the_requested_signal():
    requested = {"signum": None}
    check = distributed.agreed_stop(lambda: requested["signum"])
    check()  # nothing requested: no stop
    requested["signum"] = signal.SIGTERM
    with pytest.raises(distributed.StopRequested) as info:
        check()
    assert info.value.signum == signal.SIGTERM and isinstance(info.value, KeyboardInterrupt)


# ----------------------------------------------------------------------------- the settings


def test_process_grid_comes_from_flags_or_jax_variables():
    assert not distributed.process_grid(environ={}).multi_process
    env = {"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234", "JAX_NUM_PROCESSES": "4"}
    grid = distributed.process_grid(environ={**env, "JAX_PROCESS_ID": "3"})
    assert grid == distributed.ProcessGrid("10.0.0.1:1234", 4, 3)
    grid = distributed.process_grid(process_id=1, environ={**env, "JAX_PROCESS_ID": "3"})
    assert grid.process_id == 1  # a flag wins over its variable


@pytest.mark.parametrize(
    ("kwargs", "environ", "message"),
    [
        ({"num_processes": 2, "process_id": 0}, {}, r"--coordinator-address .* is needed"),
        ({"coordinator_address": "h:1", "num_processes": 2}, {}, r"--process-id .* \[0, 2\)"),
        ({"coordinator_address": "h:1", "num_processes": 2, "process_id": 2}, {}, r"got 2"),
        ({"coordinator_address": "host", "num_processes": 2, "process_id": 0}, {}, "HOST:PORT"),
        ({}, {"JAX_NUM_PROCESSES": "two"}, "JAX_NUM_PROCESSES must be an integer"),
    ],
)
def test_incomplete_process_settings_name_the_flag(kwargs, environ, message):
    with pytest.raises(ConfigError, match=message):
        distributed.process_grid(**kwargs, environ=environ)


def test_the_cli_refuses_bad_process_settings_before_any_work(tmp_path):
    result = _run(
        [sys.executable, "-m", "experiments.mnist", "--num-processes", "2", "--process-id", "0"]
        + ["--workdir", str(tmp_path / "run")]
    )
    assert result.returncode == 2
    assert "--coordinator-address" in result.stderr
    assert not (tmp_path / "run").exists()


def test_launcher_reports_how_a_process_ended():
    assert launch.how_it_ended(-9) == "was killed by SIGKILL"
    assert launch.how_it_ended(143) == "stopped by SIGTERM"
    assert launch.how_it_ended(4) == "exited with code 4"
    assert launch.exit_code(-9) == 137 and launch.exit_code(3) == 3


def test_launcher_refuses_the_flags_it_sets(capsys):
    assert launch.main(["mnist", "--process-id", "1"]) == 2
    assert "drop ['--process-id']" in capsys.readouterr().err
