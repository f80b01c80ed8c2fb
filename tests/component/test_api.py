"""The D-Bus API on a real private dbus-daemon, under the policy file the packages install.

The bus's configuration is the system bus's default policy (Debian's system.conf: every method call
denied unless a file punches a hole) with packaging/dbus/io.nodemedic1.conf included as it is. The
daemon runs for real (``Daemon`` with the API as its source); the callers are this process (root)
and a small client run as nobody (uid 65534, ``setpriv``): the bus, not nodemedic, refuses what
nobody may not do.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import sys
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from dbus_fast import Message, MessageType, Variant
from dbus_fast.aio import MessageBus

from nodemedic import __version__, cli
from nodemedic.actions.base import ActionContext
from nodemedic.api import BUS_NAME, INTERFACE, OBJECT_PATH, Api
from nodemedic.app import App
from nodemedic.backoff import Backoff
from nodemedic.clock import MonotonicClock
from nodemedic.core.breaker import OPEN
from nodemedic.daemon import Daemon
from nodemedic.events import Event
from nodemedic.executor import Executor
from nodemedic.policy.load import load_policy
from nodemedic.report import MemorySink, Record, RecordKind, Reporter
from nodemedic.snapshot import StatusTracker, iso
from nodemedic.store import StateStore

from .conftest import DbusDaemon
from .helpers import ConnectedSystemd

pytestmark = pytest.mark.component

ROOT = Path(__file__).parents[2]
BUS_POLICY = ROOT / "packaging" / "dbus" / "io.nodemedic1.conf"
NOBODY = 65534
WAIT = 10.0  # bounds a wait for the bus or the daemon; measures nothing
POLL = 0.02
RULE = "socket-path-is-directory"

# Debian's system.conf, less what a private bus cannot have (type, user, fork, pidfile, helper).
BUS_CONFIG = """<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-BUS Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <listen>unix:path={socket}</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow user="*"/>
    <deny own="*"/>
    <deny send_type="method_call"/>
    <allow send_type="signal"/>
    <allow send_requested_reply="true" send_type="method_return"/>
    <allow send_requested_reply="true" send_type="error"/>
    <allow receive_type="method_call"/>
    <allow receive_type="method_return"/>
    <allow receive_type="error"/>
    <allow receive_type="signal"/>
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus"/>
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus.Introspectable"/>
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus.Properties"/>
  </policy>
  <include>{policy}</include>
</busconfig>
"""

EMPTY_BUS_POLICY = """<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-BUS Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig/>
"""

POLICY = """
[daemon]
mode = "enforce"
state_dir = "{tmp}/state"

[[rule]]
name = "socket-path-is-directory"
trigger = [{{ source = "path", paths = ["{tmp}/containerd.sock"], kind = "directory" }}]
action = [{{ do = "remove-socket-dir", paths = ["{tmp}/containerd.sock"], root = "{tmp}" }}]

[[rule]]
name = "containerd-failed"
trigger = [{{ source = "unit", unit = "containerd.service", active_state = ["failed"] }}]
"""

# The caller that is not root: one method call, or the signals, printed as JSON.
CLIENT = r"""
import asyncio, json, sys
from dbus_fast import Message, MessageType, Variant
from dbus_fast.aio import MessageBus

def plain(v):
    if isinstance(v, Variant):
        return plain(v.value)
    if isinstance(v, dict):
        return {k: plain(x) for k, x in v.items()}
    if isinstance(v, list):
        return [plain(x) for x in v]
    return v

async def main(address, what, interface, member, signature, body):
    bus = await MessageBus(bus_address=address).connect()
    if what == "listen":
        got = []
        def on(msg):
            if msg.message_type is MessageType.SIGNAL and msg.interface == interface:
                print(json.dumps([msg.member, plain(msg.body)]), flush=True)
                got.append(msg)
        bus.add_message_handler(on)
        await bus.call(Message(destination="org.freedesktop.DBus", path="/org/freedesktop/DBus",
                               interface="org.freedesktop.DBus", member="AddMatch", signature="s",
                               body=[f"type='signal',sender='io.nodemedic1',interface='{interface}'"]))
        print("ready", flush=True)
        while len(got) < int(member):
            await asyncio.sleep(0.01)
        return
    body = json.loads(body)
    if signature.endswith("v"):  # a string in a variant (Properties.Set)
        body[-1] = Variant("s", body[-1])
    reply = await bus.call(Message(destination="io.nodemedic1", path="/io/nodemedic1",
                                   interface=interface or None, member=member,
                                   signature=signature, body=body))
    if reply.message_type is MessageType.ERROR:
        print(json.dumps({"error": reply.error_name, "text": plain(reply.body)}))
    else:
        print(json.dumps({"body": plain(reply.body)}))

