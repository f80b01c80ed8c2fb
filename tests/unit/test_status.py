"""The status snapshot (nodemedic.snapshot) and `nodemedic status` (tools/status.py).

The tracker is fed records; ``daemon_status`` reads a real Executor (test_runner's Harness: real
files in a tmp dir, systemd and containerd faked) after a repair and after its breaker opened;
``offline_status`` reads state files written here; the command runs through ``cli.main`` with the
D-Bus call faked at its edge (``ask_daemon``)."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import subprocess
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from dbus_fast import Message, MessageType

from nodemedic import __version__, cli
from nodemedic import snapshot as status_mod
from nodemedic.actions.freezer import Freezer
from nodemedic.app import App
from nodemedic.events import PathChanged, PathKind, UnitChanged
from nodemedic.executor import Executor
from nodemedic.policy.load import parse_policy_text
from nodemedic.report import Record, RecordKind
from nodemedic.snapshot import StatusTracker, daemon_status, iso, offline_status
from nodemedic.store import StateStore
from nodemedic.tools import status as tool

from .fakes import FakeClock, FakeUnits
from .test_runner import Harness

pytestmark = pytest.mark.unit
RULE = "socket-path-is-directory"
SHIPPED = Path(__file__).parents[2] / "policy" / "policy.toml"


def record(kind: RecordKind, **fields: str) -> Record:
    return Record(kind, "words", fields)


# ---- the tracker ------------------------------------------------------------------------------------


def test_tracker_keeps_the_last_trigger_and_outcome_of_each_rule() -> None:
    clock = FakeClock()
    tracker = StatusTracker(clock)
    assert tracker.started_wall == clock.wall()
    tracker(record(RecordKind.DETECTED, RULE="a", TRIGGER="first", INCIDENT="i1"))
    clock.advance(5)
    tracker(record(RecordKind.DETECTED, RULE="a", TRIGGER="second", INCIDENT="i2"))
    tracker(record(RecordKind.DECIDED, RULE="a", OUTCOME="repair", INCIDENT="i2"))  # not kept
    tracker(record(RecordKind.ACTION, RULE="a", OUTCOME="done", INCIDENT="i2"))  # not kept
    tracker(record(RecordKind.OUTCOME, RULE="a", OUTCOME="repaired", INCIDENT="i2", ELAPSED_MS="12"))
    tracker(record(RecordKind.DETECTED, RULE="b", TRIGGER="other", INCIDENT="j1"))
    tracker(record(RecordKind.DAEMON, OUTCOME="started"))  # no rule: nothing to keep
    assert tracker.detected["a"].field("TRIGGER") == "second"
    assert tracker.detected["a"].at == clock.wall()
    assert tracker.outcome["a"].field("OUTCOME") == "repaired"
    assert set(tracker.detected) == {"a", "b"}
    assert "b" not in tracker.outcome


def test_tracker_follows_the_guards_storms() -> None:
    clock = FakeClock()
    tracker = StatusTracker(clock)
    began = dict(RULE="sighup", OUTCOME="storm", SIGNALS="12", SENDERS="pod x (pid 7 sh)", INCIDENT="s1")
    tracker(record(RecordKind.DETECTED, **began))
    assert tracker.storm_began is not None
    assert tracker.storm_ended is None
    assert "sighup" not in tracker.detected, "a storm is the guard's, not a rule's last trigger"
    clock.advance(30)
    tracker(record(RecordKind.DETECTED, **{**began, "OUTCOME": "storm-ended", "SIGNALS": "40"}))
    assert tracker.storm_ended is not None
    assert tracker.storm_ended.at == clock.wall()
    tracker(record(RecordKind.DETECTED, **{**began, "INCIDENT": "s2"}))  # the next storm
    assert tracker.storm_ended is None


def test_policy_hash_is_taken_once_per_policy(tmp_path: Path) -> None:
    path = tmp_path / "policy.toml"
    path.write_text(SHIPPED.read_text())
    first = parse_policy_text(path.read_text())
    tracker = StatusTracker(FakeClock(), first, path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    path.write_text(SHIPPED.read_text() + "\n# edited, not reloaded\n")
    assert tracker.policy_sha256(first, path) == digest, "the hash of the file as loaded"
    reloaded = parse_policy_text(path.read_text())
    assert tracker.policy_sha256(reloaded, path) == hashlib.sha256(path.read_bytes()).hexdigest()


def test_the_daemons_own_records_date_the_start_and_hash_each_reload(tmp_path: Path) -> None:
    path = tmp_path / "policy.toml"
    path.write_text(SHIPPED.read_text())
    clock = FakeClock()
    tracker = StatusTracker(clock, parse_policy_text(path.read_text()), path)
    clock.advance(3)  # recovery, waiting for D-Bus: "started" is said once ready
    tracker(record(RecordKind.DAEMON, OUTCOME="started", VERSION=__version__))
    assert (tracker.started_wall, tracker.started_monotonic) == (clock.wall(), clock.now)
    path.write_text(SHIPPED.read_text() + "\n# reloaded\n")
    loaded = hashlib.sha256(path.read_bytes()).hexdigest()
    tracker(record(RecordKind.DAEMON, OUTCOME="reloaded", PATH=str(path)))
    path.write_text(SHIPPED.read_text() + "\n# edited after the reload\n")
    reloaded = parse_policy_text(SHIPPED.read_text())
    assert tracker.policy_sha256(reloaded, path) == loaded, "the file as the reload read it"
    clock.advance(9)
    tracker(record(RecordKind.DAEMON, OUTCOME="started"))  # said once per run: not moved
    assert tracker.started_monotonic == clock.now - 9


# ---- the running daemon -----------------------------------------------------------------------------


def app_of(h: Harness, policy_path: Path | None) -> App:
    """An App around the harness's executor, with the tracker registered as app.py does."""
    tracker = StatusTracker(h.clock, h.runner.policy, policy_path)
    h.runner.listeners.append(tracker)
    return App(
        policy=h.runner.policy,
        policy_path=policy_path,
        report=h.runner.reporter,
        events=asyncio.Queue(),
        sources={},
        systemd=None,  # type: ignore[arg-type]
        executor=h.runner,
        repairs=set(),
    )


