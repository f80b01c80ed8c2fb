"""Write real journal files: entries in journal export format, fed to systemd-journal-remote.

systemd-journal-remote (Debian package systemd-journal-remote) reads the export format on stdin
("-") and appends the entries to the journal file named by --output (created if missing; the name
must end in .journal). Found on systemd 252: an entry without __REALTIME_TIMESTAMP is dropped
with "Entry is invalid, ignoring." and exit status 0, so the count it reports is checked;
__MONOTONIC_TIMESTAMP and _BOOT_ID are optional (zero when missing). A value that is not text
(or holds a newline) uses the binary form: NAME, newline, little-endian 64-bit length, bytes, newline.
"""

from __future__ import annotations

import asyncio
import re
import struct
import time
from collections.abc import Mapping
from pathlib import Path

import pytest

JOURNAL_REMOTE = Path("/lib/systemd/systemd-journal-remote")
CONTAINERD = "containerd.service"

Fields = Mapping[str, str | bytes | list[str]]


def boot_id() -> str:
    return Path("/proc/sys/kernel/random/boot_id").read_text(encoding="ascii").strip().replace("-", "")


def export_format(entries: list[Fields], first_realtime_us: int) -> bytes:
    out = bytearray()
    for n, fields in enumerate(entries):
        out += f"__REALTIME_TIMESTAMP={first_realtime_us + n}\n".encode()
        out += f"__MONOTONIC_TIMESTAMP={time.monotonic_ns() // 1000}\n_BOOT_ID={boot_id()}\n".encode()
        for name, value in fields.items():
            for one in value if isinstance(value, list) else [value]:
                data = one.encode() if isinstance(one, str) else one
                if b"\n" in data or not isinstance(one, str):
                    out += name.encode() + b"\n" + struct.pack("<Q", len(data)) + data + b"\n"
                else:
                    out += name.encode() + b"=" + data + b"\n"
        out += b"\n"
    return bytes(out)


class JournalWriter:
    """Appends entries to ``directory``/``name``, a real journal file."""

    def __init__(self, directory: Path) -> None:
        if not JOURNAL_REMOTE.exists():
            pytest.fail(f"{JOURNAL_REMOTE} is missing (Debian package systemd-journal-remote)")
        self.directory = directory
        self._last_us = 0

    async def write(self, *entries: Fields, name: str = "remote.journal") -> None:
        # strictly increasing timestamps, so that the order of entries is the order written
        first = max(time.time_ns() // 1000, self._last_us + 1)
        self._last_us = first + len(entries)
        proc = await asyncio.create_subprocess_exec(
            str(JOURNAL_REMOTE),
            f"--output={self.directory / name}",
            "-",
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(proc.communicate(export_format(list(entries), first)), 10)
        text = (out + err).decode(errors="replace")
        written = re.search(r"writing (\d+) entries", text)
        assert proc.returncode == 0, text
        assert written is not None, text
        assert int(written.group(1)) == len(entries), text


def containerd_says(message: str | bytes, pid: int = 2345) -> dict[str, str | bytes]:
    """A line containerd wrote to its stderr, as journald stores it."""
    return {
        "MESSAGE": message,
        "PRIORITY": "6",
        "SYSLOG_IDENTIFIER": "containerd",
        "_PID": str(pid),
        "_COMM": "containerd",
        "_SYSTEMD_UNIT": CONTAINERD,
        "_TRANSPORT": "stdout",
    }


def systemd_says(message: str, about: str = CONTAINERD) -> dict[str, str | bytes]:
    """A line systemd (PID 1, root) logged about a unit: the unit is in UNIT=, not _SYSTEMD_UNIT=."""
    return {
        "MESSAGE": message,
        "PRIORITY": "5",
        "SYSLOG_IDENTIFIER": "systemd",
        "_PID": "1",
        "_UID": "0",
        "_COMM": "systemd",
        "_SYSTEMD_UNIT": "init.scope",
        "UNIT": about,
        "_TRANSPORT": "journal",
    }


def kubelet_says(message: str) -> dict[str, str | bytes]:
    return {
        "MESSAGE": message,
        "SYSLOG_IDENTIFIER": "kubelet",
        "_PID": "3456",
        "_SYSTEMD_UNIT": "kubelet.service",
    }
