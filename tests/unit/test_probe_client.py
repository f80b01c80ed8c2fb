"""The probe's own client: containerd's VersionResponse read from the protobuf wire format, and the
HTTP/2 exchange of sources/grpcwire.py fed frames as a server sends them."""

from __future__ import annotations

import asyncio

import pytest
from hpack import Decoder, Encoder

from nodemedic.sources import grpcwire as gw
from nodemedic.sources.probe import VERSION_METHOD, VersionResponse

pytestmark = pytest.mark.unit


def _string(number: int, text: str) -> bytes:
    raw = text.encode()
    return bytes([number << 3 | 2, len(raw)]) + raw


def test_version_and_revision_are_read() -> None:
    wire = _string(1, "1.6.20~ds1") + _string(2, "1.6.20~ds1-1+b1")
    answer = VersionResponse.from_wire(wire)
    assert (answer.version, answer.revision) == ("1.6.20~ds1", "1.6.20~ds1-1+b1")


def test_empty_answer_and_unknown_fields() -> None:
    assert VersionResponse.from_wire(b"").version == ""
    # field 3 varint 300, field 4 fixed64, field 5 fixed32, then the version
    unknown = bytes([3 << 3, 0xAC, 0x02]) + bytes([4 << 3 | 1]) + b"\0" * 8 + bytes([5 << 3 | 5]) + b"\0" * 4
    assert VersionResponse.from_wire(unknown + _string(1, "v2")).version == "v2"


def test_a_long_string_uses_a_multi_byte_length() -> None:
    text = "x" * 300
    wire = bytes([1 << 3 | 2, 0xAC, 0x02]) + text.encode()
    assert VersionResponse.from_wire(wire).version == text


@pytest.mark.parametrize(
    "wire",
    [
        bytes([1 << 3 | 2, 10]) + b"short",  # length past the end
        bytes([1 << 3 | 3]),  # group start: not in this message
        bytes([1 << 3 | 2, 0x80]),  # varint cut off
        bytes([4 << 3 | 1]) + b"\0" * 3,  # fixed64 cut off
        bytes([0x80] * 11),  # varint past 64 bits
    ],
)
def test_bytes_that_are_no_message_raise_value_error(wire: bytes) -> None:
    with pytest.raises(ValueError, match=r"."):
        VersionResponse.from_wire(wire)


class Writer:
    """The edge: what the connection writes to its socket (``waiting``: what the peer left unread)."""

    def __init__(self, reads: bool = True) -> None:
        self.sent = b""
        self.waiting = 0
        self.reads = reads
        self.transport = self

    def write(self, data: bytes) -> None:
        self.sent += data
        self.waiting += 0 if self.reads else len(data)

    def get_write_buffer_size(self) -> int:
        return self.waiting

    def is_closing(self) -> bool:
        return False

    def abort(self) -> None:
        pass


def _frames(data: bytes) -> list[tuple[int, int, int, bytes]]:
    out = []
    while data:
        size = int.from_bytes(data[:3], "big")
        out.append((data[3], data[4], int.from_bytes(data[5:9], "big"), data[9 : 9 + size]))
        data = data[9 + size :]
    return out


def _call(
    *server_frames: bytes, reads: bool = True
) -> tuple[bytes | Exception, list[tuple[int, int, int, bytes]]]:
    async def run() -> tuple[bytes | Exception, bytes]:
        reader, writer = asyncio.StreamReader(), Writer(reads)
        reader.feed_data(b"".join(server_frames))
        reader.feed_eof()
        conn = gw.Connection(reader, writer)  # type: ignore[arg-type]
        try:
            return await conn.unary_empty(VERSION_METHOD), writer.sent
        except gw.CallFailed as exc:
            return exc, writer.sent

    result, sent = asyncio.run(run())
    return result, _frames(sent)


def _headers(
    encoder: Encoder, stream: int, fields: list[tuple[str, str]], flags: int = gw.END_HEADERS
) -> bytes:
    return gw._frame(gw.HEADERS, flags, stream, encoder.encode(fields))


OK = [(":status", "200"), ("content-type", "application/grpc")]
MESSAGE = b"\x00\x00\x00\x00\x04" + _string(1, "v1")


def _answer(encoder: Encoder, stream: int = 1) -> bytes:
    return (
        _headers(encoder, stream, OK)
        + gw._frame(gw.DATA, 0, stream, MESSAGE)
        + _headers(encoder, stream, [("grpc-status", "0")], gw.END_HEADERS | gw.END_STREAM)
    )


