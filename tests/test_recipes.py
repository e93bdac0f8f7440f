"""The validation split, the loss families' default recipes and the recipe campaign
(experiments/recipes.py): choices come from validation scores only, the final stage refuses
defaults other than the chosen ones, and its table reports the spread over seeds."""

from __future__ import annotations

import json
import pathlib
import statistics

import numpy as np
import pytest

from experiments import campaign, cli, config, driver, recipes, seed001
from experiments.config import Config, ConfigError
from mlx_jax import data as D
from tests.test_experiments import data_dir, history, train  # noqa: F401 (fixture)


def tiny_dataset(n_train=20, n_test=6) -> D.Dataset:
    rng = np.random.default_rng(0)
    images = rng.random((n_train + n_test, 28, 28, 1), np.float32)
    labels = (np.arange(n_train + n_test) % 10).astype(np.int32)
    return D.Dataset(
        "toy",
        images[:n_train],
        labels[:n_train],
        images[n_train:],
        labels[n_train:],
        10,
        tuple(str(i) for i in range(10)),
        "memory",
    )


# ----------------------------------------------------------------------------- split


def test_validation_split_holds_out_the_last_training_examples_and_drops_the_test_set():
    ds = tiny_dataset()
    split = D.validation_split(ds, 5)
    np.testing.assert_array_equal(split.train_images, ds.train_images[:15])
    np.testing.assert_array_equal(split.train_labels, ds.train_labels[:15])
    np.testing.assert_array_equal(split.test_images, ds.train_images[15:])
    np.testing.assert_array_equal(split.test_labels, ds.train_labels[15:])
    assert split.evaluation == "validation" and ds.evaluation == "test"
    assert "the last 5 of its 20 training examples" in split.source
    assert "validation=5" in repr(split)


@pytest.mark.parametrize("size", [0, 20, 21, -1, 2.5, True, "5"])
def test_validation_split_names_a_bad_size(size):
    with pytest.raises(ValueError, match=r"size must be an int in \[1, 19\]"):
        D.validation_split(tiny_dataset(), size)


def test_validation_split_refuses_to_split_twice():
    with pytest.raises(ValueError, match="already evaluates on its validation split"):
        D.validation_split(D.validation_split(tiny_dataset(), 5), 2)


def test_a_run_with_val_size_trains_on_the_rest_and_evaluates_on_the_held_out_images(
    data_dir,  # noqa: F811 (fixture)
    tmp_path,
    monkeypatch,
):
    seen = {}
    real = driver.closed_set_metrics

    def spy(config, model, train_f, train_y, test_f, test_y, num_classes):
        seen["test_y"] = np.asarray(test_y)
        return real(config, model, train_f, train_y, test_f, test_y, num_classes)

    monkeypatch.setattr(driver, "closed_set_metrics", spy)
    out = tmp_path / "run"
    summary = train(data_dir, out, "--loss", "xent", "--epochs", "1", "--val-size", "64")
    assert summary["evaluated_on"] == "validation"
    assert history(out)[-1]["eval_test_examples"] == 64
    # the data_dir fixture's training labels: the held-out ones are their last 64
    full = D.load_dataset("fashion_mnist", data_dir=data_dir)
    np.testing.assert_array_equal(seen["test_y"], full.train_labels[-64:])
    assert json.loads((out / "config.json").read_text())["val_size"] == 64


def test_val_size_must_leave_training_images(data_dir, tmp_path):  # noqa: F811 (fixture)
    with pytest.raises(ConfigError, match="--val-size must be below the 320 training images"):
        train(data_dir, tmp_path / "run", "--loss", "xent", "--epochs", "1", "--val-size", "320")


# ----------------------------------------------------------------------------- recipes


