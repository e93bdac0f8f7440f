"""One-shot accelerator check: the numerical loss tests and the speed table on a GPU (or TPU).

What it runs, in this order, each part in its own process so that a failure or a hang of one
still leaves the others' results:

1. **probe**: JAX's backend and devices, versions, and the relative error of a float32
   512×512 matmul against float64 at ``Precision.DEFAULT`` and ``HIGHEST`` (on NVIDIA GPUs
   XLA's default may round float32 matmul inputs to TF32: errors ~1e-3 instead of ~1e-6).
   No accelerator (JAX's default backend is ``cpu``) stops here with exit code 2, unless
   ``--allow-cpu`` or ``--dry-run``.
2. **tests** (precision "highest"): pytest on the numerical test files — every ``tests/test_*.py``
   but the ones in :data:`NOT_NUMERICAL` (experiments end to end, CLI, data, the benchmarks'
   own tests, ...): the losses against the NumPy references (``tests/references*.py``), the
   float64 gradient checks, jit/eager and invariance checks, and PML parity where
   pytorch-metric-learning is installed. JAX's default device is the accelerator, so the losses
   run there. ``JAX_DEFAULT_MATMUL_PRECISION=highest`` is set because the tests' tolerances are
   float32 ones. With pytest-xdist installed, ``--workers`` processes share the device
   (``XLA_PYTHON_CLIENT_PREALLOCATE=false``).
3. **speed**: ``benchmarks.losses``'s configurations (jitted forward+backward, matmul floor,
   compile time, XLA memory) at B=1024, D=128, C=10,000 for every loss, then B=4096 for the
   pair losses, few repeats; ours only unless ``--pml`` (PML would run on torch's CPU, not the
   accelerator). It stops before a configuration that would not fit the time left; those rows
   say so.
4. **default-pass** (informational): the same tests at JAX's default matmul precision, with the
   time left; the summary lists the tests that fail only there. It does not change the exit code.

Budget: ``--time-budget-s`` (default 420 s, so that the whole check ends within 8 minutes).
The highest-precision tests get up to 55 % of it; the speed part two thirds of what is then
left (the rest goes to the default-precision pass, when at least 30 s remain). A part that
reaches its deadline is interrupted (SIGINT, then SIGKILL 15 s later); what it finished is kept.

Outputs, in ``--out DIR`` (8 files):

* ``summary.md`` — device, versions, date, budget, precision, pass/fail counts and the failing
  tests of each pass, the speed table; ``summary.json`` — the same, machine-readable.
* ``tests-highest.xml`` / ``.log`` and ``tests-default.xml`` / ``.log`` — pytest's junit XML and
  output of each pass.
* ``speed.json`` — every configuration's row (as ``benchmarks.losses`` writes them, every timed
  call included) with the table; ``speed.log`` — the speed part's progress.

Exit code: 0 all ran and passed; 1 a numerical test failed or errored (highest precision);
2 no accelerator (or JAX unusable); 3 nothing failed, but a part did not complete (time budget,
crash).

How to run, on a GPU host (no network needed at run time; install beforehand)::

    pip install -e '.[test]' "jax[cuda12]"    # or jax[cuda13]; PML too for the parity tests
    python -m benchmarks.device_check --out device-check

``--dry-run`` runs the same code on the CPU with tiny sizes and a few tests (what
``tests/test_device_check.py`` does); ``--allow-cpu`` runs the full check on the CPU.
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import os
import pathlib
import platform
import shlex
import shutil
import signal
import subprocess
import sys
import time
import traceback
import xml.etree.ElementTree as ET
from collections.abc import Callable, Sequence
from typing import Any

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent

# tests/test_*.py that are not numerical comparisons of the losses (end-to-end experiments,
# CLI, data, plots, evaluation metrics, the benchmarks' own tests, packaging), or that need the
# CPU (oneDNN, virtual CPU devices, multi-process CPU collectives). Every other test file runs,
# so new loss test files are picked up; add a new file here if it is neither.
NOT_NUMERICAL = frozenset(
    {
        "test_api",
        "test_augment",
        "test_bad_input",
        "test_benchmark_partial_fc",
        "test_benchmarks",
        "test_campaign",
        "test_cli",
        "test_conv_layers_benchmark",
        "test_cpu_devices",
        "test_data",
        "test_dependencies",
        "test_device_check",
        "test_experiments",
        "test_head_parts_benchmark",
        "test_huge_batch",
        "test_metrics",
        "test_models",
        "test_multidevice",
        "test_multiprocess",
        "test_onednn_conv",
        "test_open_set",
        "test_readme",
        "test_retrieval",
        "test_train_step_benchmark",
        "test_verification",
        "test_viz",
    }
)
# --dry-run: a few reference comparisons, and one loss of each input kind.
DRY_RUN_TESTS = (
    "tests/test_distances.py::test_matches_reference",
    "tests/test_contrastive.py::test_matches_reference",
)
DRY_RUN_LOSSES = ("contrastive", "cosface", "center")
SIZES = {  # (full check, dry run)
    "batch": (1024, 32),
    "pair_batch": (4096, 64),
    "dim": (128, 8),
    "classes": (10_000, 50),
    "repeats": (5, 2),
}
PARTS = ("tests", "speed", "default-pass")

EXIT_OK, EXIT_FAILED, EXIT_NO_ACCELERATOR, EXIT_INCOMPLETE = 0, 1, 2, 3
TESTS_SHARE = 0.55  # of the budget, for the highest-precision tests
SPEED_SHARE = 2 / 3  # of what is left after them, when the default-precision pass follows
MIN_PART_S = 30.0  # a part with less time left than this is not started
GRACE_S = 15.0  # after SIGINT at a part's deadline, before SIGKILL
RESERVE_S = 10.0  # kept at the end of the budget for the summary
PROBE_TIMEOUT_S = 120.0
MAX_LISTED = 40  # failing tests listed per pass in summary.md

PROBE = r"""
import json, platform
import numpy as np
import jax, jax.numpy as jnp
out = {"python": platform.python_version(), "jax": jax.__version__, "numpy": np.__version__}
try:
    import jaxlib
    out["jaxlib"] = jaxlib.__version__
