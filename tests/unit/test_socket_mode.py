"""restore-socket-mode on a real unix socket in a tmp dir: the bits are put back on the very inode
checked, nothing that is not that socket is ever followed or touched (a symlink, a FIFO, a socket
swapped in after the check), an owner it cannot chown back is left to the restart; and the shipped
containerd-socket-mode rule, run by the executor, restarts nothing for wrong bits and restarts
containerd only for a wrong owner."""

from __future__ import annotations

import asyncio
import os
import socket
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import tomllib

from nodemedic.actions.base import ActionContext, Skip, Step
from nodemedic.actions.registry import build_action
from nodemedic.actions.socket_mode import RestoreSocketMode
from nodemedic.errors import RepairFailedError, UnsafePathError
from nodemedic.events import SocketModeSeen, UnitChanged
from nodemedic.executor import Executor
from nodemedic.policy.actions import RestartUnitParams, RestoreSocketModeParams
from nodemedic.policy.load import parse_policy
from nodemedic.report import MemorySink, RecordKind, Reporter

from .fakes import FakeClock, FakeProbe, FakeUnits

pytestmark = pytest.mark.unit
SHIPPED = Path(__file__).resolve().parents[2] / "policy" / "policy.toml"
SHIPPED_SOCKET = "/run/containerd/containerd.sock"


def listen(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(path))
    sock.listen()
    return sock


