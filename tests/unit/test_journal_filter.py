"""The journal source's filter: it keeps from the rules exactly the lines no journal trigger fires on.

The source searches the raw MESSAGE (``_searched``: its first MESSAGE_LIMIT characters, UTF-8) with
one RE2 alternation of every journal trigger's pattern (``journal_filter``); the rules search the
JournalLine's message with each pattern. Both must say the same of every line, or a line a rule
wants would be lost (or, less harmful, a line none wants would cost an event)."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from nodemedic.app import build_app
from nodemedic.daemon import Daemon
from nodemedic.policy import patterns
from nodemedic.policy.load import load_policy
from nodemedic.policy.match import journal_filter
from nodemedic.policy.model import JournalTrigger
from nodemedic.policy.patterns import AnyPattern, Regex
from nodemedic.report import MemorySink, RecordKind, Reporter
from nodemedic.sources import journal
from nodemedic.sources.journal import MESSAGE_LIMIT, JournalFollower

from .fakes import FakeClock, FakeProbe, FakeUnits
from .test_daemon import SHIPPED, make_app, until
from .test_samples import JOURNAL_RULES, KINDS, POLICY, SAMPLES, entries

pytestmark = pytest.mark.unit
WANTED = journal_filter(POLICY.rule)
IS_A_DIRECTORY = b"containerd: failed to get listener for main endpoint: is a directory"
TRIGGERS = [t for r in POLICY.rule for t in r.trigger if isinstance(t, JournalTrigger)]


class OneEntry:
    """systemd-python's Reader on one entry, as the source reads its MESSAGE (raw bytes)."""

    def __init__(self, message: bytes | None) -> None:
        self.message = message

    def _get(self, field: str) -> bytes:
        if self.message is None:
            raise KeyError(field)
        return self.message


def searched(message: bytes | None) -> bytes:
    return journal._searched(OneEntry(message))


def rules_fire(message: bytes | None) -> bool:
    """Whether some journal trigger's pattern matches the message the source hands the rules."""
    text = journal._text(message, MESSAGE_LIMIT)
    return any(t.pattern.search(text) for t in TRIGGERS)


def test_every_sample_line_is_judged_as_the_rules_judge_it() -> None:
    judged = 0
    for rule in JOURNAL_RULES:
        for kind in KINDS:
            path = SAMPLES / f"{rule.name}.{kind}.txt"
            for where, _, text, _ in entries(path) if path.exists() else []:
                raw = text.encode()
                assert WANTED(searched(raw)) == rules_fire(raw), where
                if kind == "match":
                    assert WANTED(searched(raw)), f"{where}: a line its rule wants is filtered out"
                judged += 1
    assert judged > 50


def sample_lines() -> list[bytes]:
    lines = []
    for rule in JOURNAL_RULES:
        for kind in KINDS:
            path = SAMPLES / f"{rule.name}.{kind}.txt"
            lines += [text.encode() for _, _, text, _ in (entries(path) if path.exists() else [])]
    return lines


SAMPLE_LINES = sample_lines()
# a sample line with bytes before and after it, cut anywhere (in a character too), or whole
near_samples = st.tuples(
    st.binary(max_size=20) | st.sampled_from([b"", b" ", b"\n", b"x", b"\xff", "é".encode()]),
    st.sampled_from(SAMPLE_LINES),
    st.binary(max_size=20) | st.sampled_from([b"", b" ", b"\n", b"\xff", b"\x00"]),
    st.integers(0, 400),
    st.integers(0, 400),
).map(lambda p: (p[0] + p[1] + p[2])[p[3] % 5 and p[3] : len(p[0] + p[1] + p[2]) - (p[4] % 5 and p[4])])
messages = st.one_of(st.binary(max_size=200), st.text(max_size=200).map(str.encode), st.none(), near_samples)


@given(messages)
def test_any_message_is_judged_as_the_rules_judge_it(raw: bytes | None) -> None:
    assert WANTED(searched(raw)) == rules_fire(raw)


@pytest.mark.parametrize(
    ("pattern", "message"),
    [
        ("^é*$", "é" * MESSAGE_LIMIT + "x"),  # the cut makes $ match: past the limit in bytes
        ("^x*$", "x" * MESSAGE_LIMIT + "y"),  # and in characters
        ("y$", "x" * 8191 + "y" + "z"),
        ("\ufffd", "ok \udcff"),  # what a lone surrogate becomes once encoded
        ("^\ufffd\ufffd$", ""),
    ],
)
def test_the_cut_and_the_decoding_are_the_rules_own(pattern: str, message: str) -> None:
    raw = message.encode("utf-8", "surrogateescape")
    text = journal._text(raw, MESSAGE_LIMIT)
    assert AnyPattern([Regex(pattern)]).search(searched(raw)) == Regex(pattern).search(text)
    bad = b"\xff\xfe"  # not UTF-8: decoded as the rules see it (U+FFFD each)
    assert AnyPattern([Regex("^\ufffd\ufffd$")]).search(searched(bad)) == Regex("^\ufffd\ufffd$").search(
        journal._text(bad, MESSAGE_LIMIT)
    )


def test_each_pattern_keeps_its_own_flags() -> None:
    either = AnyPattern([Regex("(?i)^abc$"), Regex("^def$")])
    assert either.search(b"ABC")
    assert either.search(b"def")
    assert not either.search(b"DEF")
    assert not either.search(b"xabc")


