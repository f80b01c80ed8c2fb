"""`python3 -m lab build` prepares the node image; `python3 -m lab shell` opens bash in a fresh node."""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
from collections.abc import Sequence
from types import FrameType

from lab.image import ensure_image
from lab.node import NODE_ENV, Node


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m lab", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("build", help="build (or unpack) the node image and print its path")
    shell = commands.add_parser("shell", help="boot a node, open bash in it, tear it down on exit")
    shell.add_argument("--tracefs", action="store_true", help="bind the host's tracefs in")
    shell.add_argument("--containers", action="store_true", help="allow `ctr run` in the node")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        parser.error("the lab needs root (debootstrap, systemd-nspawn, nsenter)")
    signal.signal(signal.SIGTERM, _interrupt)  # tear the node down on SIGTERM too
    if args.command == "build":
        print(ensure_image())
        return 0
    return shell_in_node(tracefs=args.tracefs, containers=args.containers)


def _interrupt(signum: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def shell_in_node(*, tracefs: bool, containers: bool) -> int:
    """Interactive bash in a new node; the node is torn down when the shell exits."""
    with Node.boot(tracefs=tracefs, containers=containers) as node:
        print(f"node {node.name} (PID 1 = host PID {node.leader}); exit the shell to remove it",
              file=sys.stderr)  # fmt: skip
        env = {**NODE_ENV, "TERM": os.environ.get("TERM", "xterm")}
        # Ctrl-C belongs to the shell; a Python handler (unlike SIG_IGN) is not inherited by it.
        previous = signal.signal(signal.SIGINT, lambda _sig, _frame: None)
        try:
            bash = ["nsenter", "-t", str(node.leader), "-a", "--", "/bin/bash", "--login"]
            return subprocess.run(bash, env=env, check=False).returncode
        finally:
            signal.signal(signal.SIGINT, previous)


if __name__ == "__main__":
    sys.exit(main())
