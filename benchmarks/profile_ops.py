"""Per-op profile of one loss's jitted forward+backward on XLA:CPU: which compiled op costs what.

``python -m benchmarks.profile_ops --loss NAME --batch B --dim D [--classes C] [--calls 5]
[--out FILE.md]`` builds exactly the call that ``benchmarks/losses.py`` times for that loss (its
``LossSpec``, inputs and step: ``jax.jit(value_and_grad(loss))`` w.r.t. the embeddings and, for
class heads, W), compiles it, warms it up, times ``--calls`` calls without the profiler (and the
loss's matmul floor, as ``benchmarks/losses.py`` does), then records ``--calls`` calls under
``jax.profiler.trace`` and reads the trace back (``jax.profiler.ProfileData``).

What the trace holds, and what the table's columns mean
-------------------------------------------------------
XLA:CPU runs a compiled program as a graph of *thunks*, one per HLO instruction of the
scheduled module that is not fused away: ``ynn_fusion.N`` (a fusion handed to YNNPACK: a matmul,
or a reduction or elementwise pass), ``dot`` (a matmul run by Eigen), ``*_fusion`` (loop
fusions XLA compiles itself), ``copy``/``transpose``, ``wrapped_*`` (a single op), ``while``
(a loop; its body's thunks are listed on their own). Each thunk run is one trace event named
after the instruction, on the thread that ran it (the ``tf_XLAEigen/...`` worker threads and
the ``tf_XLAPjRtCpuClient/...`` thread), plus a marker ``end: NAME`` when it completes.
A thunk can hand parts of its work to other threads of the pool (a parallel loop fusion, Eigen's
matmul, YNNPACK's workers): those threads then run unnamed thread-pool tasks
(``ThreadpoolListener`` regions), so the columns are:

* **own ms**: the thunk's own events, summed over threads (exclusive: the events of a while
  loop's body are subtracted from the loop's), per call. This is *thread time*, not wall time:
  an event lasts from its start to its end on its thread, so time the thread spent descheduled
  (other processes on the cores, or more runnable threads than cores: XLA runs thunks on its
  Eigen pool *and* on the PjRt client threads) counts too.
* **helper ms**: time other threads spent in thread-pool tasks while the thunk was in flight
  (from its start to its ``end:`` marker) and not running any named thunk: given to the thunk
  that scheduled the task (the trace links each task to the event that queued it), or, where
  that thunk had already completed (YNNPACK's workers stay on for the next job), shared evenly
  between the thunks in flight. Thread time too; an upper bound of CPU time, since a task that
  waits for work is counted as busy.
* **thread ms** = own + helper: what the thunk costs in thread time per call; **share** is its
  part of the sum over all thunks. The sum is at most (threads that ran thunks) × the span.
* **in flight ms**: wall time from the thunk's start to its completion, per call (thunks that
  run concurrently overlap; an asynchronous matmul's is much longer than its own time).
* **MB r+w**: bytes of the thunk's operands plus its output (an upper estimate of the memory it
  touches: in-place updates count their buffer twice); **GFLOP** (matmuls): 2·M·N·K; both per
  run. **rate**: GFLOP/s (matmuls) or GB/s of MB r+w per second of *thread* time, i.e. per busy
  thread (not over the in-flight time: thunks that run concurrently share the cores).
* **kind**: from the compiled HLO (``compiled.as_text()``): matmul (the instruction is a
  ``dot`` or a fusion containing one: ``ynn_fusion`` / ``dot``), reduction, elementwise,
  gather/scatter, copy/transpose (only data movement), control flow; and how it runs (YNNPACK
  fusion, XLA loop fusion, Eigen ``dot``, ...). **output** is the instruction's shape.
* **JAX ops / source**: the ``op_name`` metadata of the instructions inside the thunk (``fwd``
  for the forward pass, ``bwd`` for ops of the transpose, i.e. the backward pass), and the source
  lines they were traced from (stack frames in the HLO text): the innermost frame in ``mlx_jax/``,
  with the ``mlx_jax/losses/`` caller after ``←`` when that frame is elsewhere. Top 3 lines.

Above the table: the wall time per call without the profiler (median) and with it, the span of
the executable in the trace (first thunk start to last completion, median over calls), the
total thread time, the threads that ran thunks, and the worker time no thunk was in flight
for. The profiler adds a few µs per event: programs of many small thunks (a while loop over row
blocks) read slower under it.

The summary groups the thread time: matmuls vs everything else, then by kind.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import glob
import math
import os
import pathlib
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import jax

from benchmarks import losses as bench
from benchmarks.timing import cpu_model, pin_threads, timed_blocks
from experiments.allocator import reuse_freed_memory

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
PROFILES_DIR = REPO_ROOT / "benchmarks" / "results" / "profiles"

# --------------------------------------------------------------------------------------------
# The compiled HLO: what each thunk is
# --------------------------------------------------------------------------------------------

_INSTRUCTION = re.compile(
    r"^\s+(?:ROOT\s+)?%(?P<name>[^\s=]+) = (?P<shape>.+?) (?P<opcode>[a-z][\w\-]*)\((?P<rest>.*)$"
)
_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%(?P<name>[^\s(]+) \(.*\{\s*$")
_ARRAY_SHAPE = re.compile(r"(?P<dtype>[a-z]+\d*)\[(?P<dims>[\d,]*)\]")
_LAYOUT = re.compile(r"\{[^{}]*\}")
DTYPE_BYTES = {
    "pred": 1,
    "s8": 1,
    "u8": 1,
    "s16": 2,
    "u16": 2,
    "f16": 2,
    "bf16": 2,
    "s32": 4,
    "u32": 4,
    "f32": 4,
    "s64": 8,
    "u64": 8,
    "f64": 8,
    "c64": 8,
    "c128": 16,
}
# Opcodes that only move or relabel data.
DATA_MOVEMENT = frozenset(
    {
        "parameter",
        "constant",
        "copy",
        "transpose",
        "bitcast",
        "reshape",
        "broadcast",
        "slice",
        "dynamic-slice",
        "dynamic-update-slice",
        "concatenate",
        "pad",
        "iota",
        "tuple",
        "get-tuple-element",
        "reverse",
        "copy-start",
        "copy-done",
    }
)
CONTROL_FLOW = frozenset({"while", "conditional", "call"})
MATMUL = "matmul"
CATEGORY_ORDER = (
    MATMUL,
    "reduction",
    "elementwise",
    "gather/scatter",
    "copy/transpose",
    "sort",
    "custom call",
    "control flow",
    "other",
)


@dataclasses.dataclass
class Instruction:
    """One HLO instruction line."""

    name: str
    shape: str  # layouts removed, e.g. "f32[1024,10000]"
    opcode: str
    operands: list[str]
    attrs: str  # the text after the operands
    computation: str

    def attr(self, key: str) -> str | None:
        match = re.search(rf"\b{re.escape(key)}=(%?[\w.\-]+|\"[^\"]*\")", self.attrs)
        return None if match is None else match.group(1).strip('"').lstrip("%")

    @property
    def op_names(self) -> list[str]:
        match = re.search(r'op_name="([^"]*)"', self.attrs)
        return [] if match is None else [n for n in match.group(1).split(";") if n]

    @property
    def stack_frame_id(self) -> int | None:
        match = re.search(r"stack_frame_id=(\d+)", self.attrs)
        return None if match is None else int(match.group(1))

    @property
    def source_file_line(self) -> tuple[str, int] | None:
        """``source_file``/``source_line`` metadata (older JAX; newer ones use stack frames)."""
        file = re.search(r'source_file="([^"]*)"', self.attrs)
        line = re.search(r"source_line=(\d+)", self.attrs)
        if file is None or line is None:
            return None
        return file.group(1), int(line.group(1))


def shape_bytes(shape: str) -> int:
    """Bytes of an HLO shape (a tuple: the sum of its arrays)."""
    total = 0
    for match in _ARRAY_SHAPE.finditer(shape):
        size = DTYPE_BYTES.get(match.group("dtype"))
        if size is None:
            continue
        dims = [int(d) for d in match.group("dims").split(",") if d]
        total += size * math.prod(dims)
    return total


def shape_dims(shape: str) -> list[int]:
    match = _ARRAY_SHAPE.search(shape)
    if match is None:
        return []
    return [int(d) for d in match.group("dims").split(",") if d]


def _split_operands(rest: str) -> tuple[list[str], str]:
    """The operand names up to the closing parenthesis, and the attribute text after it."""
    depth = 1
    for i, char in enumerate(rest):
        if char in "({[":
            depth += 1
        elif char in ")}]":
            depth -= 1
            if depth == 0:
                return re.findall(r"%([\w.\-]+)", rest[:i]), rest[i + 1 :]
    return re.findall(r"%([\w.\-]+)", rest), ""


@dataclasses.dataclass(frozen=True)
class Frame:
    file: str
    function: str
    line: int


class HloModule:
    """The scheduled HLO text of a compiled executable: instructions by name (names are unique
    in a module), computations, and the stack-frame tables JAX writes into it."""

    def __init__(self, text: str):
        self.name = ""
        header = re.match(r"HloModule\s+([^\s,]+)", text)
        if header is not None:
            self.name = header.group(1)
        self.instructions: dict[str, Instruction] = {}
        self.computations: dict[str, list[Instruction]] = {}
        self._files: dict[int, str] = {}
        self._functions: dict[int, str] = {}
        self._locations: dict[int, tuple[int, int, int]] = {}
        self._frames: dict[int, tuple[int, int]] = {}
        self._parse(text)

    def _parse(self, text: str) -> None:
        section = None
        computation = None
        for line in text.splitlines():
            stripped = line.strip()
            if stripped in ("FileNames", "FunctionNames", "FileLocations", "StackFrames"):
                section = stripped
                continue
            if section is not None:
                if not stripped:
                    section = None
                    continue
                self._parse_table_row(section, stripped)
                continue
            match = _COMPUTATION.match(line)
            if match is not None:
                computation = match.group("name")
                self.computations[computation] = []
                continue
            if line.startswith("}"):
                computation = None
                continue
            if computation is None:
                continue
            match = _INSTRUCTION.match(line)
            if match is None:
                continue
            operands, attrs = _split_operands(match.group("rest"))
            instruction = Instruction(
                name=match.group("name"),
                shape=_LAYOUT.sub("", match.group("shape")),
                opcode=match.group("opcode"),
                operands=operands,
                attrs=attrs,
                computation=computation,
            )
            self.instructions[instruction.name] = instruction
            self.computations[computation].append(instruction)

    def _parse_table_row(self, section: str, row: str) -> None:
        if section in ("FileNames", "FunctionNames"):
            match = re.match(r'(\d+)\s+"(.*)"$', row)
            if match is not None:
                table = self._files if section == "FileNames" else self._functions
                table[int(match.group(1))] = match.group(2)
        elif section == "FileLocations":
            match = re.match(
                r"(\d+)\s+\{file_name_id=(\d+)\s+function_name_id=(\d+)\s+line=(\d+)", row
            )
            if match is not None:
                key, file, function, line = (int(g) for g in match.groups())
                self._locations[key] = (file, function, line)
        else:
            match = re.match(r"(\d+)\s+\{file_location_id=(\d+)\s+parent_frame_id=(\d+)", row)
            if match is not None:
                key, location, parent = (int(g) for g in match.groups())
                self._frames[key] = (location, parent)

    def stack(self, frame_id: int) -> list[Frame]:
        """The call stack of a stack frame id, innermost first. The text form prints each
        frame's parent as (parent id + 1), 1 meaning no parent (the outermost frame)."""
        frames: list[Frame] = []
        seen: set[int] = set()
        current = frame_id
        while current in self._frames and current not in seen:
            seen.add(current)
            location, parent = self._frames[current]
            if location in self._locations:
                file, function, line = self._locations[location]
                frames.append(
                    Frame(self._files.get(file, "?"), self._functions.get(function, "?"), line)
                )
            current = parent - 1
        return frames

    def contents(self, name: str) -> list[Instruction]:
        """The instructions a thunk runs: a fusion's fused computation (nested fusions
        expanded), else the instruction itself."""
        instruction = self.instructions.get(name)
        if instruction is None:
            return []
        if instruction.opcode != "fusion":
            return [instruction]
        out: list[Instruction] = []
        pending = [instruction.attr("calls")]
        seen: set[str] = set()
        while pending:
            computation = pending.pop()
            if computation is None or computation in seen:
                continue
            seen.add(computation)
            for inner in self.computations.get(computation, []):
                if inner.opcode == "fusion":
                    pending.append(inner.attr("calls"))
                else:
                    out.append(inner)
        return out


