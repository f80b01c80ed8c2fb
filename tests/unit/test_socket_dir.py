"""remove-socket-dir on real files: never follow a symlink, never lose data, never leave its root."""

from __future__ import annotations

import errno
import json
import os
import socket
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from nodemedic.actions import socket_dir
from nodemedic.actions.base import ActionContext, Skip, Step
from nodemedic.actions.socket_dir import MANIFEST, RemoveSocketDir
from nodemedic.errors import UnsafePathError
from nodemedic.policy.actions import RemoveSocketDirParams

from .fakes import FakeClock, FakeProbe, FakeUnits

pytestmark = pytest.mark.unit


@pytest.fixture
def root(tmp_path: Path) -> Path:
    r = tmp_path / "run" / "containerd"
    r.mkdir(parents=True)
    return r


def action(root: Path, **bounds: object) -> RemoveSocketDir:
    paths = [str(root / "containerd.sock"), str(root / "containerd.sock.ttrpc")]
    return RemoveSocketDir(
        RemoveSocketDirParams(do="remove-socket-dir", paths=paths, root=str(root), **bounds)  # type: ignore[arg-type]
    )


def ctx(tmp_path: Path, clock: FakeClock | None = None) -> ActionContext:
    return ActionContext(FakeUnits(), FakeProbe(), clock or FakeClock(), tmp_path / "quarantine")


async def repair(root: Path, tmp_path: Path, clock: FakeClock | None = None, **bounds: object) -> str:
    """Run the action on the directory at containerd.sock as the runner does; the detail it records."""
    act, c = action(root, **bounds), ctx(tmp_path, clock)
    step = await act.check(c)
    assert isinstance(step, Step)
    detail = await act.apply(c, step)
    await act.verify(c, step)
    assert not (root / "containerd.sock").exists(), "the socket path is free: containerd can start"
    return detail


def quarantined(tmp_path: Path) -> tuple[Path, dict[str, Any], dict[str, dict[str, Any]]]:
    """The one quarantine entry, its manifest, and the manifest's rows by path."""
    [kept] = list((tmp_path / "quarantine").iterdir())
    manifest = json.loads((kept / MANIFEST).read_text())
    return kept, manifest, {row["path"]: row for row in manifest["entries"]}


def asides(root: Path) -> list[Path]:
    return [p for p in root.iterdir() if p.name.startswith(".containerd.sock.nodemedic-")]


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


# ---- issue 11, finding 1b: /proc/self/mountinfo is bytes ------------------------------------


def fake_mountinfo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, *points: bytes) -> None:
    """A mountinfo whose mount points are written as the kernel writes them (octal escapes)."""
    lines = [b"22 1 0:21 / / rw,relatime shared:1 - ext4 /dev/vda1 rw"]
    for i, point in enumerate(points):
        escaped = b"".join(b"\\%03o" % c if c in b" \t\n\\" else bytes([c]) for c in point)
        lines.append(b"%d 22 0:%d / %s rw,nosuid - fuse.sshfs user@host:/ rw" % (30 + i, 40 + i, escaped))
    (tmp_path / "mountinfo").write_bytes(b"\n".join(lines) + b"\n")
    monkeypatch.setattr(socket_dir, "MOUNTINFO", str(tmp_path / "mountinfo"))


async def test_a_mount_point_that_is_not_utf8_does_not_stop_the_repair(
    root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # an ordinary user's FUSE mount; the old strict UTF-8 read raised UnicodeDecodeError here
    fake_mountinfo(tmp_path, monkeypatch, b"/home/u/caf\xe9 \xff\xfe", b"/home/u/a\\b\tc")
    (root / "containerd.sock").mkdir()
    (root / "containerd.sock" / "data").write_text("keep")
    assert "moved non-empty directory" in await repair(root, tmp_path)


@pytest.mark.parametrize(
    "inside", [b"", b"/pod vol", b"/caf\xc3\xa9", b"/\xff\xfe"], ids=["itself", "space", "utf8", "not-utf8"]
)
async def test_a_mount_point_at_or_inside_the_path_is_refused_whatever_its_bytes(
    root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, inside: bytes
) -> None:
    sock = root / "containerd.sock"
    sock.mkdir()
    (sock / "file").write_text("on the mounted file system")
    fake_mountinfo(tmp_path, monkeypatch, b"/other/\xff", os.fsencode(sock) + inside)
    act, c = action(root), ctx(tmp_path)
    with pytest.raises(UnsafePathError, match="mount point"):
        await act.apply(c, Step("remove", paths=(str(sock),)))
    assert (sock / "file").read_text() == "on the mounted file system"


def test_mountinfo_escapes_are_decoded_on_bytes() -> None:
    text = b"1 2 0:3 / /a\\040b\\011c\\012d\\134e\\377 rw - tmpfs x rw\n\nshort line\n"
    assert socket_dir.mount_points(text) == [b"/a b\tc\nd\\e\xff"]


# ---- issue 11, finding 2: hostile content in the directory ------------------------------------


async def test_special_files_are_listed_never_opened_and_the_repair_succeeds(
    root: Path, tmp_path: Path
) -> None:
    """A FIFO made the old copy fail: the repair was recorded as failed although containerd served."""
    sock = root / "containerd.sock"
    sock.mkdir()
    (sock / "data").write_text("keep me")
    os.mkfifo(sock / "pipe")
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(sock / "pod.sock"))
    try:
        detail = await repair(root, tmp_path)
    finally:
        s.close()
    kept, manifest, rows = quarantined(tmp_path)
    assert str(kept) in detail
    assert (kept / "data").read_text() == "keep me"
    assert rows["pipe"]["type"] == "fifo"
    assert rows["pod.sock"]["type"] == "socket"
    assert not rows["pipe"]["copied"]
    assert "skipped" not in rows["pipe"]
    assert not (kept / "pipe").exists(), "never recreated"
    assert not (kept / "pod.sock").exists(), "never recreated"
    assert manifest["complete"] is True
    assert asides(root) == [], "all of it is copied or described: the aside copy is removed"


