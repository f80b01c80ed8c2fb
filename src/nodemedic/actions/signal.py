"""Send a signal to a unit's main process through systemd, e.g. SIGUSR1 so containerd writes its
goroutine stacks into the journal before a hung containerd is restarted (the post-mortem)."""

from __future__ import annotations

import asyncio
import signal as signals

from nodemedic.actions.base import ActionContext, Skip, Step
from nodemedic.policy.actions import SignalUnitParams


class SignalUnit:
    name = "signal-unit"

    def __init__(self, params: SignalUnitParams) -> None:
        self.params = params

    async def check(self, ctx: ActionContext) -> Step | Skip:
        state = await ctx.units.state(self.params.unit)
        if state.active_state not in ("active", "reloading", "deactivating"):
            return Skip(f"{self.params.unit} has no running main process ({state.active_state})")
        name = signals.Signals(self.params.signal).name
        return Step(f"send {name} to {self.params.unit}'s main process", unit=self.params.unit)

    async def apply(self, ctx: ActionContext, step: Step) -> str:
        await ctx.units.kill(self.params.unit, self.params.signal)
        await asyncio.sleep(self.params.wait)
        return ""

    async def verify(self, ctx: ActionContext, step: Step) -> str:
        return ""