def _repo_relative(path: str) -> str:
    marker = "/mlx_jax/"
    if marker in path:
        return "mlx_jax/" + path.rsplit(marker, 1)[1]
    try:
        return str(pathlib.Path(path).resolve().relative_to(REPO_ROOT))
    except ValueError:
        return pathlib.Path(path).name


def source_of(module: HloModule, instruction: Instruction) -> str | None:
    """``mlx_jax/…/file.py:LINE``: the innermost frame in mlx_jax/, with the innermost
    ``mlx_jax/losses/`` frame after ``←`` when that is a different file."""
    direct = instruction.source_file_line
    if direct is not None:
        return f"{_repo_relative(direct[0])}:{direct[1]}"
    frame_id = instruction.stack_frame_id
    if frame_id is None:
        return None
    stack = module.stack(frame_id)
    if not stack:
        return None
    ours = [f for f in stack if "/mlx_jax/" in f.file]
    if not ours:
        return f"{_repo_relative(stack[0].file)}:{stack[0].line}"
    inner = ours[0]
    text = f"{_repo_relative(inner.file)}:{inner.line}"
    if "/mlx_jax/losses/" not in inner.file:
        caller = next((f for f in ours if "/mlx_jax/losses/" in f.file), None)
        if caller is not None:
            text += f" ← {_repo_relative(caller.file)}:{caller.line}"
    return text


