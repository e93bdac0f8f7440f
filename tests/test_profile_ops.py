"""benchmarks/profile_ops.py: the per-op profile of a loss's jitted forward+backward."""

import re

import pytest

from benchmarks import profile_ops as prof

# One worker runs this module (pytest -n N --dist loadgroup): its module fixture compiles and
# traces a loss.
pytestmark = pytest.mark.xdist_group("profile_ops")

TINY = ["--loss", "cosface", "--batch", "32", "--dim", "8", "--classes", "64", "--calls", "2"]


@pytest.fixture(scope="module")
def profile():
    return prof.profile_loss("cosface", 32, 8, 64, calls=2, warmup=1)


def test_every_thunk_row_has_a_positive_time(profile):
    assert profile.calls == 2
    assert len(profile.rows) >= 5
    for row in profile.rows:
        assert row.thread_ms > 0 and row.own_ms > 0, row
        assert row.helper_ms >= 0, row
        assert row.in_flight_ms >= row.own_ms * 0.999, row
        assert row.info.found, f"{row.name} not found in the compiled HLO"
    assert profile.total_thread_ms == pytest.approx(sum(r.thread_ms for r in profile.rows))
    assert profile.wall_ms > 0 and profile.span_ms > 0


def test_the_head_matmuls_are_classified_as_matmuls(profile):
    matmuls = [r for r in profile.rows if r.info.category == prof.MATMUL]
    for row in matmuls:  # YNNPACK fusions, Eigen dots, or dots XLA fused with elementwise ops
        assert row.name.startswith("ynn_fusion") or "dot" in row.name, row.name
    # x·W forward, and the two gradients (dx, dW); W's column norms add small ones-vector dots
    head = [r for r in matmuls if r.info.flops == 2 * 32 * 8 * 64]
    assert len(head) >= 3, [(r.name, r.info.kind, r.info.flops) for r in profile.rows]
    matmuls = head
    forward = [r for r in matmuls if r.info.shape == "f32[32,64]"]
    assert forward and any("dot_general" in ops for ops in forward[0].info.jax_ops)
    # The softmax pass is no matmul.
    others = [r for r in profile.rows if r.info.category != prof.MATMUL]
    assert any(r.info.category == "elementwise" for r in others)
    assert all(r.info.flops == 0 for r in others)


def test_source_lines_point_into_the_losses(profile):
    sources = [s for r in profile.rows for s in r.info.sources]
    assert sources
    assert all(re.search(r"\.py:\d+", s) for s in sources), sources
    assert any(s.startswith("mlx_jax/losses/margin_softmax.py:") for s in sources), sources
    # Helpers outside mlx_jax/losses name their caller in the loss.
    for source in sources:
        if not source.startswith("mlx_jax/losses/"):
            assert "← mlx_jax/losses/" in source, source


def test_cli_writes_the_report(tmp_path, capsys):
    out = tmp_path / "profile.md"
    assert prof.main([*TINY, "--top", "4", "--out", str(out)]) == 0
    text = out.read_text()
    assert text.strip() in capsys.readouterr().out
    assert "python -m benchmarks.profile_ops --loss cosface" in text
    assert "jax 0." in text and "machine:" in text and "UTC" in text
    assert "**matmuls**" in text and "**everything else**" in text
    rows = [line for line in text.splitlines() if re.match(r"\| \d+ \| `", line)]
    assert len(rows) == 4
    for line in rows:
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert float(cells[4]) > 0, line  # thread ms
        assert cells[5].endswith("%"), line
    matmul_ms = re.search(r"\| \*\*matmuls\*\* \| ([\d.]+) \|", text)
    assert matmul_ms is not None and float(matmul_ms.group(1)) > 0
    assert "more thunks" in text


