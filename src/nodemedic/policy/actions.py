"""The parameters of every action: the ``do`` key of a policy's ``[[rule.action]]`` picks one.

They live beside the other policy models so that the policy never imports action code; each
action module (``actions/``) takes its model from here, and ``actions/registry.py`` maps each
model to its action.
"""

from __future__ import annotations

import os
import signal as signals
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from nodemedic.policy.duration import Duration, PositiveDuration
from nodemedic.policy.paths import AbsolutePath
from nodemedic.policy.signals import Signal

DEFAULT_PATHS = ["/run/containerd/containerd.sock", "/run/containerd/containerd.sock.ttrpc"]


class _UnitParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    unit: str
    """The systemd unit, e.g. ``containerd.service``."""
    timeout: PositiveDuration = 30.0
    """How long systemd's job may take."""


class StopUnitParams(_UnitParams):
    """Stop a unit unless it is already down (this also cancels a pending automatic restart)."""

    do: Literal["stop-unit"]


class StartUnitParams(_UnitParams):
    """Start a unit now, without waiting for its own RestartSec."""

    do: Literal["start-unit"]


class RestartUnitParams(_UnitParams):
    """Restart a unit; with ``if_exists`` a unit that is not installed is skipped quietly."""

    do: Literal["restart-unit"]
    if_exists: bool = True
    """Skip without error when the unit is not installed (e.g. kubelet on a plain containerd host)."""
    after_change: bool = False
    """Only if an earlier action of the same repair changed something (e.g. kubelet after containerd
    was restarted): a repair whose other actions all found nothing to do does not restart it."""
    if_socket_owner_differs: AbsolutePath | None = None
    """Only if this socket's owner is not ``socket_owner`` (lstat when checked, never following a
    symlink; a path that is missing or not a socket skips the restart): containerd makes its socket
    anew, owned as its ``[grpc]`` says, each time it starts, and nodemedic cannot chown it back
    itself (no CAP_CHOWN). The socket-mode rule's fallback: ``restore-socket-mode`` after it puts
    the permission bits back in place, without a restart."""
    socket_owner: str = Field(default="0:0", pattern=r"^[0-9]{1,10}:[0-9]{1,10}$")
    """The owner ``if_socket_owner_differs`` expects, as ``UID:GID`` (containerd's ``[grpc]`` uid
    and gid)."""

    @property
    def expected_owner(self) -> tuple[int, int]:
        uid, gid = self.socket_owner.split(":")
        return int(uid), int(gid)