def test_the_request_is_headers_and_an_empty_message_in_one_write() -> None:
    result, sent = _call(_answer(Encoder()))
    assert result == _string(1, "v1")
    kinds = [(k, f, s) for k, f, s, _ in sent]
    assert kinds == [(gw.HEADERS, gw.END_HEADERS, 1), (gw.DATA, gw.END_STREAM, 1)]
    assert sent[1][3] == b"\x00" * 5
    fields = dict(Decoder().decode(sent[0][3]))
    assert fields == {":method": "POST", ":scheme": "http", ":path": VERSION_METHOD,
                      ":authority": "localhost", "content-type": "application/grpc", "te": "trailers",
                      "user-agent": "nodemedic"}  # fmt: skip


def test_settings_and_ping_are_acknowledged_window_updates_ignored() -> None:
    settings = gw._frame(gw.SETTINGS, 0, 0, b"\x00\x03\x00\x00\x00\x64")
    ping = gw._frame(gw.PING, 0, 0, b"12345678")
    window = gw._frame(8, 0, 0, b"\x00\x00\x10\x00")
    result, sent = _call(settings + window + ping + _answer(Encoder()))
    assert result == _string(1, "v1")
    assert (gw.SETTINGS, gw.ACK, 0, b"") in sent
    assert (gw.PING, gw.ACK, 0, b"12345678") in sent


def test_the_header_table_stays_in_step_across_calls_and_continuations() -> None:
    encoder = Encoder()
    first = _answer(encoder)  # indexes content-type and grpc-status in the dynamic table
    block = encoder.encode([("grpc-status", "0")])
    split = (
        _headers(encoder, 3, OK)
        + gw._frame(gw.DATA, 0, 3, MESSAGE)
        + gw._frame(gw.HEADERS, gw.END_STREAM, 3, block[:1])
        + gw._frame(gw.CONTINUATION, gw.END_HEADERS, 3, block[1:])
    )

    async def run() -> list[bytes]:
        reader = asyncio.StreamReader()
        reader.feed_data(first + split)
        conn = gw.Connection(reader, Writer())  # type: ignore[arg-type]
        return [await conn.unary_empty(VERSION_METHOD), await conn.unary_empty(VERSION_METHOD)]

    assert asyncio.run(run()) == [_string(1, "v1")] * 2


@pytest.mark.parametrize(
    ("frames", "said"),
    [
        (lambda e: _headers(e, 1, [*OK, ("grpc-status", "12"), ("grpc-message", "unknown service")],
                            gw.END_HEADERS | gw.END_STREAM), "gRPC status 12: unknown service"),
        (lambda e: _headers(e, 1, [(":status", "503")], gw.END_HEADERS | gw.END_STREAM), "HTTP status 503"),
        (lambda e: gw._frame(gw.GOAWAY, 0, 0, b"\x00" * 4 + b"\x00\x00\x00\x02"), "GOAWAY (code 2)"),
        (lambda e: gw._frame(gw.RST_STREAM, 0, 1, b"\x00\x00\x00\x08"), "reset the stream (code 8)"),
        (lambda e: _headers(e, 1, OK) + gw._frame(gw.DATA, gw.END_STREAM, 1, MESSAGE), "gRPC status missing"),
        (lambda e: _headers(e, 1, OK), "the connection was closed"),
        (lambda e: b"\x00\x01\x00\x00", "the connection was closed"),
        (lambda e: b"\xff\xff\xff" + b"\x00" * 6, "larger than announced"),
        (lambda e: gw._frame(gw.HEADERS, gw.END_HEADERS, 1, b"\xff\xff\xff\xff"), "HPACK"),
        (lambda e: _headers(e, 1, OK) + gw._frame(gw.DATA, 0, 1, b"\x01\x00\x00\x00\x00")
         + _headers(e, 1, [("grpc-status", "0")], gw.END_HEADERS | gw.END_STREAM), "not one uncompressed"),
        (lambda e: gw._frame(gw.DATA, gw.PADDED, 1, b"\x09abc"), "padding"),
    ],
)  # fmt: skip
def test_what_is_no_answer_fails_the_call(frames: object, said: str) -> None:
    result, _ = _call(frames(Encoder()))  # type: ignore[operator]
    assert isinstance(result, gw.CallFailed)
    assert said in str(result)


async def test_remembered_indexed_blocks_follow_the_table_as_it_changes() -> None:
    encoder = Encoder()
    blocks = [encoder.encode(OK), encoder.encode(OK)]  # the second: indexed fields only
    blocks.append(encoder.encode([("x-new", "1")]))  # a new entry: every dynamic index moves
    blocks += [blocks[1], encoder.encode(OK), blocks[1]]  # old bytes, now other fields
    conn = gw.Connection(asyncio.StreamReader(), Writer())  # type: ignore[arg-type]
    reference = Decoder()
    for block in blocks:
        assert conn._decode(block) == reference.decode(block)
    assert all(byte & 0x80 for byte in blocks[1])


