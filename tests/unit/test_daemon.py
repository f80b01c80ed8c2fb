"""The daemon's lifecycle with its sources and systemd faked: sd_notify, watchdog, reload, shutdown."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

import pytest

from nodemedic.actions.base import ActionContext
from nodemedic.app import App
from nodemedic.daemon import Daemon
from nodemedic.errors import SourceFailedError
from nodemedic.events import Event
from nodemedic.executor import Executor
from nodemedic.policy.load import load_policy
from nodemedic.report import MemorySink, RecordKind, Reporter

from .fakes import FakeClock, FakeProbe, FakeUnits

pytestmark = pytest.mark.unit
SHIPPED = Path(__file__).parents[2] / "policy" / "policy.toml"
TURNS = 10_000  # far more than any step below needs (tens)


class FakeSystemd:
    def __init__(self) -> None:
        self.connected = asyncio.Event()
        self.closed = False

    async def run(self) -> None:
        self.connected.set()
        await asyncio.Future()

    async def close(self) -> None:
        self.closed = True


def make_app(policy_path: Path, sink: MemorySink) -> App:
    policy = load_policy(policy_path)
    report = Reporter(sink)
    systemd = FakeSystemd()
    ctx = ActionContext(FakeUnits(), FakeProbe(), FakeClock(), policy_path.parent / "q")
    events: asyncio.Queue[Event] = asyncio.Queue()
    return App(
        policy=policy,
        policy_path=policy_path,
        report=report,
        events=events,
        sources={"dbus": systemd.run},
        systemd=systemd,  # type: ignore[arg-type]
        executor=Executor(policy, ctx, report, lambda coro: None),
        repairs=set(),
    )


async def until(predicate: Any) -> None:
    """Let the loop turn until ``predicate`` holds. Every step the daemon takes here (a reload, a
    record, a watchdog ping) is a few turns of the loop away, so a bounded count of turns, not a
    wall-clock wait, says it never came."""
    for _ in range(TURNS):
        if predicate():
            return
        await asyncio.sleep(0)
    raise AssertionError(f"still not true after {TURNS} turns of the loop")


async def test_lifecycle(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "2")  # pings every microsecond: every turn or so
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    policy = tmp_path / "policy.toml"
    policy.write_text(SHIPPED.read_text())
    sink, notes = MemorySink(), []
    app = make_app(policy, sink)
    shutdown, reload = asyncio.Event(), asyncio.Event()
    task = asyncio.create_task(Daemon(app, shutdown, reload, notify=notes.append).run())

    await until(lambda: notes.count("WATCHDOG=1") >= 3)
    assert any(n.startswith("READY=1") for n in notes)
    assert sink.of(RecordKind.DAEMON)[0].fields["OUTCOME"] == "started"

    policy.write_text(SHIPPED.read_text().replace('do = "stop-unit"', 'do = "remove-dir"'))
    reload.set()
    await until(lambda: sink.of(RecordKind.ERROR))
    assert "unknown action 'remove-dir'" in sink.of(RecordKind.ERROR)[0].message

    policy.write_text(SHIPPED.read_text().replace('name = "socket-path-is-directory"', 'name = "renamed"'))
    reload.set()
    await until(lambda: app.executor.policy.rule[0].name == "renamed")
    assert "RELOADING=1" in notes

    shutdown.set()
    await asyncio.wait_for(task, 5)
    assert "STOPPING=1" in notes
    assert app.systemd.closed
    assert sink.records[-1].fields["OUTCOME"] == "stopped"


async def test_a_dead_source_stops_the_daemon(tmp_path: Path) -> None:
    policy = tmp_path / "policy.toml"
    policy.write_text(SHIPPED.read_text())
    sink = MemorySink()
    app = make_app(policy, sink)

    async def broken() -> None:
        raise OSError("inotify: too many watches")

    app.sources["inotify"] = broken
    with pytest.raises(SourceFailedError):  # cli.py turns it into exit status 1
        await Daemon(app, asyncio.Event(), asyncio.Event(), notify=lambda s: None).run()
    [error] = sink.of(RecordKind.ERROR)
    assert "inotify stopped" in error.message


async def test_a_source_with_nothing_to_watch_ends_quietly(tmp_path: Path) -> None:
    policy = tmp_path / "policy.toml"
    policy.write_text(SHIPPED.read_text())
    sink, notes = MemorySink(), []
    app = make_app(policy, sink)

    async def idle() -> None:
        return  # e.g. inotify with no paths in the policy

    app.sources["inotify"] = idle
    shutdown = asyncio.Event()
    task = asyncio.create_task(Daemon(app, shutdown, asyncio.Event(), notify=notes.append).run())
    await until(lambda: any(n.startswith("READY=1") for n in notes))
    for _ in range(100):  # the main loop sees the source end, and goes on
        await asyncio.sleep(0)
    assert not task.done()
    shutdown.set()
    await asyncio.wait_for(task, 5)
    assert sink.of(RecordKind.ERROR) == []


async def test_reload_keeps_the_policy_in_force_whatever_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A hostile or broken file, or a bug in loading, is refused with a record; the daemon lives on."""
    from nodemedic import daemon as daemon_module

    policy = tmp_path / "policy.toml"
    policy.write_text(SHIPPED.read_text())
    sink, notes = MemorySink(), []
    app = make_app(policy, sink)
    in_force = app.executor.policy
    shutdown, reload = asyncio.Event(), asyncio.Event()
    task = asyncio.create_task(Daemon(app, shutdown, reload, notify=notes.append).run())
    await until(lambda: any(n.startswith("READY=1") for n in notes))

    hostile = [
        b"[daemon]\nwatch_units = " + b"[" * 2000 + b"]" * 2000 + b"\n",
        b"[daemon.budget]\nrepairs = " + b"9" * 5000 + b"\n",
        b"[daemon.budget]\nwindow = nan\n",
        b"# \xff\n",
    ]
    for n, text in enumerate(hostile, 1):
        policy.write_bytes(text)
        reload.set()
        await until(lambda n=n: len(sink.of(RecordKind.ERROR)) == n)  # type: ignore[misc]
        assert sink.of(RecordKind.ERROR)[-1].fields["DETAIL"].split(":")[0].isdigit()
    policy.unlink()
    os.mkfifo(policy)
    reload.set()
    await until(lambda: len(sink.of(RecordKind.ERROR)) == len(hostile) + 1)
    assert "not a regular file" in sink.of(RecordKind.ERROR)[-1].fields["DETAIL"]

    def broken(path: Path) -> None:
        raise RuntimeError("a bug in loading")

    monkeypatch.setattr(daemon_module, "load_policy", broken)
    reload.set()
    await until(lambda: len(sink.of(RecordKind.ERROR)) == len(hostile) + 2)
    record = sink.of(RecordKind.ERROR)[-1]
    assert record.fields["OUTCOME"] == "refused"
    assert record.fields["DETAIL"] == "internal error: RuntimeError('a bug in loading')"
    assert not task.done()
    assert app.executor.policy is in_force
    shutdown.set()
    await asyncio.wait_for(task, 5)


