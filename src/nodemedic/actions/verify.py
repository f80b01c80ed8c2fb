"""Verify that containerd serves again: its socket path is a socket and its Version API answers."""

from __future__ import annotations

import asyncio
import os
import stat

from nodemedic.actions.base import ActionContext, Skip, Step
from nodemedic.errors import ProbeError, RepairFailedError
from nodemedic.policy.actions import VerifyContainerdParams

RETRY_INTERVAL = 0.05


class VerifyContainerd:
    name = "verify-containerd"

    def __init__(self, params: VerifyContainerdParams) -> None:
        self.params = params

    async def check(self, ctx: ActionContext) -> Step | Skip:
        if self.params.after_change and not ctx.changed:
            return Skip("nothing was changed before it: nothing to verify")
        return Step(
            f"check that containerd answers on {self.params.socket}",
            paths=(self.params.socket,),
            changes=False,
        )

    async def apply(self, ctx: ActionContext, step: Step) -> str:
        return ""

    async def verify(self, ctx: ActionContext, step: Step) -> str:
        deadline = ctx.clock.monotonic() + self.params.timeout
        last = "socket not there yet"
        while ctx.clock.monotonic() < deadline:
            if _is_socket(self.params.socket):
                try:
                    version = await ctx.probe.version(self.params.socket, self.params.request_timeout)
                except ProbeError as exc:
                    last = str(exc)
                else:
                    return f"containerd {version} answers"
            # Bounded retries inside a deadline: containerd takes a moment to bind after start.
            await asyncio.sleep(RETRY_INTERVAL)
        raise RepairFailedError(
            f"containerd did not answer on {self.params.socket} within {self.params.timeout:g}s: {last}"
        )


def _is_socket(path: str) -> bool:
    try:
        return stat.S_ISSOCK(os.lstat(path).st_mode)
    except FileNotFoundError:
        return False
