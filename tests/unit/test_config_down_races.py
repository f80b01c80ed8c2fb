"""CASE C while containerd is down, through the executor: the shipped config rules on a fake clock,
with real files in a temporary directory and systemd and containerd faked at the edges.

Each test shows a finding of the review of issue 14 goal 3, and failed before its fix: the journal
rule restoring over a file still being written; two repairs for one fault (a verdict taken while
the other rule's repair ran); a restart of containerd when nothing was restored; a restart of a
containerd an operator stopped while the rule checked the file.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from nodemedic.actions.base import ActionContext
from nodemedic.configs import GoodConfigs
from nodemedic.events import FileChanged, JournalLine, UnitChanged
from nodemedic.executor import Executor
from nodemedic.executor import repairs as runner
from nodemedic.policy.load import parse_policy_text
from nodemedic.report import MemorySink, RecordKind, Reporter

from .fakes import FakeClock, FakeProbe, FakeUnits

pytestmark = pytest.mark.unit

SHIPPED = Path(__file__).resolve().parents[2] / "policy" / "policy.toml"
UNIT = "containerd.service"
GOOD = "version = 2\n"
# The toolkit's two steps: its nvidia runtime block cut off in the options line, then the rest.
HALF = (
    'version = 2\n[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.nvidia]\n'
    '  runtime_type = "io.containerd.runc.v2"\n'
    '  [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.nvidia.options]\n'
    '    BinaryName = "/usr/bin/nvidia-contai'
)
REST = 'ner-runtime"\n'
LINE = "containerd: failed to load TOML: /etc/containerd/config.toml: (5, 40): unterminated string"


class Node:
    """The executor with the shipped policy, its paths moved under ``tmp``."""

    def __init__(self, tmp: Path, mode: str = "enforce") -> None:
        self.config = tmp / "config.toml"
        self.config.write_text(GOOD)
        run = tmp / "run" / "containerd"
        run.mkdir(parents=True)
        self.sock, self.sockets = run / "containerd.sock", list[socket.socket]()
        text = SHIPPED.read_text().replace("/etc/containerd/config.toml", str(self.config))
        text = text.replace("/run/containerd", str(run)).replace("/var/lib/nodemedic", str(tmp / "state"))
        text = text.replace('mode = "enforce"', f'mode = "{mode}"', 1)
        self.clock, self.units, self.sink = FakeClock(), FakeUnits(), MemorySink()
        self.units.on_start = lambda unit: None
        good = GoodConfigs(tmp / "good")
        good.save(GOOD.encode())
        ctx = ActionContext(self.units, FakeProbe(), self.clock, tmp / "q", good_configs=good)
        self.tasks: list[asyncio.Task[None]] = []
        self.ex = Executor(parse_policy_text(text), ctx, Reporter(self.sink), self._spawn)
        self._restart = self.units.restart
        self.units.restart = self._restart_and_serve  # type: ignore[method-assign]
        self.ex.handle(UnitChanged(UNIT, "active", "running", main_pid=42))

    async def _restart_and_serve(self, unit: str, timeout: float) -> None:
        await self._restart(unit, timeout)
        if unit == UNIT and not self.sock.exists():
            s = socket.socket(socket.AF_UNIX)
            s.bind(str(self.sock))
            self.sockets.append(s)

    def _spawn(self, coro: Any) -> None:
        self.tasks.append(asyncio.get_running_loop().create_task(coro))

    async def settle(self) -> None:
        while self.tasks:
            await self.tasks.pop(0)

    async def after(self, seconds: float) -> None:
        """Time passes: timers due fire, and the repairs they start run to their end."""
        self.clock.advance(seconds)
        self.clock.run_due()
        await self.settle()

    def write(self, text: str, append: bool = False) -> None:
        with self.config.open("a" if append else "w") as f:
            f.write(text)
        self.ex.handle(FileChanged(str(self.config), at=self.clock.now))

    def restarts(self) -> int:
        return self.units.calls.count(("restart", UNIT))

    def outcomes(self) -> list[tuple[str, str]]:
        return [(r.fields["RULE"], r.fields["OUTCOME"]) for r in self.sink.of(RecordKind.OUTCOME)]

    def close(self) -> None:
        for s in self.sockets:
            s.close()


@pytest.fixture
def node(tmp_path: Path) -> Iterator[Node]:
    made = Node(tmp_path)
    yield made
    made.close()


def sighup(node: Node) -> None:
    node.ex.handle(UnitChanged(UNIT, "activating", "auto-restart", exec_main_code=2, exec_main_status=1))


def slow_config_check(monkeypatch: pytest.MonkeyPatch, held: int | None) -> asyncio.Event:
    """The confirm's config check answers the ``held``-th call (every call: None) only once the
    event returned is set, with the verdict it took when called."""
    real, gate, calls = runner.config_problem, asyncio.Event(), []

    async def slow(path: Path) -> str | None:
        calls.append(path)
        nth = len(calls)
        verdict = await real(path)
        if held in (None, nth):
            await gate.wait()
        return verdict

    monkeypatch.setattr(runner, "config_problem", slow)
    return gate


def half_written_while_down(node: Node) -> None:
    """SIGHUP, the toolkit's first step, its settle over: the while-down rule decides."""
    sighup(node)
    node.write(HALF)
    node.clock.advance(0.3)
    node.clock.run_due()


