"""What is at a path, read the one safe way: lstat, never following a symlink. The inotify source
reports it, the executor checks it again before acting."""

from __future__ import annotations

import os
import stat

from nodemedic.events import PathKind


def path_kind(path: str) -> PathKind:
    """What is at ``path``, without following a symlink."""
    return path_identity(path)[0]


def path_identity(path: str) -> tuple[PathKind, int, int]:
    """What is at ``path``, its inode, and for a socket its ctime (0s if nothing), without
    following a symlink. A socket bound anew differs even where inode numbers are reused."""
    try:
        st = os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):
        return PathKind.MISSING, 0, 0
    kind = kind_of(st.st_mode)
    return kind, st.st_ino, st.st_ctime_ns if kind is PathKind.SOCKET else 0


def kind_of(mode: int) -> PathKind:
    """The kind of a file of lstat mode ``mode``."""
    if stat.S_ISLNK(mode):
        return PathKind.SYMLINK
    if stat.S_ISDIR(mode):
        return PathKind.DIRECTORY
    if stat.S_ISSOCK(mode):
        return PathKind.SOCKET
    if stat.S_ISREG(mode):
        return PathKind.FILE
    return PathKind.OTHER
