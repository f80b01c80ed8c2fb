"""The placeholder's system calls on a real folder, with containerd's moves put in at the one
moment a test cannot otherwise reach: between our link and our last look."""

from __future__ import annotations

import os
import socket
import stat
from pathlib import Path

import pytest

from nodemedic.actions import placeholder_socket
from nodemedic.actions.placeholder_socket import make_placeholder, sweep_temporaries

pytestmark = pytest.mark.unit


def bind(path: Path) -> socket.socket:
    """A socket bound at ``path`` (through its folder's fd: pytest's folders are long for AF_UNIX)."""
    fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    own = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        own.bind(f"/proc/self/fd/{fd}/{path.name}")
    finally:
        os.close(fd)
    return own


def test_containerds_socket_bound_right_after_our_link_is_never_taken_for_ours(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "containerd.sock"
    real_link, held = os.link, []

    def link_then_containerd_starts(*args: object, **kwargs: object) -> None:
        real_link(*args, **kwargs)  # type: ignore[arg-type]
        path.unlink()  # containerd's CreateUnixSocket: unlink, then bind its own
        held.append(bind(path))

    monkeypatch.setattr(placeholder_socket.os, "link", link_then_containerd_starts)
    placed = make_placeholder(str(path), 0o660, os.geteuid(), os.getegid())
    monkeypatch.undo()
    theirs = os.lstat(path).st_ino
    assert placed.inode != theirs, "containerd's real socket recorded as our placeholder"
    assert placed.replaced == f"a socket (inode {theirs})"
    assert os.listdir(tmp_path) == ["containerd.sock"], "no temporary left"
    held[0].close()


def test_a_placeholder_made_undisturbed_is_ours(tmp_path: Path) -> None:
    path = tmp_path / "containerd.sock"
    placed = make_placeholder(str(path), 0o640, os.geteuid(), os.getegid())
    st = os.lstat(path)
    assert (placed.inode, placed.ctime_ns, placed.replaced) == (st.st_ino, st.st_ctime_ns, "")
    assert stat.S_IMODE(st.st_mode) == 0o640


def test_stale_temporaries_of_ours_are_swept_and_nothing_else(tmp_path: Path) -> None:
    path = tmp_path / "containerd.sock"
    ours = tmp_path / ".containerd.sock.nodemedic-0123456789ab"
    bind(ours).close()
    kept = [
        tmp_path / ".containerd.sock.nodemedic-0123456789ab.x",  # another name
        tmp_path / ".other.sock.nodemedic-0123456789ab",  # another path's
    ]
    for other in kept:
        bind(other).close()
    not_a_socket = tmp_path / ".containerd.sock.nodemedic-ba9876543210"
    not_a_socket.write_text("someone's file")
    assert sweep_temporaries(str(path)) == [str(ours)]
    assert sorted(os.listdir(tmp_path)) == sorted(p.name for p in [*kept, not_a_socket])
    assert sweep_temporaries(str(tmp_path / "gone" / "containerd.sock")) == [], "no folder: nothing"


def test_a_config_nested_too_deep_gives_the_default_owner(tmp_path: Path) -> None:
    """tomllib raises RecursionError on a deep enough nesting: the owner falls back to 0:0, never
    an exception inside the placeholder's making."""
    config = tmp_path / "config.toml"
    config.write_text("x = " + "[" * 100_000 + "]" * 100_000 + "\n[grpc]\nuid = 5\n")
    assert placeholder_socket.socket_owner(str(config), "/run/containerd/containerd.sock") == (0, 0)
