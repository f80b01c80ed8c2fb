"""``nodemedic status``: what nodemedic knows now, asked of the daemon over D-Bus, or read from its
state files when it is not running. The snapshot itself is built by ``nodemedic.snapshot``."""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from dbus_fast import AuthError, BusType, Message, MessageFlag, MessageType
from dbus_fast.aio import MessageBus

from nodemedic.api import BUS_NAME, INTERFACE, NO_OWNER, OBJECT_PATH
from nodemedic.errors import NodemedicError
from nodemedic.policy.load import DEFAULT_POLICY
from nodemedic.snapshot import SCHEMA, Snapshot, offline_status
from nodemedic.tools.paint import Paint, painter, wants_colour

TIMEOUT = 5.0
SERVICE = "nodemedic.service"
RUNNING, NOT_RUNNING, UNREADABLE = 0, 1, 2  # cli.py's EXIT_CODES


class DaemonNotRunning(NodemedicError, ConnectionError):
    """Nobody owns nodemedic's name on the system bus, or the bus cannot be reached."""


class DaemonNoAnswer(NodemedicError, TimeoutError):
    """nodemedic owns its name but gave no status (no answer in time, an error, not a status)."""


def add_command(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    cmd = sub.add_parser(
        "status",
        help="show what nodemedic knows now: its rules, breakers, repair budget, SIGHUP guard",
        description=(
            "Asks the running daemon (D-Bus, io.nodemedic1); when it is not running, reads its "
            "state files and says so. Exit 0: the daemon answered; 1: it is not running (the "
            "persisted state is shown); 2: nothing could be read, or the daemon did not answer."
        ),
    )
    cmd.add_argument("--json", action="store_true", help="print the status as JSON (schema: docs/cli.md)")
    cmd.add_argument(
        "--policy",
        type=Path,
        default=DEFAULT_POLICY,
        help="the policy whose state files are read when the daemon is not running (%(default)s)",
    )
    cmd.add_argument(
        "--timeout", type=float, default=TIMEOUT, metavar="SECONDS", help="how long to wait for the daemon"
    )
    cmd.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    out = sys.stdout
    colour = wants_colour(out)
    try:
        snap, code = ask_daemon(args.timeout), RUNNING
    except (DaemonNotRunning, DaemonNoAnswer) as exc:
        why = str(exc)
        code = NOT_RUNNING if isinstance(exc, DaemonNotRunning) else UNREADABLE
        try:
            snap = offline_status(args.policy, why)
        except (NodemedicError, OSError) as problem:
            print(
                f"nodemedic is not running ({why}), and its state cannot be read: {problem}", file=sys.stderr
            )
            return UNREADABLE
    if args.json:
        out.write(json.dumps(snap, indent=2) + "\n")
    else:
        out.write(render(snap, colour))
    return code


# ---- asking the daemon ------------------------------------------------------------------------------


def ask_daemon(timeout: float = TIMEOUT) -> Snapshot:
    """The daemon's ``Status()`` over the system bus, parsed. Raises DaemonNotRunning (no owner of
    the name, no bus) or DaemonNoAnswer."""
    try:
        return asyncio.run(_ask(timeout))
    except DaemonNotRunning as exc:
        if _unit_active():  # it runs, but without its name: say so rather than "not running"
            raise DaemonNoAnswer(f"{SERVICE} is active but {exc}; see journalctl -u {SERVICE}") from exc
        raise


async def _ask(timeout: float) -> Snapshot:
    bus = MessageBus(bus_type=BusType.SYSTEM)  # DBUS_SYSTEM_BUS_ADDRESS, where set, names another
    try:
        await asyncio.wait_for(bus.connect(), timeout)
    except (OSError, EOFError, AuthError, asyncio.TimeoutError) as exc:
        raise DaemonNotRunning(f"the system bus cannot be reached: {exc or type(exc).__name__}") from exc
    call = Message(
        destination=BUS_NAME,
        path=OBJECT_PATH,
        interface=INTERFACE,
        member="Status",
        flags=MessageFlag.NO_AUTOSTART,
    )
    try:
        reply = await asyncio.wait_for(bus.call(call), timeout)
    except asyncio.TimeoutError as exc:
        raise DaemonNoAnswer(f"{BUS_NAME} did not answer within {timeout:g}s") from exc
    except (OSError, EOFError) as exc:
        raise DaemonNoAnswer(f"the bus connection broke: {exc or type(exc).__name__}") from exc
    finally:
        bus.disconnect()
    return parse_reply(reply)


def parse_reply(reply: Message) -> Snapshot:
    """The status in a reply to ``Status()``; raises what the reply says instead."""
    if reply.message_type == MessageType.ERROR:
        if reply.error_name in NO_OWNER:
            raise DaemonNotRunning(f"no process owns {BUS_NAME} on the system bus")
        detail = reply.body[0] if reply.body else ""
        raise DaemonNoAnswer(f"{BUS_NAME} answered {reply.error_name}: {detail}")
    try:
        snap = json.loads(reply.body[0])
    except (IndexError, TypeError, ValueError) as exc:
        raise DaemonNoAnswer(f"{BUS_NAME} answered something that is not a status: {exc}") from exc
    if not isinstance(snap, dict) or snap.get("schema") != SCHEMA:
        raise DaemonNoAnswer(f"{BUS_NAME} answered a status of another schema than {SCHEMA}")
    return snap


def _unit_active() -> bool:
    exe = shutil.which("systemctl")
    if exe is None:
        return False
    try:
        done = subprocess.run(  # noqa: S603 (a fixed program, our own arguments)
            [exe, "is-active", "--quiet", SERVICE], check=False, capture_output=True, timeout=TIMEOUT
        )
    except (OSError, subprocess.SubprocessError):  # TimeoutExpired is no OSError: a hung systemd
        return False  # unknown is "not running", the answer without a systemctl at all
    return done.returncode == 0


# ---- the readable summary ---------------------------------------------------------------------------


def render(snap: Snapshot, colour: bool = False) -> str:
    """The snapshot for a person: the daemon in a line, the rules as a table, the budget, the
    SIGHUP guard and the frozen cgroups; colours only where ``colour``."""
    paint = painter(colour)
    lines = [_daemon_line(snap, paint), _policy_line(snap), ""]
    lines += _table(snap, paint)
    lines += ["", _budget_line(snap["budget"]), _guard_line(snap["sighup"], snap["running"], paint)]
    lines.append(_frozen_line(snap["frozen"]))
    lines += [paint(f"note: {e}", "yellow") for e in snap.get("errors") or []]
    return "\n".join(lines) + "\n"


def _daemon_line(snap: Snapshot, paint: Paint) -> str:
    if not snap["running"]:
        why = snap.get("why_not_running") or "unknown why"
        return paint(f"nodemedic is not running ({why})", "yellow")
    uptime = snap.get("uptime_s")
    up = f" (up {duration(uptime)})" if uptime is not None else ""
    since = f" since {snap['started_at']}{up}" if snap.get("started_at") else ""
    return f"nodemedic {snap['version']} {paint('running', 'green')}{since}, mode {snap['mode']}"


def _policy_line(snap: Snapshot) -> str:
    policy = snap.get("policy") or {}
    sha = policy.get("sha256")
    line = f"policy {policy.get('path') or '?'} (sha256 {sha[:12] if sha else 'unknown'})"
    return line if snap["running"] else f"from its state files: mode {snap['mode']}, {line}"


def _table(snap: Snapshot, paint: Paint) -> list[str]:
    rows = [(("RULE", ""), ("MODE", ""), ("BREAKER", ""), ("LAST REPAIR", ""))]
    for rule in snap["rules"]:
        mode = (rule["mode"], "yellow" if rule["mode"] == "observe" else "")
        rows.append(((rule["name"], ""), mode, _breaker_cell(rule), _repair_cell(rule)))
    widths = [max(len(row[i][0]) for row in rows) for i in range(3)]
    lines = []
    for n, row in enumerate(rows):
        cells = [text.ljust(widths[i]) if i < 3 else text for i, (text, _c) in enumerate(row)]
        painted = [paint(cell, "bold" if n == 0 else row[i][1]) for i, cell in enumerate(cells)]
        lines.append("  ".join(painted).rstrip())
    if len(rows) == 1:
        lines.append("(no rules)")
    return lines


def _breaker_cell(rule: dict[str, Any]) -> tuple[str, str]:
    breaker, backoff = rule.get("breaker"), rule.get("backoff")
    if breaker is None:
        return "unknown", "yellow"
    state = breaker["state"]
    if state == "open":
        text = f"open until {breaker['reopens_at']} ({breaker['recent_failures']} failures)"
        return text, "red"
    if backoff and backoff.get("not_before"):
        return f"{state}, backing off until {backoff['not_before']} ({backoff['failures']} failed)", "yellow"
    return state, "yellow" if state == "half-open" else "green"


def _repair_cell(rule: dict[str, Any]) -> tuple[str, str]:
    if rule.get("running"):
        return "repair under way", "yellow"
    last = rule.get("last_repair")
    if last is None:
        return "none" if rule.get("running") is not None else "none known", ""
    took = f", {last['elapsed_ms']:.0f} ms" if last.get("elapsed_ms") is not None else ""
    outcome = last["outcome"]
    good = {"repaired": "green", "recovered": "green", "not-repaired": "red", "compensated": "red"}
    return f"{outcome} {last['at']}{took}", good.get(outcome, "")


def _budget_line(budget: dict[str, Any]) -> str:
    window = duration(budget["window_s"])
    if budget["spent"] is None:
        return f"budget: {budget['repairs']} repairs within {window}; spent unknown"
    spent = f"{budget['spent']} of {budget['repairs']} repairs spent within {window}"
    line = f"budget: {spent}; {budget['left']} left"
    if budget.get("next_free_at"):
        line += f" (next at {budget['next_free_at']})"
    return line


def _guard_line(guard: dict[str, Any], running: bool, paint: Paint) -> str:
    storm = guard.get("storm")
    if not running:
        return f"sighup guard: {guard['mode']}; storms are known only while the daemon runs"
    if storm is None:
        return f"sighup guard: {guard['mode']}; no storm seen since the start"
    who = f"{storm['signals']} SIGHUPs from {storm['senders'] or 'unknown senders'}"
    mode = f"sighup guard: {guard['mode']}"
    if storm["state"] == "under-way":
        return f"{mode}; {paint('storm under way', 'red')} since {storm['began_at']}: {who}"
    return f"{mode}; last storm {storm['began_at']} to {storm['ended_at']}: {who}"


def _frozen_line(frozen: list[dict[str, Any]] | None) -> str:
    if frozen is None:
        return "frozen cgroups: unknown"
    if not frozen:
        return "frozen cgroups: none"
    return "frozen cgroups: " + ", ".join(f"{f['cgroup']} (until {f['until']})" for f in frozen)


def duration(seconds: float) -> str:
    """``45s``, ``12m 03s``, ``2h 03m``, ``3d 04h``."""
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m {s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h {s % 3600 // 60:02d}m"
    return f"{s // 86400}d {s % 86400 // 3600:02d}h"
