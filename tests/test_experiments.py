"""The experiments on tiny runs: every loss trains through ``train_and_evaluate``, files are
written, resume is exact, divergence stops with a useful message, bad flags and missing data
give clear errors. The CLI's frictions (interrupts, resume messages, output folder, --quiet,
--help) are in tests/test_cli.py."""

from __future__ import annotations

import dataclasses
import json
import re

import numpy as np
import orbax.checkpoint as ocp
import pytest

from experiments import cli, driver, objectives
from experiments.config import Config, ConfigError
from experiments.objectives import OBJECTIVES
from mlx_jax import data as D
from tests.test_data import cifar_members, write_cifar_tarball, write_idx_dir

TINY = [
    "--width",
    "4",
    "--batch-size",
    "32",
    "--eval-train-limit",
    "200",
    "--eval-examples",
    "50",
    "--quiet",
]


def learnable_images(seed: int, n: int):
    """10 classes, each a bright 6×6 square at its own place on noise: easy to learn."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 10
    rng.shuffle(labels)
    images = rng.integers(0, 60, (n, 28, 28)).astype(np.uint8)
    for i, y in enumerate(labels):
        r, c = 2 + 8 * (y // 4), 2 + 8 * (y % 4)
        images[i, r : r + 6, c : c + 6] = 250
    return images, labels.astype(np.uint8)


@pytest.fixture()
def data_dir(tmp_path, monkeypatch):
    monkeypatch.setenv(D.NO_FETCH_ENV, "1")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))
    monkeypatch.setattr(D, "DEBIAN_FASHION_MNIST_DIR", tmp_path / "no-debian")
    root = tmp_path / "data"
    arrays = {"train": learnable_images(0, 320), "test": learnable_images(1, 160)}
    write_idx_dir(root / "fashion_mnist", arrays, gz=True)
    return root


def train(data_dir, out, *extra, dataset="fashion_mnist"):
    argv = ["--data-dir", str(data_dir), "--workdir", str(out), *TINY, *extra]
    config, workdir = cli.parse(dataset, argv)
    return driver.train_and_evaluate(config, workdir)


def history(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("loss", sorted(OBJECTIVES))
def test_every_loss_trains_and_writes_its_files(loss, data_dir, tmp_path):
    out = tmp_path / "run"
    # Circle's γ = 256 makes lr 0.05 chaotic on this 4-channel model: rounding-level changes
    # (oneDNN's convolutions instead of XLA's) turned its losses from 214.8 → 201.9 → 164.6 into
    # 201.7 → 216.4 → 201.8; at 0.02 both fall (211.0 → 155.5, 211.9 → 159.6). FastAP at 0.05
    # rose in its third epoch on jax 0.12.1 (0.827 → 0.742 → 0.899); at 0.02 it falls on jax
    # 0.10.2 and 0.12.1 (0.759 → 0.669, 0.773 → 0.563).
    lrs = {
        "sphereface": [],
        "arcface": [],
        "cosface": [],
        "circle": ["--lr", "0.02"],
        "fast_ap": ["--lr", "0.02"],
    }
    extra = lrs.get(loss, ["--lr", "0.05"])
    summary = train(data_dir, out, "--loss", loss, "--epochs", "3", *extra)
    rows = history(out)
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    assert rows[-1]["loss"] < rows[0]["loss"], [r["loss"] for r in rows]
    for r in rows:
        for key in ("accuracy", "knn_accuracy", "precision_at_1", "map_at_r", "intra_inter_ratio"):
            assert np.isfinite(r[key]), (key, r)
        assert r["grad_norm"] > 0 and np.isfinite(r["grad_norm"]), r
        assert 0 <= r["clipped_fraction"] <= 1, r
    assert summary["final"]["epoch"] == 3 and summary["complete"]
    # epochs 1-2 on the per-epoch subset, the last on the whole test set
    assert [r["eval_test_examples"] for r in rows] == [50, 50, 160]
    for name in ("config.json", "summary.json", "summary.md", "features.gif", "features.png"):
        assert (out / name).stat().st_size > 0, name
    assert len(list((out / "plots").glob("epoch_*.npz"))) == 3
    assert sorted(int(p.name) for p in (out / "checkpoints").iterdir() if p.name.isdigit()) == [
        1,
        2,
        3,
    ]


@pytest.mark.parametrize("augmentation", ["none", "shift-flip"])
def test_resume_after_a_stop_ends_with_the_same_metrics(augmentation, data_dir, tmp_path):
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    common = ["--loss", "cent", "--epochs", "3", "--lr", "0.05", "--augment", augmentation]
    train(data_dir, straight, *common)
    partial = train(data_dir, stopped, *common, "--stop-after", "1")
    assert partial["stopped_after"] == 1 and len(history(stopped)) == 1
    train(data_dir, stopped, *common, "--resume")

    def strip(rows):
        return [{k: v for k, v in r.items() if "seconds" not in k} for r in rows]

    assert strip(history(stopped)) == strip(history(straight))
    restored = [
        ocp.CheckpointManager((path / "checkpoints").resolve()).restore(3)
        for path in (straight, stopped)
    ]
    for a, b in zip(jax_leaves(restored[0]), jax_leaves(restored[1]), strict=True):
        np.testing.assert_array_equal(a, b)


class _Killed(BaseException):
    """Stands in for SIGKILL: no handler in the driver catches it."""


@pytest.mark.parametrize("moment", ["before", "after"])
def test_a_run_killed_around_an_epoch_checkpoint_resumes_with_every_epoch(
    moment, data_dir, tmp_path, monkeypatch
):
    """A run killed just before or just after epoch 2's checkpoint is written must, resumed,
    end with every epoch's metrics line, equal to an uninterrupted run's (a line written after
    the checkpoint would be lost to a kill between the two)."""
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    common = ["--loss", "cent", "--epochs", "3", "--lr", "0.05"]
    train(data_dir, straight, *common)

    make_manager = driver.checkpoint_manager

    def dying_manager(directory, keep):
        manager = make_manager(directory, keep)
        save = manager.save

        def save_then_die(step, *args, **kwargs):
            if step == 2 and moment == "before":
                raise _Killed
            saved = save(step, *args, **kwargs)
            if step == 2:
                manager.wait_until_finished()
                raise _Killed
            return saved

        manager.save = save_then_die
        return manager

    monkeypatch.setattr(driver, "checkpoint_manager", dying_manager)
    with pytest.raises(_Killed):
        train(data_dir, killed, *common)
    monkeypatch.undo()
    summary = train(data_dir, killed, *common, "--resume")

    def strip(rows):
        return [{k: v for k, v in r.items() if "seconds" not in k} for r in rows]

    assert summary["epochs"] == 3
    assert strip(history(killed)) == strip(history(straight))


def test_time_box_stops_between_epochs_and_resume_finishes(data_dir, tmp_path):
    out = tmp_path / "run"
    common = ["--loss", "xent", "--epochs", "3", "--lr", "0.05"]
    partial = train(data_dir, out, *common, "--stop-after-minutes", "0.001")
    assert partial["stopped_after"] == 1 and len(history(out)) == 1  # a fresh run trains one
    again = train(data_dir, out, *common, "--stop-after-minutes", "0.001", "--resume")
    assert again["stopped_after"] == 1 and len(history(out)) == 1  # the resumed estimate
    summary = train(data_dir, out, *common, "--stop-after-minutes", "600", "--resume")
    assert summary["epochs"] == 3 and [r["epoch"] for r in history(out)] == [1, 2, 3]


def test_runs_started_before_a_flag_existed_resume_at_its_default(data_dir, tmp_path):
    out = tmp_path / "run"
    train(data_dir, out, "--loss", "xent", "--epochs", "2", "--stop-after", "1")
    config = json.loads((out / "config.json").read_text())
    del config["augment"], config["max_shift"]  # as written before --augment existed
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(
        driver.ResumeError, match=r"configuration .*: augment: stored 'none', now 'shift'\. "
    ):
        train(data_dir, out, "--loss", "xent", "--epochs", "2", "--augment", "shift", "--resume")
    summary = train(data_dir, out, "--loss", "xent", "--epochs", "2", "--resume")
    assert summary["epochs"] == 2


def test_augmented_training_learns(data_dir, tmp_path):
    out = tmp_path / "run"
    argv = ["--loss", "xent", "--epochs", "3", "--lr", "0.05", "--augment", "shift"]
    train(data_dir, out, *argv, "--max-shift", "1")
    rows = history(out)
    assert rows[-1]["loss"] < rows[0]["loss"], [r["loss"] for r in rows]
    assert rows[-1]["accuracy"] > 0.2, rows[-1]  # 10 classes: chance is 0.1
    with pytest.raises(ConfigError, match="--max-shift must be < the image side 28, got 28"):
        train(data_dir, tmp_path / "bad", *argv, "--max-shift", "28")


def jax_leaves(tree):
    import jax

    return jax.tree_util.tree_leaves(tree)


def test_resume_with_a_different_config_is_refused(data_dir, tmp_path):
    out = tmp_path / "run"
    train(data_dir, out, "--loss", "xent", "--epochs", "2", "--stop-after", "1")
    with pytest.raises(driver.ResumeError) as refused:
        train(data_dir, out, "--loss", "xent", "--epochs", "3", "--lr", "0.5", "--resume")
    # every differing key, with its stored and its new value; nothing else
    assert "epochs: stored 2, now 3; lr: stored 0.01, now 0.5." in str(refused.value)
    assert "margin" not in str(refused.value)


def test_resume_from_a_checkpoint_of_another_train_state_says_so(data_dir, tmp_path, monkeypatch):
    out = tmp_path / "run"
    train(data_dir, out, "--loss", "xent", "--epochs", "2", "--stop-after", "1")
    # A later version that records one more loss term has a differently shaped train state.
    monkeypatch.setattr(driver, "term_names", lambda objective: ["softmax", "another"])
    with pytest.raises(
        driver.ResumeError, match=r"cannot read the epoch-1 checkpoint .* another version"
    ):
        train(data_dir, out, "--loss", "xent", "--epochs", "2", "--resume")


def test_divergence_stops_at_once_with_step_terms_and_checkpoint(data_dir, tmp_path, capsys):
    out = tmp_path / "run"
    argv = [
        "--data-dir",
        str(data_dir),
        "--workdir",
        str(out),
        *TINY,
        "--loss",
        "cent",
        "--epochs",
        "3",
        "--lr",
        "1e30",
        "--clip-norm",
        "1e38",
        "--warmup-epochs",
        "0",
    ]
    code = cli.main("fashion_mnist", argv)
    err = capsys.readouterr().err
    assert code == cli.EXIT_CODES["run"]
    assert "loss became non-finite (" in err and "at step" in err
    assert "last good loss terms" in err and "softmax=" in err and "center=" in err
    assert "last good checkpoint" in err
    assert len(history(out)) <= 1  # never an epoch of NaN


def test_a_finite_loss_beyond_max_loss_stops_the_run_as_diverged(data_dir, tmp_path, capsys):
    # xent starts near log(10) = 2.3: a bound of 1.0 is crossed at the first step, while a
    # bound of 1e6 (the default) lets the same run train.
    out = tmp_path / "run"
    argv = ["--data-dir", str(data_dir), "--workdir", str(out), *TINY, "--loss", "xent"]
    code = cli.main("fashion_mnist", [*argv, "--epochs", "1", "--max-loss", "1.0"])
    err = capsys.readouterr().err
    assert code == cli.EXIT_CODES["run"]
    assert re.search(r"loss exploded to 2\.\d+ \(beyond --max-loss 1\) at step 0 ", err), err
    assert "none (diverged before the first checkpoint)" in err
    assert history(out) == []
    again = ["--data-dir", str(data_dir), "--workdir", str(tmp_path / "again"), *TINY]
    assert cli.main("fashion_mnist", [*again, "--loss", "xent", "--epochs", "1"]) == 0


@pytest.mark.parametrize("flag", ["--max-loss", "--inter-eps"])
@pytest.mark.parametrize("bad", ["0", "-1", "nan"])
def test_positive_float_flags_refuse_zero_negative_and_nan(flag, bad):
    with pytest.raises(ConfigError, match=f"{flag} must be > 0, got {bad}"):
        cli.config_from_args("fashion_mnist", [flag, bad])


def test_inter_eps_reaches_the_standalone_loss(monkeypatch):
    seen = []
    real = objectives.L.standalone_center_loss

    def spy(*args, **kwargs):
        seen.append(kwargs["eps"])
        return real(*args, **kwargs)

    monkeypatch.setattr(objectives.L, "standalone_center_loss", spy)
    cfg = cli.config_from_args("fashion_mnist", ["--inter-eps", "0.5"])
    model = driver.build_model(cfg, (28, 28, 1), 10)
    features = np.random.default_rng(0).standard_normal((8, 2)).astype(np.float32)
    cfg.objective.terms(model, features, np.arange(8) % 10, 0, cfg.loss_config)
    assert seen == [0.5]


def test_epochs_report_the_pre_clip_gradient_norm_and_the_share_of_clipped_steps(
    data_dir, tmp_path
):
    rows = {}
    for clip in ("1e-6", "1e9"):  # every step clipped / none (unclipped standalone diverges)
        train(data_dir, tmp_path / clip, "--loss", "xent", "--epochs", "1", "--clip-norm", clip)
        rows[clip] = history(tmp_path / clip)[0]
    assert rows["1e-6"]["clipped_fraction"] == 1.0 and rows["1e9"]["clipped_fraction"] == 0.0
    norms = [rows[c]["grad_norm"] for c in rows]
    assert all(1e-6 < n < 1e9 for n in norms), norms


def test_centers_trained_as_parameters(data_dir, tmp_path):
    out = tmp_path / "run"
    train(data_dir, out, "--loss", "cent", "--epochs", "2", "--center-update", "sgd")
    assert np.isfinite(history(out)[-1]["center_accuracy"])


def test_feature_dim_128_is_projected_for_plots(data_dir, tmp_path):
    out = tmp_path / "run"
    train(data_dir, out, "--loss", "xent", "--epochs", "1", "--feat-dim", "128")
    assert (out / "features.png").stat().st_size > 10_000
    frame = driver.Frame.load(out / "plots" / "epoch_001.npz")
    assert frame.dim == 128 and frame.train.shape == (200, 2) and frame.test.shape == (160, 2)


def test_cifar10_path_with_written_pickles(tmp_path, monkeypatch):
    monkeypatch.setenv(D.NO_FETCH_ENV, "1")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))
    rng = np.random.default_rng(0)
    arrays = {
        "train": (rng.integers(0, 256, (40, 32, 32, 3), dtype=np.uint8), np.arange(40) % 10),
        "test": (rng.integers(0, 256, (20, 32, 32, 3), dtype=np.uint8), np.arange(20) % 10),
    }
    write_cifar_tarball(tmp_path / "data" / "cifar-10-python.tar.gz", cifar_members(arrays, 8))
    out = tmp_path / "run"
    argv = [
        "--data-dir",
        str(tmp_path / "data"),
        "--workdir",
        str(out),
        "--batch-size",
        "8",
        "--epochs",
        "1",
        "--quiet",
        "--loss",
        "xent",
    ]
    driver.train_and_evaluate(*cli.parse("cifar10", argv))
    assert history(out)[0]["epoch"] == 1


def test_missing_data_gives_one_clear_message(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(D.NO_FETCH_ENV, "1")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))
    monkeypatch.setattr(D, "DEBIAN_FASHION_MNIST_DIR", tmp_path / "no-debian")
    (tmp_path / "empty").mkdir()
    code = cli.main(
        "fashion_mnist",
        ["--data-dir", str(tmp_path / "empty"), "--quiet", "--workdir", str(tmp_path / "run")],
    )
    err = capsys.readouterr().err
    assert code == cli.EXIT_CODES["data"]
    assert "dataset-fashion-mnist" in err and "Traceback" not in err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--limit", "0"], "--limit must be >= 1"),
        (["--epochs", "0"], "--epochs must be >= 1"),
        (["--lr", "-1"], "--lr must be > 0"),
        (["--clip-norm", "0"], "--clip-norm must be > 0, got 0.0"),
        (["--clip-norm", "nan"], "--clip-norm must be > 0, got nan"),
        (["--max-shift", "-1"], "--max-shift must be >= 0"),
        (["--stop-after-minutes", "0"], "--stop-after-minutes must be > 0"),
        (["--open-set", "1"], "--open-set must be >= 2"),
        (["--devices", "0"], "--devices must be >= 1"),
        (["--batch-size", "30", "--devices", "4"], "must be divisible by --devices"),
        (
            ["--loss", "triplet", "--batch-size", "30", "--samples-per-class", "4"],
            "must be a multiple of --samples-per-class",
        ),
    ],
)
def test_bad_flags_are_rejected_eagerly(argv, message):
    with pytest.raises(ConfigError, match=message):
        cli.config_from_args("mnist", argv)


def test_unknown_choices_are_refused_by_argparse_with_the_choices(capsys):
    with pytest.raises(SystemExit):
        cli.config_from_args("mnist", ["--augment", "rotate"])
    assert "'shift-flip'" in capsys.readouterr().err


def test_the_same_checks_apply_to_python_callers(tmp_path):
    config = cli.config_from_args("mnist", [])
    bad = dataclasses.replace(config, epochs=0)
    with pytest.raises(ConfigError, match="--epochs must be >= 1, got 0"):
        driver.train_and_evaluate(bad, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_help_explains_every_loss(capsys):
    with pytest.raises(SystemExit):
        cli.config_from_args("mnist", ["--help"])
    text = capsys.readouterr().out
    for name in OBJECTIVES:
        assert name in text
    for flag in (
        "--weight-cent",
        "--alpha",
        "--weight-intra",
        "--weight-inter",
        "--resume",
        "--data-dir",
        "--limit",
        "--center-update",
        "--stop-after",
    ):
        assert flag in text


def test_fresh_run_refuses_to_overwrite_an_earlier_run(data_dir, tmp_path):
    out = tmp_path / "run"
    train(data_dir, out, "--loss", "xent", "--epochs", "1")
    with pytest.raises(driver.ResumeError, match="pass --resume to continue"):
        train(data_dir, out, "--loss", "xent", "--epochs", "1")


def test_train_and_evaluate_takes_a_config_built_in_python(data_dir, tmp_path):
    config = Config(
        dataset="fashion_mnist",
        loss="xent",
        epochs=1,
        data_dir=str(data_dir),
        width=4,
        batch_size=32,
        eval_train_limit=200,
        eval_examples=50,
        quiet=True,
    )
    summary = driver.train_and_evaluate(config, tmp_path / "run")
    assert summary["complete"] and summary["final"]["eval_test_examples"] == 160
    stored = json.loads((tmp_path / "run" / "config.json").read_text())
    assert stored == config.validate().to_json() and "data_dir" not in stored  # run settings out
