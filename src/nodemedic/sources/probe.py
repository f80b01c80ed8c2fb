"""A real request to containerd: its Version API over the socket (sources/grpcwire.py: gRPC's
unary call over one kept HTTP/2 connection, no gRPC library).

The request is google.protobuf.Empty (no bytes) and the answer
containerd.services.version.v1.VersionResponse {string version = 1; string revision = 2;}, read
here from the protobuf wire format: two strings need no protobuf runtime.

One connection per socket is kept between requests (a grpc.aio channel per request cost about
2.8 ms of CPU each, four times a second). A request that fails or times out aborts it, so the next
request (the rule's confirmation, the next probe) dials anew on a fresh connection: there is no
reconnect backoff, so a containerd that comes back is seen by the first request after it listens
(docs/design.md, "probe client").
"""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Callable, Coroutine
from typing import Any

from nodemedic.errors import ProbeError
from nodemedic.events import Event, PathKind, ProbeAnswered, ProbeFailed
from nodemedic.fs import path_identity
from nodemedic.ports import Clock, VersionProbe
from nodemedic.sources.grpcwire import CallFailed, Connection

Identity = tuple[PathKind, int, int]  # what path_identity says of the socket path

VERSION_METHOD = "/containerd.services.version.v1.Version/Version"
log = logging.getLogger(__name__)


class VersionResponse:
    """containerd's VersionResponse, decoded from the wire format (fields 1 and 2, strings)."""

    def __init__(self, version: str = "", revision: str = "") -> None:
        self.version = version
        self.revision = revision

    @classmethod
    def from_wire(cls, data: bytes) -> VersionResponse:
        """Raises ValueError on bytes that are no protobuf message; unknown fields are skipped."""
        strings: dict[int, str] = {}
        pos = 0
        while pos < len(data):
            key, pos = _varint(data, pos)
            number, wire = key >> 3, key & 7
            if wire == 0:
                _, pos = _varint(data, pos)
            elif wire == 2:
                size, pos = _varint(data, pos)
                if pos + size > len(data):
                    raise ValueError("a length-delimited field runs past the message")
                if number in (1, 2):
                    strings[number] = data[pos : pos + size].decode("utf-8", "replace")
                pos += size
            elif wire in (1, 5):
                pos += 8 if wire == 1 else 4
            else:
                raise ValueError(f"wire type {wire} of field {number} is not supported")
        if pos > len(data):
            raise ValueError("the last field runs past the message")
        return cls(strings.get(1, ""), strings.get(2, ""))


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(data) or shift > 63:
            raise ValueError("a varint runs past the message or past 64 bits")
        byte = data[pos]
        value |= (byte & 0x7F) << shift
        pos, shift = pos + 1, shift + 7
        if not byte & 0x80:
            return value, pos


