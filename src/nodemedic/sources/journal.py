"""Follow journald for watched units: their own lines and systemd's lines about them.

The reader is driven by its file descriptor on the event loop (no thread, no sleep loop). The
cursor of the last entry handled is kept in the state directory, so a restarted daemon neither
misses nor replays entries; with no cursor it starts at the end of the journal. Of an entry only
MESSAGE is read until the policy's filter (one RE2 search of every journal trigger's pattern) says
a rule may want it: in a flood nearly every line costs that search and nothing more.

Any local process can write an entry with any field it likes (``UNIT=containerd.service``,
``SYSLOG_IDENTIFIER=containerd``); only the fields whose names start with ``_`` are journald's own,
taken from the sender's credentials and cgroup. Which unit a line belongs to is decided from those
alone: the sender's unit (``_SYSTEMD_UNIT``); ``UNIT=`` only on a line from systemd itself (``_PID``
1, ``_UID`` 0), which is how systemd names the unit it speaks of; the kernel by ``_TRANSPORT``.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Callable, Collection, Mapping
from pathlib import Path
from typing import Any

from nodemedic.events import Event, JournalLine
from nodemedic.ports import Clock
from nodemedic.store import load_checked, save_best_effort

log = logging.getLogger(__name__)
# Not a unit: "kernel" in the units followed means the kernel's own lines (OOM kills, SELinux and
# AppArmor denials), which no unit owns.
KERNEL = "kernel"
KERNEL_TRANSPORTS = ("kernel", "audit")
# systemd's own lines about a unit: sent by PID 1 as root, the unit named in UNIT=.
SYSTEMD_PID = 1
ROOT_UID = 0
_NUMBER = re.compile(r"[0-9]{1,10}")
_CURSOR = re.compile(r"[a-z]=[0-9a-f]{1,64}(;[a-z]=[0-9a-f]{1,64}){0,15}")
# MESSAGE is cut to its first 8 KiB (the policy's patterns search no further either): the lines rules
# look for are under 1 KiB, and journald takes entries up to 32 MiB from any local client, which
# every rule's pattern would otherwise search, and every event and record would carry.
MESSAGE_LIMIT = 8192
# What the reader hands back of a field at most (its default: 64 KiB): room for MESSAGE_LIMIT
# characters of UTF-8; a compressed field is decompressed no further.
DATA_THRESHOLD = 4 * MESSAGE_LIMIT
# A flood (journald's rate limit lifted: 20,000 lines a second and more) is read from the journal
# on disk, the buffer: a batch per turn of the loop (at most BATCH entries, and no more than
# BATCH_SECONDS of reading, the clock looked at every CLOCK_EVERY entries), and if the reading does
# not reach the journal's end for CATCH_UP seconds, the rest is skipped (and said) rather than read
# ever later.
BATCH = 1000
BATCH_SECONDS = 0.02
CLOCK_EVERY = 32
CATCH_UP = 10.0
CURSOR_EVERY = 1.0  # seconds between writes of the cursor while no line is emitted
_SEQNUM = re.compile(r"(?:^|;)s=([0-9a-f]+);i=([0-9a-f]+)")


class JournalFollower:
    """Emits a JournalLine for every new entry from or about ``units`` that ``wanted`` lets through.

    ``wanted`` is told each entry's MESSAGE as the policy's patterns search it (its first
    MESSAGE_LIMIT characters, UTF-8) and says whether some rule may want the line; None: every
    line. Entries are read in batches of at most ``batch`` (and BATCH_SECONDS), one batch per turn
    of the event loop; after ``catch_up`` seconds of reading without reaching the journal's end,
    the follower goes on from the newest entry (which it reads) and says with ``on_skip`` how many
    entries it passed over, and where (``skipped`` counts them, where the cursors tell).

    Of systemd-python's Reader it uses the private methods that read one field or one entry
    without converting all of them (``_next``, ``_get``, ``_get_all``, ``_convert_entry``,
    ``_previous``, ``_get_cursor``, ``_get_realtime``): present from 231 to 235 at least (235
    checked: PyPI and Debian 12's python3-systemd); tests/unit/test_journal_filter.py says clearly
    if a version lacks one.
    """

    def __init__(
        self,
        units: list[str],
        emit: Callable[[Event], None],
        clock: Clock,
        *,
        cursor_file: Path | None = None,
        journal_dir: str | None = None,
        wanted: Callable[[bytes], bool] | None = None,
        on_skip: Callable[[str, str], None] | None = None,
        batch: int = BATCH,
        catch_up: float = CATCH_UP,
    ) -> None:
        self.units = list(units)
        self.wanted = wanted  # the app sets it from the policy, and again at a reload
        self._emit = emit
        self._clock = clock
        self._cursor_file = cursor_file
        self._journal_dir = journal_dir
        self._on_skip = on_skip or (lambda message, detail: log.warning("%s", message))
        self._batch = batch
        self._catch_up = catch_up
        self._cursor = ""
        self._saved = ""
        self._saved_at = -CURSOR_EVERY  # monotonic time of the last write of the cursor file
        self._behind_since: float | None = None  # monotonic time the reading last found no end
        self._next_turn: asyncio.Handle | None = None
        self.lag = 0.0  # seconds the last entry read waited in the journal (its realtime to now)
        self.last_read = 0.0  # wall time the last entry was read (0: none yet); lag freezes meanwhile
        self.skipped = 0  # entries passed over unread (by sequence number: every unit's)

    async def run(self) -> None:
        if not self.units:
            return
        reader = self._open()
        loop = asyncio.get_running_loop()
        fd = reader.fileno()
        try:
            self._read(reader)
            loop.add_reader(fd, self._on_readable, reader)
            await asyncio.Future()  # runs until cancelled
        finally:
            loop.remove_reader(fd)
            if self._next_turn is not None:
                self._next_turn.cancel()
            self._save_cursor(at_once=True)
            reader.close()

    def _open(self) -> Any:
        from systemd import journal

        reader = journal.Reader(path=self._journal_dir) if self._journal_dir else journal.Reader()
        if hasattr(reader, "data_threshold"):
            reader.data_threshold = DATA_THRESHOLD
        add_matches(reader, self.units)
        saved = self._load_cursor()
        if saved:
            try:
                reader.seek_cursor(saved)
                # the entry at the cursor was handled before the restart: step over it; but if it
                # is gone (vacuumed, rotated away) the entry found instead is new: read it again
                if reader.get_next() and not reader.test_cursor(saved):
                    reader.seek_cursor(saved)
                self._cursor = self._saved = saved
                return reader
            except (OSError, ValueError):  # ValueError: not a cursor at all (a damaged file)
                log.warning("journal cursor %r not usable; starting at the end", saved)
        reader.seek_tail()
        reader.get_previous()
        return reader

    def _on_readable(self, reader: Any) -> None:
        """The journal changed: read in a turn of our own (else the batch already due reads the new
        entries too). Never inline: the selector's callback can run in the same turn as a due batch,
        before the events that batch handed on were handled, and two batches would be held."""
        reader.process()
        if self._next_turn is None:
            self._next_turn = asyncio.get_running_loop().call_soon(self._read, reader)

    def _read(self, reader: Any) -> None:
        """One batch; while more wait, the next one in a later turn of the loop, after the events
        of this one were handled (so no more than a batch of lines is ever held in memory)."""
        self._next_turn = None
        if not self._drain(reader):
            self._behind_since = None
            return
        now = self._clock.monotonic()
        if self._behind_since is None:
            self._behind_since = now
        elif now - self._behind_since >= self._catch_up:
            self._skip(reader)
            self._behind_since = None
        self._next_turn = asyncio.get_running_loop().call_soon(self._read, reader)

    def _drain(self, reader: Any) -> bool:
        """Read a batch of entries (at most ``batch``, and for about BATCH_SECONDS); those
        ``wanted`` lets through become JournalLines. True: the batch was cut, more may wait.
        Only MESSAGE is read of an entry no rule wants."""
        wanted, read, emitted, full = self.wanted, 0, False, False
        until, look = self._clock.monotonic() + BATCH_SECONDS, min(self._batch, CLOCK_EVERY)
        while reader._next():
            read += 1
            if wanted is None or wanted(_searched(reader)):
                emitted = self._take(reader) or emitted
            if read == look:  # the batch's end, or time to look at the clock
                if read >= self._batch or self._clock.monotonic() >= until:
                    full = True
                    break
                look += min(CLOCK_EVERY, self._batch - read)
        if read:
            self._cursor = reader._get_cursor() or self._cursor
            self.last_read = self._clock.wall()
            self.lag = max(0.0, self.last_read - reader._get_realtime() / 1e6)
        self._save_cursor(at_once=emitted)
        return full

    def _take(self, reader: Any) -> bool:
        """The entry the reader is at becomes a JournalLine if it is from or about a followed
        unit (`attribute`); True if it did."""
        self._cursor = reader._get_cursor()
        line = self._line(reader._convert_entry(reader._get_all()))
        if line is None:
            return False
        self._emit(line)
        return True

    def _skip(self, reader: Any) -> None:
        """Reading has not caught up for ``catch_up`` seconds: go on from the journal's end. The
        newest entry of the units is read (judged by ``wanted`` as any other), the ones between
        passed over. An unknown count (the cursors are of different journal files) is said as
        such and not added to ``skipped``."""
        before = self._cursor
        reader.seek_tail()
        newest = bool(reader._previous())  # the newest entry of the units: reading goes on after it
        if newest:
            self._cursor = reader._get_cursor()
        count = entries_between(before, self._cursor)
        count -= newest and count > 0  # the newest one is read, not skipped
        self.skipped += max(count, 0)
        told = f"{count} entries" if count >= 0 else "an unknown number of entries"
        self._on_skip(
            f"journal reading fell behind for {self._catch_up:g} s; {told} (of every unit) skipped "
            "unread, reading goes on from the journal's end",
            f"skipped after cursor {before or '(none)'} up to {self._cursor}",
        )
        if newest and (self.wanted is None or self.wanted(_searched(reader))):
            self._take(reader)
        self._save_cursor(at_once=True)

    def _line(self, entry: Mapping[str, object]) -> JournalLine | None:
        return line_from_entry(entry, self.units, self._clock.monotonic(), self._cursor)

    def _load_cursor(self) -> str:
        if self._cursor_file is None:
            return ""
        # a damaged file is moved aside (and reported at start-up): start at the end of the journal
        return load_checked(self._cursor_file, _checked_cursor) or ""

    def _save_cursor(self, *, at_once: bool) -> None:
        """Write (and fsync) the cursor if we moved on: at once after a batch that emitted a line
        (so that a restart seldom hands the rules a line again: only one emitted just before a
        crash, or when the write fails; and a line emitted but not yet matched when the daemon
        dies is not handed again), else at most every CURSOR_EVERY seconds (in a flood the fd
        wakes for nearly every line; lines read again after a crash are filtered again)."""
        if self._cursor_file is None or not self._cursor or self._cursor == self._saved:
            return
        now = self._clock.monotonic()
        if not at_once and now - self._saved_at < CURSOR_EVERY:
            return
        self._saved_at = now
        if save_best_effort(self._cursor_file, self._cursor + "\n"):  # a failure is said once
            self._saved = self._cursor


def add_matches(reader: Any, units: Collection[str]) -> None:
    """Narrow a journal Reader to what the source reads: each unit's own lines, systemd's lines
    about it, and the kernel's (for the unit "kernel"). Only a pre-filter: `attribute` decides."""
    named = [u for u in units if u != KERNEL]
    for unit in named:
        reader.add_match(_SYSTEMD_UNIT=unit)
    reader.add_disjunction()
    for unit in named:  # fields of one match group are ANDed: only PID 1, as root, names a UNIT=
        reader.add_match(UNIT=unit, _PID=str(SYSTEMD_PID), _UID=str(ROOT_UID))
    if KERNEL in units:
        reader.add_disjunction()
        for transport in KERNEL_TRANSPORTS:
            reader.add_match(_TRANSPORT=transport)


def entries_between(before: str, after: str) -> int:
    """How many entries lie between two cursors of one journal (by the sequence numbers in
    them, every unit's entries counted); -1 when they do not say (another journal, no cursor)."""
    a, b = _SEQNUM.search(before), _SEQNUM.search(after)
    if a is None or b is None or a.group(1) != b.group(1):
        return -1
    return max(0, int(b.group(2), 16) - int(a.group(2), 16))


def _searched(reader: Any) -> bytes:
    """The current entry's MESSAGE as the policy's patterns search it: its first MESSAGE_LIMIT
    characters in UTF-8 (what `line_from_entry` and `Regex.search` make of it). A short ASCII
    line, nearly every line, is searched as journald holds it, without a copy.

    Of a repeated MESSAGE field only the first value is searched, where the rules search all of
    them joined with newlines (knowing that a field repeats costs reading every field of every
    entry): a line whose match needs a later value is refused. Only a process in the followed
    unit's own cgroup, speaking journald's native protocol, can write one (its stdout and stderr,
    syslog and the kernel never do); such a process can as well write nothing at all."""
    try:
        data: bytes = reader._get("MESSAGE")
    except KeyError:  # no MESSAGE at all
        return b""
    if len(data) <= MESSAGE_LIMIT and data.isascii():
        return data
    return _text(data, MESSAGE_LIMIT).encode("utf-8", "replace")


def _checked_cursor(text: str) -> str:
    """A journal cursor as sd_journal_get_cursor() writes it (``s=...;i=...;b=...``), one line."""
    cursor = text.strip()
    if not _CURSOR.fullmatch(cursor):
        raise ValueError(f"not a journal cursor: {cursor[:80]!r}")
    return cursor


def line_from_entry(
    entry: Mapping[str, object], units: Collection[str], at: float, cursor: str = ""
) -> JournalLine | None:
    """The JournalLine this source emits for ``entry`` (None: not from or about ``units``); also
    what `nodemedic replay` turns each entry of a journal's history into."""
    unit = attribute(entry, units)
    if unit is None:
        return None
    return JournalLine(
        unit=unit,
        message=_text(entry.get("MESSAGE"), MESSAGE_LIMIT),
        identifier=_text(entry.get("SYSLOG_IDENTIFIER"), 256),
        pid=_number(entry.get("_PID")) or 0,
        cursor=cursor,
        at=at,
    )


def attribute(entry: Mapping[str, object], units: Collection[str]) -> str | None:
    """The followed unit (or KERNEL) an entry belongs to, judged by the fields journald sets itself."""
    if entry.get("_TRANSPORT") in KERNEL_TRANSPORTS:
        return KERNEL if KERNEL in units else None
    from_systemd = _number(entry.get("_PID")) == SYSTEMD_PID and _number(entry.get("_UID")) == ROOT_UID
    for unit in (entry.get("UNIT") if from_systemd else None, entry.get("_SYSTEMD_UNIT")):
        if isinstance(unit, str) and unit != KERNEL and unit in units:
            return unit
    return None


def _text(value: object, limit: int) -> str:
    """A journal field as text, at most ``limit`` characters: binary fields are decoded leniently,
    repeated fields joined. The rest is cut before it is decoded (an entry may hold 32 MiB)."""
    if value is None:
        return ""
    if isinstance(value, bytes):
        return value[: 4 * limit].decode("utf-8", "replace")[:limit]
    if isinstance(value, list):
        parts: list[str] = []
        size = 0
        for one in value:
            if size >= limit:
                break
            parts.append(_text(one, limit - size))
            size += len(parts[-1]) + 1
        return "\n".join(parts)[:limit]
    return str(value)[:limit]


def _number(value: object) -> int | None:
    """A PID or UID field: a plain decimal number (journald's own are), anything else is none."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, bytes):
        value = value.decode("ascii", "replace")
    if isinstance(value, str) and _NUMBER.fullmatch(value):
        return int(value)
    return None
