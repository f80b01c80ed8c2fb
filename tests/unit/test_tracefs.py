"""TraceSignals: parsing trace_pipe lines, deciding which signals count, naming the sender.

The trace's /proc is a fake tree; our own /proc is the real one (its PID namespace link and
cgroup are copied into the fake tree, so the fake processes live "in our namespaces").
"""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

import pytest

from nodemedic.core.nodeview import NodeView
from nodemedic.events import Event, JournalLine, SignalSeen, UnitChanged
from nodemedic.sources.tracefs import (
    TraceLine,
    TraceSignals,
    default_instance,
    event_filter,
    parse_line,
)

from .fakes import FakeClock

pytestmark = pytest.mark.unit

UNIT = "containerd.service"
OUR_PIDNS = os.readlink("/proc/self/ns/pid")
OTHER_PIDNS = "pid:[4026599999]"
POD_UID = "8f5c2c7e-5a3b-4b8e-9c1d-2f0e6a7b8c9d"
TOOLKIT = (
    "/kubepods.slice/kubepods-besteffort.slice/"
    f"kubepods-besteffort-pod{POD_UID.replace('-', '_')}.slice/cri-containerd-0123abcd.scope"
)

# Real lines (kernel 6.x trace_pipe of an instance); the last fields are the *target*.
LAB_LINE = (
    "            bash-14011   [000] d..1.   379.346380: signal_generate: "
    "sig=1 errno=0 code=0 comm=containerd pid=14012 grp=1 res=0"
)


def line(sender: str, sender_pid: int, target_pid: int, *, sig: int = 1, code: int = 0,
         comm: str = "containerd", res: int = 0) -> str:  # fmt: skip
    return (
        f"{sender:>16}-{sender_pid:<7} [001] d..2.  1234.567890: signal_generate: "
        f"sig={sig} errno=0 code={code} comm={comm} pid={target_pid} grp=1 res={res}"
    )


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (LAB_LINE, TraceLine("bash", 14011, 1, 0, "containerd", 14012, True, 0)),
        # a task name with spaces and dashes: the PID follows the last dash
        ("  nvidia-ctk -x 2-31337 [003] d..1.  5.000001: signal_generate: sig=1 errno=0 code=0 "
         "comm=containerd pid=9 grp=1 res=2",
         TraceLine("nvidia-ctk -x 2", 31337, 1, 0, "containerd", 9, True, 2)),
        # a target name with spaces, and one that looks like a field
        ("kill-5 [000] ..... 1.5: signal_generate: sig=1 errno=0 code=0 comm=my app pid=3 x pid=7 "
         "grp=0 res=1",
         TraceLine("kill", 5, 1, 0, "my app pid=3 x", 7, False, 1)),
        # the runtime re-raising the signal to itself (SI_TKILL)
        ("containerd-14012 [000] d..2. 379.35: signal_generate: sig=1 errno=0 code=-6 "
         "comm=containerd pid=14012 grp=1 res=0",
         TraceLine("containerd", 14012, 1, -6, "containerd", 14012, True, 0)),
        # options record-tgid on and irq-info off
        ("bash-14011 (  14011) [000] 379.346380: signal_generate: sig=1 errno=0 code=0 "
         "comm=containerd pid=14012 grp=1 res=0",
         TraceLine("bash", 14011, 1, 0, "containerd", 14012, True, 0)),
        ("<...>-88 [000] d..1. 1.0: signal_generate: sig=1 errno=0 code=0 comm=containerd pid=9 "
         "grp=1 res=0",
         TraceLine("<...>", 88, 1, 0, "containerd", 9, True, 0)),
    ],
)  # fmt: skip
def test_parse_line(text: str, expected: TraceLine) -> None:
    assert parse_line(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "CPU:0 [LOST 3 EVENTS]",
        "##### CPU 2 buffer started ####",
        "",
        "garbage",
        "bash-1 [000] d..1. 1.0: signal_deliver: sig=1 errno=0 code=0 sa_handler=0 sa_flags=0",
        "bash-1 [000] d..1. 1.0: signal_generate: sig=1 errno=0 code=0 comm=containerd pid=x grp=1 res=0",
        "bash-1 [000] d..1. 1.0: signal_generate: sig=1 errno=0 code=0 comm=containerd pid=2 grp=1",
        "\x00\xff binary",
    ],
)
def test_parse_line_rejects_other_lines(text: str) -> None:
    assert parse_line(text) is None