@dataclasses.dataclass
class OpInfo:
    """What a thunk is, from the HLO."""

    name: str
    found: bool = False
    opcode: str = "?"
    shape: str = "?"
    category: str = "other"
    runs_as: str = "?"
    bytes_moved: int = 0
    flops: int = 0
    jax_ops: list[str] = dataclasses.field(default_factory=list)
    sources: list[str] = dataclasses.field(default_factory=list)

    @property
    def kind(self) -> str:
        return f"{self.category} · {self.runs_as}"


def _dot_flops(module: HloModule, dot: Instruction) -> int:
    """2 · (output elements) · (contracted size) of a ``dot``."""
    out = math.prod(shape_dims(dot.shape)) if shape_dims(dot.shape) else 1
    contracting = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", dot.attrs)
    if contracting is None or not dot.operands:
        return 0
    lhs = module.instructions.get(dot.operands[0])
    dims = shape_dims(lhs.shape) if lhs is not None else []
    k = 1
    for index in (int(d) for d in contracting.group(1).split(",") if d):
        if index < len(dims):
            k *= dims[index]
    return 2 * out * k


def _category(opcodes: set[str], instruction: Instruction) -> str:
    if opcodes & {"dot", "convolution"}:
        return MATMUL
    if "custom-call" in opcodes:
        target = instruction.attr("custom_call_target") or ""
        if any(word in target.lower() for word in ("matmul", "gemm", "dot")):
            return MATMUL
        return "custom call"
    if opcodes & CONTROL_FLOW:
        return "control flow"
    if opcodes & {"scatter", "gather"}:
        return "gather/scatter"
    if "sort" in opcodes:
        return "sort"
    if opcodes & {"reduce", "reduce-window", "select-and-scatter"}:
        return "reduction"
    if opcodes <= DATA_MOVEMENT:
        return "copy/transpose"
    return "elementwise"