async def test_a_start_between_the_two_steps_is_not_restored_over(node: Node) -> None:
    """systemd starts containerd between the toolkit's two writes; it fails on the half file and
    says so: the journal rule waits for the file to settle, and the finished file loads."""
    sighup(node)
    node.write(HALF)
    node.clock.advance(0.05)
    node.ex.handle(UnitChanged(UNIT, "activating", "start"))
    node.ex.handle(JournalLine(UNIT, LINE))
    sighup(node)
    await node.settle()  # a repair started by the line would run now (~100 ms in the lab)
    node.clock.advance(0.05)
    node.write(REST, append=True)
    for _ in range(4):
        await node.after(0.3)
    assert node.config.read_text() == HALF + REST, "the toolkit's file, as it finished it"
    assert node.units.calls == []
    assert not list(node.config.parent.glob("config.toml.broken-*"))


async def test_one_fault_gets_one_repair_when_the_other_rule_finished_meanwhile(
    node: Node, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Both config rules confirm the same broken file; the second's check returns only after the
    first repair has restored the file and restarted containerd: it must look again, not act."""
    gate = slow_config_check(monkeypatch, held=2)  # the second rule's confirm: answered late
    half_written_while_down(node)
    node.ex.handle(JournalLine(UNIT, LINE))  # containerd met the file: the journal rule too
    first, _second = node.tasks
    await first
    assert node.restarts() == 1
    gate.set()
    await node.settle()
    assert node.restarts() == 1, "the second rule's stale verdict is not acted on"
    assert ("containerd-config-broken", "nothing-to-do") in node.outcomes()
    assert ("stop", UNIT) not in node.units.calls


async def test_nothing_restored_restarts_nothing(node: Node, monkeypatch: pytest.MonkeyPatch) -> None:
    """The file loads again when restore-config looks (fixed after the confirm): containerd is left
    to systemd, nothing is verified, nothing is counted."""

    async def broken_at_confirm(path: Path) -> str | None:
        return "not valid TOML"

    monkeypatch.setattr(runner, "config_problem", broken_at_confirm)  # the confirm's only
    sighup(node)
    node.write(GOOD)
    await node.after(0.3)
    assert node.units.calls == []
    assert node.outcomes() == [("containerd-config-broken-while-down", "nothing-to-do")]


async def test_an_operators_stop_during_the_config_check_is_respected(
    node: Node, monkeypatch: pytest.MonkeyPatch
) -> None:
    gate = slow_config_check(monkeypatch, held=None)
    half_written_while_down(node)
    await asyncio.sleep(0.05)  # the while-down rule checks the file...
    node.ex.handle(UnitChanged(UNIT, "inactive", "dead", exec_main_code=2, exec_main_status=1))
    gate.set()  # ...and an operator ran systemctl stop meanwhile
    await node.settle()
    assert node.units.calls == []
    assert node.config.read_text() == HALF, "left as it is: containerd is the operator's now"
    assert ("containerd-config-broken-while-down", "operator-stop") in node.outcomes()


async def test_an_operators_stop_during_the_repair_is_not_undone(node: Node) -> None:
    """systemctl stop after the restore, before the restart: the restart is not made."""
    from nodemedic.actions import config_restore

    replace = config_restore.RestoreConfig._replace

    def replace_then_operator_stops(self: Any, *args: Any) -> str:
        done = replace(self, *args)
        node.ex.handle(UnitChanged(UNIT, "inactive", "dead", exec_main_code=2, exec_main_status=1))
        return done

    config_restore.RestoreConfig._replace = replace_then_operator_stops  # type: ignore[method-assign]
    try:
        sighup(node)
        node.write(HALF)
        await node.after(0.3)
    finally:
        config_restore.RestoreConfig._replace = replace  # type: ignore[method-assign]
    assert node.units.calls == []
    assert node.config.read_text() == GOOD, "restored before the stop"
    assert node.outcomes() == [("containerd-config-broken-while-down", "operator-stop")]


async def test_observe_mode_says_it_would_restart_after_the_restore(tmp_path: Path) -> None:
    """after_change in observe mode: the restore it would make counts, so the restart, the verify
    and kubelet's restart are said as they would be done."""
    node = Node(tmp_path, mode="observe")
    sighup(node)
    node.write(HALF)
    await node.after(0.3)
    would = [r.fields["ACTION"] for r in node.sink.of(RecordKind.ACTION) if r.fields["OUTCOME"] == "would-do"]
    assert would == ["restore-config", "restart-unit", "verify-containerd", "restart-unit"]
    assert node.units.calls == []
    assert node.config.read_text() == HALF
    node.close()