@pytest.fixture
def sock(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "containerd.sock"
    server = listen(path)
    chmod(path, 0o660)
    yield path
    server.close()


def restore(path: Path, **kw: Any) -> RestoreSocketMode:
    owner = {"uid": os.getuid(), "gid": os.getgid()}
    params = RestoreSocketModeParams(do="restore-socket-mode", path=str(path), **{**owner, **kw})
    action = build_action(params)
    assert isinstance(action, RestoreSocketMode)
    return action


def ctx(tmp_path: Path, units: FakeUnits | None = None) -> ActionContext:
    return ActionContext(units or FakeUnits(), FakeProbe(), FakeClock(), quarantine_dir=tmp_path)  # type: ignore[arg-type]


def chmod(path: Path, mode: int) -> None:
    """What the pod or the operator does (wide modes on purpose: that is the fault)."""
    os.chmod(path, mode)


def mode_of(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


@pytest.mark.parametrize("wrong", [0o666, 0o600, 0o000, 0o777])
async def test_wrong_bits_are_put_back_on_the_same_socket(tmp_path: Path, sock: Path, wrong: int) -> None:
    chmod(sock, wrong)
    inode = os.lstat(sock).st_ino
    action = restore(sock)
    step = await action.check(ctx(tmp_path))
    assert isinstance(step, Step)
    assert step.changes
    assert step.paths == (str(sock),)
    assert f"it is {wrong:04o}" in step.summary
    assert mode_of(sock) == wrong, "the check changes nothing"
    done = await action.apply(ctx(tmp_path), step)
    assert f"mode {wrong:04o} -> 0660" in done
    assert "is mode 0660" in await action.verify(ctx(tmp_path), step)
    assert mode_of(sock) == 0o660
    assert os.lstat(sock).st_ino == inode, "the socket containerd listens on, not a new one"


async def test_a_socket_already_right_is_skipped(tmp_path: Path, sock: Path) -> None:
    skip = await restore(sock).check(ctx(tmp_path))
    assert skip == Skip(f"{sock} is already mode 0660")


async def test_a_missing_path_is_skipped(tmp_path: Path) -> None:
    skip = await restore(tmp_path / "gone.sock").check(ctx(tmp_path))
    assert isinstance(skip, Skip)
    assert "does not exist" in skip.reason


async def test_another_owner_is_left_to_the_restart(tmp_path: Path, sock: Path) -> None:
    chmod(sock, 0o666)
    skip = await restore(sock, uid=os.getuid() + 1).check(ctx(tmp_path))
    assert isinstance(skip, Skip)
    assert "cannot chown it back" in skip.reason
    assert "restart of containerd" in skip.reason
    assert mode_of(sock) == 0o666


async def test_a_symlink_is_never_followed(tmp_path: Path, sock: Path) -> None:
    chmod(sock, 0o600)
    link = tmp_path / "link.sock"
    link.symlink_to(sock)
    skip = await restore(link).check(ctx(tmp_path))
    assert isinstance(skip, Skip)
    assert "a symlink, not a socket" in skip.reason
    assert mode_of(sock) == 0o600, "the link's target is untouched"


async def test_a_fifo_is_refused(tmp_path: Path) -> None:
    fifo = tmp_path / "containerd.sock"
    os.mkfifo(fifo, 0o600)
    skip = await restore(fifo).check(ctx(tmp_path))
    assert isinstance(skip, Skip)
    assert "a FIFO, not a socket" in skip.reason
    assert mode_of(fifo) == 0o600


async def test_a_socket_swapped_in_after_the_check_is_not_touched(tmp_path: Path, sock: Path) -> None:
    chmod(sock, 0o666)
    action = restore(sock)
    step = await action.check(ctx(tmp_path))
    assert isinstance(step, Step)
    os.unlink(sock)
    other = listen(sock)  # another socket at the path, same owner
    try:
        chmod(sock, 0o606)
        with pytest.raises(UnsafePathError, match="replaced since it was checked"):
            await action.apply(ctx(tmp_path), step)
        assert mode_of(sock) == 0o606
    finally:
        other.close()


async def test_a_symlink_swapped_in_after_the_check_is_not_followed(tmp_path: Path, sock: Path) -> None:
    chmod(sock, 0o666)
    target = tmp_path / "target"
    target.write_text("")
    chmod(target, 0o604)
    action = restore(sock)
    step = await action.check(ctx(tmp_path))
    assert isinstance(step, Step)
    os.rename(sock, tmp_path / "moved.sock")
    sock.symlink_to(target)
    with pytest.raises(UnsafePathError):
        await action.apply(ctx(tmp_path), step)
    assert mode_of(target) == 0o604
    assert mode_of(tmp_path / "moved.sock") == 0o666


async def test_verify_fails_when_the_bits_are_wrong_again(tmp_path: Path, sock: Path) -> None:
    chmod(sock, 0o666)
    action = restore(sock)
    step = await action.check(ctx(tmp_path))
    assert isinstance(step, Step)
    await action.apply(ctx(tmp_path), step)
    chmod(sock, 0o600)
    with pytest.raises(RepairFailedError, match="mode 0600 after the chmod"):
        await action.verify(ctx(tmp_path), step)


def test_a_mode_with_special_bits_is_a_policy_error() -> None:
    for mode in ("4660", "rw-rw----", "0o660"):
        with pytest.raises(ValueError, match="mode"):
            RestoreSocketModeParams(do="restore-socket-mode", mode=mode)


@pytest.mark.parametrize(("owner", "restarts"), [("right", False), ("wrong", True), ("no socket", False)])
async def test_restart_unit_if_socket_owner_differs(
    tmp_path: Path, sock: Path, owner: str, restarts: bool
) -> None:
    uid, gid = os.getuid(), os.getgid()
    expected = {"right": f"{uid}:{gid}", "wrong": f"{uid + 1}:{gid}", "no socket": f"{uid}:{gid}"}[owner]
    path = tmp_path / "none.sock" if owner == "no socket" else sock
    params = RestartUnitParams(
        do="restart-unit", unit="containerd.service", if_socket_owner_differs=str(path), socket_owner=expected
    )
    step = await build_action(params).check(ctx(tmp_path, FakeUnits({"containerd.service": "active"})))
    assert isinstance(step, Step) is restarts, step


# ---- the shipped rule, run by the executor ---------------------------------------------------


def shipped_rule(sock: Path, uid: int, gid: int) -> dict[str, Any]:
    """The shipped containerd-socket-mode rule in enforce mode, on ``sock``, expecting ``uid:gid``."""
    text = SHIPPED.read_text().replace(SHIPPED_SOCKET, str(sock))
    [rule] = [r for r in tomllib.loads(text)["rule"] if r["name"] == "containerd-socket-mode"]
    rule["mode"] = "enforce"
    rule["trigger"][0].update(uid=uid, gid=gid)
    for action in rule["action"]:
        if action["do"] == "restore-socket-mode":
            action.update(uid=uid, gid=gid)
        elif "if_socket_owner_differs" in action:
            action["socket_owner"] = f"{uid}:{gid}"
    return rule


async def run_rule(
    tmp_path: Path, rule: dict[str, Any], seen: SocketModeSeen, state: tuple[str, str] = ("active", "running")
) -> tuple[FakeUnits, MemorySink]:
    units = FakeUnits({"containerd.service": state[0], "kubelet.service": "active"})
    sink = MemorySink()
    tasks: list[asyncio.Task[None]] = []
    ex = Executor(
        parse_policy({"rule": [rule]}),
        ctx(tmp_path, units),
        Reporter(sink),
        lambda c: tasks.append(asyncio.get_running_loop().create_task(c)),
    )
    ex.handle(UnitChanged("containerd.service", *state, main_pid=42))  # as D-Bus says
    ex.handle(seen)
    while tasks:
        await tasks.pop(0)
    return units, sink


def outcomes(sink: MemorySink) -> list[tuple[str, str]]:
    return [(r.fields.get("ACTION", ""), r.fields["OUTCOME"]) for r in sink.of(RecordKind.ACTION)]


async def test_the_shipped_rule_puts_wrong_bits_back_without_a_restart(tmp_path: Path, sock: Path) -> None:
    uid, gid = os.getuid(), os.getgid()
    chmod(sock, 0o666)
    units, sink = await run_rule(
        tmp_path, shipped_rule(sock, uid, gid), SocketModeSeen(str(sock), 0o666, uid, gid)
    )
    assert units.calls == [], "neither containerd nor kubelet restarted"
    assert mode_of(sock) == 0o660
    assert outcomes(sink) == [
        ("restart-unit", "skipped"),
        ("verify-containerd", "done"),
        ("restart-unit", "skipped"),
        ("restore-socket-mode", "done"),
    ]
    assert [r.fields["OUTCOME"] for r in sink.of(RecordKind.OUTCOME)] == ["repaired"]


async def test_the_shipped_rule_restarts_containerd_for_a_wrong_owner(tmp_path: Path, sock: Path) -> None:
    uid, gid = os.getuid(), os.getgid()
    chmod(sock, 0o666)
    rule = shipped_rule(sock, uid + 1, gid)  # the socket's owner is not the expected one
    units, sink = await run_rule(tmp_path, rule, SocketModeSeen(str(sock), 0o666, uid, gid))
    assert units.calls == [("restart", "containerd.service"), ("restart", "kubelet.service")]
    assert outcomes(sink)[-1] == ("restore-socket-mode", "skipped")
    assert mode_of(sock) == 0o666, "the fake restart made no new socket; nothing chmodded"


async def test_the_shipped_rule_in_observe_mode_says_only_the_chmod(tmp_path: Path, sock: Path) -> None:
    uid, gid = os.getuid(), os.getgid()
    chmod(sock, 0o600)
    rule = {**shipped_rule(sock, uid, gid), "mode": "observe"}
    units, sink = await run_rule(tmp_path, rule, SocketModeSeen(str(sock), 0o600, uid, gid))
    assert units.calls == []
    assert mode_of(sock) == 0o600
    would = [a for a, outcome in outcomes(sink) if outcome == "would-do"]
    assert would == ["verify-containerd", "restore-socket-mode"], "no restart would be made"


NOT_ACTIVE = [("activating", "auto-restart"), ("failed", "failed"), ("inactive", "dead")]


@pytest.mark.parametrize("state", NOT_ACTIVE)
async def test_the_shipped_rule_judges_no_socket_while_containerd_is_not_active(
    tmp_path: Path, sock: Path, state: tuple[str, str]
) -> None:
    """containerd down: the socket there is [placeholder]'s, root:root where nodemedic cannot
    chown to [grpc]'s uid/gid; restarting a failed containerd for it would count toward its breaker."""
    uid, gid = os.getuid(), os.getgid()
    rule = shipped_rule(sock, uid + 1, gid)  # [grpc] uid set; the placeholder keeps nodemedic's
    units, sink = await run_rule(tmp_path, rule, SocketModeSeen(str(sock), 0o660, uid, gid), state)
    assert units.calls == []
    assert outcomes(sink) == []
