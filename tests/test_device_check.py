"""``python -m benchmarks.device_check`` on the CPU (no accelerator here): the dry run writes every
result file with consistent content, a planted failing test fails the check (exit code 1) and is
named in the summary, the default-precision pass really runs at another precision, and a run
without an accelerator stops with exit code 2 unless told otherwise."""

from __future__ import annotations

import json
import math
import os
import pathlib
import re
import subprocess
import sys
import xml.etree.ElementTree as ET

import jax
import pytest

from benchmarks import device_check as dc

# One worker runs this module (pytest -n N --dist loadgroup): its module fixtures are costly.
pytestmark = pytest.mark.xdist_group("device_check")

ROOT = pathlib.Path(__file__).resolve().parent.parent
FILES = {
    "summary.md",
    "summary.json",
    "tests-highest.xml",
    "tests-highest.log",
    "tests-default.xml",
    "tests-default.log",
    "speed.json",
    "speed.log",
}
PLANTED = """\
import jax


def test_precision_is_highest():
    assert jax.config.jax_default_matmul_precision == "highest"


def test_planted_failure():
    assert 1 + 1 == 3, "planted"
"""


def _check(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "benchmarks.device_check", *args],
        cwd=ROOT,
        env=dict(os.environ, **(env or {})),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def _section(summary: str, title: str) -> str:
    """The text of summary.md's section ``## title`` (up to the next one)."""
    start = summary.index(f"## {title}")
    end = summary.find("\n## ", start + 1)
    return summary[start : end if end > 0 else None]


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory) -> tuple[subprocess.CompletedProcess, pathlib.Path]:
    out = tmp_path_factory.mktemp("device-check")
    return _check("--dry-run", "--out", str(out)), out


def test_dry_run_passes_and_writes_every_file(dry_run):
    proc, out = dry_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert {p.name for p in out.iterdir()} == FILES
    summary = json.loads((out / "summary.json").read_text())
    assert summary["result"] == "PASS" and summary["exit_code"] == 0
    assert set(summary["parts"]) == {"tests", "speed", "default-pass"}
    assert all(part["complete"] for part in summary["parts"].values())


def test_summary_names_device_versions_date_and_precision(dry_run):
    _, out = dry_run
    text = (out / "summary.md").read_text()
    assert "DRY RUN" in text and "- result: **PASS**" in text
    assert re.search(r"^- device: cpu × 1 \(JAX platform cpu", text, re.M)
    assert f"jax {jax.__version__}," in text
    assert re.search(r"^- date: \d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC", text, re.M)
    assert "JAX_DEFAULT_MATMUL_PRECISION=highest" in text
    probe = json.loads((out / "summary.json").read_text())["probe"]
    assert probe["default_matmul_precision"] == "highest"  # the setting reached JAX
    assert probe["matmul_rel_err"]["HIGHEST"] < 1e-5  # float32 accuracy at "highest"


@pytest.mark.parametrize("name", ["highest", "default"])
def test_summary_counts_are_the_junit_counts(dry_run, name):
    _, out = dry_run
    cases = list(ET.parse(out / f"tests-{name}.xml").getroot().iter("testcase"))
    assert len(cases) >= 10  # the dry run's reference comparisons all ran
    assert not [c for c in cases if len(c)]  # no failure, error or skip
    title = "precision highest" if name == "highest" else "JAX's default precision"
    section = _section((out / "summary.md").read_text(), f"Numerical tests, {title}")
    assert f"| {len(cases)} | 0 | 0 | 0 | {len(cases)} |" in section
    part = json.loads((out / "summary.json").read_text())["parts"]
    counts = part["tests" if name == "highest" else "default-pass"]["counts"]
    assert counts == {
        "passed": len(cases),
        "failed": 0,
        "errors": 0,
        "skipped": 0,
        "total": len(cases),
    }
    assert f"{len(cases)} passed" in (out / f"tests-{name}.log").read_text()


