"""Every journal matcher has real sample lines that must match and lines that must not.

A matcher is one journal trigger of one shipped rule. Its samples are the lines of
``tests/samples/RULE.match.txt`` and ``RULE.nomatch.txt`` that reach it: each line is turned into
the journal entry journald would store for its sender, and that entry into a JournalLine by the
journal source itself (its attribution by journald's own fields), so a line reaches a matcher only
if the source would hand it the same line from a real node. A directive names the sender of the
lines after it, and every file starts with one:

- ``# unit: NAME``: NAME's own process (its stdout), ``_SYSTEMD_UNIT=NAME``;
- ``# systemd about: NAME``: systemd's line about NAME, from PID 1 with ``UNIT=NAME``;
- ``# transport: kernel`` or ``# transport: audit``: the kernel's lines, ``_TRANSPORT=kernel|audit``.

So a kernel pattern is tried only on kernel lines: a matcher set to the wrong unit has no samples
and fails. The near misses include the shapes a hostile pod or local client can make: containerd
quoting a pod's command that echoes the text (issue 11).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from nodemedic.events import JournalLine
from nodemedic.policy import patterns
from nodemedic.policy.load import load_policy
from nodemedic.policy.match import match, match_trigger
from nodemedic.policy.model import JournalTrigger, Rule
from nodemedic.sources import journal

from .fakes import FakeClock

pytestmark = pytest.mark.unit
ROOT = Path(__file__).parents[2]
SAMPLES = ROOT / "tests" / "samples"
# The one policy the package installs (packaging/build.py: /etc/nodemedic/policy.toml): the checkout's.
POLICY = load_policy(ROOT / "policy" / "policy.toml", check_owner=False)
JOURNAL_RULES = [r for r in POLICY.rule if any(isinstance(t, JournalTrigger) for t in r.trigger)]
KINDS = ("match", "nomatch")


def own_line(unit: str) -> dict[str, object]:
    """A unit's own process writing to its stdout (systemd 252, lab)."""
    return {"_SYSTEMD_UNIT": unit, "_PID": 2345, "_UID": 0, "_TRANSPORT": "stdout"}


def systemd_line(unit: str) -> dict[str, object]:
    """systemd's own line about a unit: PID 1, root, the unit in UNIT=."""
    return {"_SYSTEMD_UNIT": "init.scope", "_PID": 1, "_UID": 0, "_TRANSPORT": "journal", "UNIT": unit}


def kernel_line(transport: str) -> dict[str, object]:
    return {"_TRANSPORT": transport}


# The fields journald records for each sender: the ones the source attributes a line by.
SENDERS: dict[str, Callable[[str], dict[str, object]]] = {
    "# unit:": own_line,
    "# systemd about:": systemd_line,
    "# transport:": kernel_line,
}


def follower() -> journal.JournalFollower:
    return journal.JournalFollower(POLICY.daemon.journal_units, lambda _: None, FakeClock())


@dataclass(frozen=True)
class Sample:
    """One sample line, where it came from, and what the journal source makes of it."""

    where: str
    sender: str
    text: str
    line: JournalLine | None  # None: the source drops it (no followed unit wrote it)

    def __str__(self) -> str:
        return f"{self.where} ({self.sender}): {self.text[:120]}"


@dataclass(frozen=True)
class Matcher:
    """One journal trigger of one rule."""

    rule: Rule
    index: int
    trigger: JournalTrigger

    @property
    def name(self) -> str:
        return f"{self.rule.name}:{self.index}:{self.trigger.unit}"


def entries(path: Path) -> Iterator[tuple[str, str, str, dict[str, object]]]:
    """(where, sender, text, journal entry) for each sample line of ``path``."""
    fields: dict[str, object] | None = None
    sender = ""
    for number, text in enumerate(path.read_text().splitlines(), start=1):
        where = f"{path.name}:{number}"
        directive = next((d for d in SENDERS if text.startswith(d)), None)
        if directive is not None:
            sender = text.removeprefix("# ")
            fields = SENDERS[directive](text.removeprefix(directive).strip())
        elif text.strip() and not text.startswith("#"):
            assert fields is not None, f"{where}: say who wrote it first (# unit: NAME, ...)"
            yield where, sender, text, {**fields, "MESSAGE": text}


def samples(rule: Rule, kind: str) -> list[Sample]:
    """The rule's sample lines of ``kind`` (match, nomatch), as the journal source emits them."""
    source = follower()
    path = SAMPLES / f"{rule.name}.{kind}.txt"
    if not path.exists():
        return []
    # _line is the source's own entry -> JournalLine step: attribution, cuts, fields
    return [Sample(where, who, text, source._line(entry)) for where, who, text, entry in entries(path)]


def matchers(rules: list[Rule]) -> list[Matcher]:
    return [
        Matcher(rule, i, trig)
        for rule in rules
        for i, trig in enumerate(rule.trigger)
        if isinstance(trig, JournalTrigger)
    ]


MATCHERS = matchers(JOURNAL_RULES)


def fires(matcher: Matcher, sample: Sample) -> bool:
    return sample.line is not None and match_trigger(matcher.trigger, sample.line) is not None


def reaches(matcher: Matcher, sample: Sample) -> bool:
    """Whether the source hands the sample to the matcher's unit (the pattern aside)."""
    return sample.line is not None and sample.line.unit == matcher.trigger.unit


