"""The D-Bus API's logic without a bus (nodemedic.api): which record becomes which signal, the end
of a reload, the mode edit shared with the CLI, the methods' answers and refusals on a real
Executor (test_runner's Harness), the client's reading of replies, and `nodemedic mode` / `reset`
with the call faked at its edge (``api.call_daemon``). The bus itself: tests/component/test_api.py."""

from __future__ import annotations

import asyncio
import json
import os
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from dbus_fast import DBusError, Message, MessageType

from nodemedic import api, cli
from nodemedic.api import Api, SignalOut, change_mode, reload_ended, signal_for
from nodemedic.app import App
from nodemedic.core.breaker import OPEN
from nodemedic.errors import NodemedicError, UnknownRuleError
from nodemedic.report import Record, RecordKind
from nodemedic.snapshot import iso
from nodemedic.store import StateStore

from .test_runner import Harness
from .test_status import app_of

pytestmark = pytest.mark.unit
RULE = "socket-path-is-directory"
SHIPPED = Path(__file__).parents[2] / "policy" / "policy.toml"


def record(kind: RecordKind, message: str = "words", **fields: str) -> Record:
    return Record(kind, message, fields)


# ---- records -> signals ----------------------------------------------------------------------------


def test_each_record_kind_its_signal() -> None:
    def reopens(rule: str) -> float | None:
        return 1_700_000_100.0 if rule == RULE else None

    detected = record(RecordKind.DETECTED, RULE=RULE, INCIDENT="i1", TRIGGER="a directory at the socket")
    assert signal_for(detected, reopens) == SignalOut(
        "IncidentStarted", (RULE, "i1", "a directory at the socket")
    )
    storm = record(RecordKind.DETECTED, "sighup: a storm of 12 SIGHUPs", RULE="sighup", INCIDENT="s1")
    assert signal_for(storm, reopens) == SignalOut(
        "IncidentStarted", ("sighup", "s1", "sighup: a storm of 12 SIGHUPs")
    ), "no TRIGGER field: the record's words"
    repaired = record(RecordKind.OUTCOME, RULE=RULE, INCIDENT="i1", OUTCOME="repaired", ELAPSED_MS="42")
    assert signal_for(repaired, reopens) == SignalOut("Repaired", (RULE, "i1", 42.0))
    opened = record(RecordKind.ESCALATED, RULE=RULE, INCIDENT="i1", OUTCOME="breaker-open")
    assert signal_for(opened, reopens) == SignalOut("BreakerOpened", (RULE, "2023-11-14T22:15:00Z"))
    assert signal_for(record(RecordKind.ESCALATED, RULE="gone"), reopens) == SignalOut(
        "BreakerOpened", ("gone", "")
    )


@pytest.mark.parametrize(
    "quiet",
    [
        record(RecordKind.OUTCOME, RULE=RULE, OUTCOME="not-repaired", ELAPSED_MS="9"),
        record(RecordKind.OUTCOME, RULE=RULE, OUTCOME="observed"),
        record(RecordKind.DECIDED, RULE=RULE, OUTCOME="repair"),
        record(RecordKind.ACTION, RULE=RULE, OUTCOME="done"),
        record(RecordKind.DAEMON, OUTCOME="started"),
        record(RecordKind.ERROR, OUTCOME="failed"),
    ],
)
def test_other_records_are_no_signal(quiet: Record) -> None:
    assert signal_for(quiet, lambda rule: 0.0) is None


def test_repaired_without_a_time_says_zero() -> None:
    odd = record(RecordKind.OUTCOME, RULE=RULE, OUTCOME="repaired")
    assert signal_for(odd, lambda rule: None) == SignalOut("Repaired", (RULE, "", 0.0))


def test_the_end_of_a_reload() -> None:
    reloaded = record(
        RecordKind.DAEMON, "policy reloaded from p: 3 rule(s)", ACTION="reload", OUTCOME="reloaded"
    )
    assert reload_ended(reloaded)
    refused = record(
        RecordKind.ERROR, "reload refused, the policy in force stays: x", ACTION="reload", OUTCOME="refused"
    )
    assert reload_ended(refused)
    reset = record(RecordKind.ERROR, "reset requested for unknown rule 'x'", RULE="x", OUTCOME="refused")
    assert not reload_ended(reset), "a refused reset is not a refused reload"
    assert not reload_ended(record(RecordKind.DAEMON, OUTCOME="started"))
    assert not reload_ended(record(RecordKind.DAEMON, "reloaded; changes to [daemon] take effect at restart"))


