"""A real request to containerd: its Version API over the socket, with grpclib (asyncio-native).

The request is google.protobuf.Empty (no bytes) and the answer
containerd.services.version.v1.VersionResponse {string version = 1; string revision = 2;}, read
here from the protobuf wire format: two strings need no protobuf runtime (a megabyte and more of
RSS in every node).

One HTTP/2 connection per socket is kept between requests (a channel per request cost about 4 ms of
CPU each, four times a second). A request that fails closes it, so the next request dials anew on a
fresh connection: grpclib has no reconnect backoff, so a containerd that comes back is seen by the
first request after it listens (docs/design.md, "probe client").
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from grpclib.client import Channel, UnaryUnaryMethod
from grpclib.encoding.base import CodecBase
from grpclib.exceptions import GRPCError, ProtocolError, StreamTerminatedError
from h2.exceptions import H2Error

from nodemedic.errors import ProbeError
from nodemedic.events import Event, ProbeAnswered, ProbeFailed
from nodemedic.ports import Clock, VersionProbe

VERSION_METHOD = "/containerd.services.version.v1.Version/Version"
# What a failed request can raise: containerd's status, a connection lost or refused (OSError),
# a broken HTTP/2 exchange, the deadline (grpclib raises asyncio.TimeoutError).
_FAILURES = (GRPCError, StreamTerminatedError, ProtocolError, H2Error, OSError, asyncio.TimeoutError)


class Empty:
    """google.protobuf.Empty: encodes to no bytes."""


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


class VersionCodec(CodecBase):
    """grpclib's codec for the two messages above (its own ProtoCodec needs the protobuf runtime)."""

    __content_subtype__ = "proto"

    def encode(self, message: Any, message_type: Any) -> bytes:
        if not isinstance(message, Empty):
            raise TypeError(f"only Empty is sent, not {type(message).__name__}")
        return b""

    def decode(self, data: bytes, message_type: Any) -> Any:
        return VersionResponse.from_wire(data)


class ContainerdProbe:
    """Asks containerd for its version over one kept connection per socket; a failed request
    closes it, so the next one (the confirmation, the next probe) is on a fresh connection."""

    def __init__(self) -> None:
        self._channels: dict[str, Channel] = {}

    async def version(self, socket: str, timeout: float) -> str:
        channel = self._channels.get(socket)
        if channel is None:
            channel = self._channels[socket] = Channel(path=socket, codec=VersionCodec())
        call = UnaryUnaryMethod[Empty, VersionResponse](channel, VERSION_METHOD, Empty, VersionResponse)
        try:
            response = await call(Empty(), timeout=timeout)
        except _FAILURES as exc:
            self._drop(socket, channel)
            raise ProbeError(f"containerd Version on {socket}: {_describe(exc, timeout)}") from exc
        except ValueError as exc:  # an answer that is no VersionResponse
            self._drop(socket, channel)
            raise ProbeError(f"containerd Version on {socket}: unreadable answer: {exc}") from exc
        return response.version

    def _drop(self, socket: str, channel: Channel) -> None:
        """Close the failed connection; another request may already have replaced it."""
        channel.close()
        if self._channels.get(socket) is channel:
            del self._channels[socket]

    def close(self) -> None:
        """Close every kept connection (at shutdown; a later request dials again)."""
        for channel in self._channels.values():
            channel.close()
        self._channels.clear()


def _describe(exc: BaseException, timeout: float) -> str:
    if isinstance(exc, asyncio.TimeoutError):
        return f"DEADLINE_EXCEEDED: no answer within {timeout:g}s"
    if isinstance(exc, GRPCError):
        return f"{exc.status.name}: {exc.message}"
    if isinstance(exc, OSError):
        return f"UNAVAILABLE: {exc.strerror or exc}"
    return f"UNAVAILABLE: {type(exc).__name__}: {exc}"


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
