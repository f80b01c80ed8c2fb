"""Raise a unit's file-descriptor limit: a ``LimitNOFILE=`` drop-in of nodemedic's own, a
daemon-reload, a restart, and the new limit checked on the new main process.

The drop-in goes under /run/systemd/system (gone at reboot: the operator's own configuration stays
the lasting truth) with a marker line; a file of that name without the marker is someone else's and
is never overwritten. Shims survive the restart (KillMode=process), as with every containerd restart.
"""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

from nodemedic.actions.base import ActionContext, Skip, Step
from nodemedic.errors import RepairFailedError, UnitControlError, UnsafePathError
from nodemedic.policy.actions import RaiseNofileLimitParams
from nodemedic.procfs import soft_nofile
from nodemedic.store import atomic_write

MARKER = "# nodemedic: managed drop-in"
SYSTEMCTL_TIMEOUT = 30.0


class RaiseNofileLimit:
    name = "raise-nofile-limit"
    proc = Path("/proc")

    def __init__(self, params: RaiseNofileLimitParams) -> None:
        self.params = params

    @property
    def path(self) -> Path:
        return Path(self.params.dropin_root) / f"{self.params.unit}.d" / self.params.name

    async def check(self, ctx: ActionContext) -> Step | Skip:
        p = self.params
        if self.path.exists() and MARKER not in self.path.read_text(errors="replace"):
            raise UnsafePathError(
                f"{self.path} exists and is not nodemedic's: not overwriting it; "
                f"set another name for the drop-in or remove that file"
            )
        pid = await main_pid(p.unit)
        current = soft_nofile(self.proc, pid) if pid else -1
        if current == 0 or current >= p.limit:
            return Skip(f"{p.unit}'s main process {pid} already has LimitNOFILE {current or 'unlimited'}")
        return Step(
            f"install {self.path} with LimitNOFILE={p.limit}, reload systemd and restart "
            f"{p.unit} (its main process {pid} has a soft limit of {current})",
            unit=p.unit,
            paths=(str(self.path),),
            data={"pid": str(pid)},
            unit_effect="restarts",
        )

    async def apply(self, ctx: ActionContext, step: Step) -> str:
        p = self.params
        text = (
            f"{MARKER} (rule action raise-nofile-limit): {p.unit} ran out of file descriptors.\n"
            f"# Remove this file and run `systemctl daemon-reload` to undo; it is gone at reboot.\n"
            f"[Service]\nLimitNOFILE={p.limit}\n"
        )
        atomic_write(self.path, text)
        self.path.chmod(0o644)
        await systemctl("daemon-reload")
        restart = asyncio.ensure_future(ctx.units.restart(p.unit, p.timeout))
        done, _ = await asyncio.wait({restart}, timeout=p.stop_grace)
        killed = ""
        if not done:
            await ctx.units.kill(p.unit, signal.SIGKILL)
            killed = f"; {p.unit} had not stopped after {p.stop_grace:g}s: its main process got SIGKILL"
        await restart
        return f"wrote {self.path}{killed}"

    async def verify(self, ctx: ActionContext, step: Step) -> str:
        p = self.params
        pid = await main_pid(p.unit)
        if not pid or str(pid) == step.data.get("pid"):
            raise RepairFailedError(f"{p.unit} has no new main process after the restart (MainPID {pid})")
        soft = soft_nofile(self.proc, pid)
        if soft != 0 and soft < p.limit:
            raise RepairFailedError(
                f"{p.unit}'s new main process {pid} still has LimitNOFILE {soft}: "
                "a later drop-in or systemd's own hard limit caps it"
            )
        return f"{p.unit}'s new main process {pid} has LimitNOFILE {soft or 'unlimited'}"


async def systemctl(*args: str) -> str:
    """Run systemctl and return its output; a failure is a UnitControlError."""
    proc = await asyncio.create_subprocess_exec(
        "systemctl", *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), SYSTEMCTL_TIMEOUT)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise UnitControlError(f"systemctl {' '.join(args)} took over {SYSTEMCTL_TIMEOUT:g}s") from None
    if proc.returncode != 0:
        raise UnitControlError(f"systemctl {' '.join(args)}: {err.decode(errors='replace').strip()}")
    return out.decode(errors="replace")


async def main_pid(unit: str) -> int:
    """The unit's MainPID as systemd has it now (0: none)."""
    return int((await systemctl("show", "--property=MainPID", "--value", unit)).strip() or 0)
