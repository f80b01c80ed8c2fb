"""The ``[placeholder]`` section: keep containerd's socket paths from ever being missing.

While containerd's socket path is missing (containerd stopped cleanly, or between its exit and its
next start), a pod that mounts the path with hostPath (type unset) makes containerd's CRI plugin
create it as a DIRECTORY, and containerd then cannot start ("is a directory"). containerd unlinks
whatever non-directory is at its socket paths before it binds them (``CreateUnixSocket`` in
``pkg/sys/socket_unix.go``, 1.6 to 2.x), so a socket file left there hinders nothing; a hostPath
mount finds the path existing and creates nothing.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from nodemedic.policy.duration import PositiveDuration
from nodemedic.policy.paths import AbsolutePath

PlaceholderMode = Literal["off", "observe", "enforce"]


class PlaceholderSettings(BaseModel):
    """A placeholder socket at each of containerd's socket paths the moment it goes missing.

    The placeholder is a Unix socket bound once and never listened on (its socket is closed at
    once): a client gets ECONNREFUSED, exactly as from the stale socket an abrupt exit of containerd
    leaves. It gets containerd's mode and owner (``[grpc]``/``[ttrpc]`` uid and gid of ``config``),
    and is made inside the socket's folder, opened O_NOFOLLOW: bound under a temporary name, then
    hard-linked to the socket's name, which fails rather than replace anything that appeared
    meanwhile (a symlink, a FIFO, a directory, containerd's own socket). containerd removes it
    when it binds its socket. Records: ``journalctl -u nodemedic NODEMEDIC_ACTION=placeholder-socket``.

    If containerd runs while its socket file is gone (someone unlinked it: containerd then serves
    only the connections already open), the placeholder is made too and the fault is reported;
    the probe then gets ECONNREFUSED and the ``containerd-hung`` rule restarts containerd, which
    binds its socket anew (docs/operations.md)."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    mode: PlaceholderMode = "observe"
    """``off``: nothing is made and the paths are not watched for it. ``observe``: say in journald
    what would be made (NODEMEDIC_OUTCOME=would-do), make nothing. ``enforce``: make the
    placeholders. ``[daemon].mode = "observe"`` makes ``enforce`` observe too."""
    paths: list[AbsolutePath] = Field(
        default=["/run/containerd/containerd.sock", "/run/containerd/containerd.sock.ttrpc"],
        min_length=1,
        max_length=8,
    )
    """containerd's socket paths ([grpc] address, and [ttrpc] address: by default the former with
    ``.ttrpc``). Their folder must exist (containerd makes it at its first start); nodemedic
    creates no folder."""
    unit: str = "containerd.service"
    """containerd's unit (in ``[daemon].watch_units``): whether it runs says whether a missing
    path is a fault of a running containerd."""
    config: AbsolutePath = "/etc/containerd/config.toml"
    """containerd's config: ``[grpc] uid``/``gid`` give the owner of the main socket's
    placeholder, ``[ttrpc] uid``/``gid`` (else ``[grpc]``'s) the ttrpc one's, as containerd sets
    them on its own sockets. Unset, unreadable or missing: 0:0."""
    socket_mode: str = Field(default="0660", pattern=r"^0?[0-7]{3}$")
    """The placeholder's permission bits, in octal (containerd chmods its sockets 0660)."""
    grace: PositiveDuration = 0.1
    """While containerd may be between unlinking a socket path and binding it (it is starting, or
    the path that vanished was a placeholder of ours, which containerd removes as it starts), look
    again after this long (and again while it is still starting, 50 times at most) before making
    one: a placeholder made inside containerd's unlink-to-bind
    gap would make its bind fail with "address already in use". Otherwise (containerd down, or
    active with its socket unlinked) the placeholder is made at once."""
