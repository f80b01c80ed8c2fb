"""The runner with real files in a temporary directory; systemd and containerd faked at the edges."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from nodemedic.actions.base import ActionContext
from nodemedic.engine.runner import Runner
from nodemedic.events import JournalLine, PathChanged, PathKind, UnitChanged
from nodemedic.policy.load import parse_policy
from nodemedic.policy.model import Policy
from nodemedic.report import MemorySink, RecordKind, Reporter

from .fakes import FakeClock, FakeProbe, FakeUnits

pytestmark = pytest.mark.unit


def make_policy(root: Path, mode: str = "enforce") -> Policy:
    sock, ttrpc = str(root / "containerd.sock"), str(root / "containerd.sock.ttrpc")
    return parse_policy(
        {
            "daemon": {"mode": mode, "state_dir": str(root.parent / "state")},
            "rule": [
                {
                    "name": "socket-path-is-directory",
                    "trigger": [
                        {"source": "path", "paths": [sock, ttrpc], "kind": "directory"},
                        {
                            "source": "journal",
                            "pattern": "failed to get listener for main (ttrpc )?endpoint: is a directory",
                        },
                    ],
                    "confirm": {"paths": [sock, ttrpc], "kind": "directory", "unit": "containerd.service"},
                    "action": [
                        {"do": "stop-unit", "unit": "containerd.service"},
                        {"do": "remove-socket-dir", "paths": [sock, ttrpc], "root": str(root)},
                        {"do": "start-unit", "unit": "containerd.service"},
                        {"do": "verify-containerd", "socket": sock, "timeout": "1s"},
                        {"do": "restart-unit", "unit": "kubelet.service"},
                    ],
                }
            ],
        }
    )


class Harness:
    def __init__(
        self,
        tmp_path: Path,
        mode: str = "enforce",
        units: FakeUnits | None = None,
        probe: FakeProbe | None = None,
    ) -> None:
        self.root = tmp_path / "run" / "containerd"
        self.root.mkdir(parents=True)
        self.sock = self.root / "containerd.sock"
        self.clock = FakeClock()
        self.units = units or FakeUnits()
        self.probe = probe or FakeProbe()
        self.sink = MemorySink()
        self.tasks: list[asyncio.Task[None]] = []
        self.sockets: list[socket.socket] = []
        self.quarantine = tmp_path / "state" / "quarantine"
        # containerd coming back after a start: its socket path becomes a socket
        self.units.on_start = lambda unit: unit == "containerd.service" and self.serve_socket_if_free()
        ctx = ActionContext(self.units, self.probe, self.clock, self.quarantine)
        self.runner = Runner(make_policy(self.root, mode), ctx, Reporter(self.sink), self._spawn)
        # as at start-up: D-Bus resynchronises the units' state first (a crashed containerd)
        self.runner.handle(UnitChanged("containerd.service", "activating", "auto-restart"))

    def _spawn(self, coro: Any) -> None:
        self.tasks.append(asyncio.get_running_loop().create_task(coro))

    async def settle(self) -> None:
        while self.tasks:
            await self.tasks.pop(0)

    def outcomes(self, kind: RecordKind = RecordKind.ACTION) -> list[tuple[str, str]]:
        return [(r.fields["ACTION"], r.fields["OUTCOME"]) for r in self.sink.of(kind)]

    def serve_socket_if_free(self) -> None:
        if not self.sock.exists():  # a directory still there: containerd would fail to start
            self.serve_socket()

    def serve_socket(self) -> socket.socket:
        """containerd coming back: its socket path is a socket again."""
        s = socket.socket(socket.AF_UNIX)
        s.bind(str(self.sock))
        self.sockets.append(s)
        return s

    def close(self) -> None:
        for s in self.sockets:
            s.close()


@pytest.fixture
def harness(tmp_path: Path) -> Iterator[Callable[..., Harness]]:
    made: list[Harness] = []

    def make(**kwargs: Any) -> Harness:
        made.append(Harness(tmp_path, **kwargs))
        return made[-1]

    yield make
    for h in made:
        h.close()


async def test_enforce_removes_the_directory_and_restarts(harness: Callable[..., Harness]) -> None:
    h = harness()
    h.sock.mkdir()

    h.runner.handle(PathChanged(str(h.sock), PathKind.DIRECTORY, at=h.clock.now))
    await h.settle()
    assert h.units.calls == [
        ("stop", "containerd.service"),
        ("start", "containerd.service"),
        ("restart", "kubelet.service"),
    ]
    assert h.outcomes() == [
        ("stop-unit", "done"),
        ("remove-socket-dir", "done"),
        ("start-unit", "done"),
        ("verify-containerd", "done"),
        ("restart-unit", "done"),
    ]
    assert h.sock.is_socket()
    [outcome] = h.sink.of(RecordKind.OUTCOME)
    assert outcome.fields["OUTCOME"] == "repaired"
    incidents = {r.fields.get("INCIDENT") for r in h.sink.records}
    assert len(incidents) == 1, "every record of one incident carries the same id"
    [detected] = h.sink.of(RecordKind.DETECTED)
    assert detected.fields["PATH"] == str(h.sock)
    assert detected.fields["SOURCE"] == "inotify"


async def test_observe_mode_touches_nothing(harness: Callable[..., Harness]) -> None:
    h = harness(mode="observe")
    h.sock.mkdir()
    (h.sock / "keep").write_text("x")
    h.runner.handle(PathChanged(str(h.sock), PathKind.DIRECTORY))
    await h.settle()
    assert h.units.calls == []
    assert (h.sock / "keep").read_text() == "x"
    outcomes = dict(h.outcomes())
    assert outcomes["stop-unit"] == outcomes["remove-socket-dir"] == "would-do"
    assert all(r.fields["MODE"] == "observe" for r in h.sink.records)
    assert h.sink.of(RecordKind.OUTCOME)[0].fields["OUTCOME"] == "observed"
    # the same incident seen again (journald, D-Bus) is not reported again...
    h.runner.handle(
        JournalLine(
            "containerd.service", "containerd: failed to get listener for main endpoint: is a directory"
        )
    )
    await h.settle()
    assert len(h.sink.of(RecordKind.DETECTED)) == 1
    # ...until it has cleared and comes back
    (h.sock / "keep").unlink()
    h.sock.rmdir()
    h.runner.handle(PathChanged(str(h.sock), PathKind.MISSING))
    h.sock.mkdir()
    h.runner.handle(PathChanged(str(h.sock), PathKind.DIRECTORY))
    await h.settle()
    assert len(h.sink.of(RecordKind.DETECTED)) == 2


async def test_one_incident_from_three_sources_is_repaired_once(harness: Callable[..., Harness]) -> None:
    h = harness()
    h.sock.mkdir()
    h.runner.handle(PathChanged(str(h.sock), PathKind.DIRECTORY))
    line = "containerd: failed to get listener for main endpoint: is a directory"
    h.runner.handle(JournalLine("containerd.service", line))  # while the repair runs: coalesced
    await h.settle()
    h.runner.handle(JournalLine("containerd.service", line))  # stale: the directory is gone
    await h.settle()
    assert h.units.calls.count(("stop", "containerd.service")) == 1
    assert len(h.sink.of(RecordKind.DETECTED)) == 1


async def test_stale_event_does_nothing(harness: Callable[..., Harness]) -> None:
    h = harness()
    h.runner.handle(PathChanged(str(h.sock), PathKind.DIRECTORY))  # already gone when we look
    await h.settle()
    assert h.sink.records == []
    assert h.units.calls == []


async def test_failed_repair_backs_off(harness: Callable[..., Harness]) -> None:
    units = FakeUnits()
    units.fail.add(("start", "containerd.service"))
    h = harness(units=units)
    h.sock.mkdir()
    h.runner.handle(PathChanged(str(h.sock), PathKind.DIRECTORY))
    await h.settle()
    assert h.outcomes()[-1] == ("start-unit", "failed")
    assert h.sink.of(RecordKind.OUTCOME)[-1].fields["OUTCOME"] == "not-repaired"
    # the fault comes back at once: within the backoff nothing is tried, and that is said once
    h.sock.mkdir()
    for _ in range(3):
        h.runner.handle(PathChanged(str(h.sock), PathKind.DIRECTORY))
    await h.settle()
    assert units.calls.count(("start", "containerd.service")) == 1
    deferred = [r for r in h.sink.of(RecordKind.DECIDED) if r.fields.get("OUTCOME") == "deferred"]
    assert len(deferred) == 1
    h.clock.advance(5.0)
    units.fail.clear()
    h.runner.handle(PathChanged(str(h.sock), PathKind.DIRECTORY))
    await h.settle()
    assert units.calls.count(("start", "containerd.service")) == 2


async def test_verify_fails_when_containerd_never_answers(harness: Callable[..., Harness]) -> None:
    h = harness(probe=FakeProbe(answers=False))
    h.clock.tick = 0.1
    h.sock.mkdir()
    h.runner.handle(PathChanged(str(h.sock), PathKind.DIRECTORY))
    await h.settle()
    assert ("verify-containerd", "failed") in h.outcomes()
    assert "restart-unit" not in dict(h.outcomes()), "the sequence stops at the first failure"
    assert h.probe.calls > 1


async def test_breaker_opens_escalates_and_persists(harness: Callable[..., Harness], tmp_path: Path) -> None:
    from nodemedic.engine.store import StateStore

    units = FakeUnits()
    units.fail.add(("start", "containerd.service"))
    h = harness(units=units)
    store = StateStore(tmp_path / "state")
    h.runner = Runner(h.runner.policy, h.runner.ctx, h.runner.report, h._spawn, store)
    h.runner.handle(UnitChanged("containerd.service", "activating", "auto-restart"))
    for _ in range(3):  # default breaker: 3 failures within 15 min
        h.sock.mkdir(exist_ok=True)
        h.runner.handle(PathChanged(str(h.sock), PathKind.DIRECTORY))
        await h.settle()
        h.clock.advance(400)  # past the backoff
    [escalated] = h.sink.of(RecordKind.ESCALATED)
    assert escalated.fields["OUTCOME"] == "breaker-open"
    assert escalated.fields["DETAIL"].count("failed: start-unit") == 3
    # open: it keeps observing (reports what it would do) and does not act
    h.sock.mkdir(exist_ok=True)
    h.runner.handle(PathChanged(str(h.sock), PathKind.DIRECTORY))
    await h.settle()
    assert units.calls.count(("start", "containerd.service")) == 3
    held = [r for r in h.sink.of(RecordKind.DECIDED) if r.fields.get("OUTCOME") == "held"]
    assert len(held) == 1
    assert h.outcomes()[-1][1] == "would-do"
    # a restarted daemon finds the breaker still open
    again = Runner(h.runner.policy, h.runner.ctx, Reporter(MemorySink()), h._spawn, store)
    assert again.states["socket-path-is-directory"].breaker.state == "open"
    # the operator's reset closes it, and the fault still there is acted on at once
    units.fail.clear()
    again.handle(UnitChanged("containerd.service", "activating", "auto-restart"))
    store.request_reset("socket-path-is-directory")
    before = len(units.calls)
    again.take_resets()
    await h.settle()
    assert again.states["socket-path-is-directory"].breaker.state == "closed"
    assert ("restart", "kubelet.service") in units.calls[before:], "a whole repair ran after the reset"


async def test_global_budget_holds_repairs(harness: Callable[..., Harness]) -> None:
    h = harness()
    h.runner.budget.repairs = 1
    h.sock.mkdir()
    h.runner.handle(PathChanged(str(h.sock), PathKind.DIRECTORY))
    await h.settle()
    h.sock.unlink()
    h.sock.mkdir()
    h.runner.handle(PathChanged(str(h.sock), PathKind.DIRECTORY))
    await h.settle()
    assert h.units.calls.count(("stop", "containerd.service")) == 1
    held = [r for r in h.sink.of(RecordKind.DECIDED) if r.fields.get("OUTCOME") == "held"]
    assert "budget" in held[0].message


async def test_failed_repair_is_retried_without_a_new_event(harness: Callable[..., Harness]) -> None:
    units = FakeUnits()
    units.fail.add(("stop", "containerd.service"))  # fails first: the directory stays
    h = harness(units=units)
    backoff = h.runner.states["socket-path-is-directory"].backoff
    backoff.initial, backoff.jitter = 0.05, 0.0
    h.sock.mkdir()
    h.runner.handle(PathChanged(str(h.sock), PathKind.DIRECTORY))
    await h.settle()
    # the failed stop is compensated: containerd is started again, systemd's Restart= in charge
    assert units.calls == [("stop", "containerd.service"), ("start", "containerd.service")]
    units.fail.clear()
    h.clock.advance(1.0)  # the backoff has passed on the wall clock too
    for _ in range(100):  # only the runner's own timer can start the retry: no event is sent
        await asyncio.sleep(0.01)
        if h.tasks:
            break
    await h.settle()
    assert units.calls.count(("stop", "containerd.service")) == 2
    assert h.sink.of(RecordKind.OUTCOME)[-1].fields["OUTCOME"] == "repaired"
    assert [
        r.fields["OUTCOME"] for r in h.sink.of(RecordKind.ACTION) if r.fields["ACTION"] == "compensate"
    ] == ["done"]


async def test_an_operators_stop_is_respected(harness: Callable[..., Harness]) -> None:
    from nodemedic.events import UnitChanged

    h = harness()
    h.runner.handle(UnitChanged("containerd.service", "inactive", "dead"))  # systemctl stop containerd
    h.sock.mkdir()
    h.runner.handle(PathChanged(str(h.sock), PathKind.DIRECTORY))
    await h.settle()
    assert h.units.calls == []
    [respected] = [r for r in h.sink.of(RecordKind.DECIDED) if r.fields.get("OUTCOME") == "operator-stop"]
    assert "stopped by someone else" in respected.message
    # the operator starts it again; it fails on the directory and says so: now nodemedic acts
    h.runner.handle(UnitChanged("containerd.service", "activating", "auto-restart"))
    h.runner.handle(
        JournalLine(
            "containerd.service", "containerd: failed to get listener for main endpoint: is a directory"
        )
    )
    await h.settle()
    assert ("stop", "containerd.service") in h.units.calls
    assert h.sink.of(RecordKind.OUTCOME)[-1].fields["OUTCOME"] == "repaired"


async def test_its_own_stop_is_not_taken_for_an_operators(harness: Callable[..., Harness]) -> None:
    from nodemedic.events import UnitChanged

    units = FakeUnits()
    units.fail.add(("start", "containerd.service"))
    h = harness(units=units)
    h.sock.mkdir()
    h.runner.handle(PathChanged(str(h.sock), PathKind.DIRECTORY))
    await h.settle()  # stopped containerd, then failed to start it
    h.runner.handle(UnitChanged("containerd.service", "inactive", "dead"))  # the event of our own stop
    assert "containerd.service" not in h.runner.stopped_by_others


async def test_at_start_up_it_waits_to_know_whether_an_operator_stopped_the_unit(tmp_path: Path) -> None:
    root = tmp_path / "run" / "containerd"
    (root / "containerd.sock").mkdir(parents=True)
    units, sink, tasks = FakeUnits({"containerd.service": "inactive"}), MemorySink(), []
    ctx = ActionContext(units, FakeProbe(), FakeClock(), tmp_path / "q")
    spawn = lambda coro: tasks.append(asyncio.get_running_loop().create_task(coro))  # noqa: E731
    runner = Runner(make_policy(root), ctx, Reporter(sink), spawn)
    runner.handle(PathChanged(str(root / "containerd.sock"), PathKind.DIRECTORY))  # inotify: first
    assert tasks == [], "no decision before D-Bus has said how containerd is"
    runner.handle(UnitChanged("containerd.service", "inactive", "dead"))  # an operator stopped it
    await asyncio.gather(*tasks)
    assert units.calls == []
    assert [r.fields["OUTCOME"] for r in sink.of(RecordKind.DECIDED)] == ["operator-stop"]


async def test_a_malformed_state_file_is_moved_aside(harness: Callable[..., Harness], tmp_path: Path) -> None:
    from nodemedic.engine.store import StateStore

    h = harness()
    state_dir = tmp_path / "state"
    state_dir.mkdir(exist_ok=True)
    (state_dir / "state.json").write_text(
        '{"version": 1, "rules": {"socket-path-is-directory": {"breaker": 7}}}'
    )
    Runner(h.runner.policy, h.runner.ctx, h.runner.report, h._spawn, StateStore(state_dir))
    assert list(state_dir.glob("state.json.corrupt-*"))
    assert h.sink.of(RecordKind.ERROR)[-1].fields["OUTCOME"] == "state-reset"
