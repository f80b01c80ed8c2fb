"""Property tests for the repair record (repair.json): whatever is on disk at start-up, loading it
never raises and never yields a record that is not exactly what nodemedic wrote."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nodemedic.store import INTENT_FILE, IntentStore, RepairIntent

pytestmark = pytest.mark.unit

names = st.text(min_size=0, max_size=40)
numbers = st.floats(allow_nan=False, allow_infinity=False, width=64)
intents = st.builds(
    RepairIntent,
    incident=names,
    rule=names,
    started_at=numbers,
    index=st.integers(min_value=0, max_value=1 << 40),
    step=names,
    stopped=st.lists(names, max_size=4).map(tuple),
    applied=st.lists(names, max_size=4).map(tuple),
    paths=st.lists(names, max_size=4).map(tuple),
    unit=names,
    at=numbers,
)
json_values = st.recursive(
    # huge integers (past float's range) and NaN/infinity, which Python's json reads
    st.none() | st.booleans() | st.integers() | st.sampled_from([10**400, -(10**309)]) | st.floats() | names,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(names, inner, max_size=4),
    max_leaves=12,
)


def _load(content: bytes) -> tuple[RepairIntent | None, IntentStore]:
    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / INTENT_FILE).write_bytes(content)
        store = IntentStore(Path(folder))
        return store.load(), store


@given(intents)
def test_what_is_written_is_read_back(intent: RepairIntent) -> None:
    loaded, store = _load(intent.to_json().encode())
    assert loaded == intent
    assert not store.corrupt


@given(intents, st.sampled_from(list(json.loads(RepairIntent("", "", 0.0, 0, "").to_json()))), json_values)
def test_a_field_of_another_type_is_refused(intent: RepairIntent, key: str, value: object) -> None:
    data = json.loads(intent.to_json())
    data[key] = value
    loaded, store = _load(json.dumps(data).encode())
    if loaded is None:
        assert store.corrupt, "refused, and moved aside"
    else:  # accepted only when the value is one nodemedic could have written
        got = json.loads(loaded.to_json())[key]
        assert got == value or (isinstance(value, int) and got == float(value))


@given(st.binary(max_size=512) | json_values.map(lambda v: json.dumps(v).encode()))
def test_any_content_loads_or_is_set_aside(content: bytes) -> None:
    loaded, store = _load(content)
    assert loaded is None or isinstance(loaded, RepairIntent)
    assert (loaded is None) == bool(store.corrupt)