def test_unset_recipe_fields_take_the_loss_familys_recipe(monkeypatch):
    monkeypatch.setitem(config.FAMILY_RECIPES, "center", {"clip_norm": 10.0, "epochs": 7})
    monkeypatch.setitem(config.FAMILY_RECIPES, "softmax", {"augment": "shift"})
    standalone = cli.config_from_args("mnist", ["--loss", "standalone"])
    assert (standalone.clip_norm, standalone.epochs) == (10.0, 7)
    assert standalone.loss_config.inter_eps == config.BASE_RECIPE["loss_config.inter_eps"]
    xent = cli.config_from_args("mnist", ["--loss", "xent"])
    assert (xent.augment, xent.clip_norm, xent.epochs) == ("shift", 5.0, 20)
    cent = cli.config_from_args("mnist", ["--loss", "cent"])
    assert cent.augment == "shift"
    triplet = cli.config_from_args("mnist", ["--loss", "triplet"])
    assert (triplet.augment, triplet.clip_norm) == ("none", 5.0)


def test_a_flag_overrides_the_family_recipe(monkeypatch):
    monkeypatch.setitem(config.FAMILY_RECIPES, "center", {"clip_norm": 10.0})
    cfg = cli.config_from_args("mnist", ["--loss", "standalone", "--clip-norm", "3"])
    assert cfg.clip_norm == 3.0


def test_python_callers_get_the_recipe_through_validate():
    cfg = Config(dataset="mnist", loss="xent")
    assert cfg.epochs is None
    done = cfg.validate()
    assert done.epochs == config.recipe("xent")["epochs"]
    assert done.with_recipe() == done


