"""TraceSignals on the host's real tracefs, with real processes in real cgroups.

A stand-in "containerd" (a copy of sleep, or python for the self-raised signal) runs in a cgroup
``nodemedic-test-<pid>/containerd.service`` and a sender in ``.../sender.service``; the sender
kill(2)s it. Needs root and tracefs (mounted here if it is not); skipped otherwise. Each test uses
its own trace instance name, removed by the source itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest

from nodemedic.clock import MonotonicClock
from nodemedic.events import Event, SignalSeen, UnitChanged
from nodemedic.sources.tracefs import EVENT, TraceSignals, event_filter

pytestmark = pytest.mark.component

TRACEFS = Path("/sys/kernel/tracing")
CGROUP_ROOT = Path("/sys/fs/cgroup")
UNIT = "containerd.service"


def _tracefs_or_skip() -> Path:
    if os.geteuid() != 0:
        pytest.skip("the tracefs component tests need root (tracefs instances, cgroups)")
    if not (TRACEFS / "instances").is_dir():
        mounted = subprocess.run(["mount", "-t", "tracefs", "tracefs", str(TRACEFS)],
                                 capture_output=True, text=True, check=False, timeout=10)  # fmt: skip
        if mounted.returncode != 0:
            pytest.skip(f"tracefs is not mounted at {TRACEFS} and cannot be: {mounted.stderr.strip()}")
    if not (TRACEFS / EVENT).is_dir():
        pytest.skip(f"this kernel has no {EVENT} trace event")
    return TRACEFS


def _hierarchies() -> list[Path]:
    """Where a process's cgroup is set: cgroup2 (pure, or `unified` on a hybrid host) and the
    named systemd hierarchy of a hybrid host."""
    found = [h for h in (CGROUP_ROOT / "unified", CGROUP_ROOT / "systemd") if (h / "cgroup.procs").exists()]
    if not found and (CGROUP_ROOT / "cgroup.procs").exists():
        found = [CGROUP_ROOT]
    return found


class Cgroups:
    """``nodemedic-test-<pid>.slice/<name>`` folders in every hierarchy; removed at the end. A
    slice, as systemd places a service (``/system.slice/containerd.service``): only a unit's own
    cgroup right under slices counts as the unit's (procview.is_unit_cgroup)."""

    def __init__(self) -> None:
        self.top = f"nodemedic-test-{os.getpid()}.slice"
        self.hierarchies = _hierarchies()
        if not self.hierarchies:
            pytest.skip("no writable cgroup hierarchy found under /sys/fs/cgroup")
        self.made: list[Path] = []

    def path(self, name: str) -> str:
        """The cgroup as /proc/PID/cgroup shows it (we run at the root of our cgroup namespace)."""
        return f"/{self.top}/{name}"

    def join_script(self, name: str) -> str:
        """Shell that moves the shell itself into ``name`` in every hierarchy."""
        script = ""
        for hierarchy in self.hierarchies:
            folder = hierarchy / self.top / name
            if folder not in self.made:
                folder.mkdir(parents=True, exist_ok=True)
                self.made.append(folder)
            script += f"echo $$ > {folder / 'cgroup.procs'} && "
        return script

    def remove(self) -> None:
        for folder in self.made:  # what the test left (a sender's sleep): cgroup2 kills it all
            kill = folder / "cgroup.kill"
            if kill.exists():
                kill.write_text("1")
        for folder in [*self.made, *{f.parent for f in self.made}]:
            deadline = time.monotonic() + 5
            while folder.exists():
                try:
                    folder.rmdir()
                except OSError:  # EBUSY while a killed process is still exiting
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.05)


