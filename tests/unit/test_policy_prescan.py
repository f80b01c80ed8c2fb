"""The policy's structure pre-scan (policy/load.py) stays linear on hostile text: it runs on the
event loop at every reload, where a slow scan would trip WatchdogSec=."""

from __future__ import annotations

import time

import pytest

from nodemedic.errors import PolicyError
from nodemedic.policy.load import parse_policy_text

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    "hostile",
    [
        'x = "' + '\\"' * 100_000,  # an unterminated string of escaped quotes (was quadratic: 7 s at 32 KB)
        "x = '" + "'" * 200_000,
        'x = """' + '\\"' * 100_000,
        "x = '''" + "'" * 200_000,
        ('a = "' + "\\" * 50 + "\n") * 4_000,
    ],
    ids=["basic", "literal", "multi-line-basic", "multi-line-literal", "many-lines"],
)
def test_unterminated_strings_are_scanned_in_linear_time(hostile: str) -> None:
    started = time.perf_counter()
    with pytest.raises(PolicyError):
        parse_policy_text(hostile, "hostile.toml")
    # linear: well under a second; quadratic, as before, minutes (7 s at 32 KB). Generous for a loaded CI.
    assert time.perf_counter() - started < 30.0
