"""The probe's kept connection against a real unix-socket HTTP/2 server in this process: a server
that restarts between requests, two requests racing to dial, and hostile servers (floods, a server
that never reads) that must fail the call quickly and leave no connection behind."""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from hpack import Encoder

from nodemedic.errors import ProbeError
from nodemedic.sources import grpcwire as gw
from nodemedic.sources.probe import ContainerdProbe

pytestmark = pytest.mark.component

OK = [(":status", "200"), ("content-type", "application/grpc")]
MESSAGE = b"\x00\x00\x00\x00\x04" + b"\x0a\x02v1"
Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def _request(reader: asyncio.StreamReader) -> int:
    """Read the preface and frames up to a DATA with END_STREAM; its stream id."""
    while True:
        head = await reader.readexactly(9)
        if head == gw.PREFACE[:9]:
            await reader.readexactly(len(gw.PREFACE) - 9)
            continue
        await reader.readexactly(int.from_bytes(head[:3], "big"))
        if head[3] == gw.DATA and head[4] & gw.END_STREAM:
            return int.from_bytes(head[5:9], "big")


def _answer(encoder: Encoder, stream: int) -> bytes:
    return (
        gw._frame(gw.HEADERS, gw.END_HEADERS, stream, encoder.encode(OK))
        + gw._frame(gw.DATA, 0, stream, MESSAGE)
        + gw._frame(
            gw.HEADERS, gw.END_HEADERS | gw.END_STREAM, stream, encoder.encode([("grpc-status", "0")])
        )
    )


