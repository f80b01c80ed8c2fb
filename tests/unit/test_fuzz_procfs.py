"""Property tests: crafted /proc files, journal lines naming PIDs and trace_pipe lines never make
the parsers raise, and never give a PID or field the input did not hold; and whatever exception
ends a repair after "stop containerd", containerd is started again.

A pod shapes much of this input: its processes' names (comm, with spaces, parentheses, newlines),
its cgroups' names (a child cgroup may be named ``containerd.service``), the journal lines its
processes write. Bounded under the "ci" profile; ``make fuzz`` runs many more cases.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from nodemedic.actions.base import ActionContext, Skip, Step
from nodemedic.actions.shims import PID_MAX_LIMIT, KillOrphanedShims, _named_pids
from nodemedic.errors import RepairFailedError, UnitControlError
from nodemedic.events import JournalLine, PathChanged, PathKind
from nodemedic.policy.actions import KillOrphanedShimsParams
from nodemedic.procfs import ProcView, cgroup_from_text, nspid_from_status, pod_of, unit_of
from nodemedic.report import RecordKind
from nodemedic.sources.tracefs import TraceLine, TraceSignals, parse_line

from .fakes import FakeClock, FakeProbe, FakeUnits
from .test_runner import Broken, Harness

pytestmark = pytest.mark.unit
UNIT = "containerd.service"
# a fake /proc rewritten by every example: the fixture's folder is shared on purpose
SHARED_DIR = settings(
    suppress_health_check=[*settings.default.suppress_health_check, HealthCheck.function_scoped_fixture]
)

# ---- strategies --------------------------------------------------------------------------------

# what a pod can put in a name: spaces, parentheses, dashes, newlines, digits of other scripts
tricky_char = st.sampled_from([*" ()-:/\n\t\\=.0123456789", "\u0661", "\u00a0", "\x00", "\ufffd"])
tricky_text = st.text(st.one_of(tricky_char, st.characters(codec="utf-8")), max_size=40)
huge_number = st.one_of(
    st.integers(min_value=-(10**12), max_value=10**12).map(str),
    st.integers(min_value=4290, max_value=4400).map(lambda n: "9" * n),  # around int()'s digit limit
    st.sampled_from(["1_000", "+5", "-0", "007", "\u0661\u0662", "0x10", " 1", "1e3"]),
)
cgroup_component = st.one_of(
    st.sampled_from(["system.slice", "kubepods.slice", "kubepods-besteffort-pod1_2.slice", UNIT,
                     "cri-containerd-ab.scope", "pod1-2", "..", "", "user@1000.service"]),
    tricky_text,
)  # fmt: skip
cgroup_path = st.lists(cgroup_component, min_size=0, max_size=6).map(lambda parts: "/" + "/".join(parts))
cgroup_line = st.one_of(
    st.tuples(st.sampled_from(["0::", "1:name=systemd:", "4:memory:", "0:", "12:cpu,cpuacct:", ""]),
              cgroup_path).map("".join),
    tricky_text,
)  # fmt: skip
cgroup_text = st.lists(cgroup_line, max_size=6).map("\n".join)


def stat_text(pid: str, comm: str, fields: list[str]) -> str:
    return f"{pid} ({comm}) " + " ".join(fields) + "\n"


# ---- /proc/PID/stat, cgroup, status, comm in ProcView ------------------------------------------


@SHARED_DIR
@given(comm=tricky_text, fields=st.lists(st.integers(0, 2**64).map(str), min_size=20, max_size=50))
def test_start_time_is_field_22_whatever_the_comm(tmp_path: Path, comm: str, fields: list[str]) -> None:
    """The kernel writes ``pid (comm) state ...``; comm may hold ")" and spaces: field 22 is found
    after the last ")"."""
    (tmp_path / "7").mkdir(exist_ok=True)
    (tmp_path / "7" / "stat").write_text(stat_text("7", comm.replace("\x00", ""), ["S", *fields]))
    assert ProcView(tmp_path, own=tmp_path).start_time(7) == fields[18]


@SHARED_DIR
@given(content=st.one_of(st.binary(max_size=400), tricky_text.map(str.encode)))
def test_proc_files_of_any_content_never_raise(tmp_path: Path, content: bytes) -> None:
    folder = tmp_path / "7"
    folder.mkdir(exist_ok=True)
    for name in ("stat", "cgroup", "status", "comm"):
        (folder / name).write_bytes(content)
    view = ProcView(tmp_path, own=tmp_path)
    started = view.start_time(7)
    assert started == "" or started in content.decode(errors="replace")
    assert isinstance(view.local_pid(7), int)
    cgroup = view.cgroup(7)
    assert cgroup is not None
    assert cgroup == "" or cgroup in content.decode(errors="replace")
    assert view.comm(7) is not None
    assert isinstance(view.is_ours_in_unit(7, UNIT), bool)


@given(text=cgroup_text)
def test_cgroup_is_a_path_from_the_right_line(text: str) -> None:
    got = cgroup_from_text(text)
    lines = text.splitlines()
    assert got == "" or any(
        line in (f"0::{got}", f"{h}:name=systemd:{got}") for line in lines for h in [line.split(":", 1)[0]]
    )
    unit, pod = unit_of(got), pod_of(got)
    assert unit == "" or unit in got.split("/")
    assert pod == "" or re.sub("[-_]", "", pod) in re.sub("[-_]", "", got)


kernel_nspid = st.lists(st.integers(1, PID_MAX_LIMIT), min_size=1, max_size=4)


@given(pids=kernel_nspid, noise=st.lists(tricky_text, max_size=4))
def test_nspid_is_what_the_kernel_wrote(pids: list[int], noise: list[str]) -> None:
    # a comm with a newline cannot forge an NSpid line: the kernel escapes Name:'s newlines
    lines = ["Name:\t" + n.replace("\n", "\\n") for n in noise]
    text = "\n".join([*lines, "NSpid:\t" + "\t".join(map(str, pids)), "Uid:\t0"]) + "\n"
    assert nspid_from_status(text) == pids


@given(tokens=st.lists(huge_number, max_size=4), before=tricky_text)
def test_nspid_of_crafted_status_never_raises(tokens: list[str], before: str) -> None:
    text = before + "\nNSpid:\t" + "\t".join(tokens) + "\n"
    got = nspid_from_status(text)
    assert all(isinstance(p, int) for p in got)
    assert len(got) <= len(text.split())


# ---- kill-orphaned-shims: journal lines, cmdline, cgroup, children -----------------------------


def left_over(pid: str, name: str = "containerd-shim") -> str:
    return f"Found left-over process {pid} ({name}) in control group while starting unit. Ignoring."


@given(pids=st.lists(huge_number, max_size=4), noise=tricky_text)
def test_named_pids_were_in_the_line(pids: list[str], noise: str) -> None:
    message = noise.join(left_over(p) for p in pids) + noise
    named = _named_pids(message)
    event(f"{len(named)} of {len(pids)} named")
    for pid in named:
        assert 0 < pid <= PID_MAX_LIMIT
        assert re.search(rf"process 0*{pid} \(containerd-shim", message)
    expected = [int(p) for p in pids if re.fullmatch(r"[0-9]{1,10}", p) and 0 < int(p) <= PID_MAX_LIMIT]
    if noise == "":
        assert named == expected


def write_process(proc: Path, cmdline: bytes, cgroup: bytes, children: list[bytes | None]) -> None:
    base = proc / "100"
    task = base / "task"
    if base.exists():
        for old in task.glob("*"):
            with contextlib.suppress(FileNotFoundError):
                (old / "children").unlink()
            old.rmdir()
    task.mkdir(parents=True, exist_ok=True)
    (base / "cmdline").write_bytes(cmdline)
    (base / "cgroup").write_bytes(cgroup)
    for i, child in enumerate(children):
        (task / str(100 + i)).mkdir()
        if child is not None:
            (task / str(100 + i) / "children").write_bytes(child)


GOOD_SHIM = b"/usr/bin/containerd-shim-runc-v2\0-namespace\0k8s.io\0-id\0gone\0-address\0/run/x\0"
shim_cmdline = st.one_of(
    st.just(GOOD_SHIM),
    st.lists(st.sampled_from(["/usr/bin/containerd-shim-runc-v2", "-namespace", "k8s.io", "-id", "abc",
                              "..", "/", "-address", "containerd-shim"]), max_size=8)
    .map(lambda args: b"\0".join(a.encode() for a in args) + b"\0"),
    st.binary(max_size=80),
)  # fmt: skip
children_files = st.one_of(
    st.lists(st.just(b""), min_size=1, max_size=3),
    st.lists(st.one_of(st.none(), st.sampled_from([b"", b" ", b"\n", b"101 ", b"x"])), max_size=3),
)
# the unit's own cgroup among other lines, or anything
unit_line = st.sampled_from(
    ["0::/system.slice/containerd.service", "1:name=systemd:/system.slice/containerd.service"]
)
orphan_cgroup = st.one_of(
    st.lists(st.one_of(unit_line, cgroup_line), max_size=4).map("\n".join).map(str.encode),
    cgroup_text.map(str.encode),
    st.binary(max_size=80),
)


@SHARED_DIR
@given(cmdline=shim_cmdline, cgroup=orphan_cgroup, children=children_files)
def test_a_proven_orphan_is_proven_by_the_files(
    tmp_path: Path, cmdline: bytes, cgroup: bytes, children: list[bytes | None]
) -> None:
    """None (kill it) only when argv[0] is a shim, the cgroup line names the unit's own cgroup,
    and every thread's children file exists and is empty; crafted files never raise."""
    proc = tmp_path / "proc"
    write_process(proc, cmdline, cgroup, children)
    kill = KillOrphanedShims(KillOrphanedShimsParams(do="kill-orphaned-shims", proc=str(proc),
                                                     bundles=str(tmp_path / "bundles")))  # fmt: skip
    why = kill.not_orphaned(100)
    event("kept" if why else "proven orphan")
    if why is None:
        args = [a for a in cmdline.split(b"\0") if a]
        assert args[0].rsplit(b"/", 1)[-1].startswith(b"containerd-shim")
        lines = cgroup.decode(errors="replace").splitlines()
        assert any(re.fullmatch(r"(0::|[^:]*:name=systemd:)(/[^/]*\.slice)*/containerd\.service", line)
                   for line in lines)  # fmt: skip
        assert children
        assert all(c is not None and not c.strip() for c in children)