class World:
    """Processes started in cgroups; all killed at the end."""

    def __init__(self, tmp: Path, cgroups: Cgroups) -> None:
        self.tmp = tmp
        self.cgroups = cgroups
        self.procs: list[asyncio.subprocess.Process] = []

    async def start(self, name: str, *argv: str) -> asyncio.subprocess.Process:
        script = self.cgroups.join_script(name) + 'exec "$@"'
        proc = await asyncio.create_subprocess_exec("/bin/sh", "-c", script, "sh", *argv)
        self.procs.append(proc)
        await wait_until(lambda: _comm(proc.pid) == Path(argv[0]).name[:15], "the process to exec")
        return proc

    async def containerd(self) -> asyncio.subprocess.Process:
        """A stand-in containerd: a copy of sleep named containerd, in .../containerd.service."""
        binary = self.tmp / "containerd"
        if not binary.exists():
            shutil.copy("/bin/sleep", binary)
        return await self.start(UNIT, str(binary), "60")

    async def send(self, sig: int, pid: int) -> float:
        """A sender (sh's builtin kill) in .../sender.service; it stays alive a while, so its
        cgroup can be read. Returns the monotonic time just before it was started."""
        sent = time.monotonic()
        script = self.cgroups.join_script("sender.service") + f"kill -{int(sig)} {pid} && sleep 3"
        self.procs.append(await asyncio.create_subprocess_exec("/bin/sh", "-c", script))
        return sent

    async def close(self) -> None:
        for proc in self.procs:
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


async def wait_until(probe: Callable[[], object], what: str, timeout: float = 5) -> None:
    deadline = time.monotonic() + timeout
    while not probe():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


class Source:
    """A running TraceSignals with its events and states."""

    def __init__(self, tracefs: Path, instance: str) -> None:
        self.events: list[Event] = []
        self.states: list[str] = []
        self.instance = tracefs / "instances" / instance
        self.trace = TraceSignals(tracefs=tracefs, proc=Path("/proc"), unit=UNIT, emit=self.events.append,
                                  clock=MonotonicClock(), on_state=self.states.append,
                                  main_pid=lambda: 0, instance=instance)  # fmt: skip
        self.task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self.task = asyncio.create_task(self.trace.run())
        # ready once the instance is enabled and trace_pipe is open (rmdir would then be EBUSY)
        await wait_until(lambda: self.states or self._enabled(), "the trace instance")
        await asyncio.sleep(0.05)

    def _enabled(self) -> bool:
        try:
            return (self.instance / EVENT / "enable").read_text().strip() == "1"
        except OSError:
            return False

    def seen(self) -> list[SignalSeen]:
        return [e for e in self.events if isinstance(e, SignalSeen)]

    async def stop(self) -> None:
        if self.task is not None and not self.task.done():
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task


@pytest.fixture
def tracefs() -> Path:
    return _tracefs_or_skip()


@pytest.fixture
def cgroups(tracefs: Path) -> Iterator[Cgroups]:
    made = Cgroups()
    try:
        yield made
    finally:
        made.remove()


@pytest.fixture
async def world(tmp_path: Path, cgroups: Cgroups) -> AsyncIterator[World]:
    made = World(tmp_path, cgroups)
    try:
        yield made
    finally:
        await made.close()


@pytest.fixture
async def source(tracefs: Path, request: pytest.FixtureRequest) -> AsyncIterator[Source]:
    running = Source(tracefs, f"nodemedic-test-{os.getpid()}-{request.node.name[:40]}")
    try:
        yield running
    finally:
        await running.stop()
        assert not running.instance.exists(), "the trace instance was left behind"


async def test_a_sighup_names_its_sender(world: World, source: Source, cgroups: Cgroups) -> None:
    target = await world.containerd()
    await source.start()
    source.trace.handle(UnitChanged(UNIT, "active", "running", main_pid=target.pid))
    sent = await world.send(signal.SIGHUP, target.pid)
    await wait_until(source.seen, "a SignalSeen")
    assert await target.wait() == -signal.SIGHUP  # it died of it, before or after the line was read
    (seen,) = source.seen()
    assert seen.source == "tracefs"
    assert (seen.signal, seen.target_pid, seen.unit, seen.target_comm) == (1, target.pid, UNIT, "containerd")
    assert seen.sender_comm == "sh"
    assert seen.sender_pid == world.procs[-1].pid
    assert seen.sender_cgroup == cgroups.path("sender.service")
    assert (seen.sender_unit, seen.sender_pod, seen.result) == ("sender.service", "", 0)
    latency = seen.at - sent
    print(f"kill -> SignalSeen: {latency * 1000:.1f} ms (includes starting the sender shell)")
    assert latency < 2


