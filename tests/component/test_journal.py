"""JournalFollower on real journal files written by systemd-journal-remote."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from systemd import journal as systemd_journal

from nodemedic.clock import MonotonicClock
from nodemedic.events import JournalLine
from nodemedic.policy.load import load_policy
from nodemedic.policy.match import journal_filter
from nodemedic.sources.journal import DATA_THRESHOLD, KERNEL, MESSAGE_LIMIT, JournalFollower, add_matches

from .helpers import Recorder, running
from .journal_writer import CONTAINERD, JournalWriter, containerd_says, kubelet_says, systemd_says

pytestmark = pytest.mark.component
SHIPPED = Path(__file__).parents[2] / "policy" / "policy.toml"

# Exact texts (domain.md): what containerd 1.6.20 and systemd logged in the lab.
IS_A_DIRECTORY = "containerd: failed to get listener for main endpoint: is a directory"
MAIN_EXITED = "containerd.service: Main process exited, code=exited, status=1/FAILURE"
SCHEDULED = "containerd.service: Scheduled restart job, restart counter is at 3."
BAD_TOML = (
    "containerd: failed to load TOML: /etc/containerd/config.toml: (242, 2): "
    "unexpected token unclosed table key, was expecting a table key"
)
LEFT_OVER = "Found left-over process 68 (containerd-shim) in control group while starting unit. Ignoring."
TTRPC_CLOSED = "ttrpc: closed"


@pytest.fixture
def journal_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "journal"
    directory.mkdir()
    return directory


@pytest.fixture
def cursor_file(tmp_path: Path) -> Path:
    return tmp_path / "state" / "journal.cursor"


@pytest.fixture
async def journal(journal_dir: Path) -> JournalWriter:
    """A journal with history: containerd had been logging before nodemedic started."""
    writer = JournalWriter(journal_dir)
    await writer.write(containerd_says("old: starting containerd"), systemd_says("old: Started containerd"))
    return writer


@asynccontextmanager
async def following(journal_dir: Path, cursor_file: Path | None) -> AsyncIterator[Recorder]:
    events = Recorder()
    follower = JournalFollower(
        [CONTAINERD], events.emit, MonotonicClock(), cursor_file=cursor_file, journal_dir=str(journal_dir)
    )
    async with running(events, follower.run()):
        # run() opens the journal, seeks and adds its reader in its first step, before it first
        # awaits: one turn of the loop and the follower is in place.
        await asyncio.sleep(0)
        yield events


async def line(events: Recorder) -> JournalLine:
    event = await events.next()
    assert isinstance(event, JournalLine), event
    return event


async def test_starts_at_the_end_without_a_cursor(
    journal: JournalWriter, journal_dir: Path, cursor_file: Path
) -> None:
    async with following(journal_dir, cursor_file) as events:
        await journal.write(containerd_says(IS_A_DIRECTORY))

        first = await line(events)

    assert first.message == IS_A_DIRECTORY  # not "old: ..."
    assert events.pending() == []


async def test_new_entries_of_the_unit_are_emitted(
    journal: JournalWriter, journal_dir: Path, cursor_file: Path
) -> None:
    async with following(journal_dir, cursor_file) as events:
        await journal.write(containerd_says(IS_A_DIRECTORY, pid=2345))
        own = await line(events)
        await journal.write(
            systemd_says(MAIN_EXITED),
            kubelet_says('"Error getting node" err="node not found"'),
            systemd_says("kubelet.service: Deactivated successfully.", "kubelet.service"),
            systemd_says(SCHEDULED),
        )
        about = await line(events)
        scheduled = await line(events)
        await journal.write(containerd_says(TTRPC_CLOSED))
        last = await line(events)

    assert (own.unit, own.message, own.identifier) == (CONTAINERD, IS_A_DIRECTORY, "containerd")
    assert own.pid == 2345
    assert own.source == "journal"
    assert own.cursor
    assert (about.unit, about.message, about.identifier, about.pid) == (CONTAINERD, MAIN_EXITED, "systemd", 1)
    assert scheduled.message == SCHEDULED
    assert last.message == TTRPC_CLOSED
    assert len({own.cursor, about.cursor, scheduled.cursor, last.cursor}) == 4
    assert events.pending() == []


async def test_entries_in_a_new_journal_file_are_emitted(
    journal: JournalWriter, journal_dir: Path, cursor_file: Path
) -> None:
    """journald rotates: the active file is archived under a new name and a new one started."""
    async with following(journal_dir, cursor_file) as events:
        await journal.write(containerd_says(BAD_TOML))
        assert (await line(events)).message == BAD_TOML

        (journal_dir / "remote.journal").rename(journal_dir / "remote@archived.journal")
        await journal.write(systemd_says(LEFT_OVER))
        assert (await line(events)).message == LEFT_OVER

        await journal.write(containerd_says(TTRPC_CLOSED), name="other.journal")
        assert (await line(events)).message == TTRPC_CLOSED


async def test_a_restart_resumes_after_the_saved_cursor(
    journal: JournalWriter, journal_dir: Path, cursor_file: Path
) -> None:
    async with following(journal_dir, cursor_file) as events:
        await journal.write(containerd_says("before 1"), systemd_says("before 2"))
        await line(events)
        handled = await line(events)
    assert cursor_file.read_text(encoding="utf-8").strip() == handled.cursor

    # nodemedic is down while containerd goes on logging
    await journal.write(containerd_says(IS_A_DIRECTORY), systemd_says(MAIN_EXITED))

    async with following(journal_dir, cursor_file) as events:
        await journal.write(systemd_says(SCHEDULED))
        got = [(await line(events)).message for _ in range(3)]

    assert got == [IS_A_DIRECTORY, MAIN_EXITED, SCHEDULED]  # no replay of "before 2", nothing missed
    assert events.pending() == []


async def test_a_cursor_whose_entry_was_vacuumed(
    journal: JournalWriter, journal_dir: Path, cursor_file: Path
) -> None:
    """The file holding the cursor's entry is gone (vacuumed) when nodemedic starts again."""
    async with following(journal_dir, cursor_file) as events:
        await journal.write(containerd_says("before"))
        await line(events)

    (journal_dir / "remote.journal").unlink()
    await journal.write(containerd_says(IS_A_DIRECTORY), systemd_says(MAIN_EXITED), name="new.journal")

    async with following(journal_dir, cursor_file) as events:
        await journal.write(systemd_says(SCHEDULED), name="new.journal")
        got = [(await line(events)).message for _ in range(3)]

    assert got == [IS_A_DIRECTORY, MAIN_EXITED, SCHEDULED]


