"""Journald structured records. This module alone decides record kinds and field names.

Every record carries MESSAGE_ID (one per kind, listed in RecordKind), NODEMEDIC_KIND and the
NODEMEDIC_* fields given, so an operator can ask e.g.
``journalctl -u nodemedic NODEMEDIC_ACTION=remove-socket-dir -o json-pretty``.
"""

from __future__ import annotations

import enum
import logging
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol

log = logging.getLogger(__name__)


class RecordKind(enum.Enum):
    """Kinds of record, with their journald MESSAGE_ID and priority (6 info, 5 notice, 4 warning, 3 err)."""

    DAEMON = ("000415df6ff74173ac57703e7f350a61", 6)
    DETECTED = ("b3e9861bc2ab441bbf4af9846779e0d9", 4)
    DECIDED = ("18c326018db04e7fb01bb1aaa7c94f1c", 5)
    ACTION = ("9ff711fedf1b4e4bb1cea138ab3617f4", 5)
    OUTCOME = ("8161e9abc08440a59afdb9eed7a98099", 5)
    ERROR = ("f434314036604420962625f6258b221f", 3)
    ESCALATED = ("94f70fd0a0194f4e9b9e62a12a384752", 2)  # a breaker opened: a human is needed

    @property
    def message_id(self) -> str:
        return self.value[0]

    @property
    def priority(self) -> int:
        return self.value[1]


# The structured fields nodemedic writes. Values are strings in journald.
FIELDS = frozenset(
    {
        "RULE",  # the policy rule concerned
        "ACTION",  # the action kind, e.g. remove-socket-dir
        "OUTCOME",  # done | would-do | skipped | failed | refused | repaired | not-repaired
        "MODE",  # enforce | observe
        "PATH",  # a file-system path concerned
        "UNIT",  # a systemd unit concerned
        "SOURCE",  # the event source: inotify | dbus | journal | probe | startup
        "TRIGGER",  # what fired, in a few words
        "INCIDENT",  # an id shared by every record of one incident
        "ELAPSED_MS",  # milliseconds since the incident's first event (or the action's start)
        "DETAIL",  # free text: an error, what was found
        "VERSION",  # nodemedic's or containerd's version
        "SIGNALS",  # how many signals (a SIGHUP storm's count)
        "SENDERS",  # who sent them: unit or pod, with PID and command
        "WINDOW",  # the window counted over, in seconds
        "CGROUP",  # a cgroup concerned (relative to nodemedic's cgroup namespace)
    }
)


@dataclass(frozen=True, slots=True)
class Record:
    kind: RecordKind
    message: str
    fields: Mapping[str, str] = field(default_factory=dict)

    def journal_fields(self) -> dict[str, str]:
        out = {f"NODEMEDIC_{k}": v for k, v in self.fields.items()}
        out["NODEMEDIC_KIND"] = self.kind.name.lower()
        out["MESSAGE_ID"] = self.kind.message_id
        out["PRIORITY"] = str(self.kind.priority)
        out["SYSLOG_IDENTIFIER"] = "nodemedic"
        return out


class Sink(Protocol):
    def emit(self, record: Record) -> None: ...


class JournalSink:
    """Writes records to journald with systemd-python's journal.send."""

    def __init__(self) -> None:
        from systemd import journal  # imported here: no import-time side effects elsewhere

        self._send = journal.send

    def emit(self, record: Record) -> None:
        self._send(record.message, **record.journal_fields())


class StderrSink:
    """Writes one line per record to stderr: for a terminal, or where journald is absent."""

    def emit(self, record: Record) -> None:
        extra = " ".join(f"{k}={v}" for k, v in sorted(record.fields.items()))
        print(f"[{record.kind.name.lower()}] {record.message} {extra}".rstrip(), file=sys.stderr)


class MemorySink:
    """Keeps records in a list: for tests."""

    def __init__(self) -> None:
        self.records: list[Record] = []

    def emit(self, record: Record) -> None:
        self.records.append(record)

    def of(self, kind: RecordKind) -> list[Record]:
        return [r for r in self.records if r.kind is kind]


class Reporter:
    """The one door through which nodemedic says what it saw, decided and did."""

    def __init__(self, sink: Sink) -> None:
        self._sink = sink

    def __call__(self, kind: RecordKind, message: str, **fields: object) -> Record:
        unknown = set(fields) - FIELDS
        if unknown:
            raise ValueError(f"unknown record fields {sorted(unknown)}; known: {sorted(FIELDS)}")
        values = {k: _text(v) for k, v in fields.items() if v is not None and v != ""}
        record = Record(kind, message, values)
        try:
            self._sink.emit(record)
        except OSError:
            # journald unreachable must not stop a repair; say so where we still can.
            log.warning("could not write record to journald: %s", message, exc_info=True)
        return record


def _text(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.0f}"
    if isinstance(value, enum.Enum):
        return str(value.value)
    return str(value)
