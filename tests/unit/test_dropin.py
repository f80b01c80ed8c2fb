"""containerd's SIGHUP drop-in: rendering (quoting, unwrap, ignore-failure), install and removal
of our file only, and reading SigIgn."""

from __future__ import annotations

from pathlib import Path

import pytest

from nodemedic.actions.sighup_dropin import (
    DROPIN_NAME,
    MARKER,
    dropin_path,
    env_ignores_signals,
    ignores_sighup,
    install_dropin,
    install_for,
    quote,
    remove_dropins,
    render_dropin,
    unwrap,
)
from nodemedic.errors import DropinError

pytestmark = pytest.mark.unit
UNIT = "containerd.service"


def exec_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("ExecStart=")]


def test_paths_in_run_or_etc() -> None:
    assert dropin_path(UNIT, False) == Path("/run/systemd/system/containerd.service.d") / DROPIN_NAME
    assert (
        dropin_path(UNIT, True, Path("/x"))
        == Path("/x/etc/systemd/system/containerd.service.d") / DROPIN_NAME
    )


@pytest.mark.parametrize("unit", ["../evil.service", "containerd", "a/b.service", ""])
def test_a_unit_name_that_is_not_a_service_is_refused(unit: str) -> None:
    with pytest.raises(DropinError, match="not a service unit name"):
        dropin_path(unit, False)


def test_render_resets_then_wraps_and_says_how_to_undo() -> None:
    text = render_dropin([["/usr/bin/containerd"]])

    assert exec_lines(text) == [
        "ExecStart=",
        "ExecStart=/usr/bin/env --ignore-signal=HUP /usr/bin/containerd",
    ]
    lines = text.splitlines()
    assert lines.index("[Service]") < lines.index("ExecStart=")
    assert MARKER in lines
    header = "\n".join(lines[: lines.index("[Service]")])
    assert "nodemedic" in header
    assert 'mode = "coalesce"' in header
    assert "nodemedic sighup-restore" in header


def test_render_quotes_for_systemd() -> None:
    text = render_dropin(
        [["/usr/bin/containerd", "--config", "/etc/my dir/c.toml", "100%", "$HOME", 'a"b\\c', ""]]
    )

    assert exec_lines(text)[1] == (
        'ExecStart=/usr/bin/env --ignore-signal=HUP /usr/bin/containerd --config "/etc/my dir/c.toml" '
        '100%% "$$HOME" "a\\"b\\\\c" ""'
    )


def test_quote_plain_words_stay_plain() -> None:
    assert quote("--log-level=debug") == "--log-level=debug"
    assert quote("tab\there") == '"tab\\there"'


def test_ignore_failure_prefix_is_kept() -> None:
    assert exec_lines(render_dropin([["-/usr/bin/containerd", "-v"]]))[1] == (
        "ExecStart=-/usr/bin/env --ignore-signal=HUP /usr/bin/containerd -v"
    )


def test_already_wrapped_is_never_wrapped_twice() -> None:
    stock = render_dropin([["/usr/bin/containerd"]])
    assert render_dropin([["/usr/bin/env", "--ignore-signal=HUP", "/usr/bin/containerd"]]) == stock
    twice = ["/bin/env", "--ignore-signal=HUP", "/usr/bin/env", "--ignore-signal=HUP", "/usr/bin/containerd"]
    assert unwrap(twice) == ["/usr/bin/containerd"]
    assert unwrap(["/usr/bin/env", "FOO=1", "/usr/bin/containerd"])[0] == "/usr/bin/env"  # not ours


def test_several_lines_are_each_wrapped() -> None:
    lines = exec_lines(render_dropin([["/bin/a"], ["-/bin/b", "x"]]))
    assert lines == [
        "ExecStart=",
        "ExecStart=/usr/bin/env --ignore-signal=HUP /bin/a",
        "ExecStart=-/usr/bin/env --ignore-signal=HUP /bin/b x",
    ]


@pytest.mark.parametrize("lines", [[], [[]]])
def test_nothing_to_wrap_is_an_error(lines: list[list[str]]) -> None:
    with pytest.raises(DropinError, match="no ExecStart"):
        render_dropin(lines)


def test_install_is_idempotent_and_atomic(tmp_path: Path) -> None:
    path = dropin_path(UNIT, False, tmp_path)
    text = render_dropin([["/usr/bin/containerd"]])

    assert install_dropin(path, text) is True
    assert install_dropin(path, text) is False
    assert path.read_text() == text
    assert path.stat().st_mode & 0o777 == 0o644
    assert [p.name for p in path.parent.iterdir()] == [DROPIN_NAME]  # no temporary file left
    changed = render_dropin([["/usr/bin/containerd", "-v"]])
    assert install_dropin(path, changed) is True
    assert path.read_text() == changed


