"""The placeholder core on its own (issue 18 part 2): events and instants in, effects out.

The test plays the executor's part: it feeds the node view first, runs a ``Later`` by hand, and
reports a placeholder's making back through ``made`` / ``not_made``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

import pytest

from nodemedic.actions.placeholder_socket import socket_owner
from nodemedic.core.effects import Effect, Effects, Instant, Later, Report
from nodemedic.core.nodeview import NodeView
from nodemedic.core.path_keeper import ACTION, RETRY_AFTER, MakePlaceholder, PlaceholderCore
from nodemedic.events import Event, PathChanged, PathKind, UnitChanged
from nodemedic.policy.load import parse_policy_text
from nodemedic.policy.placeholder import PlaceholderSettings
from nodemedic.report import RecordKind

pytestmark = pytest.mark.unit

E = TypeVar("E", bound=Effect)
SOCK = "/run/containerd/containerd.sock"
TTRPC = "/run/containerd/containerd.sock.ttrpc"
UNIT = "containerd.service"
NOW = Instant(10.0, 1_700_000_010.0)


def of(effects: Effects, kind: type[E]) -> list[E]:
    return [e for e in effects if isinstance(e, kind)]


class Harness:
    def __init__(self, mode: str = "enforce", daemon_mode: str = "enforce") -> None:
        self.view = NodeView()
        settings = PlaceholderSettings(mode=mode)  # type: ignore[arg-type]
        self.core = PlaceholderCore(settings, daemon_mode, self.view)  # type: ignore[arg-type]

    def feed(self, event: Event) -> Effects:
        self.view.see(event)
        return self.core.handle(event, NOW)

    def unit(self, active: str, sub: str, pid: int = 0) -> None:
        self.feed(UnitChanged(UNIT, active, sub, main_pid=pid))

    def missing(self, path: str = SOCK) -> Effects:
        return self.feed(PathChanged(path, PathKind.MISSING, at=9.99))

    def socket(self, inode: int, path: str = SOCK, ctime: int = 1) -> Effects:
        return self.feed(PathChanged(path, PathKind.SOCKET, at=10.0, inode=inode, ctime_ns=ctime))


def reports(effects: Effects, **fields: Any) -> list[Report]:
    return [r for r in of(effects, Report) if all(r.fields.get(k) == v for k, v in fields.items())]


def test_missing_while_containerd_down_makes_a_placeholder_at_once() -> None:
    h = Harness()
    h.unit("activating", "auto-restart")
    [make] = h.missing()
    assert make == MakePlaceholder(SOCK, running=0, detected_at=9.99)
    assert h.missing() == [], "one placeholder per missing incident"
    [record] = h.core.made(make, (42, 1), "mode 0660, owner 0:0, inode 42", 1.5)
    assert record.kind is RecordKind.ACTION
    assert record.fields["ACTION"] == ACTION
    assert record.fields["OUTCOME"] == "done"
    assert record.fields["PATH"] == SOCK
    assert record.fields["ELAPSED_MS"] == 1.5


def test_both_paths_each_get_one() -> None:
    h = Harness()
    h.unit("failed", "failed")
    made = of(h.missing(SOCK) + h.missing(TTRPC), MakePlaceholder)
    assert [m.path for m in made] == [SOCK, TTRPC]


def test_missing_while_containerd_runs_places_at_once_and_reports() -> None:
    h = Harness()
    h.unit("active", "running", pid=123)  # READY=1 came after both binds: this is no start's gap
    [make] = h.missing()
    assert make == MakePlaceholder(SOCK, running=123, detected_at=9.99)
    records = h.core.made(make, (7, 1), "inode 7", 100.0)
    assert reports(records, OUTCOME="done")
    [later] = of(records, Later)  # said once the grace shows it was no stop D-Bus had not told yet
    [fault] = reports(later.then(NOW), OUTCOME="socket-unlinked")
    assert fault.kind is RecordKind.DETECTED
    assert "serves only the connections already open" in fault.message


def test_a_stop_that_d_bus_says_late_is_no_unlinked_socket() -> None:
    h = Harness()
    h.unit("active", "running", pid=123)  # containerd's stop unlinked its socket; D-Bus is late
    [make] = h.missing()
    [later] = of(h.core.made(make, (7, 1), "", 1.0), Later)
    h.unit("deactivating", "stop-sigterm", pid=123)
    assert later.then(NOW) == []
    h.unit("active", "running", pid=124)  # or it has restarted meanwhile: another process
    assert later.then(NOW) == []


def test_while_containerd_starts_the_core_keeps_waiting_then_places() -> None:
    h = Harness()
    h.unit("activating", "start", pid=5)
    [later] = h.missing()
    [again] = later.then(NOW)
    assert isinstance(again, Later), "still starting: never inside its unlink-to-bind gap"
    h.unit("failed", "failed")  # its start failed before it bound: the path stays missing
    [make] = again.then(NOW)
    assert make == MakePlaceholder(SOCK, running=0, detected_at=9.99)


def test_containerds_own_bind_within_the_grace_makes_nothing() -> None:
    h = Harness()
    h.unit("activating", "start", pid=123)  # containerd starting: its unlink, then its bind
    [later] = h.missing()
    assert isinstance(later, Later)
    assert later.delay == pytest.approx(0.1)
    h.socket(inode=99)
    assert later.then(NOW) == []


def test_our_placeholder_vanishing_is_containerds_start_the_grace_applies() -> None:
    h = Harness()
    h.unit("activating", "auto-restart")
    [make] = h.missing()
    h.core.made(make, (42, 1), "", 1.0)
    assert h.socket(inode=42) == []  # inotify sees our placeholder
    # D-Bus has not said yet that containerd starts; our placeholder is gone: its unlink
    assert of(h.missing(), Later)
    [replaced] = h.socket(inode=99)
    assert replaced.fields["OUTCOME"] == "replaced"
    assert replaced.kind is RecordKind.OUTCOME
    assert "bound its own" in replaced.message
    assert h.socket(inode=99) == [], "said once"


def test_the_placeholder_seen_again_is_no_replacement() -> None:
    h = Harness()
    h.unit("inactive", "dead")
    [make] = h.missing()
    h.core.made(make, (42, 1), "", 1.0)
    assert h.socket(inode=42) == []


def test_observe_mode_says_what_it_would_do_and_makes_nothing() -> None:
    for h in (Harness(mode="observe"), Harness(mode="enforce", daemon_mode="observe")):
        h.unit("activating", "auto-restart")
        effects = h.missing()
        assert not of(effects, MakePlaceholder)
        [would] = reports(effects, OUTCOME="would-do")
        assert would.fields["MODE"] == "observe"
        assert would.kind is RecordKind.DECIDED
        assert h.missing() == [], "said once per incident"
        h.socket(inode=5)
        assert reports(h.missing(), OUTCOME="would-do"), "a new incident is said again"


def test_off_does_nothing() -> None:
    h = Harness(mode="off")
    h.unit("inactive", "dead")
    assert h.missing() == []


def test_something_appearing_meanwhile_is_left_alone() -> None:
    h = Harness()
    h.unit("inactive", "dead")
    [make] = h.missing()
    [record] = h.core.not_made(make, "skipped", "something appeared there meanwhile: left alone")
    assert record.kind is RecordKind.ACTION
    assert record.fields["OUTCOME"] == "skipped"
    assert h.core.placed == {}
    # what appeared (a directory, say) is the directory rule's, not replaced by a placeholder
    assert h.feed(PathChanged(SOCK, PathKind.DIRECTORY, at=10.0, inode=3)) == []


def test_a_path_that_came_back_before_the_grace_ended_is_left_alone() -> None:
    h = Harness()
    h.unit("activating", "start", pid=1)
    [later] = h.missing()
    h.feed(PathChanged(SOCK, PathKind.SYMLINK, at=10.0, inode=8))
    assert later.then(NOW) == []


def test_unwatched_paths_are_ignored() -> None:
    h = Harness()
    h.unit("inactive", "dead")
    assert h.missing("/run/other.sock") == []


def test_the_policy_turns_it_on_and_off_and_watches_its_paths() -> None:
    off = parse_policy_text("")
    assert off.placeholder.mode == "off"
    assert SOCK not in off.watched_paths()
    on = parse_policy_text('[placeholder]\nmode = "enforce"\n')
    assert on.placeholder.mode == "enforce"
    assert {SOCK, TTRPC} <= set(on.watched_paths())
    assert {SOCK, TTRPC} <= on.served()["inotify"]


def test_a_new_ctime_on_our_inode_is_not_said_to_be_containerds_socket() -> None:
    h = Harness()
    h.unit("inactive", "dead")
    [make] = h.missing()
    h.core.made(make, (42, 1), "", 1.0)
    [changed] = h.socket(inode=42, ctime=2)  # a chmod/chown (IN_ATTRIB), or ext4 reusing the number
    assert changed.fields["OUTCOME"] == "replaced"  # inotify coalesces unlink+bind: no telling
    assert "chmod or chown" in changed.message
    assert "bound its own" not in changed.message, "not said to be containerd's own socket"


def test_records_carry_the_placeholder_rule_for_status_and_metrics() -> None:
    h = Harness()
    h.unit("active", "running", pid=3)
    [make] = h.missing()
    records = h.core.made(make, (9, 1), "", 2.0)
    records += of(records, Later)[0].then(NOW)
    assert {r.fields["RULE"] for r in of(records, Report)} == {"placeholder"}
    [fault] = reports(records, OUTCOME="socket-unlinked")
    assert fault.fields["ELAPSED_MS"] == 2.0


def test_the_owner_is_containerds_from_its_config(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    assert socket_owner(str(config), SOCK) == (0, 0), "no config: 0:0"
    config.write_text("version = 2\n[grpc]\nuid = 10\ngid = 20\n")
    assert socket_owner(str(config), SOCK) == (10, 20)
    assert socket_owner(str(config), TTRPC) == (10, 20), "ttrpc takes [grpc]'s without its own address"
    config.write_text('[grpc]\ngid = 20\n[ttrpc]\naddress = "/run/x.ttrpc"\ngid = 30\n')
    assert socket_owner(str(config), TTRPC) == (0, 30)
    config.write_text("[grpc\nuid = ")
    assert socket_owner(str(config), SOCK) == (0, 0), "a config containerd would refuse: 0:0"
    config.write_text('[grpc]\nuid = -1\ngid = "x"\n')
    assert socket_owner(str(config), SOCK) == (0, 0)


def test_a_mode_now_in_effect_decides_again_for_the_paths_already_missing() -> None:
    """Observe said "would make" and holds the path decided; enforce by a reload (or `nodemedic
    mode`) gets no new inotify event for it (the path did not change): it decides again at once."""
    h = Harness(mode="observe")
    h.unit("inactive", "dead")
    assert reports(h.missing(SOCK) + h.missing(TTRPC), OUTCOME="would-do")
    enforce = PlaceholderSettings(mode="enforce")
    made = h.core.replace(enforce, "enforce", NOW)
    assert [m.path for m in of(made, MakePlaceholder)] == [SOCK, TTRPC]
    assert of(made, MakePlaceholder)[0].detected_at == NOW.monotonic
    assert h.core.replace(enforce, "enforce", NOW) == [], "the same mode again: nothing new"


def test_turned_on_where_another_rule_watches_the_path_already_missing() -> None:
    h = Harness(mode="off")
    h.unit("failed", "failed")
    assert h.missing() == []  # the socket-directory rule's watch: the view knows the path missing
    [make] = h.core.replace(PlaceholderSettings(mode="enforce"), "enforce", NOW)
    assert make == MakePlaceholder(SOCK, running=0, detected_at=NOW.monotonic)
    h.core.made(make, (42, 1), "", 1.0)
    h.socket(inode=42)
    assert h.core.replace(PlaceholderSettings(mode="off"), "enforce", NOW) == []
    assert h.core.replace(PlaceholderSettings(mode="enforce"), "enforce", NOW) == [], "not missing"
    h.unit("activating", "start", pid=9)
    h.feed(PathChanged(SOCK, PathKind.MISSING, at=11.0))  # while off: unseen by the core
    [later] = h.core.replace(PlaceholderSettings(mode="enforce"), "observe", NOW)
    assert isinstance(later, Later), "containerd starting: the grace applies as to an event"


def test_a_placeholder_replaced_before_our_last_look_is_not_taken_for_ours() -> None:
    h = Harness()
    h.unit("inactive", "dead")
    [make] = h.missing()
    [record] = h.core.made(make, (42, 1), "inode 42", 1.0, replaced="a socket (inode 43)")
    assert record.fields["OUTCOME"] == "done"
    assert "already replaced by a socket (inode 43)" in record.message
    assert h.core.placed == {}, "containerd's socket is never ours"
    assert h.socket(inode=43) == []


def test_a_failure_is_tried_again_with_a_backoff_a_bounded_number_of_times() -> None:
    h = Harness()
    h.unit("inactive", "dead")
    [make] = h.missing()
    delays = []
    for _ in range(len(RETRY_AFTER)):
        [record, later] = h.core.not_made(make, "failed", "OSError: [Errno 28] No space left on device")
        assert record.kind is RecordKind.ERROR
        assert "tried again in" in record.message
        assert isinstance(later, Later)
        delays.append(later.delay)
        [make] = later.then(NOW)
        assert make == MakePlaceholder(SOCK, running=0, detected_at=9.99)
    assert delays == sorted(delays), "a backoff"
    assert delays[0] < delays[-1]
    [record] = h.core.not_made(make, "failed", "OSError: again")
    assert "given up" in record.message
    assert h.missing() == [], "given up for this incident"
    h.socket(inode=5)  # the path came back: the next vanishing is a new incident, tried afresh
    [make] = h.missing()
    assert of(h.core.not_made(make, "failed", "OSError"), Later)


def test_a_retry_finds_the_path_back_or_the_feature_off_and_does_nothing() -> None:
    h = Harness()
    h.unit("inactive", "dead")
    [make] = h.missing()
    [_, later] = h.core.not_made(make, "failed", "OSError")
    h.socket(inode=5)
    assert later.then(NOW) == []
    [make] = h.missing()
    [_, later] = h.core.not_made(make, "failed", "OSError")
    h.core.replace(PlaceholderSettings(mode="off"), "enforce", NOW)
    assert later.then(NOW) == []
    assert not of(h.core.not_made(make, "skipped", "something appeared"), Later)
    assert not of(h.core.not_made(make, "refused", "a symlink"), Later), "only a failure is tried again"


def test_the_records_of_a_missing_path_while_containerd_is_active_are_worded_neutrally() -> None:
    """At a stop whose D-Bus word comes late the path is missing with containerd still "active":
    the done and would-do records must not claim its socket was unlinked under it."""
    for h in (Harness(), Harness(mode="observe")):
        h.unit("active", "running", pid=3)
        effects = h.missing()
        for make in of(effects, MakePlaceholder):
            effects += h.core.made(make, (9, 1), "", 1.0)
        [record] = of(effects, Report)
        assert "unlinked" not in record.message
        assert "containerd.service" in record.message
