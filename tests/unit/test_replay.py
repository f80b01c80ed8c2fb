"""`nodemedic replay` (issue 13 item 4): a policy run over an export stream the test writes, with real
lines from tests/samples, through the real journal attribution, matcher and rules' core.

The stream is what `journalctl -o export` writes (text fields, binary fields with their 64-bit
length, a blank line between entries); the replayed clock is the entries' own timestamps, so the
backoff, the breaker and the budget are checked over hours of history in milliseconds.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pytest
import tomlkit
import tomllib

from nodemedic import cli
from nodemedic.core.effects import Instant
from nodemedic.core.rules import RETRY_MARGIN
from nodemedic.policy.load import load_policy
from nodemedic.tools import replay
from nodemedic.tools.paint import painter, wants_colour
from nodemedic.tools.replay import (
    Entry,
    Progress,
    Replay,
    ReplayClock,
    ReplayInputError,
    entry_of,
    parse_export,
    parse_time,
)

pytestmark = pytest.mark.unit
ROOT = Path(__file__).parents[2]
SAMPLES = ROOT / "tests" / "samples"
SHIPPED = tomllib.loads((ROOT / "policy" / "policy.toml").read_text())
UNIT = "containerd.service"
T0 = 1_700_000_000.0
BOOT = "6f1c9a2e3b4d4e5f8a7b6c5d4e3f2a1b"  # a boot ID as journald writes it
BROKEN = "containerd-config-broken"
SHIMS = "left-over-shims"
SOCKET_DIR = "socket-path-is-directory"


def sample(name: str, kind: str = "match") -> list[str]:
    """The sample lines of a rule (comments and directives left out)."""
    text = (SAMPLES / f"{name}.{kind}.txt").read_text()
    return [line for line in text.splitlines() if line and not line.startswith("#")]


TOML_LINE = sample(BROKEN)[0]  # containerd: failed to load TOML: ... (1.6/1.7, lab)
LOGRUS_LINE = sample(BROKEN)[1]  # 2.x's logrus line written just before its exit line
SHIM_LINE = sample(SHIMS)[0]  # systemd's own line about containerd
QUIET_LINE = sample(BROKEN, "nomatch")[1]  # containerd loading a plugin


# ---- writing an export stream ------------------------------------------------------------------


def field(name: str, value: str | bytes) -> bytes:
    if isinstance(value, str) and "\n" not in value:
        return f"{name}={value}\n".encode()
    data = value.encode() if isinstance(value, str) else value
    return name.encode() + b"\n" + len(data).to_bytes(8, "little") + data + b"\n"


def entry(
    message: str | bytes,
    at: float,
    *,
    unit: str = UNIT,
    systemd: bool = False,
    boot: str = BOOT,
    mono: float = 0.0,
) -> bytes:
    """One entry as journald stores it: a unit's own line (its stdout) or systemd's line about it."""
    sender = (
        {"_SYSTEMD_UNIT": "init.scope", "_PID": "1", "UNIT": unit}
        if systemd
        else {"_SYSTEMD_UNIT": unit, "_PID": "2345"}
    )
    fields = {
        "__CURSOR": f"s=1;i={int(at * 1e6):x}",
        "__REALTIME_TIMESTAMP": str(int(at * 1e6)),
        "__MONOTONIC_TIMESTAMP": str(int((mono or at - T0 + 100) * 1e6)),
        "_BOOT_ID": boot,
        "_TRANSPORT": "journal" if systemd else "stdout",
        "_UID": "0",
        **sender,
        "SYSLOG_IDENTIFIER": "systemd" if systemd else "containerd",
    }
    return b"".join(field(k, v) for k, v in fields.items()) + field("MESSAGE", message) + b"\n"


def stream(*entries: bytes) -> bytes:
    return b"".join(entries)


def policy_file(tmp_path: Path, *, mode: str = "enforce", repairs: int = 10, **rule_changes: Any) -> Path:
    """The shipped rules for a broken config, left-over shims and the socket directory, with a
    deterministic backoff (no jitter) and ``rule_changes`` applied to the broken-config rule."""
    rules = {r["name"]: r for r in SHIPPED["rule"]}
    broken = {**rules[BROKEN], **rule_changes}
    broken["backoff"] = {**broken["backoff"], "jitter": 0.0}
    doc = {
        "daemon": {**SHIPPED["daemon"], "mode": mode, "budget": {"repairs": repairs, "window": "1h"}},
        "rule": [broken, rules[SHIMS], rules[SOCKET_DIR]],
    }
    doc["daemon"]["state_dir"] = str(tmp_path / "state")
    path = tmp_path / "policy.toml"
    path.write_text(tomlkit.dumps(doc))
    return path


def run(tmp_path: Path, data: bytes, *args: str, policy: Path | None = None) -> tuple[int, dict[str, Any]]:
    export = tmp_path / "node.export"
    export.write_bytes(data)
    out = tmp_path / "out.json"
    code = replay_cli(
        ["--file", str(export), "--policy", str(policy or policy_file(tmp_path)), "--json", *args], out
    )
    return code, json.loads(out.read_text()) if code == 0 else {}


def replay_cli(args: list[str], out: Path) -> int:
    with out.open("w") as sink, pytest.MonkeyPatch.context() as mp:
        mp.setattr("sys.stdout", sink)
        return cli.main(["replay", *args])


def incidents(result: dict[str, Any], rule: str = BROKEN) -> list[dict[str, Any]]:
    return [i for i in result["incidents"] if i["rule"] == rule]


def tally(result: dict[str, Any], rule: str = BROKEN) -> dict[str, Any]:
    return next(r for r in result["rules"] if r["rule"] == rule)


# ---- the export format -------------------------------------------------------------------------


def test_the_export_parser_reads_text_binary_and_repeated_fields() -> None:
    data = (
        field("__REALTIME_TIMESTAMP", "1700000000000000")
        + field("MESSAGE", b"two\nlines")
        + field("BLOB", b"\xff\xfe\x00raw")
        + field("TAG", "a")
        + field("TAG", "b")
        + b"\n"
        + field("__REALTIME_TIMESTAMP", "1700000001000000")
        + field("MESSAGE", "caf\u00e9 = ok")
        + b"\n"
    )
    first, second = parse_export(io.BytesIO(data))
    assert first["MESSAGE"] == "two\nlines", "binary UTF-8 becomes text, as python-systemd gives it"
    assert first["BLOB"] == b"\xff\xfe\x00raw", "binary that is not UTF-8 stays bytes"
    assert first["TAG"] == ["a", "b"]
    assert second["MESSAGE"] == "caf\u00e9 = ok", "only the first '=' separates the name"
    assert entry_of(second).wall == 1_700_000_001.0


@pytest.mark.parametrize(
    "data",
    [
        field("MESSAGE", b"long")[:-3],  # the data cut short
        b"MESSAGE\n\x04\x00",  # the length cut short
        b"MESSAGE\n" + (2**40).to_bytes(8, "little"),  # a length no journal entry has
        b"not a field name=1\n",
        field("MESSAGE", b"x\ny")[:-1] + b"!",  # no newline after the data
    ],
    ids=["data", "length", "huge", "name", "newline"],
)
def test_a_damaged_stream_is_refused_with_where(data: bytes) -> None:
    with pytest.raises(ReplayInputError, match="entry 1"):
        list(parse_export(io.BytesIO(field("__REALTIME_TIMESTAMP", "1") + data)))


def test_a_binary_message_reaches_the_matcher(tmp_path: Path) -> None:
    """journalctl writes a MESSAGE with a control character or invalid UTF-8 as a binary field."""
    code, result = run(tmp_path, entry(TOML_LINE.encode(), T0) + entry(b"\xffbinary\x01", T0 + 1))
    assert code == 0
    assert [i["lines"] for i in incidents(result)] == [1]
    assert result["lines"] == 2


def test_unreadable_input_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    policy = policy_file(tmp_path)
    assert cli.main(["replay", "--file", str(tmp_path / "missing"), "--policy", str(policy)]) == 2
    garbage = tmp_path / "garbage"
    garbage.write_bytes(b"\x00\x01 this is no journal\n")
    assert cli.main(["replay", "--file", str(garbage), "--policy", str(policy)]) == 2
    assert "cannot read export stream" in capsys.readouterr().err


# ---- incidents as the live daemon would have had them --------------------------------------------


def test_lines_within_a_repair_are_one_incident_and_a_later_fault_another(tmp_path: Path) -> None:
    """2.x writes its logrus line and its exit line together: the live daemon repairs once (the
    second line waits while the repair runs, and its confirm then finds the config loading)."""
    data = stream(
        entry(LOGRUS_LINE, T0),
        entry(TOML_LINE, T0 + 0.01),
        entry(QUIET_LINE, T0 + 1),
        entry(TOML_LINE, T0 + 3),
        entry(TOML_LINE, T0 + 600),  # the fault again, ten minutes later
    )
    code, result = run(tmp_path, data)
    assert code == 0
    first, second = incidents(result)
    assert (first["lines"], second["lines"]) == (3, 1)
    assert (first["first"], first["last"]) == (replay.iso(T0), replay.iso(T0 + 10)), "ends with the repair"
    assert (first["decided"], first["outcome"]) == ("repair", "repaired")
    assert first["would"][:2] == [
        "stop-unit containerd.service",
        "restore-config /etc/containerd/config.toml",
    ]
    assert second["first"] == replay.iso(T0 + 600)
    assert tally(result) | {"incidents": 2, "repairs": 2, "lines": 4} == tally(result)
    kinds = [s["kind"] for s in first["steps"]]
    assert [*kinds[:2], kinds[-1]] == ["detected", "decided", "outcome"]


def test_the_repair_time_decides_what_is_one_incident(tmp_path: Path) -> None:
    data = stream(entry(TOML_LINE, T0), entry(TOML_LINE, T0 + 3))
    _, result = run(tmp_path, data, "--repair-time", "1s")
    assert [i["lines"] for i in incidents(result)] == [1, 1]


def test_three_failures_open_the_breaker_over_the_replayed_clock(tmp_path: Path) -> None:
    """One broken-config line a minute for an hour, every repair failing: the core retries by itself
    after each backoff (5 s, then 10 s, timed from the end of the failed repair), opens the breaker at
    the third failure, then only observes, once, held by the breaker."""
    data = stream(*(entry(TOML_LINE, T0 + 60 * n) for n in range(60)))
    code, result = run(tmp_path, data, "--assume-failed")
    assert code == 0
    found = incidents(result)
    assert [i["decided"] for i in found] == ["repair", "repair", "repair", "held"]
    assert [i["outcome"] for i in found] == ["not-repaired", "not-repaired", "not-repaired", "observed"]
    retry_1 = T0 + 10 + 5 + RETRY_MARGIN
    retry_2 = retry_1 + 10 + 10 + RETRY_MARGIN
    assert [i["first"] for i in found[:3]] == [replay.iso(t) for t in (T0, retry_1, retry_2)]
    assert [i["breaker_opened"] for i in found] == [False, False, True, False]
    assert (found[3]["held"], found[3]["first"]) == ("circuit breaker open", replay.iso(T0 + 60))
    assert tally(result) | {"repairs": 3, "held": 1, "breaker_opened": 1, "lines": 60} == tally(result)
    assert [p["what"] for p in result["pending"]] == [f"retry {BROKEN}"], "the trial after the cool-down"


def test_the_breaker_trial_after_its_cooldown(tmp_path: Path) -> None:
    """Past the hour's cool-down the core tries once more (half-open), here while lines still come."""
    data = stream(*(entry(TOML_LINE, T0 + 60 * n) for n in range(70)))
    _, result = run(tmp_path, data, "--assume-failed")
    found = incidents(result)
    assert [i["decided"] for i in found] == ["repair", "repair", "repair", "held", "repair"]
    assert any(s["outcome"] == "trial" for s in found[4]["steps"])


