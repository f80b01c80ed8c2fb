"""Remove a directory found where containerd's socket must be, without ever losing data.

Safety rules:
- only names directly inside ``root`` (default /run/containerd), reached through a directory fd
  opened with O_NOFOLLOW, so a symlinked ``root`` or path is never followed;
- a symlink at the socket path is never followed and never touched (containerd unlinks it itself);
- a path that is, or contains, a mount point is refused (/proc/self/mountinfo, compared as bytes):
  copying and removing it would destroy the mounted file system's data;
- an empty directory is removed; a non-empty one is first renamed aside inside ``root`` (atomic,
  frees the socket path at once). From then on the repair succeeds whatever the entry holds: it is
  opened relative to ``root``'s fd with O_NOFOLLOW (if something else was swapped in, it is left
  aside as it is, never followed) and walked fd-relative, never crossing a file system or a mount.
  Directories, regular files (opened O_PATH, checked to be regular, then read) and symlinks
  (recreated, never followed) are copied to the quarantine; FIFOs, sockets and device nodes are
  listed in the manifest and never opened. The copy is bounded (bytes, entries, depth, seconds):
  what is not copied is listed as skipped with the reason, and the aside directory is then kept
  whole. Only after a complete copy is the aside directory removed, and of it only the entries
  that were copied and did not change since.
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
import re
import shutil
import stat
from pathlib import Path

from nodemedic.actions.base import ActionContext, Skip, Step
from nodemedic.errors import NodemedicError, RepairFailedError, UnsafePathError
from nodemedic.policy.actions import RemoveSocketDirParams
from nodemedic.ports import Clock
from nodemedic.store import utc_stamp, write_all

MANIFEST = "MANIFEST.nodemedic.json"
# The manifest is built in memory: a pod's 255-byte names that are not UTF-8, 32 folders deep, took
# 48 KB a row as JSON (\udcXX escapes), 490 MB at max_entries, past MemoryMax= with containerd
# stopped. Past this many bytes of rows the walk stops, as at max_entries, and the directory stays
# aside whole.
MAX_MANIFEST_BYTES = 8 << 20
"""The manifest's name inside a quarantine entry; a top-level entry of that name is not copied."""
MOUNTINFO = "/proc/self/mountinfo"

_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
_PATH_ONLY = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC  # opening it does nothing to the file
_NEW_FILE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_CHUNK = 1 << 20
_OCTAL_ESCAPE = re.compile(rb"\\([0-3][0-7]{2})")
_KINDS = {
    stat.S_IFDIR: "directory",
    stat.S_IFREG: "file",
    stat.S_IFLNK: "symlink",
    stat.S_IFIFO: "fifo",
    stat.S_IFSOCK: "socket",
    stat.S_IFCHR: "char-device",
    stat.S_IFBLK: "block-device",
}


class RemoveSocketDir:
    name = "remove-socket-dir"

    def __init__(self, params: RemoveSocketDirParams) -> None:
        self.params = params
        for p in params.paths:
            if os.path.dirname(p) != params.root.rstrip("/"):
                raise UnsafePathError(f"{p} is not directly inside {params.root}")

    async def check(self, ctx: ActionContext) -> Step | Skip:
        found = [p for p in self.params.paths if _is_real_directory(p)]
        if not found:
            return Skip("no directory at " + ", ".join(self.params.paths))
        return Step("remove the directory at " + ", ".join(found), paths=tuple(found))

    async def apply(self, ctx: ActionContext, step: Step) -> str:
        details = []
        for path in step.paths:
            # File copying can take a while: keep the event loop (and the watchdog) running.
            details.append(await asyncio.to_thread(self._remove_one, ctx, path))
        return "; ".join(details)

    async def verify(self, ctx: ActionContext, step: Step) -> str:
        still = [p for p in step.paths if _is_real_directory(p)]
        if still:
            raise RepairFailedError("still a directory: " + ", ".join(still))
        return "no directory left at " + ", ".join(step.paths)

    def _remove_one(self, ctx: ActionContext, path: str) -> str:
        name = os.path.basename(path)
        root_fd = os.open(self.params.root, _DIR)
        try:
            st = os.stat(name, dir_fd=root_fd, follow_symlinks=False)
            if not stat.S_ISDIR(st.st_mode):
                return f"{path} is no longer a directory"
            _refuse_mounts(path)
            try:
                os.rmdir(name, dir_fd=root_fd)
            except OSError as exc:
                if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                    raise
            else:
                return f"removed empty directory {path}"
            return self._quarantine(ctx, root_fd, name)
        finally:
            os.close(root_fd)

    def _quarantine(self, ctx: ActionContext, root_fd: int, name: str) -> str:
        now = ctx.clock.wall()
        stamp = utc_stamp(now) + f"-{int(now * 1e6) % 1_000_000:06d}"
        aside = f".{name}.nodemedic-{stamp}"
        try:
            ctx.quarantine_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:  # a full or read-only state directory: the socket path is freed all the same
            os.rename(name, aside, src_dir_fd=root_fd, dst_dir_fd=root_fd)
            where = os.path.join(self.params.root, aside)
            return f"moved {name} aside to {where} and kept it there: no quarantine ({exc.strerror or exc})"
        os.rename(name, aside, src_dir_fd=root_fd, dst_dir_fd=root_fd)
        # The socket path is free: from here on the repair succeeds, whatever the entry holds.
        return _copy_aside(self.params, ctx.clock, ctx.quarantine_dir, root_fd, name, stamp)


