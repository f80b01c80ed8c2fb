"""Make a placeholder socket where containerd's socket is missing, never replacing anything.

The socket's folder is opened O_DIRECTORY|O_NOFOLLOW (a symlinked folder is refused) and every
step is relative to that fd: a Unix socket is bound under a temporary name through
/proc/self/fd/N/ (bind() takes no directory fd), closed at once without ever listening (a client
gets ECONNREFUSED, as from a stale socket), given its mode and owner, then hard-linked to the
socket's name with linkat(), which fails with EEXIST rather than replace whatever appeared there
meanwhile (a symlink, a FIFO, a directory, containerd's own socket). The temporary name is removed
last, and only if it is still the socket we bound.

The owner is containerd's: ``[grpc] uid``/``gid`` of its config (``[ttrpc]``'s for the ttrpc
socket when ``[ttrpc] address`` is set), 0:0 when unset. Another owner than nodemedic's own needs
CAP_CHOWN; without it the placeholder keeps nodemedic's owner and the record says so.
"""

from __future__ import annotations

import os
import secrets
import socket
import stat
import sys
from dataclasses import dataclass
from pathlib import Path

from nodemedic.configs import read_config
from nodemedic.errors import UnsafePathError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


@dataclass(frozen=True, slots=True)
class Placed:
    """A placeholder made: its inode, and its mode and owner as set."""

    inode: int
    ctime_ns: int
    mode: int
    uid: int
    gid: int
    note: str = ""  # e.g. why the wanted owner could not be set

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
    temporary = f".{name}.nodemedic-{secrets.token_hex(6)}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.bind(f"/proc/self/fd/{dir_fd}/{temporary}")  # never listen()ed
    st = os.stat(temporary, dir_fd=dir_fd, follow_symlinks=False)
    try:
        if not stat.S_ISSOCK(st.st_mode):
            raise UnsafePathError(f"{temporary} is not the socket just bound: left alone")
        os.chmod(temporary, mode, dir_fd=dir_fd, follow_symlinks=False)
        note = _chown(dir_fd, temporary, uid, gid)
        os.link(temporary, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd, follow_symlinks=False)
    finally:
        _remove_if_same(dir_fd, temporary, st.st_ino)
    done = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)  # after the unlink: its last ctime
    mode = stat.S_IMODE(done.st_mode)
    return Placed(done.st_ino, done.st_ctime_ns, mode, done.st_uid, done.st_gid, note)


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
    try:  # a regular file only, never through a symlink, bounded in size
        data = tomllib.loads(read_config(Path(config)).decode("utf-8"))
    except (OSError, ValueError):
        return 0, 0
    grpc, ttrpc = _table(data, "grpc"), _table(data, "ttrpc")
    table = ttrpc if path.endswith(".ttrpc") and ttrpc.get("address") else grpc
    return _id(table.get("uid")), _id(table.get("gid"))


def _table(data: dict[str, object], key: str) -> dict[str, object]:
    value = data.get(key)
    return value if isinstance(value, dict) else {}


def _id(value: object) -> int:
    return value if isinstance(value, int) and 0 <= value < 2**32 and not isinstance(value, bool) else 0