def _runs_as(instruction: Instruction) -> str:
    if instruction.opcode == "fusion":
        if "__ynn_fusion" in instruction.attrs or instruction.name.startswith("ynn_fusion"):
            return "YNNPACK fusion"
        kind = instruction.attr("kind") or ""
        return {
            "kLoop": "XLA loop fusion",
            "kInput": "XLA input fusion",
            "kOutput": "XLA output fusion",
            "kCustom": "custom fusion",
        }.get(kind, f"fusion {kind}".strip())
    if instruction.opcode == "dot":
        return "Eigen dot"
    if instruction.opcode == "custom-call":
        return f"custom-call {instruction.attr('custom_call_target') or ''}".strip()
    return instruction.opcode


def describe(module: HloModule, name: str, max_ops: int = 8, max_sources: int = 3) -> OpInfo:
    """What thunk ``name`` is: kind, output shape, bytes, flops, JAX ops and source lines."""
    info = OpInfo(name)
    instruction = module.instructions.get(name)
    if instruction is None:
        return info
    info.found = True
    info.opcode = instruction.opcode
    info.shape = instruction.shape
    inner = module.contents(name)
    opcodes = {i.opcode for i in inner} - {"parameter", "constant"}
    info.category = _category(opcodes or {instruction.opcode}, instruction)
    info.runs_as = _runs_as(instruction)
    operand_bytes = sum(
        shape_bytes(module.instructions[o].shape)
        for o in dict.fromkeys(instruction.operands)
        if o in module.instructions
    )
    if instruction.opcode not in CONTROL_FLOW:
        info.bytes_moved = operand_bytes + shape_bytes(instruction.shape)
    info.flops = sum(_dot_flops(module, i) for i in inner if i.opcode == "dot")

    ops: collections.Counter[tuple[str, str]] = collections.Counter()
    sources: collections.Counter[str] = collections.Counter()
    for i in [*inner, instruction] if instruction.opcode == "fusion" else inner:
        if i.opcode in ("parameter", "constant"):
            continue
        for op_name in i.op_names:
            if "/" not in op_name:
                continue
            phase = "bwd" if "transpose(" in op_name else "fwd"
            ops[(phase, op_name.rsplit("/", 1)[1])] += 1
        source = source_of(module, i)
        if source is not None:
            sources[source] += 1
    for phase in ("fwd", "bwd"):
        names = [op for (p, op), _ in ops.most_common() if p == phase][:max_ops]
        if names:
            info.jax_ops.append(f"{phase}: " + ", ".join(names))
    info.sources = [s for s, _ in sources.most_common(max_sources)]
    return info


# --------------------------------------------------------------------------------------------
# The trace: thread time per thunk
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Event:
    """One trace event on one thread (times in ns)."""

    name: str
    start: int
    end: int
    stats: dict[str, Any]


START_REGION = "ThreadpoolListener::StartRegion"
STOP_REGION = "ThreadpoolListener::StopRegion"
RECORD = "ThreadpoolListener::Record"


def _is_wait(name: str) -> bool:
    return "wait for completion" in name.lower()


def read_trace(path: str | os.PathLike[str]) -> list[tuple[str, list[Event]]]:
    """The thread lines of the host plane of an ``.xplane.pb`` file: (line name, events)."""
    data = jax.profiler.ProfileData.from_file(str(path))
    plane = data.find_plane_with_name("/host:CPU")
    planes = [plane] if plane is not None else list(data.planes)
    lines = []
    for p in planes:
        for line in p.lines:
            events = [
                Event(e.name, int(e.start_ns), int(e.end_ns), dict(e.stats)) for e in line.events
            ]
            lines.append((line.name, events))
    return lines


@dataclasses.dataclass
class Occurrence:
    """One run of one thunk."""

    name: str
    module: str | None
    run_id: Any
    line: int
    start: int
    end: int
    flow: Any
    done: int = 0  # completion: its ``end:`` marker, else its event's end
    child_ns: int = 0
    helper_ns: float = 0.0
    container: bool = False  # events of other thunks nested inside (a while loop)

    @property
    def own_ns(self) -> int:
        return self.end - self.start - self.child_ns


@dataclasses.dataclass
class TraceAnalysis:
    occurrences: list[Occurrence]
    unattributed_ns: float  # worker-task time while no thunk of any program was in flight
    lines: list[str]

    def ours(self, module: str | None) -> list[Occurrence]:
        if module is None:
            return list(self.occurrences)
        return [o for o in self.occurrences if o.module == module]