asyncio.run(main(*sys.argv[1:]))
"""


@dataclass
class Node:
    """A daemon serving the API on the private bus, and what it said."""

    app: App
    api: Api
    sink: MemorySink
    policy_path: Path
    bus: DbusDaemon
    address: str


@pytest.fixture
async def bus(short_tmp: Path) -> AsyncIterator[DbusDaemon]:
    """A private bus with the system bus's policy and ours, reachable by nobody too."""
    short_tmp.chmod(0o755)
    daemon = DbusDaemon(short_tmp)
    daemon.config.write_text(BUS_CONFIG.format(socket=daemon.socket, policy=BUS_POLICY), encoding="utf-8")
    try:
        await daemon.start()
        yield daemon
    finally:
        await daemon.kill()


def make_app(policy_path: Path, sink: MemorySink) -> App:
    """As build_app wires the executor, the status tracker and the records; no other source."""
    policy = load_policy(policy_path)
    report, clock = Reporter(sink), MonotonicClock()
    ctx = ActionContext(None, None, clock, policy_path.parent / "quarantine")  # type: ignore[arg-type]
    repairs: set[asyncio.Task[None]] = set()

    def spawn(coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        repairs.add(task)
        task.add_done_callback(repairs.discard)

    store = StateStore(policy.daemon.state_dir)
    executor = Executor(policy, ctx, report, spawn, store)
    executor.listeners.append(StatusTracker(clock, policy, policy_path))
    systemd = ConnectedSystemd()
    events: asyncio.Queue[Event] = asyncio.Queue()
    sources = {"dbus": systemd.run}
    # The daemon's own records (started, reloaded) pass the executor's listeners too
    return App(policy, policy_path, executor.report, events, sources, systemd, executor, repairs)  # type: ignore[arg-type]


@asynccontextmanager
async def serving(tmp: Path, bus: DbusDaemon, first: str = "serving") -> AsyncIterator[Node]:
    """The daemon with the API as its source, once the API said ``first`` (it serves, by default)."""
    (tmp / "state").mkdir(exist_ok=True)
    policy_path = tmp / "policy.toml"
    policy_path.write_text(POLICY.format(tmp=tmp))
    policy_path.chmod(0o644)
    sink = MemorySink()
    app = make_app(policy_path, sink)
    shutdown, reload = asyncio.Event(), asyncio.Event()
    fast = Backoff(initial=0.02, factor=2.0, maximum=0.05)
    api = Api(app, reload.set, bus_address=bus.address, reconnect=fast)
    app.sources["api"] = api.run
    task = asyncio.create_task(Daemon(app, shutdown, reload, notify=lambda state: None).run())
    node = Node(app, api, sink, policy_path, bus, bus.address)
    try:
        await until(lambda: said(node, first), f"the API to say {first!r}")
        yield node
    finally:
        shutdown.set()
        await asyncio.wait_for(task, WAIT)


def said(node: Node, words: str) -> list[Record]:
    return [
        r for r in node.sink.of(RecordKind.DAEMON) if r.fields.get("SOURCE") == "api" and words in r.message
    ]


async def until(predicate: Callable[[], object], what: str) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + WAIT
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError(f"waited {WAIT:g}s for {what}")
        await asyncio.sleep(POLL)


def as_nobody(*argv: str) -> list[str]:
    setpriv = shutil.which("setpriv")
    if os.geteuid() != 0 or setpriv is None:
        pytest.skip("calling as another user needs root and setpriv (util-linux)")
    regid = f"--regid={NOBODY}"
    return [setpriv, f"--reuid={NOBODY}", regid, "--clear-groups", sys.executable, "-I", "-c", CLIENT, *argv]


async def nobody_calls(
    node: Node, member: str, signature: str = "", body: list[Any] | None = None, interface: str = INTERFACE
) -> dict[str, Any]:
    """One call as nobody: {"body": [...]} or {"error": name, "text": [...]}."""
    argv = as_nobody(node.address, "call", interface, member, signature, json.dumps(body or []))
    proc = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.PIPE)
    out, _ = await asyncio.wait_for(proc.communicate(), WAIT)
    assert proc.returncode == 0, out
    answer: dict[str, Any] = json.loads(out)
    return answer