class Server:
    """containerd's Version answer on every request; counts connections and those still open."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)
        self.writers: list[asyncio.StreamWriter] = []
        self.open = 0
        self._server: asyncio.Server | None = None

    async def start(self, handler: Handler | None = None) -> None:
        self._server = await asyncio.start_unix_server(handler or self._serve, self.path)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers.append(writer)
        self.open += 1
        encoder = Encoder()
        try:
            while True:
                writer.write(_answer(encoder, await _request(reader)))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self.open -= 1
            writer.close()

    async def restart(self, goaway: bool) -> None:
        """Stop listening and drop every connection (with GOAWAY or without), then listen anew."""
        assert self._server is not None
        self._server.close()
        for writer in self.writers:
            if goaway:
                writer.write(gw._frame(gw.GOAWAY, 0, 0, struct.pack(">II", 1, 0)))
            writer.close()
        await asyncio.sleep(0.05)
        Path(self.path).unlink()
        await self.start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.close()


@pytest.mark.parametrize("goaway", [True, False])
async def test_the_first_request_after_a_restart_is_answered(short_tmp: Path, goaway: bool) -> None:
    server = Server(short_tmp / "c.sock")
    await server.start()
    probe = ContainerdProbe()
    try:
        assert await probe.version(server.path, 0.6) == "v1"
        await server.restart(goaway)
        await asyncio.sleep(0.05)  # the close has reached the kept connection: seen before reuse
        assert await probe.version(server.path, 0.6) == "v1"
        assert await probe.version(server.path, 0.6) == "v1"
        assert len(server.writers) == 2  # the second connection was kept
    finally:
        probe.close()
        server.stop()


async def test_two_requests_racing_to_dial_keep_one_connection(short_tmp: Path) -> None:
    server = Server(short_tmp / "c.sock")
    await server.start()
    probe = ContainerdProbe()
    try:
        for _ in range(5):
            assert await asyncio.gather(probe.version(server.path, 0.6), probe.version(server.path, 0.6))
            await asyncio.sleep(0.05)
            assert server.open == 1  # the other one's connection was closed after its request
            probe.close()
            await asyncio.sleep(0.05)
            assert server.open == 0
    finally:
        server.stop()


def _flood(frame: bytes, reads: bool, first: bytes = b"") -> Handler:
    """Sends ``first``, then ``frame`` over and over (both on stream 1: the client's first)."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            if reads:
                assert await _request(reader) == 1
            writer.write(first)
            chunk = frame * 8
            while True:
                writer.write(chunk)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    return serve


@pytest.mark.parametrize(
    ("frame", "reads", "first", "said"),
    [
        (gw._frame(gw.PING, 0, 0, b"p" * 16384), False, b"", "malformed PING"),  # 155 -> 844 MB before
        (gw._frame(gw.PING, 0, 0, b"p" * 8), False, b"", "no answer in 64 frames"),
        (gw._frame(gw.SETTINGS, 0, 0), True, b"", "no answer in 64 frames"),
        (gw._frame(gw.HEADERS, gw.END_HEADERS, 1, b"\x01\x00" * 1500), True, b"", "larger than 8192"),
        (gw._frame(gw.CONTINUATION, 0, 1, b"\x00" * 16000), True, gw._frame(gw.HEADERS, 0, 1, b"\x88"),
         "larger than 16384"),
        (gw._frame(gw.DATA, 0, 3, b""), True, b"", "on stream 3"),
    ],
)  # fmt: skip
async def test_a_flooding_server_fails_the_call_and_is_dropped(
    short_tmp: Path, frame: bytes, reads: bool, first: bytes, said: str
) -> None:
    path = str(short_tmp / "c.sock")
    server = await asyncio.start_unix_server(_flood(frame, reads, first), path)
    probe = ContainerdProbe()
    try:
        with pytest.raises(ProbeError, match=said):  # not DEADLINE_EXCEEDED: no wait for the timeout
            await probe.version(path, 5)
        assert probe._kept == {}
        await asyncio.sleep(0.05)  # the server's writes see the connection aborted
    finally:
        server.close()


async def test_a_bad_answer_on_the_kept_connection_is_not_asked_again(short_tmp: Path) -> None:
    """Only a reused connection that failed before any frame of our stream is retried."""
    dialled: list[int] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        dialled.append(1)
        encoder = Encoder()
        try:
            writer.write(_answer(encoder, await _request(reader)))
            unavailable = encoder.encode([*OK, ("grpc-status", "14")])
            stream = await _request(reader)
            writer.write(gw._frame(gw.HEADERS, gw.END_HEADERS | gw.END_STREAM, stream, unavailable))
            await reader.read()  # until the client aborts
        finally:
            writer.close()

    path = str(short_tmp / "c.sock")
    server = await asyncio.start_unix_server(serve, path)
    probe = ContainerdProbe()
    try:
        assert await probe.version(path, 0.6) == "v1"
        with pytest.raises(ProbeError, match="gRPC status 14"):
            await probe.version(path, 0.6)
        assert len(dialled) == 1
        await asyncio.sleep(0.05)  # the server sees the abort and closes its side
    finally:
        probe.close()
        server.close()


async def test_a_socket_unlinked_under_a_kept_connection_is_seen_at_the_next_request(short_tmp: Path) -> None:
    """containerd runs on with its socket file unlinked (issue 18): the kept connection still gets
    answers, every new client is refused. The probe looks at the file at the path, as a new client
    would: missing, then a placeholder (bound, never listening) in its place, each fails."""
    server = Server(short_tmp / "c.sock")
    await server.start()
    probe = ContainerdProbe()
    try:
        assert await probe.version(server.path, 0.6) == "v1"
        Path(server.path).unlink()  # the server still answers the connection it has
        with pytest.raises(ProbeError):
            await probe.version(server.path, 0.6)
        import socket as sockets

        placeholder = sockets.socket(sockets.AF_UNIX, sockets.SOCK_STREAM)
        placeholder.bind(server.path)  # never listening: ECONNREFUSED
        try:
            with pytest.raises(ProbeError):
                await probe.version(server.path, 0.6)
        finally:
            placeholder.close()
        await asyncio.sleep(0.05)
        assert server.open == 0  # the kept connection to the unlinked socket was closed
    finally:
        probe.close()
        server.stop()
