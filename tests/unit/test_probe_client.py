"""The probe's client reads containerd's VersionResponse from the protobuf wire format itself."""

from __future__ import annotations

import pytest

from nodemedic.sources.probe import Empty, VersionCodec, VersionResponse

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


def test_codec_sends_empty_and_refuses_anything_else() -> None:
    codec = VersionCodec()
    assert codec.encode(Empty(), Empty) == b""
    with pytest.raises(TypeError, match="only Empty"):
        codec.encode(VersionResponse(), Empty)
    assert codec.decode(_string(1, "v"), VersionResponse).version == "v"
