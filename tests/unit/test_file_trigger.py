from __future__ import annotations

import pytest

from nodemedic.events import FileChanged
from nodemedic.policy.load import parse_policy
from nodemedic.policy.match import match

pytestmark = pytest.mark.unit


def test_a_file_trigger_fires_on_its_own_file_only() -> None:
    rule = {"name": "edited", "trigger": [{"source": "file", "path": "/etc/c/config.toml"}],
            "action": [{"do": "restore-config"}]}  # fmt: skip
    policy = parse_policy({"rule": [rule]})
    assert policy.watched_files() == ["/etc/c/config.toml"]
    [m] = match(policy.rule, FileChanged("/etc/c/config.toml"))
    assert m.trigger == "/etc/c/config.toml was written"
    assert match(policy.rule, FileChanged("/etc/c/other.toml")) == []


def test_a_file_trigger_needs_an_absolute_path() -> None:
    from nodemedic.errors import PolicyError

    with pytest.raises(PolicyError, match="absolute"):
        parse_policy({"rule": [{"name": "x", "trigger": [{"source": "file", "path": "config.toml"}],
                                "action": [{"do": "restore-config"}]}]})  # fmt: skip
