"""Files nodemedic keeps under its state directory: written atomically, checked when read back.

Every state file is written by `atomic_write` (temporary file, fsync, rename, folder fsync), so a
crash leaves the old or the new content, and read back by `load_checked`, so a damaged one (a
disk error, a hand edit, a file from another version) is moved aside, never acted on. State is
best effort: a full or read-only state folder never stops a repair (`save_best_effort`)."""

from __future__ import annotations

import errno
import logging
import os
import stat
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

log = logging.getLogger(__name__)


def atomic_write(path: Path, text: str, mode: int | None = None) -> None:
    """Write ``text`` to ``path`` so that a crash leaves either the old or the new content; with
    ``mode``, the file gets it (else mkstemp's 0600). The folder is fsynced too: without it the
    rename itself may be lost in a crash, leaving the old content (or no file) after a reboot."""
    path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            if mode is not None:
                os.fchmod(f.fileno(), mode)
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_directory(path.parent)


def write_all(fd: int, data: bytes) -> None:
    """Write all of ``data`` to ``fd``: os.write may write less than it was given."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def fsync_directory(folder: Path | int) -> None:
    """Make the names in ``folder`` (a path, or an open fd) durable: a rename is an entry in its
    folder, not in the file."""
    if isinstance(folder, int):
        _fsync_folder(folder)
        return
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        _fsync_folder(fd)
    finally:
        os.close(fd)


def _fsync_folder(fd: int) -> None:
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno != errno.EINVAL:  # a file system that cannot sync a folder: nothing more to do
            raise


# ---- checked loads and best-effort saves ---------------------------------------------------------

T = TypeVar("T")
MAX_STATE_BYTES = 1 << 20
"""The largest state file read back (state.json of many rules is a few KiB)."""
DAMAGED = (UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError, IndexError)
"""What a check raises on a file that is not what nodemedic wrote (json's errors are ValueErrors)."""


@dataclass(frozen=True, slots=True)
class SetAside:
    """A state file that could not be used: where it was, where it is kept now, and why."""

    path: str
    kept_as: str
    why: str


MAX_NOTED = 100
_set_aside: list[SetAside] = []  # for the daemon's next record; drained by take_set_aside()
_failing: set[str] = set()  # state files whose last save failed: said once, not at every write


Noter = Callable[[SetAside], None]


def load_checked(path: Path, check: Callable[[str], T], on_aside: Noter | None = None) -> T | None:
    """The content of the state file ``path`` as ``check`` reads it; None where there is none.

    A file that cannot be read, is not UTF-8 or that ``check`` refuses (any of `DAMAGED`) is
    moved aside (`set_aside`) and None returned: nothing half-written or damaged is acted on.
    ``on_aside`` is told of it, where the caller reports it itself; else `take_set_aside` has it."""
    try:
        raw = _read_state_file(path)
    except FileNotFoundError:
        return None
    except OSError as exc:  # EIO, a symlink or FIFO put there: not a file nodemedic wrote
        set_aside(path, f"cannot read: {exc}", on_aside)
        return None
    try:
        return check(raw.decode("utf-8"))
    except DAMAGED as exc:
        set_aside(path, str(exc) or type(exc).__name__, on_aside)
        return None


def _read_state_file(path: Path) -> bytes:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise OSError(errno.EINVAL, f"not a regular file (mode {mode:o})")
        raw = os.read(fd, MAX_STATE_BYTES + 1)
    finally:
        os.close(fd)
    if len(raw) > MAX_STATE_BYTES:
        raise OSError(errno.EFBIG, f"larger than {MAX_STATE_BYTES >> 10} KiB")
    return raw


def utc_stamp(wall: float | None = None) -> str:
    """``20261201T120000Z``: the time in the names of files nodemedic keeps aside."""
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(wall))


def set_aside(path: Path, why: str, on_aside: Noter | None = None) -> Path:
    """Move an unusable state file to ``NAME.corrupt-<UTC time>`` (never deleted, for a human to
    look at); where the folder refuses the rename (read-only), it stays and is refused again at
    the next load. Returns where the file is now."""
    aside = path.with_name(f"{path.name}.corrupt-{utc_stamp()}")
    try:
        os.replace(path, aside)
    except OSError:
        aside = path
    log.warning("state file %s unusable (%s); kept as %s, starting without it", path, why, aside)
    (on_aside or note_set_aside)(SetAside(str(path), str(aside), why))
    return aside


def note_set_aside(found: SetAside) -> None:
    """Keep ``found`` for the daemon's next record (`take_set_aside`); a bounded list."""
    _set_aside[:] = [*_set_aside, found][-MAX_NOTED:]


def take_set_aside(folder: Path) -> list[SetAside]:
    """The state files under ``folder`` set aside since the last call (for a record at start-up
    and reload); those elsewhere (another state directory: tests, `nodemedic thaw`) stay."""
    taken = [s for s in _set_aside if Path(s.path).is_relative_to(folder)]
    _set_aside[:] = [s for s in _set_aside if not Path(s.path).is_relative_to(folder)]
    return taken


def save_best_effort(path: Path, text: str, mode: int | None = None) -> bool:
    """`atomic_write`, where a failure (a full or read-only state folder) must not stop nodemedic:
    False if the save failed. The first failure is a warning, the next ones of a run are debug
    lines, and the first save that works again says so."""
    try:
        atomic_write(path, text, mode)
    except OSError as exc:
        if note_save_failed(path, exc):
            log.warning("cannot save %s (%s); nodemedic goes on with this state in memory only "
                        "(said once, until a save works again)", path, exc)  # fmt: skip
        return False
    note_saved(path)
    return True


def note_save_failed(path: Path, exc: OSError) -> bool:
    """Record that saving ``path`` failed; True if it is the first failure of a run."""
    first = str(path) not in _failing
    _failing.add(str(path))
    if not first:
        log.debug("still cannot save %s: %s", path, exc)
    return first


def note_saved(path: Path) -> None:
    if str(path) in _failing:
        _failing.discard(str(path))
        log.warning("%s saved again", path)
