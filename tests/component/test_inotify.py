"""PathWatcher with real inotify on real temporary directories."""

from __future__ import annotations

import os
import shutil
import socket
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from asyncinotify import Inotify, Mask, Watch

from nodemedic.clock import MonotonicClock
from nodemedic.events import PathChanged, PathKind
from nodemedic.sources.inotify import PathWatcher

from .helpers import Recorder, eventually, running

pytestmark = pytest.mark.component


@dataclass
class Node:
    """Where containerd's sockets live on the fake node."""

    root: Path

    @property
    def run_dir(self) -> Path:
        return self.root / "run" / "containerd"

    @property
    def sock(self) -> Path:
        return self.run_dir / "containerd.sock"

    @property
    def ttrpc(self) -> Path:
        return self.run_dir / "containerd.sock.ttrpc"


@pytest.fixture
def node(short_tmp: Path) -> Node:
    return Node(short_tmp)


@contextmanager
def bound_socket(path: Path) -> Iterator[socket.socket]:
    """A unix socket bound at ``path``, as containerd leaves it (also after an abrupt exit)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(str(path))
        yield sock
    finally:
        sock.close()


async def change(events: Recorder, path: Path) -> PathKind:
    """The next PathChanged, which must be about ``path``; its kind."""
    event = await events.next()
    assert isinstance(event, PathChanged)
    assert event.path == str(path), event
    assert event.source == "inotify"
    return event.kind


async def initial(events: Recorder, node: Node) -> dict[str, PathKind]:
    got = {}
    for _ in range(2):
        event = await events.next()
        assert isinstance(event, PathChanged)
        got[event.path] = event.kind
    assert set(got) == {str(node.sock), str(node.ttrpc)}
    return got


def watcher_of(node: Node) -> tuple[Recorder, PathWatcher]:
    events = Recorder()
    return events, PathWatcher([str(node.sock), str(node.ttrpc)], events.emit, MonotonicClock())


@pytest.fixture
async def events(node: Node) -> AsyncIterator[Recorder]:
    """A running PathWatcher on containerd.sock and containerd.sock.ttrpc, after its first report."""
    node.run_dir.mkdir(parents=True)
    recorder, watcher = watcher_of(node)
    async with running(recorder, watcher.run()):
        assert await initial(recorder, node) == {
            str(node.sock): PathKind.MISSING,
            str(node.ttrpc): PathKind.MISSING,
        }
        yield recorder


async def test_directory_at_the_socket_path(node: Node, events: Recorder) -> None:
    node.sock.mkdir()
    assert await change(events, node.sock) is PathKind.DIRECTORY

    node.sock.rmdir()
    assert await change(events, node.sock) is PathKind.MISSING


async def test_socket_at_the_socket_path(node: Node, events: Recorder) -> None:
    with bound_socket(node.sock):
        assert await change(events, node.sock) is PathKind.SOCKET
        node.sock.unlink()
        assert await change(events, node.sock) is PathKind.MISSING


async def test_symlink_at_the_socket_path(node: Node, events: Recorder) -> None:
    with bound_socket(node.root / "elsewhere.sock"):
        node.sock.symlink_to(node.root / "elsewhere.sock")
        assert await change(events, node.sock) is PathKind.SYMLINK  # not followed


async def test_file_at_the_ttrpc_path(node: Node, events: Recorder) -> None:
    node.ttrpc.write_text("")
    assert await change(events, node.ttrpc) is PathKind.FILE
    node.ttrpc.unlink()
    assert await change(events, node.ttrpc) is PathKind.MISSING


async def test_state_at_start(node: Node) -> None:
    node.run_dir.mkdir(parents=True)
    node.sock.mkdir()
    events, watcher = watcher_of(node)
    with bound_socket(node.ttrpc):
        async with running(events, watcher.run()):
            assert await initial(events, node) == {
                str(node.sock): PathKind.DIRECTORY,
                str(node.ttrpc): PathKind.SOCKET,
            }


@pytest.mark.parametrize("missing", ["run", "run/containerd"])
async def test_parent_created_after_start(node: Node, missing: str) -> None:
    """/run/containerd does not exist until containerd first starts."""
    (node.root / missing).parent.mkdir(parents=True, exist_ok=True)
    events, watcher = watcher_of(node)
    async with running(events, watcher.run()):
        assert set((await initial(events, node)).values()) == {PathKind.MISSING}

        node.run_dir.mkdir(parents=True)
        node.sock.mkdir()
        assert await change(events, node.sock) is PathKind.DIRECTORY

        # and the new directory goes on being watched
        with bound_socket(node.ttrpc):
            assert await change(events, node.ttrpc) is PathKind.SOCKET


async def test_parent_removed_and_recreated(node: Node, events: Recorder) -> None:
    with bound_socket(node.sock):
        assert await change(events, node.sock) is PathKind.SOCKET

        shutil.rmtree(node.run_dir)
        assert await change(events, node.sock) is PathKind.MISSING

        node.run_dir.mkdir(parents=True)
        node.sock.mkdir()
        assert await change(events, node.sock) is PathKind.DIRECTORY

    # a second time, all at once, without waiting for the watcher in between
    shutil.rmtree(node.run_dir)
    node.run_dir.mkdir(parents=True)
    with bound_socket(node.sock):
        assert await change(events, node.sock) is PathKind.SOCKET


async def test_a_burst_ends_in_the_final_state(node: Node, events: Recorder) -> None:
    # Each burst runs without yielding to the loop, so the watcher wakes only after it, to a
    # queue of inotify events that describe states long gone: it must report what is there now.
    node.sock.mkdir()
    node.sock.rmdir()
    with bound_socket(node.sock):
        node.sock.unlink()
    node.sock.symlink_to(node.ttrpc)
    node.sock.unlink()
    node.sock.mkdir()
    assert await change(events, node.sock) is PathKind.DIRECTORY

    node.sock.rmdir()
    node.sock.mkdir()
    node.sock.rmdir()
    node.ttrpc.mkdir()
    assert await change(events, node.sock) is PathKind.MISSING
    assert await change(events, node.ttrpc) is PathKind.DIRECTORY


async def test_create_then_remove_reports_nothing(node: Node, events: Recorder) -> None:
    node.sock.mkdir()
    node.sock.rmdir()
    # A barrier: events are handled in order, so once the ttrpc change is reported everything
    # about containerd.sock before it was handled too.
    node.ttrpc.mkdir()

    assert await change(events, node.ttrpc) is PathKind.DIRECTORY
    assert events.pending() == []
    assert not os.path.lexists(node.sock)


async def test_a_directory_created_while_its_parent_is_being_watched(
    node: Node, monkeypatch: pytest.MonkeyPatch
) -> None:
    """/run/containerd appears between the check for it and the watch on /run.

    The creation happens before the watch exists, so no inotify event tells of it; the watcher
    must look again after adding a watch. (The race is forced here by creating the directory
    from inside add_watch, as containerd would from another process.)
    """
    node.root.mkdir(exist_ok=True)
    real_add_watch = Inotify.add_watch

    def racing_add_watch(self: Inotify, path: str, mask: Mask) -> Watch:
        if Path(path) == node.root / "run" and not node.run_dir.exists():
            node.run_dir.mkdir()
        return real_add_watch(self, path, mask)

    monkeypatch.setattr(Inotify, "add_watch", racing_add_watch)
    events, watcher = watcher_of(node)
    async with running(events, watcher.run()):
        assert set((await initial(events, node)).values()) == {PathKind.MISSING}
        (node.root / "run").mkdir()
        # The watcher woke, watched run/ and (in the same step) looked at the paths again.
        await eventually(node.run_dir.exists)

        node.sock.mkdir()
        assert await change(events, node.sock) is PathKind.DIRECTORY
