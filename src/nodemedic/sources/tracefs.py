"""See every SIGHUP sent to containerd, and who sent it, in the kernel's trace (tracefs).

A dedicated trace instance ``<tracefs>/instances/<name>`` is created with only the
``signal/signal_generate`` event, filtered in the kernel to the signal, ``code == 0`` (SI_USER: a
kill(2) by another task; the Go runtime re-raises a fatal signal to itself with code -6, SI_TKILL,
which must not count) and the target's name. The target is filtered by *name*, not PID: a PID
filter would have to be rewritten after every containerd restart, and a SIGHUP in between (the
toolkit retries within seconds) would be missed. Which containerd was signalled (ours, or another
node's on the same kernel in the lab) is decided here, from the target's PID: it must be the main
process of ``unit`` in our namespaces.

The global trace instance is never touched; the instance is removed when ``run`` ends (also when it
is cancelled) and a stale one of the same name (a nodemedic that was killed) is replaced. Without a
usable tracefs ``on_state`` is told why and ``run`` returns: deaths by SIGHUP are still seen over
D-Bus, only the sender is unknown.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import signal as signals
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from nodemedic.events import Event, SignalSeen, UnitChanged
from nodemedic.ports import Clock
from nodemedic.procfs import ProcView, pod_of, unit_of

log = logging.getLogger(__name__)

EVENT = "events/signal/signal_generate"
MACHINE_ID = Path("/etc/machine-id")
BUFFER_KB = 64  # per CPU: a handful of filtered events between two reads, never a flood
KNOWN_TARGETS = 8  # containerd main processes remembered (a signal read after a restart still counts)
READ_SIZE = 65536

# ``<task comm>-<pid> [(<tgid>)] [<cpu>] [<flags>] <seconds>: signal_generate: sig=... res=...``
# The task comm may hold spaces and dashes (the PID follows the last dash); the target comm may
# hold spaces (anchored on the fields after it). Numbers are ASCII digits, at most 10 of them (the
# kernel prints 32-bit ints): what int() is given stays bounded, and a longer number drops the line.
_INT = r"-?[0-9]{1,10}"
_LINE = re.compile(
    rf"^\s*(?P<task>.*)-(?P<pid>[0-9]{{1,10}})\s+(?:\(\s*[0-9-]{{1,11}}\)\s+)?\[[0-9]{{1,10}}\]\s+"
    rf"(?:\S+\s+)?[0-9.]{{1,32}}:\s+signal_generate:\s+sig=(?P<sig>{_INT}) errno=(?P<errno>{_INT}) "
    rf"code=(?P<code>{_INT}) comm=(?P<comm>.*) pid=(?P<target>[0-9]{{1,10}}) grp=(?P<grp>{_INT}) "
    rf"res=(?P<res>{_INT})\s*$"
)
# A signal_generate line is under 200 characters (two comms of at most 15 bytes): a longer one is
# not the kernel's, and is dropped before the regex (whose two ``.*`` would cost quadratic time).
MAX_LINE = 512


@dataclass(frozen=True, slots=True)
class TraceLine:
    """One ``signal_generate`` line: the sender is the task that was running (``sender_*``)."""

    sender_comm: str
    sender_pid: int
    signal: int
    code: int
    target_comm: str
    target_pid: int
    group: bool
    result: int


def parse_line(line: str) -> TraceLine | None:
    """A ``signal_generate`` line of trace_pipe, or None for anything else (lost-events markers)."""
    if len(line) > MAX_LINE:
        return None
    match = _LINE.match(line)
    if match is None:
        return None
    return TraceLine(
        sender_comm=match["task"].strip(),
        sender_pid=int(match["pid"]),
        signal=int(match["sig"]),
        code=int(match["code"]),
        target_comm=match["comm"],
        target_pid=int(match["target"]),
        group=match["grp"] != "0",
        result=int(match["res"]),
    )


def event_filter(signal: int, target_comm: str) -> str:
    """The kernel-side filter of the instance's ``signal_generate`` event."""
    return f'sig == {int(signal)} && code == 0 && comm == "{target_comm}"'


def default_instance(machine_id: Path = MACHINE_ID) -> str:
    """``nodemedic-<first 12 of machine-id>``: lab nodes share one kernel, and its tracefs."""
    try:
        ident = machine_id.read_text(encoding="ascii").strip()[:12]
    except (OSError, UnicodeDecodeError):
        ident = ""
    return f"nodemedic-{ident}" if ident else "nodemedic"


class TracefsUnavailable(OSError):
    """tracefs cannot be used; the message says what failed."""