def test_a_spent_budget_holds(tmp_path: Path) -> None:
    data = stream(*(entry(TOML_LINE, T0 + 60 * n) for n in range(5)))
    _, result = run(tmp_path, data, policy=policy_file(tmp_path, repairs=2))
    assert [i["decided"] for i in incidents(result)] == ["repair", "repair", "held"]
    assert incidents(result)[2]["held"] == "global repair budget spent"


def test_observe_mode_reports_once_per_incident(tmp_path: Path) -> None:
    data = stream(*(entry(TOML_LINE, T0 + 5 * n) for n in range(10)))
    _, result = run(tmp_path, data, policy=policy_file(tmp_path, mode="observe"))
    [observed] = incidents(result)
    assert (observed["decided"], observed["outcome"], observed["lines"]) == ("observe", "observed", 10)
    actions = [s["message"] for s in observed["steps"] if s["kind"] == "action"]
    assert actions[0] == "would stop-unit containerd.service"
    assert tally(result)["repairs"] == 0


def test_a_changed_policy_changes_the_result(tmp_path: Path) -> None:
    data = stream(entry(TOML_LINE, T0), entry(LOGRUS_LINE, T0 + 600))
    _, before = run(tmp_path, data)
    only_exit_lines = "^(?:containerd: )?failed to (?:load|unmarshal) TOML"
    changed = policy_file(tmp_path, trigger=[{"source": "journal", "unit": UNIT, "pattern": only_exit_lines}])
    _, after = run(tmp_path, data, policy=changed)
    assert len(incidents(before)) == 2
    assert len(incidents(after)) == 1, "the logrus line no longer fires"
    assert after["policy"] == str(changed)