def rule_of(snap: dict[str, Any], name: str = RULE) -> dict[str, Any]:
    [rule] = [r for r in snap["rules"] if r["name"] == name]
    return rule


@pytest.fixture
def policy_file(tmp_path: Path) -> Path:
    path = tmp_path / "policy.toml"
    path.write_text("# the policy the daemon loaded\n")
    return path


async def test_daemon_status_during_and_after_a_repair(
    harness: Callable[..., Harness], policy_file: Path
) -> None:
    h = harness()
    app = app_of(h, policy_file)
    h.clock.advance(90)
    h.sock.mkdir()
    h.runner.handle(PathChanged(str(h.sock), PathKind.DIRECTORY, at=h.clock.now))
    during = daemon_status(app)
    assert rule_of(during)["running"] is True
    await h.settle()
    snap = daemon_status(app)
    json.dumps(snap)  # what the D-Bus API sends
    assert snap["schema"] == 1
    assert (snap["running"], snap["why_not_running"]) == (True, None)
    assert (snap["version"], snap["mode"]) == (__version__, "enforce")
    assert snap["policy"] == {
        "path": str(policy_file),
        "sha256": hashlib.sha256(policy_file.read_bytes()).hexdigest(),
    }
    assert snap["started_at_epoch"] == 1_700_000_000.0 + 1000.0
    assert snap["started_at"] == "2023-11-14T22:30:00Z"
    assert snap["uptime_s"] == 90.0
    rule = rule_of(snap)
    [detected] = h.sink.of(RecordKind.DETECTED)
    [outcome] = h.sink.of(RecordKind.OUTCOME)
    assert rule["running"] is False
    assert rule["mode"] == "enforce"
    assert rule["last_trigger"]["trigger"] == detected.fields["TRIGGER"]
    assert rule["last_trigger"]["incident"] == detected.fields["INCIDENT"]
    assert rule["last_trigger"]["at_epoch"] == h.clock.wall()
    assert rule["last_repair"]["outcome"] == "repaired"
    assert rule["last_repair"]["incident"] == outcome.fields["INCIDENT"] == detected.fields["INCIDENT"]
    assert rule["last_repair"]["elapsed_ms"] == float(outcome.fields["ELAPSED_MS"])
    assert rule["breaker"]["state"] == "closed"
    assert rule["breaker"]["reopens_at"] is None
    assert rule["backoff"] == {"failures": 0, "not_before": None, "not_before_epoch": None}
    budget = snap["budget"]
    assert (budget["spent"], budget["left"], budget["next_free_at"]) == (1, budget["repairs"] - 1, None)
    assert snap["sighup"] == {"mode": "off", "storm": None}
    assert snap["frozen"] == []
    assert snap["errors"] == []


