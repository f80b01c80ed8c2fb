"""Kill left-over containerd shims, but only those proven orphaned, and only the PIDs systemd names.

Left-over shims are normal with KillMode=process: a shim must survive a containerd restart, and one
serving a running container is never killed. A PID named by systemd ("Found left-over process N
(containerd-shim...) in control group while starting unit") is proven orphaned only if all hold:
1. it is a containerd-shim process (its argv[0]);
2. it is in containerd.service's cgroup (what systemd reported);
3. it has no child process: a shim serving a container is that container's parent;
4. containerd's task bundle for its -namespace/-id is gone, so containerd can never reattach to it.
The signal goes through a pidfd opened before the proof is re-checked, so a PID reused in between
is never hit.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal as signals
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict

from nodemedic.actions.base import ActionContext, Skip, Step
from nodemedic.errors import RepairFailedError
from nodemedic.events import JournalLine

LEFT_OVER = re.compile(r"Found left-over process (\d+) \((containerd-shim[^)]*)\)")


class KillOrphanedShimsParams(BaseModel):
    """Kill the left-over containerd shims systemd names in the triggering line, if proven orphaned."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    do: Literal["kill-orphaned-shims"]
    unit: str = "containerd.service"
    """The unit whose cgroup the shims must be in."""
    bundles: str = "/run/containerd/io.containerd.runtime.v2.task"
    """containerd's task state: <bundles>/<namespace>/<id> exists for every task it can reattach to."""
    proc: str = "/proc"
    """Where processes are read (a test may point it elsewhere)."""


class KillOrphanedShims:
    name = "kill-orphaned-shims"

    def __init__(self, params: KillOrphanedShimsParams) -> None:
        self.params = params

    async def check(self, ctx: ActionContext) -> Step | Skip:
        event = ctx.event
        named = (
            [int(p) for p in LEFT_OVER.findall(event.message) for p in p[:1]]
            if isinstance(event, JournalLine)
            else []
        )
        if not named:
            return Skip("no left-over shim named by systemd")
        verdicts = {pid: self.not_orphaned(pid) for pid in named}
        orphans = tuple(str(pid) for pid, why in verdicts.items() if why is None)
        kept = "; ".join(f"{pid} kept: {why}" for pid, why in verdicts.items() if why)
        if not orphans:
            return Skip(kept)
        return Step(f"kill orphaned shim(s) {', '.join(orphans)}", unit=self.params.unit,
                    detail=kept, data={"pids": " ".join(orphans)})  # fmt: skip

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
            status = Path(self.params.proc, str(pid), "status").read_text()
        except FileNotFoundError:
            return False
        return "State:\tZ" not in status and self.not_orphaned(pid) is None

    def not_orphaned(self, pid: int) -> str | None:
        """Why ``pid`` is not a proven orphan, or None if it is one."""
        base = Path(self.params.proc, str(pid))
        try:
            argv = base.joinpath("cmdline").read_bytes().split(b"\0")
            cgroup = base.joinpath("cgroup").read_text()
        except (FileNotFoundError, ProcessLookupError):
            return "no such process"
        args = [a.decode(errors="replace") for a in argv if a]
        if not args or not os.path.basename(args[0]).startswith("containerd-shim"):
            return "not a containerd shim"
        if f"/{self.params.unit}" not in cgroup:
            return f"not in {self.params.unit}'s cgroup"
        if self._has_children(pid):
            return "it has child processes (a container)"
        namespace, task = _flag(args, "-namespace"), _flag(args, "-id")
        if not namespace or not task:
            return "its namespace or task id is unknown"
        if Path(self.params.bundles, namespace, task).exists():
            return f"containerd still has task {namespace}/{task}"
        return None

    def _has_children(self, pid: int) -> bool:
        for task in Path(self.params.proc, str(pid), "task").glob("*/children"):
            with contextlib.suppress(FileNotFoundError):
                if task.read_text().strip():
                    return True
        return False


def _flag(args: list[str], name: str) -> str:
    for i, arg in enumerate(args[:-1]):
        if arg == name:
            return args[i + 1]
    return ""