def _copy_aside(
    params: RemoveSocketDirParams, clock: Clock, quarantine: Path, root_fd: int, name: str, stamp: str
) -> str:
    """Copy the aside directory of ``name`` made at ``stamp`` into the quarantine, then remove it."""
    aside = f".{name}.nodemedic-{stamp}"
    source = os.path.join(params.root, name)
    aside_path = os.path.join(params.root, aside)
    try:
        top_fd = _open_aside(root_fd, aside)
    except OSError as exc:
        return f"moved {source} aside to {aside_path}, but {exc}: left there as it is, nothing copied"
    try:
        copy = _QuarantineCopy(params, clock, source, aside_path)
        return copy.run(top_fd, quarantine / f"{stamp}-{name}", root_fd, aside)
    finally:
        os.close(top_fd)


_ASIDE = re.compile(r"\.(?P<name>.+)\.nodemedic-(?P<stamp>\d{8}T\d{6}Z-\d{6})")


def finish_quarantines(params: RemoveSocketDirParams, clock: Clock, quarantine: Path) -> list[str]:
    """After nodemedic died during remove-socket-dir: an aside directory whose copy never got its
    final name in the quarantine is copied again (a ``.partial`` left by the dead copy is removed
    first), by the same bounded fd-relative copy; one whose complete copy is there but whose
    removal was cut off has the entries the manifest lists as copied, and unchanged, removed.
    An aside directory kept whole on purpose (a bound was passed) stays. One line per directory."""
    names = {os.path.basename(p) for p in params.paths}
    root_fd = os.open(params.root, _DIR)
    try:
        done = []
        for entry in sorted(os.listdir(root_fd)):
            found = _ASIDE.fullmatch(entry)
            if found is None or found["name"] not in names:
                continue
            name, stamp = found["name"], found["stamp"]
            target = quarantine / f"{stamp}-{name}"
            if not target.exists():
                quarantine.mkdir(mode=0o700, parents=True, exist_ok=True)
                shutil.rmtree(target.with_name(target.name + ".partial"), ignore_errors=True)
                done.append(_copy_aside(params, clock, quarantine, root_fd, name, stamp))
            elif _remove_after_copy(params, clock, root_fd, entry, target):
                done.append(f"removed {os.path.join(params.root, entry)}: its copy in {target} is complete")
        return done
    finally:
        os.close(root_fd)


