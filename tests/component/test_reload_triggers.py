"""A reload serves every trigger of the new policy (issue 10, defect 6a).

The daemon runs with the policy's own sources (``App.policy_sources``: real inotify on a short
temporary folder, the real /proc, a fake containerd probe) and starts with a policy that has no
trigger of a kind; a reload adds one rule with such a trigger, then the fault happens for real and
the test waits (bounded) until the event reaches the dispatch and fires the new rule. Before the
fix a reload said "reloaded" but no source served an added fds, pressure, oom or file trigger.
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, get_args

import pytest

from nodemedic.actions.base import ActionContext
from nodemedic.app import App, Wiring
from nodemedic.clock import MonotonicClock
from nodemedic.daemon import Daemon
from nodemedic.errors import ProbeError
from nodemedic.events import (
    Event,
    FdUsage,
    FileChanged,
    GrpcStreamsSetting,
    OomKills,
    PathChanged,
    PressureSeen,
    ProbeFailed,
    SocketModeSeen,
    VersionSeen,
)
from nodemedic.executor import Executor, placeholders
from nodemedic.policy.load import load_policy
from nodemedic.policy.match import match
from nodemedic.policy.model import AnyTrigger, OomTrigger
from nodemedic.ports import UnitState
from nodemedic.report import MemorySink, Record, RecordKind, Reporter
from nodemedic.sources.resources import ResourceWatch

from .helpers import ConnectedSystemd

pytestmark = pytest.mark.component

WAIT = 5.0  # bounds a wait for inotify or a reading every 100 ms; measures nothing
POLL = 0.02
ADDED = "added"  # the rule a reload adds

HEAD = """
[daemon]
mode = "observe"
state_dir = "{tmp}/state"

[daemon.probe]
interval = "100ms"
timeout = "1s"

[daemon.resources]
interval = "100ms"

[[rule]]
name = "containerd-failed"
trigger = [{ source = "unit", unit = "containerd.service", active_state = ["failed"] }]
"""

RULE = """
[[rule]]
name = "{name}"
trigger = [{trigger}]
"""


class Probe:
    """containerd's Version API: answers a version with a known bug, or fails once told to."""

    def __init__(self) -> None:
        self.failing = False

    async def version(self, socket: str, timeout: float) -> str:
        if self.failing:
            raise ProbeError(f"containerd Version on {socket}: UNAVAILABLE")
        return "1.6.20"


class Units:
    """systemd as the actions see it: the rules here only report, so nothing may be asked."""

    async def state(self, unit: str) -> UnitState:
        raise AssertionError(f"a report-only rule asked for {unit}'s state")

    async def stop(self, unit: str, timeout: float) -> None:
        raise AssertionError(f"a report-only rule stopped {unit}")

    async def start(self, unit: str, timeout: float) -> None:
        raise AssertionError(f"a report-only rule started {unit}")

    async def restart(self, unit: str, timeout: float) -> None:
        raise AssertionError(f"a report-only rule restarted {unit}")

    async def kill(self, unit: str, signal: int) -> None:
        raise AssertionError(f"a report-only rule killed {unit}")


@dataclass
class Node:
    """A daemon under test and what it said and saw."""

    app: App
    daemon: Daemon
    reload: asyncio.Event
    policy_path: Path
    sink: MemorySink
    seen: list[Event]  # every event the dispatch handed to its observers, in order
    probe: Probe


def policy_text(tmp: Path, *rules: tuple[str, str]) -> str:
    """The policy: HEAD and ``rules`` (name, trigger), ``{tmp}`` replaced by the test's folder."""
    added = "".join(RULE.replace("{name}", name).replace("{trigger}", trigger) for name, trigger in rules)
    return (HEAD + added).replace("{tmp}", str(tmp))