def test_speed_json_and_table(dry_run):
    _, out = dry_run
    payload = json.loads((out / "speed.json").read_text())
    assert payload["complete"] is True
    rows = [(r["loss"], r["batch"], r["classes"]) for r in payload["rows"]]
    assert rows == [("contrastive", 32, None), ("cosface", 32, 50), ("center", 32, 50)] + [
        ("contrastive", 64, None)
    ]
    section = _section((out / "summary.md").read_text(), "Speed")
    for r in payload["rows"]:
        assert r["ours_status"] == "ok" and r["dim"] == 8
        assert len(r["ours_times_ms"]) == 2
        for key in ("ours_ms", "floor_ms", "ours_compile_s", "ours_loss"):
            assert math.isfinite(r[key]), (r["loss"], key)
        assert r["ours_ms"] > 0
        classes = "–" if r["classes"] is None else str(r["classes"])
        cells = (
            f"| {r['loss']} | {r['batch']} | 8 | {classes} | {r['ours_ms']:.2f}"  # ' †' may follow
        )
        assert cells in section
    assert payload["table"] in section


def test_planted_failure_fails_the_check(tmp_path):
    planted = tmp_path / "test_planted.py"
    planted.write_text(PLANTED)
    out = tmp_path / "out"
    args = ["--dry-run", "--parts", "tests", "default-pass", "--tests", str(planted)]
    proc = _check(*args, "--out", str(out))
    assert proc.returncode == dc.EXIT_FAILED, proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["result"].startswith("FAIL: 1 failed")
    highest, default = summary["parts"]["tests"], summary["parts"]["default-pass"]
    assert highest["counts"] == {"passed": 1, "failed": 1, "errors": 0, "skipped": 0, "total": 2}
    assert [node for node, _ in highest["failures"]] == ["test_planted_failure"]
    # Without JAX_DEFAULT_MATMUL_PRECISION=highest the precision test fails too, and only there.
    assert sorted(node for node, _ in default["failures"]) == [
        "test_planted_failure",
        "test_precision_is_highest",
    ]
    assert default["only_here"] == ["test_precision_is_highest"]
    text = (out / "summary.md").read_text()
    assert "- result: **FAIL: 1 failed, 0 errors (precision highest)**" in text
    assert "- `test_planted_failure`: AssertionError: planted" in text
    assert "- `test_precision_is_highest` (passes at highest precision)" in text
    assert "Not run (not in --parts)." in _section(text, "Speed")
    assert not (out / "speed.json").exists()


def test_no_accelerator_stops_unless_allowed(tmp_path):
    proc = _check("--out", str(tmp_path), env={"JAX_PLATFORMS": "cpu"})
    assert proc.returncode == dc.EXIT_NO_ACCELERATOR
    assert "--allow-cpu" in proc.stderr
    assert "NO ACCELERATOR" in (tmp_path / "summary.md").read_text()
    assert {p.name for p in tmp_path.iterdir()} == {"summary.md", "summary.json"}


def test_numerical_selection():
    files = dc.numerical_test_files()
    for name in ("test_triplet", "test_margin_softmax", "test_parity_triplet", "test_distances"):
        assert f"tests/{name}.py" in files
    for name in (
        "test_cli",
        "test_data",
        "test_experiments",
        "test_benchmarks",
        "test_device_check",
    ):
        assert f"tests/{name}.py" not in files
    assert all((ROOT / f).is_file() for f in files)


def test_parse_junit(tmp_path):
    xml = tmp_path / "junit.xml"
    xml.write_text(
        '<testsuites><testsuite name="pytest">'
        '<testcase classname="tests.test_triplet" name="test_a[1]" />'
        '<testcase classname="tests.test_triplet.TestX" name="test_b">'
        '<failure message="AssertionError: off by 1e-3&#10;more">tb</failure></testcase>'
        '<testcase classname="tests.test_triplet" name="test_c"><error message="boom" /></testcase>'
        '<testcase classname="tests.test_triplet" name="test_d">'
        '<skipped message="needs torch" /></testcase>'
        '<testcase time="0.0" />'  # pytest's entry for the test cut short by SIGINT
        "</testsuite></testsuites>"
    )
    parsed = dc.parse_junit(xml)
    assert parsed["counts"] == {"passed": 1, "failed": 1, "errors": 1, "skipped": 1, "total": 4}
    assert parsed["failures"] == [
        ("tests/test_triplet.py::TestX::test_b", "AssertionError: off by 1e-3"),
        ("tests/test_triplet.py::test_c", "boom"),
    ]
    assert parsed["skip_reasons"] == [("needs torch", 1)]