@SHARED_DIR
@given(message=st.one_of(tricky_text, st.lists(huge_number, max_size=3).map(
    lambda pids: " ".join(left_over(p) for p in pids))))  # fmt: skip
def test_check_of_any_journal_line_never_raises(tmp_path: Path, message: str) -> None:
    kill = KillOrphanedShims(KillOrphanedShimsParams(do="kill-orphaned-shims", proc=str(tmp_path)))
    ctx = ActionContext(FakeUnits(), FakeProbe(), FakeClock(), tmp_path,
                        event=JournalLine(UNIT, message))  # fmt: skip
    step = asyncio.run(kill.check(ctx))
    assert isinstance(step, Skip | Step)
    if isinstance(step, Step):
        assert all(int(p) in _named_pids(message) for p in step.data["pids"].split())


# ---- trace_pipe lines --------------------------------------------------------------------------

TEMPLATE = (
    "{task}-{pid} [001] d..2. 1234.567890: signal_generate: "
    "sig={sig} errno={errno} code={code} comm={comm} pid={target} grp={grp} res={res}"
)
kernel_int = st.integers(-(2**31), 2**31).map(str)
trace_field = st.one_of(*[kernel_int] * 7, huge_number.map(str))  # (a map: not flattened into 8 branches)
trace_pid = st.one_of(*[st.integers(0, PID_MAX_LIMIT).map(str)] * 7, huge_number.map(str))
trace_comm = st.one_of(st.sampled_from(["bash", "nvidia-ctk -x 2", "<...>", "containerd", "a-1 (2) [3]"]),
                       tricky_text)  # fmt: skip


