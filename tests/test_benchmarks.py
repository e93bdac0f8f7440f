"""``python -m benchmarks.losses`` on tiny sizes: it runs every loss, writes its table and JSON,
and ours and PML compute the same loss values on the benchmark's inputs (so the timings compare
like with like). Speed itself is never asserted (DEVELOPERS.md)."""

from __future__ import annotations

import json
import math
import pathlib

import numpy as np
import pytest

from benchmarks import losses as bench

# One worker runs this module (pytest -n N --dist loadgroup): its module fixtures are costly.
pytestmark = pytest.mark.xdist_group("benchmarks")

TINY = (
    "--batch 32 --dim 8 --classes 50 --repeats 2 --block 2 --pause 0 --warmup 1 --settle 0 --quiet"
).split()
ALL_LOSSES = [spec.name for spec in bench.SPECS]
PML_LOSSES = [spec.name for spec in bench.SPECS if spec.pml_build is not None]
PML, PML_MISSING = bench.load_pml()


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> tuple[pathlib.Path, dict]:
    out = tmp_path_factory.mktemp("bench") / "losses.md"
    assert bench.main([*TINY, "--out", str(out)]) == 0
    return out, json.loads(out.with_suffix(".json").read_text())


def _table_rows(markdown: str) -> dict[str, list[str]]:
    rows = {}
    for line in markdown.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| ") and cells[0] in ALL_LOSSES:
            rows[cells[0]] = cells
    return rows


def test_one_row_per_loss_with_finite_positive_times(report):
    out, payload = report
    rows = {r["loss"]: r for r in payload["rows"]}
    assert sorted(rows) == sorted(ALL_LOSSES)
    for name, r in rows.items():
        assert (r["batch"], r["dim"]) == (32, 8)
        labelled = bench.SPEC_BY_NAME[name].kind in ("head", "center")
        assert r["classes"] == (50 if labelled else None)
        assert r["ours_status"] == "ok"
        for key in ("ours_ms", "floor_ms", "ours_compile_s"):
            assert math.isfinite(r[key]) and r[key] > 0, (name, key, r[key])
        assert len(r["ours_times_ms"]) == len(r["floor_times_ms"]) == 2
        assert r["ours_xla_bytes"] > 0
        assert math.isfinite(r["ours_loss"])
    table = _table_rows(out.read_text())
    assert sorted(table) == sorted(ALL_LOSSES)


def test_peak_rss_is_measured(report):
    _, payload = report
    if "RSS worker" in " ".join(payload["notes"]) or "clear_refs" in " ".join(payload["notes"]):
        pytest.fail(f"RSS measurement failed: {payload['notes']}")
    for r in payload["rows"]:
        assert isinstance(r["ours_rss_bytes"], int) and r["ours_rss_bytes"] >= 0


@pytest.mark.skipif(PML is None, reason=f"PML comparison needs torch and PML: {PML_MISSING}")
def test_pml_is_timed_and_computes_the_same_loss(report):
    out, payload = report
    rows = {r["loss"]: r for r in payload["rows"]}
    for name in PML_LOSSES:
        r = rows[name]
        assert r["pml_status"] == "ok", r["pml_status"]
        assert math.isfinite(r["pml_ms"]) and r["pml_ms"] > 0
        assert r["pml_over_ours"] > 0
        assert isinstance(r["pml_rss_bytes"], int)
        assert r["pml_loss"] != 0.0  # a meaningful comparison
        np.testing.assert_allclose(r["ours_loss"], r["pml_loss"], rtol=1e-4, err_msg=name)
    for name in set(ALL_LOSSES) - set(PML_LOSSES):
        assert rows[name]["pml_status"] == "no PML equivalent"
    assert "PML ms" in out.read_text()


def test_without_pml_only_our_columns(tmp_path):
    out = tmp_path / "ours.md"
    argv = [*TINY, "--losses", "center", "cosface", "--no-pml", "--no-rss", "--out", str(out)]
    assert bench.main(argv) == 0
    text = out.read_text()
    assert "PML ms" not in text and "PML MiB" not in text
    assert sorted(_table_rows(text)) == ["center", "cosface"]
    payload = json.loads(out.with_suffix(".json").read_text())
    assert all(r["pml_ms"] is None for r in payload["rows"])


def test_class_block_size_computes_the_same_head_losses(tmp_path, report):
    _, dense = report
    out = tmp_path / "blocks.md"
    heads = ["cosface", "arcface", "sphereface"]
    argv = [*TINY, "--losses", *heads, "--class-block-size", "16", "--no-pml", "--no-rss"]
    assert bench.main([*argv, "--out", str(out)]) == 0
    payload = json.loads(out.with_suffix(".json").read_text())
    assert payload["meta"]["class_block_size"] == 16
    blocked = {r["loss"]: r["ours_loss"] for r in payload["rows"]}
    expected = {r["loss"]: r["ours_loss"] for r in dense["rows"] if r["loss"] in heads}
    assert sorted(blocked) == sorted(heads)
    for name in heads:
        np.testing.assert_allclose(blocked[name], expected[name], rtol=1e-5)


def test_breadth_names_the_losses_added_after_the_first_ten():
    breadth = [spec.name for spec in bench.BREADTH_SPECS]
    assert len(breadth) == 20 and breadth == ALL_LOSSES[-20:]
    assert bench.expand_losses(["center", "breadth"]) == ["center", *breadth]
    assert bench.build_parser().parse_args(["--losses", "breadth"]).losses == ["breadth"]


def test_help_explains_every_flag(capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for action in bench.build_parser()._actions:
        for option in action.option_strings:
            assert option in text
        if action.option_strings and action.dest != "help":
            assert action.help, action.dest


def test_bad_flags_are_rejected(capsys):
    for argv in (
        ["--batch", "4"],
        ["--per-class", "1"],
        ["--repeats", "0"],
        ["--losses", "x"],
        ["--class-block-size", "0"],
    ):
        with pytest.raises(SystemExit) as exit_info:
            bench.main(argv)
        assert exit_info.value.code == 2
