"""Stop, start or restart a systemd unit and wait for systemd's job to finish."""

from __future__ import annotations

from nodemedic.actions.base import ActionContext, Skip, Step
from nodemedic.actions.socket_mode import socket_owner
from nodemedic.errors import RepairFailedError
from nodemedic.policy.actions import RestartUnitParams, StartUnitParams, StopUnitParams


class StopUnit:
    name = "stop-unit"

    def __init__(self, params: StopUnitParams) -> None:
        self.params = params

    async def check(self, ctx: ActionContext) -> Step | Skip:
        state = await ctx.units.state(self.params.unit)
        if state.down:
            return Skip(f"{self.params.unit} is already {state.active_state}")
        return Step(
            f"stop {self.params.unit} ({state.active_state}/{state.sub_state})",
            unit=self.params.unit,
            unit_effect="stops",
        )

    async def apply(self, ctx: ActionContext, step: Step) -> str:
        await ctx.units.stop(self.params.unit, self.params.timeout)
        return ""

    async def verify(self, ctx: ActionContext, step: Step) -> str:
        state = await ctx.units.state(self.params.unit)
        if not state.down:
            raise RepairFailedError(f"{self.params.unit} is {state.active_state} after stop")
        return f"{self.params.unit} is {state.active_state}"


class StartUnit:
    name = "start-unit"

    def __init__(self, params: StartUnitParams) -> None:
        self.params = params

    async def check(self, ctx: ActionContext) -> Step | Skip:
        state = await ctx.units.state(self.params.unit)
        if state.active_state == "active":
            return Skip(f"{self.params.unit} is already active")
        return Step(f"start {self.params.unit}", unit=self.params.unit, unit_effect="starts")

    async def apply(self, ctx: ActionContext, step: Step) -> str:
        await ctx.units.start(self.params.unit, self.params.timeout)
        return ""

    async def verify(self, ctx: ActionContext, step: Step) -> str:
        state = await ctx.units.state(self.params.unit)
        if state.active_state != "active":
            raise RepairFailedError(
                f"{self.params.unit} is {state.active_state}/{state.sub_state} after start"
            )
        return f"{self.params.unit} is active"


class RestartUnit:
    name = "restart-unit"

    def __init__(self, params: RestartUnitParams) -> None:
        self.params = params

    async def check(self, ctx: ActionContext) -> Step | Skip:
        state = await ctx.units.state(self.params.unit)
        if not state.exists and self.params.if_exists:
            return Skip(f"{self.params.unit} is not installed")
        if self.params.after_change and not ctx.changed:
            return Skip(f"nothing was changed before it: {self.params.unit} is not restarted")
        owned = self._socket_owned_as_expected()
        if owned:
            return Skip(owned)
        return Step(f"restart {self.params.unit}", unit=self.params.unit, unit_effect="restarts")

    def _socket_owned_as_expected(self) -> str:
        """Why ``if_socket_owner_differs`` skips the restart ("" if it does not)."""
        path = self.params.if_socket_owner_differs
        if path is None:
            return ""
        owner = socket_owner(path)
        if owner is None:
            return f"no socket at {path}: {self.params.unit} is not restarted"
        if owner == self.params.expected_owner:
            return f"{path} is owned by {self.params.socket_owner}: {self.params.unit} is not restarted"
        return ""

    async def apply(self, ctx: ActionContext, step: Step) -> str:
        await ctx.units.restart(self.params.unit, self.params.timeout)
        return ""

    async def verify(self, ctx: ActionContext, step: Step) -> str:
        state = await ctx.units.state(self.params.unit)
        if state.active_state not in ("active", "activating"):
            raise RepairFailedError(f"{self.params.unit} is {state.active_state} after restart")
        return f"{self.params.unit} is {state.active_state}"