def test_systemds_own_line_is_attributed_and_a_forged_one_is_not(tmp_path: Path) -> None:
    """The journal source's trust: UNIT= counts only on a line from PID 1."""
    forged = entry(SHIM_LINE, T0 + 100, unit=UNIT, systemd=False)
    forged = forged.replace(
        b"_SYSTEMD_UNIT=containerd.service", b"_SYSTEMD_UNIT=evil.service\nUNIT=containerd.service"
    )
    _, result = run(tmp_path, entry(SHIM_LINE, T0, systemd=True) + forged)
    [shims] = incidents(result, SHIMS)
    assert shims["would"] == ["kill-orphaned-shims containerd.service"]
    assert tally(result, SHIMS)["lines"] == 1


def test_rules_that_cannot_be_replayed_are_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _, result = run(tmp_path, entry(TOML_LINE, T0))
    socket_dir, guard = result["not_replayed"]
    assert guard == {
        "rule": "sighup",
        "triggers": ["signal"],
        "partly": False,
        "why": replay.WHY_NOT["signals"],
    }
    assert socket_dir == {
        "rule": SOCKET_DIR,
        "triggers": ["path"],
        "partly": True,
        "why": replay.WHY_NOT["inotify"],
    }
    policy = policy_file(tmp_path)
    assert cli.main(["replay", "--file", str(tmp_path / "node.export"), "--policy", str(policy)]) == 0
    text = capsys.readouterr().out
    assert f"{SOCKET_DIR}: only its journal triggers are replayed; path:" in text
    assert "confirm condition holds" in text


