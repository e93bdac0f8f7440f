"""What a newcomer meets on the command line: a missing --data-dir, Ctrl-C and SIGTERM, where
the results went, what --resume found, evaluation progress, the GIF's axes, --quiet, --help,
and the process tuning's opt-out."""

# ruff: noqa: F811  (data_dir: a fixture imported from tests.test_experiments)

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from experiments import cli, driver, onednn_conv, tuning
from mlx_jax import data as D
from mlx_jax import viz
from tests.test_experiments import TINY, data_dir, history  # noqa: F401 (fixture)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def argv_for(data_dir, out, *extra):
    return ["--data-dir", str(data_dir), "--workdir", str(out), *TINY, *extra]


def strip(rows):
    return [{k: v for k, v in r.items() if "seconds" not in k} for r in rows]


def test_a_missing_data_dir_is_an_error_naming_it(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(D.NO_FETCH_ENV, "1")
    monkeypatch.setattr(D, "DEBIAN_FASHION_MNIST_DIR", tmp_path / "no-debian")
    missing = tmp_path / "nonexistent"
    argv = ["--data-dir", str(missing), "--epochs", "1", "--limit", "256"]
    code = cli.main("fashion_mnist", [*argv, "--workdir", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == cli.EXIT_CODES["config"]
    assert f"--data-dir {missing} does not exist" in err and "--create-data-dir" in err
    assert not missing.exists() and not (tmp_path / "run").exists()
    # asked for, the folder is made (and here, with no source, the data error follows)
    code = cli.main(
        "fashion_mnist", [*argv, "--create-data-dir", "--workdir", str(tmp_path / "run")]
    )
    assert code == cli.EXIT_CODES["data"] and missing.is_dir()
    assert "dataset-fashion-mnist" in capsys.readouterr().err


def test_the_data_layer_refuses_a_missing_data_dir_when_told_not_to_create_it(tmp_path):
    with pytest.raises(ValueError, match=r"data_dir .*nowhere does not exist"):
        D.load_dataset("mnist", data_dir=tmp_path / "nowhere", create_data_dir=False)
    assert not (tmp_path / "nowhere").exists()


def interrupt_in_epoch(monkeypatch, epoch: int, interrupt):
    """Calls ``interrupt`` as epoch ``epoch`` starts (then the epoch runs, if it can)."""
    real = driver.train_epoch

    def train_epoch(exp, state, e):
        if e == epoch:
            interrupt()
        return real(exp, state, e)

    monkeypatch.setattr(driver, "train_epoch", train_epoch)


@pytest.mark.parametrize(
    "how, signum",
    [("ctrl-c", signal.SIGINT), ("sigterm", signal.SIGTERM)],
)
def test_an_interrupt_names_the_last_checkpoint_and_the_resume_command(
    how, signum, data_dir, tmp_path, monkeypatch, capsys
):
    common = ["--loss", "cent", "--epochs", "3", "--lr", "0.05"]
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    assert cli.main("fashion_mnist", argv_for(data_dir, straight, *common)) == 0

    def ctrl_c():
        raise KeyboardInterrupt

    def sigterm():  # delivered to this process, as `kill PID` would; the epoch's first step
        os.kill(os.getpid(), signal.SIGTERM)  # is the next safe point to stop at

    interrupt_in_epoch(monkeypatch, 2, ctrl_c if how == "ctrl-c" else sigterm)
    argv = argv_for(data_dir, stopped, *common)
    code = cli.main("fashion_mnist", argv)
    err = capsys.readouterr().err
    assert code == 128 + signum
    assert f"stopped by {signal.Signals(signum).name}; the last checkpoint is epoch 1 in " in err
    assert str(stopped / "checkpoints" / "1") in err
    command = err.split("continue with: ", 1)[1].strip()
    assert command == shlex.join(["python", "-m", "experiments.fashion_mnist", *argv, "--resume"])
    for signum_restored in (signal.SIGINT, signal.SIGTERM):  # the CLI's handlers are gone
        assert not isinstance(signal.getsignal(signum_restored), cli.StopRequest)
    monkeypatch.undo()
    assert cli.main("fashion_mnist", shlex.split(command)[3:]) == 0
    assert strip(history(stopped)) == strip(history(straight))


def test_an_ignored_sigint_stays_ignored(data_dir, tmp_path, monkeypatch):
    seen = []
    real = driver.train_and_evaluate

    def spy(*args, **kwargs):
        seen.append(signal.getsignal(signal.SIGINT))
        return real(*args, **kwargs)

    monkeypatch.setattr(driver, "train_and_evaluate", spy)
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        assert cli.main("fashion_mnist", argv_for(data_dir, tmp_path / "run", "--epochs", "1")) == 0
        assert seen == [signal.SIG_IGN] and signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)


def test_a_stop_request_waits_for_a_safe_point_and_a_second_one_does_not():
    stop = cli.StopRequest()
    stop.check()  # nothing requested: no-op
    stop(signal.SIGINT, None)  # the handler only records the request
    assert stop.signum == signal.SIGINT
    with pytest.raises(KeyboardInterrupt):
        stop.check()  # the run's next safe point
    with pytest.raises(KeyboardInterrupt):
        stop(signal.SIGINT, None)  # pressed again: at once


def test_an_interrupt_before_any_checkpoint_says_so(data_dir, tmp_path, monkeypatch, capsys):
    def ctrl_c():
        raise KeyboardInterrupt

    interrupt_in_epoch(monkeypatch, 1, ctrl_c)
    code = cli.main("fashion_mnist", argv_for(data_dir, tmp_path / "run", "--epochs", "2"))
    assert code == 130
    assert "no checkpoint was written yet" in capsys.readouterr().err


@pytest.mark.parametrize("quiet", [True, False])
def test_every_run_prints_its_folder_first_and_last_and_the_final_table(
    quiet, data_dir, tmp_path, capsys
):
    out = tmp_path / "run"
    argv = argv_for(data_dir, out, "--loss", "xent", "--epochs", "2")
    if not quiet:
        argv.remove("--quiet")
    assert cli.main("fashion_mnist", argv) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.strip()]
    assert lines[0] == f"run folder: {out}"
    assert lines[-1].startswith(f"results in {out}: summary.json")
    table = [line for line in lines if line.startswith("| ")]
    assert table[0].startswith("| epoch | loss |") and len(table) == 1 + 2  # head + 2 epochs
    epoch_lines = [line for line in lines if line.startswith("epoch ")]
    assert len(epoch_lines) == (0 if quiet else 2)


def test_resume_says_what_it_found(data_dir, tmp_path, capsys):
    out = tmp_path / "run"
    common = ["--loss", "xent", "--epochs", "2"]
    # nothing to resume: an error, not a silent fresh start
    code = cli.main("fashion_mnist", [*argv_for(data_dir, out, *common), "--resume"])
    err = capsys.readouterr().err
    assert code == cli.EXIT_CODES["run"]
    assert f"there is no checkpoint in {out / 'checkpoints'}" in err and "--resume=auto" in err
    assert not out.exists()
    # --resume=auto starts afresh when there is nothing, and continues a stopped run
    argv = [*argv_for(data_dir, out, *common), "--resume=auto"]
    assert cli.main("fashion_mnist", [*argv, "--stop-after", "1"]) == 0
    assert [r["epoch"] for r in history(out)] == [1]
    assert cli.main("fashion_mnist", argv) == 0
    assert "resumed from epoch 1" in capsys.readouterr().out
    assert [r["epoch"] for r in history(out)] == [1, 2]
    # a finished run: "already complete", its table, and nothing trained or rewritten
    before = (out / "metrics.jsonl").read_text()
    assert cli.main("fashion_mnist", [*argv_for(data_dir, out, *common), "--resume"]) == 0
    text = capsys.readouterr().out
    assert f"already complete: 2 epochs; results in {out}" in text and "| epoch |" in text
    assert (out / "metrics.jsonl").read_text() == before
    summary = driver.train_and_evaluate(*cli.parse("fashion_mnist", [*argv, "--quiet"]))
    assert summary == json.loads((out / "summary.json").read_text())


def test_a_balanced_loss_run_is_already_complete_with_its_automatic_samples_per_class(
    data_dir, tmp_path, capsys
):
    out = tmp_path / "run"
    argv = argv_for(data_dir, out, "--loss", "contrastive", "--epochs", "1")
    assert cli.main("fashion_mnist", argv) == 0
    assert json.loads((out / "config.json").read_text())["samples_per_class"] == 4
    assert cli.main("fashion_mnist", [*argv, "--resume"]) == 0
    assert "already complete" in capsys.readouterr().out


def test_evaluation_shows_progress_on_a_subset_then_on_everything(
    data_dir, tmp_path, monkeypatch, capsys
):
    seen = []
    real = driver._progress

    def spy(iterable, description, quiet):
        seen.append(description)
        return real(iterable, description, quiet)

    monkeypatch.setattr(driver, "_progress", spy)
    argv = argv_for(data_dir, tmp_path / "run", "--loss", "xent", "--epochs", "2")
    argv.remove("--quiet")
    assert cli.main("fashion_mnist", argv) == 0
    assert "evaluating epoch 1: train" in seen and "evaluating epoch 1: test" in seen
    assert "final evaluation: test" in seen
    assert "final evaluation: 160 test and 200 training images" in capsys.readouterr().out
    rows = history(tmp_path / "run")
    assert [r["eval_test_examples"] for r in rows] == [50, 160]
    assert all(r["eval_seconds"] >= 0 for r in rows)


def test_gif_frames_share_fixed_axes_that_hold_every_frame(data_dir, tmp_path, monkeypatch):
    drawn = []
    real = viz.train_test_figure

    def spy(train, train_y, test, test_y, path, **kwargs):
        drawn.append((str(path), kwargs["limits"], np.concatenate([train, test])))
        return real(train, train_y, test, test_y, path, **kwargs)

    monkeypatch.setattr(viz, "train_test_figure", spy)
    out = tmp_path / "run"
    driver.train_and_evaluate(
        *cli.parse("fashion_mnist", argv_for(data_dir, out, "--loss", "xent", "--epochs", "3"))
    )
    frames = [d for d in drawn if "/plots/" in d[0]]
    assert len(frames) == 3 and (out / "features.gif").stat().st_size > 0
    (x_low, x_high), (y_low, y_high) = frames[0][1]
    for _, limits, points in frames:
        assert limits == frames[0][1]
        assert (points[:, 0] >= x_low).all() and (points[:, 0] <= x_high).all()
        assert (points[:, 1] >= y_low).all() and (points[:, 1] <= y_high).all()
    spans = [np.ptp(points, axis=0) for _, _, points in frames]
    assert not np.allclose(spans[0], spans[-1])  # the clusters did move: fixed axes matter
    assert not list((out / "plots").glob("*.png"))  # frames live in the GIF and the .npz


def test_help_shows_no_none_defaults_and_describes_the_process_tuning(capsys):
    with pytest.raises(SystemExit):
        cli.parse("mnist", ["--help"])
    text = capsys.readouterr().out
    assert "(default: None)" not in text
    assert "--no-process-tuning" in text and "experiments/tuning.py" in text
    assert "(default: 128)" in text  # --batch-size: real defaults are still shown
    assert "--workdir DIR, --out DIR" in text


def test_process_tuning_is_applied_unless_opted_out(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(tuning, "reuse_freed_memory", lambda: calls.append("malloc") or True)
    monkeypatch.setattr(tuning, "use_one_device_per_core", lambda: calls.append("cpu") or 2)
    assert tuning.apply(True) == {"malloc": True, "cpu_devices": 2} and calls == ["malloc", "cpu"]
    calls.clear()
    assert tuning.apply(False) == {"malloc": False, "cpu_devices": None} and calls == []
    monkeypatch.setenv(tuning.OPT_OUT_ENV, "1")
    assert tuning.apply(True) == {"malloc": False, "cpu_devices": None} and calls == []


def test_without_process_tuning_auto_convolutions_are_xla(monkeypatch):
    monkeypatch.setattr(onednn_conv, "unavailable_reason", lambda: None)
    assert driver.resolve_conv("auto", process_tuning=True) == "onednn"
    assert driver.resolve_conv("auto", process_tuning=False) == "xla"
    assert driver.resolve_conv("onednn", process_tuning=False) == "onednn"  # asked for by name


def test_a_real_run_without_a_compiler_trains_on_xla_and_stops_cleanly_on_sigint(
    data_dir, tmp_path
):
    """The CLI as a user runs it: no g++ (so no oneDNN build), Ctrl-C as a real signal."""
    out = tmp_path / "run"
    env = {**os.environ, "CXX": "no-such-compiler++", "MLX_JAX_CACHE": str(tmp_path / "cache")}
    argv = argv_for(data_dir, out, "--loss", "xent", "--epochs", "200", "--lr", "0.05")
    argv.remove("--quiet")
    # `python -m experiments.fashion_mnist ARGV` with SIGINT as from a terminal, whatever this
    # pytest inherited (a background job starts with SIGINT ignored, and so would the child)
    as_from_a_terminal = (
        "import runpy, signal; signal.signal(signal.SIGINT, signal.SIG_DFL); "
        "runpy.run_module('experiments.fashion_mnist', run_name='__main__', alter_sys=True)"
    )
    command = [sys.executable, "-c", as_from_a_terminal, *argv]
    process = subprocess.Popen(
        command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    deadline = time.time() + 300
    while driver.latest_checkpoint(out) is None and process.poll() is None:
        assert time.time() < deadline, "no checkpoint within 5 minutes"
        time.sleep(0.2)
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr[-3000:]
    assert "convolutions: xla" in stdout
    assert "Traceback" not in stderr
    resume = stderr.split("continue with: ", 1)[1].strip()
    last = driver.latest_checkpoint(out)[0]
    again = subprocess.run(
        [sys.executable, *shlex.split(resume)[1:], "--stop-after", str(last + 1)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resumed from epoch {last}" in again.stdout
    assert [r["epoch"] for r in history(out)] == list(range(1, last + 2))
