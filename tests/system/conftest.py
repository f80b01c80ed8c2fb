"""Fixtures for system tests: real systemd nodes booted in the lab (root + systemd-nspawn).

`node` is a freshly booted node per test; `node_factory(tracefs=..., containers=...,
host_proc=...)` boots more (or differently configured) nodes, all torn down after the test;
`lab_image` is the image path and `lab_host` only skips where nodes cannot boot. See lab/README.md.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType

import pytest

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from lab.image import ensure_image  # noqa: E402
from lab.node import Node  # noqa: E402

NodeFactory = Callable[..., Node]


def _unmet_requirement() -> str | None:
    if os.geteuid() != 0:
        return "system tests need root: they boot lab nodes with systemd-nspawn"
    if shutil.which("systemd-nspawn") is None:
        return "systemd-nspawn is missing (apt-get install systemd-container)"
    return None


def _interrupt(signum: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def _tear_down_on_sigterm() -> None:
    """A cancelled CI job gets SIGTERM: make it a KeyboardInterrupt so nodes are torn down."""
    main = threading.current_thread() is threading.main_thread()
    if main and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _interrupt)


@pytest.fixture(scope="session")
def lab_host() -> None:
    """Skip unless this host can boot nodes (root, systemd-nspawn); tear down on SIGTERM."""
    reason = _unmet_requirement()
    if reason is not None:
        pytest.skip(reason)
    _tear_down_on_sigterm()


@pytest.fixture(scope="session")
def lab_image(lab_host: None) -> Path:
    """The node image, built (about 70 s) or unpacked (about 1 s) once per session."""
    return ensure_image()


@pytest.fixture
def node_factory(lab_image: Path) -> Iterator[NodeFactory]:
    """Boot nodes with `Node.boot` options; every node is torn down after the test."""
    with contextlib.ExitStack() as teardown:  # runs every shutdown even if one raises

        def boot(*, tracefs: bool = False, containers: bool = False, host_proc: bool = False,
                 ready_timeout: float = 30) -> Node:  # fmt: skip
            new = Node.boot(image=lab_image, tracefs=tracefs, containers=containers, host_proc=host_proc,
                            ready_timeout=ready_timeout)  # fmt: skip
            teardown.callback(new.shutdown)
            return new

        yield boot


@pytest.fixture
def node(lab_image: Path) -> Iterator[Node]:
    """A pristine node: systemd as PID 1, containerd answering, kubelet stand-in running."""
    with Node.boot(image=lab_image) as booted:
        yield booted
