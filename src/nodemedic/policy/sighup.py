"""The ``[sighup]`` section: seeing and damping SIGHUP storms against containerd.

containerd exits on SIGHUP (it is not among the signals it handles), and nvidia-container-toolkit
sends one to "reload" containerd on every start and stop of its pod: a crashlooping toolkit pod
restarts containerd hundreds of times (docs/design.md). This section says how nodemedic sees those
signals (D-Bus and the kernel's trace) and what it does about them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from nodemedic.policy.duration import PositiveDuration
from nodemedic.policy.paths import AbsoluteDir

SighupMode = Literal["off", "observe", "coalesce", "throttle"]

DEFAULT_DENY = [
    "init.scope",
    "containerd.service",
    "kubelet.service",
    "nodemedic.service",
    "dbus.service",
    "systemd-*",
    "user.slice",
    "user-*.slice",
    "user@*.service",
    "session-*.scope",
]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)


class StormSettings(_Strict):
    """When SIGHUPs sent to containerd are a storm: then one incident record is written when it
    starts (NODEMEDIC_OUTCOME=storm) and one when it ends (storm-ended), with the count, the senders
    and the window, instead of a record per signal."""

    signals: int = Field(default=3, ge=1)
    """More than this many SIGHUPs..."""
    window: PositiveDuration = 60.0
    """...within this sliding window make a storm. It ends after a whole window without one."""


class CoalesceSettings(_Strict):
    """``mode = "coalesce"``: containerd is started with SIGHUP ignored (a drop-in runs it under
    ``env --ignore-signal=HUP``), and nodemedic does the reload the signal was meant to cause:
    when the content of ``[daemon.config_backup].path`` really changed and containerd accepts it,
    containerd is restarted, at most once per ``interval``, however many SIGHUPs and writes came."""

    persistent: bool = False
    """Write the drop-in to /etc/systemd/system (it survives a reboot) instead of
    /run/systemd/system (a reboot reverts to stock)."""
    interval: PositiveDuration = 30.0
    """At most one config-driven restart of containerd per interval; requests in between are
    coalesced into the next one."""
    restart: Literal["kill", "clean"] = "kill"
    """How containerd is restarted to apply a change (or the drop-in). ``kill``: SIGKILL to its main
    process, then started at once: the abrupt exit the toolkit's SIGHUP caused in stock, but without
    systemd's RestartSec wait, and the socket file stays on disk until the new containerd replaces
    it, so a pod's hostPath mount cannot turn the missing path into a directory meanwhile. Running
    containers survive either way. ``clean``: ``systemctl restart`` (SIGTERM: containerd removes its
    socket on the way down, and the path is missing until it is back, about 0.1 s)."""
    restart_to_apply: bool = True
    """Restart containerd once so that the drop-in takes effect now (never while a repair runs).
    If false, it takes effect at containerd's next start, whatever causes it."""


class ThrottleSettings(_Strict):
    """``mode = "throttle"``: each sender (a cgroup: a unit or a pod's container) has a token bucket
    of ``burst`` SIGHUPs, refilled at ``refill`` per ``per``. A sender that sends more has its cgroup
    frozen for ``cooldown`` (cgroup v2 ``cgroup.freeze``, v1 freezer), then thawed; frozen cgroups
    are also thawed when nodemedic stops (ExecStopPost) or leaves this mode."""

    burst: int = Field(default=3, ge=1)
    """SIGHUPs a sender may send at once."""
    refill: int = Field(default=1, ge=1)
    """Tokens given back..."""
    per: PositiveDuration = 60.0
    """...per this period."""
    cooldown: PositiveDuration = 300.0
    """How long an offending sender stays frozen."""
    deny: list[str] = Field(default_factory=lambda: list(DEFAULT_DENY))
    """Never frozen: a sender whose cgroup path has a component matching one of these shell
    patterns (e.g. "kubelet.service", "systemd-*"; "user.slice" spares every login session).
    Whatever the list, nodemedic only freezes the sender's own (leaf) cgroup, and never its own
    cgroup, containerd's, the root, or a cgroup above any of them."""


class SighupSettings(_Strict):
    """SIGHUP storms against containerd: how they are seen and what is done about them.

    Seen over D-Bus (containerd's main process died of SIGHUP) and, where tracefs is available, in
    the kernel's trace (a dedicated trace instance with the ``signal/signal_generate`` event,
    filtered to SIGHUP and containerd, removed on exit), which names the sender; the sender is
    mapped to its systemd unit or Kubernetes pod through /proc/PID/cgroup.
    ``[daemon].mode = "observe"`` makes every mode report what it would do and touch nothing.
    """

    mode: SighupMode = "observe"
    """``off``: not watched. ``observe``: report SIGHUPs and storms only. ``coalesce``: containerd
    ignores SIGHUP and nodemedic applies real config changes (see ``coalesce``). ``throttle``:
    freeze a sender that sends too many (see ``throttle``). Leaving ``coalesce`` removes the drop-in;
    leaving ``throttle`` thaws what was frozen."""
    unit: str = "containerd.service"
    """containerd's unit; it must be in ``[daemon].watch_units``."""
    trace: bool = True
    """Use the kernel's trace to see every SIGHUP and its sender. Without tracefs (or with false)
    only deaths by SIGHUP are seen, over D-Bus, with no sender and nothing for coalesce to absorb."""
    tracefs: AbsoluteDir = Path("/sys/kernel/tracing")
    """Where tracefs is mounted."""
    proc: AbsoluteDir = Path("/proc")
    """A /proc of the kernel's initial PID namespace, where the trace's PIDs are looked up (on a
    node that is /proc; the lab binds the host's)."""
    storm: StormSettings = StormSettings()
    """When SIGHUPs are a storm."""
    coalesce: CoalesceSettings = CoalesceSettings()
    """Settings of ``mode = "coalesce"``."""
    throttle: ThrottleSettings = ThrottleSettings()
    """Settings of ``mode = "throttle"``."""
