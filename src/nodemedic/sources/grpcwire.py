"""The least of gRPC that the probe needs: unary calls with an empty request, over one kept HTTP/2
connection to a unix socket (RFC 9113 framing, RFC 7541 HPACK through the ``hpack`` package).

Why not a gRPC library: grpcio's channel per request cost about 2.8 ms of CPU (and grpcio 10 MB of
RSS); grpclib over h2 about 1.5 ms per request, most of it in h2's general state machine. This
client writes one pre-encoded request (HEADERS + DATA in one write) and reads frames until its
stream ends; docs/design.md ("probe client") has the measured figures.

What a server may send and how it is taken: SETTINGS and PING are acknowledged, WINDOW_UPDATE,
PRIORITY and unknown frames are ignored, every header block is decoded (the HPACK table must stay
in step) and the connection's receive window is topped up before it can run out. GOAWAY,
RST_STREAM, a non-200 status, a grpc-status other than 0 and anything malformed raise
``CallFailed``; the connection is then unusable and is aborted by the caller.

A hostile or broken server is bounded: a call reads at most ``MAX_FRAMES`` frames (containerd's
answer is about 8) and yields to the loop every ``YIELD_EVERY`` of them, so a flood cannot hold
the loop past the caller's timeout; at most two header blocks on our stream, each at most
``MAX_BLOCK`` bytes (CONTINUATIONs included) and ``MAX_HEADER_LIST`` decoded; HEADERS, DATA or
CONTINUATION on any other stream fail the call; a server that does not read (our
acknowledgements pile up past ``MAX_WRITE_BUFFER``) fails it too.
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
ENABLE_PUSH, MAX_HEADER_LIST_SIZE = 0x2, 0x6
MAX_FRAME = 1 << 14  # SETTINGS_MAX_FRAME_SIZE's default: what we announce we accept
MAX_MESSAGE = 1 << 16  # a VersionResponse is a few dozen bytes
WINDOW_TOP_UP = 1 << 30  # the connection window is raised by this much whenever half is used
USER_AGENT = "nodemedic"
MAX_FRAMES = 64  # frames read in one call
YIELD_EVERY = 4  # frames read between two yields to the loop (an answer is 3 once warm)
MAX_BLOCKS = 2  # header blocks on our stream: the headers and the trailers
MAX_BLOCK = 1 << 14  # bytes of one header block, CONTINUATIONs included
MAX_HEADER_LIST = 8192  # decoded size (RFC 9113 6.5.2), announced and enforced
MAX_WRITE_BUFFER = 1 << 16  # bytes waiting to be written: beyond, the server does not read
LAST_STREAM = 0x7FFFFFFF


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
        self._decoder.max_header_list_size = MAX_HEADER_LIST
        self._indexed: dict[bytes, list[tuple[str, str]]] = {}  # see _decode
        self._next_stream = 1
        self._received = 0  # DATA bytes since the connection window was last topped up
        self.busy = False
        self.heard = False  # a frame of the current call's stream arrived

    @property
    def usable(self) -> bool:
        """Free, still open on both sides and with stream ids left."""
        closed = self._reader.at_eof() or self._writer.is_closing()
        return not (self.busy or closed or self._next_stream > LAST_STREAM)

    @classmethod
    async def open(cls, path: str) -> Connection:
        reader, writer = await asyncio.open_unix_connection(path)
        settings = struct.pack(">HIHI", ENABLE_PUSH, 0, MAX_HEADER_LIST_SIZE, MAX_HEADER_LIST)
        writer.write(PREFACE + _frame(SETTINGS, 0, 0, settings) + _window_update(WINDOW_TOP_UP))
        return cls(reader, writer)

    def close(self) -> None:
        """Abort: drop what waits to be written (a server that does not read gets no more)."""
        self._writer.transport.abort()

    def _send(self, data: bytes) -> None:
        self._writer.write(data)
        if self._writer.transport.get_write_buffer_size() > MAX_WRITE_BUFFER:
            raise CallFailed("UNAVAILABLE: the server does not read what is written to it")

    async def unary_empty(self, path: str) -> bytes:
        """Call ``path`` with an empty message; the answer's message bytes."""
        self.busy, self.heard = True, False
        try:
            stream, self._next_stream = self._next_stream, self._next_stream + 2
            if stream > LAST_STREAM:
                raise CallFailed("UNAVAILABLE: the connection has no stream ids left")
            message = b"\x00\x00\x00\x00\x00"  # not compressed, length 0
            self._send(
                _frame(HEADERS, END_HEADERS, stream, request_headers(path))
                + _frame(DATA, END_STREAM, stream, message)
            )
            return await self._answer(stream)
        finally:
            self.busy = False

    async def _answer(self, stream: int) -> bytes:
        headers: list[tuple[str, str]] = []
        body, block, ending, blocks = b"", b"", False, 0
        for count in range(MAX_FRAMES):
            kind, flags, sid, payload = await self._read_frame()
            if count % YIELD_EVERY == YIELD_EVERY - 1:  # buffered frames must not hold the loop
                await asyncio.sleep(0)
            _check_sequence(kind, sid, stream, bool(block))
            if kind in (HEADERS, DATA, CONTINUATION):
                self.heard = True
            if kind in (HEADERS, CONTINUATION):
                if kind == HEADERS:
                    ending, blocks = bool(flags & END_STREAM), blocks + 1
                block += _header_fragment(kind, flags, payload)
                _check_block(block, blocks)
                if not flags & END_HEADERS:
                    continue
                headers, block = headers + self._decode(block), b""
                if ending:
                    return _message(headers, body)
            elif kind == DATA:
                body += self._data(flags, payload, len(body))
                if flags & END_STREAM:
                    return _message(headers, body)
            else:
                self._control(kind, flags, sid, payload, stream)
        raise CallFailed(f"RESOURCE_EXHAUSTED: no answer in {MAX_FRAMES} frames")

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

    def _data(self, flags: int, payload: bytes, have: int) -> bytes:
        self._received += len(payload)
        if self._received >= WINDOW_TOP_UP // 2:
            self._send(_window_update(self._received))
            self._received = 0
        data = _unpad(flags, payload)
        if have + len(data) > MAX_MESSAGE:
            raise CallFailed("RESOURCE_EXHAUSTED: the answer is larger than a VersionResponse can be")
        return data

    def _control(self, kind: int, flags: int, sid: int, payload: bytes, stream: int) -> None:
        _check_control(kind, flags, sid, payload)
        if kind == SETTINGS and not flags & ACK:
            self._send(_frame(SETTINGS, ACK, 0))
        elif kind == PING and not flags & ACK:
            self._send(_frame(PING, ACK, 0, payload))
        elif kind == GOAWAY:
            code = int.from_bytes(payload[4:8], "big") if len(payload) >= 8 else -1
            raise CallFailed(f"UNAVAILABLE: the server sent GOAWAY (code {code})")
        elif kind == RST_STREAM and sid == stream:
            code = int.from_bytes(payload[:4], "big") if len(payload) >= 4 else -1
            raise CallFailed(f"UNAVAILABLE: the server reset the stream (code {code})")
        elif kind == PUSH_PROMISE:
            raise CallFailed("INTERNAL: a PUSH_PROMISE, though push was disabled")


