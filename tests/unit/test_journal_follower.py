"""JournalFollower's reading on a fake Reader and a fake clock: bounded batches, the behind-clock,
skipping ahead, and the private calls of systemd-python it relies on."""

from __future__ import annotations

from datetime import datetime, timezone

import pytest

from nodemedic.events import Event, JournalLine
from nodemedic.sources import journal
from nodemedic.sources.journal import CLOCK_EVERY, JournalFollower

from .fakes import FakeClock

pytestmark = pytest.mark.unit
CONTAINERD = "containerd.service"


class Reader:
    """systemd-python's Reader as the follower reads it: ``entries`` in order, ``seek_tail``."""

    def __init__(self, count: int = 0) -> None:
        self.entries: list[dict[str, object]] = []
        self.at = -1
        self.add(count)

    def add(self, count: int, message: str = "flood {}") -> None:
        for _ in range(count):
            n = len(self.entries)
            self.entries.append(
                {
                    "__CURSOR": f"s=ab;i={n + 1:x}",
                    "__REALTIME_TIMESTAMP": datetime.fromtimestamp(1_700_000_000, timezone.utc),
                    "MESSAGE": message.format(n),
                    "_SYSTEMD_UNIT": CONTAINERD,
                }
            )

    def _next(self) -> bool:
        if self.at + 1 >= len(self.entries):
            return False
        self.at += 1
        return True

    def _previous(self) -> bool:
        if self.at <= 0:
            return False
        self.at -= 1
        return True

    def seek_tail(self) -> None:
        self.at = len(self.entries)

    def _get(self, field: str) -> bytes:
        return str(self.entries[self.at][field]).encode()

    def _get_all(self) -> dict[str, object]:
        return dict(self.entries[self.at])

    def _convert_entry(self, entry: dict[str, object]) -> dict[str, object]:
        return entry

    def _get_cursor(self) -> str:
        return str(self.entries[self.at]["__CURSOR"]) if 0 <= self.at < len(self.entries) else ""

    def _get_realtime(self) -> int:
        stamp = self.entries[self.at]["__REALTIME_TIMESTAMP"]
        assert isinstance(stamp, datetime)
        return round(stamp.timestamp() * 1e6)


def messages(events: list[Event]) -> list[str]:
    return [e.message for e in events if isinstance(e, JournalLine)]


def a_turn(follower: JournalFollower, reader: Reader) -> None:
    """One turn of the follower's reading; the next turn it arms is the test's to make."""
    follower._read(reader)
    if follower._next_turn is not None:
        follower._next_turn.cancel()
        follower._next_turn = None


async def test_a_follower_that_caught_up_starts_its_behind_clock_afresh() -> None:
    """Behind twice, 9 s each time, with a catch-up in between: not 10 s behind, nothing skipped."""
    clock, said = FakeClock(), []
    follower = JournalFollower(
        [CONTAINERD], lambda e: None, clock, batch=2, catch_up=10, on_skip=lambda m, d: said.append(m)
    )
    reader = Reader(3)
    a_turn(follower, reader)  # a full batch: behind from now
    clock.advance(9)
    a_turn(follower, reader)  # the last entry: caught up
    reader.add(3)
    a_turn(follower, reader)  # behind again, from now
    clock.advance(9)
    reader.add(10)
    a_turn(follower, reader)
    assert said == []
    assert follower.skipped == 0
    clock.advance(1)
    a_turn(follower, reader)  # 10 s behind since the catch-up
    assert len(said) == 1


def test_a_batch_is_bounded_by_time_as_well() -> None:
    """Reading that takes long (a slow disk, a loaded node) is cut after about 20 ms."""
    follower = JournalFollower([CONTAINERD], lambda e: None, FakeClock(tick=0.001))
    reader = Reader(500)
    assert follower._drain(reader)  # cut: more may wait
    assert reader.at + 1 == CLOCK_EVERY  # the first look at the clock after 20 ms
    quick = JournalFollower([CONTAINERD], lambda e: None, FakeClock())
    assert not quick._drain(Reader(500))  # all of them in one batch, up to the end


@pytest.mark.parametrize(("newest", "seen"), [("marker 1", ["marker 1"]), ("flood", [])])
async def test_a_skip_reads_the_newest_entry_through_the_filter(newest: str, seen: list[str]) -> None:
    clock, events, said = FakeClock(), [], []
    follower = JournalFollower(
        [CONTAINERD],
        events.append,
        clock,
        batch=10,
        catch_up=0,
        wanted=lambda message: message.startswith(b"marker"),
        on_skip=lambda m, d: said.append(m),
    )
    reader = Reader(100)
    reader.add(1, newest)
    a_turn(follower, reader)  # behind
    a_turn(follower, reader)  # still behind: skips to the newest
    assert messages(events) == seen
    assert said == [
        "journal reading fell behind for 0 s; 80 entries (of every unit) skipped unread, "
        "reading goes on from the journal's end"
    ]
    assert follower.skipped == 80
    assert follower._cursor == "s=ab;i=65"  # the newest entry's: reading goes on after it
    a_turn(follower, reader)
    assert messages(events) == seen  # not read again


def test_the_private_reader_calls_it_relies_on_exist() -> None:
    """The follower reads one field, or one entry, with systemd-python's private methods (checked
    with 235); a version without one of them must be seen here, not as a daemon reading nothing."""
    from systemd import journal as systemd_journal

    needed = ["_next", "_previous", "_get", "_get_all", "_convert_entry", "_get_cursor", "_get_realtime"]
    missing = [name for name in needed if not callable(getattr(systemd_journal.Reader, name, None))]
    assert not missing, (
        f"systemd-python {getattr(systemd_journal, '__version__', '?')} has no Reader.{', '.join(missing)}: "
        "nodemedic.sources.journal reads entries with them (JournalFollower._drain, _skip, _searched)"
    )
    assert hasattr(systemd_journal.Reader, "data_threshold")
    assert journal.DATA_THRESHOLD == 4 * journal.MESSAGE_LIMIT