except Exception:
    out["jaxlib"] = None
try:
    import mlx_jax
    out["mlx_jax"] = mlx_jax.__version__
except Exception as error:
    out["mlx_jax"] = f"not importable: {error}"
devices = jax.devices()
out["backend"] = jax.default_backend()
out["platform"] = devices[0].platform
out["devices"] = [d.device_kind for d in devices]
out["default_matmul_precision"] = jax.config.jax_default_matmul_precision
rng = np.random.default_rng(0)
a, b = (rng.standard_normal((512, 512)).astype(np.float32) for _ in range(2))
exact = a.astype(np.float64) @ b.astype(np.float64)
def rel_err(precision):
    got = np.asarray(jnp.matmul(jnp.asarray(a), jnp.asarray(b), precision=precision))
    return float(np.abs(got - exact).max() / np.abs(exact).max())
out["matmul_rel_err"] = {
    "config": rel_err(None),
    "DEFAULT": rel_err(jax.lax.Precision.DEFAULT),
    "HIGHEST": rel_err(jax.lax.Precision.HIGHEST),
}
print("PROBE " + json.dumps(out))
"""


# --------------------------------------------------------------------------------------------
# Processes with a deadline
# --------------------------------------------------------------------------------------------


def run_until(
    cmd: Sequence[str], env: dict[str, str], log_path: pathlib.Path, deadline: float
) -> tuple[int, bool]:
    """Runs ``cmd`` (output to ``log_path``) until it exits or ``deadline`` (time.monotonic())
    passes: then SIGINT to its process group (pytest still writes its junit XML), SIGKILL
    :data:`GRACE_S` later. Returns (exit code, stopped at the deadline)."""
    with open(log_path, "w") as log:
        log.write("$ " + shlex.join(cmd) + "\n")
        log.flush()
        proc = subprocess.Popen(
            list(cmd),
            cwd=REPO_ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        stopped = False
        try:
            try:
                rc = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                stopped = True
                os.killpg(proc.pid, signal.SIGINT)
                try:
                    rc = proc.wait(timeout=GRACE_S)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    rc = proc.wait()
        finally:
            if proc.poll() is None:  # the parent itself was interrupted
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    if stopped:
        with open(log_path, "a") as log:
            log.write(f"\n[device_check] stopped at its time budget (exit code {rc})\n")
    return rc, stopped


def child_env(dry_run: bool, precision: str | None) -> dict[str, str]:
    """The parent's environment for a child: the repo importable, unbuffered output, JAX not
    preallocating the device (test workers share it), the CPU for a dry run, and the matmul
    precision (None: JAX's default)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    if dry_run:
        env["JAX_PLATFORMS"] = "cpu"
    env.pop("JAX_DEFAULT_MATMUL_PRECISION", None)
    if precision is not None:
        env["JAX_DEFAULT_MATMUL_PRECISION"] = precision
    return env


# --------------------------------------------------------------------------------------------
# Probe
# --------------------------------------------------------------------------------------------


def probe(dry_run: bool) -> dict[str, Any]:
    """The probe's JSON (see :data:`PROBE`), run under the tests' precision ("highest"), or
    {"error": ...}. Adds nvidia-smi's name/driver/memory line where there is one."""
    env = child_env(dry_run, "highest")
    try:
        proc = subprocess.run(
            [sys.executable, "-c", PROBE],
            cwd=REPO_ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=PROBE_TIMEOUT_S,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return {"error": f"the JAX probe did not finish in {PROBE_TIMEOUT_S:.0f} s"}
    lines = [line for line in proc.stdout.splitlines() if line.startswith("PROBE ")]
    if proc.returncode != 0 or not lines:
        return {"error": f"the JAX probe failed (exit {proc.returncode}): {proc.stderr[-2000:]}"}
    info = json.loads(lines[-1][len("PROBE ") :])
    if shutil.which("nvidia-smi") and not dry_run:
        try:
            smi = subprocess.run(
                [
                    "nvidia-smi",
                    "--query-gpu=name,driver_version,memory.total",
                    "--format=csv,noheader",
                ],
                capture_output=True,
                text=True,
                timeout=20,
                check=False,
            )
            info["nvidia_smi"] = smi.stdout.strip() or smi.stderr.strip()
        except (OSError, subprocess.TimeoutExpired) as error:
            info["nvidia_smi"] = f"failed: {error}"
    return info


# --------------------------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------------------------


def numerical_test_files() -> list[str]:
    """tests/test_*.py but :data:`NOT_NUMERICAL`, relative to the repo root, sorted."""
    files = sorted((REPO_ROOT / "tests").glob("test_*.py"))
    return [str(f.relative_to(REPO_ROOT)) for f in files if f.stem not in NOT_NUMERICAL]


def default_workers(platform_name: str) -> int:
    """pytest-xdist workers: on a GPU half the CPUs (at most 8; compiling is the CPU work of
    these tests); 1 on the CPU (XLA already uses every core), on a TPU (one process may hold
    it) and without xdist."""
    try:
        import xdist  # noqa: F401
    except ImportError:
        return 1
    if platform_name in ("cpu", "tpu"):
        return 1
    return max(1, min(8, (os.cpu_count() or 2) // 2))


def _node_id(case: ET.Element) -> str:
    """pytest's node id from a junit testcase (classname ``tests.test_x.TestY``, name)."""
    classname, name = case.get("classname", ""), case.get("name", "")
    parts = [part for part in classname.split(".") if part]
    for i in range(len(parts), 0, -1):
        path = pathlib.Path(*parts[:i]).with_suffix(".py")
        if (REPO_ROOT / path).is_file():
            return "::".join([str(path), *parts[i:], name])
    return f"{classname}::{name}" if classname else name


def parse_junit(path: pathlib.Path) -> dict[str, Any]:
    """Counts, failing tests (node id, first line of the message) and skip reasons."""
    root = ET.parse(path).getroot()
    counts = collections.Counter({"passed": 0, "failed": 0, "errors": 0, "skipped": 0})
    failures: list[tuple[str, str]] = []
    skips: collections.Counter[str] = collections.Counter()
    for case in root.iter("testcase"):
        if not case.get("name"):  # pytest's placeholder for a test cut short by SIGINT
            continue
        failure, error, skipped = (case.find(t) for t in ("failure", "error", "skipped"))
        bad = failure if failure is not None else error
        if bad is not None:
            counts["failed" if failure is not None else "errors"] += 1
            message = (bad.get("message") or bad.text or "").strip().splitlines()
            failures.append((_node_id(case), message[0][:200] if message else ""))
        elif skipped is not None:
            counts["skipped"] += 1
            skips[(skipped.get("message") or "").strip()[:160]] += 1
        else:
            counts["passed"] += 1
    counts["total"] = sum(counts.values())
    return {"counts": dict(counts), "failures": failures, "skip_reasons": skips.most_common(8)}


def run_tests(
    name: str,
    precision: str | None,
    tests: Sequence[str],
    workers: int,
    dry_run: bool,
    out: pathlib.Path,
    deadline: float,
) -> dict[str, Any]:
    """One pytest pass over ``tests``; its junit XML and log in ``out``."""
    xml, log = out / f"tests-{name}.xml", out / f"tests-{name}.log"
    xml.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfE"]
    cmd += [f"--junitxml={xml}", "-o", "junit_family=xunit2", "--rootdir", str(REPO_ROOT)]
    if workers > 1:
        cmd += ["-n", str(workers)]
    cmd += list(tests)
    start = time.monotonic()
    rc, stopped = run_until(cmd, child_env(dry_run, precision), log, deadline)
    result: dict[str, Any] = {
        "precision": precision or "JAX's default",
        "exit_code": rc,
        "stopped_at_budget": stopped,
        "seconds": round(time.monotonic() - start, 1),
        "workers": workers,
        "tests": list(tests),
    }
    if xml.is_file():
        try:
            result.update(parse_junit(xml))
        except ET.ParseError as error:
            result["problem"] = f"unreadable junit XML: {error}"
    else:
        result["problem"] = f"no junit XML (pytest exit code {rc}); see {log.name}"
    # pytest: 0 all passed, 1 some failed; 2 interrupted, 3 internal error, 4 usage, 5 none ran.
    result["complete"] = not stopped and rc in (0, 1) and "counts" in result
    if not result["complete"] and "problem" not in result:
        result["problem"] = (
            "stopped at its time budget" if stopped else f"pytest exit code {rc}; see {log.name}"
        )
    return result


# --------------------------------------------------------------------------------------------
# Speed (a worker process: python -m benchmarks.device_check --speed-worker ...)
# --------------------------------------------------------------------------------------------


def speed_worker(args: argparse.Namespace) -> int:
    """Times ``benchmarks.losses``'s configurations until done or ``--speed-seconds`` would be
    exceeded; rewrites ``speed.json`` after every configuration (so a kill keeps the rows)."""
    start = time.monotonic()
    from benchmarks import losses as bench  # imports JAX: only in the worker
    from benchmarks.timing import pin_threads
    from experiments.allocator import reuse_freed_memory

    threads = pin_threads(None)
    malloc_tuned = reuse_freed_memory()  # before JAX starts its threads, as the benchmark does
    import jax

    t, pml_reason = bench.load_pml() if args.pml else (None, "PML not timed (--pml times it)")
    if t is not None:
        t.torch.set_num_threads(threads)
    names = args.speed_losses or [s.name for s in bench.SPECS]
    unknown = sorted(set(names) - set(bench.SPEC_BY_NAME))
    if unknown:
        print(
            f"unknown --speed-losses {unknown}; known: {list(bench.SPEC_BY_NAME)}", file=sys.stderr
        )
        return 2
    repeats = str(args.repeats)
    bargv = ["--repeats", repeats, "--block", repeats, "--pause", "0", "--warmup", "1"]
    bargv += ["--settle", "0", "--no-rss", "--losses", *names]
    bargs = bench.build_parser().parse_args(bargv)
    bargs.malloc_tuned = malloc_tuned
    specs = [bench.SPEC_BY_NAME[name] for name in names]
    configs = [
        (s, args.batch, args.classes if s.kind in ("head", "center") else None) for s in specs
    ]
    configs += [(s, args.pair_batch, None) for s in specs if s.kind == "pair"]
    device = jax.devices()[0]
    meta = bench.metadata(bargs, bargv, threads, t)
    meta["command"] = "python -m benchmarks.device_check (speed part): " + shlex.join(bargv)
    meta["device"] = f"{device.device_kind} ({device.platform})"
    notes = [f"ours on {meta['device']}"]
    notes.append(f"ours only: {pml_reason}" if t is None else "PML on torch's CPU")
    rows: list[Any] = []
    durations: list[float] = []
    out = pathlib.Path(args.out) / "speed.json"

    def write(complete: bool) -> None:
        payload = {
            "meta": meta,
            "notes": notes,
            "complete": complete,
            "configs": len(configs),
            "table": bench.format_table(rows, with_pml=t is not None, with_rss=False),
            "rows": [r.to_json() for r in rows],
        }
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps(payload, indent=1) + "\n")
        tmp.replace(out)

    deadline = start + args.speed_seconds
    budget_note = "not run: time budget"
    for spec, batch, classes in configs:
        estimate = max(durations, default=0.0)
        if time.monotonic() + estimate > deadline:
            rows.append(bench.Row(spec.name, batch, args.dim, classes, spec.floor, budget_note))
            continue
        begin = time.monotonic()
        try:
            row = bench.bench_one(spec, batch, args.dim, classes, bargs, t, pml_reason)
        except Exception as error:  # one configuration's failure must not lose the others
            row = bench.Row(spec.name, batch, args.dim, classes, spec.floor)
            row.ours_status = f"error: {type(error).__name__}: {error}"[:200].replace("|", "/")
        durations.append(time.monotonic() - begin)
        rows.append(row)
        print(
            f"{spec.name} B={batch} D={args.dim} C={classes}: {row.ours_status}, ours "
            f"{bench._fmt(row.ours_ms, '.3f')} ms, compile {bench._fmt(row.ours_compile_s, '.2f')}"
            f" s ({durations[-1]:.1f} s)",
            file=sys.stderr,
            flush=True,
        )
        write(complete=False)
    skipped = sum(r.ours_status == budget_note for r in rows)
    if skipped:
        notes.append(f"{skipped} of {len(configs)} configurations not run: time budget")
    if any(r.noisy("ours") or r.noisy("floor") for r in rows):
        notes.append(bench.NOISY_NOTE)
    errors = sum(r.ours_status.startswith("error") for r in rows)
    write(complete=not skipped and not errors)
    return 0 if not errors else 1


def run_speed(args: argparse.Namespace, out: pathlib.Path, deadline: float) -> dict[str, Any]:
    """The speed worker with the time left; its rows from speed.json."""
    path = out / "speed.json"
    path.unlink(missing_ok=True)
    seconds = max(1.0, deadline - time.monotonic() - 5.0)  # it stops itself before the deadline
    cmd = [sys.executable, "-m", "benchmarks.device_check", "--speed-worker"]
    cmd += ["--out", str(out), "--speed-seconds", f"{seconds:.0f}"]
    cmd += ["--speed-losses", *args.speed_losses] if args.speed_losses else []
    for name in ("batch", "pair_batch", "dim", "classes", "repeats"):
        cmd += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    cmd += ["--pml"] if args.pml else []
    start = time.monotonic()
    rc, stopped = run_until(cmd, child_env(args.dry_run, None), out / "speed.log", deadline)
    result: dict[str, Any] = {
        "exit_code": rc,
        "stopped_at_budget": stopped,
        "seconds": round(time.monotonic() - start, 1),
        "command": "python " + shlex.join(cmd[1:]),
    }
    try:
        payload = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        result.update(complete=False, problem=f"no speed.json ({error}); see speed.log")
        return result
    done = [r for r in payload["rows"] if r["ours_status"] == "ok"]
    result.update(
        complete=bool(payload["complete"]) and rc == 0 and not stopped,
        configs=payload["configs"],
        timed=len(done),
        table=payload["table"],
        notes=payload["notes"],
    )
    if not result["complete"]:
        result["problem"] = (
            f"{len(done)} of {payload['configs']} configurations timed (exit code {rc}"
            + (", stopped at its time budget" if stopped else "")
            + "); see speed.log"
        )
    return result


def guarded(part: Callable[..., dict[str, Any]], *args: Any) -> dict[str, Any]:
    """``part(*args)``, or what went wrong in it: one part's bug must not lose the others."""
    start = time.monotonic()
    try:
        return part(*args)
    except Exception:
        return {
            "complete": False,
            "seconds": round(time.monotonic() - start, 1),
            "problem": "device_check itself failed: " + traceback.format_exc()[-1500:],
        }


# --------------------------------------------------------------------------------------------
# Summary
# --------------------------------------------------------------------------------------------


def _fmt_err(value: float | None) -> str:
    return "–" if value is None or not math.isfinite(value) else f"{value:.1e}"


def verdict(state: dict[str, Any]) -> tuple[str, int]:
    """(one line, exit code) from what ran."""
    info = state["probe"]
    if "error" in info:
        return f"JAX UNUSABLE: {info['error'][:300]}", EXIT_NO_ACCELERATOR
    if state.get("no_accelerator"):
        return "NO ACCELERATOR: JAX's default backend is the CPU", EXIT_NO_ACCELERATOR
    parts = state["parts"]
    tests = parts.get("tests")
    if tests and (tests.get("counts", {}).get("failed") or tests.get("counts", {}).get("errors")):
        c = tests["counts"]
        return f"FAIL: {c['failed']} failed, {c['errors']} errors (precision highest)", EXIT_FAILED
    incomplete = [
        name
        for name in ("tests", "speed")
        if name in parts and not parts[name].get("complete", False)
    ]
    incomplete += [
        name for name in state["selected"] if name not in parts and name != "default-pass"
    ]
    if incomplete:
        return "INCOMPLETE: " + ", ".join(incomplete) + " did not complete", EXIT_INCOMPLETE
    return "PASS", EXIT_OK


def _problem(result: dict[str, Any]) -> list[str]:
    """A part's problem as a bullet, a multi-line one (a traceback) in a code block."""
    problem = result.get("problem")
    if not problem:
        return []
    if "\n" not in problem:
        return [f"- problem: {problem}"]
    return ["- problem:", "", "```", problem.rstrip(), "```"]


def _tests_section(title: str, result: dict[str, Any] | None, note: str) -> list[str]:
    lines = [f"## {title}", ""]
    if result is None:
        return lines + [f"Not run{note}.", ""]
    c = result.get("counts")
    tests = result.get("tests", [])
    shown = (
        ", ".join(tests)
        if len(tests) <= 4
        else f"{len(tests)} files: " + ", ".join(pathlib.Path(t).stem for t in tests)
    )
    if tests:
        lines += [f"- tests: {shown}", f"- matmul precision: {result.get('precision')}"]
    if "exit_code" in result:
        lines.append(
            f"- pytest exit code {result['exit_code']}, {result['seconds']} s, "
            f"{result['workers']} worker(s)"
            + ("; stopped at its time budget" if result["stopped_at_budget"] else "")
        )
    lines += _problem(result)
    lines.append("")
    if c:
        lines += ["| passed | failed | errors | skipped | total |", "|---|---|---|---|---|"]
        lines += [
            f"| {c['passed']} | {c['failed']} | {c['errors']} | {c['skipped']} | {c['total']} |",
            "",
        ]
    failures = result.get("failures", [])
    if failures:
        lines.append(f"Failing ({len(failures)}):")
        lines.append("")
        only = set(result.get("only_here", []))
        for node, message in failures[:MAX_LISTED]:
            mark = " (passes at highest precision)" if node in only else ""
            lines.append(f"- `{node}`{mark}: {message}")
        if len(failures) > MAX_LISTED:
            lines.append(f"- ... {len(failures) - MAX_LISTED} more in the junit XML")
        lines.append("")
    skips = result.get("skip_reasons", [])
    if skips:
        lines.append("Skipped, by reason:")
        lines.append("")
        lines += [f"- {n}× {reason or '(no reason)'}" for reason, n in skips]
        lines.append("")
    return lines


def summary_markdown(state: dict[str, Any]) -> str:
    info = state["probe"]
    line, _ = verdict(state)
    devices = info.get("devices") or []
    device = f"{devices[0]} × {len(devices)}" if devices else "unknown"
    errs = info.get("matmul_rel_err", {})
    lines = [
        "# mlx_jax device check"
        + (" (DRY RUN on the CPU, tiny sizes)" if state["dry_run"] else ""),
        "",
        f"- result: **{line}**",
        f"- device: {device} (JAX platform {info.get('platform', '?')}, backend "
        f"{info.get('backend', '?')})"
        + (f"; nvidia-smi: {info['nvidia_smi']}" if info.get("nvidia_smi") else ""),
        f"- versions: jax {info.get('jax', '?')}, jaxlib {info.get('jaxlib', '?')}, "
        f"mlx_jax {info.get('mlx_jax', '?')}, numpy {info.get('numpy', '?')}, "
        f"Python {info.get('python', platform.python_version())}",
        f"- date: {state['date_utc']} UTC; host {platform.node()}, {os.cpu_count()} CPUs",
        f"- command: `{state['command']}`",
        f"- time budget: {state['budget_s']:g} s; used {state['elapsed_s']:.0f} s; parts: "
        + (
            ", ".join(f"{k} {v.get('seconds', 0):.0f} s" for k, v in state["parts"].items())
            or "none"
        ),
        "- precision: the numerical tests run with `JAX_DEFAULT_MATMUL_PRECISION=highest` (their "
        "tolerances are float32 ones; on NVIDIA GPUs XLA's default may use TF32); the "
        "default-precision pass, if run, shows what fails without it. Probe (float32 512×512 "
        f"matmul, max error / max |exact|): Precision.DEFAULT {_fmt_err(errs.get('DEFAULT'))}, "
        f"HIGHEST {_fmt_err(errs.get('HIGHEST'))}, under the tests' setting "
        f"{_fmt_err(errs.get('config'))} (config: {info.get('default_matmul_precision')})",
        "",
    ]
    parts = state["parts"]
    lines += _tests_section(
        "Numerical tests, precision highest", parts.get("tests"), state["why_not"].get("tests", "")
    )
    lines += _tests_section(
        "Numerical tests, JAX's default precision (informational)",
        parts.get("default-pass"),
        state["why_not"].get("default-pass", ""),
    )
    lines += ["## Speed (forward+backward, ms)", ""]
    speed = parts.get("speed")
    if speed is None:
        lines += [f"Not run{state['why_not'].get('speed', '')}.", ""]
    else:
        if "command" in speed:
            lines.append(
                f"- `{speed['command']}`, exit code {speed['exit_code']}, {speed['seconds']} s"
            )
        lines += _problem(speed)
        lines += [f"- {n}" for n in speed.get("notes", [])]
        lines.append("- every timed call, compile times and XLA memory: speed.json")
        lines += ["", speed.get("table", "(no table)"), ""]
    return "\n".join(lines).rstrip("\n") + "\n"


def write_summary(state: dict[str, Any], out: pathlib.Path) -> int:
    state["elapsed_s"] = time.monotonic() - state["t0"]
    line, code = verdict(state)
    (out / "summary.md").write_text(summary_markdown(state))
    public = {k: v for k, v in state.items() if k not in ("t0",)}
    public.update(result=line, exit_code=code)
    (out / "summary.json").write_text(json.dumps(public, indent=1, default=str) + "\n")
    return code


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.device_check",
        description="Numerical loss tests and the loss speed table on the accelerator, within a "
        "time budget; results in --out. See the module docstring.",
    )
    p.add_argument(
        "--out",
        type=pathlib.Path,
        default=pathlib.Path("device-check"),
        help="folder for the results (default: device-check)",
    )
    p.add_argument(
        "--time-budget-s", type=float, default=420.0, help="seconds for everything (default: 420)"
    )
    p.add_argument(
        "--allow-cpu", action="store_true", help="run (the full check) without an accelerator"
    )
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="on the CPU (JAX_PLATFORMS=cpu), tiny sizes, a few tests: the same code path",
    )
    p.add_argument(
        "--parts", nargs="+", choices=PARTS, default=list(PARTS), help="what to run (default: all)"
    )
    p.add_argument(
        "--tests",
        nargs="+",
        default=None,
        metavar="PATH",
        help="pytest paths / node ids (default: every numerical tests/test_*.py; dry run: "
        + ", ".join(DRY_RUN_TESTS)
        + ")",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=None,
        help="pytest-xdist workers (default: on a GPU half the CPUs, at most 8; else 1)",
    )
    p.add_argument(
        "--speed-losses",
        nargs="+",
        default=None,
        metavar="LOSS",
        help="losses of benchmarks.losses to time (default: all; dry run: "
        + ", ".join(DRY_RUN_LOSSES)
        + ")",
    )
    for name, (full, dry) in SIZES.items():
        p.add_argument(
            f"--{name.replace('_', '-')}",
            type=int,
            default=None,
            help=f"speed table (default: {full}; dry run: {dry})",
        )
    p.add_argument(
        "--pml", action="store_true", help="also time PML (on torch's CPU) where installed"
    )
    p.add_argument("--speed-worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--speed-seconds", type=float, default=math.inf, help=argparse.SUPPRESS)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    for name, (full, dry) in SIZES.items():
        if getattr(args, name) is None:
            setattr(args, name, dry if args.dry_run else full)
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.speed_losses is None and args.dry_run:
        args.speed_losses = list(DRY_RUN_LOSSES)  # else None: every loss (the worker's SPECS)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.speed_worker:
        return speed_worker(args)
    if args.time_budget_s <= 0:
        parser.error("--time-budget-s must be > 0")

    t0 = time.monotonic()
    end = t0 + args.time_budget_s - RESERVE_S - GRACE_S
    state: dict[str, Any] = {
        "t0": t0,
        "dry_run": args.dry_run,
        "date_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
        "command": " ".join(["python -m benchmarks.device_check", shlex.join(argv)]),
        "budget_s": args.time_budget_s,
        "selected": list(args.parts),
        "parts": {},
        "why_not": {p: " (not in --parts)" for p in PARTS if p not in args.parts},
    }

    def log(message: str) -> None:
        print(
            f"[device_check {time.monotonic() - t0:5.0f} s] {message}", file=sys.stderr, flush=True
        )

    log("probing JAX's devices ...")
    state["probe"] = info = probe(args.dry_run)
    if "error" in info:
        log(info["error"])
        return write_summary(state, args.out)
    accelerator = info["platform"] != "cpu"
    log(f"{info['platform']}: {', '.join(info['devices'])}; jax {info['jax']}")
    if not accelerator and not (args.allow_cpu or args.dry_run):
        state["no_accelerator"] = True
        code = write_summary(state, args.out)
        log(
            "no GPU/TPU: JAX's default backend is the CPU. Install JAX for the accelerator "
            "(e.g. pip install 'jax[cuda12]'), or pass --allow-cpu (or --dry-run) to run on "
            "the CPU."
        )
        return code
    tests = args.tests or (list(DRY_RUN_TESTS) if args.dry_run else numerical_test_files())
    workers = args.workers if args.workers is not None else default_workers(info["platform"])
    write_summary(state, args.out)

    if "tests" in args.parts:
        later = any(p in args.parts for p in ("speed", "default-pass"))
        deadline = t0 + TESTS_SHARE * args.time_budget_s if later else end
        log(
            f"numerical tests at precision highest ({len(tests)} paths, {workers} worker(s), "
            f"{deadline - time.monotonic():.0f} s) ..."
        )
        result = guarded(
            run_tests, "highest", "highest", tests, workers, args.dry_run, args.out, deadline
        )
        state["parts"]["tests"] = result
        log(f"tests: {result.get('counts', result.get('problem'))}")
        write_summary(state, args.out)

    if "speed" in args.parts:
        left = end - time.monotonic()
        if left < MIN_PART_S:
            state["why_not"]["speed"] = f" (only {max(left, 0):.0f} s of the budget left)"
        else:
            share = SPEED_SHARE if "default-pass" in args.parts else 1.0
            deadline = time.monotonic() + share * left
            losses = ", ".join(args.speed_losses or ["every loss"])
            log(f"speed table ({losses}; {share * left:.0f} s) ...")
            state["parts"]["speed"] = speed = guarded(run_speed, args, args.out, deadline)
            log(f"speed: {speed.get('timed')} of {speed.get('configs')} configurations timed")
        write_summary(state, args.out)

    if "default-pass" in args.parts:
        left = end - time.monotonic()
        if left < MIN_PART_S:
            state["why_not"]["default-pass"] = f" (only {max(left, 0):.0f} s of the budget left)"
        else:
            log(f"numerical tests at JAX's default precision ({left:.0f} s) ...")
            result = guarded(
                run_tests, "default", None, tests, workers, args.dry_run, args.out, end
            )
            highest = state["parts"].get("tests", {})
            failed_before = {node for node, _ in highest.get("failures", [])}
            result["only_here"] = (
                [n for n, _ in result.get("failures", []) if n not in failed_before]
                if highest
                else []
            )
            state["parts"]["default-pass"] = result
            log(f"default precision: {result.get('counts', result.get('problem'))}")

    code = write_summary(state, args.out)
    log(f"{verdict(state)[0]}; wrote {args.out}/summary.md")
    return code


if __name__ == "__main__":
    sys.exit(main())