async def root_calls(
    node: Node, member: str, signature: str = "", body: list[Any] | None = None, interface: str = INTERFACE
) -> Message:
    client = await MessageBus(bus_address=node.address).connect()
    try:
        message = Message(
            destination=BUS_NAME,
            path=OBJECT_PATH,
            interface=interface,
            member=member,
            signature=signature,
            body=body or [],
        )
        return await asyncio.wait_for(client.call(message), WAIT)
    finally:
        client.disconnect()


def open_breaker(node: Node, rule: str) -> None:
    breaker = node.app.executor.states[rule].breaker
    while breaker.state != OPEN:
        breaker.failed(node.app.executor.now().wall, "failed for the test")


# ---- anyone reads --------------------------------------------------------------------------------


async def test_nobody_reads_the_properties_and_the_status(short_tmp: Path, bus: DbusDaemon) -> None:
    async with serving(short_tmp, bus) as node:
        props = await nobody_calls(node, "GetAll", "s", [INTERFACE], "org.freedesktop.DBus.Properties")
        [values] = props["body"]
        assert values["Version"] == __version__
        assert values["Mode"] == "enforce"
        assert values["PolicyPath"] == str(node.policy_path)
        assert len(values["PolicySha256"]) == 64
        assert values["StartedAt"].endswith("Z")
        one = await nobody_calls(node, "Get", "ss", [INTERFACE, "Mode"], "org.freedesktop.DBus.Properties")
        assert one == {"body": ["enforce"]}
        status = await nobody_calls(node, "Status")
        snapshot = json.loads(status["body"][0])
        assert snapshot["schema"] == 1
        assert snapshot["running"] is True
        assert [r["name"] for r in snapshot["rules"]] == [RULE, "containerd-failed"]
        assert snapshot["policy"]["sha256"] == values["PolicySha256"]


async def test_introspection_lists_every_member(short_tmp: Path, bus: DbusDaemon) -> None:
    async with serving(short_tmp, bus) as node:
        answer = await nobody_calls(node, "Introspect", interface="org.freedesktop.DBus.Introspectable")
        xml = answer["body"][0]
        assert f'<interface name="{INTERFACE}">' in xml
        for member in ("Status", "Reset", "SetMode", "Reload"):
            assert f'<method name="{member}">' in xml
        for member in ("IncidentStarted", "Repaired", "BreakerOpened"):
            assert f'<signal name="{member}">' in xml
        for prop in ("Version", "Mode", "PolicyPath", "PolicySha256", "StartedAt"):
            assert f'<property name="{prop}" type="s" access="read"' in xml
        assert '<arg name="elapsed_ms" direction="out" type="d"' in xml
        assert '<arg name="rule" direction="in" type="s"' in xml


# ---- only root changes ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("interface", "member", "signature", "body"),
    [
        (INTERFACE, "Reset", "s", [RULE]),
        (INTERFACE, "SetMode", "ss", ["observe", ""]),
        (INTERFACE, "Reload", "", []),
        ("org.freedesktop.DBus.Properties", "Set", "ssv", [INTERFACE, "Mode", "observe"]),
        ("", "Reset", "s", [RULE]),  # no interface field: the bus must still refuse it
    ],
)
async def test_nobody_is_refused_every_change(
    short_tmp: Path, bus: DbusDaemon, interface: str, member: str, signature: str, body: list[Any]
) -> None:
    async with serving(short_tmp, bus) as node:
        open_breaker(node, RULE)
        before = node.policy_path.read_text()
        answer = await nobody_calls(node, member, signature, body, interface)
        assert answer["error"] == "org.freedesktop.DBus.Error.AccessDenied", answer
        assert node.app.executor.states[RULE].breaker.state == OPEN
        assert node.policy_path.read_text() == before
        assert not [r for r in node.sink.records if r.fields.get("OUTCOME") in ("reset", "reloaded")]