@pytest.mark.parametrize("matcher", MATCHERS, ids=lambda m: m.name)
def test_matcher_matches_its_samples(matcher: Matcher) -> None:
    mine = [s for s in samples(matcher.rule, "match") if reaches(matcher, s)]
    where = f"tests/samples/{matcher.rule.name}.match.txt"
    assert mine, (
        f"add a real {matcher.trigger.unit} line matching {matcher.trigger.pattern.pattern!r} to {where}"
    )
    assert any(fires(matcher, s) for s in mine), f"none of {where}'s {matcher.trigger.unit} lines match it"
    others = [m for m in matchers([matcher.rule]) if m.trigger.unit == matcher.trigger.unit]
    for sample in mine:  # each line matches this matcher (or another of the rule's on the same unit)
        assert any(fires(m, sample) for m in others), f"{sample} does not match {matcher.name}"


@pytest.mark.parametrize("matcher", MATCHERS, ids=lambda m: m.name)
def test_matcher_does_not_match_its_near_misses(matcher: Matcher) -> None:
    mine = [s for s in samples(matcher.rule, "nomatch") if reaches(matcher, s)]
    where = f"tests/samples/{matcher.rule.name}.nomatch.txt"
    assert mine, f"add a near miss from {matcher.trigger.unit} for {matcher.name} to {where}"
    for sample in mine:
        assert not fires(matcher, sample), f"{sample} matches {matcher.name}"


@pytest.mark.parametrize("rule", JOURNAL_RULES, ids=lambda r: r.name)
@pytest.mark.parametrize("kind", KINDS)
def test_every_sample_reaches_a_matcher_of_its_rule(rule: Rule, kind: str) -> None:
    # a line no matcher of the rule reads tests nothing: a wrong directive, or a matcher's unit changed
    units = {m.trigger.unit for m in matchers([rule])}
    for sample in samples(rule, kind):
        assert sample.line is not None, f"{sample}: the journal source drops it (no followed unit)"
        assert sample.line.unit in units, f"{sample}: reaches {sample.line.unit}; {rule.name} reads {units}"


@pytest.mark.parametrize("rule", JOURNAL_RULES, ids=lambda r: r.name)
def test_rule_has_samples(rule: Rule) -> None:
    name = rule.name
    assert samples(rule, "match"), f"add real log lines to tests/samples/{name}.match.txt"
    assert samples(rule, "nomatch"), f"add near misses to tests/samples/{name}.nomatch.txt"


@pytest.mark.parametrize("rule", JOURNAL_RULES, ids=lambda r: r.name)
def test_samples_match(rule: Rule) -> None:
    # the whole policy at once: each match line fires the rule, no near miss does
    for kind in KINDS:
        for sample in samples(rule, kind):
            assert sample.line is not None, str(sample)
            fired = [m.rule.name for m in match(POLICY.rule, sample.line)]
            assert (rule.name in fired) == (kind == "match"), str(sample)


def test_every_sample_file_belongs_to_a_rule() -> None:
    names = {f"{rule.name}.{kind}.txt" for rule in JOURNAL_RULES for kind in KINDS}
    stale = sorted(p.name for p in SAMPLES.iterdir() if p.name not in names)
    assert not stale, f"samples of no shipped journal rule: {stale}"


def one_line(fields: dict[str, object], text: str) -> JournalLine:
    line = follower()._line({**fields, "MESSAGE": text})
    assert line is not None
    return line


def test_other_units_lines_do_not_match() -> None:
    line = "containerd: failed to get listener for main endpoint: is a directory"
    assert match(POLICY.rule, one_line(own_line("kubelet.service"), line)) == []


def test_kernel_lines_do_not_fire_containerd_rules() -> None:
    line = "containerd.service: Found left-over process 68 (containerd-shim) in control group while starting"
    assert match(POLICY.rule, one_line(kernel_line("kernel"), line)) == []


# Lines of 400 KiB built to make a backtracking engine rescan them: the old containerd-socket-denied
# patterns took 35 s on such a line with Python's re (issue 11). RE2 takes one pass; the text is
# also cut to its first 8 KiB before any pattern sees it.
HOSTILE = [
    "a" * 400_000,
    "containerd.sock" * 27_000,
    "avc:  denied  " * 29_000,
    'apparmor="DENIED" ' * 22_000,
    'time="x" level=error msg=a' + " k=v" * 100_000,
    'time="x" level=error msg="' + '\\"' * 200_000,
    'time="x" level=error msg="x" error="' + "context deadline exceeded " * 15_000,
]


@pytest.mark.parametrize("text", HOSTILE, ids=lambda t: t[:20])
def test_shipped_patterns_are_fast_on_hostile_lines(text: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # The whole 400 KiB line, the 8 KiB cut lifted: RE2 itself must be linear on it.
    monkeypatch.setattr(patterns, "MESSAGE_LIMIT", len(text))
    for matcher in MATCHERS:
        started = time.perf_counter()
        matcher.trigger.pattern.search(text)
        elapsed = time.perf_counter() - started
        pattern = matcher.trigger.pattern.pattern
        assert elapsed < 0.05, f"{pattern!r} took {elapsed:.3f} s on a 400 KiB hostile line"


def test_the_source_and_the_patterns_cut_messages_alike() -> None:
    assert patterns.MESSAGE_LIMIT == journal.MESSAGE_LIMIT == 8192
