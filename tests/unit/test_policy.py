from __future__ import annotations

from pathlib import Path

import pytest

from nodemedic.errors import PolicyError
from nodemedic.policy.duration import parse_duration
from nodemedic.policy.load import load_policy

pytestmark = pytest.mark.unit
SHIPPED = Path(__file__).parents[2] / "policy" / "policy.toml"

MINIMAL_RULE = """
[[rule]]
name = "r"
[[rule.trigger]]
source = "path"
paths = ["/run/containerd/containerd.sock"]
kind = "directory"
[[rule.action]]
do = "start-unit"
unit = "containerd.service"
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "policy.toml"
    path.write_text(text)
    return path


def test_shipped_policy_loads() -> None:
    policy = load_policy(SHIPPED)
    assert policy.daemon.mode == "enforce"
    assert [r.name for r in policy.rule] == ["socket-path-is-directory"]
    actions = [a.do for a in policy.rule[0].action]
    assert actions == ["stop-unit", "remove-socket-dir", "start-unit", "verify-containerd", "restart-unit"]


def test_minimal_policy_defaults(tmp_path: Path) -> None:
    policy = load_policy(write(tmp_path, MINIMAL_RULE))
    assert policy.daemon.quarantine == Path("/var/lib/nodemedic/quarantine")
    assert policy.mode_of(policy.rule[0]) == "enforce"


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (
            ('do = "start-unit"', 'do = "remove-dir"'),
            "rule[0] ('r').action[0]: unknown action 'remove-dir'; known: 'stop-unit'",
        ),
        (('kind = "directory"', 'kind = "folder"'), "rule[0] ('r').trigger[0].kind"),
        (('name = "r"', 'name = "r"\ncolour = "red"'), "rule[0] ('r').colour: unknown key"),
        (('name = "r"', 'name = "Bad Name"'), "rule[0] ('Bad Name').name"),
        (
            ('unit = "containerd.service"', 'unit = "containerd.service"\ntimeout = "soon"'),
            "'soon' is not a duration",
        ),
    ],
)
def test_invalid_policy_names_the_key(tmp_path: Path, edit: tuple[str, str], expected: str) -> None:
    path = write(tmp_path, MINIMAL_RULE.replace(*edit))
    with pytest.raises(PolicyError) as err:
        load_policy(path)
    assert str(path) in str(err.value)
    assert any(expected in p for p in err.value.problems), err.value.problems


def test_bad_regex_is_refused_at_load(tmp_path: Path) -> None:
    text = MINIMAL_RULE.replace(
        'source = "path"\npaths = ["/run/containerd/containerd.sock"]\nkind = "directory"',
        'source = "journal"\npattern = "is a (directory"',
    )
    with pytest.raises(PolicyError) as err:
        load_policy(write(tmp_path, text))
    assert "rule[0] ('r').trigger[0].pattern" in str(err.value)


def test_duplicate_rule_names(tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match="repeated: r"):
        load_policy(write(tmp_path, MINIMAL_RULE + MINIMAL_RULE))


def test_broken_toml_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match="not valid TOML"):
        load_policy(write(tmp_path, "[daemon\n"))
    with pytest.raises(PolicyError, match="file not found"):
        load_policy(tmp_path / "absent.toml")


@pytest.mark.parametrize(
    ("text", "seconds"), [("500ms", 0.5), ("30s", 30), ("5m", 300), ("1h", 3600), (2, 2.0)]
)
def test_durations(text: object, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("bad", ["5", "5 days", "-1s", True, None])
def test_bad_durations(bad: object) -> None:
    with pytest.raises(ValueError, match="duration"):
        parse_duration(bad)
