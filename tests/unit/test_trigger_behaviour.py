"""Triggers carry their own behaviour: what fires them, what their source must serve, which events
are readings of their check. Adding a kind of trigger is one class (and, for a periodic reading,
one entry in sources/resources.py's READINGS), never an edit to match.py."""

from __future__ import annotations

import typing
from typing import ClassVar, Literal

import pytest
from pydantic import TypeAdapter

from nodemedic.events import (
    Event,
    FdUsage,
    FileChanged,
    GrpcStreamsSetting,
    JournalLine,
    OomKills,
    PathChanged,
    PathKind,
    PressureSeen,
    ProbeFailed,
    SignalSeen,
    SocketModeSeen,
    UnitChanged,
    VersionSeen,
)
from nodemedic.policy import model
from nodemedic.policy.load import parse_policy
from nodemedic.policy.match import Match, match, match_trigger
from nodemedic.policy.model import ResourceTrigger, TriggerModel
from nodemedic.sources.resources import READINGS

pytestmark = pytest.mark.unit

TRIGGERS: tuple[type[TriggerModel], ...] = typing.get_args(model.AnyTrigger)
SOURCES = {"inotify", "journal", "dbus", "probe", "files", "resources"}
SOCK = "/run/containerd/containerd.sock"
CONFIG = "/etc/containerd/config.toml"


def test_the_trigger_union_is_the_twelve_kinds() -> None:
    assert len(TRIGGERS) == 12
    assert all(issubclass(kind, TriggerModel) for kind in TRIGGERS)


@pytest.mark.parametrize("kind", TRIGGERS, ids=lambda k: k.__name__)
def test_every_trigger_says_what_fires_it_and_who_serves_it(kind: type[TriggerModel]) -> None:
    assert kind.served_by in SOURCES
    assert "fires" in vars(kind), "its own fires(), not an inherited one"
    assert "wants" in vars(kind)


@pytest.mark.parametrize(
    "kind", [k for k in TRIGGERS if k.served_by == "resources"], ids=lambda k: k.__name__
)
def test_every_resource_trigger_says_which_events_are_its_readings(kind: type[TriggerModel]) -> None:
    assert issubclass(kind, ResourceTrigger)
    assert "reads" in vars(kind)
    assert kind in READINGS, "the resource watcher has a reading for it"


def test_the_resource_watcher_reads_only_resource_triggers() -> None:
    served = {k for k in TRIGGERS if k.served_by == "resources"}
    assert set(READINGS) == served == {k for k in TRIGGERS if issubclass(k, ResourceTrigger)}


def trigger(data: dict[str, object]) -> TriggerModel:
    return typing.cast(TriggerModel, TypeAdapter(model.Trigger).validate_python(data))


BUG = {"first": "1.6.0", "fixed": "1.6.38", "reason": "CVE-0000-1"}
# One trigger of each kind, an event that fires it with the words the records carry, one that does not
FIRING: list[tuple[dict[str, object], Event, str, Event]] = [
    ({"source": "path", "paths": [SOCK], "kind": "directory"}, PathChanged(SOCK, PathKind.DIRECTORY),
     f"{SOCK} is a directory", PathChanged(SOCK, PathKind.SOCKET)),
    ({"source": "journal", "pattern": "^boom"}, JournalLine("containerd.service", "boom now"),
     "journal: boom now", JournalLine("kubelet.service", "boom now")),
    ({"source": "unit", "unit": "containerd.service", "active_state": ["failed"]},
     UnitChanged("containerd.service", "failed", "failed"), "containerd.service is failed/failed",
     UnitChanged("containerd.service", "active", "running")),
    ({"source": "probe", "failures": 2}, ProbeFailed(SOCK, "DEADLINE_EXCEEDED", 2),
     "containerd did not answer 2 requests in a row: DEADLINE_EXCEEDED", ProbeFailed(SOCK, "x", 1)),
    ({"source": "signal"}, SignalSeen(1, 42, unit="containerd.service"),
     "containerd.service's main process 42 was killed by signal 1", SignalSeen(15, 42, unit="kubelet")),
    ({"source": "file", "path": CONFIG}, FileChanged(CONFIG), f"{CONFIG} was written", FileChanged("/etc/x")),
    ({"source": "fds"}, FdUsage("containerd.service", 74, 900, 1000),
     "containerd.service's main process 74 has 900 of 1000 file descriptors open (90 %)",
     FdUsage("containerd.service", 74, 800, 1000)),
    ({"source": "pressure", "resource": "memory", "scope": "host", "above": 10},
     PressureSeen("host", "memory", 12.5, 0.0), "memory pressure (host): some avg10=12.50 % >= 10 %",
     PressureSeen("containerd", "memory", 12.5, 0.0)),
    ({"source": "oom"}, OomKills("containerd.service", 3, 2),
     "the OOM killer killed 2 process(es) in containerd.service's cgroup (3 in all)",
     OomKills("containerd.service", 3, 0)),
    ({"source": "socket-mode"}, SocketModeSeen(SOCK, 0o666, 0, 0),
     f"{SOCK} is mode 0666 owner 0:0, expected 0660 0:0", SocketModeSeen(SOCK, 0o660, 0, 0)),
    ({"source": "version", "known_bugs": [BUG]}, VersionSeen("1.6.20"),
     "containerd 1.6.20 has known bugs: CVE-0000-1", VersionSeen("1.6.38")),
    ({"source": "grpc-streams"}, GrpcStreamsSetting(CONFIG, "2"),
     f"{CONFIG} sets [grpc] max_concurrent_streams = 2, a key containerd does not read: its gRPC "
     "server has no stream limit, so this limit is not in effect", GrpcStreamsSetting(CONFIG, "")),
]  # fmt: skip