async def test_an_unusable_cursor_starts_at_the_end(
    journal: JournalWriter, journal_dir: Path, cursor_file: Path
) -> None:
    cursor_file.parent.mkdir()
    cursor_file.write_text("not a cursor\n", encoding="utf-8")

    async with following(journal_dir, cursor_file) as events:
        await journal.write(containerd_says(IS_A_DIRECTORY))
        assert (await line(events)).message == IS_A_DIRECTORY
    assert events.pending() == []


async def test_strange_entries_do_not_stop_it(
    journal: JournalWriter, journal_dir: Path, cursor_file: Path
) -> None:
    async with following(journal_dir, cursor_file) as events:
        await journal.write(
            containerd_says(b"level=error msg=\xff\xfe\x00 not text"),
            {"_SYSTEMD_UNIT": CONTAINERD, "_PID": "2345"},  # no MESSAGE at all
            {**containerd_says("first"), "MESSAGE": ["first", "second"]},  # a repeated field
            {**containerd_says("no pid"), "_PID": "not-a-pid"},
            containerd_says("multi\nline"),
            containerd_says(IS_A_DIRECTORY),
        )
        got = [await line(events) for _ in range(6)]

    assert got[0].message == "level=error msg=\ufffd\ufffd\x00 not text"
    assert (got[1].message, got[1].unit, got[1].identifier) == ("", CONTAINERD, "")
    assert got[2].message == "first\nsecond"
    assert got[3].pid == 0
    assert got[4].message == "multi\nline"
    assert got[5].message == IS_A_DIRECTORY


async def test_a_journal_without_entries_of_the_unit_yet(journal_dir: Path, cursor_file: Path) -> None:
    """A fresh node: no journal file at start, then only other units' lines, then containerd's."""
    writer = JournalWriter(journal_dir)
    async with following(journal_dir, cursor_file) as events:
        await writer.write(kubelet_says("kubelet started"))
        await writer.write(containerd_says(IS_A_DIRECTORY))
        assert (await line(events)).message == IS_A_DIRECTORY