def analyze_trace(lines: Sequence[tuple[str, Sequence[Event]]]) -> TraceAnalysis:
    """Thunk runs with their exclusive own time, completion time and helper time (see the
    module docstring). ``lines``: (thread name, events) as :func:`read_trace` returns them."""
    occurrences: list[Occurrence] = []
    done_at: dict[Any, int] = {}
    flow_owner: dict[Any, tuple[str, Any]] = {}  # task flow id -> ("occ", index) | ("flow", id)
    pieces: list[tuple[int, int, Any]] = []  # (start, end, flow of the worker task)

    for line_index, (_, events) in enumerate(lines):
        points: list[tuple[int, int, str, Any]] = []
        last = 0
        for event in events:
            last = max(last, event.end)
            stats = event.stats
            if "hlo_op" in stats:
                occurrences.append(
                    Occurrence(
                        name=str(stats["hlo_op"]),
                        module=stats.get("hlo_module"),
                        run_id=stats.get("run_id"),
                        line=line_index,
                        start=event.start,
                        end=event.end,
                        flow=stats.get("_p"),
                    )
                )
                index = len(occurrences) - 1
                points.append((event.start, 1, "thunk_start", index))
                points.append((event.end, 0, "thunk_end", index))
            elif event.name.startswith("end: "):
                if "_c" in stats:
                    done_at[stats["_c"]] = event.start
            elif event.name == START_REGION:
                points.append((event.start, 1, "region_start", stats.get("_c")))
            elif event.name == STOP_REGION:
                points.append((event.start, 0, "region_stop", None))
            elif event.name == RECORD:
                if "_p" in stats:
                    points.append((event.start, 2, "record", stats["_p"]))
            elif _is_wait(event.name):
                points.append((event.start, 1, "wait_start", None))
                points.append((event.end, 0, "wait_end", None))
        points.sort(key=lambda p: (p[0], p[1]))

        thunks: list[int] = []
        regions: list[Any] = []
        waits = 0
        previous = None
        for time_ns, _, what, payload in [*points, (last, 0, "line_end", None)]:
            if (
                previous is not None
                and time_ns > previous
                and regions
                and not thunks
                and waits == 0
            ):
                if pieces and pieces[-1][1] == previous and pieces[-1][2] == regions[-1]:
                    pieces[-1] = (pieces[-1][0], time_ns, regions[-1])
                else:
                    pieces.append((previous, time_ns, regions[-1]))
            previous = time_ns
            if what == "thunk_start":
                if thunks:
                    parent = occurrences[thunks[-1]]
                    child = occurrences[payload]
                    parent.child_ns += child.end - child.start
                    parent.container = True
                thunks.append(payload)
            elif what == "thunk_end":
                if payload in thunks:
                    thunks.remove(payload)
            elif what == "record":
                if thunks:
                    flow_owner[payload] = ("occ", thunks[-1])
                elif regions:
                    flow_owner[payload] = ("flow", regions[-1])
            elif what == "region_start":
                regions.append(payload)
            elif what == "region_stop":
                if regions:
                    regions.pop()
            elif what == "wait_start":
                waits += 1
            elif what == "wait_end":
                waits = max(0, waits - 1)

    for occurrence in occurrences:
        marker = done_at.get(occurrence.flow) if occurrence.flow is not None else None
        occurrence.done = max(occurrence.end, marker if marker is not None else occurrence.end)

    def owner(flow: Any) -> int | None:
        for _ in range(64):
            link = flow_owner.get(flow)
            if link is None:
                return None
            if link[0] == "occ":
                return link[1]
            flow = link[1]
        return None

    # Worker-task time: to the thunk that queued the task while it is in flight, else shared
    # between the thunks in flight.
    shared: list[tuple[int, int]] = []
    for start, end, flow in pieces:
        index = owner(flow)
        if index is None:
            shared.append((start, end))
            continue
        o = occurrences[index]
        lo, hi = max(start, o.start), min(end, o.done)
        if hi > lo:
            o.helper_ns += hi - lo
            if start < lo:
                shared.append((start, lo))
            if hi < end:
                shared.append((hi, end))
        else:
            shared.append((start, end))
    unattributed = _share_by_overlap(
        shared,
        [(o.start, o.done, i) for i, o in enumerate(occurrences) if not o.container],
        occurrences,
    )
    return TraceAnalysis(occurrences, unattributed, [name for name, _ in lines])


def _share_by_overlap(
    pieces: Iterable[tuple[int, int]],
    windows: Iterable[tuple[int, int, int]],
    occurrences: list[Occurrence],
) -> float:
    """Adds each piece's time evenly to the occurrences whose windows cover it; returns the
    time no window covered."""
    points: list[tuple[int, int, str, int]] = []
    for start, end in pieces:
        if end > start:
            points.append((start, 1, "piece", 1))
            points.append((end, 0, "piece", -1))
    for start, end, index in windows:
        if end > start:
            points.append((start, 1, "window", index))
            points.append((end, 0, "window_end", index))
    points.sort(key=lambda p: (p[0], p[1]))
    active: set[int] = set()
    open_pieces = 0
    unattributed = 0.0
    previous = None
    for time_ns, _, what, payload in points:
        if previous is not None and time_ns > previous and open_pieces:
            length = (time_ns - previous) * open_pieces
            if active:
                for index in active:
                    occurrences[index].helper_ns += length / len(active)
            else:
                unattributed += length
        previous = time_ns
        if what == "piece":
            open_pieces += payload
        elif what == "window":
            active.add(payload)
        else:
            active.discard(payload)
    return unattributed