def _frames_of(kind: int, flags: int, stream: int, payload: bytes, count: int) -> bytes:
    return gw._frame(kind, flags, stream, payload) * count


@pytest.mark.parametrize(
    ("frames", "said"),
    [
        # floods that held the loop or the memory (the reviewer's flood.py and lag.py)
        (lambda e: _frames_of(gw.PING, 0, 0, b"12345678", 65) + _answer(e), "no answer in 64 frames"),
        (lambda e: _frames_of(gw.SETTINGS, 0, 0, b"", 65) + _answer(e), "no answer in 64 frames"),
        (lambda e: _frames_of(gw.HEADERS, gw.END_HEADERS, 1, b"\x01\x00", 3), "more than 2 header"),
        (lambda e: _frames_of(gw.HEADERS, gw.END_HEADERS, 1, b"\x01\x00" * 1500, 1), "larger than 8192"),
        (lambda e: gw._frame(gw.HEADERS, 0, 1, e.encode(OK))
         + _frames_of(gw.CONTINUATION, 0, 1, b"\x00" * 8192, 2), "header block larger than 16384"),
        (lambda e: gw._frame(gw.HEADERS, gw.END_HEADERS | gw.END_STREAM, 1, e.encode([("x", "y" * 9000)])),
         "larger than 8192"),
        (lambda e: gw._frame(gw.DATA, 0, 3, b"") + _answer(e), "type 0 on stream 3"),
        (lambda e: _headers(e, 3, OK) + _answer(e), "type 1 on stream 3"),
        (lambda e: gw._frame(gw.PING, 0, 0, b"p" * 16384), "malformed PING"),
        # the frame rules of RFC 9113 (review nits)
        (lambda e: gw._frame(gw.HEADERS, 0, 1, e.encode(OK)) + gw._frame(gw.PING, 0, 0, b"12345678"),
         "not followed by its CONTINUATION"),
        (lambda e: gw._frame(gw.CONTINUATION, gw.END_HEADERS, 1, e.encode(OK)), "follows no header block"),
        (lambda e: gw._frame(gw.PRIORITY, 0, 1, b"\x00\x00"), "malformed PRIORITY"),
        (lambda e: gw._frame(gw.SETTINGS, 0, 0, b"\x00\x03\x00"), "malformed SETTINGS"),
        (lambda e: gw._frame(gw.SETTINGS, gw.ACK, 0, b"\x00\x03\x00\x00\x00\x64"), "malformed SETTINGS"),
        (lambda e: gw._frame(gw.PING, 0, 1, b"12345678"), "malformed PING"),
        (lambda e: gw._frame(gw.PING, 0, 0, b"1234"), "malformed PING"),
    ],
)  # fmt: skip
def test_a_hostile_server_is_bounded(frames: object, said: str) -> None:
    result, _ = _call(frames(Encoder()))  # type: ignore[operator]
    assert isinstance(result, gw.CallFailed)
    assert said in str(result)


def test_a_server_that_does_not_read_fails_the_call() -> None:
    """What waits unwritten (acks the server never read: 155 -> 844 MB in the review) is bounded."""
    result, _ = _call(gw._frame(gw.PING, 0, 0, b"12345678") * 40 + _answer(Encoder()), reads=False)
    assert result == _string(1, "v1")  # 40 acks: 680 bytes waiting, under the bound

    async def run() -> Exception:
        writer = Writer(reads=False)
        writer.waiting = gw.MAX_WRITE_BUFFER - 100  # earlier calls' acks, never read
        conn = gw.Connection(asyncio.StreamReader(), writer)  # type: ignore[arg-type]
        with pytest.raises(gw.CallFailed) as caught:
            await conn.unary_empty(VERSION_METHOD)
        return caught.value

    assert "does not read" in str(asyncio.run(run()))


async def test_buffered_frames_do_not_hold_the_loop() -> None:
    """A flood already in the buffer is read without waiting: the call yields to the loop anyway."""
    reader = asyncio.StreamReader()
    reader.feed_data(gw._frame(gw.PING, 0, 0, b"12345678") * 8 + _answer(Encoder()))
    conn = gw.Connection(reader, Writer())  # type: ignore[arg-type]
    ran = asyncio.Event()
    other = asyncio.get_running_loop().call_soon(ran.set)
    assert await conn.unary_empty(VERSION_METHOD) == _string(1, "v1")
    other.cancel()
    assert ran.is_set()


async def test_a_connection_out_of_stream_ids_is_not_used() -> None:
    conn = gw.Connection(asyncio.StreamReader(), Writer())  # type: ignore[arg-type]
    assert conn.usable
    conn._next_stream = gw.LAST_STREAM + 2
    assert not conn.usable  # the probe dials anew
    with pytest.raises(gw.CallFailed, match="no stream ids left"):
        await conn.unary_empty(VERSION_METHOD)