async def test_a_forged_unit_field_is_not_containerd(
    journal: JournalWriter, journal_dir: Path, cursor_file: Path
) -> None:
    """Any local client can send UNIT=containerd.service; only PID 1 (root) speaks for a unit so."""
    forged = {
        "MESSAGE": LEFT_OVER,
        "UNIT": CONTAINERD,
        "SYSLOG_IDENTIFIER": "systemd",
        "_PID": "4242",
        "_UID": "1000",
        "_SYSTEMD_UNIT": "user@1000.service",
        "_TRANSPORT": "journal",
    }
    async with following(journal_dir, cursor_file) as events:
        await journal.write(
            forged,
            {**forged, "_UID": "0", "_SYSTEMD_UNIT": "nodemedic.service"},  # root, but not PID 1
            {**forged, "_PID": "1"},  # PID 1 of a user namespace, not root there
            {**forged, "_TRANSPORT": "kernel", "_SYSTEMD_UNIT": ""},  # kernel lines are the kernel's
            systemd_says(LEFT_OVER),
        )
        got = await line(events)

    assert (got.unit, got.message, got.pid) == (CONTAINERD, LEFT_OVER, 1)
    assert events.pending() == []


async def test_a_forged_unit_field_is_not_even_read(journal: JournalWriter, journal_dir: Path) -> None:
    """The reader's matches take UNIT= only from PID 1 as root: a forged entry costs nothing."""
    forged = {**systemd_says("forged"), "_PID": "4242", "_SYSTEMD_UNIT": "user@1000.service"}
    await journal.write(
        forged,
        {**forged, "MESSAGE": "forged by root", "_UID": "0"},
        {**forged, "MESSAGE": "forged by pid 1 of a namespace", "_PID": "1", "_UID": "1000"},
        systemd_says("from systemd"),
        containerd_says("from containerd"),
        kubelet_says("from kubelet"),
    )
    reader = systemd_journal.Reader(path=str(journal_dir))
    try:
        add_matches(reader, [CONTAINERD])
        read = [entry["MESSAGE"] for entry in reader]
    finally:
        reader.close()
    assert read == ["old: starting containerd", "old: Started containerd", "from systemd", "from containerd"]


async def test_the_reader_hands_back_no_more_of_a_field_than_is_searched(journal_dir: Path) -> None:
    reader = JournalFollower(
        [CONTAINERD], Recorder().emit, MonotonicClock(), journal_dir=str(journal_dir)
    )._open()
    try:
        assert reader.data_threshold == DATA_THRESHOLD == 4 * MESSAGE_LIMIT
    finally:
        reader.close()


class StillClock(MonotonicClock):
    """A monotonic time that stands still: the cursor's once-a-second write never comes due."""

    def monotonic(self) -> float:
        return 5000.0


async def test_the_cursor_is_written_at_shutdown(
    journal: JournalWriter, journal_dir: Path, cursor_file: Path
) -> None:
    """Lines no rule wants move the cursor at most once a second; a shutdown writes where reading
    stopped, so the next start reads none of them again."""
    judged: list[bytes] = []

    def wanted(message: bytes) -> bool:
        judged.append(message)
        return message == b"wanted"

    events = Recorder()
    follower = JournalFollower(
        [CONTAINERD],
        events.emit,
        StillClock(),
        cursor_file=cursor_file,
        journal_dir=str(journal_dir),
        wanted=wanted,
    )
    async with running(events, follower.run()):
        await asyncio.sleep(0)
        await journal.write(containerd_says("wanted"))
        handled = await line(events)
        await journal.write(*(containerd_says(f"unwanted {n}") for n in range(5)))
        for _ in range(500):
            if b"unwanted 4" in judged:
                break
            await asyncio.sleep(0.01)
        assert cursor_file.read_text(encoding="utf-8").strip() == handled.cursor  # not yet moved
    assert cursor_file.read_text(encoding="utf-8").strip() != handled.cursor

    async with following(journal_dir, cursor_file) as events:  # every line, from the saved cursor
        await journal.write(containerd_says(IS_A_DIRECTORY))
        assert (await line(events)).message == IS_A_DIRECTORY  # no "unwanted ..." read again
    assert events.pending() == []


# ---- a flood: the policy's filter, bounded batches, skipping ahead (issue 14) ----------------------

FLOOD = 'time="2026-12-02T14:00:00Z" level=info msg="loading plugin" type=io.containerd.snapshotter.v1 n={}'