async def test_root_resets_a_breaker(short_tmp: Path, bus: DbusDaemon) -> None:
    async with serving(short_tmp, bus) as node:
        open_breaker(node, RULE)
        reply = await root_calls(node, "Reset", "s", [RULE])
        assert reply.message_type is MessageType.METHOD_RETURN, reply.body
        assert reply.body == [f"rule {RULE!r}: breaker closed (it was open)"]
        assert node.app.executor.states[RULE].breaker.state == "closed"
        [decided] = [r for r in node.sink.of(RecordKind.DECIDED) if r.fields.get("OUTCOME") == "reset"]
        assert decided.fields["RULE"] == RULE
        saved = StateStore(node.app.policy.daemon.state_dir).load()
        assert saved["rules"][RULE]["breaker"]["state"] == "closed"
        unknown = await root_calls(node, "Reset", "s", ["nope"])
        assert unknown.error_name == "io.nodemedic1.Error.UnknownRule"
        assert "the policy's rules: 'socket-path-is-directory', 'containerd-failed'" in unknown.body[0]


async def test_root_sets_the_mode_and_the_daemon_reloads(short_tmp: Path, bus: DbusDaemon) -> None:
    async with serving(short_tmp, bus) as node:
        reply = await root_calls(node, "SetMode", "ss", ["observe", ""])
        assert reply.message_type is MessageType.METHOD_RETURN, reply.body
        lines = reply.body[0].splitlines()
        assert lines[0] == "policy.toml: [daemon] mode enforce -> observe"
        assert lines[-1].startswith(f"policy reloaded from {node.policy_path}")
        assert 'mode = "observe"' in node.policy_path.read_text()
        assert node.app.executor.policy.daemon.mode == "observe"
        mode = await root_calls(node, "Get", "ss", [INTERFACE, "Mode"], "org.freedesktop.DBus.Properties")
        assert mode.body == [Variant("s", "observe")]
        again = await root_calls(node, "SetMode", "ss", ["observe", ""])
        assert again.body == ["policy.toml: [daemon] mode is already observe; nothing changed"]
        one = await root_calls(node, "SetMode", "ss", ["enforce", RULE])
        assert (
            one.body[0].splitlines()[0]
            == f"policy.toml: rule {RULE!r} mode observe (from [daemon]) -> enforce"
        )
        assert node.app.executor.policy.rule[0].mode == "enforce"
        for body, error in (
            (["observe", "nope"], "io.nodemedic1.Error.UnknownRule"),
            (["loud", ""], "io.nodemedic1.Error.InvalidMode"),
        ):
            refused = await root_calls(node, "SetMode", "ss", body)
            assert refused.error_name == error, refused.body


async def test_root_reloads_and_hears_a_refusal(short_tmp: Path, bus: DbusDaemon) -> None:
    async with serving(short_tmp, bus) as node:
        reply = await root_calls(node, "Reload")
        assert reply.body == [f"policy reloaded from {node.policy_path}: 2 rule(s)"]
        node.policy_path.write_text("[daemon]\nmode = 'loud'\n")
        refused = await root_calls(node, "Reload")
        assert refused.error_name == "io.nodemedic1.Error.ReloadRefused"
        assert refused.body[0].startswith("reload refused, the policy in force stays")
        assert node.app.executor.policy.daemon.mode == "enforce"


# ---- signals -------------------------------------------------------------------------------------


async def test_nobody_follows_the_signals(short_tmp: Path, bus: DbusDaemon) -> None:
    async with serving(short_tmp, bus) as node:
        argv = as_nobody(node.address, "listen", INTERFACE, "3", "", "[]")
        proc = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.PIPE)
        assert proc.stdout is not None
        assert await asyncio.wait_for(proc.stdout.readline(), WAIT) == b"ready\n"
        report, incident = node.app.executor.report, "0123456789ab"
        report(RecordKind.DETECTED, f"{RULE}: x", RULE=RULE, INCIDENT=incident, TRIGGER="a directory")
        report(
            RecordKind.OUTCOME,
            f"{RULE}: repaired",
            RULE=RULE,
            INCIDENT=incident,
            OUTCOME="repaired",
            ELAPSED_MS=42.0,
        )
        open_breaker(node, RULE)
        report(RecordKind.ESCALATED, f"{RULE}: open", RULE=RULE, INCIDENT=incident, OUTCOME="breaker-open")
        out, _ = await asyncio.wait_for(proc.communicate(), WAIT)
        reopens = node.app.executor.states[RULE].breaker.reopens_at()
        assert [json.loads(line) for line in out.splitlines()] == [
            ["IncidentStarted", [RULE, incident, "a directory"]],
            ["Repaired", [RULE, incident, 42.0]],
            ["BreakerOpened", [RULE, iso(reopens)]],
        ]