def test_install_for_moves_our_copy_between_run_and_etc(tmp_path: Path) -> None:
    """Turning ``persistent`` off really reverts at the next reboot: our /etc copy goes."""
    text = render_dropin([["/usr/bin/containerd"]])
    assert install_for(UNIT, True, text, tmp_path) is True
    assert install_for(UNIT, True, text, tmp_path) is False
    assert install_for(UNIT, False, text, tmp_path) is True
    assert dropin_path(UNIT, False, tmp_path).read_text() == text
    assert not dropin_path(UNIT, True, tmp_path).exists()


def test_install_never_replaces_someone_elses_file(tmp_path: Path) -> None:
    path = dropin_path(UNIT, False, tmp_path)
    path.parent.mkdir(parents=True)
    path.write_text("[Service]\nLimitNOFILE=1024\n")

    with pytest.raises(DropinError, match="not nodemedic's"):
        install_dropin(path, render_dropin([["/usr/bin/containerd"]]))
    assert path.read_text() == "[Service]\nLimitNOFILE=1024\n"
    with pytest.raises(DropinError, match="without nodemedic's marker"):
        install_dropin(dropin_path(UNIT, True, tmp_path), "[Service]\nExecStart=\n")


def test_remove_takes_ours_from_run_and_etc_and_empty_folders(tmp_path: Path) -> None:
    text = render_dropin([["/usr/bin/containerd"]])
    run, etc = dropin_path(UNIT, False, tmp_path), dropin_path(UNIT, True, tmp_path)
    install_dropin(run, text)
    install_dropin(etc, text)
    (etc.parent / "10-limits.conf").write_text("[Service]\nLimitNOFILE=1048576\n")

    assert remove_dropins(UNIT, tmp_path) == [run, etc]
    assert not run.parent.exists()  # empty: removed
    assert [p.name for p in etc.parent.iterdir()] == ["10-limits.conf"]  # someone else's: kept
    assert remove_dropins(UNIT, tmp_path) == []


def test_remove_leaves_a_file_with_our_name_but_not_our_marker(tmp_path: Path) -> None:
    path = dropin_path(UNIT, False, tmp_path)
    path.parent.mkdir(parents=True)
    path.write_text("# nodemedic\n[Service]\nExecStart=\nExecStart=/usr/bin/containerd\n")
    other = path.parent / "60-other.conf"
    other.write_text(render_dropin([["/usr/bin/containerd"]]))  # our marker, another name

    assert remove_dropins(UNIT, tmp_path) == []
    assert path.exists()
    assert other.exists()


def test_remove_never_follows_a_symlink_with_our_name(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere.conf"
    target.write_text(render_dropin([["/usr/bin/containerd"]]))
    path = dropin_path(UNIT, True, tmp_path)
    path.parent.mkdir(parents=True)
    path.symlink_to(target)

    assert remove_dropins(UNIT, tmp_path) == []
    assert path.is_symlink()
    assert target.exists()


def write_status(proc: Path, pid: int, sigign: str) -> None:
    (proc / str(pid)).mkdir(parents=True)
    (proc / str(pid) / "status").write_text(
        f"Name:\tcontainerd\nSigBlk:\t0000000000000000\nSigIgn:\t{sigign}\n"
    )


def test_ignores_sighup_reads_bit_0_of_sigign(tmp_path: Path) -> None:
    write_status(tmp_path, 10, "0000000000000001")
    write_status(tmp_path, 11, "0000000000001000")  # SIGPIPE (13) only: containerd's stock state
    write_status(tmp_path, 12, "fffffffe7ffbfeff")

    assert ignores_sighup(10, tmp_path) is True
    assert ignores_sighup(11, tmp_path) is False
    assert ignores_sighup(12, tmp_path) is True
    assert ignores_sighup(99, tmp_path) is False  # gone


def test_env_with_ignore_signal(tmp_path: Path) -> None:
    assert env_ignores_signals() is True  # coreutils 9.1 here
    old = tmp_path / "env"
    old.write_text("#!/bin/sh\necho \"env: unrecognized option '$1'\" >&2\nexit 125\n")
    old.chmod(0o755)
    assert env_ignores_signals(str(old)) is False
    assert env_ignores_signals(str(tmp_path / "missing")) is False