@asynccontextmanager
async def following_with(
    journal_dir: Path, cursor_file: Path | None, **options: Any
) -> AsyncIterator[Recorder]:
    events = Recorder()
    follower = JournalFollower(
        [CONTAINERD, KERNEL],
        events.emit,
        MonotonicClock(),
        cursor_file=cursor_file,
        journal_dir=str(journal_dir),
        **options,
    )
    async with running(events, follower.run()):
        await asyncio.sleep(0)
        yield events


async def test_only_lines_a_rule_may_want_become_events(
    journal: JournalWriter, journal_dir: Path, cursor_file: Path
) -> None:
    """With the shipped policy's filter the rules get the same JournalLine as without it, and
    nothing of the lines none of them looks for; the cursor is written at once after such a line."""
    wanted = journal_filter(load_policy(SHIPPED, check_owner=False).rule)
    async with following_with(journal_dir, cursor_file, wanted=wanted) as events:
        await journal.write(
            *(containerd_says(FLOOD.format(n)) for n in range(50)),
            systemd_says(MAIN_EXITED),
            kubelet_says(IS_A_DIRECTORY),
            containerd_says(IS_A_DIRECTORY, pid=2345),
        )
        got = await line(events)
        assert cursor_file.read_text(encoding="utf-8").strip() == got.cursor  # written at once
        await journal.write(containerd_says(b"\xff" + LEFT_OVER.encode()), systemd_says(LEFT_OVER))
        shim = await line(events)
        await asyncio.sleep(0.3)  # room for any line that should not come

    assert (got.unit, got.message, got.identifier, got.pid) == (
        CONTAINERD,
        IS_A_DIRECTORY,
        "containerd",
        2345,
    )
    assert (shim.unit, shim.message, shim.pid) == (CONTAINERD, LEFT_OVER, 1)
    assert events.pending() == []


async def test_a_flood_bigger_than_the_bound_is_skipped_once_and_said(
    journal: JournalWriter, journal_dir: Path, cursor_file: Path
) -> None:
    """nodemedic was behind (here: restarted after a flood) and does not catch up within the
    bound: it reads from the journal's end, says once how many entries it skipped, and the line
    after the flood is still seen. No more than a batch of lines is ever held."""
    async with following(journal_dir, cursor_file) as events:
        await journal.write(containerd_says("before"))
        await line(events)
    await journal.write(*(containerd_says(FLOOD.format(n)) for n in range(1000)))

    said: list[tuple[str, str]] = []
    options = {"batch": 10, "catch_up": 0.0, "on_skip": lambda m, d: said.append((m, d))}
    async with following_with(journal_dir, cursor_file, **options) as events:
        await asyncio.sleep(0.2)
        await journal.write(containerd_says(IS_A_DIRECTORY))
        last = await events.until(lambda e: isinstance(e, JournalLine) and e.message == IS_A_DIRECTORY)

    assert len(said) == 1
    message, detail = said[0]
    # two full batches read (20 lines), then the newest; the 979 between skipped
    assert "979 entries (of every unit) skipped" in message
    assert "after cursor" in detail
    flood = [e.message for e in events.seen if isinstance(e, JournalLine) and e.message.startswith("time=")]
    assert flood == [FLOOD.format(n) for n in [*range(20), 999]]
    assert isinstance(last, JournalLine)
    assert cursor_file.read_text(encoding="utf-8").strip() == last.cursor


async def test_a_flood_of_lines_rules_want_is_handed_on_a_batch_at_a_time(
    journal: JournalWriter, journal_dir: Path, cursor_file: Path
) -> None:
    """Every line arrives, in order; the events queue, drained as the daemon's dispatch does,
    never holds more than one batch."""
    queue: asyncio.Queue[Any] = asyncio.Queue()
    got: list[str] = []
    most = 0

    async def dispatch() -> None:
        nonlocal most
        while True:
            most = max(most, queue.qsize())
            got.append((await queue.get()).message)

    follower = JournalFollower(
        [CONTAINERD], queue.put_nowait, MonotonicClock(), journal_dir=str(journal_dir), batch=25
    )
    consumer = asyncio.create_task(dispatch())
    events = Recorder()
    async with running(events, follower.run()):
        await asyncio.sleep(0)
        await journal.write(*(containerd_says(FLOOD.format(n)) for n in range(500)))
        for _ in range(500):
            if len(got) == 500:
                break
            await asyncio.sleep(0.01)
    consumer.cancel()
    assert got == [FLOOD.format(n) for n in range(500)]
    assert 0 < most <= 25