def test_help_lists_each_familys_recipe(capsys):
    with pytest.raises(SystemExit):
        cli.config_from_args("mnist", ["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "softmax family (xent, cent)" in text and "center family (standalone)" in text


def test_resume_compares_the_completed_configuration(monkeypatch):
    # a run stored under the base recipe, resumed after the family's clip norm changed
    monkeypatch.setitem(config.FAMILY_RECIPES, "center", {})
    stored = Config(dataset="mnist", loss="standalone").validate().to_json()
    assert config.stored_differences(stored, Config(dataset="mnist", loss="standalone")) == {}
    monkeypatch.setitem(config.FAMILY_RECIPES, "center", {"clip_norm": 10.0})
    diff = config.stored_differences(stored, Config(dataset="mnist", loss="standalone"))
    assert diff == {"clip_norm": (5.0, 10.0)}


# ----------------------------------------------------------------------------- campaign


def test_recipe_flags_name_every_field():
    flags = recipes.recipe_flags(recipes.CANDIDATES["center"]["clip10-eps1-shift1"])
    cfg = cli.config_from_args("fashion_mnist", ["--loss", "standalone", *flags])
    assert (cfg.epochs, cfg.augment, cfg.max_shift) == (recipes.EPOCHS, "shift", 1)
    assert (cfg.clip_norm, cfg.loss_config.inter_eps) == (10.0, 1.0)


def fake_run(directory: pathlib.Path, accuracy: float, evaluated_on: str, epochs=10, seconds=60.0):
    """A finished run as the driver leaves it, as far as the tables read it."""
    directory.mkdir(parents=True)
    final = {"epoch": epochs, "accuracy": accuracy}
    summary = {"final": final, "best": final, "evaluated_on": evaluated_on}
    (directory / "summary.json").write_text(json.dumps(summary))
    rows = [{"epoch": e + 1, "seconds": seconds, "accuracy": accuracy} for e in range(epochs)]
    (directory / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")


# Stages called through main() restore published records first: point them at none, so that
# what experiments/results/recipes holds does not leak into these tests.
NO_RECORDS = ("--records", "/nonexistent/recipe-records")


def finish_selection(out, scores: dict[tuple[str, str], tuple[float, float]]):
    for (family, name), values in scores.items():
        for row, accuracy in zip(recipes.selection_rows(family), values, strict=True):
            directory = campaign.run_dir(recipes.candidate_dir(out, family, name), row)
            fake_run(directory, accuracy, "validation")


SCORES = {
    ("softmax", "plain"): (0.90, 0.92),
    ("softmax", "shift1"): (0.91, 0.93),
    ("softmax", "shift2"): (0.92, 0.91),  # same mean as shift1: the first listed wins
    ("center", "clip10-eps1"): (0.90, 0.90),
    ("center", "clip10-eps1-shift1"): (0.89, 0.90),
    ("center", "clip10-eps1-shift2"): (0.95, 0.80),
}


def test_selection_picks_the_best_mean_validation_accuracy(tmp_path):
    partial = {k: v for k, v in SCORES.items() if k != ("softmax", "shift2")}
    finish_selection(tmp_path, partial)
    assert recipes.chosen(tmp_path, "softmax") is None  # one candidate unfinished
    finish_selection(tmp_path, {("softmax", "shift2"): SCORES[("softmax", "shift2")]})
    assert recipes.chosen(tmp_path, "softmax") == "shift1"
    assert recipes.chosen(tmp_path, "center") == "clip10-eps1"
    table = recipes.selection_table(tmp_path)
    assert (
        "| softmax | shift1 | `--epochs 10 --augment shift --max-shift 1` | 0.9100 | 0.9300 |"
        in table
    )
    assert table.count("**chosen**") == 2


def test_selection_refuses_runs_scored_on_the_test_set(tmp_path):
    row = recipes.selection_rows("softmax")[0]
    fake_run(
        campaign.run_dir(recipes.candidate_dir(tmp_path, "softmax", "plain"), row), 0.9, "test"
    )
    with pytest.raises(RuntimeError, match="not evaluated on a validation split"):
        recipes.validation_scores(tmp_path, "softmax", "plain")


def test_selection_runs_every_candidate_on_validation_data(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(campaign, "run_rows", lambda *args: calls.append(args))
    recipes.select(tmp_path, None, 2, 1)
    assert len(calls) == sum(len(c) for c in recipes.CANDIDATES.values())
    for rows, out, flags, box, jobs, retries in calls:
        assert [r[0] for r in rows] == ["fashion_mnist"] * len(recipes.SELECTION_DIMS)
        assert flags[-4:] == ["--val-size", "5000", "--seed", "0"]
        assert out.parent == tmp_path / "select" and (box, jobs, retries) == (None, 2, 1)


def test_final_refuses_until_the_defaults_are_the_chosen_recipes(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(campaign, "run_rows", lambda *args: calls.append(args))
    with pytest.raises(recipes.RecipeMismatch, match="selection has not finished"):
        recipes.final(tmp_path, None, 1, 0)
    finish_selection(tmp_path, SCORES)
    monkeypatch.setitem(config.FAMILY_RECIPES, "softmax", {"epochs": 10})
    with pytest.raises(recipes.RecipeMismatch, match=r"chose softmax-shift1 for xent.*'augment'"):
        recipes.final(tmp_path, None, 1, 0)
    assert recipes.main(["final", "--out", str(tmp_path), *NO_RECORDS]) == 2
    assert not calls
    for family in ("softmax", "center"):
        choice = recipes.CANDIDATES[family][recipes.chosen(tmp_path, family)]
        monkeypatch.setitem(config.FAMILY_RECIPES, family, dict(choice))
    recipes.final(tmp_path, None, 2, 0)
    # all twelve rows of seed 0 first, then seed 1, then seed 2
    assert [c[2] for c in calls] == [["--seed", str(s)] for s in recipes.SEEDS]
    assert all(len(c[0]) == 12 for c in calls)


def test_final_table_reports_mean_std_and_minimum_over_seeds(tmp_path):
    row = ("fashion_mnist", 2, "xent")
    target = seed001.SEED_TABLE[("fashion_mnist", 2)]["xent"]
    accuracies = [target + 0.001, target - 0.002, target - 0.005]
    for seed, accuracy in zip(recipes.SEEDS, accuracies, strict=True):
        fake_run(campaign.run_dir(recipes.final_dir(tmp_path, seed), row), accuracy, "test")
    partial = ("mnist", 2, "cent")
    fake_run(campaign.run_dir(recipes.final_dir(tmp_path, 0), partial), 0.99, "test")
    table = recipes.final_table(tmp_path).splitlines()
    line = next(x for x in table if x.startswith("| fashion_mnist | 2 | xent |"))
    mean, std = statistics.fmean(accuracies), statistics.stdev(accuracies)
    assert f"| {mean:.4f} ± {std:.4f} | {min(accuracies):.4f} | 0,1,2 |" in line
    assert f"misses by {100 * (target - mean):.2f} points¹" in line
    assert table[-1] == recipes.NEXT_STEP  # a miss says what the next step is
    line = next(x for x in table if x.startswith("| mnist | 2 | cent |"))
    assert "| 0.9900 ± 0.0000 | 0.9900 | 0 | meets |" in line
    assert "not measured yet" in next(x for x in table if x.startswith("| mnist | 128 | xent |"))
    assert "`python -m experiments.mnist --loss xent --feat-dim 128 --seed S`" in "\n".join(table)


def test_the_twelve_final_rows_are_seed_001s():
    assert sorted(recipes.final_rows()) == sorted(
        (d, dim, loss)
        for d in ("mnist", "fashion_mnist")
        for dim in (2, 128)
        for loss in ("xent", "cent", "standalone")
    )


def test_the_table_stage_writes_both_tables_without_training(tmp_path, monkeypatch):
    monkeypatch.setattr(campaign, "run_rows", lambda *args: pytest.fail("table stage trained"))
    finish_selection(tmp_path, SCORES)
    row = ("mnist", 128, "standalone")
    fake_run(campaign.run_dir(recipes.final_dir(tmp_path, 1), row), 0.995, "test")
    assert recipes.main(["table", "--out", str(tmp_path), *NO_RECORDS]) == 0
    assert (tmp_path / "select" / "table.md").read_text().count("**chosen**") == 2
    final = (tmp_path / "final" / "table.md").read_text()
    assert "| mnist | 128 | standalone | 0.996 | 0.9950 ± 0.0000 | 0.9950 | 1 | meets |" in final
    assert "Next step" not in final  # nothing missed


def test_status_counts_epochs_and_estimates_the_hours_left(tmp_path, capsys):
    assert recipes.status(tmp_path, 2).splitlines() == [
        f"select: 0 of 12 runs finished, {12 * recipes.EPOCHS} of {12 * recipes.EPOCHS} epochs left",
        f"final: 0 of 36 runs finished, {36 * recipes.EPOCHS} of {36 * recipes.EPOCHS} epochs left",
    ]
    family, name = "softmax", "plain"
    rows = recipes.selection_rows(family)
    fake_run(
        campaign.run_dir(recipes.candidate_dir(tmp_path, family, name), rows[0]),
        0.9,
        "validation",
        epochs=recipes.EPOCHS,
        seconds=300.0,
    )
    started = campaign.run_dir(recipes.candidate_dir(tmp_path, family, name), rows[1])
    started.mkdir(parents=True)
    epoch = json.dumps({"epoch": 1, "seconds": 420.0, "accuracy": 0.5})
    (started / "metrics.jsonl").write_text(f"{epoch}\n{epoch}\n")
    select_left = 12 * recipes.EPOCHS - recipes.EPOCHS - 2
    per_epoch = statistics.median([5.0] * recipes.EPOCHS + [7.0, 7.0])  # every epoch, minutes
    final_per_epoch = per_epoch * 60_000 / (60_000 - recipes.VAL_SIZE)
    assert recipes.main(["status", "--out", str(tmp_path), "--jobs", "2", *NO_RECORDS]) == 0
    assert capsys.readouterr().out.splitlines() == [
        f"select: 1 of 12 runs finished, {select_left} of {12 * recipes.EPOCHS} epochs left, "
        f"about {select_left * per_epoch / 60 / 2:.1f} h at {per_epoch:.1f} min per epoch "
        "and --jobs 2",
        f"final: 0 of 36 runs finished, {36 * recipes.EPOCHS} of {36 * recipes.EPOCHS} epochs "
        f"left, about {36 * recipes.EPOCHS * final_per_epoch / 60 / 2:.1f} h at "
        f"{final_per_epoch:.1f} min per epoch and --jobs 2",
    ]


def test_publish_copies_the_finished_runs_records_and_both_tables(tmp_path, capsys):
    out, to = tmp_path / "runs", tmp_path / "results"
    finish_selection(out, SCORES)
    for seed in recipes.SEEDS[:2]:
        directory = campaign.run_dir(recipes.final_dir(out, seed), ("mnist", 2, "xent"))
        fake_run(directory, 0.99, "test")
        (directory / "config.json").write_text("{}")
        for junk in ("features.png", "features.gif", "log.txt", "checkpoints/10/x"):
            (directory / junk).parent.mkdir(parents=True, exist_ok=True)
            (directory / junk).write_text(junk)
    started = campaign.run_dir(recipes.final_dir(out, 0), ("mnist", 2, "cent"))
    started.mkdir(parents=True)
    (started / "metrics.jsonl").write_text('{"epoch": 1}\n')
    assert recipes.main(["publish", "--out", str(out), "--records", str(to)]) == 0
    assert "published" in capsys.readouterr().out
    copied = sorted(str(p.relative_to(to)) for p in to.rglob("*") if p.is_file())
    selection = [
        str(campaign.run_dir(recipes.candidate_dir(to, family, name), row).relative_to(to) / file)
        for family, name in SCORES
        for row in recipes.selection_rows(family)
        for file in ("metrics.jsonl", "summary.json")
    ]
    seed0, seed1 = "final/seed0/mnist-xent-feat2", "final/seed1/mnist-xent-feat2"
    assert copied == sorted(
        [
            *selection,
            "select/table.md",
            "final/table.md",
            *(
                f"{seed0}/{f}"
                for f in ("config.json", "features.png", "metrics.jsonl", "summary.json")
            ),
            *(f"{seed1}/{f}" for f in ("config.json", "metrics.jsonl", "summary.json")),
        ]
    )
    assert "| mnist | 2 | xent |" in (to / "final" / "table.md").read_text()
    with pytest.raises(ValueError, match="--records must differ from --out"):
        recipes.publish(out, out)


def test_a_fresh_clone_continues_from_the_published_records(tmp_path, monkeypatch, capsys):
    old, records, fresh = tmp_path / "old", tmp_path / "records", tmp_path / "fresh"
    finish_selection(old, SCORES)
    mine = campaign.run_dir(recipes.final_dir(old, 0), ("mnist", 2, "xent"))
    fake_run(mine, 0.99, "test")
    recipes.publish(old, records)
    # the new machine has finished one run itself, with its own result: it stays
    kept = campaign.run_dir(recipes.final_dir(fresh, 0), ("mnist", 2, "xent"))
    fake_run(kept, 0.98, "test")
    calls = []
    monkeypatch.setattr(campaign, "run_rows", lambda *args: calls.append(args))
    for family in ("softmax", "center"):
        choice = recipes.CANDIDATES[family][recipes.chosen(old, family)]
        monkeypatch.setitem(config.FAMILY_RECIPES, family, dict(choice))
    assert recipes.main(["final", "--out", str(fresh), "--records", str(records)]) == 0
    assert f"restored {len(SCORES) * 2} finished runs" in capsys.readouterr().out
    assert len(calls) == len(recipes.SEEDS)  # the gate passed on the restored selection
    assert recipes.chosen(fresh, "softmax") == "shift1"
    assert json.loads((kept / "summary.json").read_text())["final"]["accuracy"] == 0.98
    assert recipes.restore(records, fresh) == []  # nothing left to restore


def test_select_runs_only_the_families_asked_for(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(campaign, "run_rows", lambda *args: calls.append(args))
    argv = ["select", "--out", str(tmp_path), "--family", "center", *NO_RECORDS]
    assert recipes.main(argv) == 0
    assert [c[1].name for c in calls] == [f"center-{n}" for n in recipes.CANDIDATES["center"]]
    with pytest.raises(ValueError, match=r"families must be among \['center', 'softmax'\]"):
        recipes.select(tmp_path, None, 1, 0, ("triplet",))
    with pytest.raises(SystemExit):
        recipes.main(["final", "--out", str(tmp_path), "--family", "center", *NO_RECORDS])
