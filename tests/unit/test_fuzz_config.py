"""Property tests: the config check over hostile config.toml contents and file kinds. With no
`containerd` on PATH only nodemedic's own checks run (read, TOML parse): whatever is at the path,
config_problem returns a problem (str) or None, never raises, never blocks, never reads without
bound."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from nodemedic import configs
from nodemedic.configs import MAX_CONFIG_BYTES, config_problem
from nodemedic.errors import ConfigFileError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

pytestmark = pytest.mark.unit
WAIT = 10.0  # seconds: far beyond any check, short enough that a hang fails the test
SHIPPED_LIKE = (
    b'version = 2\n[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]\n'
    b'  runtime_type = "io.containerd.runc.v2"\n'
    b'  [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]\n    SystemdCgroup = true\n'
)


@pytest.fixture(autouse=True)
def no_containerd(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(configs.shutil, "which", lambda _name: None)


def check(path: Path) -> str | None:
    """config_problem in a fresh loop, bounded in time: a hang is a failure, not a stuck run."""
    problem = asyncio.run(asyncio.wait_for(config_problem(path), WAIT))
    assert problem is None or isinstance(problem, str)
    return problem


def write(tmp_path: Path, content: bytes) -> Path:
    path = tmp_path / "config.toml"
    path.write_bytes(content)
    return path


@st.composite
def mutations(draw: st.DrawFn) -> bytes:
    """A real-looking config with bytes flipped, cut, repeated or inserted."""
    content = bytearray(SHIPPED_LIKE)
    for _ in range(draw(st.integers(1, 8))):
        at = draw(st.integers(0, len(content)))
        op = draw(st.sampled_from(["flip", "cut", "insert", "repeat"]))
        if op == "flip" and at < len(content):
            content[at] = draw(st.integers(0, 255))
        elif op == "cut":
            del content[at : at + draw(st.integers(1, 40))]
        elif op == "insert":
            content[at:at] = draw(st.binary(max_size=40))
        else:
            content[at:at] = content[at : at + 40] * draw(st.integers(1, 50))
    return bytes(content)


@given(content=st.binary(max_size=4096))
def test_arbitrary_bytes(tmp_path_factory: pytest.TempPathFactory, content: bytes) -> None:
    check(write(tmp_path_factory.mktemp("c"), content))


@given(content=mutations())
def test_mutations_of_a_real_config(tmp_path_factory: pytest.TempPathFactory, content: bytes) -> None:
    problem = check(write(tmp_path_factory.mktemp("c"), content))
    try:
        tomllib.loads(content.decode("utf-8"))
    except (ValueError, RecursionError):
        assert problem is not None
        assert problem.startswith("not valid TOML")
    else:
        assert problem is None, "valid TOML is left to containerd's own check"


@given(depth=st.integers(1, 20_000), opener=st.sampled_from(["[", "{a=", "a=[", "[[a]]\nb={c="]))
@example(depth=5_000, opener="a=[")  # past the recursion limit: RecursionError inside tomllib
@example(depth=5_000, opener="[[a]]\nb={c=")
def test_deep_nesting(tmp_path_factory: pytest.TempPathFactory, depth: int, opener: str) -> None:
    content = ("a = " + "[" * depth if opener == "a=[" else opener * depth).encode()
    problem = check(write(tmp_path_factory.mktemp("c"), content))
    assert problem is not None


@given(digits=st.integers(1, 50_000), sign=st.sampled_from(["", "-", "+"]))
def test_huge_integers(tmp_path_factory: pytest.TempPathFactory, digits: int, sign: str) -> None:
    problem = check(write(tmp_path_factory.mktemp("c"), f"a = {sign}{'9' * digits}\n".encode()))
    limit = getattr(sys, "get_int_max_str_digits", lambda: 0)()  # 4300 by default, 0: none
    if limit and digits > limit:
        assert problem is not None, "past Python's int digit limit: a problem, not a ValueError"
        assert problem.startswith("not valid TOML")
    else:
        assert problem is None


@given(prefix=st.binary(max_size=64), bad=st.sampled_from([b"\xff", b"\xc0\x80", b"\xed\xa0\x80", b"\xf8"]))
def test_invalid_utf8(tmp_path_factory: pytest.TempPathFactory, prefix: bytes, bad: bytes) -> None:
    problem = check(write(tmp_path_factory.mktemp("c"), b'a = "' + prefix + bad + b'"\n'))
    assert problem is not None
    assert problem.startswith("not valid TOML")


@given(
    kind=st.sampled_from(
        ["fifo", "dir", "link-to-file", "link-to-fifo", "link-to-dev-zero", "dangling", "socket"]
    )
)
def test_what_is_not_a_regular_file(tmp_path_factory: pytest.TempPathFactory, kind: str) -> None:
    folder = tmp_path_factory.mktemp("c")
    path = folder / "config.toml"
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "dir":
        path.mkdir()
    elif kind == "socket":
        import socket

        with socket.socket(socket.AF_UNIX) as sock:
            sock.bind(str(path))
    else:
        target = {"link-to-file": folder / "real.toml", "link-to-fifo": folder / "fifo",
                  "link-to-dev-zero": Path("/dev/zero"), "dangling": folder / "absent"}[kind]  # fmt: skip
        if kind == "link-to-file":
            target.write_bytes(SHIPPED_LIKE)
        elif kind == "link-to-fifo":
            os.mkfifo(target)
        path.symlink_to(target)
    # no verdict: nothing is restored over a file nodemedic does not read (it may well load)
    with pytest.raises(ConfigFileError, match="not a regular file"):
        check(path)


def test_an_oversized_file_is_a_problem_and_read_only_to_the_cap(tmp_path: Path) -> None:
    path = write(tmp_path, b"a = 1\n" + b"#" * MAX_CONFIG_BYTES)
    with pytest.raises(ConfigFileError, match="larger than"):
        check(path)