# ---- the bus and the name: the daemon runs on ----------------------------------------------------


async def test_a_name_owned_by_another_is_said_once_and_taken_when_free(
    short_tmp: Path, bus: DbusDaemon
) -> None:
    squatter = await MessageBus(bus_address=bus.address).connect()
    await squatter.request_name(BUS_NAME)
    async with serving(short_tmp, bus, first="not served") as node:
        await asyncio.sleep(0.3)  # several tries
        [why] = said(node, "not served")
        assert "owned by another process" in why.message
        squatter.disconnect()
        await until(lambda: said(node, "serving"), "the API to own the name once free")
        reply = await root_calls(node, "Get", "ss", [INTERFACE, "Mode"], "org.freedesktop.DBus.Properties")
        assert reply.body == [Variant("s", "enforce")]


async def test_the_api_comes_back_with_the_bus(short_tmp: Path, bus: DbusDaemon) -> None:
    async with serving(short_tmp, bus) as node:
        await bus.kill()
        await until(lambda: said(node, "lost the system bus"), "the API to see the bus go")
        node.app.executor.report(RecordKind.DETECTED, "while down", RULE=RULE)  # no bus: no signal, no error
        await bus.start()
        await until(lambda: len(said(node, "serving")) == 2, "the API to serve again")
        reply = await root_calls(node, "Status")
        assert json.loads(reply.body[0])["running"] is True
        assert not [r for r in node.sink.of(RecordKind.ERROR)]


# ---- nodemedic mode and reset use the API ----------------------------------------------------------


async def test_the_cli_changes_through_the_running_daemon(
    short_tmp: Path, bus: DbusDaemon, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def no_systemctl(*args: str) -> tuple[int, str]:
        raise AssertionError(f"systemctl {args}: the API was not used")

    monkeypatch.setattr(cli, "systemctl", no_systemctl)
    monkeypatch.setenv("DBUS_SYSTEM_BUS_ADDRESS", bus.address)
    async with serving(short_tmp, bus) as node:
        path = str(node.policy_path)
        assert await asyncio.to_thread(cli.main, ["mode", "observe", "--policy", path]) == 0
        out = capsys.readouterr().out
        assert "policy.toml: [daemon] mode enforce -> observe" in out
        assert f"policy reloaded from {path}" in out
        assert node.app.executor.policy.daemon.mode == "observe"
        open_breaker(node, RULE)
        assert await asyncio.to_thread(cli.main, ["reset", RULE, "--policy", path]) == 0
        assert capsys.readouterr().out == f"rule {RULE!r}: breaker closed (it was open)\n"
        assert node.app.executor.states[RULE].breaker.state == "closed"
        assert StateStore(node.app.policy.daemon.state_dir).take_resets() == []  # no request file


async def test_without_the_bus_policy_file_the_daemon_runs_and_says_why(short_tmp: Path) -> None:
    bus = DbusDaemon(short_tmp)
    empty = short_tmp / "none.conf"
    empty.write_text(EMPTY_BUS_POLICY, encoding="utf-8")
    bus.config.write_text(BUS_CONFIG.format(socket=bus.socket, policy=empty), encoding="utf-8")
    await bus.start()
    try:
        async with serving(short_tmp, bus, first="not served") as node:
            await asyncio.sleep(0.2)  # several tries, said once
            [why] = said(node, "not served")
            assert "/usr/share/dbus-1/system.d/io.nodemedic1.conf installed?" in why.message
            assert not [r for r in node.sink.of(RecordKind.ERROR)]
    finally:
        await bus.kill()