SYNTHETIC_HLO = """\
HloModule jit_step, is_scheduled=true

FileNames
1 "/repo/benchmarks/losses.py"
2 "/repo/mlx_jax/losses/thing.py"
3 "/repo/mlx_jax/distances.py"

FunctionNames
1 "step"
2 "thing_loss"
3 "gram"

FileLocations
1 {file_name_id=1 function_name_id=1 line=10 end_line=10 column=1 end_column=2}
2 {file_name_id=2 function_name_id=2 line=42 end_line=42 column=1 end_column=2}
3 {file_name_id=3 function_name_id=3 line=7 end_line=7 column=1 end_column=2}

StackFrames
1 {file_location_id=1 parent_frame_id=1}
2 {file_location_id=2 parent_frame_id=2}
3 {file_location_id=3 parent_frame_id=3}


%fused_computation (param_0: f32[16,8], param_1: f32[8,32]) -> f32[16,32] {
  %param_0 = f32[16,8]{1,0} parameter(0)
  %param_1 = f32[8,32]{1,0} parameter(1)
  ROOT %dot.1 = f32[16,32]{1,0} dot(%param_0, %param_1), lhs_contracting_dims={1}, rhs_contracting_dims={0}, metadata={op_name="jit(step)/jvp()/dot_general" stack_frame_id=3}
}

%fused_computation.1 (param_0.1: f32[16,32]) -> f32[16,32] {
  %param_0.1 = f32[16,32]{1,0} parameter(0)
  ROOT %exp.1 = f32[16,32]{1,0} exponential(%param_0.1), metadata={op_name="jit(step)/transpose(jvp())/exp" stack_frame_id=2}
}

%fused_computation.2 (param_0.2: f32[16,32]) -> f32[32,16] {
  %param_0.2 = f32[16,32]{1,0} parameter(0)
  ROOT %transpose.1 = f32[32,16]{1,0} transpose(%param_0.2), dimensions={1,0}
}

ENTRY %main (x: f32[16,8], w: f32[8,32]) -> f32[32,16] {
  %x = f32[16,8]{1,0} parameter(0), metadata={op_name="x"}
  %w = f32[8,32]{1,0} parameter(1), metadata={op_name="w"}
  %ynn_fusion = f32[16,32]{1,0} fusion(%x, %w), kind=kCustom, calls=%fused_computation, metadata={op_name="jit(step)/jvp()/dot_general" stack_frame_id=3}, backend_config={"fusion_config":{"kind":"__ynn_fusion"}}
  %exponential_fusion = f32[16,32]{1,0} fusion(%ynn_fusion), kind=kLoop, calls=%fused_computation.1
  ROOT %transpose_fusion = f32[32,16]{1,0} fusion(%exponential_fusion), kind=kLoop, calls=%fused_computation.2
}
"""


def test_hlo_kinds_shapes_flops_and_sources():
    module = prof.HloModule(SYNTHETIC_HLO)
    assert module.name == "jit_step"
    dot = prof.describe(module, "ynn_fusion")
    assert (dot.category, dot.runs_as, dot.shape) == ("matmul", "YNNPACK fusion", "f32[16,32]")
    assert dot.flops == 2 * 16 * 32 * 8
    assert dot.bytes_moved == 4 * (16 * 8 + 8 * 32 + 16 * 32)
    assert dot.jax_ops == ["fwd: dot_general"]
    # frame 3 (distances.py) is called from frame 2 (the loss), itself from frame 1.
    assert dot.sources == ["mlx_jax/distances.py:7 ← mlx_jax/losses/thing.py:42"]
    exp = prof.describe(module, "exponential_fusion")
    assert (exp.category, exp.runs_as) == ("elementwise", "XLA loop fusion")
    assert exp.jax_ops == ["bwd: exp"] and exp.sources == ["mlx_jax/losses/thing.py:42"]
    assert prof.describe(module, "transpose_fusion").category == "copy/transpose"
    assert not prof.describe(module, "no_such_thunk").found


def _ev(name, start, end, **stats):
    return prof.Event(name, start, end, stats)


def test_trace_attribution_own_helper_and_shared_time():
    """A (line 0) queues a task that line 1 runs while A is in flight: helper time of A.
    B (line 1) completes asynchronously later; a worker task of finished A running meanwhile
    is shared by the thunks in flight (B alone). W is a loop whose body thunk C is nested."""
    m = {"hlo_module": "jit_step", "run_id": 1}
    line0 = [
        _ev("A", 0, 100, hlo_op="A", _p=101, **m),
        _ev(prof.RECORD, 10, 10, _p=7),
        _ev("end: A", 100, 100, _c=101),
        _ev("W", 300, 400, hlo_op="W", _p=103, **m),
        _ev("C", 320, 360, hlo_op="C", _p=104, **m),
        _ev("end: C", 360, 360, _c=104),
        _ev("end: W", 400, 400, _c=103),
    ]
    line1 = [
        _ev(prof.START_REGION, 20, 20, _c=7),
        _ev(prof.STOP_REGION, 80, 80),
        _ev("B", 100, 150, hlo_op="B", _p=102, **m),
        _ev(prof.START_REGION, 150, 150, _c=7),  # A's task again, after A completed
        _ev(prof.STOP_REGION, 190, 190),
        _ev("end: B", 200, 200, _c=102),
        _ev(prof.START_REGION, 250, 250, _c=7),  # nothing in flight: unattributed
        _ev(prof.STOP_REGION, 260, 260),
    ]
    analysis = prof.analyze_trace([("t0", line0), ("t1", line1)])
    by_name = {o.name: o for o in analysis.ours("jit_step")}
    assert by_name["A"].own_ns == 100 and by_name["A"].helper_ns == 60
    assert by_name["B"].own_ns == 50 and by_name["B"].done == 200
    assert by_name["B"].helper_ns == 40
    assert by_name["W"].container and by_name["W"].own_ns == 60
    assert by_name["C"].own_ns == 40 and not by_name["C"].container
    assert analysis.unattributed_ns == 10