async def test_daemon_status_after_the_breaker_opened(
    harness: Callable[..., Harness], tmp_path: Path, policy_file: Path
) -> None:
    units = FakeUnits()
    units.fail.add(("start", "containerd.service"))
    h = harness(units=units)
    h.runner = Executor(
        h.runner.policy, h.runner.ctx, h.runner.reporter, h._spawn, StateStore(tmp_path / "state")
    )
    h.runner.handle(UnitChanged("containerd.service", "activating", "auto-restart"))
    app = app_of(h, policy_file)
    for _ in range(3):  # default breaker: 3 failures within 15 min
        h.sock.mkdir(exist_ok=True)
        h.runner.handle(PathChanged(str(h.sock), PathKind.DIRECTORY))
        await h.settle()
        h.clock.advance(400)  # past the backoff
    snap = daemon_status(app)
    rule = rule_of(snap)
    breaker = h.runner.states[RULE].breaker
    assert breaker.state == "open"
    assert rule["breaker"]["state"] == "open"
    assert rule["breaker"]["opened_at_epoch"] == breaker.opened_at
    assert rule["breaker"]["reopens_at_epoch"] == breaker.opened_at + breaker.cooldown
    assert rule["breaker"]["reopens_at"] == iso(breaker.opened_at + breaker.cooldown)
    # failures 400 s apart, read 400 s after the last: the first has left the 15 min window
    assert (rule["breaker"]["recent_failures"], rule["breaker"]["opens_after"]) == (2, 3)
    assert rule["last_repair"]["outcome"] == "not-repaired"
    assert rule["backoff"]["failures"] == 3
    assert snap["budget"]["spent"] == 3
    text = tool.render(snap)
    assert f"open until {rule['breaker']['reopens_at']} (2 failures)" in text
    # the same state, read back from state.json with the daemon stopped
    offline = offline_status(write_policy(tmp_path, state_dir=tmp_path / "state"), "stopped")
    assert rule_of(offline)["breaker"]["state"] == "open"
    assert rule_of(offline)["breaker"]["reopens_at_epoch"] == rule["breaker"]["reopens_at_epoch"]
    assert rule_of(offline)["last_repair"]["outcome"] == "not-repaired"
    assert rule_of(offline)["last_repair"]["incident"] is None


def test_budget_spent_says_when_a_repair_is_allowed_again(tmp_path: Path) -> None:
    state = tmp_path / "state"
    path = write_policy(tmp_path, state_dir=state, repairs=2)
    now = status_mod._wall_now()
    StateStore(state).save({"rules": {}, "budget": {"spent": [now - 7200, now - 600, now - 60]}})
    budget = offline_status(path)["budget"]
    assert (budget["repairs"], budget["window_s"], budget["spent"], budget["left"]) == (2, 3600.0, 2, 0)
    assert budget["next_free_at_epoch"] == pytest.approx(now - 600 + 3600)
    assert "2 of 2 repairs spent within 1h 00m; 0 left (next at" in tool.render(offline_status(path))


