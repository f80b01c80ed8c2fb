"""The least of gRPC that the probe needs: unary calls with an empty request, over one kept HTTP/2
connection to a unix socket (RFC 9113 framing, RFC 7541 HPACK through the ``hpack`` package).

Why not a gRPC library: grpcio's channel per request cost about 4 ms of CPU (and grpcio 10 MB of
RSS); grpclib over h2 about 1.2 ms per request, most of it in h2's general state machine. This
client writes one pre-encoded request (HEADERS + DATA in one write) and reads frames until its
stream ends; docs/design.md ("probe client") has the measured figures.

What a server may send and how it is taken: SETTINGS and PING are acknowledged, WINDOW_UPDATE,
PRIORITY and unknown frames are ignored, every header block is decoded (the HPACK table must stay
in step) and the connection's receive window is topped up before it can run out. GOAWAY,
RST_STREAM, a non-200 status, a grpc-status other than 0 and anything malformed raise
``CallFailed``; the connection is then unusable and is closed by the caller.
"""

from __future__ import annotations

import asyncio
import struct

from hpack import Decoder, HPACKError

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = (
    range(10)
)
END_STREAM, ACK, END_HEADERS, PADDED, PRIORITY_FLAG = 0x1, 0x1, 0x4, 0x8, 0x20
ENABLE_PUSH = 0x2
MAX_FRAME = 1 << 14  # SETTINGS_MAX_FRAME_SIZE's default: what we announce we accept
MAX_MESSAGE = 1 << 16  # a VersionResponse is a few dozen bytes
WINDOW_TOP_UP = 1 << 30  # the connection window is raised by this much whenever half is used
USER_AGENT = "nodemedic"


class CallFailed(Exception):
    """The call got no usable answer; the text says what happened (gRPC's words where it has them)."""


def _frame(kind: int, flags: int, stream: int, payload: bytes = b"") -> bytes:
    return struct.pack(">I", len(payload))[1:] + bytes([kind, flags]) + struct.pack(">I", stream) + payload


def _literal(name_index: int, value: str) -> bytes:
    """HPACK literal without indexing, name from the static table (index < 15), raw value."""
    raw = value.encode("ascii")
    if name_index >= 15 or len(raw) >= 127:
        raise ValueError("only short names and values are pre-encoded here")
    return bytes([name_index, len(raw)]) + raw


def request_headers(path: str, authority: str = "localhost") -> bytes:
    """The header block of a gRPC POST of ``path`` (static-table names; never the dynamic table)."""
    block = b"\x83\x86"  # :method POST, :scheme http (static table 3, 6)
    block += _literal(4, path) + _literal(1, authority)  # :path, :authority
    block += b"\x0f\x10" + bytes([16]) + b"application/grpc"  # content-type (static 31)
    block += b"\x00\x02te\x08trailers"  # te: trailers (a new name)
    block += b"\x0f\x2b" + bytes([len(USER_AGENT)]) + USER_AGENT.encode()  # user-agent (static 58)
    return block