# ---- the mode in the file --------------------------------------------------------------------------


@pytest.fixture
def policy(tmp_path: Path) -> Path:
    path = tmp_path / "policy.toml"
    path.write_text(SHIPPED.read_text())
    path.chmod(0o640)
    return path


def test_change_mode_edits_one_value_and_keeps_the_file_mode(policy: Path) -> None:
    before = policy.read_text()
    change = change_mode(policy, "observe", None)
    assert change.changed
    assert change.lines[0] == "policy.toml: [daemon] mode enforce -> observe"
    assert stat.S_IMODE(policy.stat().st_mode) == 0o640
    removed = [line for line in before.splitlines() if line not in policy.read_text().splitlines()]
    assert [line.split("#")[0].strip() for line in removed] == ['mode = "enforce"']
    assert change_mode(policy, "observe", None) == api.ModeChange(
        ["policy.toml: [daemon] mode is already observe; nothing changed"], False
    )
    one = change_mode(policy, "enforce", RULE)
    assert one.lines[0] == f"policy.toml: rule {RULE!r} mode observe (from [daemon]) -> enforce"
    back = change_mode(policy, "enforce", None)
    assert f"policy.toml: rule {RULE!r} keeps its own mode enforce" not in back.lines, "same as [daemon]"
    again = change_mode(policy, "observe", None)
    assert f"policy.toml: rule {RULE!r} keeps its own mode enforce" in again.lines
    with pytest.raises(UnknownRuleError, match="no rule named 'nope'"):
        change_mode(policy, "observe", "nope")


# ---- the methods, on a real executor ---------------------------------------------------------------


class Daemonish:
    """What the daemon does when asked to reload: its record, through the executor's listeners."""

    def __init__(self, h: Harness, answer: Record | None) -> None:
        self.h, self.answer, self.asked = h, answer, 0

    def __call__(self) -> None:
        self.asked += 1
        if self.answer is not None:
            answer = self.answer
            fields = dict(answer.fields)
            asyncio.get_running_loop().call_soon(
                lambda: self.h.runner.report(answer.kind, answer.message, **fields)
            )


def api_of(
    h: Harness, policy_path: Path | None, answer: Record | None = None, status: Any = None
) -> tuple[Api, Daemonish]:
    app = app_of(h, policy_path)
    reload = Daemonish(h, answer)
    kwargs = {"status": status} if status is not None else {}
    return Api(app, reload, **kwargs), reload


RELOADED = record(RecordKind.DAEMON, "policy reloaded from P: 8 rule(s)", ACTION="reload", OUTCOME="reloaded")


async def test_reset_closes_the_breaker_through_the_executor(harness: Callable[..., Harness]) -> None:
    h = harness()
    a, _ = api_of(h, None)
    breaker = h.runner.states[RULE].breaker
    while breaker.state != OPEN:
        breaker.failed(h.clock.wall(), "x")
    assert a.reset(RULE) == f"rule {RULE!r}: breaker closed (it was open)"
    assert breaker.state == "closed"
    assert [r.fields["OUTCOME"] for r in h.sink.of(RecordKind.DECIDED)] == ["reset"]
    with pytest.raises(DBusError) as refused:
        a.reset("nope")
    assert refused.value.type == api.UNKNOWN_RULE
    assert "no rule named 'nope'; the policy's rules: 'socket-path-is-directory'" in refused.value.text


async def test_set_mode_writes_the_file_and_waits_for_the_reload(
    harness: Callable[..., Harness], policy: Path
) -> None:
    h = harness()
    a, reload = api_of(h, policy, RELOADED)
    said = await a.set_mode("observe", "")
    assert said.splitlines() == [
        "policy.toml: [daemon] mode enforce -> observe",
        "policy reloaded from P: 8 rule(s)",
    ]
    assert reload.asked == 1
    assert await a.set_mode("observe", "") == "policy.toml: [daemon] mode is already observe; nothing changed"
    assert reload.asked == 1, "nothing changed: no reload"
    for mode, rule, error in (("loud", "", api.INVALID_MODE), ("observe", "nope", api.UNKNOWN_RULE)):
        with pytest.raises(DBusError) as refused:
            await a.set_mode(mode, rule)
        assert refused.value.type == error


