"""The campaign runner: rows run once, finished rows are skipped, tables quote the commands."""

from __future__ import annotations

import json
import os
import shutil
import sys

import pytest

from experiments import campaign, seed001
from tests.test_experiments import TINY, data_dir  # noqa: F401  (fixture)


def test_rows_run_once_and_the_table_quotes_them(data_dir, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "campaign"
    extra = ["--epochs", "1", "--data-dir", str(data_dir), *TINY, "--lr", "0.05"]
    rows = [("fashion_mnist", 2, "xent"), ("fashion_mnist", 2, "contrastive")]
    campaign.run_rows(rows, out, extra)
    for row in rows:
        final, minutes = campaign.finished(out, row)
        assert final["epoch"] == 1 and minutes > 0
    stamp = (out / "fashion_mnist-xent-feat2" / "summary.json").stat().st_mtime_ns
    capsys.readouterr()
    campaign.run_rows(rows, out, extra)  # finished rows are skipped
    assert capsys.readouterr().out == ""
    assert (out / "fashion_mnist-xent-feat2" / "summary.json").stat().st_mtime_ns == stamp

    text = campaign.table(out, [*rows, ("mnist", 2, "xent"), ("cifar10", 2, "xent")], extra, False)
    lines = text.splitlines()
    accuracy = json.loads((out / "fashion_mnist-xent-feat2" / "summary.json").read_text())
    assert f"| xent | fashion_mnist | 2 | {accuracy['final']['accuracy']:.4f} |" in lines[2]
    assert "`python -m experiments.fashion_mnist --loss xent --feat-dim 2 --epochs 1" in lines[2]
    assert "not measured yet" in lines[4] and "needs network" in lines[5]


def test_seed001_table_lists_every_row_with_the_seed_number(tmp_path):
    text = seed001.table(tmp_path, ["fashion_mnist", "cifar10"], [2, 128], 20)
    lines = text.splitlines()[2:]
    assert len(lines) == 12
    assert "| standalone | fashion_mnist | 2 | 0.921 | not measured yet |" in text
    assert "| cent | cifar10 | 128 | 0.858 | needs network |" in text


def test_parallel_jobs_run_rows_in_pinned_processes_and_report_failures(
    data_dir,  # noqa: F811
    tmp_path,
    all_cpus,
):
    out = tmp_path / "campaign"
    loud = [flag for flag in TINY if flag != "--quiet"]
    extra = ["--epochs", "1", "--data-dir", str(data_dir), *loud, "--lr", "0.05"]
    rows = [("fashion_mnist", 2, "xent"), ("fashion_mnist", 2, "standalone")]
    campaign.run_rows(rows, out, extra, jobs=2)
    for row in rows:
        final, _ = campaign.finished(out, row)
        assert final["epoch"] == 1
        log = (campaign.run_dir(out, row) / "log.txt").read_text()
        assert f"epoch 1: loss {final['loss']:.4f}" in log  # epoch lines, but the training
        assert "epoch 1/1" not in log  # progress bar (desc "epoch 1/1") is for terminals only

    bad = [("fashion_mnist", 2, "cent")]
    with pytest.raises(RuntimeError, match=r"fashion_mnist 2 cent \(exit [1-9]"):
        campaign.run_rows(bad, out, [*extra, "--lr", "-1"], jobs=2)
    log = (campaign.run_dir(out, bad[0]) / "log.txt").read_text()
    assert log.count("--lr must be > 0") == 1  # an error the driver reports is not retried


def _dying_python(tmp_path, row_dir, signal_name, times):
    """An interpreter for campaign.PYTHON that kills the row's process with ``signal_name``
    once its first epoch's metrics line is written, on the first ``times`` starts."""
    starts = tmp_path / f"starts-{signal_name}"
    script = tmp_path / f"python-dying-{signal_name}"
    script.write_text(
        f"""#!/bin/bash
echo >> {starts}
if [ "$(wc -l < {starts})" -le {times} ]; then
  ( until [ "$(wc -l < {row_dir}/metrics.jsonl 2>/dev/null || echo 0)" -ge 1 ]; do
      sleep 0.05
    done
    kill -{signal_name} $$ ) &
fi
exec {sys.executable} "$@"
"""
    )
    script.chmod(0o755)
    return script, starts


def test_a_row_killed_by_a_signal_restarts_from_its_checkpoint_and_ends_as_if_never_killed(
    data_dir,  # noqa: F811
    tmp_path,
    capsys,
    monkeypatch,
):
    extra = ["--epochs", "3", "--data-dir", str(data_dir), *TINY, "--lr", "0.05"]
    row = ("fashion_mnist", 2, "cent")
    campaign.run_rows([row], tmp_path / "straight", extra)
    out = tmp_path / "killed"
    python, starts = _dying_python(tmp_path, campaign.run_dir(out, row), "ABRT", times=1)
    monkeypatch.setattr(campaign, "PYTHON", str(python))
    campaign.run_rows([row], out, extra, retries=1)
    assert "killed by SIGABRT" in capsys.readouterr().out
    assert len(starts.read_text().splitlines()) == 2

    def rows(out):
        lines = (campaign.run_dir(out, row) / "metrics.jsonl").read_text().splitlines()
        return [{k: v for k, v in json.loads(x).items() if "seconds" not in k} for x in lines]

    assert [r["epoch"] for r in rows(out)] == [1, 2, 3]
    assert rows(out) == rows(tmp_path / "straight")


@pytest.mark.parametrize(("signal_name", "times", "retries"), [("KILL", 2, 1), ("TERM", 1, 2)])
def test_a_row_fails_when_its_retries_run_out_or_a_person_stopped_it(
    data_dir,  # noqa: F811
    tmp_path,
    monkeypatch,
    signal_name,
    times,
    retries,
):
    extra = ["--epochs", "3", "--data-dir", str(data_dir), *TINY, "--lr", "0.05"]
    row = ("fashion_mnist", 2, "xent")
    out = tmp_path / "campaign"
    python, starts = _dying_python(tmp_path, campaign.run_dir(out, row), signal_name, times)
    monkeypatch.setattr(campaign, "PYTHON", str(python))
    with pytest.raises(RuntimeError, match=rf"fashion_mnist 2 xent \(killed by SIG{signal_name}"):
        campaign.run_rows([row], out, extra, retries=retries)
    # SIGKILL: the first start and its one retry; SIGTERM (a person's stop): no retry
    assert len(starts.read_text().splitlines()) == (2 if signal_name == "KILL" else 1)


def test_time_box_stops_rows_after_an_epoch_and_lists_their_checkpoints(
    data_dir,  # noqa: F811
    tmp_path,
    capsys,
):
    out = tmp_path / "campaign"
    extra = ["--epochs", "2", "--data-dir", str(data_dir), *TINY, "--lr", "0.05"]
    rows = [("fashion_mnist", 2, "xent"), ("fashion_mnist", 2, "cent")]
    campaign.run_rows(rows, out, extra, stop_after_minutes=0.01)  # less than one epoch
    first = campaign.run_dir(out, rows[0])
    assert [json.loads(line)["epoch"] for line in (first / "metrics.jsonl").open()] == [1]
    assert not campaign.run_dir(out, rows[1]).exists()  # started after the box: never
    assert campaign.newest_checkpoints(out, rows) == [first / "checkpoints" / "1"]
    assert f"unfinished, resumes from epoch 1: {first / 'checkpoints' / '1'}" in (
        capsys.readouterr().out
    )
    last = json.loads((first / "metrics.jsonl").read_text().splitlines()[-1])
    lines = campaign.table(out, rows, extra, open_set=False).splitlines()
    assert f"| xent | fashion_mnist | 2 | {last['accuracy']:.4f} |" in lines[2]
    assert "| 1 of 2, unfinished |" in lines[2] and "not measured yet" in lines[3]
    campaign.run_rows(rows, out, extra)
    assert [campaign.finished(out, row)[0]["epoch"] for row in rows] == [2, 2]
    assert campaign.newest_checkpoints(out, rows) == []


def _write_epochs(out, row, minutes, finished=False):
    directory = campaign.run_dir(out, row)
    directory.mkdir(parents=True)
    lines = [json.dumps({"epoch": i + 1, "seconds": 60 * m}) for i, m in enumerate(minutes)]
    (directory / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    if finished:
        (directory / "summary.json").write_text("{}")


def test_epoch_estimate_is_the_rows_own_last_epoch_else_the_median_of_the_others(tmp_path):
    rows = [("mnist", 2, loss) for loss in ("xent", "cent", "standalone", "circle", "triplet")]
    assert campaign.epoch_minutes(tmp_path, rows, rows[0]) is None
    _write_epochs(tmp_path, rows[0], [19.0, 6.0])
    _write_epochs(tmp_path, rows[1], [7.0])
    _write_epochs(tmp_path, rows[2], [4.0, 9.0])
    assert campaign.epoch_minutes(tmp_path, rows, rows[0]) == 6.0
    assert campaign.epoch_minutes(tmp_path, rows, rows[4]) == 7.0


def test_a_fresh_row_does_not_start_when_one_epoch_would_overrun_the_time_box(
    tmp_path, capsys, all_cpus
):
    out = tmp_path / "campaign"
    done, fresh = ("fashion_mnist", 2, "xent"), ("fashion_mnist", 2, "cent")
    _write_epochs(out, done, [10.0], finished=True)
    campaign.run_rows([done, fresh], out, ["--epochs", "1"], stop_after_minutes=5, jobs=2)
    assert not campaign.run_dir(out, fresh).exists()
    assert "one epoch takes ~10.0 min" in capsys.readouterr().out


def test_a_row_carried_with_only_its_newest_checkpoint_resumes_elsewhere(
    data_dir,  # noqa: F811
    tmp_path,
):
    """What a fresh clone gets when the newest checkpoint is committed (git add -f)."""
    extra = ["--epochs", "3", "--data-dir", str(data_dir), *TINY, "--lr", "0.05"]
    row = ("fashion_mnist", 2, "cent")
    campaign.run_rows([row], tmp_path / "straight", extra)
    here = tmp_path / "here"
    campaign.run_rows([row], here, [*extra[:2], "--stop-after", "2", *extra[2:]])
    (newest,) = campaign.newest_checkpoints(here, [row])
    assert newest.name == "2"
    clone = tmp_path / "clone"
    for path in [newest, *campaign.run_dir(here, row).glob("*.json*")]:
        target = clone / path.relative_to(here)
        if path.is_dir():
            shutil.copytree(path, target)
        else:
            shutil.copy(path, target)
    campaign.run_rows([row], clone, extra)

    def rows(out):
        lines = (campaign.run_dir(out, row) / "metrics.jsonl").read_text().splitlines()
        return [{k: v for k, v in json.loads(x).items() if "seconds" not in k} for x in lines]

    assert rows(clone) == rows(tmp_path / "straight")


def test_driver_args_reach_every_row_and_its_command(data_dir, tmp_path):  # noqa: F811
    out = tmp_path / "campaign"
    flags = f"--data-dir {data_dir} " + " ".join(TINY) + " --augment shift --max-shift 1"
    argv = ["--out", str(out), "--losses", "xent", "--datasets", "fashion_mnist", "--dims", "2"]
    campaign.main([*argv, "--epochs", "1", f"--driver-args={flags}"])
    config = json.loads((out / "fashion_mnist-xent-feat2" / "config.json").read_text())
    assert (config["augment"], config["max_shift"]) == ("shift", 1)
    assert "--augment shift --max-shift 1`" in (out / "table.md").read_text()


@pytest.mark.parametrize("jobs", [0, 1.5, True, "more than the CPUs"])
def test_bad_jobs_names_the_argument(tmp_path, jobs):
    if jobs == "more than the CPUs":
        jobs = len(os.sched_getaffinity(0)) + 1
    with pytest.raises(ValueError, match="jobs must be"):
        campaign.run_rows([("mnist", 2, "xent")], tmp_path, [], jobs=jobs)


@pytest.mark.parametrize("retries", [-1, 0.5, False])
def test_bad_retries_names_the_argument(tmp_path, retries):
    with pytest.raises(ValueError, match="retries must be an int >= 0"):
        campaign.run_rows([("mnist", 2, "xent")], tmp_path, [], retries=retries)


@pytest.mark.parametrize(
    ("module", "flag", "value"), [(campaign, "--jobs", "0"), (seed001, "--retries", "-1")]
)
def test_bad_grid_flags_are_refused_by_name_on_the_command_line(tmp_path, module, flag, value):
    argv = ["--out", str(tmp_path), flag, value] + (["--epochs", "1"] if module is campaign else [])
    with pytest.raises(SystemExit, match=f"{flag} must be >= "):
        module.main(argv)


def test_tables_report_a_cut_off_row_by_its_last_epoch_marked_unfinished(tmp_path):
    """A row stopped short (time box, killed process) still shows what it measured, marked."""
    row = ("fashion_mnist", 2, "standalone")
    _write_epochs(tmp_path, row, [8.0, 7.0])
    directory = campaign.run_dir(tmp_path, row)
    (directory / "config.json").write_text(json.dumps({"epochs": 20}))
    metrics = [json.loads(line) for line in (directory / "metrics.jsonl").open()]
    metrics[-1].update(accuracy=0.9185)
    (directory / "metrics.jsonl").write_text("\n".join(map(json.dumps, metrics)) + "\n")
    assert campaign.unfinished(tmp_path, row) == (metrics[-1], 20, 15.0)
    text = seed001.table(tmp_path, ["fashion_mnist"], [2], 20)
    assert "| standalone | fashion_mnist | 2 | 0.921 | 0.9185 | | 2 of 20, unfinished | 15.0 |" in (
        text
    )
    (directory / "summary.json").write_text("{}")
    assert campaign.unfinished(tmp_path, row) is None