async def test_reload_keeps_the_policy_when_it_is_removed_or_linked_to_a_public_folder(
    tmp_path: Path,
) -> None:
    """Fault matrix item 5 (issue 12): the old policy stays, and the record says why."""
    if os.geteuid() != 0:
        pytest.skip("needs root (the policy must be root's)")
    folder = tmp_path / "etc"
    folder.mkdir(mode=0o755)
    policy = folder / "policy.toml"
    policy.write_text(SHIPPED.read_text())
    policy.chmod(0o644)
    sink, notes = MemorySink(), []
    app = make_app(policy, sink)
    in_force = app.executor.policy
    shutdown, reload = asyncio.Event(), asyncio.Event()
    task = asyncio.create_task(Daemon(app, shutdown, reload, notify=notes.append).run())
    await until(lambda: any(n.startswith("READY=1") for n in notes))
    kept = policy.with_name("kept.toml")
    policy.rename(kept)
    reload.set()
    await until(lambda: len(sink.of(RecordKind.ERROR)) == 1)
    removed = sink.of(RecordKind.ERROR)[0]
    assert (removed.fields["OUTCOME"], removed.fields["DETAIL"]) == ("refused", "file not found")
    assert "the policy in force stays" in removed.message
    public = tmp_path / "tmp"
    public.mkdir()
    public.chmod(0o1777)
    planted = public / "policy.toml"
    planted.write_text(SHIPPED.read_text())
    policy.symlink_to(planted)
    reload.set()
    await until(lambda: len(sink.of(RecordKind.ERROR)) == 2)
    linked = sink.of(RecordKind.ERROR)[1]
    assert linked.fields["OUTCOME"] == "refused"
    assert f"directory {public} is writable by group or others" in linked.fields["DETAIL"]
    assert app.executor.policy is in_force
    policy.unlink()
    kept.rename(policy)
    reload.set()
    await until(lambda: any(r.fields.get("OUTCOME") == "reloaded" for r in sink.of(RecordKind.DAEMON)))
    assert not task.done()
    shutdown.set()
    await asyncio.wait_for(task, 5)


async def test_damaged_state_files_are_reported_at_start_up(tmp_path: Path) -> None:
    from nodemedic import store as state
    from nodemedic.sources import journal

    ours, elsewhere = tmp_path / "state" / "journal.cursor", tmp_path / "other" / "journal.cursor"
    for cursor in (ours, elsewhere):  # the other: another daemon's (a test's), not reported here
        cursor.parent.mkdir()
        cursor.write_bytes(b"\x00\x00 half a block")
        assert state.load_checked(cursor, journal._checked_cursor) is None
    policy = tmp_path / "policy.toml"
    policy.write_text(
        SHIPPED.read_text().replace('state_dir = "/var/lib/nodemedic"', f'state_dir = "{ours.parent}"')
    )
    sink, notes = MemorySink(), []
    app = make_app(policy, sink)
    shutdown, reload = asyncio.Event(), asyncio.Event()
    task = asyncio.create_task(Daemon(app, shutdown, reload, notify=notes.append).run())
    await until(lambda: any(n.startswith("READY=1") for n in notes))
    [record] = [r for r in sink.of(RecordKind.ERROR) if r.fields.get("OUTCOME") == "state-reset"]
    assert record.fields["PATH"].startswith(f"{ours}.corrupt-")
    shutdown.set()
    await asyncio.wait_for(task, 5)
    assert [s.path for s in state.take_set_aside(tmp_path)] == [str(elsewhere)]
