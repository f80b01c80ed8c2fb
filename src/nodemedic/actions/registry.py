"""The one table of actions: the ``do`` key in a policy's ``[[rule.action]]`` picks one."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from nodemedic.actions.base import Action
from nodemedic.actions.config_restore import RestoreConfig
from nodemedic.actions.nofile import RaiseNofileLimit
from nodemedic.actions.shims import KillOrphanedShims
from nodemedic.actions.signal import SignalUnit
from nodemedic.actions.socket_dir import RemoveSocketDir
from nodemedic.actions.socket_mode import RestoreSocketMode
from nodemedic.actions.units import RestartUnit, StartUnit, StopUnit
from nodemedic.actions.verify import VerifyContainerd
from nodemedic.policy.actions import (
    KillOrphanedShimsParams,
    RaiseNofileLimitParams,
    RemoveSocketDirParams,
    RestartUnitParams,
    RestoreConfigParams,
    RestoreSocketModeParams,
    SignalUnitParams,
    StartUnitParams,
    StopUnitParams,
    VerifyContainerdParams,
)

ACTIONS: dict[type[Any], Callable[[Any], Action]] = {
    StopUnitParams: StopUnit,
    StartUnitParams: StartUnit,
    RestartUnitParams: RestartUnit,
    RemoveSocketDirParams: RemoveSocketDir,
    RestoreSocketModeParams: RestoreSocketMode,
    VerifyContainerdParams: VerifyContainerd,
    SignalUnitParams: SignalUnit,
    RestoreConfigParams: RestoreConfig,
    KillOrphanedShimsParams: KillOrphanedShims,
    RaiseNofileLimitParams: RaiseNofileLimit,
}


def build_action(params: object) -> Action:
    return ACTIONS[type(params)](params)
