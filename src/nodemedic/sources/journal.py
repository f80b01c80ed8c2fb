"""Follow journald for watched units: their own lines and systemd's lines about them.

The reader is driven by its file descriptor on the event loop (no thread, no sleep loop). The
cursor of the last entry handled is kept in the state directory, so a restarted daemon neither
misses nor replays entries; with no cursor it starts at the end of the journal.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from nodemedic.clock import Clock
from nodemedic.events import Event, JournalLine
from nodemedic.state import atomic_write

log = logging.getLogger(__name__)
# Not a unit: "kernel" in the units followed means the kernel's own lines (OOM kills, SELinux and
# AppArmor denials), which no unit owns.
KERNEL = "kernel"
KERNEL_TRANSPORTS = ("kernel", "audit")


class JournalFollower:
    """Emits a JournalLine for every new entry from or about ``units``."""

    def __init__(
        self,
        units: list[str],
        emit: Callable[[Event], None],
        clock: Clock,
        *,
        cursor_file: Path | None = None,
        journal_dir: str | None = None,
    ) -> None:
        self.units = list(units)
        self._emit = emit
        self._clock = clock
        self._cursor_file = cursor_file
        self._journal_dir = journal_dir
        self._cursor = ""
        self._saved = ""

    async def run(self) -> None:
        if not self.units:
            return
        reader = self._open()
        loop = asyncio.get_running_loop()
        fd = reader.fileno()
        try:
            self._drain(reader)
            loop.add_reader(fd, self._on_readable, reader)
            await asyncio.Future()  # runs until cancelled
        finally:
            loop.remove_reader(fd)
            reader.close()

    def _open(self) -> Any:
        from systemd import journal

        reader = journal.Reader(path=self._journal_dir) if self._journal_dir else journal.Reader()
        units = [u for u in self.units if u != KERNEL]
        for unit in units:
            reader.add_match(_SYSTEMD_UNIT=unit)
        reader.add_disjunction()
        for unit in units:
            reader.add_match(UNIT=unit)
        if KERNEL in self.units:
            reader.add_disjunction()
            for transport in KERNEL_TRANSPORTS:
                reader.add_match(_TRANSPORT=transport)
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
        reader.process()
        self._drain(reader)

    def _drain(self, reader: Any) -> None:
        while entry := reader.get_next():
            self._cursor = str(entry.get("__CURSOR", self._cursor))
            line = self._line(entry)
            if line is not None:
                self._emit(line)
        self._save_cursor()

    def _line(self, entry: dict[str, Any]) -> JournalLine | None:
        unit = entry.get("UNIT")
        if unit not in self.units:
            unit = entry.get("_SYSTEMD_UNIT")
        if unit not in self.units and KERNEL in self.units and entry.get("_TRANSPORT") in KERNEL_TRANSPORTS:
            unit = KERNEL
        if unit not in self.units:
            return None
        return JournalLine(
            unit=str(unit),
            message=_text(entry.get("MESSAGE")),
            identifier=_text(entry.get("SYSLOG_IDENTIFIER")),
            pid=_int(entry.get("_PID")),
            cursor=self._cursor,
            at=self._clock.monotonic(),
        )

    def _load_cursor(self) -> str:
        if self._cursor_file is None:
            return ""
        try:
            return self._cursor_file.read_text(encoding="utf-8").strip()
        except FileNotFoundError:
            return ""
        except (OSError, UnicodeDecodeError):
            log.warning("cannot read %s; starting at the end of the journal", self._cursor_file)
            return ""

    def _save_cursor(self) -> None:
        # The fd wakes on every write by any unit: write (and fsync) only when we moved on.
        if self._cursor_file is None or not self._cursor or self._cursor == self._saved:
            return
        try:
            atomic_write(self._cursor_file, self._cursor + "\n")
            self._saved = self._cursor
        except OSError:
            log.warning("cannot save the journal cursor to %s", self._cursor_file, exc_info=True)


def _text(value: object) -> str:
    """A journal field as text: binary fields are decoded leniently, repeated fields joined."""
    if value is None:
        return ""
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, list):
        return "\n".join(_text(v) for v in value)
    return str(value)


def _int(value: object) -> int:
    try:
        return int(str(value))
    except ValueError:
        return 0