class Connection:
    """One HTTP/2 connection; calls on it run one at a time (``busy`` tells)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader, self._writer = reader, writer
        self._decoder = Decoder()
        self._indexed: dict[bytes, list[tuple[str, str]]] = {}  # see _decode
        self._next_stream = 1
        self._received = 0  # DATA bytes since the connection window was last topped up
        self.busy = False

    @classmethod
    async def open(cls, path: str) -> Connection:
        reader, writer = await asyncio.open_unix_connection(path)
        settings = struct.pack(">HI", ENABLE_PUSH, 0)
        writer.write(PREFACE + _frame(SETTINGS, 0, 0, settings) + _window_update(WINDOW_TOP_UP))
        return cls(reader, writer)

    def close(self) -> None:
        self._writer.close()

    async def unary_empty(self, path: str) -> bytes:
        """Call ``path`` with an empty message; the answer's message bytes."""
        self.busy = True
        try:
            stream, self._next_stream = self._next_stream, self._next_stream + 2
            message = b"\x00\x00\x00\x00\x00"  # not compressed, length 0
            self._writer.write(
                _frame(HEADERS, END_HEADERS, stream, request_headers(path))
                + _frame(DATA, END_STREAM, stream, message)
            )
            return await self._answer(stream)
        finally:
            self.busy = False

    async def _answer(self, stream: int) -> bytes:
        body, headers, block, ending = b"", [], b"", False
        while True:
            kind, flags, sid, payload = await self._read_frame()
            if kind in (HEADERS, CONTINUATION):
                if kind == HEADERS:
                    ending = bool(flags & END_STREAM)
                block += _header_fragment(kind, flags, payload)
                if not flags & END_HEADERS:
                    continue
                decoded, block = self._decode(block), b""  # every block: keeps the table in step
                if sid == stream:
                    headers += decoded
                if sid == stream and ending:
                    return _message(headers, body)
            elif kind == DATA:
                body += self._data(sid, stream, flags, payload, len(body))
                if sid == stream and flags & END_STREAM:
                    return _message(headers, body)
            else:
                self._control(kind, flags, sid, payload, stream)

    async def _read_frame(self) -> tuple[int, int, int, bytes]:
        try:
            head = await self._reader.readexactly(9)
            size = int.from_bytes(head[:3], "big")
            if size > MAX_FRAME:
                raise CallFailed(f"INTERNAL: a {size}-byte frame, larger than announced")
            payload = await self._reader.readexactly(size)
        except asyncio.IncompleteReadError as exc:
            raise CallFailed("UNAVAILABLE: the connection was closed") from exc
        stream = int.from_bytes(head[5:9], "big") & 0x7FFFFFFF
        return head[3], head[4], stream, payload

    def _decode(self, block: bytes) -> list[tuple[str, str]]:
        """The block's fields. A block of indexed fields only (every byte's high bit set: one
        field each, index < 127) changes no table, so its fields are remembered until another
        block (which may change the table) is decoded: after the first answers a server sends the
        same few bytes each time (containerd: 2 for the headers, 2 for the trailers)."""
        known = self._indexed.get(block)
        if known is not None:
            return known
        indexed_only = bool(block) and all(byte & 0x80 for byte in block)
        if not indexed_only:
            self._indexed.clear()
        try:
            fields = [(str(k), str(v)) for k, v in self._decoder.decode(block)]
        except HPACKError as exc:
            raise CallFailed(f"INTERNAL: a header block HPACK cannot decode: {exc}") from exc
        if indexed_only and len(self._indexed) < 16:
            self._indexed[block] = fields
        return fields

    def _data(self, sid: int, stream: int, flags: int, payload: bytes, have: int) -> bytes:
        self._received += len(payload)
        if self._received >= WINDOW_TOP_UP // 2:
            self._writer.write(_window_update(self._received))
            self._received = 0
        data = _unpad(flags, payload)
        if sid != stream:
            return b""
        if have + len(data) > MAX_MESSAGE:
            raise CallFailed("RESOURCE_EXHAUSTED: the answer is larger than a VersionResponse can be")
        return data

    def _control(self, kind: int, flags: int, sid: int, payload: bytes, stream: int) -> None:
        if kind == SETTINGS and not flags & ACK:
            self._writer.write(_frame(SETTINGS, ACK, 0))
        elif kind == PING and not flags & ACK:
            self._writer.write(_frame(PING, ACK, 0, payload))
        elif kind == GOAWAY:
            code = int.from_bytes(payload[4:8], "big") if len(payload) >= 8 else -1
            raise CallFailed(f"UNAVAILABLE: the server sent GOAWAY (code {code})")
        elif kind == RST_STREAM and sid == stream:
            code = int.from_bytes(payload[:4], "big") if len(payload) >= 4 else -1
            raise CallFailed(f"UNAVAILABLE: the server reset the stream (code {code})")
        elif kind == PUSH_PROMISE:
            raise CallFailed("INTERNAL: a PUSH_PROMISE, though push was disabled")


def _window_update(increment: int) -> bytes:
    return _frame(WINDOW_UPDATE, 0, 0, struct.pack(">I", increment))


def _unpad(flags: int, payload: bytes) -> bytes:
    if not flags & PADDED:
        return payload
    if not payload or payload[0] >= len(payload):
        raise CallFailed("INTERNAL: a frame's padding is longer than the frame")
    return payload[1 : len(payload) - payload[0]]


def _header_fragment(kind: int, flags: int, payload: bytes) -> bytes:
    if kind == CONTINUATION:
        return payload
    fragment = _unpad(flags, payload)
    return fragment[5:] if flags & PRIORITY_FLAG else fragment


def _message(headers: list[tuple[str, str]], body: bytes) -> bytes:
    """The single message of a finished unary answer, or CallFailed with gRPC's status."""
    fields = dict(headers)
    if fields.get(":status") != "200":
        raise CallFailed(f"UNAVAILABLE: HTTP status {fields.get(':status', 'missing')}")
    status = fields.get("grpc-status")
    if status != "0":
        raise CallFailed(f"gRPC status {status or 'missing'}: {fields.get('grpc-message', '')}".rstrip(": "))
    if len(body) < 5 or body[0] != 0 or int.from_bytes(body[1:5], "big") != len(body) - 5:
        raise CallFailed("INTERNAL: the answer is not one uncompressed gRPC message")
    return body[5:]
