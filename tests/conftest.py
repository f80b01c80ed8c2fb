"""Settings every test layer shares: hypothesis profiles.

`make test` runs the property tests under the bounded "ci" profile (seconds each); `make fuzz`
selects the "fuzz" profile (HYPOTHESIS_PROFILE=fuzz), which runs many more cases for long runs.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci",
    max_examples=200,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile(
    "fuzz",
    max_examples=20_000,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