class ContainerdProbe:
    """Asks containerd for its version over one kept connection per socket. A failed request
    closes it, so the next one is on a fresh connection; one that fails on the kept connection
    without timing out (closed by a containerd that restarted meanwhile) is asked once more on a
    new one at once. A request made while another is under way (the rule's confirmation during the
    next probe) gets a connection of its own, closed after it.

    A kept connection is used only while the socket file it was dialled to is still at the path
    (device and inode, one lstat a request): a containerd that runs on with its socket unlinked
    (issue 18: it serves only connections already open, every new client is refused) or a
    placeholder in its place is seen by the next request, as a new client would see it."""

    def __init__(self) -> None:
        self._kept: dict[str, Connection] = {}
        self._dialled: dict[Connection, Identity] = {}  # a kept connection -> the file it was dialled to

    async def version(self, socket: str, timeout: float) -> str:
        try:
            answer = await _within(timeout, self._call(socket))
            return VersionResponse.from_wire(answer).version
        except (asyncio.TimeoutError, CallFailed, OSError, ValueError) as exc:
            raise ProbeError(f"containerd Version on {socket}: {_why(exc, timeout)}") from exc

    async def _call(self, socket: str) -> bytes:
        kept = self._kept.get(socket)
        if kept is not None and path_identity(socket) != self._dialled.get(kept):
            log.debug("containerd Version on %s: the socket file changed; dialling anew", socket)
            if not kept.busy:
                self._drop(socket, kept)
            kept = None
        if kept is not None and not kept.usable:
            if not kept.busy:  # closed by the server, or out of stream ids: dialled anew
                self._drop(socket, kept)
            kept = None
        if kept is not None:
            try:
                return await self._on(socket, kept)
            except (CallFailed, OSError):
                # Before any frame of our stream: most likely closed by the server while idle
                # (containerd restarted, or its GOAWAY), so asked once more on a new connection
                # within the same deadline, as gRPC clients do. A hang is a timeout, not this; an
                # answer that came and was bad, or a new connection that fails, is not retried.
                if kept.heard:
                    raise
                log.debug("containerd Version on %s: kept connection failed; asking anew", socket)
        identity = path_identity(socket)
        conn = await Connection.open(socket)
        if socket not in self._kept:  # a concurrent request may have kept its own meanwhile
            self._kept[socket], self._dialled[conn] = conn, identity
        return await self._on(socket, conn)

    def _drop(self, socket: str, conn: Connection) -> None:
        conn.close()
        if self._kept.get(socket) is conn:
            del self._kept[socket]
        self._dialled.pop(conn, None)

    async def _on(self, socket: str, conn: Connection) -> bytes:
        try:
            return await conn.unary_empty(VERSION_METHOD)
        except BaseException:  # a failure, or cut off by the timeout: its state is unknown
            self._drop(socket, conn)
            raise
        finally:
            if self._kept.get(socket) is not conn:
                conn.close()

    def close(self) -> None:
        """Close every kept connection (at shutdown; a later request dials again)."""
        for conn in self._kept.values():
            conn.close()
        self._kept.clear()
        self._dialled.clear()


async def _within(timeout: float, call: Coroutine[Any, Any, bytes]) -> bytes:
    """``call`` cut off after ``timeout`` (asyncio.TimeoutError); no extra task from 3.11 on."""
    if sys.version_info >= (3, 11):
        async with asyncio.timeout(timeout):
            return await call
    return await asyncio.wait_for(call, timeout)


def _why(exc: Exception, timeout: float) -> str:
    if isinstance(exc, asyncio.TimeoutError):  # not the builtin TimeoutError on 3.10
        return f"DEADLINE_EXCEEDED: no answer within {timeout:g}s"
    if isinstance(exc, OSError):
        return f"UNAVAILABLE: {exc.strerror or exc}"
    if isinstance(exc, ValueError):
        return f"INTERNAL: an answer that is no VersionResponse: {exc}"
    return str(exc)


class ProbeLoop:
    """Asks containerd for its version every ``interval``; each failure is reported with the number
    of failures in a row, so a rule can wait for N. A probe is periodic by nature: a hung containerd
    sends no event (systemd still says active/running), only a real request shows it."""

    def __init__(
        self,
        probe: VersionProbe,
        socket: str,
        interval: float,
        timeout: float,
        emit: Callable[[Event], None],
        clock: Clock,
    ) -> None:
        self._probe = probe
        self.socket = socket
        self.interval = interval
        self.timeout = timeout
        self._emit = emit
        self._clock = clock

    async def run(self) -> None:
        failures = 0
        while True:
            try:
                await self._probe.version(self.socket, self.timeout)
            except ProbeError as exc:
                failures += 1
                self._emit(ProbeFailed(self.socket, str(exc), failures, at=self._clock.monotonic()))
            else:
                if failures:
                    self._emit(ProbeAnswered(self.socket, at=self._clock.monotonic()))
                failures = 0
            await asyncio.sleep(self.interval)
