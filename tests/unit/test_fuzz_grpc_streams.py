"""Property tests for the grpc-streams reading: whatever config.toml holds (any bytes, any TOML
value at ``[grpc] max_concurrent_streams``), streams_setting returns a short string or None and
never raises; a value tomllib reads back is reported as written."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nodemedic.sources.resources import streams_setting

pytestmark = pytest.mark.unit

TOML_VALUES = st.one_of(
    st.integers(-(2**70), 2**70).map(str),
    st.text(max_size=80).map(lambda t: '"' + t.replace("\\", "\\\\").replace('"', '\\"') + '"'),
    st.sampled_from(["true", "false", "1.5", "inf", "nan", "[1, 2]", "{a = 1}", "1979-05-27", "0x10"]),
    st.text(max_size=30),  # anything at all after the '='
)


def setting_of(content: bytes) -> str | None:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "config.toml"
        path.write_bytes(content)
        return streams_setting(path)


@given(st.binary(max_size=2048))
def test_any_bytes_never_raise(content: bytes) -> None:
    value = setting_of(content)
    assert value is None or (isinstance(value, str) and len(value) <= 64)


@given(TOML_VALUES, st.booleans())
def test_any_value_at_the_key(value: str, versioned: bool) -> None:
    head = "version = 2\n" if versioned else ""
    found = setting_of(f'{head}[grpc]\n  address = "/run/containerd/containerd.sock"\n'
                       f"  max_concurrent_streams = {value}\n".encode())  # fmt: skip
    assert found is None or 0 < len(found) <= 64, "set: never read as unset"
    if found is not None and value.lstrip("-").isdigit():
        assert found == str(int(value))[:64]