# ---- the output -------------------------------------------------------------------------------------


def test_the_json_schema(tmp_path: Path) -> None:
    _, result = run(tmp_path, entry(TOML_LINE, T0) + entry(QUIET_LINE, T0 + 1))
    assert result["schema"] == 1
    assert set(result) == {
        "schema",
        "policy",
        "source",
        "assumptions",
        "repair_time",
        "assume_failed",
        "entries",
        "lines",
        "first",
        "last",
        "not_replayed",
        "incidents",
        "other",
        "rules",
        "pending",
    }
    assert result["source"] == {
        "kind": "export",
        "path": str(tmp_path / "node.export"),
        "since": None,
        "until": None,
    }
    assert (result["entries"], result["lines"], result["first"]) == (2, 2, replay.iso(T0))
    [incident] = result["incidents"]
    assert set(incident) == {
        "number",
        "rule",
        "mode",
        "first",
        "last",
        "trigger",
        "decided",
        "would",
        "lines",
        "held",
        "outcome",
        "breaker_opened",
        "steps",
    }
    assert set(incident["steps"][0]) == {"at", "kind", "rule", "message", "outcome"}
    assert set(result["rules"][0]) == {
        "rule",
        "mode",
        "lines",
        "lines_before",
        "incidents",
        "repairs",
        "held",
        "breaker_opened",
    }