def _remove_after_copy(
    params: RemoveSocketDirParams, clock: Clock, root_fd: int, aside: str, target: Path
) -> bool:
    """The removal a dead copy did not finish, of what its complete manifest lists; True if done."""
    try:
        manifest = json.loads((target / MANIFEST).read_bytes())
    except (OSError, ValueError):
        return False
    if not isinstance(manifest, dict) or manifest.get("complete") is not True:
        return False  # kept whole on purpose
    aside_path = os.path.join(params.root, aside)
    copy = _QuarantineCopy(params, clock, os.path.join(params.root, aside), aside_path)
    try:
        top_fd = _open_aside(root_fd, aside)
    except OSError:
        return False
    try:
        copy.dev, copy.mount = os.fstat(top_fd).st_dev, _mount_id(top_fd)
        copy.take_manifest(manifest.get("entries", []))
        return copy._remove_copied(top_fd) and _rmdir(root_fd, aside)
    finally:
        os.close(top_fd)


class _NotCopiedError(NodemedicError, OSError):
    """One entry was not copied; the message is the reason the manifest gives. Never escapes."""


class _QuarantineCopy:
    """One bounded, fd-relative copy of an aside directory into the quarantine, with its manifest,
    and then (only if complete) the removal of what was copied from the aside directory."""

    def __init__(self, params: RemoveSocketDirParams, clock: Clock, source: str, aside: str) -> None:
        self.p, self.clock, self.source, self.aside = params, clock, source, aside
        self.rows: list[dict[str, object]] = []
        self.reasons: dict[str, None] = {}  # distinct reasons for skipping, in order seen
        self.copied: dict[str, tuple[int, int, int]] = {}  # path -> (inode, size, mtime) when copied
        self.dirs: dict[str, int] = {}  # path -> inode of each folder walked to its end
        self.first_copy: dict[tuple[int, int], str] = {}  # (dev, inode) -> path: hard links
        self.bytes = self.entries = self.manifest_bytes = 0
        self.stopped = ""
        self.deadline = 0.0
        self.dev: int = 0
        self.mount: int | None = None
        self.partial = Path()

    def run(self, top_fd: int, target: Path, root_fd: int, aside_name: str) -> str:
        self.partial = target.with_name(target.name + ".partial")  # the final name only once written
        try:
            self._copy(top_fd, target)
        except OSError as exc:  # the quarantine itself failed (full, read-only): keep everything
            shutil.rmtree(self.partial, ignore_errors=True)
            kept = f"moved {self.source} aside to {self.aside} and kept it there"
            return f"{kept}: copying it to {target} failed: {exc}"
        listed = f"{target} ({self.entries} entries, {self.bytes} bytes; {MANIFEST} lists them)"
        if self.reasons:
            return (
                f"moved {self.source} aside to {self.aside} and kept it there whole, not all copied "
                f"({'; '.join(self.reasons)}); what was copied is in {listed}"
            )
        if self._remove_copied(top_fd) and _rmdir(root_fd, aside_name):
            return f"moved non-empty directory {self.source} to {listed}"
        return (
            f"moved non-empty directory {self.source} to {listed}; what changed in it during the "
            f"copy is kept at {self.aside}"
        )

    def _copy(self, top_fd: int, target: Path) -> None:
        top = os.fstat(top_fd)
        self.dev, self.mount = top.st_dev, _mount_id(top_fd)
        self.deadline = self.clock.monotonic() + self.p.max_seconds
        os.mkdir(self.partial, 0o700)
        out = os.open(self.partial, _DIR)
        try:
            self.rows.append(_row(".", top))
            self._walk(top_fd, out, "", 1)
            _write_new(out, MANIFEST, self._manifest())
            _keep_mode_and_times(out, top)
        finally:
            os.close(out)
        os.rename(self.partial, target)

    def _manifest(self) -> bytes:
        complete = not self.reasons
        doc = {
            "source": self.source,
            "aside": self.aside,
            "complete": complete,
            "aside_after_copy": "removed, but for what changed during the copy" if complete else "kept whole",
            "bounds": {
                k: getattr(self.p, k) for k in ("max_bytes", "max_entries", "max_depth", "max_seconds")
            },
            "copied_bytes": self.bytes,
            "entries_walked": self.entries,
            "skipped": list(self.reasons),
            "entries": self.rows,
        }
        # ensure_ascii: names that are not UTF-8 come out as \udcXX escapes (Python's surrogateescape)
        return json.dumps(doc, indent=1).encode() + b"\n"

    def _skip(self, row: dict[str, object], reason: str) -> None:
        row["skipped"] = reason
        self.reasons[reason] = None

    def _stop(self) -> str:
        if not self.stopped:
            if self.entries >= self.p.max_entries:
                self.stopped = f"max_entries ({self.p.max_entries}) reached"
            elif self.manifest_bytes > MAX_MANIFEST_BYTES:
                self.stopped = f"the manifest's bound ({MAX_MANIFEST_BYTES} bytes) reached"
            elif self.clock.monotonic() > self.deadline:
                self.stopped = f"max_seconds ({self.p.max_seconds:g}) passed"
        return self.stopped

    def _walk(self, src: int, dst: int, rel: str, depth: int) -> None:
        with os.scandir(src) as it:
            for entry in it:
                if self._stop():
                    rest: dict[str, object] = {"path": rel.rstrip("/") or ".", "type": "rest-of-directory"}
                    self.rows.append(rest)
                    self._skip(rest, self.stopped + ": the rest of this folder was not walked")
                    return
                self._one(src, dst, entry.name, rel + entry.name, depth)

    def _one(self, src: int, dst: int, name: str, path: str, depth: int) -> None:
        self.entries += 1
        first = len(self.rows)  # this entry's row; a folder's entries add their own after it
        try:
            self._entry(src, dst, name, path, depth)
        finally:
            if len(self.rows) > first:
                self.manifest_bytes += len(json.dumps(self.rows[first]))

    def _entry(self, src: int, dst: int, name: str, path: str, depth: int) -> None:
        try:
            st = os.stat(name, dir_fd=src, follow_symlinks=False)
        except OSError as exc:
            gone: dict[str, object] = {"path": path}
            self.rows.append(gone)
            self._skip(gone, f"could not be read: {exc.strerror}")
            return
        self.rows.append(row := _row(path, st))
        if depth == 1 and name == MANIFEST:
            self._skip(row, "has the name of nodemedic's manifest, not copied")
            return
        try:
            self._copy_entry(src, dst, name, path, st, row, depth)
        except OSError as exc:
            self._skip(row, f"could not be copied: {exc.strerror}" if exc.strerror else str(exc))

    def _copy_entry(
        self, src: int, dst: int, name: str, path: str, st: os.stat_result, row: dict[str, object], depth: int
    ) -> None:
        kind = stat.S_IFMT(st.st_mode)
        if st.st_dev != self.dev:
            raise _NotCopiedError("on another file system: not crossed")
        if kind == stat.S_IFDIR:
            self._copy_dir(src, dst, name, path, st, depth)
        elif kind == stat.S_IFREG:
            self._copy_file(src, dst, name, path, st, row)
        elif kind == stat.S_IFLNK:
            row["target"] = target = os.readlink(name, dir_fd=src)  # the link itself, never followed
            os.symlink(target, name, dir_fd=dst)
        elif kind in (stat.S_IFCHR, stat.S_IFBLK):
            row["rdev"] = f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"
        # FIFOs, sockets and device nodes: listed here, never opened (a FIFO blocks, a device acts)
        row["copied"] = kind in (stat.S_IFDIR, stat.S_IFREG, stat.S_IFLNK)
        if kind != stat.S_IFDIR:
            self.copied[path] = _signature(st)

    def _copy_dir(self, src: int, dst: int, name: str, path: str, st: os.stat_result, depth: int) -> None:
        if depth >= self.p.max_depth:
            raise _NotCopiedError(f"at max_depth ({self.p.max_depth}): not entered")
        fd = self._open_same(src, name, st, _DIR)
        try:
            os.mkdir(name, 0o700, dir_fd=dst)
            out = os.open(name, _DIR, dir_fd=dst)
            try:
                self._walk(fd, out, path + "/", depth + 1)
                _keep_mode_and_times(out, st)
            finally:
                os.close(out)
        finally:
            os.close(fd)
        self.dirs[path] = st.st_ino

    def _copy_file(
        self, src: int, dst: int, name: str, path: str, st: os.stat_result, row: dict[str, object]
    ) -> None:
        first = self.first_copy.get((st.st_dev, st.st_ino))
        if first is not None:  # a hard link to a file copied already: the same link in the copy
            os.link(self.partial / first, name, dst_dir_fd=dst, follow_symlinks=False)
            row["link_of"] = first
            return
        if st.st_size > self.p.max_bytes - self.bytes:
            raise _NotCopiedError(f"would pass max_bytes ({self.p.max_bytes}): not copied")
        path_fd = self._open_same(src, name, st, _PATH_ONLY)
        try:  # through /proc the very inode checked above is opened: no swap can slip in
            fd = os.open(f"/proc/self/fd/{path_fd}", os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
        finally:
            os.close(path_fd)
        try:
            self._copy_content(fd, dst, name, st)
        finally:
            os.close(fd)
        if st.st_nlink > 1:
            self.first_copy[(st.st_dev, st.st_ino)] = path

    def _open_same(self, src: int, name: str, st: os.stat_result, flags: int) -> int:
        """Open ``name`` no-follow and make sure it is still the entry ``st`` describes, not a mount."""
        fd = os.open(name, flags, dir_fd=src)
        now = os.fstat(fd)
        if (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino):
            os.close(fd)
            raise _NotCopiedError("swapped for something else during the copy: not followed")
        if _mount_id(fd) != self.mount:
            os.close(fd)
            raise _NotCopiedError("a mount point: not crossed")
        return fd

    def _copy_content(self, fd: int, dst: int, name: str, st: os.stat_result) -> None:
        out = os.open(name, _NEW_FILE, 0o600, dir_fd=dst)
        try:
            copied = self._copy_bytes(fd, out, st.st_size)
            now = os.fstat(fd)
            if copied != st.st_size or (now.st_size, now.st_mtime_ns) != (st.st_size, st.st_mtime_ns):
                raise _NotCopiedError("changed during the copy")
            os.fchmod(out, stat.S_IMODE(st.st_mode) & 0o777)  # never setuid/setgid in the quarantine
            os.utime(out, ns=(st.st_atime_ns, st.st_mtime_ns))
        except BaseException:
            os.unlink(name, dir_fd=dst)  # no part of a file under its name: the manifest says why
            raise
        finally:
            os.close(out)

    def _copy_bytes(self, fd: int, out: int, size: int) -> int:
        done = 0
        while done < size:
            if self._stop():
                raise _NotCopiedError(self.stopped + " during its copy: not copied")
            chunk = os.read(fd, min(_CHUNK, size - done))
            if not chunk:
                break
            write_all(out, chunk)
            done += len(chunk)
            self.bytes += len(chunk)
        return done

    def take_manifest(self, rows: object) -> None:
        """What a complete copy copied, from its manifest's entries (the signatures it checked)."""
        for row in rows if isinstance(rows, list) else []:
            if not isinstance(row, dict) or row.get("copied") is not True or row.get("skipped"):
                continue
            try:
                path, inode = str(row["path"]), int(row["inode"])
                if row.get("type") == "directory":
                    self.dirs[path] = inode
                else:
                    self.copied[path] = (inode, int(row["size"]), int(row["mtime_ns"]))
            except (KeyError, TypeError, ValueError):
                continue

    def _remove_copied(self, top_fd: int) -> bool:
        """Remove from the aside directory what was copied and has not changed since; True if
        nothing is left in it."""
        try:
            _refuse_mounts(self.aside)  # a mount made during the copy: remove nothing
        except UnsafePathError:
            return False
        self.deadline = self.clock.monotonic() + self.p.max_seconds
        return self._empty(top_fd, "")

    def _empty(self, fd: int, rel: str) -> bool:
        left = False
        with os.scandir(fd) as it:
            for entry in it:
                if self.clock.monotonic() > self.deadline:
                    return False
                try:
                    left |= not self._remove_entry(fd, entry.name, rel + entry.name)
                except OSError:
                    left = True
        return not left

    def _remove_entry(self, fd: int, name: str, path: str) -> bool:
        st = os.stat(name, dir_fd=fd, follow_symlinks=False)
        if not stat.S_ISDIR(st.st_mode):
            if self.copied.get(path) != _signature(st):
                return False
            os.unlink(name, dir_fd=fd)
            return True
        if self.dirs.get(path) != st.st_ino or st.st_dev != self.dev:
            return False
        sub = self._open_same(fd, name, st, _DIR)
        try:
            emptied = self._empty(sub, path + "/")
        finally:
            os.close(sub)
        return emptied and _rmdir(fd, name)


def _row(path: str, st: os.stat_result) -> dict[str, object]:
    """What the manifest says of one entry: enough to check it or make it again by hand."""
    return {
        "path": path,
        "type": _KINDS.get(stat.S_IFMT(st.st_mode), "other"),
        "mode": f"{stat.S_IMODE(st.st_mode):04o}",
        "uid": st.st_uid,
        "gid": st.st_gid,
        "size": st.st_size,
        "inode": st.st_ino,
        "nlink": st.st_nlink,
        "mtime_ns": st.st_mtime_ns,
    }


def _signature(st: os.stat_result) -> tuple[int, int, int]:
    return (st.st_ino, st.st_size, st.st_mtime_ns)


def _keep_mode_and_times(fd: int, st: os.stat_result) -> None:
    os.fchmod(fd, stat.S_IMODE(st.st_mode) & 0o1777)  # owners are in the manifest (no CAP_CHOWN)
    os.utime(fd, ns=(st.st_atime_ns, st.st_mtime_ns))


def _write_new(dir_fd: int, name: str, data: bytes) -> None:
    fd = os.open(name, _NEW_FILE, 0o600, dir_fd=dir_fd)
    try:
        write_all(fd, data)
    finally:
        os.close(fd)


def _rmdir(dir_fd: int, name: str) -> bool:
    try:
        os.rmdir(name, dir_fd=dir_fd)
    except OSError:  # not empty: something appeared meanwhile, and it stays
        return False
    return True


def _open_aside(root_fd: int, aside: str) -> int:
    """The renamed entry as a directory fd on root's mount, or UnsafePathError saying what it is."""
    try:
        fd = os.open(aside, _DIR, dir_fd=root_fd)
    except OSError as exc:
        raise UnsafePathError(f"it is no longer a directory ({_what_is(root_fd, aside)})") from exc
    here, parent = os.fstat(fd), os.fstat(root_fd)
    if here.st_dev != parent.st_dev or _mount_id(fd) != _mount_id(root_fd):
        os.close(fd)
        raise UnsafePathError("it is a mount point")
    return fd


def _what_is(dir_fd: int, name: str) -> str:
    try:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        if stat.S_ISLNK(st.st_mode):
            return f"a symlink to {os.readlink(name, dir_fd=dir_fd)!r}, not followed"
    except OSError as exc:
        return f"unreadable: {exc.strerror}"
    return "a " + _KINDS.get(stat.S_IFMT(st.st_mode), "special file")


def _mount_id(fd: int) -> int | None:
    """The mount an fd is on (``mnt_id`` in /proc/self/fdinfo): tells a bind mount of the same file
    system apart, which st_dev cannot. None where /proc does not say."""
    try:
        with open(f"/proc/self/fdinfo/{fd}", "rb") as f:
            for line in f:
                if line.startswith(b"mnt_id:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def _is_real_directory(path: str) -> bool:
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode)
    except FileNotFoundError:
        return False


def _unescape(field: bytes) -> bytes:
    """Undo the kernel's octal escapes (space, tab, newline, backslash) on bytes: a mount point's
    path need not be UTF-8."""
    return _OCTAL_ESCAPE.sub(lambda m: bytes([int(m.group(1), 8)]), field)


def mount_points(mountinfo: bytes) -> list[bytes]:
    """The mount points in /proc/self/mountinfo's text (field 5 of each line), as bytes."""
    points = []
    for line in mountinfo.split(b"\n"):
        fields = line.split(b" ")
        if len(fields) > 4:
            points.append(_unescape(fields[4]))
    return points


def _refuse_mounts(path: str) -> None:
    with open(MOUNTINFO, "rb") as f:
        points = mount_points(f.read())
    p = os.fsencode(path)
    inside = [m for m in points if m == p or m.startswith(p + b"/")]
    if inside:
        shown = ", ".join(os.fsdecode(m) for m in inside).encode("utf-8", "backslashreplace").decode()
        raise UnsafePathError(
            f"{path} is or contains a mount point ({shown}); unmount it first: "
            "nodemedic never removes a mounted file system"
        )