@pytest.mark.parametrize(("data", "fires", "words", "quiet"), FIRING, ids=lambda v: str(v)[:30])
def test_each_trigger_fires_with_its_words(
    data: dict[str, object], fires: Event, words: str, quiet: Event
) -> None:
    trig = trigger(data)
    assert trig.fires(fires) == words
    assert trig.fires(quiet) is None
    assert match_trigger(trig, fires) == words


def test_the_table_holds_every_kind() -> None:
    assert {type(trigger(row[0])) for row in FIRING} == set(TRIGGERS)


def test_a_reading_of_the_same_check_is_read_whether_it_fires_or_not() -> None:
    trig = trigger({"source": "pressure", "resource": "memory", "scope": "host"})
    assert trig.reads(PressureSeen("host", "memory", 0.0, 0.0))
    assert not trig.reads(PressureSeen("host", "cpu", 90.0, 0.0)), "another check's reading"
    assert not trig.reads(PressureSeen("containerd", "memory", 90.0, 0.0))
    assert not trigger({"source": "journal", "pattern": "x"}).reads(JournalLine("containerd.service", "x"))


class ToyTrigger(TriggerModel):
    """A kind of trigger nodemedic does not have: fires on journal lines that say "toy"."""

    served_by: ClassVar[str] = "journal"
    source: Literal["toy"] = "toy"

    def fires(self, event: Event) -> str | None:
        if isinstance(event, JournalLine) and "toy" in event.message:
            return f"a toy: {event.message}"
        return None

    def wants(self) -> frozenset[str]:
        return frozenset({"toy.service"})


def test_a_new_kind_of_trigger_is_matched_without_touching_match_py() -> None:
    policy = parse_policy({"rule": [{"name": "toy", "trigger": [{"source": "oom"}]}]})
    rule = policy.rule[0].model_copy(update={"trigger": [ToyTrigger()]})
    event = JournalLine("containerd.service", "a toy line")
    assert match([rule], event) == [Match(rule, event, "a toy: a toy line")]
    assert match([rule], JournalLine("containerd.service", "nothing")) == []
    toy_policy = policy.model_copy(update={"rule": [rule]})
    assert toy_policy.served() == {"journal": frozenset({"toy.service"})}


def test_served_says_per_source_what_the_policy_asks() -> None:
    paths = {"source": "path", "paths": [SOCK], "kind": "directory"}
    confirm = {"paths": ["/run/other", SOCK], "kind": "directory"}
    first = {"name": "a", "trigger": [paths, {"source": "probe"}, {"source": "file", "path": CONFIG}]}
    readings = [
        {"source": "fds"},
        {"source": "oom"},
        {"source": "version", "known_bugs": [BUG]},
        {"source": "pressure", "scope": "host", "resource": "io"},
        {"source": "socket-mode"},
        {"source": "grpc-streams"},
    ]
    followed = [
        {"source": "journal", "pattern": "x"},
        {"source": "signal"},
        {"source": "unit", "unit": "containerd.service"},
    ]
    second = {"name": "b", "trigger": readings + followed}
    policy = parse_policy({"rule": [first | {"confirm": confirm}, second]})
    assert policy.served() == {
        "inotify": frozenset({SOCK, "/run/other"}),
        "probe": frozenset({"probe"}),
        "files": frozenset({CONFIG}),
        "resources": frozenset(
            {"fd", "oom", "version", "pressure:host:io", f"socket-mode:{SOCK}", f"grpc-streams:{CONFIG}"}
        ),
        "journal": frozenset({"containerd.service"}),
        "dbus": frozenset({"containerd.service"}),
    }
    assert policy.watched_paths() == [SOCK, "/run/other"], "trigger paths first, then confirm's, once each"
    assert set(policy.watched_paths()) == policy.served()["inotify"]


def test_a_policy_without_rules_asks_nothing() -> None:
    assert parse_policy({}).served() == {}