@pytest.mark.parametrize(
    ("patterns", "lines"),
    [
        # RE2 lets \\Q quote to the pattern's end: joined, it would quote the next pattern too
        ([r"\Qa", r"x\Qb\E"], ["a", "xb"]),
        ([r"x\Qb\E", r"\Qa"], ["a", "xb"]),
        ([r"^\Q(a)|[", r"(?i)b$"], ["(a)|[", "B"]),
        (["\\Qa\\", "c"], ["a\\", "c"]),
    ],
)
def test_a_pattern_cannot_reach_into_the_next(patterns: list[str], lines: list[str]) -> None:
    either = AnyPattern([Regex(p) for p in patterns])
    for text in lines:
        assert any(Regex(p).search(text) for p in patterns)
        assert either.search(text.encode()), (patterns, text)
    assert not either.search(b"nothing of it")
    assert either.joined


def test_patterns_not_to_be_joined_are_searched_each_alone(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where the join fails its check (or RE2 refuses it): each pattern alone, and said once."""
    monkeypatch.setattr(patterns, "_alternation", lambda unique: None)
    either = AnyPattern([Regex("(?i)^x$"), Regex("y"), Regex(r"\Qz")])
    assert not either.joined
    assert [either.search(t) for t in (b"X", b"y", b"z", b"xx")] == [True, True, True, False]
    [said] = [r for r in caplog.records if "could not be joined" in r.getMessage()]
    assert said.levelname == "WARNING"


def test_a_join_is_checked_group_by_group() -> None:
    assert patterns._alternation([r"\Qa", "b"]) is not None  # closed: \Qa\E
    assert patterns._closed(r"\Qa") == r"\Qa\E"
    assert patterns._closed(r"x\Qb\E") == r"x\Qb\E"
    assert patterns._alternation(["(a)", "(?P<nodemedic_any_0>b)"]) is not None  # a name taken twice


PIECES = ["a", "b", "\\Q", "\\E", "(", ")", "|", "^", "$", "(?i)", ".", "\\", "[", "]", "*", "\\d"]


@given(
    st.lists(st.lists(st.sampled_from(PIECES), max_size=6).map("".join), min_size=1, max_size=4),
    st.text("ab()|[]\\QE1.", max_size=8),
)
@example([r"\Qa", r"x\Qb\E"], "a")
def test_any_pattern_says_what_its_patterns_say(patterns: list[str], text: str) -> None:
    accepted = []
    for pattern in patterns:
        with contextlib.suppress(ValueError):
            accepted.append(Regex(pattern))
    either = AnyPattern(accepted)
    assert either.search(text.encode()) == any(p.search(text) for p in accepted), (accepted, text)


def test_a_policy_without_journal_triggers_wants_no_line() -> None:
    assert not journal_filter([])(b"")
    assert not journal_filter([])(b"containerd: failed to load TOML")


MARKER_RULE = """
[[rule]]
name = "marker"
description = "a report-only rule added at a reload"

[[rule.trigger]]
source = "journal"
unit = "containerd.service"
pattern = '^marker [0-9]+$'
"""


async def test_a_reload_gives_the_journal_source_the_new_policys_filter(tmp_path: Path) -> None:
    policy = tmp_path / "policy.toml"
    policy.write_text(SHIPPED.read_text())
    sink, notes = MemorySink(), []
    app = make_app(policy, sink)
    app.journal = JournalFollower(["containerd.service"], app.events.put_nowait, FakeClock())
    app.journal.wanted = journal_filter(app.policy.rule)
    shutdown, reload = asyncio.Event(), asyncio.Event()
    task = asyncio.create_task(Daemon(app, shutdown, reload, notify=notes.append).run())
    await until(lambda: any(n.startswith("READY=1") for n in notes))
    assert not app.journal.wanted(b"marker 1")

    policy.write_text(SHIPPED.read_text() + MARKER_RULE)
    reload.set()
    await until(lambda: any(r.fields.get("OUTCOME") == "reloaded" for r in sink.records))
    assert app.journal.wanted(b"marker 1")
    assert app.journal.wanted(IS_A_DIRECTORY)  # the rules kept still want their lines
    shutdown.set()
    await asyncio.wait_for(task, 5)


def test_the_app_records_a_skip_as_one_error_record(tmp_path: Path) -> None:
    """What the source says when it skips ahead reaches journald as an ERROR record an operator
    finds with NODEMEDIC_SOURCE=journal NODEMEDIC_OUTCOME=skipped."""
    policy = load_policy(SHIPPED, check_owner=False)
    daemon = policy.daemon.model_copy(update={"state_dir": tmp_path})
    sink = MemorySink()
    app = build_app(
        policy.model_copy(update={"daemon": daemon}), Reporter(sink), units=FakeUnits(), probe=FakeProbe()
    )
    assert app.journal is not None
    assert app.journal.wanted is not None
    assert app.journal.wanted(IS_A_DIRECTORY)
    app.journal._on_skip("journal reading fell behind ...; 980 entries skipped", "after cursor a up to b")
    [record] = sink.of(RecordKind.ERROR)
    assert record.fields == {
        "SOURCE": "journal",
        "OUTCOME": "skipped",
        "DETAIL": "after cursor a up to b",
    }