def _check_sequence(kind: int, sid: int, stream: int, in_block: bool) -> None:
    """A header block in progress takes only its CONTINUATIONs; our stream's frames only ours."""
    if in_block and (kind != CONTINUATION or sid != stream):
        raise CallFailed("INTERNAL: a header block not followed by its CONTINUATION")
    if kind == CONTINUATION and not in_block:
        raise CallFailed("INTERNAL: a CONTINUATION that follows no header block")
    if kind in (HEADERS, DATA, CONTINUATION) and sid != stream:
        raise CallFailed(f"INTERNAL: a frame of type {kind} on stream {sid}, not ours ({stream})")


def _check_block(block: bytes, blocks: int) -> None:
    if blocks > MAX_BLOCKS:
        raise CallFailed(f"INTERNAL: more than {MAX_BLOCKS} header blocks on the stream")
    if len(block) > MAX_BLOCK:
        raise CallFailed(f"RESOURCE_EXHAUSTED: a header block larger than {MAX_BLOCK} bytes")


def _check_control(kind: int, flags: int, sid: int, payload: bytes) -> None:
    """The frame-size and stream rules of RFC 9113 for the control frames that we act on."""
    if kind == SETTINGS and (sid or len(payload) % 6 or (flags & ACK and payload)):
        raise CallFailed("INTERNAL: a malformed SETTINGS frame")
    if kind == PING and (sid or len(payload) != 8):
        raise CallFailed("INTERNAL: a malformed PING frame")
    if kind == PRIORITY and len(payload) != 5:
        raise CallFailed("INTERNAL: a malformed PRIORITY frame")


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
