"""The one table of actions: the ``do`` key in a policy's ``[[rule.action]]`` picks one."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any

from pydantic import Field

from nodemedic.actions.base import Action
from nodemedic.actions.config_restore import RestoreConfig, RestoreConfigParams
from nodemedic.actions.nofile import RaiseNofileLimit, RaiseNofileLimitParams
from nodemedic.actions.shims import KillOrphanedShims, KillOrphanedShimsParams
from nodemedic.actions.signal import SignalUnit, SignalUnitParams
from nodemedic.actions.socket_dir import RemoveSocketDir, RemoveSocketDirParams
from nodemedic.actions.units import (
    RestartUnit,
    RestartUnitParams,
    StartUnit,
    StartUnitParams,
    StopUnit,
    StopUnitParams,
)
from nodemedic.actions.verify import VerifyContainerd, VerifyContainerdParams

ActionSpec = Annotated[
    StopUnitParams
    | StartUnitParams
    | RestartUnitParams
    | RemoveSocketDirParams
    | VerifyContainerdParams
    | SignalUnitParams
    | RestoreConfigParams
    | KillOrphanedShimsParams
    | RaiseNofileLimitParams,
    Field(discriminator="do"),
]

ACTIONS: dict[type[Any], Callable[[Any], Action]] = {
    StopUnitParams: StopUnit,
    StartUnitParams: StartUnit,
    RestartUnitParams: RestartUnit,
    RemoveSocketDirParams: RemoveSocketDir,
    VerifyContainerdParams: VerifyContainerd,
    SignalUnitParams: SignalUnit,
    RestoreConfigParams: RestoreConfig,
    KillOrphanedShimsParams: KillOrphanedShims,
    RaiseNofileLimitParams: RaiseNofileLimit,
}


def build_action(params: object) -> Action:
    return ACTIONS[type(params)](params)
