"""Micro-benchmark: CPU per journal line, through the real reader on a real journal file.

No lab node: a journal file of ``--lines`` containerd lines (logrus lines that match no rule, with
the fields journald gives a unit's stdout) is written with systemd-journal-remote, and nodemedic's
journal source, as build_app wires it with the shipped policy (observe mode), reads it from its
first entry while the daemon's dispatch hands every event to the executor. One line in the middle
matches the containerd-hung rule's journal trigger (a containerd timeout): the bench checks that it
reaches the rules (the rule itself waits for D-Bus's word that containerd is active: none here).
The CPU time is the process's (utime + stime), from the first entry read to the last.

    .venv/bin/python bench/journal_lines.py --lines 100000

Against another checkout (its src/ first on the path), e.g. the code before the change:

    PYTHONPATH=/work/main/src .venv/bin/python bench/journal_lines.py --lines 100000
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.component.journal_writer import JOURNAL_REMOTE, containerd_says, export_format

import nodemedic
from nodemedic.app import CURSOR_FILE, build_app
from nodemedic.policy.load import load_policy
from nodemedic.policy.match import match
from nodemedic.report import MemorySink, Reporter

REPO = Path(__file__).resolve().parent.parent
POLICY = REPO / "policy" / "policy.toml"
FLOOD = (
    'time="2026-12-02T14:00:00.{n:09d}Z" level=info msg="loading plugin \\"io.containerd.snapshotter.v1'
    '.overlayfs\\"..." type=io.containerd.snapshotter.v1 n={n}'
)
# containerd-hung's journal trigger (tests/samples/containerd-hung.match.txt)
MATCHING = (
    'time="2026-11-23T01:02:54.985572671Z" level=error msg="failed to handle container TaskExit event" '
    'error="failed to stop container: context deadline exceeded"'
)
# What journald adds to a line of a unit's stdout (systemd 252), so entries are of a real size.
TRUSTED = {
    "_UID": "0",
    "_GID": "0",
    "_EXE": "/usr/bin/containerd",
    "_CMDLINE": "/usr/bin/containerd",
    "_CAP_EFFECTIVE": "1ffffffffff",
    "_SYSTEMD_CGROUP": "/system.slice/containerd.service",
    "_SYSTEMD_SLICE": "system.slice",
    "_SYSTEMD_INVOCATION_ID": "5f6e4b8a1c2d4e0f9a8b7c6d5e4f3a2b",
    "_MACHINE_ID": "0d1e2f3a4b5c6d7e8f9a0b1c2d3e4f5a",
    "_HOSTNAME": "node",
    "_STREAM_ID": "a1b2c3d4e5f60718293a4b5c6d7e8f90",
    "SYSLOG_FACILITY": "3",
}


class Answers:
    """containerd answering the probe."""

    async def version(self, socket: str, timeout: float) -> str:
        return "1.6.20"


def write_journal(directory: Path, lines: int) -> None:
    """``lines`` entries, fed to systemd-journal-remote in chunks (the bench's RSS stays its own)."""
    start = time.time_ns() // 1000 - lines
    remote = subprocess.Popen(
        [str(JOURNAL_REMOTE), f"--output={directory / 'remote.journal'}", "-"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    if remote.stdin is None:
        raise SystemExit("no pipe to systemd-journal-remote")
    for chunk in range(0, lines, 10_000):
        texts = [
            MATCHING if n == lines // 2 else FLOOD.format(n=n)
            for n in range(chunk, min(lines, chunk + 10_000))
        ]
        entries = [{**containerd_says(text), **TRUSTED} for text in texts]
        remote.stdin.write(export_format(entries, start + chunk))
    out, _ = remote.communicate()
    if f"writing {lines} entries".encode() not in out:
        raise SystemExit(f"systemd-journal-remote did not write {lines} entries: {out!r}")


def first_and_last_cursor(directory: Path) -> tuple[str, str]:
    from systemd import journal

    reader = journal.Reader(path=str(directory))
    reader.seek_head()
    first = reader.get_next()["__CURSOR"]
    reader.seek_tail()
    last = reader.get_previous()["__CURSOR"]
    reader.close()
    return first, last


def rss_mb(field: str = "VmRSS") -> float:
    for line in Path("/proc/self/status").read_text(encoding="ascii").splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return 0.0


def cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def read_all(directory: Path, state: Path) -> tuple[float, float, list[str]]:
    """(CPU seconds, wall seconds) to read every entry after the first, and the messages of the
    events that fire a rule."""
    policy = load_policy(POLICY)
    daemon = policy.daemon.model_copy(update={"state_dir": state, "mode": "observe"})
    policy = policy.model_copy(update={"daemon": daemon})
    first, last = first_and_last_cursor(directory)
    (state / CURSOR_FILE).write_text(first + "\n", encoding="utf-8")
    app = build_app(policy, Reporter(MemorySink()), journal_dir=str(directory), probe=Answers())
    firing: list[str] = []
    follower: Any = app.sources["journal"].__self__  # type: ignore[attr-defined]

    async def dispatch() -> None:  # as the daemon's
        while True:
            event = await app.events.get()
            app.executor.handle(event)
            if match(app.executor.policy.rule, event):
                firing.append(getattr(event, "message", ""))
            for observe in app.observers:
                observe(event)

    loop = asyncio.get_running_loop()
    c0, t0 = cpu(), time.perf_counter()
    tasks = [loop.create_task(app.sources["journal"]()), loop.create_task(dispatch())]
    while follower._cursor != last or not app.events.empty():  # noqa: ASYNC110 (no event to wait for)
        await asyncio.sleep(0.01)
    c1, t1 = cpu(), time.perf_counter()
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    return c1 - c0, t1 - t0, firing


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--lines", type=int, default=100_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="nodemedic-bench-") as tmp:
        journal_dir, state = Path(tmp) / "journal", Path(tmp) / "state"
        journal_dir.mkdir()
        state.mkdir()
        write_journal(journal_dir, args.lines)
        with open("/proc/loadavg", encoding="ascii") as f:
            load = f.read().split()[:3]
        rss = rss_mb()
        spent, wall, seen = asyncio.run(read_all(journal_dir, state))
    read = args.lines - 1  # the first entry is the cursor's: handled "before"
    print(f"\njournal lines through the journal source and the executor ({nodemedic.__file__})")
    print(f"{'lines read':<44} {read}")
    print(f"{'CPU (utime+stime)':<44} {spent:.3f} s   wall {wall:.3f} s")
    print(f"{'per line':<44} {spent / read * 1e6:.2f} us")
    print(f"{'lines per second per core':<44} {read / spent:,.0f}")
    print(f"{'RSS before / after the reading':<44} {rss:.1f} / {rss_mb():.1f} MB")
    print(f"{'the matching line in the middle':<44} {'seen: ' + seen[0] if seen else 'NOT SEEN'}")
    print(f"{'load (1, 5, 15 min) at the start':<44} {' '.join(load)}")
    print(f"\nreproduce: .venv/bin/python bench/journal_lines.py --lines {args.lines}")
    return 0 if seen else 1


if __name__ == "__main__":
    raise SystemExit(main())