@given(task=trace_comm, comm=trace_comm, pid=trace_pid, sig=trace_field, errno=trace_field,
       code=trace_field, target=trace_pid, grp=trace_field, res=trace_field)  # fmt: skip
def test_a_crafted_trace_line_is_dropped_or_read_from_its_own_fields(**fields: str) -> None:
    text = TEMPLATE.format(**fields)
    parsed = parse_line(text)
    event("dropped" if parsed is None else "parsed")
    if parsed is None:
        return
    for value in (parsed.sender_pid, parsed.target_pid, parsed.signal, parsed.code, parsed.result):
        assert abs(value) < 10**10
        assert re.search(rf"(?<![0-9])-?0*{abs(value)}(?![0-9])", text)
    assert re.search(rf"-0*{parsed.sender_pid}\s", text)
    assert re.search(rf" pid=0*{parsed.target_pid} grp=", text)
    assert re.search(rf"sig=-?0*{abs(parsed.signal)} ", text)


@given(text=st.one_of(st.text(max_size=2000), st.binary(max_size=600).map(lambda b: b.decode("latin-1"))))
def test_any_trace_line_never_raises(text: str) -> None:
    parsed = parse_line(text)
    assert parsed is None or isinstance(parsed, TraceLine)


@SHARED_DIR
@given(lines=st.lists(st.one_of(tricky_text, st.builds(TEMPLATE.format, task=tricky_text, pid=trace_field,
       sig=st.just("1"), errno=st.just("0"), code=st.just("0"), comm=tricky_text, target=trace_field,
       grp=trace_field, res=trace_field)), max_size=5))  # fmt: skip
