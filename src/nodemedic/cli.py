"""The command line: the only place that parses argv and exits.

Its help speaks to operators (``DESCRIPTION``, ``EXIT_CODES``); this docstring is for developers."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import NoReturn

from nodemedic import __version__, api
from nodemedic.actions.freezer import REGISTRY_NAME, Freezer
from nodemedic.actions.sighup_dropin import ignores_sighup, remove_dropins
from nodemedic.errors import NodemedicError, PolicyError, UnitControlError, UnknownRuleError
from nodemedic.policy.load import (
    DEFAULT_POLICY,
    load_policy,
    salvage_state_dir,
)
from nodemedic.policy.model import DaemonSettings
from nodemedic.policy.sighup import SighupSettings
from nodemedic.store import StateStore
from nodemedic.tools import diagnose, replay, status

log = logging.getLogger("nodemedic")
JOURNAL_SOCKET = "/run/systemd/journal/socket"
SERVICE = "nodemedic.service"
_LINE = re.compile(r"^\d+: ")


def run() -> NoReturn:
    """``python -m nodemedic``: exit with what ``main`` returns (the one SystemExit of nodemedic)."""
    raise SystemExit(main())


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, args.log_level.upper()), format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        return int(args.func(args))
    except PolicyError as exc:
        # file:line: problem, the form editors and grep understand
        print(f"invalid policy {exc.path}: {len(exc.problems)} problem(s)", file=sys.stderr)
        for problem in exc.problems:
            print(f"{exc.path}:{'' if _LINE.match(problem) else ' '}{problem}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # `nodemedic replay | head`: the reader has what it wanted
        with contextlib.suppress(OSError, ValueError):  # no second error at the flush at exit
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except (NodemedicError, OSError) as exc:
        log.error("%s", exc)
        log.debug("details", exc_info=True)
        return 1


DESCRIPTION = """\
nodemedic keeps containerd working on this node: it watches systemd, the journal, containerd's
socket paths and containerd itself, repairs the faults its policy (/etc/nodemedic/policy.toml)
knows, and writes every decision to the journal (journalctl -u nodemedic)."""

EXIT_CODES = """\
exit codes:
  0  done (status: the daemon runs; diagnose: healthy)
  1  a problem: an invalid policy, a failed command, or (status) nodemedic is not running: what
     its state files say is shown; for diagnose, 1 means only: a fault found on this node
  2  could not check (diagnose: its policy or what was needed could not be read; status: what was
     needed could not be read; replay: the journal or file could not be read); wrong usage"""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nodemedic",
        description=DESCRIPTION,
        epilog=EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"nodemedic {__version__}")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    sub = parser.add_subparsers(required=True, metavar="COMMAND")
    run = sub.add_parser("run", help="run the daemon")
    run.add_argument("--policy", type=Path, default=DEFAULT_POLICY, help="policy file (%(default)s)")
    run.set_defaults(func=_run)
    check = sub.add_parser("check", help="validate a policy file; exit 0 if valid, 1 with every error")
    check.add_argument("policy", type=Path, nargs="?", default=DEFAULT_POLICY)
    check.add_argument(
        "--ignore-owner",
        action="store_true",
        help="skip the check that only root can write the file (for a draft not yet installed)",
    )
    check.set_defaults(func=_check)
    _add_operator_commands(sub)
    for tool in (status, diagnose, replay):
        tool.add_command(sub)
    _add_cleanup_commands(sub)
    # No help=: argparse then leaves it out of the command list; it is for `make docs`, not operators.
    reference = sub.add_parser("policy-reference", description="write docs/policy.md from the models")
    reference.add_argument("--write", type=Path, metavar="PATH", help="write the reference to PATH")
    reference.set_defaults(func=_policy_reference)
    return parser


def _add_operator_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    mode = sub.add_parser("mode", help="set observe or enforce mode in the policy, and reload nodemedic")
    mode.add_argument("mode", choices=["observe", "enforce"])
    mode.add_argument("--rule", metavar="NAME", help="set the mode of this rule only, not of [daemon]")
    mode.add_argument("--policy", type=Path, default=DEFAULT_POLICY, help="policy file (%(default)s)")
    mode.add_argument("--no-reload", action="store_true", help="only edit the file; do not reload nodemedic")
    mode.set_defaults(func=_mode)
    reset = sub.add_parser("reset", help="close a rule's circuit breaker, once the cause is fixed")
    reset.add_argument("rule", metavar="RULE")
    reset.add_argument("--policy", type=Path, default=DEFAULT_POLICY, help="policy file (%(default)s)")
    reset.add_argument("--no-reload", action="store_true", help="only file the request; do not reload")
    reset.set_defaults(func=_reset)


def _add_cleanup_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    thaw = sub.add_parser("thaw", help="thaw every cgroup nodemedic froze (the unit's ExecStopPost)")
    thaw.add_argument("--policy", type=Path, default=DEFAULT_POLICY, help="policy file (%(default)s)")
    thaw.set_defaults(func=_thaw)
    restore = sub.add_parser(
        "sighup-restore", help="stock SIGHUP behaviour again: remove nodemedic's drop-ins, thaw everything"
    )
    restore.add_argument("--policy", type=Path, default=DEFAULT_POLICY, help="policy file (%(default)s)")
    restore.set_defaults(func=_sighup_restore)


def _policy_reference(args: argparse.Namespace) -> int:
    from nodemedic.policy.reference import render

    text = render()
    if args.write is None:
        sys.stdout.write(text)
    else:
        args.write.write_text(text, encoding="utf-8")
    return 0


def _check(args: argparse.Namespace) -> int:
    policy = load_policy(args.policy, check_owner=not args.ignore_owner)
    print(f"{args.policy}: valid, {len(policy.rule)} rule(s), mode {policy.daemon.mode}")
    return 0


def _run(args: argparse.Namespace) -> int:
    from nodemedic.app import build_app
    from nodemedic.daemon import Daemon
    from nodemedic.report import JournalSink, Reporter, Sink, StderrSink

    policy = load_policy(args.policy)
    sink: Sink = JournalSink() if os.path.exists(JOURNAL_SOCKET) else StderrSink()

    async def serve() -> None:
        loop = asyncio.get_running_loop()
        shutdown, reload = asyncio.Event(), asyncio.Event()
        # Handlers only queue the request; the daemon acts on it in its loop.
        loop.add_signal_handler(signal.SIGTERM, shutdown.set)
        loop.add_signal_handler(signal.SIGINT, shutdown.set)
        loop.add_signal_handler(signal.SIGHUP, reload.set)
        app = build_app(policy, Reporter(sink), policy_path=args.policy, reload=reload.set)
        await Daemon(app, shutdown, reload).run()

    asyncio.run(serve())
    return 0


def _mode(args: argparse.Namespace) -> int:
    """Through the running daemon's API where it serves this policy file (it edits the file and
    reloads); else on the file, then `systemctl reload`."""
    path: Path = args.policy
    rule: str | None = args.rule
    if not args.no_reload:
        said = api.call_daemon("SetMode", "ss", [args.mode, rule or ""], policy_path=path)
        if said is not None:
            print(said[0])
            return 0
    change = api.change_mode(path, args.mode, rule)
    print("\n".join(change.lines))
    if change.changed and not args.no_reload:
        _reload_nodemedic()
    return 0


def _reset(args: argparse.Namespace) -> int:
    """Through the running daemon's API, at once; else a request file the daemon takes at its next
    reload or start."""
    policy = load_policy(args.policy)
    names = [r.name for r in policy.rule]
    if args.rule not in names:
        raise UnknownRuleError(
            f"no rule named {args.rule!r}; the policy's rules: {', '.join(map(repr, names))}"
        )
    if not args.no_reload:
        said = api.call_daemon("Reset", "s", [args.rule], policy_path=args.policy)
        if said is not None:
            print(said[0])
            return 0
    request = StateStore(policy.daemon.state_dir).request_reset(args.rule)
    print(f"reset of rule {args.rule!r} requested ({request})")
    if not args.no_reload:
        _reload_nodemedic()
    return 0


def _thaw(args: argparse.Namespace) -> int:
    """Runs after nodemedic ended, however it ended: a broken policy must not keep anything frozen."""
    _daemon, _sighup = _settings_for_cleanup(args.policy)
    return _thaw_all(_daemon.state_dir)


def _sighup_restore(args: argparse.Namespace) -> int:
    daemon, sighup = _settings_for_cleanup(args.policy)
    unit = sighup.unit
    removed = remove_dropins(unit)
    for path in removed:
        print(f"removed {path}")
    if not removed:
        print(f"no nodemedic drop-in for {unit} in /run or /etc")
    status, why = systemctl("daemon-reload")
    if status != 0:
        raise UnitControlError(
            f"`systemctl daemon-reload` failed (exit {status}: {why or '?'}): run it by hand"
        )
    print("systemd reloaded its unit files (daemon-reload)")
    failed = _thaw_all(daemon.state_dir)
    pid = _main_pid(unit)
    if pid and ignores_sighup(pid):
        print(
            f"{unit} (PID {pid}) keeps ignoring SIGHUP until its next start; `systemctl restart "
            f"{unit}` makes it stock now (KillMode=process: containers keep running)"
        )
    else:
        print(f"{unit} has stock SIGHUP behaviour (a SIGHUP makes it exit)")
    if sighup.mode in ("coalesce", "throttle") and systemctl("is-active", "--quiet", SERVICE)[0] == 0:
        print(
            f"note: {SERVICE} runs with [sighup] mode = {sighup.mode!r} and will act again; "
            f"set another mode in {args.policy} and `systemctl reload {SERVICE}`"
        )
    return failed


def _settings_for_cleanup(path: Path) -> tuple[DaemonSettings, SighupSettings]:
    """The policy's settings; where it cannot be loaded, its ``[daemon].state_dir`` if that much can
    be read, else the default: cleaning up never waits for a fix."""
    try:
        policy = load_policy(path)
    except Exception as exc:  # whatever the failure, ExecStopPost must still thaw
        state_dir = salvage_state_dir(path)
        daemon = DaemonSettings() if state_dir is None else DaemonSettings(state_dir=state_dir)
        first = exc.problems[0] if isinstance(exc, PolicyError) and exc.problems else repr(exc)
        whose = "the default" if state_dir is None else "the policy's own"
        log.warning(
            "cannot use the policy %s (%s); using %s state directory %s and the default unit %s",
            path,
            first,
            whose,
            daemon.state_dir,
            SighupSettings().unit,
        )
        return daemon, SighupSettings()
    return policy.daemon, policy.sighup


def _thaw_all(state_dir: Path) -> int:
    freezer = Freezer(registry=state_dir / REGISTRY_NAME)
    try:
        thawed = freezer.thaw_all()
    except (NodemedicError, OSError, ValueError) as exc:  # e.g. an unreadable registry
        print(f"could not thaw what {freezer.registry} lists: {exc}", file=sys.stderr)
        return 1
    for cgroup in thawed:
        print(f"thawed {cgroup}")
    if not thawed and not freezer.failed:
        print(f"nothing frozen by nodemedic ({freezer.registry})")
    for cgroup, why in freezer.failed.items():
        print(f"could not thaw {cgroup}: {why}", file=sys.stderr)
    return 1 if freezer.failed else 0


def _main_pid(unit: str) -> int:
    exe = shutil.which("systemctl")
    if exe is None:
        return 0
    done = subprocess.run(  # noqa: S603 (a fixed program, our own arguments)
        [exe, "show", "-p", "MainPID", "--value", unit], check=False, capture_output=True, text=True
    )
    return int(done.stdout.strip() or 0) if done.returncode == 0 else 0


def _reload_nodemedic() -> None:
    if systemctl("is-active", "--quiet", SERVICE)[0] != 0:
        print(f"{SERVICE} is not running; the change applies at its next start")
        return
    status, why = systemctl("reload", SERVICE)
    if status != 0:
        raise UnitControlError(
            f"the policy was written but `systemctl reload {SERVICE}` failed (exit {status}: {why or '?'}):"
            f" see `journalctl -u {SERVICE}`, then run `systemctl reload {SERVICE}`"
        )
    print(f"reloaded {SERVICE}; see `journalctl -u {SERVICE}` for whether it took the new policy")


def systemctl(*args: str) -> tuple[int, str]:
    """Run ``systemctl ARGS``: its exit status (127 where it is not installed) and its stderr."""
    exe = shutil.which("systemctl")
    if exe is None:
        return 127, "systemctl not found"
    done = subprocess.run(  # noqa: S603 (a fixed program, our own arguments)
        [exe, *args], check=False, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    return done.returncode, " ".join(done.stderr.split())