def test_event_filter() -> None:
    assert event_filter(signal.SIGHUP, "containerd") == 'sig == 1 && code == 0 && comm == "containerd"'


def test_default_instance_uses_machine_id(tmp_path: Path) -> None:
    machine_id = tmp_path / "machine-id"
    machine_id.write_text("3d1219c7c4c5404aaa1f6d2a48adfda4\n")
    assert default_instance(machine_id) == "nodemedic-3d1219c7c4c5"
    machine_id.write_text("")
    assert default_instance(machine_id) == "nodemedic"
    assert default_instance(tmp_path / "missing") == "nodemedic"


# ---- deciding and naming, on a fake /proc of the host ------------------------------------------


class HostProc:
    """The trace's /proc: host PIDs; "ours" are in our PID namespace with an inner PID."""

    def __init__(self, root: Path) -> None:
        self.path = root
        root.mkdir()
        self.add(999_999, "python3", Path("/proc/self/cgroup").read_text(), [999_999, 1], OUR_PIDNS)
        (root / "self").symlink_to("999999")

    def add(self, pid: int, comm: str, cgroup: str, nspid: list[int], pidns: str = OUR_PIDNS,
            start: int = 100) -> None:  # fmt: skip
        folder = self.path / str(pid)
        (folder / "ns").mkdir(parents=True, exist_ok=True)
        (folder / "comm").write_text(comm + "\n")
        text = cgroup if "\n" in cgroup else f"0::{cgroup}\n"
        (folder / "cgroup").write_text(text)
        (folder / "status").write_text("NSpid:\t" + "\t".join(map(str, nspid)) + "\n")
        (folder / "stat").write_text(f"{pid} ({comm}) S 1 1 1 0 -1 0 0 0 0 0 0 0 0 0 20 0 1 0 {start} 0\n")
        link = folder / "ns" / "pid"
        link.unlink(missing_ok=True)
        link.symlink_to(pidns)

    def remove(self, pid: int) -> None:
        folder = self.path / str(pid)
        for name in ("comm", "cgroup", "status", "stat", "ns/pid"):
            (folder / name).unlink()
        (folder / "ns").rmdir()
        folder.rmdir()


class Harness:
    def __init__(self, tmp_path: Path) -> None:
        self.proc = HostProc(tmp_path / "proc")
        self.events: list[Event] = []
        self.states: list[str] = []
        self.view = NodeView()  # the one copy of the units' main PIDs, as app.py wires it
        self.source = TraceSignals(
            tracefs=tmp_path / "tracing",
            proc=self.proc.path,
            unit=UNIT,
            emit=self.events.append,
            clock=FakeClock(),
            on_state=self.states.append,
            main_pid=lambda: self.view.main_pid(UNIT),
            instance="nodemedic-test",
        )
        # our containerd: host PID 16733, PID 33 in our namespace
        self.proc.add(16733, "containerd", "/system.slice/containerd.service", [16733, 33])
        # another lab node's containerd on the same kernel, same inner PID
        self.proc.add(17000, "containerd", "/../lab-2/system.slice/containerd.service", [17000, 33],
                      OTHER_PIDNS)  # fmt: skip
        self.proc.add(20001, "toolkit", TOOLKIT, [20001, 501])
        self.proc.add(20002, "bash", "/system.slice/toolkit-standin.service", [20002, 502])

    def main_pid(self, pid: int) -> None:
        event = UnitChanged(UNIT, "active", "running", main_pid=pid)
        self.view.see(event)  # the executor feeds the view first, then the observers
        self.source.handle(event)

    def seen(self) -> list[SignalSeen]:
        return [e for e in self.events if isinstance(e, SignalSeen)]


@pytest.fixture
def harness(tmp_path: Path) -> Harness:
    return Harness(tmp_path)