async def test_a_sighup_before_any_unit_change_is_found_live(world: World, source: Source) -> None:
    target = await world.containerd()
    await source.start()  # containerd is found at start, by name and cgroup
    await world.send(signal.SIGHUP, target.pid)
    await wait_until(source.seen, "a SignalSeen")
    assert [e.target_pid for e in source.seen()] == [target.pid]


async def test_sigterm_and_self_raised_signals_give_nothing(world: World, source: Source) -> None:
    target = await world.containerd()
    await source.start()
    source.trace.handle(UnitChanged(UNIT, "active", "running", main_pid=target.pid))
    await world.send(signal.SIGTERM, target.pid)
    assert await target.wait() == -signal.SIGTERM
    # What Go's runtime does after a SIGHUP (tgkill: code -6), and a plain kill(getpid(), SIGHUP)
    python = world.tmp / "py" / "containerd"
    python.parent.mkdir()
    python.symlink_to(sys.executable)
    for raise_it in ("signal.pthread_kill(threading.main_thread().ident, signal.SIGHUP)",
                     "os.kill(os.getpid(), signal.SIGHUP)"):  # fmt: skip
        code = f"import os, signal, threading, time; time.sleep(0.3); {raise_it}; time.sleep(5)"
        raiser = await world.start(UNIT, str(python), "-c", code)
        source.trace.handle(UnitChanged(UNIT, "active", "running", main_pid=raiser.pid))
        assert await asyncio.wait_for(raiser.wait(), 10) == -signal.SIGHUP
    await asyncio.sleep(0.3)
    assert source.seen() == []


async def test_a_signal_to_a_containerd_in_another_unit_gives_nothing(
    world: World, source: Source, tmp_path: Path
) -> None:
    binary = tmp_path / "containerd"
    shutil.copy("/bin/sleep", binary)
    other = await world.start("other.service", str(binary), "60")
    await source.start()
    await world.send(signal.SIGHUP, other.pid)
    assert await other.wait() == -signal.SIGHUP
    await asyncio.sleep(0.3)
    assert source.seen() == []


async def test_a_stale_instance_is_replaced(tracefs: Path, source: Source) -> None:
    source.instance.mkdir()
    (source.instance / EVENT / "enable").write_text("1\n")
    await source.start()
    assert source.states == []
    assert (source.instance / EVENT / "filter").read_text().strip() == event_filter(1, "containerd")
    await source.stop()
    assert not source.instance.exists()


async def test_the_instance_is_removed_when_cancelled(source: Source) -> None:
    await source.start()
    assert source.instance.is_dir()
    await source.stop()
    assert not source.instance.exists()
    assert source.task is not None
    assert source.task.cancelled()


async def test_a_missing_tracefs_is_reported(tmp_path: Path) -> None:
    states: list[str] = []
    trace = TraceSignals(tracefs=tmp_path, proc=Path("/proc"), unit=UNIT, emit=lambda e: None,
                         clock=MonotonicClock(), on_state=states.append, main_pid=lambda: 0,
                         instance="x")  # fmt: skip
    await asyncio.wait_for(trace.run(), 5)
    assert len(states) == 1
    assert "not mounted" in states[0]


@pytest.fixture
def readonly_tracefs(tracefs: Path, tmp_path: Path) -> Iterator[Path]:
    """The host's tracefs bound read-only (what a unit with ProtectKernelTunables= and no
    ReadWritePaths= for it sees)."""
    target = tmp_path / "tracing"
    target.mkdir()
    subprocess.run(["mount", "--bind", str(tracefs), str(target)], check=True, timeout=10)
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", str(target)], check=True, timeout=10)
        yield target
    finally:
        subprocess.run(["umount", str(target)], check=True, timeout=10)


async def test_a_readonly_tracefs_is_reported(readonly_tracefs: Path) -> None:
    states: list[str] = []
    name = f"nodemedic-test-{os.getpid()}-ro"
    trace = TraceSignals(tracefs=readonly_tracefs, proc=Path("/proc"), unit=UNIT, emit=lambda e: None,
                         clock=MonotonicClock(), on_state=states.append, main_pid=lambda: 0,
                         instance=name)  # fmt: skip
    await asyncio.wait_for(trace.run(), 5)
    (state,) = states
    assert "cannot create the trace instance" in state
    assert "Read-only file system" in state
    assert "will not be known" in state
    assert not (TRACEFS / "instances" / name).exists()