class TraceSignals:
    """Emits a SignalSeen (``source="tracefs"``) for every ``signal`` sent by kill(2) to the main
    process of ``unit``, with the sender's PID, name, cgroup, unit and pod.

    A sender that exited before its line was read keeps its PID and name, with "" for cgroup, unit
    and pod: ``sender_pid != 0 and sender_cgroup == ""`` means the sender is gone (a live process
    always has a cgroup, "/" at the least)."""

    def __init__(
        self,
        *,
        tracefs: Path,
        proc: Path,
        unit: str,
        emit: Callable[[Event], None],
        clock: Clock,
        on_state: Callable[[str], None],
        main_pid: Callable[[], int],
        instance: str | None = None,
        signal: int = signals.SIGHUP,
        target_comm: str = "containerd",
    ) -> None:
        self.tracefs = tracefs
        self.unit = unit
        self.instance = instance
        self.signal = int(signal)
        self.target_comm = target_comm
        self._view = ProcView(proc)
        self._emit = emit
        self._clock = clock
        self._on_state = on_state
        self._main_pid = main_pid  # ``unit``'s main process as last reported (the node view's copy)
        # trace PID -> (PID in our namespace, start time): the target may be gone when its line
        # is read (containerd dies within milliseconds of a SIGHUP), so it is found beforehand.
        self._targets: OrderedDict[int, tuple[int, str]] = OrderedDict()
        self._pending = b""

    # ---- observer --------------------------------------------------------------------------

    def handle(self, event: Event) -> None:
        """Look up a new main process of ``unit`` as soon as D-Bus reports it: containerd dies
        within milliseconds of a SIGHUP, before its trace line is read, and a process that is gone
        can no longer be proven ours."""
        if not isinstance(event, UnitChanged) or event.unit != self.unit or not event.main_pid:
            return
        if not any(local == event.main_pid for local, _ in self._targets.values()):
            self._learn(event.main_pid)

    def _learn(self, local_pid: int) -> None:
        pid = self._view.find(local_pid, self.unit)
        if pid:
            self._remember(pid, local_pid)
        else:
            log.debug("main PID %d of %s not found in %s", local_pid, self.unit, self._view.proc)

    def _remember(self, pid: int, local_pid: int) -> None:
        self._targets[pid] = (local_pid, self._view.start_time(pid))
        self._targets.move_to_end(pid)
        while len(self._targets) > KNOWN_TARGETS:
            self._targets.popitem(last=False)

    # ---- the instance ----------------------------------------------------------------------

    async def run(self) -> None:
        name = self.instance or default_instance()
        try:
            directory = self._create(name)
        except TracefsUnavailable as err:
            self._on_state(
                f"{err}: the senders of signal {self.signal} to {self.unit} will not be known (its "
                f"deaths by that signal are still seen over D-Bus). To fix: mount tracefs "
                f"(mount -t tracefs tracefs {self.tracefs}) and let nodemedic write there (in "
                f"nodemedic.service: ProtectKernelTunables=no, ReadOnlyPaths=/sys, "
                f"ReadWritePaths=-{self.tracefs}), then restart nodemedic; or set [sighup] trace = false."
            )
            return
        try:
            await self._follow(directory)
        finally:
            _remove(directory)

    def _create(self, name: str) -> Path:
        instances = self.tracefs / "instances"
        if not instances.is_dir():
            raise TracefsUnavailable(f"tracefs is not mounted at {self.tracefs} ({instances} is missing)")
        if not (self.tracefs / EVENT).is_dir():
            raise TracefsUnavailable(f"the kernel has no trace event {EVENT} under {self.tracefs}")
        directory = instances / name
        if directory.exists():
            log.info("removing the stale trace instance %s", directory)
            try:
                _remove(directory, strict=True)
            except OSError as err:
                raise TracefsUnavailable(
                    f"cannot remove the stale trace instance {directory} ({err})"
                ) from err
        try:
            directory.mkdir()
        except OSError as err:
            raise TracefsUnavailable(f"cannot create the trace instance {directory} ({err})") from err
        try:
            with contextlib.suppress(OSError):  # a smaller buffer is only a saving
                (directory / "buffer_size_kb").write_text(f"{BUFFER_KB}\n")
            (directory / EVENT / "filter").write_text(event_filter(self.signal, self.target_comm) + "\n")
            (directory / EVENT / "enable").write_text("1\n")
            (directory / "tracing_on").write_text("1\n")
        except OSError as err:
            _remove(directory)
            raise TracefsUnavailable(
                f"cannot enable {EVENT} in the trace instance {directory} ({err})"
            ) from err
        log.info("tracing signal %d to %r in %s", self.signal, self.target_comm, directory)
        return directory

    async def _follow(self, directory: Path) -> None:
        fd = os.open(directory / "trace_pipe", os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        loop = asyncio.get_running_loop()
        try:
            self._learn_at_start()
            broken: asyncio.Future[str] = loop.create_future()
            loop.add_reader(fd, self._on_readable, fd, broken)
            try:
                reason = await broken  # runs until cancelled, unless the trace stops working
            finally:
                loop.remove_reader(fd)
            self._on_state(
                f"reading {directory}/trace_pipe stopped ({reason}): the senders of signal "
                f"{self.signal} to {self.unit} will not be known until nodemedic restarts"
            )
        finally:
            os.close(fd)  # before the rmdir: an open trace_pipe keeps the instance busy

    def _learn_at_start(self) -> None:
        main_pid = self._main_pid()
        if main_pid:
            self._learn(main_pid)
        for pid in self._view.find_by_comm(self.target_comm, self.unit):
            self._remember(pid, self._view.local_pid(pid))

    # ---- lines -----------------------------------------------------------------------------

    def _on_readable(self, fd: int, broken: asyncio.Future[str] | None = None) -> None:
        while True:
            try:
                chunk = os.read(fd, READ_SIZE)
            except BlockingIOError:
                break
            except OSError as err:  # a readable fd that fails would wake the loop forever
                _stop(broken, str(err))
                break
            if not chunk:
                _stop(broken, "end of file")
                break
            self._pending += chunk
        *lines, self._pending = self._pending.split(b"\n")
        for raw in lines:
            self.feed(raw.decode("utf-8", "replace"))

    def feed(self, line: str) -> None:
        """Handle one line of trace_pipe."""
        if not line.strip():
            return
        parsed = parse_line(line)
        if parsed is None:
            log.debug("skipping a trace line that is not a signal_generate event: %r", line)
            return
        if parsed.signal != self.signal or parsed.code != 0:
            return  # the kernel filter already drops these; a hand-made instance may not
        if parsed.sender_pid == parsed.target_pid:
            return  # the target signalled itself: no other task sent it
        local_pid = self._target(parsed.target_pid)
        if not local_pid:
            log.debug(
                "signal %d to PID %d (%s) is not to %s here",
                parsed.signal,
                parsed.target_pid,
                parsed.target_comm,
                self.unit,
            )
            return
        self._emit(self._seen(parsed, local_pid))

    def _target(self, pid: int) -> int:
        """The target's PID in our namespace if it is ``unit``'s main process here, else 0."""
        known = self._targets.get(pid)
        if known is not None:
            started = self._view.start_time(pid)
            if not started or started == known[1]:  # gone (it died of the signal), or the same
                return known[0]
            del self._targets[pid]  # the PID was reused
        if self._view.is_ours_in_unit(pid, self.unit):
            local_pid = self._view.local_pid(pid)
            if local_pid:
                self._remember(pid, local_pid)
            return local_pid
        return 0

    def _seen(self, line: TraceLine, target_pid: int) -> SignalSeen:
        sender_comm, cgroup = self._sender(line)
        return SignalSeen(
            signal=line.signal,
            target_pid=target_pid,
            unit=self.unit,
            sender_pid=line.sender_pid,
            sender_comm=sender_comm,
            sender_cgroup=cgroup,
            sender_unit=unit_of(cgroup),
            sender_pod=pod_of(cgroup),
            target_comm=line.target_comm,
            result=line.result,
            at=self._clock.monotonic(),
            source="tracefs",
        )

    def _sender(self, line: TraceLine) -> tuple[str, str]:
        """The sender's name and cgroup ("" if it is gone). PIDs are reused: /proc/PID is the
        sender's only while its name matches the trace's ("<...>" is the trace's name for a task
        whose name it did not record: /proc's name is taken then)."""
        comm = self._view.comm(line.sender_pid)
        unnamed = line.sender_comm == "<...>"
        if comm is None or (comm != line.sender_comm and not unnamed):
            log.info(
                "the sender of signal %d to %s (%s, PID %d) is gone: its cgroup is unknown",
                line.signal,
                self.unit,
                line.sender_comm,
                line.sender_pid,
            )
            return line.sender_comm, ""
        return (comm if unnamed else line.sender_comm), self._view.cgroup(line.sender_pid) or ""


def _stop(broken: asyncio.Future[str] | None, reason: str) -> None:
    if broken is not None and not broken.done():
        broken.set_result(reason)


def _remove(directory: Path, *, strict: bool = False) -> None:
    """Disable the event and remove the instance (rmdir of a trace instance frees its buffers)."""
    with contextlib.suppress(OSError):
        (directory / EVENT / "enable").write_text("0\n")
    try:
        directory.rmdir()
    except FileNotFoundError:
        pass
    except OSError as err:
        if strict:
            raise
        log.warning("cannot remove the trace instance %s: %s", directory, err)