def make_app(policy_path: Path, sink: MemorySink, probe: Probe, seen: list[Event]) -> App:
    """As build_app wires it, less D-Bus, the journal and the SIGHUP guard; the policy's own
    sources come from ``App.policy_sources``, as at a reload."""
    policy = load_policy(policy_path)
    report = Reporter(sink)
    clock = MonotonicClock()
    events: asyncio.Queue[Event] = asyncio.Queue()
    ctx = ActionContext(Units(), probe, clock, policy_path.parent / "quarantine")
    systemd = ConnectedSystemd()
    repairs: set[asyncio.Task[None]] = set()  # the daemon waits for these at shutdown

    def spawn(coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        repairs.add(task)
        task.add_done_callback(repairs.discard)

    executor = Executor(policy, ctx, report, spawn)
    app = App(policy, policy_path, report, events, {"dbus": systemd.run}, systemd, executor, repairs)  # type: ignore[arg-type]
    app.placeholders = placeholders.register(executor, policy)  # as build_app: a reload may turn it on
    # containerd's main process is this one: its fds and its cgroup are read from the real /proc
    app.wiring = Wiring(events.put_nowait, clock, probe, report, lambda unit: os.getpid(), None)
    app.sources.update(app.policy_sources(policy))
    app.observers.append(seen.append)
    return app


@asynccontextmanager
async def running(tmp: Path, text: str) -> AsyncIterator[Node]:
    (tmp / "state").mkdir(exist_ok=True)
    policy_path = tmp / "policy.toml"
    policy_path.write_text(text)
    sink, probe, seen = MemorySink(), Probe(), list[Event]()
    app = make_app(policy_path, sink, probe, seen)
    shutdown, reload = asyncio.Event(), asyncio.Event()
    daemon = Daemon(app, shutdown, reload, notify=lambda state: None)
    task = asyncio.create_task(daemon.run())
    node = Node(app, daemon, reload, policy_path, sink, seen, probe)
    try:
        await until(lambda: outcomes(node, "started"), "the daemon to start")
        yield node
    finally:
        shutdown.set()
        await asyncio.wait_for(task, WAIT)


def outcomes(node: Node, outcome: str) -> list[Record]:
    return [r for r in node.sink.of(RecordKind.DAEMON) if r.fields.get("OUTCOME") == outcome]


async def until(predicate: Callable[[], object], what: str, step: Callable[[], None] = lambda: None) -> None:
    """Poll ``predicate`` (doing ``step`` before each look) until it holds, at most WAIT seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + WAIT
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError(f"waited {WAIT:g}s for {what}")
        step()
        await asyncio.sleep(POLL)


async def reload_with(node: Node, text: str) -> Record:
    """Write the new policy, ask for a reload; the reloaded record."""
    before = len(outcomes(node, "reloaded"))
    node.policy_path.write_text(text)
    node.reload.set()
    await until(lambda: len(outcomes(node, "reloaded")) > before, "the reload")
    return outcomes(node, "reloaded")[-1]


def fired(node: Node, kind: type[Event]) -> list[Event]:
    """The events of ``kind`` the dispatch saw that fire the added rule."""
    rules = node.app.policy.rule
    return [
        e for e in node.seen if isinstance(e, kind) and any(m.rule.name == ADDED for m in match(rules, e))
    ]


def detected(node: Node) -> list[Record]:
    return [r for r in node.sink.of(RecordKind.DETECTED) if r.fields.get("RULE") == ADDED]


def host_pressure_readable() -> bool:
    for path in (Path("/proc/pressure/memory"), Path("/sys/fs/cgroup/memory.pressure")):
        try:
            return "avg10=" in path.read_text()
        except OSError:  # missing, or PSI off (EOPNOTSUPP)
            continue
    return False


# The faults, done once the reload is in force, and again at each look (all idempotent): a
# watcher built at the reload may not have armed inotify yet when the first write lands.
def make_dir(tmp: Path, node: Node) -> None:
    (tmp / "containerd.sock").mkdir(exist_ok=True)


def write_config(tmp: Path, node: Node) -> None:
    (tmp / "config.toml").write_text("version = 2\n\n[grpc]\n  max_concurrent_streams = 2\n")


def stop_answering(tmp: Path, node: Node) -> None:
    node.probe.failing = True


def open_socket_0600(tmp: Path, node: Node) -> None:
    path = tmp / "api.sock"
    if not path.exists():
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.bind(str(path))
        path.chmod(0o600)


def nothing(tmp: Path, node: Node) -> None:
    """The fault is already there: this process has fds open, the host has memory pressure >= 0,
    the probe answers 1.6.20."""


@dataclass(frozen=True)
class Kind:
    trigger: str  # the added rule's trigger, an inline TOML table ({tmp}: the test's folder)
    source: str  # the source built again at the reload
    event: type[Event]
    fault: Callable[[Path, Node], None]


KINDS = {
    "path": Kind(
        '{ source = "path", paths = ["{tmp}/containerd.sock"], kind = "directory" }',
        "inotify",
        PathChanged,
        make_dir,
    ),
    "file": Kind('{ source = "file", path = "{tmp}/config.toml" }', "files", FileChanged, write_config),
    "probe": Kind('{ source = "probe", failures = 1 }', "probe", ProbeFailed, stop_answering),
    "fds": Kind('{ source = "fds", fraction = 1e-9 }', "resources", FdUsage, nothing),
    "pressure": Kind(
        '{ source = "pressure", resource = "memory", scope = "host", above = 0.0 }',
        "resources",
        PressureSeen,
        nothing,
    ),
    "socket-mode": Kind(
        '{ source = "socket-mode", path = "{tmp}/api.sock", mode = "0660", '
        + f"uid = {os.getuid()}, gid = {os.getgid()} }}",
        "resources",
        SocketModeSeen,
        open_socket_0600,
    ),
    "version": Kind(
        '{ source = "version", known_bugs = [{ first = "1.6.0", fixed = "1.6.38", reason = "bug" }] }',
        "resources",
        VersionSeen,
        nothing,
    ),
    "grpc-streams": Kind(
        '{ source = "grpc-streams", config = "{tmp}/config.toml" }',
        "resources",
        GrpcStreamsSetting,
        write_config,
    ),
}
NO_FAKE_OOM = (
    "an OOM kill cannot be faked: [daemon.resources] has no proc or cgroup root setting (the "
    "watcher reads the real /sys/fs/cgroup), and a real one needs a cgroup2 group of our own; "
    "test_a_reload_adding_an_oom_trigger_builds_the_resource_watch_with_it checks the rebuild"
)
PARAMS = [
    *(pytest.param(name, id=name) for name in KINDS),
    pytest.param("oom", id="oom", marks=pytest.mark.skip(reason=NO_FAKE_OOM)),
]


@pytest.mark.parametrize("name", PARAMS)
async def test_a_reload_adding_a_trigger_serves_it(name: str, short_tmp: Path) -> None:
    kind = KINDS[name]
    if name == "pressure" and not host_pressure_readable():
        pytest.skip("this kernel has no PSI (/proc/pressure/memory nor the cgroup2 root's)")
    async with running(short_tmp, policy_text(short_tmp)) as node:
        # inotify is built for any policy (and ends at once with no paths); the others are not
        assert kind.source not in node.daemon.tasks or kind.source == "inotify"
        record = await reload_with(node, policy_text(short_tmp, (ADDED, kind.trigger)))

        def fault() -> None:
            kind.fault(short_tmp, node)

        fault()
        await until(lambda: fired(node, kind.event), f"a {kind.event.__name__} firing {ADDED}", fault)
        assert not node.daemon.tasks[kind.source].done()
        # the operator is told which source the reload built again
        assert kind.source in record.fields.get("DETAIL", "").split(), record.message
        assert "followed again: " in record.message
        # and the rules' core, fed by the executor, opened an incident for the added rule
        await until(lambda: detected(node), f"a DETECTED record of {ADDED}")


async def test_a_reload_adding_an_oom_trigger_builds_the_resource_watch_with_it(short_tmp: Path) -> None:
    async with running(short_tmp, policy_text(short_tmp)) as node:
        assert "resources" not in node.daemon.tasks
        record = await reload_with(node, policy_text(short_tmp, (ADDED, '{ source = "oom" }')))
        assert "resources" in record.fields.get("DETAIL", "").split()
        watch = getattr(node.app.sources["resources"], "__self__", None)
        assert isinstance(watch, ResourceWatch)
        # no event can show it here (see NO_FAKE_OOM): what the watch was built to read can
        assert [type(t) for t in watch._triggers] == [OomTrigger]
        task = node.daemon.tasks["resources"]
        await asyncio.sleep(0.3)  # three readings
        assert not task.done()
        [trigger] = node.app.policy.rule[-1].trigger
        if _own_memory_events().exists():  # a cgroup2 host: the reading itself reaches the dispatch
            await until(lambda: any(isinstance(e, OomKills) for e in node.seen), "an OomKills reading")
            assert all(trigger.reads(e) for e in node.seen if isinstance(e, OomKills))


def _own_memory_events() -> Path:
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        if line.startswith("0::"):
            return Path("/sys/fs/cgroup") / line[3:].lstrip("/") / "memory.events"
    return Path("/nonexistent/memory.events")


async def test_a_reload_that_changes_no_source_restarts_none(short_tmp: Path) -> None:
    rules = [(name, kind.trigger) for name, kind in KINDS.items() if name not in ("pressure", "socket-mode")]
    async with running(short_tmp, policy_text(short_tmp, *rules)) as node:
        make_dir(short_tmp, node)
        await until(lambda: any(isinstance(e, PathChanged) for e in node.seen), "inotify's first look")
        before = {name: node.daemon.tasks[name] for name in ("inotify", "files", "probe", "resources")}
        # new rule names and a journal rule: nothing those four sources serve changes
        renamed = [(f"{name}-renamed", trigger) for name, trigger in rules]
        journal = ("journal-rule", '{ source = "journal", pattern = "^level=fatal" }')
        record = await reload_with(node, policy_text(short_tmp, *renamed, journal))
        assert record.fields.get("DETAIL", "") == ""
        assert "followed again" not in record.message
        await asyncio.sleep(0.2)
        for name, task in before.items():
            assert node.daemon.tasks[name] is task, f"{name} was restarted"
            assert not task.done(), f"{name} stopped"


async def test_a_reload_removing_the_last_file_trigger_stops_the_files_source(short_tmp: Path) -> None:
    config = short_tmp / "config.toml"
    config.write_text("version = 2\n")
    async with running(short_tmp, policy_text(short_tmp, (ADDED, KINDS["file"].trigger))) as node:
        files = node.daemon.tasks["files"]
        record = await reload_with(node, policy_text(short_tmp))
        assert record.fields.get("DETAIL", "").split() == ["files"]
        assert "files" not in node.daemon.tasks
        assert "files" not in node.app.sources
        await until(files.done, "the files source to stop")
        assert files.cancelled()
        seen = len(node.seen)
        config.write_text("version = 2\n# edited\n")
        await asyncio.sleep(0.2)
        assert not [e for e in node.seen[seen:] if isinstance(e, FileChanged)]


def test_the_kinds_cover_every_trigger_a_reload_builds_a_source_for() -> None:
    """Each trigger kind served by a policy source (not the journal's or D-Bus') is a case here,
    so a new kind of trigger gets a reload test."""
    served = {
        get_args(t.model_fields["source"].annotation)[0]
        for t in get_args(AnyTrigger)
        if t.served_by not in ("journal", "dbus")
    }
    assert served == {*KINDS, "oom"}