def test_feeding_crafted_lines_never_raises(tmp_path: Path, lines: list[str]) -> None:
    seen: list[object] = []
    source = TraceSignals(tracefs=tmp_path / "tracing", proc=tmp_path / "no-proc", unit=UNIT,
                          emit=seen.append, clock=FakeClock(), on_state=lambda _: None,
                          main_pid=lambda: 0)  # fmt: skip
    for text in lines:
        source.feed(text)
    assert seen == [], "no process of that /proc is containerd: nothing counts"


# ---- the runner: whatever ends a repair after the stop, the unit runs again --------------------


def errors() -> list[Callable[[], BaseException]]:
    return [
        lambda: KeyError("runc"),
        lambda: ValueError("Exceeds the limit (4300 digits) for integer string conversion"),
        lambda: UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte"),
        RecursionError, TypeError, AttributeError, IndexError, AssertionError, RuntimeError,
        NotImplementedError, ZeroDivisionError, OverflowError, LookupError, ArithmeticError,
        lambda: OSError(5, "Input/output error"), lambda: PermissionError(13, "Permission denied"),
        lambda: RepairFailedError("still a directory"), lambda: UnitControlError("job failed"),
        asyncio.CancelledError, TimeoutError, KeyboardInterrupt, SystemExit, GeneratorExit,
    ]  # fmt: skip


@given(make=st.sampled_from(errors()), phase=st.sampled_from(["check", "apply", "verify"]))
def test_whatever_an_action_raises_after_the_stop_the_unit_runs_again(
    make: Callable[[], BaseException], phase: str
) -> None:
    from nodemedic.actions import registry
    from nodemedic.policy.actions import RemoveSocketDirParams

    error = make()
    params: type[Any] = RemoveSocketDirParams
    saved = registry.ACTIONS[params]
    registry.ACTIONS[params] = Broken(phase, error)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            h = Harness(Path(tmp))

            async def repair() -> None:
                h.sock.mkdir()
                h.runner.handle(PathChanged(str(h.sock), PathKind.DIRECTORY))
                await h.settle()

            with contextlib.suppress(BaseException):  # the error itself may end the loop
                asyncio.run(repair())
            h.close()
    finally:
        registry.ACTIONS[params] = saved
    assert h.units.calls[:1] == [("stop", UNIT)]
    assert h.units.calls[-1] == ("start", UNIT), f"{error!r} in {phase} left {UNIT} stopped"
    assert h.units.active[UNIT] == "active"
    compensated = [r for r in h.sink.of(RecordKind.ACTION) if r.fields["ACTION"] == "compensate"]
    assert [r.fields["OUTCOME"] for r in compensated] == ["done"]
    if isinstance(error, Exception):
        # after the stop, a bug is a failed repair like any other: bounded by budget and breaker
        assert len(h.runner.budget.spent) == 1
        assert len(h.runner.states["socket-path-is-directory"].breaker.recent_failures) == 1
    if isinstance(error, Exception) and not isinstance(error, RepairFailedError | UnitControlError | OSError):
        assert [r.fields["OUTCOME"] for r in h.sink.of(RecordKind.ERROR)] == ["internal-error"]
