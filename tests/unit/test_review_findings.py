"""Findings of the review of the engine restructure (issue 10), each shown by a test.

Each failed before its fix (they were committed marked xfail, strict): a reset waiting at start-up,
a held drop-in restart in observe mode, a reload's wait for the new main process, a thaw held by a
repair, a failing effect handler, a new event type's path and unit in the DETECTED record.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import pytest

from nodemedic.actions.base import ActionContext
from nodemedic.core.effects import Effect, Effects, Instant
from nodemedic.events import Event, FileChanged, UnitChanged
from nodemedic.executor import Executor
from nodemedic.policy.load import parse_policy
from nodemedic.policy.model import TriggerModel
from nodemedic.report import MemorySink, RecordKind, Reporter
from nodemedic.store import StateStore

from .fakes import FakeClock, FakeProbe, FakeUnits
from .test_sighup_guard import GOOD, UNIT, FakeSystemd, Setup, write_status
from .test_sighup_guard import make as make  # the fixture: a Setup with the guard registered

pytestmark = pytest.mark.unit

Make = Callable[..., Setup]


def _spawner(tasks: list[asyncio.Task[None]]) -> Callable[[Any], None]:
    def spawn(coro: Any) -> None:
        tasks.append(asyncio.get_running_loop().create_task(coro))

    return spawn


async def _settle(tasks: list[asyncio.Task[None]]) -> None:
    while tasks:
        await tasks.pop(0)


# ---- 1. a reset taken at start-up -----------------------------------------------------------------


async def test_a_reset_requested_while_nodemedic_was_down_acts_at_the_next_start(tmp_path: Path) -> None:
    """`nodemedic reset RULE` says the request is taken "at its next reload or start, running or
    not". The old Runner spawned the repair at construction; the Executor must too."""
    fault = tmp_path / "run" / "sock"
    fault.mkdir(parents=True)  # the fault is still there
    policy = parse_policy(
        {
            "daemon": {"mode": "enforce", "state_dir": str(tmp_path / "state")},
            "rule": [
                {
                    "name": "r",
                    "trigger": [{"source": "path", "paths": [str(fault)], "kind": "directory"}],
                    "confirm": {"paths": [str(fault)], "kind": "directory"},
                    "action": [{"do": "restart-unit", "unit": "kubelet.service"}],
                }
            ],
        }
    )
    store = StateStore(tmp_path / "state")
    store.request_reset("r")
    units = FakeUnits()
    tasks: list[asyncio.Task[None]] = []
    ctx = ActionContext(units, FakeProbe(), FakeClock(), tmp_path / "q")
    Executor(policy, ctx, Reporter(MemorySink()), _spawner(tasks), store)
    await _settle(tasks)
    assert ("restart", "kubelet.service") in units.calls


# ---- 2. observe mode: a held drop-in restart --------------------------------------------------------


async def test_a_held_dropin_restart_is_not_done_once_the_daemon_observes(make: Make) -> None:
    s = make("coalesce", budget={"repairs": 1, "window": "60s"})
    s.ex.spend_budget(s.ex.now())  # a repair restarted containerd just now
    s.containerd_runs()  # pid 100, still dies on SIGHUP: the drop-in needs a restart
    await s.turn()
    assert s.dropin.exists()
    assert s.systemd.restarts == 0
    assert [r.fields["ACTION"] for r in s.with_outcome("held")] == ["sighup-dropin"]
    s.guard.replace(s.settings, "observe")  # the operator: hands off the node
    await s.turn()
    for _ in range(4):  # the budget's window passes; the held restart's timer fires
        s.advance(30)
        await s.turn()
    assert s.systemd.restarts == 0, "observe mode restarted containerd"


# ---- 3. the new main PID after a restart ------------------------------------------------------------


class SlowBus(FakeSystemd):
    """systemd as D-Bus tells it: after the SIGKILL containerd is "activating (auto-restart)" with
    no main PID, and the new process's "active" state is dispatched a moment after the restart
    job's JobRemoved (both are queued; the restart's wait can resume first)."""

    async def kill(self, unit: str, signal: int) -> None:
        await super().kill(unit, signal)
        self.emit(UnitChanged(UNIT, "activating", "auto-restart", main_pid=0))

    async def restart(self, unit: str, timeout: float) -> None:
        self.restarts += 1
        self.pid += 1
        write_status(self._proc, self.pid, ignores_hup=True)
        active = UnitChanged(UNIT, "active", "running", main_pid=self.pid)
        asyncio.get_running_loop().call_soon(self.emit, active)