def test_a_sighup_to_our_containerd_names_the_sender(harness: Harness) -> None:
    harness.main_pid(33)
    harness.source.feed(line("bash", 20002, 16733, res=0))
    assert harness.seen() == [
        SignalSeen(
            signal=1,
            target_pid=33,
            unit=UNIT,
            sender_pid=20002,
            sender_comm="bash",
            sender_cgroup="/system.slice/toolkit-standin.service",
            sender_unit="toolkit-standin.service",
            sender_pod="",
            target_comm="containerd",
            result=0,
            at=1000.0,
            source="tracefs",
        )
    ]


def test_a_pod_sender_is_named_by_container_scope_and_pod(harness: Harness) -> None:
    harness.main_pid(33)
    harness.source.feed(line("toolkit", 20001, 16733, res=2))
    (seen,) = harness.seen()
    assert (seen.sender_unit, seen.sender_pod, seen.result) == ("cri-containerd-0123abcd.scope", POD_UID, 2)
    assert seen.sender_cgroup == TOOLKIT


def test_the_target_may_be_gone_when_the_line_is_read(harness: Harness) -> None:
    harness.main_pid(33)
    harness.proc.remove(16733)  # containerd died of the SIGHUP before we read the line
    harness.source.feed(line("bash", 20002, 16733))
    assert [e.target_pid for e in harness.seen()] == [33]


def test_a_restart_after_the_signal_does_not_lose_it(harness: Harness) -> None:
    harness.main_pid(33)
    harness.proc.remove(16733)
    harness.proc.add(16900, "containerd", "/system.slice/containerd.service", [16900, 40])
    harness.main_pid(40)  # D-Bus told us of the new main process before the trace line was read
    harness.source.feed(line("bash", 20002, 16733))
    harness.source.feed(line("bash", 20002, 16900))
    assert [e.target_pid for e in harness.seen()] == [33, 40]


def test_another_nodes_containerd_gives_nothing(harness: Harness) -> None:
    harness.main_pid(33)
    harness.source.feed(line("bash", 20002, 17000))
    harness.proc.remove(17000)
    harness.source.feed(line("bash", 20002, 17000))
    assert harness.seen() == []


def test_an_unknown_target_found_live_counts(harness: Harness) -> None:
    # no UnitChanged yet (the daemon just started): looked up while it is still there
    harness.source.feed(line("bash", 20002, 16733))
    assert [e.target_pid for e in harness.seen()] == [33]


def test_a_reused_target_pid_is_looked_up_again(harness: Harness) -> None:
    harness.main_pid(33)
    harness.proc.add(16733, "containerd", "/../lab-2/system.slice/containerd.service", [16733, 9],
                     OTHER_PIDNS, start=999)  # fmt: skip
    harness.source.feed(line("bash", 20002, 16733))
    assert harness.seen() == []


def test_self_raised_and_other_signals_give_nothing(harness: Harness) -> None:
    harness.main_pid(33)
    harness.source.feed(line("containerd", 16733, 16733, code=-6))
    harness.source.feed(line("bash", 20002, 16733, sig=15))
    assert harness.seen() == []


def test_a_gone_sender_keeps_pid_and_name_only(harness: Harness) -> None:
    harness.main_pid(33)
    harness.source.feed(line("kill", 31000, 16733))  # never in /proc: exited already
    (seen,) = harness.seen()
    assert (seen.sender_pid, seen.sender_comm, seen.sender_cgroup, seen.sender_unit) == (
        31000,
        "kill",
        "",
        "",
    )


def test_a_reused_sender_pid_is_not_trusted(harness: Harness) -> None:
    harness.main_pid(33)
    harness.source.feed(line("kill", 20002, 16733))  # PID 20002 is a bash now, not the kill
    (seen,) = harness.seen()
    assert (seen.sender_comm, seen.sender_cgroup) == ("kill", "")


def test_an_unnamed_sender_takes_procs_name(harness: Harness) -> None:
    harness.main_pid(33)
    harness.source.feed(line("<...>", 20002, 16733))
    (seen,) = harness.seen()
    assert (seen.sender_comm, seen.sender_unit) == ("bash", "toolkit-standin.service")


