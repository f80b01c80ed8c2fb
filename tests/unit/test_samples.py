"""Every journal matcher has real sample lines that must match and lines that must not."""

from __future__ import annotations

from pathlib import Path

import pytest

from nodemedic.events import JournalLine
from nodemedic.policy.load import load_policy
from nodemedic.policy.match import match
from nodemedic.policy.model import JournalTrigger

pytestmark = pytest.mark.unit
ROOT = Path(__file__).parents[2]
SAMPLES = ROOT / "tests" / "samples"
POLICY = load_policy(ROOT / "policy" / "policy.toml", check_owner=False)  # the checkout, not /etc
JOURNAL_RULES = [r for r in POLICY.rule if any(isinstance(t, JournalTrigger) for t in r.trigger)]


def lines(path: Path) -> list[str]:
    return [ln for ln in path.read_text().splitlines() if ln.strip() and not ln.startswith("#")]


@pytest.mark.parametrize("rule", JOURNAL_RULES, ids=lambda r: r.name)
def test_rule_has_samples(rule: object) -> None:
    name = rule.name  # type: ignore[attr-defined]
    assert lines(SAMPLES / f"{name}.match.txt"), f"add real log lines to tests/samples/{name}.match.txt"
    assert lines(SAMPLES / f"{name}.nomatch.txt"), f"add near misses to tests/samples/{name}.nomatch.txt"


@pytest.mark.parametrize("rule", JOURNAL_RULES, ids=lambda r: r.name)
def test_samples_match(rule: object) -> None:
    name = rule.name  # type: ignore[attr-defined]
    for text in lines(SAMPLES / f"{name}.match.txt"):
        fired = match(POLICY.rule, JournalLine("containerd.service", text))
        assert name in [m.rule.name for m in fired], text
    for text in lines(SAMPLES / f"{name}.nomatch.txt"):
        fired = match(POLICY.rule, JournalLine("containerd.service", text))
        assert name not in [m.rule.name for m in fired], text


def test_other_units_lines_do_not_match() -> None:
    line = "containerd: failed to get listener for main endpoint: is a directory"
    assert match(POLICY.rule, JournalLine("kubelet.service", line)) == []