async def test_set_mode_on_a_read_only_file_says_so(
    harness: Callable[..., Harness], policy: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def read_only(path: Path, text: str) -> None:
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(api, "atomic_write", read_only)
    a, reload = api_of(harness(), policy, RELOADED)
    with pytest.raises(DBusError) as refused:
        await a.set_mode("observe", "")
    assert refused.value.type == api.POLICY_NOT_WRITABLE
    assert reload.asked == 0


async def test_reload_answers_the_daemons_word(harness: Callable[..., Harness], policy: Path) -> None:
    h = harness()
    a, _ = api_of(h, policy, RELOADED)
    assert await a.reload() == "policy reloaded from P: 8 rule(s)"
    words = "reload refused, the policy in force stays: 1 problem"
    refused_record = record(RecordKind.ERROR, words, ACTION="reload", OUTCOME="refused", PATH=str(policy))
    b, _ = api_of(h, policy, refused_record)
    with pytest.raises(DBusError) as refused:
        await b.reload()
    assert (refused.value.type, refused.value.text) == (api.RELOAD_REFUSED, words)


async def test_reload_without_word_or_file(
    harness: Callable[..., Harness], policy: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(api, "RELOAD_WAIT", 0.01)
    h = harness()
    a, reload = api_of(h, policy, None)
    assert (await a.reload()).startswith("reload requested; no word on it within")
    assert reload.asked == 1
    b, _ = api_of(h, None)
    with pytest.raises(DBusError) as refused:
        await b.reload()
    assert refused.value.type == api.NO_POLICY_FILE


async def test_status_and_properties_from_the_snapshot(harness: Callable[..., Harness], policy: Path) -> None:
    h = harness()
    seen: list[Any] = []

    def stand_in(app: App, frozen: dict[str, float] | None) -> dict[str, Any]:
        seen.append(frozen)
        return {"schema": 1, "running": True, "errors": []}

    a, _ = api_of(h, policy, status=stand_in)
    assert json.loads(await a.status_json()) == {"schema": 1, "running": True, "errors": []}
    assert seen == [{}], "the freezer's registry, read beforehand (nothing frozen)"
    assert a.mode() == "enforce"
    assert a.policy_path() == str(policy)
    assert len(a.policy_sha256()) == 64
    assert a.started_at() == iso(h.clock.wall())


async def test_real_status_is_json(harness: Callable[..., Harness], policy: Path) -> None:
    a, _ = api_of(harness(), policy)
    snapshot = json.loads(await a.status_json())
    assert snapshot["schema"] == 1
    assert snapshot["policy"]["sha256"] == a.policy_sha256()


# ---- the client's reading of replies ---------------------------------------------------------------


class OneReply:
    """A bus that answers every call with one message."""

    def __init__(self, reply: Message) -> None:
        self.reply = reply

    async def call(self, message: Message) -> Message:
        return self.reply


def error(name: str, text: str = "why") -> Message:
    return Message(
        message_type=MessageType.ERROR, error_name=name, reply_serial=1, signature="s", body=[text]
    )


async def ask(reply: Message) -> list[Any] | None:
    return await api._ask(OneReply(reply), api.INTERFACE, "Reset", "s", ["x"], 1.0)  # type: ignore[arg-type]


async def test_the_client_reads_each_reply() -> None:
    answer = Message(message_type=MessageType.METHOD_RETURN, reply_serial=1, signature="s", body=["done"])
    assert await ask(answer) == ["done"]
    for name in ("org.freedesktop.DBus.Error.ServiceUnknown", "org.freedesktop.DBus.Error.NameHasNoOwner"):
        assert await ask(error(name)) is None, "nobody serves the name: the files"
    assert await ask(error(api.POLICY_NOT_WRITABLE)) is None, "the daemon cannot write: the CLI can"
    with pytest.raises(PermissionError, match="run this as root"):
        await ask(error("org.freedesktop.DBus.Error.AccessDenied"))
    with pytest.raises(UnknownRuleError, match="no rule"):
        await ask(error(api.UNKNOWN_RULE, "no rule named 'x'"))
    with pytest.raises(
        NodemedicError, match=r"nodemedic refused Reset: bad \(io.nodemedic1.Error.ReloadRefused\)"
    ):
        await ask(error(api.RELOAD_REFUSED, "bad"))


def test_no_bus_is_the_file_way(tmp_path: Path, policy: Path) -> None:
    nowhere = f"unix:path={tmp_path}/no-bus"
    assert api.call_daemon("Reload", policy_path=policy, bus_address=nowhere, timeout=1.0) is None


# ---- nodemedic mode and reset ----------------------------------------------------------------------


class FakeCall:
    def __init__(self, answer: list[Any] | None) -> None:
        self.answer = answer
        self.calls: list[tuple[Any, ...]] = []

    def __call__(
        self, member: str, signature: str = "", body: list[Any] | None = None, **kw: Any
    ) -> list[Any] | None:
        self.calls.append((member, signature, body, kw["policy_path"]))
        return self.answer


@pytest.fixture
def no_systemctl(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, ...]]:
    calls: list[tuple[str, ...]] = []
    monkeypatch.setattr(cli, "systemctl", lambda *a: (calls.append(a), (3, ""))[1])  # not running
    return calls


def test_mode_through_the_daemon(
    policy: Path, monkeypatch: pytest.MonkeyPatch, no_systemctl: list[Any], capsys: pytest.CaptureFixture[str]
) -> None:
    fake = FakeCall(["policy.toml: [daemon] mode enforce -> observe\npolicy reloaded from P: 8 rule(s)"])
    monkeypatch.setattr(api, "call_daemon", fake)
    before = policy.read_text()
    assert cli.main(["mode", "observe", "--rule", RULE, "--policy", str(policy)]) == 0
    assert fake.calls == [("SetMode", "ss", ["observe", RULE], policy)]
    assert capsys.readouterr().out.endswith("policy reloaded from P: 8 rule(s)\n")
    assert policy.read_text() == before, "the daemon edits the file, not the command"
    assert no_systemctl == []


def test_mode_on_the_file_when_no_daemon_serves_it(
    policy: Path, monkeypatch: pytest.MonkeyPatch, no_systemctl: list[Any], capsys: pytest.CaptureFixture[str]
) -> None:
    fake = FakeCall(None)
    monkeypatch.setattr(api, "call_daemon", fake)
    assert cli.main(["mode", "observe", "--policy", str(policy)]) == 0
    assert 'mode = "observe"' in policy.read_text()
    assert "nodemedic.service is not running; the change applies at its next start" in capsys.readouterr().out
    assert no_systemctl == [("is-active", "--quiet", "nodemedic.service")]
    assert cli.main(["mode", "enforce", "--policy", str(policy), "--no-reload"]) == 0
    assert len(fake.calls) == 1, "--no-reload: only the file, never the daemon"


def test_reset_through_the_daemon_or_the_request_file(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    no_systemctl: list[Any],
    capsys: pytest.CaptureFixture[str],
) -> None:
    state = tmp_path / "state"
    policy = tmp_path / "policy.toml"
    policy.write_text(
        SHIPPED.read_text().replace('state_dir = "/var/lib/nodemedic"', f'state_dir = "{state}"')
    )
    fake = FakeCall([f"rule {RULE!r}: breaker closed (it was open)"])
    monkeypatch.setattr(api, "call_daemon", fake)
    assert cli.main(["reset", RULE, "--policy", str(policy)]) == 0
    assert capsys.readouterr().out == f"rule {RULE!r}: breaker closed (it was open)\n"
    assert fake.calls == [("Reset", "s", [RULE], policy)]
    assert StateStore(state).take_resets() == []
    fake.answer = None
    assert cli.main(["reset", RULE, "--policy", str(policy)]) == 0
    assert StateStore(state).take_resets() == [RULE]
    assert cli.main(["reset", "no-such-rule", "--policy", str(policy)]) == 1
    assert len(fake.calls) == 2, "an unknown rule is refused before asking"
    assert no_systemctl == [("is-active", "--quiet", "nodemedic.service")]
    assert os.path.exists(policy)