async def test_symlinks_are_recreated_never_followed(root: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_text("host secret")
    sock = root / "containerd.sock"
    sock.mkdir()
    (sock / "root").symlink_to("/")
    (sock / "secret").symlink_to(outside / "secret")
    (sock / "folder").symlink_to(outside)
    await repair(root, tmp_path)
    kept, _, rows = quarantined(tmp_path)
    assert {rows[n]["target"] for n in ("root", "secret", "folder")} == {
        "/",
        str(outside / "secret"),
        str(outside),
    }
    assert all(rows[n]["type"] == "symlink" for n in ("root", "secret", "folder"))
    assert os.readlink(kept / "root") == "/"
    assert "host secret" not in contents_of_regular_files(kept)


async def test_hard_links_stay_hard_links_and_show_in_the_manifest(root: Path, tmp_path: Path) -> None:
    sock = root / "containerd.sock"
    (sock / "sub").mkdir(parents=True)
    (sock / "data").write_text("one inode")
    os.link(sock / "data", sock / "sub" / "again")
    await repair(root, tmp_path)
    kept, manifest, rows = quarantined(tmp_path)
    assert rows["data"]["nlink"] == rows["sub/again"]["nlink"] == 2
    assert rows["data"]["inode"] == rows["sub/again"]["inode"]
    linked = {rows["data"].get("link_of"), rows["sub/again"].get("link_of")} - {None}
    assert linked in ({"data"}, {"sub/again"})
    assert os.stat(kept / "data").st_ino == os.stat(kept / "sub" / "again").st_ino
    assert manifest["copied_bytes"] == len("one inode"), "copied once"


async def test_device_nodes_are_listed_never_opened(root: Path, tmp_path: Path) -> None:
    sock = root / "containerd.sock"
    sock.mkdir()
    try:
        os.mknod(sock / "mem", 0o600 | stat.S_IFCHR, os.makedev(1, 1))  # /dev/mem
    except PermissionError:
        pytest.skip("mknod is not allowed here")
    await repair(root, tmp_path)
    kept, _, rows = quarantined(tmp_path)
    assert rows["mem"]["type"] == "char-device"
    assert rows["mem"]["rdev"] == "1:1"
    assert not (kept / "mem").exists()


async def test_a_file_over_max_bytes_is_skipped_and_the_directory_kept_whole(
    root: Path, tmp_path: Path
) -> None:
    sock = root / "containerd.sock"
    sock.mkdir()
    (sock / "big").write_bytes(b"x" * 100)
    (sock / "small").write_bytes(b"y" * 10)
    detail = await repair(root, tmp_path, max_bytes=50)
    kept, manifest, rows = quarantined(tmp_path)
    assert "max_bytes (50)" in rows["big"]["skipped"]
    assert not (kept / "big").exists(), "no file is copied in part"
    assert (kept / "small").read_bytes() == b"y" * 10
    assert manifest["complete"] is False
    [aside] = asides(root)
    assert (aside / "big").read_bytes() == b"x" * 100, "what was not copied is kept aside"
    assert (aside / "small").exists(), "the aside directory is kept whole"
    assert str(aside) in detail
    assert "kept it there whole" in detail


async def test_a_deep_tree_is_walked_to_max_depth(root: Path, tmp_path: Path) -> None:
    deep = root / "containerd.sock"
    for _ in range(10):
        deep = deep / "d"
    deep.mkdir(parents=True)
    (deep / "bottom").write_text("deep")
    await repair(root, tmp_path, max_depth=3)
    _, manifest, rows = quarantined(tmp_path)
    assert "max_depth (3)" in rows["d/d/d"]["skipped"]
    assert "d/d/d/d" not in rows
    assert manifest["complete"] is False
    [aside] = asides(root)
    assert (aside / deep.relative_to(root / "containerd.sock") / "bottom").read_text() == "deep"


async def test_the_deepest_walk_allowed_fits_in_the_stack_and_the_descriptors(
    root: Path, tmp_path: Path
) -> None:
    deep = root / "containerd.sock"
    for _ in range(120):
        deep = deep / "d"
    deep.mkdir(parents=True)
    await repair(root, tmp_path, max_depth=100)
    _, manifest, _ = quarantined(tmp_path)
    assert manifest["skipped"] == ["at max_depth (100): not entered"]


async def test_a_million_entries_stop_at_max_entries(root: Path, tmp_path: Path) -> None:
    sock = root / "containerd.sock"
    (sock / "many").mkdir(parents=True)
    for i in range(60):
        (sock / "many" / f"f{i}").write_text("x")
    await repair(root, tmp_path, max_entries=20)
    _, manifest, rows = quarantined(tmp_path)
    assert manifest["entries_walked"] == 20
    assert "max_entries (20) reached" in rows["many"]["skipped"]
    assert rows["many"]["type"] == "rest-of-directory"
    assert len(asides(root)) == 1


async def test_the_copy_stops_at_max_seconds(root: Path, tmp_path: Path) -> None:
    sock = root / "containerd.sock"
    sock.mkdir()
    for i in range(20):
        (sock / f"f{i}").write_text("x")
    detail = await repair(root, tmp_path, clock=FakeClock(tick=1.0), max_seconds="5s")
    _, manifest, _ = quarantined(tmp_path)
    assert any("max_seconds (5) passed" in reason for reason in manifest["skipped"])
    assert "max_seconds" in detail
    [aside] = asides(root)
    assert len(list(aside.iterdir())) == 20


async def test_a_symlink_swapped_in_for_the_socket_path_before_the_rename_is_not_followed(
    root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_text("host secret")
    sock = root / "containerd.sock"
    sock.mkdir()
    (sock / "data").write_text("pod data")
    real_rename = os.rename

    def swap_then_rename(src: Any, dst: Any, **kw: Any) -> None:
        if src == "containerd.sock":  # between the failed rmdir and the rename
            real_rename(sock, tmp_path / "pods-dir")
            sock.symlink_to(outside)
        real_rename(src, dst, **kw)

    monkeypatch.setattr(os, "rename", swap_then_rename)
    act, c = action(root), ctx(tmp_path)
    detail = await act.apply(c, Step("remove", paths=(str(sock),)))
    assert "symlink" in detail
    assert str(outside) in detail
    assert not os.path.lexists(sock), "the socket path is free"
    [aside] = asides(root)
    assert aside.is_symlink(), "the symlink itself is left aside, its target never copied"
    assert "host secret" not in contents_of_regular_files(tmp_path / "quarantine")
    assert (outside / "secret").read_text() == "host secret"


class _Listed:
    """What os.scandir returns, listed in full before ``then`` runs (a swap after the listing)."""

    def __init__(self, it: Any, then: Any) -> None:
        self.entries = list(it)
        it.close()
        then()

    def __enter__(self) -> _Listed:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def __iter__(self) -> Iterator[os.DirEntry[str]]:
        return iter(self.entries)

    def close(self) -> None:
        pass


async def test_a_folder_swapped_for_a_symlink_during_the_copy_is_not_followed(
    root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_text("host secret")
    sock = root / "containerd.sock"
    (sock / "sub").mkdir(parents=True)
    (sock / "sub" / "data").write_text("pod data")
    real_scandir = os.scandir
    calls: list[object] = []

    def swap_after_listing(arg: Any = ".") -> Any:
        calls.append(arg)
        if len(calls) > 1:
            return real_scandir(arg)

        def swap() -> None:
            aside = asides(root)[0]
            (aside / "sub").rename(tmp_path / "pods-sub")
            (aside / "sub").symlink_to(outside)

        return _Listed(real_scandir(arg), swap)

    monkeypatch.setattr(os, "scandir", swap_after_listing)
    await repair(root, tmp_path)
    assert "host secret" not in contents_of_regular_files(tmp_path / "quarantine")
    _, _, rows = quarantined(tmp_path)
    assert rows["sub"]["type"] == "symlink" or "skipped" in rows["sub"]


async def test_a_top_level_entry_named_like_the_manifest_is_not_copied(root: Path, tmp_path: Path) -> None:
    sock = root / "containerd.sock"
    sock.mkdir()
    (sock / MANIFEST).write_text('{"forged": true}')
    await repair(root, tmp_path)
    _, manifest, rows = quarantined(tmp_path)
    assert "forged" not in manifest
    assert "manifest" in rows[MANIFEST]["skipped"]
    [aside] = asides(root)
    assert (aside / MANIFEST).read_text() == '{"forged": true}'


async def test_a_failed_copy_leaves_no_partial_tree_and_keeps_the_original(
    root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sock = root / "containerd.sock"
    sock.mkdir()
    (sock / "data").write_text("keep me")

    def disk_full(*args: object) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(socket_dir, "_write_new", disk_full)
    detail = await repair(root, tmp_path)  # the socket path is free: the repair succeeds
    assert "kept it there" in detail
    assert "No space left on device" in detail
    [aside] = asides(root)
    assert (aside / "data").read_text() == "keep me"
    assert list((tmp_path / "quarantine").iterdir()) == [], "no partial copy under any name"


async def test_what_changes_during_the_copy_is_kept_aside(
    root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sock = root / "containerd.sock"
    sock.mkdir()
    (sock / "data").write_text("copied")
    (sock / "grows").write_text("v1")
    real_write_new = socket_dir._write_new

    def pod_writes_meanwhile(dir_fd: int, name: str, data: bytes) -> None:
        real_write_new(dir_fd, name, data)
        [aside] = asides(root)
        (aside / "late").write_text("written after the copy")
        with (aside / "grows").open("a") as f:
            f.write(" v2")

    monkeypatch.setattr(socket_dir, "_write_new", pod_writes_meanwhile)
    detail = await repair(root, tmp_path)
    [aside] = asides(root)
    assert str(aside) in detail
    assert "changed" in detail
    assert sorted(p.name for p in aside.iterdir()) == ["grows", "late"]
    assert (aside / "grows").read_text() == "v1 v2"
    kept, _, _ = quarantined(tmp_path)
    assert (kept / "data").read_text() == "copied"


def test_bounds_are_checked_when_the_policy_loads() -> None:
    with pytest.raises(ValidationError, match="max_depth"):
        RemoveSocketDirParams(do="remove-socket-dir", max_depth=0)
    with pytest.raises(ValidationError, match="max_seconds"):
        RemoveSocketDirParams.model_validate({"do": "remove-socket-dir", "max_seconds": "0s"})
    assert (
        RemoveSocketDirParams.model_validate({"do": "remove-socket-dir", "max_seconds": "1m"}).max_seconds
        == 60
    )


def contents_of_regular_files(top: Path) -> str:
    """Everything in the regular files under ``top``, walked without following any symlink."""
    out = []
    for dirpath, _dirs, files in os.walk(top):
        for name in files:
            p = Path(dirpath, name)
            if stat.S_ISREG(p.lstat().st_mode):
                out.append(p.read_text(errors="replace"))
    return "\n".join(out)


async def test_the_manifest_is_bounded_so_hostile_names_cannot_exhaust_memory(
    root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """255-byte names that are not UTF-8 cost 6 JSON bytes a byte: 48 KB a row 32 folders deep, 490 MB
    at max_entries (found by review). Past the manifest's bound the walk stops and nothing is lost."""
    monkeypatch.setattr(socket_dir, "MAX_MANIFEST_BYTES", 200_000)
    sock = root / "containerd.sock"
    sock.mkdir()
    deep = os.fsencode(sock)
    for _ in range(8):
        deep = deep + b"/" + b"\xff" * 255
        os.mkdir(deep)
    for i in range(400):
        with open(deep + b"/" + str(i).encode(), "wb"):
            pass
    detail = await repair(root, tmp_path)
    kept, manifest, _ = quarantined(tmp_path)
    assert len((kept / MANIFEST).read_bytes()) < 400_000, "bounded near MAX_MANIFEST_BYTES"
    assert manifest["complete"] is False
    assert any("the manifest's bound" in reason for reason in manifest["skipped"])
    assert "kept it there whole" in detail
    [aside] = asides(root)
    assert sum(1 for _ in os.walk(aside)) == 9, "the directory is kept aside whole"


async def test_a_quarantine_that_cannot_be_made_still_frees_the_socket_path(
    root: Path, tmp_path: Path
) -> None:
    """A full or read-only state directory (issue 12, fault matrix item 3): the repair still runs."""
    sock = root / "containerd.sock"
    sock.mkdir()
    (sock / "data").write_text("pod data")
    (tmp_path / "quarantine").write_text("a file where the quarantine folder should be")  # mkdir fails
    detail = await repair(root, tmp_path)
    assert "kept it there: no quarantine" in detail
    [aside] = asides(root)
    assert (aside / "data").read_text() == "pod data"
