"""The command line: the only place that parses argv and exits."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from pathlib import Path

from nodemedic import __version__
from nodemedic.errors import NodemedicError, PolicyError
from nodemedic.policy.load import DEFAULT_POLICY, load_policy

log = logging.getLogger("nodemedic")
JOURNAL_SOCKET = "/run/systemd/journal/socket"


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, args.log_level.upper()), format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        return int(args.func(args))
    except PolicyError as exc:
        print(exc, file=sys.stderr)
        return 1
    except NodemedicError as exc:
        log.error("%s", exc)
        log.debug("details", exc_info=True)
        return 1


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nodemedic", description=__doc__)
    parser.add_argument("--version", action="version", version=f"nodemedic {__version__}")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    sub = parser.add_subparsers(required=True, metavar="COMMAND")
    run = sub.add_parser("run", help="run the daemon")
    run.add_argument("--policy", type=Path, default=DEFAULT_POLICY, help="policy file (%(default)s)")
    run.set_defaults(func=_run)
    check = sub.add_parser("check", help="validate a policy file; exit 0 if valid, 1 with every error")
    check.add_argument("policy", type=Path, nargs="?", default=DEFAULT_POLICY)
    check.set_defaults(func=_check)
    return parser


def _check(args: argparse.Namespace) -> int:
    policy = load_policy(args.policy)
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
        app = build_app(policy, Reporter(sink), policy_path=args.policy)
        await Daemon(app, shutdown, reload).run()

    asyncio.run(serve())
    return 0