# --------------------------------------------------------------------------------------------
# Per-thunk table
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class ThunkRow:
    name: str
    info: OpInfo
    runs: int  # runs per call (a while body's thunks run once per iteration)
    own_ms: float
    helper_ms: float
    in_flight_ms: float

    @property
    def thread_ms(self) -> float:
        return self.own_ms + self.helper_ms


@dataclasses.dataclass
class Profile:
    """Everything one profiling run produced."""

    loss: str
    batch: int
    dim: int
    classes: int | None
    calls: int
    rows: list[ThunkRow]
    wall_ms: float  # untraced, median
    traced_wall_ms: float  # median of the traced calls
    span_ms: float  # executable span in the trace, median over calls
    unattributed_ms: float  # per call
    floor: str
    floor_ms: float | None
    threads: int
    module: str
    thunk_threads: list[str] = dataclasses.field(default_factory=list)
    meta: dict[str, str] = dataclasses.field(default_factory=dict)

    @property
    def total_thread_ms(self) -> float:
        return sum(r.thread_ms for r in self.rows)


def thunk_rows(
    analysis: TraceAnalysis, module: HloModule
) -> tuple[list[ThunkRow], int, float, list[str]]:
    """Per-thunk rows (per call), the number of calls seen, the median executable span, and
    the names of the threads that ran the thunks."""
    ours = analysis.ours(module.name or None)
    if not ours and analysis.occurrences:  # module name not in the stats: take everything
        ours = analysis.occurrences
    runs = sorted({o.run_id for o in ours}, key=str)
    calls = max(1, len(runs))
    spans = []
    for run in runs:
        members = [o for o in ours if o.run_id == run]
        spans.append(max(o.done for o in members) - min(o.start for o in members))
    grouped: dict[str, list[Occurrence]] = collections.defaultdict(list)
    for o in ours:
        grouped[o.name].append(o)
    rows = [
        ThunkRow(
            name=name,
            info=describe(module, name),
            runs=round(len(group) / calls),
            own_ms=sum(o.own_ns for o in group) / calls / 1e6,
            helper_ms=sum(o.helper_ns for o in group) / calls / 1e6,
            in_flight_ms=sum(o.done - o.start for o in group) / calls / 1e6,
        )
        for name, group in grouped.items()
    ]
    rows.sort(key=lambda r: -r.thread_ms)
    threads = sorted({analysis.lines[o.line] for o in ours})
    return rows, calls, (statistics.median(spans) / 1e6 if spans else 0.0), threads


def _ms(value: float) -> str:
    if value >= 100:
        return f"{value:.0f}"
    if value >= 1:
        return f"{value:.2f}"
    return f"{value:.3f}"


def _rate(row: ThunkRow) -> str:
    seconds = row.thread_ms / 1e3
    if seconds <= 0:
        return "–"
    if row.info.category == MATMUL and row.info.flops:
        return f"{row.runs * row.info.flops / seconds / 1e9:.1f} GFLOP/s"
    if row.info.bytes_moved:
        return f"{row.runs * row.info.bytes_moved / seconds / 1e9:.1f} GB/s"
    return "–"


