"""Fixtures for system tests: real systemd nodes booted in the lab (root + systemd-nspawn).

`node` is a freshly booted node per test; `node_factory(tracefs=..., containers=...)` boots more
(or differently configured) nodes, all torn down after the test. See lab/README.md.
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

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


@pytest.fixture(scope="session")
def lab_image() -> Path:
    """The node image, built (about 80 s) or unpacked (about 1 s) once per session."""
    reason = _unmet_requirement()
    if reason is not None:
        pytest.skip(reason)
    return ensure_image()


@pytest.fixture
def node_factory(lab_image: Path) -> Iterator[NodeFactory]:
    """Boot nodes with `Node.boot` options; every node is torn down after the test."""
    booted: list[Node] = []

    def boot(**options: object) -> Node:
        new = Node.boot(image=lab_image, **options)  # type: ignore[arg-type]
        booted.append(new)
        return new

    try:
        yield boot
    finally:
        for each in reversed(booted):
            each.shutdown()


@pytest.fixture
def node(lab_image: Path) -> Iterator[Node]:
    """A pristine node: systemd as PID 1, containerd answering, kubelet stand-in running."""
    with Node.boot(image=lab_image) as booted:
        yield booted
