"""Property tests: the socket-directory repair on hostile trees and hostile mountinfo.

A pod with a hostPath mount of the socket path writes what it likes into the directory found there:
any bytes as names (not UTF-8, newlines, the manifest's own name), FIFOs, symlinks to anything, hard
links, deep folders. Whatever it holds, and whatever the bounds, the repair frees the socket path
and succeeds, nothing outside the directory is read, and nothing is lost: either the quarantine
holds all of it (files byte for byte, symlinks as symlinks, the rest in the manifest) and the aside
copy is gone, or the aside copy is kept exactly as it was. Bounded under the "ci" profile; ``make
fuzz`` runs many more cases.
"""

from __future__ import annotations

import asyncio
import json
import os
import stat
import tempfile
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nodemedic.actions.base import ActionContext, Step
from nodemedic.actions.socket_dir import MANIFEST, RemoveSocketDir, mount_points
from nodemedic.policy.actions import RemoveSocketDirParams

from .fakes import FakeClock, FakeProbe, FakeUnits

pytestmark = pytest.mark.unit
SECRET = b"host secret: never copied"


def kernel_escape(path: bytes) -> bytes:
    """What the kernel writes for a mount point in mountinfo (fs/proc_namespace.c: " \\t\\n\\\\")."""
    return b"".join(b"\\%03o" % c if c in b" \t\n\\" else bytes([c]) for c in path)


mount_point = st.binary(max_size=40).filter(lambda b: b"\x00" not in b).map(lambda b: b"/" + b)


@given(st.lists(mount_point, max_size=8))
def test_mount_points_come_back_byte_for_byte(points: list[bytes]) -> None:
    text = b"".join(
        b"%d 1 0:%d / %s rw - fuse.x src rw\n" % (i, i, kernel_escape(p)) for i, p in enumerate(points)
    )
    assert mount_points(text) == points


@given(st.binary(max_size=400))
def test_any_mountinfo_text_parses_without_error(text: bytes) -> None:
    assert all(isinstance(p, bytes) for p in mount_points(text))


# ---- hostile trees ----------------------------------------------------------------------------

name = st.binary(min_size=1, max_size=12).filter(lambda b: b"/" not in b and b"\x00" not in b)
name = name.filter(lambda b: b not in (b".", b"..")) | st.just(os.fsencode(MANIFEST))
entry = st.tuples(
    st.sampled_from(["file", "dir", "fifo", "symlink", "hardlink", "secret-link"]),
    name,
    st.binary(max_size=40),
    st.integers(0, 5),  # which folder made so far it goes in
)
bounds = st.fixed_dictionaries(
    {
        "max_bytes": st.integers(0, 120),
        "max_entries": st.integers(1, 25),
        "max_depth": st.integers(1, 4),
    }
)


def build(top: Path, outside: Path, entries: list[tuple[str, bytes, bytes, int]]) -> None:
    folders: list[bytes] = [os.fsencode(top)]
    files: list[bytes] = []
    for kind, raw, payload, where in entries:
        path = os.path.join(folders[where % len(folders)], raw)
        if os.path.lexists(path):
            continue
        if kind == "file" or (kind == "hardlink" and not files):
            Path(os.fsdecode(path)).write_bytes(payload)
            files.append(path)
        elif kind == "hardlink":
            os.link(files[len(payload) % len(files)], path)
        elif kind == "dir":
            os.mkdir(path)
            folders.append(path)
        elif kind == "fifo":
            os.mkfifo(path)
        else:
            target = payload.replace(b"\x00", b"") or b"/"  # a link target holds no NUL
            os.symlink(os.fsencode(outside) if kind == "secret-link" else target, path)


def snapshot(top: Path) -> dict[bytes, tuple[str, bytes]]:
    """Every entry under ``top`` (not followed): its kind and content or link target."""
    out: dict[bytes, tuple[str, bytes]] = {}
    base = os.fsencode(top)
    for dirpath, dirs, files in os.walk(base):
        for n in dirs + files:
            p = os.path.join(dirpath, n)
            rel = os.path.relpath(p, base)
            mode = os.lstat(p).st_mode
            if stat.S_ISLNK(mode):
                out[rel] = ("symlink", os.readlink(p))
            elif stat.S_ISREG(mode):
                out[rel] = ("file", Path(os.fsdecode(p)).read_bytes())
            else:
                out[rel] = ("dir" if stat.S_ISDIR(mode) else "special", b"")
    return out


def repair(root: Path, quarantine: Path, params: dict[str, Any]) -> str:
    sock = str(root / "containerd.sock")
    act = RemoveSocketDir(
        RemoveSocketDirParams(do="remove-socket-dir", paths=[sock], root=str(root), **params)
    )
    c = ActionContext(FakeUnits(), FakeProbe(), FakeClock(), quarantine)
    detail: str = asyncio.run(act.apply(c, Step("remove", paths=(sock,))))
    return detail


def check_copy(kept: Path, before: dict[bytes, tuple[str, bytes]], rows: dict[bytes, Any]) -> None:
    """A complete copy: every entry is in the manifest, files and symlinks are in the quarantine."""
    assert set(before) <= set(rows)
    after = snapshot(kept)
    for rel, (kind, content) in before.items():
        if kind == "special":
            assert rows[rel]["type"] == "fifo"
            assert rel not in after
        else:
            assert after[rel] == (kind, content)


@given(st.lists(entry, min_size=1, max_size=14), bounds)
def test_a_hostile_tree_is_freed_and_nothing_is_lost_or_read_from_outside(
    entries: list[tuple[str, bytes, bytes, int]], params: dict[str, Any]
) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root, outside = Path(tmp, "run"), Path(tmp, "secret")
        outside.write_bytes(SECRET)
        (root / "containerd.sock").mkdir(parents=True)
        build(root / "containerd.sock", outside, entries)
        before = snapshot(root / "containerd.sock")

        detail = repair(root, Path(tmp, "quarantine"), params)

        assert not os.path.lexists(root / "containerd.sock"), detail
        [kept] = list(Path(tmp, "quarantine").iterdir())
        manifest = json.loads((kept / MANIFEST).read_bytes())
        rows = {os.fsencode(r["path"]): r for r in manifest["entries"]}
        assert all(SECRET not in content for kind, content in snapshot(kept).values() if kind == "file")
        asides = [p for p in root.iterdir() if p.name.startswith(".containerd.sock.nodemedic-")]
        if manifest["complete"]:
            assert asides == [], detail
            check_copy(kept, before, rows)
        else:
            assert manifest["skipped"], "an incomplete copy says why"
            assert [snapshot(a) for a in asides] == [before], "the aside copy is kept exactly as it was"
        assert outside.read_bytes() == SECRET
