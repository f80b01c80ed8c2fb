"""What is at a path, read the one safe way: lstat, never following a symlink. The inotify source
reports it, the executor checks it again before acting."""

from __future__ import annotations

import os
import stat

from nodemedic.events import PathKind


def path_kind(path: str) -> PathKind:
    """What is at ``path``, without following a symlink."""
    try:
        mode = os.lstat(path).st_mode
    except (FileNotFoundError, NotADirectoryError):
        return PathKind.MISSING
    if stat.S_ISLNK(mode):
        return PathKind.SYMLINK
    if stat.S_ISDIR(mode):
        return PathKind.DIRECTORY
    if stat.S_ISSOCK(mode):
        return PathKind.SOCKET
    if stat.S_ISREG(mode):
        return PathKind.FILE
    return PathKind.OTHER
