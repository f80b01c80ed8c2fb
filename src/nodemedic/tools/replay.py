"""`nodemedic replay` (being written: issue 13)."""

from __future__ import annotations

import argparse


def add_command(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    cmd = sub.add_parser("replay", help="(not yet available)")
    cmd.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    print("nodemedic replay: not yet available")
    return 2
