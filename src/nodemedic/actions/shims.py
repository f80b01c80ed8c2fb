"""Kill left-over containerd shims, but only those proven orphaned, and only the PIDs systemd names.

Left-over shims are normal with KillMode=process: a shim must survive a containerd restart, and one
serving a running container is never killed. A PID named by systemd ("Found left-over process N
(containerd-shim...) in control group while starting unit") is proven orphaned only if all hold:
1. it is a containerd-shim process (its argv[0]);
2. it is in containerd.service's own cgroup (what systemd reported): the cgroup2 ``0::`` line (or
   a legacy host's ``name=systemd`` line) names the unit under slices only, so a pod's cgroup with a
   child named ``containerd.service`` is not it;
3. it has no child process: a shim serving a container is that container's parent. Every thread's
   ``task/*/children`` must be read; without them (a kernel without CONFIG_PROC_CHILDREN) nothing
   is proven and nothing is killed;
4. containerd's task bundle for its -namespace/-id is gone, so containerd can never reattach to it.
The signal goes through a pidfd opened before the proof is re-checked, so a PID reused in between
is never hit.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal as signals
from pathlib import Path

from nodemedic.actions.base import ActionContext, Skip, Step
from nodemedic.errors import RepairFailedError
from nodemedic.events import JournalLine
from nodemedic.policy.actions import KillOrphanedShimsParams
from nodemedic.procfs import ProcView, cgroup_from_text, is_unit_cgroup

# A PID is at most 7 digits (PID_MAX_LIMIT); 10 bounds what int() is given, ASCII digits only.
LEFT_OVER = re.compile(r"Found left-over process ([0-9]{1,10}) \((containerd-shim[^)]*)\)")
PID_MAX_LIMIT = 4_194_304  # the kernel's hard limit: no pid_max is larger


class KillOrphanedShims:
    name = "kill-orphaned-shims"

    def __init__(self, params: KillOrphanedShimsParams) -> None:
        self.params = params

    async def check(self, ctx: ActionContext) -> Step | Skip:
        event = ctx.event
        verdicts = self.verdicts(event.message) if isinstance(event, JournalLine) else {}
        if not verdicts:
            return Skip("no left-over shim named by systemd")
        orphans = tuple(str(pid) for pid, why in verdicts.items() if why is None)
        kept = "; ".join(f"{pid} kept: {why}" for pid, why in verdicts.items() if why)
        if not orphans:
            return Skip(kept)
        return Step(
            f"kill orphaned shim(s) {', '.join(orphans)}",
            unit=self.params.unit,
            detail=kept,
            data={"pids": " ".join(orphans)},
        )

    async def apply(self, ctx: ActionContext, step: Step) -> str:
        done = []
        for pid in map(int, step.data["pids"].split()):
            try:
                fd = os.pidfd_open(pid)
            except ProcessLookupError:
                done.append(f"{pid} already gone")
                continue
            try:
                why = self.not_orphaned(pid)  # again, now that the pid is pinned by the fd
                if why:
                    done.append(f"{pid} kept: {why}")
                    continue
                signals.pidfd_send_signal(fd, signals.SIGKILL)
                done.append(f"{pid} killed")
            finally:
                os.close(fd)
        return "; ".join(done + ([step.detail] if step.detail else []))

    async def verify(self, ctx: ActionContext, step: Step) -> str:
        for _ in range(50):  # SIGKILL is prompt; the parent's reaping may take a moment
            left = [pid for pid in map(int, step.data["pids"].split()) if self._alive(pid)]
            if not left:
                return ""
            await asyncio.sleep(0.02)
        raise RepairFailedError(f"orphaned shim(s) {left} still there after SIGKILL")

    def _alive(self, pid: int) -> bool:
        try:
            status = Path(self.params.proc, str(pid), "status").read_bytes()
        except (FileNotFoundError, ProcessLookupError):
            return False
        return b"State:\tZ" not in status and self.not_orphaned(pid) is None

    def verdicts(self, message: str) -> dict[int, str | None]:
        """Each PID systemd names in ``message``: why it is not a proven orphan, or None if it is one."""
        return {pid: self.not_orphaned(pid) for pid in _named_pids(message)}

    def proven_orphans(self, message: str) -> list[int]:
        """The PIDs named in ``message`` that are proven orphans right now."""
        return [pid for pid, why in self.verdicts(message).items() if why is None]

    def not_orphaned(self, pid: int) -> str | None:
        """Why ``pid`` is not a proven orphan, or None if it is one."""
        base = Path(self.params.proc, str(pid))
        try:
            argv = base.joinpath("cmdline").read_bytes().split(b"\0")
            cgroup = cgroup_from_text(base.joinpath("cgroup").read_bytes().decode(errors="replace"))
        except (FileNotFoundError, ProcessLookupError):
            return "no such process"
        except OSError as err:
            return f"cannot read {base}: {err}"
        args = [a.decode(errors="replace") for a in argv if a]
        if not args or not os.path.basename(args[0]).startswith("containerd-shim"):
            return "not a containerd shim"
        if not is_unit_cgroup(cgroup, self.params.unit):
            return f"not in {self.params.unit}'s cgroup"
        if why := self._children(pid):
            return why
        namespace, task = _flag(args, "-namespace"), _flag(args, "-id")
        if not _plain_name(namespace) or not _plain_name(task):
            return "its namespace or task id is unknown"
        try:
            if Path(self.params.bundles, namespace, task).exists():
                return f"containerd still has task {namespace}/{task}"
        except OSError as err:
            return f"cannot tell whether containerd still has task {namespace}/{task}: {err}"
        return None

    def _children(self, pid: int) -> str | None:
        """Why ``pid`` may have a child process, or None if it has none. Fails closed: a thread
        whose children file cannot be read could be the parent of a container."""
        tasks = Path(self.params.proc, str(pid), "task")
        try:
            threads = [t for t in os.listdir(tasks) if t.isdecimal()]
        except OSError as err:
            return f"its threads cannot be listed ({err}): cannot tell whether it has child processes"
        if not threads:
            return "it has no threads listed: cannot tell whether it has child processes"
        for thread in threads:
            try:
                if tasks.joinpath(thread, "children").read_bytes().strip():
                    return "it has child processes (a container)"
            except OSError as err:
                return (
                    f"cannot tell whether it has child processes ({err}; without "
                    "CONFIG_PROC_CHILDREN the kernel has no task/*/children)"
                )
        return None


class ReportedOrphans:
    """The proven orphans already part of an incident, so that one process is one incident.

    systemd names each left-over shim once per ExecStartPre= and again for ExecStart=; a PID named
    again whose process has the same start time (field 22 of /proc/PID/stat) is that incident
    again; a PID reused by a later process is a new one. Entries whose process is gone, or is
    another process now, are dropped at each look: the map holds only live orphans."""

    def __init__(self) -> None:
        self._started: dict[int, str] = {}  # PID -> start time when it was reported

    def first_seen(self, pids: list[int], proc: str) -> list[int]:
        """Those of ``pids`` (in ``proc``) not reported yet as that process; from now they are."""
        view = ProcView(Path(proc))
        self._started = {pid: t for pid, t in self._started.items() if view.start_time(pid) == t}
        new = []
        for pid in pids:
            started = view.start_time(pid)
            if started and self._started.get(pid) != started:
                self._started[pid] = started
                new.append(pid)
        return new

    def __len__(self) -> int:
        return len(self._started)


def _named_pids(message: str) -> list[int]:
    """The PIDs systemd names in ``message``; a number no PID can be is not one."""
    return [pid for pid in (int(p) for p, _ in LEFT_OVER.findall(message)) if 0 < pid <= PID_MAX_LIMIT]


def _plain_name(name: str) -> bool:
    """A single path component: a crafted -namespace or -id must not point elsewhere."""
    return bool(name) and name not in (".", "..") and "/" not in name


def _flag(args: list[str], name: str) -> str:
    for i, arg in enumerate(args[:-1]):
        if arg == name:
            return args[i + 1]
    return ""