def test_since_and_until_bound_the_history(tmp_path: Path) -> None:
    data = stream(*(entry(TOML_LINE, T0 + 600 * n) for n in range(4)))
    _, result = run(tmp_path, data, "--since", f"@{T0 + 1}", "--until", f"@{T0 + 1300}")
    assert [i["first"] for i in incidents(result)] == [replay.iso(T0 + 600), replay.iso(T0 + 1200)]
    assert result["source"]["since"] == replay.iso(T0 + 1)


def test_text_output_and_no_progress_off_a_terminal(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    export = tmp_path / "node.export"
    export.write_bytes(entry(TOML_LINE, T0))
    assert cli.main(["replay", "--file", str(export), "--policy", str(policy_file(tmp_path))]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    assert f"Incident 1  {BROKEN}  enforce" in out
    assert "outcome  repaired (assumed)" in out
    assert "\x1b[" not in out, "no colours off a terminal"


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize(("no_color", "coloured"), [(None, True), ("", True), ("1", False)])
def test_colours_on_a_terminal_unless_no_color_is_set_and_not_empty(
    monkeypatch: pytest.MonkeyPatch, no_color: str | None, coloured: bool
) -> None:
    monkeypatch.delenv("NO_COLOR", raising=False)
    if no_color is not None:
        monkeypatch.setenv("NO_COLOR", no_color)  # empty: as unset (https://no-color.org), like status
    assert ("\x1b[" in painter(wants_colour(_Terminal()))("x", "red")) is coloured
    assert "\x1b[" not in painter(wants_colour(io.StringIO()))("x", "red")


def test_the_progress_bar_on_a_terminal(tmp_path: Path) -> None:
    export = tmp_path / "node.export"
    export.write_bytes(entry(TOML_LINE, T0) * 2)
    history = replay.History(str(export), None, None)
    list(history.entries(["containerd.service"]))
    terminal = _Terminal()
    progress = Progress(terminal, history)
    progress.tick(2)
    progress.close()
    assert "100% 2 entries read" in terminal.getvalue()
    assert terminal.getvalue().endswith("\r\x1b[K")


# ---- the replayed clock and times -------------------------------------------------------------------


def test_the_clock_follows_monotonic_time_within_a_boot_and_the_wall_across_boots() -> None:
    clock = ReplayClock()
    assert clock.advance(Entry({}, T0, 50.0, "b1")) == Instant(0.0, T0)
    assert clock.advance(Entry({}, T0 - 3600, 60.0, "b1")) == Instant(10.0, T0 - 3600), "the wall set back"
    assert clock.advance(Entry({}, T0 + 100, 1.0, "b2")) == Instant(3710.0, T0 + 100), "a new boot"
    assert clock.advance(Entry({}, T0 + 50, None, "b2")) == Instant(3710.0, T0 + 50), "never backwards"
    assert clock.at(3720.0) == Instant(3720.0, T0 + 60)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("@1700000000.5", 1_700_000_000.5),
        ("2023-11-14T22:13:20Z", T0),
        ("2023-11-14 22:13:20+00:00", T0),
        ("-2h", T0 - 7200),
        ("30m ago", T0 - 1800),
        ("+1d", T0 + 86400),
        ("now", T0),
    ],
)
def test_times_as_journalctl_takes_them(text: str, expected: float) -> None:
    assert parse_time(text, now=T0) == expected


def test_a_bad_time_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        cli.main(["replay", "--since", "last tuesday"])
    assert exit_.value.code == 2
    assert "is not a time" in capsys.readouterr().err


def test_the_replay_class_on_its_own(tmp_path: Path) -> None:
    """Replay is the seam: entries in, incidents out."""
    run_ = Replay(load_policy(policy_file(tmp_path), check_owner=False), repair_time=0.0)
    for fields in parse_export(io.BytesIO(entry(TOML_LINE, T0) + entry(TOML_LINE, T0 + 1))):
        run_.feed(entry_of(fields))
    assert run_.finish() == []
    assert [i.lines for i in run_.incidents] == [1, 1], "no repair time: the second line is a new incident"
