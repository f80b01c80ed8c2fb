"""Make a placeholder socket where containerd's socket is missing, never replacing anything.

The socket's folder is opened O_DIRECTORY|O_NOFOLLOW (a symlinked folder is refused) and every
step is relative to that fd: a Unix socket is bound under a temporary name through
/proc/self/fd/N/ (bind() takes no directory fd), closed at once without ever listening (a client
gets ECONNREFUSED, as from a stale socket), given its mode and owner, then hard-linked to the
socket's name with linkat(), which fails with EEXIST rather than replace whatever appeared there
meanwhile (a symlink, a FIFO, a directory, containerd's own socket). The temporary name is removed
last, and only if it is still the socket we bound. An O_PATH descriptor of the socket, held from
its bind to the last look, keeps its inode number ours: the name is ours only if it still holds
that inode (containerd may unlink the placeholder and bind its own socket at any moment).

The owner is containerd's: ``[grpc] uid``/``gid`` of its config (``[ttrpc]``'s for the ttrpc
socket when ``[ttrpc] address`` is set), 0:0 when unset. Another owner than nodemedic's own needs
CAP_CHOWN; without it the placeholder keeps nodemedic's owner and the record says so.
"""

from __future__ import annotations

import os
import re
import secrets
import socket
import stat
from dataclasses import dataclass
from pathlib import Path

from nodemedic.configs import parsed_config
from nodemedic.errors import UnsafePathError

_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_PATH_ONLY = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC
TEMPORARY = ".nodemedic-"  # a temporary's name: ".NAME.nodemedic-<12 hex>"


@dataclass(frozen=True, slots=True)
class Placed:
    """A placeholder made: its inode, and its mode and owner as set."""

    inode: int
    ctime_ns: int
    mode: int
    uid: int
    gid: int
    note: str = ""  # e.g. why the wanted owner could not be set
    replaced: str = ""  # what holds the name already, if no longer ours (containerd's socket, say)

    def describe(self) -> str:
        text = f"mode {self.mode:04o}, owner {self.uid}:{self.gid}, inode {self.inode}"
        return f"{text}; {self.note}" if self.note else text


def make_placeholder(path: str, mode: int, uid: int, gid: int) -> Placed:
    """A placeholder socket at ``path``. Raises FileExistsError if anything is at ``path`` (nothing
    is replaced), UnsafePathError if its folder is a symlink, OSError otherwise."""
    folder, name = os.path.split(path)
    try:
        dir_fd = os.open(folder, _DIR)
    except OSError as exc:
        if os.path.islink(folder):
            raise UnsafePathError(f"{folder} is a symlink: not followed, no placeholder made") from exc
        raise
    try:
        return _in_folder(dir_fd, name, mode, uid, gid)
    finally:
        os.close(dir_fd)


def _in_folder(dir_fd: int, name: str, mode: int, uid: int, gid: int) -> Placed:
    temporary = f".{name}{TEMPORARY}{secrets.token_hex(6)}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.bind(f"/proc/self/fd/{dir_fd}/{temporary}")  # never listen()ed
    fd = -1
    try:  # the O_PATH fd keeps our inode (and its number) alive to the last comparison
        fd = os.open(temporary, _PATH_ONLY, dir_fd=dir_fd)
        note = _link(dir_fd, fd, temporary, name, mode, uid, gid)
        return _placed(dir_fd, name, os.fstat(fd), note)  # after the unlink: its last ctime
    finally:
        if fd >= 0:
            os.close(fd)


def _link(dir_fd: int, fd: int, temporary: str, name: str, mode: int, uid: int, gid: int) -> str:
    """Mode and owner on the temporary (``fd``), then its link to ``name``; the temporary goes."""
    st = os.fstat(fd)
    if not stat.S_ISSOCK(st.st_mode):
        raise UnsafePathError(f"{temporary} is not the socket just bound: left alone")
    try:
        os.chmod(temporary, mode, dir_fd=dir_fd, follow_symlinks=False)
        note = _chown(dir_fd, temporary, uid, gid)
        os.link(temporary, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd, follow_symlinks=False)
    finally:
        _remove_if_same(dir_fd, temporary, st.st_ino)
    return note


def _placed(dir_fd: int, name: str, ours: os.stat_result, note: str) -> Placed:
    """What the link made; ``replaced`` set if the name no longer holds our socket (containerd
    unlinked it and may have bound its own since: never taken for ours)."""
    try:
        there = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        replaced = "" if there.st_ino == ours.st_ino else f"{_kind(there.st_mode)} (inode {there.st_ino})"
    except FileNotFoundError:
        replaced = "nothing (removed)"
    mode = stat.S_IMODE(ours.st_mode)
    return Placed(ours.st_ino, ours.st_ctime_ns, mode, ours.st_uid, ours.st_gid, note, replaced)


def _kind(st_mode: int) -> str:
    return "a socket" if stat.S_ISSOCK(st_mode) else "a directory" if stat.S_ISDIR(st_mode) else "a file"


def sweep_temporaries(path: str) -> list[str]:
    """Remove the temporaries of ours a crash left beside ``path`` (``.NAME.nodemedic-<12 hex>``
    sockets, never anything else, never through a symlinked folder); the names removed."""
    folder, name = os.path.split(path)
    pattern = re.compile(re.escape(f".{name}{TEMPORARY}") + "[0-9a-f]{12}")
    try:
        dir_fd = os.open(folder, _DIR)
    except OSError:
        return []
    removed = []
    try:
        for entry in os.listdir(dir_fd):
            if pattern.fullmatch(entry) and _remove_socket(dir_fd, entry):
                removed.append(os.path.join(folder, entry))
    finally:
        os.close(dir_fd)
    return removed


def _remove_socket(dir_fd: int, name: str) -> bool:
    try:
        if stat.S_ISSOCK(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode):
            os.unlink(name, dir_fd=dir_fd)
            return True
    except OSError:
        pass
    return False


def _chown(dir_fd: int, name: str, uid: int, gid: int) -> str:
    if (uid, gid) == (os.geteuid(), os.getegid()):
        return ""
    try:
        os.chown(name, uid, gid, dir_fd=dir_fd, follow_symlinks=False)
    except PermissionError as exc:
        return f"owner {uid}:{gid} not set ({exc.strerror}: nodemedic needs CAP_CHOWN for it)"
    return ""


def _remove_if_same(dir_fd: int, name: str, inode: int) -> None:
    try:
        if os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_ino == inode:
            os.unlink(name, dir_fd=dir_fd)
    except FileNotFoundError:
        pass


def socket_owner(config: str, path: str) -> tuple[int, int]:
    """The uid and gid containerd gives its socket at ``path`` by its config (0:0 if unset or the
    config cannot be read): ``[ttrpc]``'s for a ``.ttrpc`` path when ``[ttrpc] address`` is set
    (containerd then takes its uid/gid), else ``[grpc]``'s."""
    data = parsed_config(Path(config))  # a regular file only, never through a symlink, bounded
    if data is None:
        return 0, 0
    grpc, ttrpc = _table(data, "grpc"), _table(data, "ttrpc")
    table = ttrpc if path.endswith(".ttrpc") and ttrpc.get("address") else grpc
    return _id(table.get("uid")), _id(table.get("gid"))


def _table(data: dict[str, object], key: str) -> dict[str, object]:
    value = data.get(key)
    return value if isinstance(value, dict) else {}


def _id(value: object) -> int:
    return value if isinstance(value, int) and 0 <= value < 2**32 and not isinstance(value, bool) else 0
