"""remove-socket-dir on real files: never follow a symlink, never lose data, never leave its root."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from pydantic import ValidationError

from nodemedic.actions.base import ActionContext, Skip, Step
from nodemedic.actions.socket_dir import RemoveSocketDir, RemoveSocketDirParams
from nodemedic.errors import RepairFailedError

from .fakes import FakeClock, FakeProbe, FakeUnits

pytestmark = pytest.mark.unit


@pytest.fixture
def root(tmp_path: Path) -> Path:
    r = tmp_path / "run" / "containerd"
    r.mkdir(parents=True)
    return r


def action(root: Path) -> RemoveSocketDir:
    paths = [str(root / "containerd.sock"), str(root / "containerd.sock.ttrpc")]
    return RemoveSocketDir(RemoveSocketDirParams(do="remove-socket-dir", paths=paths, root=str(root)))


def ctx(tmp_path: Path) -> ActionContext:
    return ActionContext(FakeUnits(), FakeProbe(), FakeClock(), tmp_path / "quarantine")


async def test_empty_directory_is_removed(root: Path, tmp_path: Path) -> None:
    (root / "containerd.sock.ttrpc").mkdir()
    act = action(root)
    step = await act.check(ctx(tmp_path))
    assert isinstance(step, Step)
    assert step.paths == (str(root / "containerd.sock.ttrpc"),)
    assert "removed empty directory" in await act.apply(ctx(tmp_path), step)
    await act.verify(ctx(tmp_path), step)
    assert not (root / "containerd.sock.ttrpc").exists()


async def test_non_empty_directory_is_quarantined_intact(root: Path, tmp_path: Path) -> None:
    sock = root / "containerd.sock"
    (sock / "sub").mkdir(parents=True)
    (sock / "sub" / "data").write_bytes(b"precious")
    (sock / "link").symlink_to("/etc/hostname")
    act = action(root)
    c = ctx(tmp_path)
    step = await act.check(c)
    assert isinstance(step, Step)
    detail = await act.apply(c, step)
    assert not sock.exists()
    [kept] = list((tmp_path / "quarantine").iterdir())
    assert kept.name.endswith("-containerd.sock")
    assert (kept / "sub" / "data").read_bytes() == b"precious"
    assert os.readlink(kept / "link") == "/etc/hostname"
    assert str(kept) in detail
    assert [p.name for p in root.iterdir()] == [], "the aside copy is removed once quarantined"


async def test_symlink_is_never_followed(root: Path, tmp_path: Path) -> None:
    target = tmp_path / "elsewhere"
    target.mkdir()
    (target / "file").write_text("keep")
    (root / "containerd.sock").symlink_to(target)
    step = await action(root).check(ctx(tmp_path))
    assert isinstance(step, Skip)
    assert (target / "file").read_text() == "keep"
    assert (root / "containerd.sock").is_symlink()


async def test_symlinked_root_is_refused(tmp_path: Path) -> None:
    real = tmp_path / "real"
    (real / "containerd.sock").mkdir(parents=True)
    link = tmp_path / "linkroot"
    link.symlink_to(real)
    act = action(link)
    step = Step("remove", paths=(str(link / "containerd.sock"),))
    with pytest.raises(OSError, match=r"Too many levels|symbolic link|ELOOP|Not a directory"):
        await act.apply(ctx(tmp_path), step)
    assert (real / "containerd.sock").is_dir()


def test_paths_outside_root_are_refused_when_the_policy_loads(root: Path) -> None:
    with pytest.raises(ValidationError, match="directly inside root"):
        RemoveSocketDir(
            RemoveSocketDirParams(do="remove-socket-dir", paths=["/etc/containerd"], root=str(root))
        )


@pytest.mark.parametrize(
    "path", ["/run/containerd//containerd.sock", "/run/containerd/../etc/containerd.sock"]
)
def test_paths_must_be_normalised(path: str) -> None:
    with pytest.raises(ValidationError, match="normalised"):
        RemoveSocketDirParams(do="remove-socket-dir", paths=[path])


async def test_a_failed_copy_leaves_no_partial_tree_and_keeps_the_original(
    root: Path, tmp_path: Path
) -> None:
    import socket

    sock = root / "containerd.sock"
    sock.mkdir()
    (sock / "data").write_text("keep me")
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(sock / "pod.sock"))  # a socket cannot be copied
    try:
        act, c = action(root), ctx(tmp_path)
        step = await act.check(c)
        assert isinstance(step, Step)
        with pytest.raises(RepairFailedError, match="is kept"):
            await act.apply(c, step)
    finally:
        s.close()
    assert not sock.exists(), "the socket path is free: containerd can start"
    [aside] = [p for p in root.iterdir() if p.name.startswith(".containerd.sock.nodemedic-")]
    assert (aside / "data").read_text() == "keep me"
    assert list((tmp_path / "quarantine").iterdir()) == [], "no partial copy under any name"
