"""The command line, end to end through ``main``: check, and mode with systemctl faked."""

from __future__ import annotations

import difflib
import os
import stat
from pathlib import Path
from typing import ClassVar

import pytest

from nodemedic import cli
from nodemedic.policy.load import load_policy

pytestmark = pytest.mark.unit
SHIPPED = Path(__file__).parents[2] / "policy" / "policy.toml"
RULE = "socket-path-is-directory"


@pytest.fixture
def policy(tmp_path: Path) -> Path:
    path = tmp_path / "policy.toml"
    path.write_text(SHIPPED.read_text())
    path.chmod(0o644)
    return path


class FakeSystemctl:
    def __init__(self, active: bool = True, reload_status: int = 0) -> None:
        self.active = active
        self.reload_status = reload_status
        self.calls: list[tuple[str, ...]] = []

    def __call__(self, *args: str) -> tuple[int, str]:
        self.calls.append(args)
        if args[0] == "is-active":
            return (0, "") if self.active else (3, "")
        return self.reload_status, "Job for nodemedic.service failed." if self.reload_status else ""


@pytest.fixture
def systemctl(monkeypatch: pytest.MonkeyPatch) -> FakeSystemctl:
    fake = FakeSystemctl()
    monkeypatch.setattr(cli, "systemctl", fake)
    return fake


def changed_lines(before: str, after: str) -> tuple[list[str], list[str]]:
    diff = list(difflib.ndiff(before.splitlines(), after.splitlines()))
    return [d[2:] for d in diff if d.startswith("- ")], [d[2:] for d in diff if d.startswith("+ ")]


def test_check_valid(policy: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["check", str(policy)]) == 0
    rules = len(load_policy(policy).rule)
    assert f"{policy}: valid, {rules} rule(s)" in capsys.readouterr().out