@pytest.mark.parametrize("text", ["CPU:0 [LOST 3 EVENTS]", "garbage", "", "   "])
def test_strange_lines_are_skipped(harness: Harness, text: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("DEBUG", logger="nodemedic.sources.tracefs")
    harness.source.feed(text)
    assert harness.seen() == []
    if text.strip():
        assert "not a signal_generate event" in caplog.text


def test_only_the_watched_units_changes_count(harness: Harness) -> None:
    harness.source.handle(UnitChanged("kubelet.service", "active", "running", main_pid=33))
    harness.source.handle(JournalLine(UNIT, "hello"))
    harness.proc.remove(16733)
    harness.source.feed(line("bash", 20002, 16733))
    assert harness.seen() == []


def test_bytes_split_across_reads_are_joined(harness: Harness) -> None:
    harness.main_pid(33)
    read_fd, write_fd = os.pipe()
    os.set_blocking(read_fd, False)
    try:
        data = (line("bash", 20002, 16733) + "\n").encode()
        os.write(write_fd, data[:30])
        harness.source._on_readable(read_fd)
        assert harness.seen() == []
        os.write(write_fd, data[30:] + b"CPU:0 [LOST 1 EVENTS]\n")
        harness.source._on_readable(read_fd)
        assert len(harness.seen()) == 1
    finally:
        os.close(read_fd)
        os.close(write_fd)


async def test_end_of_file_stops_reading(harness: Harness) -> None:
    read_fd, write_fd = os.pipe()
    os.set_blocking(read_fd, False)
    os.close(write_fd)
    broken: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    try:
        harness.source._on_readable(read_fd, broken)
    finally:
        os.close(read_fd)
    assert broken.result() == "end of file"


# ---- without a usable tracefs ------------------------------------------------------------------


async def test_missing_tracefs_is_reported_and_run_returns(harness: Harness) -> None:
    await asyncio.wait_for(harness.source.run(), 5)
    (state,) = harness.states
    assert "tracefs is not mounted at" in state
    assert "will not be known" in state
    assert "mount -t tracefs" in state


async def test_tracefs_without_the_signal_event_is_reported(harness: Harness, tmp_path: Path) -> None:
    (tmp_path / "tracing" / "instances").mkdir(parents=True)
    await asyncio.wait_for(harness.source.run(), 5)
    (state,) = harness.states
    assert "no trace event events/signal/signal_generate" in state


@pytest.mark.parametrize(
    "text",
    [
        # int() refuses more than 4,300 digits (ValueError); no kernel field has more than 10
        line("bash", 1, 2).replace("sig=1", "sig=" + "1" * 4301),
        line("bash", 1, 2).replace("pid=2", "pid=" + "2" * 4301),
        line("bash", 1, 2).replace("res=0", "res=-" + "9" * 11),
        line("bash", 1, 2).replace("bash-1 ", "bash-" + "1" * 11 + " "),
        # digits that are not ASCII: int() would turn them into a PID the line never named
        line("bash", 1, 2).replace("pid=2", "pid=\u0662"),
        line("bash", 1, 2).replace("-1 ", "-\u0661 "),
        # longer than any kernel line (its two .* would cost quadratic time)
        line("bash", 1, 2).replace("comm=containerd", "comm=" + "x" * 600),
    ],
)
def test_parse_line_drops_crafted_numbers(text: str) -> None:
    assert parse_line(text) is None


def test_the_longest_real_line_still_parses() -> None:
    """Two 15-byte comms (TASK_COMM_LEN 16) and every field at its widest."""
    text = (
        f"{'n' * 15}-4194304 (4194304) [1023] d.Hs1. 4294967295.999999: signal_generate: "
        f"sig=-2147483648 errno=-2147483648 code=-2147483648 comm={'c' * 15} pid=4194304 "
        "grp=-2147483648 res=-2147483648"
    )
    assert len(text) < 512
    parsed = parse_line(text)
    assert parsed is not None
    assert (parsed.sender_pid, parsed.target_pid, parsed.code) == (4194304, 4194304, -2147483648)
