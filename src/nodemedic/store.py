"""Files nodemedic keeps under its state directory: written atomically, checked when read back.

Every state file is written by `atomic_write` (temporary file, fsync, rename, folder fsync), so a
crash leaves the old or the new content, and read back by `load_checked`, so a damaged one (a
disk error, a hand edit, a file from another version) is moved aside, never acted on. State is
best effort: a full or read-only state folder never stops a repair (`save_best_effort`).

The files of the engine live here too: ``state.json`` (breakers, backoff, the repair budget) with
operators' reset requests (`StateStore`), and ``repair.json``, the record of a repair under way
(`IntentStore`).
"""

from __future__ import annotations

import errno
import json
import logging
import math
import os
import stat
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from nodemedic.errors import StateSaveError

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


def peek_checked(path: Path, check: Callable[[str], T]) -> tuple[T | None, str]:
    """``load_checked`` for the operator's tools: reads only, never moves a damaged file aside.
    The content (None where there is none or it is damaged) and why it is not usable ("" if it is)."""
    try:
        raw = _read_state_file(path)
    except FileNotFoundError:
        return None, ""
    except OSError as exc:
        return None, f"cannot read: {exc}"
    try:
        return check(raw.decode("utf-8")), ""
    except DAMAGED as exc:
        return None, str(exc) or type(exc).__name__


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
            log.warning(
                "cannot save %s (%s); nodemedic goes on with this state in memory only "
                "(said once, until a save works again)",
                path,
                exc,
            )
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


# ---- state.json ------------------------------------------------------------------------------
# nodemedic's persisted engine state (breakers, backoff, budget) and operators' reset requests.
#
# One JSON file under the state directory, written atomically (temporary file, fsync, rename), so a
# crash leaves the old or the new state. A file that cannot be read is moved aside with a warning and
# the daemon starts clean. ``nodemedic reset RULE`` drops a request file into ``reset/``; the daemon
# takes it at start-up and at each reload, whether or not it was running when the request was made.

log = logging.getLogger(__name__)
STATE_FILE = "state.json"
RESET_DIR = "reset"
STATE_VERSION = 1


class StateStore:
    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / STATE_FILE
        self.reset_dir = state_dir / RESET_DIR
        self.corrupt = ""  # where an unusable state file was moved, for the start-up record

    def load(self) -> dict[str, Any]:
        """The saved state, or an empty one. A corrupt file is moved aside, never deleted."""
        return load_checked(self.path, _checked_state, self._noted) or {}

    def peek(self) -> tuple[dict[str, Any], str]:
        """The saved state read only (for `nodemedic status` and `diagnose`): a damaged file is
        left where it is, for the daemon to set aside, and said in the second value."""
        data, why = peek_checked(self.path, _checked_state)
        return data or {}, why

    def set_aside(self, why: str) -> None:
        """Move an unusable state file aside (never deleted); the daemon starts clean."""
        set_aside(self.path, why, self._noted)

    def _noted(self, aside: SetAside) -> None:
        self.corrupt = aside.kept_as  # the runner's start-up record says it

    def save(self, data: dict[str, Any]) -> None:
        """Save atomically. StateSaveError on the first failure of a run only (the runner records
        it): a full or read-only state folder is said once, and repairs go on regardless."""
        try:
            text = json.dumps({"version": STATE_VERSION, **data}, indent=1, sort_keys=True)
            atomic_write(self.path, text + "\n")
        except OSError as exc:
            if note_save_failed(self.path, exc):
                raise StateSaveError(
                    exc.errno,
                    f"{exc.strerror or exc}: {self.path} is not saved; repairs "
                    "go on with breakers, backoff and budget in memory only; free "
                    "space or make the state directory writable (said once until "
                    "a save works again)",
                ) from exc
            return
        note_saved(self.path)

    def request_reset(self, rule: str) -> Path:
        self.reset_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        request = self.reset_dir / rule
        atomic_write(request, f"{time.time():.3f}\n")
        return request

    def take_resets(self) -> list[str]:
        """Rules whose reset was requested; the requests are consumed."""
        try:
            requests = sorted(self.reset_dir.iterdir())
        except FileNotFoundError:
            return []
        names = []
        for request in requests:
            if request.name.startswith("."):
                continue  # an atomic write in progress
            names.append(request.name)
            try:
                request.unlink(missing_ok=True)
            except OSError as exc:  # read-only: taken again at each reload, which would undo the breaker
                log.warning(
                    "cannot consume the reset request %s (%s): not applied; make the state "
                    "directory writable and reset again",
                    request,
                    exc,
                )
                names.pop()
        return names