class RemoveSocketDirParams(BaseModel):
    """Remove directories found at containerd's socket paths (moved to the quarantine if not empty).

    A non-empty directory is renamed aside in ``root`` (the socket path is free at once), then
    copied to the quarantine within the bounds below. Past any bound, and for anything that could
    not be copied, the manifest in the quarantine entry lists what was skipped and why, and the
    directory is kept whole in ``root`` under its ``.<name>.nodemedic-<UTC time>`` name; the
    repair still succeeds."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    do: Literal["remove-socket-dir"]
    paths: list[str] = Field(default_factory=lambda: list(DEFAULT_PATHS))
    """Socket paths to check; each must be directly inside ``root``."""
    root: str = "/run/containerd"
    """The only directory this action ever removes anything from."""
    max_bytes: int = Field(default=256 * 1024 * 1024, ge=0)
    """Most bytes of file content copied to the quarantine from one directory (default 256 MiB).
    A file that would pass it is not copied (none is copied in part) and is listed as skipped."""
    max_entries: int = Field(default=10_000, ge=1)
    """Most entries (files, folders, links, ...) walked in one directory; the rest is not walked,
    and each folder left unfinished is listed as skipped."""
    max_depth: int = Field(default=32, ge=1, le=100)
    """Deepest level walked (1: the directory's own entries); a folder at this level is listed as
    skipped, not entered. At most 100: the walk holds a few descriptors and stack frames a level."""
    max_seconds: Duration = Field(default=10.0, gt=0)
    """How long the copy may take (containerd waits for it); past it the rest is listed as skipped.
    Removing the aside copy after a complete copy gets as long again."""

    @model_validator(mode="after")
    def _inside_root(self) -> RemoveSocketDirParams:
        """Checked when the policy loads, not when containerd has already been stopped."""
        if not os.path.isabs(self.root) or os.path.normpath(self.root) != self.root:
            raise ValueError(f"root {self.root!r} must be an absolute, normalised path")
        for p in self.paths:
            if os.path.normpath(p) != p or os.path.dirname(p) != self.root:
                raise ValueError(f"{p!r} must be a normalised path directly inside root {self.root!r}")
        return self


class RestoreSocketModeParams(BaseModel):
    """Put a socket's permission bits back in place (chmod), without restarting its server: the
    socket stays the one containerd listens on, its clients stay connected. Only the very inode
    looked at is changed: the path is never followed if it is a symlink, and anything but a socket
    is refused. A socket owned by anyone but ``uid``:``gid`` is left alone (said in the record):
    nodemedic cannot chown it back, and a restart of containerd (``restart-unit`` with
    ``if_socket_owner_differs``) makes it anew as configured."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    do: Literal["restore-socket-mode"]
    path: AbsolutePath = "/run/containerd/containerd.sock"
    """The socket whose mode is put back."""
    mode: str = Field(default="0660", pattern=r"^0?[0-7]{3}$")
    """Its permission bits, in octal (containerd creates its socket 0660); no setuid, setgid or
    sticky bit."""
    uid: int = Field(default=0, ge=0)
    """The owner it must already have (containerd's ``[grpc].uid``) for its mode to be put back."""
    gid: int = Field(default=0, ge=0)
    """The group it must already have (containerd's ``[grpc].gid``)."""

    @property
    def bits(self) -> int:
        return int(self.mode, 8)


class VerifyContainerdParams(BaseModel):
    """Wait until containerd's socket is a socket and its Version API answers, within ``timeout``."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    do: Literal["verify-containerd"]
    socket: AbsolutePath = "/run/containerd/containerd.sock"
    """containerd's main gRPC socket."""
    timeout: PositiveDuration = 15.0
    """The deadline for containerd to answer after the repair."""
    request_timeout: PositiveDuration = 1.0
    """The deadline of each Version request."""
    after_change: bool = False
    """Only if an earlier action of the same repair changed something: a repair that restored
    nothing (and so restarted nothing, ``restart-unit`` with ``after_change``) leaves containerd to
    systemd and has nothing to verify."""


class SignalUnitParams(BaseModel):
    """Send a signal to a unit's main process (systemd KillUnit), then wait a moment."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    do: Literal["signal-unit"]
    unit: str
    """The systemd unit whose main process gets the signal."""
    signal: Signal = int(signals.SIGUSR1)
    """The signal, by name ("SIGUSR1") or number. containerd dumps its goroutine stacks on SIGUSR1."""
    wait: Duration = 0.3
    """Time given to the process to act on it (e.g. write its stack dump) before the next action."""


class RestoreConfigParams(BaseModel):
    """Replace a config containerd refuses by its last-known-good copy (or a generated default)."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    do: Literal["restore-config"]
    path: AbsolutePath = "/etc/containerd/config.toml"
    """containerd's config; it must be ``[daemon.config_backup].path``, whose copies are used."""
    generate: bool = True
    """With no last-known-good copy, write ``containerd config default`` (SystemdCgroup = true). False:
    without a copy nothing is done and the broken file stays for a human (e.g. while containerd
    still runs on its old config, a default would drop settings such as the nvidia runtime)."""


class KillOrphanedShimsParams(BaseModel):
    """Kill the left-over containerd shims systemd names in the triggering line, if proven orphaned."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    do: Literal["kill-orphaned-shims"]
    unit: str = "containerd.service"
    """The unit whose cgroup the shims must be in."""
    bundles: AbsolutePath = "/run/containerd/io.containerd.runtime.v2.task"
    """containerd's task state: <bundles>/<namespace>/<id> exists for every task it can reattach to."""
    proc: AbsolutePath = "/proc"
    """Where processes are read (a test may point it elsewhere)."""


class RaiseNofileLimitParams(BaseModel):
    """Install a ``LimitNOFILE=`` drop-in for ``unit`` under ``dropin_root``, reload systemd,
    restart the unit and check the new main process's soft limit. Skipped when the running process
    already has ``limit``. The hardened nodemedic.service needs ``ReadWritePaths=`` for
    ``dropin_root`` to write it (docs/operations.md)."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    do: Literal["raise-nofile-limit"]
    unit: str = "containerd.service"
    """The unit whose limit is raised."""
    limit: int = Field(default=1048576, ge=1024)
    """The new soft and hard RLIMIT_NOFILE."""
    dropin_root: AbsolutePath = "/run/systemd/system"
    """Where the drop-in folder ``<unit>.d`` is made (runtime: gone at reboot)."""
    name: str = Field(default="90-nodemedic-nofile.conf", pattern=r"^[A-Za-z0-9_.-]+\.conf$")
    """The drop-in's file name; it sorts after most operators' drop-ins, whose settings it overrides."""
    timeout: PositiveDuration = 30.0
    """How long the restart may take."""
    stop_grace: Duration = 10.0
    """How long containerd may take to stop gracefully before its main process is sent SIGKILL (as
    systemd would after TimeoutStopSec): a containerd holding leaked connections does not stop
    (lab: still stopping after 90 s with 230 idle clients). Shims survive it (KillMode=process)."""


ActionSpec = Annotated[
    StopUnitParams
    | StartUnitParams
    | RestartUnitParams
    | RemoveSocketDirParams
    | RestoreSocketModeParams
    | VerifyContainerdParams
    | SignalUnitParams
    | RestoreConfigParams
    | KillOrphanedShimsParams
    | RaiseNofileLimitParams,
    Field(discriminator="do"),
]