def test_check_lists_every_problem_with_its_line(policy: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text = (
        policy.read_text()
        .replace('do = "remove-socket-dir"', 'do = "remove-dir"')
        .replace('kind = "directory"', 'kind = "folder"', 1)
        .replace("[rule.backoff]", "[rule.backoff]\ncolour = 1", 1)
    )
    policy.write_text(text)
    assert cli.main(["check", str(policy)]) == 1
    err = capsys.readouterr().err.splitlines()
    lines = [n for n, ln in enumerate(text.splitlines(), 1) if ln in ('kind = "folder"', 'do = "remove-dir"')]
    lines.append(text.splitlines().index("colour = 1") + 1)
    assert err[0] == f"invalid policy {policy}: 3 problem(s)"
    assert [e.split(": ")[0] for e in err[1:]] == [f"{policy}:{n}" for n in lines]
    assert "action[1].do: unknown action 'remove-dir'" in err[2]


def test_check_refuses_a_file_others_can_write_unless_told(
    policy: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    policy.chmod(0o666)
    assert cli.main(["check", str(policy)]) == 1
    assert f"run `chmod go-w {policy}`" in capsys.readouterr().err
    assert cli.main(["check", "--ignore-owner", str(policy)]) == 0


def test_mode_daemon_edits_one_line_keeps_owner_and_mode(
    policy: Path, systemctl: FakeSystemctl, capsys: pytest.CaptureFixture[str]
) -> None:
    policy.chmod(0o640)
    os.chown(policy, 0, 1000)
    before = policy.read_text()
    assert cli.main(["mode", "observe", "--policy", str(policy), "--no-reload"]) == 0
    after = policy.read_text()
    assert changed_lines(before, after) == (['mode = "enforce"'], ['mode = "observe"'])
    st = policy.stat()
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o640, 0, 1000)
    assert capsys.readouterr().out == "policy.toml: [daemon] mode enforce -> observe\n"
    assert systemctl.calls == []
    assert [p.name for p in policy.parent.iterdir()] == ["policy.toml"]  # no temporary file left


def test_mode_rule_reloads_a_running_nodemedic(
    policy: Path, systemctl: FakeSystemctl, capsys: pytest.CaptureFixture[str]
) -> None:
    before = policy.read_text()
    assert cli.main(["mode", "observe", "--rule", RULE, "--policy", str(policy)]) == 0
    assert changed_lines(before, policy.read_text()) == ([], ['mode = "observe"'])
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"policy.toml: rule '{RULE}' mode enforce (from [daemon]) -> observe"
    assert out[1].startswith("reloaded nodemedic.service")
    assert systemctl.calls == [("is-active", "--quiet", "nodemedic.service"), ("reload", "nodemedic.service")]

    assert cli.main(["mode", "observe", "--rule", RULE, "--policy", str(policy)]) == 0
    assert "mode is already observe; nothing changed" in capsys.readouterr().out
    assert len(systemctl.calls) == 2


def test_mode_when_nodemedic_is_not_running(
    policy: Path, systemctl: FakeSystemctl, capsys: pytest.CaptureFixture[str]
) -> None:
    systemctl.active = False
    assert cli.main(["mode", "observe", "--policy", str(policy)]) == 0
    assert "nodemedic.service is not running; the change applies at its next start" in capsys.readouterr().out
    assert systemctl.calls == [("is-active", "--quiet", "nodemedic.service")]


def test_mode_says_when_the_reload_failed(
    policy: Path, systemctl: FakeSystemctl, caplog: pytest.LogCaptureFixture
) -> None:
    systemctl.reload_status = 1
    assert cli.main(["mode", "observe", "--policy", str(policy)]) == 1
    assert (
        "the policy was written but `systemctl reload nodemedic.service` failed"
        " (exit 1: Job for nodemedic.service failed.)"
    ) in caplog.text
    assert 'mode = "observe"' in policy.read_text()


def test_mode_daemon_notes_rules_with_their_own_mode(
    policy: Path, systemctl: FakeSystemctl, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["mode", "enforce", "--rule", RULE, "--policy", str(policy), "--no-reload"]) == 0
    assert cli.main(["mode", "observe", "--policy", str(policy), "--no-reload"]) == 0
    assert f"rule '{RULE}' keeps its own mode enforce" in capsys.readouterr().out


def test_mode_unknown_rule(policy: Path, systemctl: FakeSystemctl, caplog: pytest.LogCaptureFixture) -> None:
    before = policy.read_text()
    assert cli.main(["mode", "observe", "--rule", "nope", "--policy", str(policy)]) == 1
    assert f"no rule named 'nope'; the policy's rules: '{RULE}'" in caplog.text
    assert policy.read_text() == before
    assert systemctl.calls == []


def test_mode_refuses_to_edit_a_broken_policy(
    policy: Path, systemctl: FakeSystemctl, capsys: pytest.CaptureFixture[str]
) -> None:
    broken = policy.read_text().replace('do = "stop-unit"', 'do = "halt"')
    policy.write_text(broken)
    assert cli.main(["mode", "observe", "--policy", str(policy)]) == 1
    assert "unknown action 'halt'" in capsys.readouterr().err
    assert policy.read_text() == broken


def test_mode_refuses_a_file_others_can_write(
    policy: Path, systemctl: FakeSystemctl, capsys: pytest.CaptureFixture[str]
) -> None:
    policy.chmod(0o666)
    before = policy.read_text()
    assert cli.main(["mode", "observe", "--policy", str(policy)]) == 1
    assert f"run `chmod go-w {policy}`" in capsys.readouterr().err
    assert policy.read_text() == before


def test_mode_through_a_symlink_replaces_the_target(
    policy: Path, systemctl: FakeSystemctl, tmp_path: Path
) -> None:
    link = tmp_path / "link.toml"
    link.symlink_to(policy)
    assert cli.main(["mode", "observe", "--policy", str(link), "--no-reload"]) == 0
    assert link.is_symlink()
    assert 'mode = "observe"' in policy.read_text()


def test_reset_files_a_request_the_daemon_takes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from nodemedic.store import StateStore

    state = tmp_path / "state"
    policy = tmp_path / "policy.toml"
    policy.write_text(
        SHIPPED.read_text().replace('state_dir = "/var/lib/nodemedic"', f'state_dir = "{state}"')
    )
    calls: list[tuple[str, ...]] = []
    monkeypatch.setattr(cli, "systemctl", lambda *a: (calls.append(a), (3, ""))[1])  # not running
    assert cli.main(["reset", "socket-path-is-directory", "--policy", str(policy)]) == 0
    assert StateStore(state).take_resets() == ["socket-path-is-directory"]
    assert calls == [("is-active", "--quiet", "nodemedic.service")]
    assert cli.main(["reset", "no-such-rule", "--policy", str(policy)]) == 1


# ---- hostile policies: check says which line, thaw thaws anyway (issue 11, finding 6) --------------

HOSTILE = {
    "nested-arrays": b"[daemon]\nwatch_units = " + b"[" * 2000 + b"]" * 2000 + b"\n",
    "huge-int": b"[daemon.budget]\nrepairs = " + b"9" * 5000 + b"\n",
    "invalid-utf8": b'[daemon]\nmode = "observe"\n# \xff\xfe\n',
    "binary": bytes(range(256)),
    "nan-interval": b"[daemon.probe]\ninterval = nan\n",
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_check_refuses_a_hostile_policy_with_its_line_and_no_traceback(
    policy: Path, name: str, capsys: pytest.CaptureFixture[str]
) -> None:
    policy.write_bytes(HOSTILE[name])
    assert cli.main(["check", str(policy)]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.splitlines()[0] == f"invalid policy {policy}: 1 problem(s)"
    assert err.splitlines()[1].startswith(f"{policy}:"), err
    assert err.splitlines()[1].split(":")[1].isdigit(), err


def test_check_refuses_a_directory_or_fifo(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "dir").mkdir()
    os.mkfifo(tmp_path / "fifo")
    for path, kind in ((tmp_path / "dir", "a directory"), (tmp_path / "fifo", "not a regular file")):
        assert cli.main(["check", str(path)]) == 1  # a FIFO opened blocking would hang here
        err = capsys.readouterr().err
        assert f"{path}: {kind} (mode " in err
        assert "Traceback" not in err


class FakeFreezer:
    registries: ClassVar[list[Path]] = []

    def __init__(self, registry: Path) -> None:
        self.registry = registry
        self.failed: dict[str, str] = {}
        FakeFreezer.registries.append(registry)

    def thaw_all(self) -> list[str]:
        return ["/system.slice/toolkit.service"]


@pytest.fixture
def freezer(monkeypatch: pytest.MonkeyPatch) -> type[FakeFreezer]:
    FakeFreezer.registries = []
    monkeypatch.setattr(cli, "Freezer", FakeFreezer)
    return FakeFreezer


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_thaw_thaws_whatever_the_policy(
    policy: Path, name: str, freezer: type[FakeFreezer], capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    policy.write_bytes(HOSTILE[name])
    assert cli.main(["thaw", "--policy", str(policy)]) == 0
    assert freezer.registries == [Path("/var/lib/nodemedic/frozen.json")]
    assert capsys.readouterr().out == "thawed /system.slice/toolkit.service\n"
    assert f"cannot use the policy {policy}" in caplog.text
    assert "using the default state directory /var/lib/nodemedic" in caplog.text


def test_thaw_finds_the_state_dir_of_a_policy_with_a_broken_rule(
    policy: Path, freezer: type[FakeFreezer], caplog: pytest.LogCaptureFixture
) -> None:
    text = policy.read_text().replace('state_dir = "/var/lib/nodemedic"', 'state_dir = "/srv/nm"')
    policy.write_text(text.replace('do = "stop-unit"', 'do = "halt"'))
    assert cli.main(["thaw", "--policy", str(policy)]) == 0
    assert freezer.registries == [Path("/srv/nm/frozen.json")]
    assert "using the policy's own state directory /srv/nm" in caplog.text


def test_thaw_survives_a_loader_bug_and_an_unreadable_registry(
    policy: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    state = tmp_path / "state"
    state.mkdir()
    (state / "frozen.json").write_bytes(b"\xff\xfe not json")
    policy.write_text(
        policy.read_text().replace('state_dir = "/var/lib/nodemedic"', f'state_dir = "{state}"')
    )

    def broken(path: Path) -> None:
        raise RuntimeError("a bug in loading")

    monkeypatch.setattr(cli, "load_policy", broken)
    assert cli.main(["thaw", "--policy", str(policy)]) == 1
    err = capsys.readouterr().err
    assert f"could not thaw what {state / 'frozen.json'} lists" in err
    assert "Traceback" not in err


def test_a_closed_pipe_is_no_error(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`nodemedic replay | head`: the reader went away; no 'ERROR ... Broken pipe', exit 0."""
    import argparse

    def write_to_closed_pipe(args: argparse.Namespace) -> int:
        raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(cli, "_check", write_to_closed_pipe)
    assert cli.main(["check", "/nonexistent"]) == 0
    assert "Broken pipe" not in capsys.readouterr().err


def test_the_help_speaks_to_operators_with_the_exit_codes(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        cli.main(["--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert "exit codes:" in out
    codes = out.split("exit codes:", 1)[1]
    for code in ("0", "1", "2"):
        assert f"\n  {code}  " in codes
    assert "diagnose" in codes  # diagnose's own meaning of 1 and 2 is there too
    assert "the only place that parses argv" not in out  # the developer docstring stays in the code
    assert "keeps containerd working on this node" in out