def format_table(profile: Profile, top: int) -> str:
    total = profile.total_thread_ms or 1.0
    head = [
        "#",
        "thunk",
        "kind",
        "output",
        "thread ms",
        "share",
        "own ms",
        "helper ms",
        "in flight ms",
        "runs",
        "MB r+w",
        "GFLOP",
        "rate",
        "JAX ops",
        "source",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    shown = profile.rows[:top]
    for i, row in enumerate(shown, 1):
        info = row.info
        cells = [
            str(i),
            f"`{row.name}`",
            info.kind if info.found else "? (not in the HLO)",
            f"`{info.shape}`",
            _ms(row.thread_ms),
            f"{100 * row.thread_ms / total:.1f} %",
            _ms(row.own_ms),
            _ms(row.helper_ms),
            _ms(row.in_flight_ms),
            str(row.runs),
            f"{info.bytes_moved / 1e6:.1f}" if info.bytes_moved else "–",
            f"{info.flops / 1e9:.2f}" if info.flops else "–",
            _rate(row),
            "; ".join(info.jax_ops) or "–",
            "<br>".join(f"`{s}`" for s in info.sources) or "–",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    rest = profile.rows[top:]
    if rest:
        ms = sum(r.thread_ms for r in rest)
        cells = ["", f"{len(rest)} more thunks", "", "", _ms(ms), f"{100 * ms / total:.1f} %"]
        cells += [""] * (len(head) - len(cells))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_summary(profile: Profile) -> str:
    total = profile.total_thread_ms or 1.0
    by_category: dict[str, list[ThunkRow]] = collections.defaultdict(list)
    for row in profile.rows:
        by_category[row.info.category].append(row)
    matmul = sum(r.thread_ms for r in by_category.get(MATMUL, []))
    lines = [
        "| group | thread ms | share | thunks (largest first) |",
        "|---|---|---|---|",
        f"| **matmuls** | {_ms(matmul)} | {100 * matmul / total:.1f} % | "
        + (", ".join(f"`{r.name}`" for r in by_category.get(MATMUL, [])[:6]) or "–")
        + " |",
        f"| **everything else** | {_ms(total - matmul)} | {100 * (total - matmul) / total:.1f} %"
        " | |",
    ]
    for category in CATEGORY_ORDER:
        if category == MATMUL or category not in by_category:
            continue
        group = by_category[category]
        ms = sum(r.thread_ms for r in group)
        names = ", ".join(f"`{r.name}`" for r in group[:6]) + (" …" if len(group) > 6 else "")
        lines.append(f"| ↳ {category} | {_ms(ms)} | {100 * ms / total:.1f} % | {names} |")
    return "\n".join(lines)


def format_header(profile: Profile) -> list[str]:
    p = profile
    config = f"B = {p.batch}, D = {p.dim}" + ("" if p.classes is None else f", C = {p.classes}")
    floor = (
        f"{_ms(p.floor_ms)} ms (`{p.floor}`, one forward matmul, untraced; ours/floor "
        f"{p.wall_ms / p.floor_ms:.2f})"
        if p.floor_ms
        else "–"
    )
    kinds = collections.Counter(name.split("/", 1)[0] for name in p.thunk_threads)
    threads = ", ".join(f"{n} {kind}" for kind, n in sorted(kinds.items()))
    ratio = f" = {p.total_thread_ms / p.span_ms:.2f} × span" if p.span_ms else ""
    return [
        f"- loss: `{p.loss}` = `{p.meta.get('ours', '')}`; {config}; float32",
        f"- command: `{p.meta.get('command', '')}`",
        f"- machine: {p.meta.get('machine', '')}; XLA on {p.threads} CPUs; load average "
        f"{p.meta.get('load', '?')} (1, 5, 15 min) at the start",
        f"- jax {p.meta.get('jax', '')}, Python {p.meta.get('python', '')}; "
        f"{p.meta.get('git', '')}; {p.meta.get('date', '')} UTC",
        f"- wall per call: {_ms(p.wall_ms)} ms untraced (median of {p.calls}), "
        f"{_ms(p.traced_wall_ms)} ms under the profiler; executable span in the trace "
        f"{_ms(p.span_ms)} ms (median); floor {floor}",
        f"- thread time per call (all thunks, summed over threads): {_ms(p.total_thread_ms)} ms"
        f"{ratio}; {len(p.thunk_threads)} threads ran thunks ({threads}); worker tasks while "
        f"no thunk was in flight: {_ms(p.unattributed_ms)} ms",
        "- columns (per call): thread ms = own + helper, thread time (includes time a thread "
        "waited for a core), not wall time; in flight = wall time from the thunk's start to its "
        "completion; rate = per second of thread time. See `python -m benchmarks.profile_ops "
        "--help` and the module docstring",
    ]


def markdown_report(profile: Profile, top: int) -> str:
    title = f"# Per-op profile: {profile.loss}, B = {profile.batch}, D = {profile.dim}"
    if profile.classes is not None:
        title += f", C = {profile.classes}"
    return "\n".join(
        [
            title,
            "",
            *format_header(profile),
            "",
            "## Summary",
            "",
            format_summary(profile),
            "",
            "## Thunks, by thread time per call",
            "",
            format_table(profile, top),
            "",
        ]
    )


# --------------------------------------------------------------------------------------------
# Running it
# --------------------------------------------------------------------------------------------


def _git_state() -> str:
    def git(*args: str) -> str:
        result = subprocess.run(
            ["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, check=False
        )
        return result.stdout if result.returncode == 0 else ""

    commit = git("rev-parse", "--short", "HEAD").strip()
    if not commit:
        return "not a git checkout"
    status = git("status", "--porcelain", "--", "mlx_jax").splitlines()
    dirty = [line[3:] for line in status if len(line) > 3]
    text = f"mlx_jax at commit {commit}"
    if dirty:
        text += f" + uncommitted changes in {', '.join(sorted(dirty))}"
    return text


def find_xplane(directory: str) -> str:
    files = glob.glob(os.path.join(directory, "**", "*.xplane.pb"), recursive=True)
    if not files:
        raise RuntimeError(f"the profiler wrote no .xplane.pb under {directory}")
    return max(files, key=os.path.getmtime)


def profile_loss(
    loss: str,
    batch: int,
    dim: int,
    classes: int | None = None,
    *,
    calls: int = 5,
    warmup: int = 2,
    per_class: int = 4,
    seed: int = 0,
    block_size: bench.BlockSizeArg = None,
    class_block_size: int | None = None,
    threads: int | None = None,
    floor: bool = True,
) -> Profile:
    """Compiles the step ``benchmarks/losses.py`` times for ``loss``, times it, traces
    ``calls`` calls and returns the per-thunk profile."""
    spec = bench.SPEC_BY_NAME[loss]
    if spec.kind not in ("head", "center"):
        classes = None
    elif classes is None:
        classes = bench.DEFAULT_CLASSES[0]
    problem = bench.spec_problem(spec, batch, dim, classes, per_class, seed)
    args = bench.device_args(spec, problem)
    step = spec.step_for(class_block_size, block_size)
    compiled = jax.jit(step).lower(*args).compile()
    module = HloModule(compiled.as_text())

    def run() -> Any:
        return jax.block_until_ready(compiled(*args))

    sides: dict[str, Callable[[], Any]] = {"ours": run}
    if floor:
        floor_args = args[:1] if spec.kind == "pair" else args[:2]
        floor_compiled = jax.jit(bench._floor_fn(spec.kind)).lower(*floor_args).compile()
        sides["floor"] = lambda: jax.block_until_ready(floor_compiled(*floor_args))
    times = timed_blocks(sides, calls, calls, 0.2, warmup, settle=1)

    traced: list[float] = []
    with tempfile.TemporaryDirectory(prefix="profile_ops_") as directory:
        run()
        time.sleep(0.2)
        run()  # settles the threads, as a timed block's first call does
        with jax.profiler.trace(directory):
            for _ in range(calls):
                start = time.perf_counter()
                run()
                traced.append(time.perf_counter() - start)
        lines = read_trace(find_xplane(directory))
    analysis = analyze_trace(lines)
    rows, seen_calls, span_ms, thunk_threads = thunk_rows(analysis, module)
    return Profile(
        loss=loss,
        batch=batch,
        dim=dim,
        classes=classes,
        calls=seen_calls,
        rows=rows,
        wall_ms=1e3 * statistics.median(times["ours"]),
        traced_wall_ms=1e3 * statistics.median(traced),
        span_ms=span_ms,
        thunk_threads=thunk_threads,
        unattributed_ms=analysis.unattributed_ns / seen_calls / 1e6,
        floor=spec.floor,
        floor_ms=1e3 * statistics.median(times["floor"]) if "floor" in times else None,
        threads=threads or len(os.sched_getaffinity(0)),
        module=module.name,
        meta={"ours": spec.ours},
    )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.profile_ops",
        description=__doc__.split("\n\n")[0]
        + " Prints a markdown table of the compiled ops (thunks) by thread time per call; "
        "--out writes it with the setup.",
        epilog="How to read the columns: see the module docstring (benchmarks/profile_ops.py). "
        "In short: thread ms = own (the thunk's own trace events) + helper (thread-pool tasks "
        "it queued or that ran while it was in flight), summed over threads, per call; "
        "in flight = wall time from its start to its completion.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--loss", required=True, choices=[s.name for s in bench.SPECS], metavar="NAME")
    p.add_argument("--batch", type=int, required=True, help="batch size B")
    p.add_argument("--dim", type=int, required=True, help="embedding size D")
    p.add_argument(
        "--classes",
        type=int,
        default=None,
        help="classes C for class heads and center losses (default "
        f"{bench.DEFAULT_CLASSES[0]}); pair losses ignore it",
    )
    p.add_argument("--calls", type=int, default=5, help="calls timed, then traced")
    p.add_argument("--warmup", type=int, default=2, help="untimed calls first")
    p.add_argument("--per-class", type=int, default=4, help="samples per class in a batch")
    p.add_argument("--seed", type=int, default=0, help="seed of the random inputs")
    p.add_argument(
        "--block-size",
        type=bench._block_size_arg,
        default=None,
        help="pair losses: block_size ('dense', 'auto' or rows; default: the losses' own)",
    )
    p.add_argument(
        "--class-block-size", type=int, default=None, help="class heads: class_block_size"
    )
    p.add_argument(
        "--threads", type=int, default=None, help="pin to the first N CPUs (default: all)"
    )
    p.add_argument("--top", type=int, default=30, help="thunks listed (the rest in one row)")
    p.add_argument("--no-floor", action="store_true", help="do not time the matmul floor")
    p.add_argument(
        "--default-malloc",
        action="store_true",
        help="keep glibc's malloc defaults (default: experiments/allocator.py's setting, as "
        "benchmarks/losses.py uses)",
    )
    p.add_argument(
        "--source-note",
        default=None,
        help="where the profiled mlx_jax came from, for the header (default: the git commit "
        "and uncommitted changes of this checkout)",
    )
    p.add_argument("--out", type=pathlib.Path, default=None, help="markdown file to write")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if min(args.batch, args.dim, args.calls) < 1 or args.warmup < 0 or args.top < 1:
        parser.error("--batch, --dim, --calls and --top must be >= 1, --warmup >= 0")
    if args.classes is not None and args.classes < 2:
        parser.error("--classes must be >= 2")
    try:
        threads = pin_threads(args.threads)
    except ValueError as error:
        parser.error(str(error))
    if not args.default_malloc:
        reuse_freed_memory()
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    profile = profile_loss(
        args.loss,
        args.batch,
        args.dim,
        args.classes,
        calls=args.calls,
        warmup=args.warmup,
        per_class=args.per_class,
        seed=args.seed,
        block_size=args.block_size,
        class_block_size=args.class_block_size,
        threads=threads,
        floor=not args.no_floor,
    )
    profile.meta.update(
        command=" ".join(["python -m benchmarks.profile_ops", *argv]),
        machine=f"{cpu_model()}, {os.cpu_count()} CPUs, {platform.platform()}",
        load=load,
        jax=jax.__version__,
        python=platform.python_version(),
        git=args.source_note or _git_state(),
        date=time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
    )
    report = markdown_report(profile, args.top)
    print(report)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(report)
        print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
