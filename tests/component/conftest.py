"""Component-test fixtures: a private dbus-daemon, short temporary directories."""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

DBUS_CONFIG = """<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-BUS Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>session</type>
  <listen>unix:path={socket}</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow send_destination="*" eavesdrop="true"/>
    <allow eavesdrop="true"/>
    <allow own="*"/>
  </policy>
</busconfig>
"""


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A temporary directory with a short path: a unix socket path must fit in 108 bytes."""
    with tempfile.TemporaryDirectory(prefix="nm-") as tmp:
        yield Path(tmp)


class DbusDaemon:
    """A private dbus-daemon at a fixed socket path; ``start`` again after ``kill`` reuses it."""

    def __init__(self, directory: Path) -> None:
        self.socket = directory / "bus"
        self.config = directory / "bus.conf"
        self.config.write_text(DBUS_CONFIG.format(socket=self.socket), encoding="utf-8")
        self.address = f"unix:path={self.socket}"
        self._proc: asyncio.subprocess.Process | None = None

    async def start(self) -> str:
        """Start the daemon; return the address it printed (once it listens)."""
        assert self._proc is None, "already running"
        self.socket.unlink(missing_ok=True)  # a killed daemon leaves its socket file behind
        dbus_daemon = shutil.which("dbus-daemon")
        if dbus_daemon is None:
            pytest.fail("dbus-daemon is not installed (Debian package dbus-daemon)")
        self._proc = await asyncio.create_subprocess_exec(
            dbus_daemon,
            f"--config-file={self.config}",
            "--nofork",
            "--print-address",
            stdout=asyncio.subprocess.PIPE,
        )
        assert self._proc.stdout is not None
        line = await asyncio.wait_for(self._proc.stdout.readline(), 10)
        printed = line.decode().strip()
        if not printed.startswith(self.address):
            await self.kill()
            pytest.fail(f"dbus-daemon did not start (printed {printed!r})")
        return printed

    async def kill(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.returncode is None:
            proc.kill()
        await proc.communicate()  # reaps it and reads its stdout to the end: nothing left open


@pytest.fixture
async def dbus_daemon(short_tmp: Path) -> AsyncIterator[DbusDaemon]:
    """A running private bus; killed after the test whatever happened."""
    daemon = DbusDaemon(short_tmp)
    try:
        await daemon.start()
        yield daemon
    finally:
        await daemon.kill()