# ---- the daemon not running -------------------------------------------------------------------------


def write_policy(tmp_path: Path, *, state_dir: Path, mode: str = "enforce", repairs: int = 10) -> Path:
    """The shipped policy with the state directory, [daemon].mode and the budget's repairs given."""
    text = SHIPPED.read_text()
    text = text.replace('mode = "enforce"', f'mode = "{mode}"', 1)
    text = text.replace('state_dir = "/var/lib/nodemedic"', f'state_dir = "{state_dir}"', 1)
    text = text.replace("repairs = 10\n", f"repairs = {repairs}\n", 1)
    path = tmp_path / "policy.toml"
    path.write_text(text)
    return path


def test_offline_status_from_the_state_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    state = tmp_path / "state"
    path = write_policy(tmp_path, state_dir=state, mode="observe")
    core_snapshot = {
        "rules": {
            RULE: {
                "breaker": {
                    "state": "closed",
                    "opened_at": 0.0,
                    "recent_failures": [],
                    "history": [[100.0, True, "repaired"]],
                },
                "backoff": {"failures": 0, "not_before": 0.0},
            },
            "containerd-hung": {
                "breaker": {
                    "state": "open",
                    "opened_at": 4e9,
                    "recent_failures": [4e9 - 5, 4e9 - 1, 4e9],
                    "history": [],
                },
                "backoff": {"failures": 3, "not_before": 4e9 + 10},
            },
        },
        "budget": {"spent": []},
    }
    StateStore(state).save(core_snapshot)
    cgroups = fake_cgroups(tmp_path, monkeypatch, "/system.slice/noisy.service")
    Freezer(cgroups, state / "frozen.json").freeze("/system.slice/noisy.service", 4e9)
    snap = offline_status(path, "no process owns io.nodemedic1 on the system bus")
    json.dumps(snap)
    assert (snap["running"], snap["why_not_running"]) == (
        False,
        "no process owns io.nodemedic1 on the system bus",
    )
    assert snap["mode"] == "observe"
    assert snap["policy"] == {"path": str(path), "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
    assert (snap["started_at"], snap["uptime_s"]) == (None, None)
    repaired, hung = rule_of(snap), rule_of(snap, "containerd-hung")
    assert (repaired["running"], repaired["last_trigger"]) == (None, None), "what only the daemon knows"
    assert repaired["last_repair"] == {
        "at": iso(100.0),
        "at_epoch": 100.0,
        "outcome": "repaired",
        "incident": None,
        "elapsed_ms": None,
    }
    assert hung["breaker"]["state"] == "open"
    assert hung["breaker"]["reopens_at_epoch"] == 4e9 + cooldown_of(path, "containerd-hung")
    assert hung["backoff"] == {"failures": 3, "not_before": iso(4e9 + 10), "not_before_epoch": 4e9 + 10}
    assert hung["last_repair"] is None
    assert snap["budget"]["spent"] == 0
    assert snap["sighup"]["storm"] is None
    assert snap["frozen"] == [
        {"cgroup": "/system.slice/noisy.service", "until": iso(4e9), "until_epoch": 4e9}
    ]
    assert snap["errors"] == []


def cooldown_of(path: Path, name: str) -> float:
    [rule] = [r for r in parse_policy_text(path.read_text()).rule if r.name == name]
    return rule.breaker.cooldown


def fake_cgroups(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, *cgroups: str) -> Path:
    """A cgroup2 tree with these leaf cgroups, each with a process; offline_status's freezer reads it."""
    root = tmp_path / "cgroup"
    (root).mkdir()
    (root / "cgroup.controllers").write_text("")
    for cg in cgroups:
        folder = root / cg.lstrip("/")
        folder.mkdir(parents=True)
        (folder / "cgroup.procs").write_text("4242\n")
        (folder / "cgroup.events").write_text("frozen 1\n")
    real = Freezer

    def freezer(*, registry: Path) -> Freezer:
        return real(root, registry, proc=tmp_path / "no-proc")

    monkeypatch.setattr(status_mod, "Freezer", freezer)
    return root


def test_offline_status_without_state_files(tmp_path: Path) -> None:
    path = write_policy(tmp_path, state_dir=tmp_path / "never-ran")
    snap = offline_status(path)
    assert all(r["breaker"]["state"] == "closed" and r["last_repair"] is None for r in snap["rules"])
    assert snap["budget"]["spent"] == 0
    assert snap["frozen"] == []
    assert snap["errors"] == []


def test_offline_status_names_what_it_could_not_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    state = tmp_path / "state"
    state.mkdir()
    (state / "state.json").write_text("{not json")
    path = write_policy(tmp_path, state_dir=state)
    snap = offline_status(path)
    [error] = snap["errors"]
    assert f"{state}/state.json unusable (" in error
    assert "the daemon sets it aside and starts with closed breakers" in error
    assert (state / "state.json").read_text() == "{not json", "status only reads: left for the daemon"
    assert rule_of(snap)["breaker"] is None
    monkeypatch.setattr(status_mod.os, "access", lambda *_a: False)  # not root: the folder is 0700
    snap = offline_status(path)
    assert snap["errors"] == [
        f"cannot read {state}/state.json and frozen.json: permission denied (run as root)"
    ]
    assert (rule_of(snap)["breaker"], rule_of(snap)["last_repair"], snap["frozen"]) == (None, None, None)
    assert snap["budget"]["spent"] is None
    text = tool.render(snap)
    assert "budget: 10 repairs within 1h 00m; spent unknown" in text
    assert "frozen cgroups: unknown" in text
    assert "note: cannot read" in text


async def test_daemon_status_shows_the_guard_its_storm_and_frozen_cgroups(
    harness: Callable[..., Harness], tmp_path: Path, policy_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    h = harness()
    app = app_of(h, policy_file)
    registry = tmp_path / "state" / "frozen.json"
    freezer = Freezer(fake_cgroups(tmp_path, monkeypatch, "/system.slice/toolkit.service"), registry)
    freezer.freeze("/system.slice/toolkit.service", h.clock.wall() + 60)
    stand_in: Any = SimpleNamespace(
        settings=SimpleNamespace(mode="throttle"), parts=SimpleNamespace(freezer=freezer)
    )
    app.guard = stand_in  # the guard's mode and freezer are all status reads of it
    storm = {
        "RULE": "sighup",
        "OUTCOME": "storm",
        "SIGNALS": "9",
        "SENDERS": "pod gpu/toolkit (pid 7 sh)",
        "INCIDENT": "s1",
    }
    h.runner.report(RecordKind.DETECTED, "storm", **storm)
    guard = daemon_status(app)["sighup"]
    assert guard["mode"] == "throttle"
    assert guard["storm"] == {
        "state": "under-way",
        **{"began_at": iso(h.clock.wall()), "began_at_epoch": h.clock.wall()},
        **{"ended_at": None, "ended_at_epoch": None},
        "signals": 9,
        "senders": "pod gpu/toolkit (pid 7 sh)",
        "incident": "s1",
    }
    h.clock.advance(20)
    h.runner.report(
        RecordKind.DETECTED, "storm ended", **{**storm, "OUTCOME": "storm-ended", "SIGNALS": "30"}
    )
    snap = daemon_status(app)
    assert (snap["sighup"]["storm"]["state"], snap["sighup"]["storm"]["signals"]) == ("ended", 30)
    assert snap["sighup"]["storm"]["ended_at_epoch"] == h.clock.wall()
    assert snap["frozen"] == [
        {
            "cgroup": "/system.slice/toolkit.service",
            "until": iso(h.clock.wall() + 40),
            "until_epoch": h.clock.wall() + 40,
        }
    ]
    text = tool.render(snap)
    assert "sighup guard: throttle; last storm" in text
    assert f"frozen cgroups: /system.slice/toolkit.service (until {iso(h.clock.wall() + 40)})" in text
    # read beforehand (the D-Bus API reads it in a thread): given, not read again; None: unknown
    assert daemon_status(app, {"/a.scope": 5.0})["frozen"] == [
        {"cgroup": "/a.scope", "until": iso(5.0), "until_epoch": 5.0}
    ]
    assert daemon_status(app, None)["frozen"] is None
    registry.write_bytes(b"\xff\xfe not text")  # unreadable: named, the rest still shown
    snap = daemon_status(app)
    assert snap["frozen"] is None
    [error] = snap["errors"]
    assert error.startswith("frozen cgroups unknown:")


# ---- `nodemedic status` -------------------------------------------------------------------------------


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture
def daemon_down(monkeypatch: pytest.MonkeyPatch) -> None:
    def ask(_timeout: float) -> dict[str, Any]:
        raise tool.DaemonNotRunning("no process owns io.nodemedic1 on the system bus")

    monkeypatch.setattr(tool, "ask_daemon", ask)


async def test_status_of_the_running_daemon(
    harness: Callable[..., Harness],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    h = harness()
    (tmp_path / "policy.toml").write_text("# policy\n")
    h.clock.advance(3725)
    h.sock.mkdir()
    h.runner.handle(PathChanged(str(h.sock), PathKind.DIRECTORY))
    app = app_of(h, tmp_path / "policy.toml")
    await h.settle()
    snap = json.loads(json.dumps(daemon_status(app)))  # as it comes over D-Bus
    monkeypatch.setattr(tool, "ask_daemon", lambda _timeout: snap)
    assert cli.main(["status"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0] == f"nodemedic {__version__} running since {snap['started_at']} (up 0s), mode enforce"
    assert lines[1] == f"policy {tmp_path / 'policy.toml'} (sha256 {snap['policy']['sha256'][:12]})"
    header = lines[3].split()
    assert header == ["RULE", "MODE", "BREAKER", "LAST", "REPAIR"]
    [row] = [line for line in lines if line.startswith(RULE)]
    last = rule_of(snap)["last_repair"]
    assert row.split()[:3] == [RULE, "enforce", "closed"]
    assert row.endswith(f"repaired {last['at']}, {last['elapsed_ms']:.0f} ms")
    assert "budget: 1 of 10 repairs spent within 1h 00m; 9 left" in out
    assert "sighup guard: off; no storm seen since the start" in out
    assert "frozen cgroups: none" in out
    assert "\033[" not in out, "no colours when stdout is not a terminal"
    assert cli.main(["status", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == snap


def test_status_when_the_daemon_is_not_running(
    tmp_path: Path, daemon_down: None, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_policy(tmp_path, state_dir=tmp_path / "state")
    assert cli.main(["status", "--policy", str(path)]) == 1
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0] == "nodemedic is not running (no process owns io.nodemedic1 on the system bus)"
    assert lines[1].startswith(f"from its state files: mode enforce, policy {path} (sha256 ")
    assert "sighup guard: observe; storms are known only while the daemon runs" in lines
    [row] = [line for line in out.splitlines() if line.startswith(RULE)]
    assert row.split()[1:] == ["enforce", "closed", "none", "known"]
    assert cli.main(["status", "--policy", str(path), "--json"]) == 1
    snap = json.loads(capsys.readouterr().out)
    assert (snap["schema"], snap["running"]) == (1, False)
    assert snap["why_not_running"] == "no process owns io.nodemedic1 on the system bus"


def test_status_exit_2_when_nothing_can_be_read(
    tmp_path: Path, daemon_down: None, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["status", "--policy", str(tmp_path / "missing.toml")]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "nodemedic is not running (no process owns io.nodemedic1 on the system bus)" in captured.err
    assert "file not found" in captured.err


def test_status_exit_2_when_the_daemon_does_not_answer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def ask(timeout: float) -> dict[str, Any]:
        raise tool.DaemonNoAnswer(f"io.nodemedic1 did not answer within {timeout:g}s")

    monkeypatch.setattr(tool, "ask_daemon", ask)
    path = write_policy(tmp_path, state_dir=tmp_path / "state")
    assert cli.main(["status", "--policy", str(path), "--timeout", "0.5"]) == 2
    out = capsys.readouterr().out
    assert out.startswith("nodemedic is not running (io.nodemedic1 did not answer within 0.5s)")


@pytest.mark.parametrize("no_color", [None, "", "1"])
def test_colours_only_on_a_terminal_without_no_color(
    tmp_path: Path, daemon_down: None, monkeypatch: pytest.MonkeyPatch, no_color: str | None
) -> None:
    state = tmp_path / "state"
    StateStore(state).save(
        {"rules": {RULE: {"breaker": {"state": "open", "opened_at": 4e9}, "backoff": {}}}, "budget": {}}
    )
    path = write_policy(tmp_path, state_dir=state)
    if no_color is None:
        monkeypatch.delenv("NO_COLOR", raising=False)
    else:
        monkeypatch.setenv("NO_COLOR", no_color)
    terminal = Terminal()
    monkeypatch.setattr("sys.stdout", terminal)
    assert cli.main(["status", "--policy", str(path)]) == 1
    out = terminal.getvalue()
    coloured = no_color in (None, "")  # NO_COLOR set to anything but "" turns colours off
    assert ("\033[31mopen until" in out) is coloured, out
    assert ("\033[33mnodemedic is not running" in out) is coloured
    assert ("\033[" in out) is coloured


def test_the_reply_of_status() -> None:
    def error(name: str, text: str = "") -> Message:
        return Message(
            message_type=MessageType.ERROR, error_name=name, reply_serial=1, signature="s", body=[text]
        )

    with pytest.raises(tool.DaemonNotRunning, match=r"no process owns io\.nodemedic1"):
        tool.parse_reply(error("org.freedesktop.DBus.Error.ServiceUnknown", "The name is not activatable"))
    with pytest.raises(tool.DaemonNoAnswer, match="AccessDenied: no"):
        tool.parse_reply(error("org.freedesktop.DBus.Error.AccessDenied", "no"))

    def reply(body: str) -> Message:
        return Message(message_type=MessageType.METHOD_RETURN, reply_serial=1, signature="s", body=[body])

    with pytest.raises(tool.DaemonNoAnswer, match="not a status"):
        tool.parse_reply(reply("{"))
    with pytest.raises(tool.DaemonNoAnswer, match="another schema"):
        tool.parse_reply(reply('{"schema": 2}'))
    assert tool.parse_reply(reply('{"schema": 1, "running": true}')) == {"schema": 1, "running": True}


def test_no_system_bus_is_not_running(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DBUS_SYSTEM_BUS_ADDRESS", f"unix:path={tmp_path}/no-bus")
    monkeypatch.setattr(tool, "_unit_active", lambda: False)
    with pytest.raises(tool.DaemonNotRunning, match="the system bus cannot be reached"):
        tool.ask_daemon(1.0)
    monkeypatch.setattr(tool, "_unit_active", lambda: True)  # the unit runs, without its name
    with pytest.raises(tool.DaemonNoAnswer, match=r"nodemedic.service is active but the system bus"):
        tool.ask_daemon(1.0)


@pytest.mark.parametrize("failure", [subprocess.TimeoutExpired("systemctl", 5.0), PermissionError("no")])
def test_a_systemctl_that_hangs_or_fails_is_not_active(
    monkeypatch: pytest.MonkeyPatch, failure: Exception
) -> None:
    def run(*_: object, **__: object) -> subprocess.CompletedProcess[bytes]:
        raise failure

    monkeypatch.setattr(tool.shutil, "which", lambda _: "/usr/bin/systemctl")
    monkeypatch.setattr(tool.subprocess, "run", run)
    assert tool._unit_active() is False


@pytest.mark.parametrize(
    ("seconds", "said"), [(0, "0s"), (59.9, "59s"), (61, "1m 01s"), (3725, "1h 02m"), (90061, "1d 01h")]
)
def test_durations(seconds: float, said: str) -> None:
    assert tool.duration(seconds) == said
