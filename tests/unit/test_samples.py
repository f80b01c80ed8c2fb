"""Every journal matcher has real sample lines that must match and lines that must not.

Each sample is fed from the unit its matcher reads: a line ``# unit: NAME`` in a sample file sets the
unit of the lines after it (``containerd.service`` until then; ``kernel`` for the kernel's lines).
The near misses include the shapes a hostile pod or local client can make: containerd quoting a
pod's command that echoes the text (issue 11).
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from nodemedic.events import JournalLine
from nodemedic.policy import patterns
from nodemedic.policy.load import load_policy
from nodemedic.policy.match import match, match_trigger
from nodemedic.policy.model import JournalTrigger, Rule
from nodemedic.sources import journal

pytestmark = pytest.mark.unit
ROOT = Path(__file__).parents[2]
SAMPLES = ROOT / "tests" / "samples"
POLICY = load_policy(ROOT / "policy" / "policy.toml", check_owner=False)  # the checkout, not /etc
JOURNAL_RULES = [r for r in POLICY.rule if any(isinstance(t, JournalTrigger) for t in r.trigger)]
UNIT_DIRECTIVE = "# unit:"


def samples(path: Path) -> list[tuple[str, str]]:
    """(unit, line) for each sample line of ``path``."""
    unit, out = "containerd.service", []
    for ln in path.read_text().splitlines():
        if ln.startswith(UNIT_DIRECTIVE):
            unit = ln.removeprefix(UNIT_DIRECTIVE).strip()
        elif ln.strip() and not ln.startswith("#"):
            out.append((unit, ln))
    return out


def lines(path: Path) -> list[str]:
    return [text for _, text in samples(path)]


def journal_triggers(rule: Rule) -> list[JournalTrigger]:
    return [t for t in rule.trigger if isinstance(t, JournalTrigger)]


@pytest.mark.parametrize("rule", JOURNAL_RULES, ids=lambda r: r.name)
def test_rule_has_samples(rule: Rule) -> None:
    name = rule.name
    assert lines(SAMPLES / f"{name}.match.txt"), f"add real log lines to tests/samples/{name}.match.txt"
    assert lines(SAMPLES / f"{name}.nomatch.txt"), f"add near misses to tests/samples/{name}.nomatch.txt"


@pytest.mark.parametrize("rule", JOURNAL_RULES, ids=lambda r: r.name)
def test_samples_match(rule: Rule) -> None:
    name = rule.name
    for unit, text in samples(SAMPLES / f"{name}.match.txt"):
        fired = match(POLICY.rule, JournalLine(unit, text))
        assert name in [m.rule.name for m in fired], (unit, text)
    for unit, text in samples(SAMPLES / f"{name}.nomatch.txt"):
        fired = match(POLICY.rule, JournalLine(unit, text))
        assert name not in [m.rule.name for m in fired], (unit, text)


@pytest.mark.parametrize("rule", JOURNAL_RULES, ids=lambda r: r.name)
def test_each_journal_trigger_has_a_sample_from_its_unit(rule: Rule) -> None:
    found = samples(SAMPLES / f"{rule.name}.match.txt")
    for trig in journal_triggers(rule):
        fired = [text for unit, text in found if match_trigger(trig, JournalLine(unit, text))]
        assert fired, f"add a {trig.unit} line matching {trig.pattern.pattern!r} to {rule.name}.match.txt"


def test_other_units_lines_do_not_match() -> None:
    line = "containerd: failed to get listener for main endpoint: is a directory"
    assert match(POLICY.rule, JournalLine("kubelet.service", line)) == []


def test_kernel_lines_do_not_fire_containerd_rules() -> None:
    line = "containerd.service: Found left-over process 68 (containerd-shim) in control group while starting"
    assert match(POLICY.rule, JournalLine("kernel", line)) == []


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
    for trig in (t for rule in JOURNAL_RULES for t in journal_triggers(rule)):
        started = time.perf_counter()
        trig.pattern.search(text)
        elapsed = time.perf_counter() - started
        assert elapsed < 0.05, f"{trig.pattern.pattern!r} took {elapsed:.3f} s on a 400 KiB hostile line"


def test_the_source_and_the_patterns_cut_messages_alike() -> None:
    assert patterns.MESSAGE_LIMIT == journal.MESSAGE_LIMIT == 8192