def _checked_state(text: str) -> dict[str, Any]:
    data = json.loads(text)
    if not isinstance(data, dict) or data.get("version") != STATE_VERSION:
        raise ValueError(f"not a nodemedic state file of version {STATE_VERSION}")
    return data


# ---- repair.json -----------------------------------------------------------------------------
# The record of a repair under way, so that one cut off (SIGKILL, OOM, watchdog) is finished.
#
# Written (atomic, fsynced with its folder) before each step of a repair that changes the node, and
# removed when the repair has concluded, compensation included. A record found at start-up means
# nodemedic died mid-repair: it says which units the repair had stopped (so containerd stopped by
# nodemedic is not taken for an operator's stop), which step was under way and what had changed.
# An unreadable record is moved aside, never deleted, and reported, as ``state.json`` is.

INTENT_FILE = "repair.json"
INTENT_VERSION = 1


@dataclass(frozen=True, slots=True)
class RepairIntent:
    """One repair under way: enough to finish it, or to undo what it did, after a crash."""

    incident: str
    rule: str
    started_at: float  # wall clock
    index: int  # the position in the rule's actions of the step under way
    step: str  # that step's action name, checked against the rule at recovery
    stopped: tuple[str, ...] = ()  # units the repair stopped (or is starting) and not yet running again
    applied: tuple[str, ...] = ()  # the actions that had changed something (for after_change)
    paths: tuple[str, ...] = ()  # the paths the step under way concerns
    unit: str = ""
    at: float = field(default=0.0)  # wall clock of this record
    resumes: int = 0  # how often a start-up has resumed it already (a step that kills nodemedic)

    def to_json(self) -> str:
        return json.dumps({"version": INTENT_VERSION, **asdict(self)}, indent=1, sort_keys=True) + "\n"


class IntentStore:
    """``repair.json`` under the state directory."""

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / INTENT_FILE
        self.corrupt = ""  # where an unusable record was moved, for the start-up record

    def save(self, intent: RepairIntent) -> None:
        """Raises OSError (full, read-only): the caller decides; a repair goes on without it."""
        atomic_write(self.path, intent.to_json())

    def clear(self) -> None:
        """The repair concluded: nothing to finish after a crash."""
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            return
        fsync_directory(self.path.parent)

    def load(self) -> RepairIntent | None:
        """The unfinished repair, or None. A record that cannot be read is moved aside."""
        return load_checked(self.path, _parse_text, self._noted)

    def _noted(self, aside: SetAside) -> None:
        self.corrupt = aside.kept_as  # the runner's start-up record says it


def _parse_text(text: str) -> RepairIntent:
    return _parse(json.loads(text))


def _parse(data: Any) -> RepairIntent:
    """Every field checked for its type: a record half-understood could start the wrong unit."""
    if not isinstance(data, dict) or data.get("version") != INTENT_VERSION:
        raise ValueError(f"not a nodemedic repair record of version {INTENT_VERSION}")
    texts = {k: data[k] for k in ("incident", "rule", "step", "unit")}
    lists = {k: data[k] for k in ("stopped", "applied", "paths")}
    numbers = {k: data[k] for k in ("started_at", "at")}
    if not all(isinstance(v, str) for v in texts.values()):
        raise ValueError("incident, rule, step and unit must be strings")
    if not all(isinstance(v, list) and all(isinstance(x, str) for x in v) for v in lists.values()):
        raise ValueError("stopped, applied and paths must be lists of strings")
    index, resumes = data["index"], data.get("resumes", 0)
    if not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in (index, resumes)):
        raise ValueError("index and resumes must be non-negative integers")
    if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in numbers.values()):
        raise ValueError("started_at and at must be numbers")
    try:  # an integer past float's range would raise OverflowError, which no loader expects
        times = {k: float(v) for k, v in numbers.items()}
    except OverflowError as exc:
        raise ValueError("started_at and at must be times") from exc
    if not all(math.isfinite(v) for v in times.values()):
        raise ValueError("started_at and at must be finite")
    return RepairIntent(
        incident=texts["incident"],
        rule=texts["rule"],
        started_at=times["started_at"],
        index=index,
        step=texts["step"],
        stopped=tuple(lists["stopped"]),
        applied=tuple(lists["applied"]),
        paths=tuple(lists["paths"]),
        unit=texts["unit"],
        at=times["at"],
        resumes=resumes,
    )