async def test_a_reload_waits_for_the_new_main_process_not_for_any_change(make: Make) -> None:
    s = make("coalesce")
    bus = SlowBus(s.proc)
    bus.emit = s.ex.handle
    object.__setattr__(s.guard.parts, "systemd", bus)  # the guard's systemd (a frozen dataclass)
    write_status(s.proc, 100, ignores_hup=True)
    s.containerd_runs()
    await s.turn()
    s.config.write_bytes(GOOD + b"# a real change\n")
    s.handle(FileChanged(str(s.config)))
    s.advance(1)
    await s.turn()
    assert bus.restarts == 1
    (applied,) = s.with_outcome("reload-applied")
    assert "pid 101" in applied.message


# ---- 4. thawing waits for a repair ------------------------------------------------------------------


async def test_a_cooldown_ends_on_time_while_a_repair_runs(make: Make) -> None:
    s = make("throttle")
    s.containerd_runs()
    for _ in range(4):
        s.sighup()
    await s.turn()
    assert list(s.freezer.frozen_until) == ["/system.slice/toolkit.service"]
    async with s.lock:  # a repair runs (restarting containerd can take a minute)
        s.advance(301)  # the cool-down is over
        turn = asyncio.create_task(s.turn())
        # the thaw runs in a thread: a bounded real wait (ms when it does not wait for the lock)
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(asyncio.shield(turn), 1.0)
        thawed_in_time = s.freezer.frozen_until == {}
    await turn
    assert thawed_in_time, "the sender stayed frozen past its cool-down while the repair ran"


# ---- 5. one failing effect handler stops the other cores --------------------------------------------


@dataclass(frozen=True, slots=True)
class Boom(Effect):
    """An effect whose handler fails."""


class OneEffect:
    def handle(self, event: Event, now: Instant) -> Effects:
        return [Boom()]


class Seen:
    def __init__(self) -> None:
        self.events: list[Event] = []

    def handle(self, event: Event, now: Instant) -> Effects:
        self.events.append(event)
        return []


def test_a_failing_effect_handler_never_keeps_the_event_from_the_next_core(tmp_path: Path) -> None:
    sink = MemorySink()
    policy = parse_policy({"daemon": {"state_dir": str(tmp_path / "state")}})
    ctx = ActionContext(FakeUnits(), FakeProbe(), FakeClock(), tmp_path / "q")
    ex = Executor(policy, ctx, Reporter(sink), lambda coro: coro.close())

    def fails(_effect: Boom) -> None:
        raise OSError("a handler's I/O failed")

    ex.handlers[Boom] = fails
    seen = Seen()
    ex.add_core(OneEffect())
    ex.add_core(seen)
    event = UnitChanged("containerd.service", "active", "running", main_pid=1)
    with contextlib.suppress(OSError):  # today it escapes; the next core must still see the event
        ex.handle(event)
    assert seen.events == [event]
    assert any(r.fields.get("OUTCOME") == "internal-error" for r in sink.of(RecordKind.ERROR))


# ---- 6. item 3: a new kind of trigger, on a new kind of event ----------------------------------------


@dataclass(frozen=True, slots=True)
class ToyEvent:
    """A new source's event: names a path and a unit, as PathChanged and UnitChanged do."""

    path: str
    unit: str
    at: float = 0.0
    source: str = "toy"


class ToyTrigger(TriggerModel):
    served_by: ClassVar[str] = "toy"
    source: Literal["toy"] = "toy"

    def fires(self, event: Event) -> str | None:
        return f"toy at {event.path}" if isinstance(event, ToyEvent) else None

    def wants(self) -> frozenset[str]:
        return frozenset({"/run/toy"})


async def test_a_new_kind_of_event_has_its_path_and_unit_in_the_detected_record(tmp_path: Path) -> None:
    policy = parse_policy(
        {
            "daemon": {"state_dir": str(tmp_path / "state")},
            "rule": [{"name": "toy", "trigger": [{"source": "oom"}]}],
        }
    )
    rule = policy.rule[0].model_copy(update={"trigger": [ToyTrigger()]})
    policy = policy.model_copy(update={"rule": [rule]})
    sink = MemorySink()
    tasks: list[asyncio.Task[None]] = []
    ctx = ActionContext(FakeUnits(), FakeProbe(), FakeClock(), tmp_path / "q")
    ex = Executor(policy, ctx, Reporter(sink), _spawner(tasks))
    ex.handle(ToyEvent("/run/toy", "toy.service"))  # type: ignore[arg-type]
    await _settle(tasks)
    (detected,) = sink.of(RecordKind.DETECTED)
    assert (detected.fields.get("PATH"), detected.fields.get("UNIT")) == ("/run/toy", "toy.service")
