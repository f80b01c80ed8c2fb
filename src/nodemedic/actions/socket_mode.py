"""Put containerd's socket's permission bits back in place, without restarting containerd.

A hostPath pod or an operator ran ``chmod`` on /run/containerd/containerd.sock: clients are denied
(or anyone may talk to containerd). The socket itself is fine, and containerd keeps listening on
it, so a chmod of that very inode is the whole repair; a restart would also make it anew, but
costs a restart of containerd.

Safety rules:
- the check looks with lstat (never following a symlink): anything but a socket is refused, as is
  a socket owned by anyone but the expected owner (nodemedic has no CAP_CHOWN: a restart of
  containerd makes the socket anew, owned as configured; the rule's ``restart-unit`` with
  ``if_socket_owner_differs`` does that);
- the apply opens the path ``O_PATH | O_NOFOLLOW`` (opening it does nothing to the socket), checks
  with fstat that it is the inode the check saw (st_dev, st_ino), still a socket with that owner,
  and chmods it through ``/proc/self/fd/N``: a symlink or another file swapped in meanwhile is
  never followed and never touched;
- the verify looks again with lstat.
"""

from __future__ import annotations

import os
import stat

from nodemedic.actions.base import ActionContext, Skip, Step
from nodemedic.errors import RepairFailedError, UnsafePathError
from nodemedic.policy.actions import RestoreSocketModeParams

_PATH_ONLY = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC
_KINDS = {
    stat.S_IFDIR: "a directory",
    stat.S_IFREG: "a regular file",
    stat.S_IFLNK: "a symlink",
    stat.S_IFIFO: "a FIFO",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
}


class RestoreSocketMode:
    """chmod a socket back to its expected permission bits, on the inode the check saw."""

    name = "restore-socket-mode"

    def __init__(self, params: RestoreSocketModeParams) -> None:
        self.params = params

    async def check(self, ctx: ActionContext) -> Step | Skip:
        p = self.params
        try:
            st = os.lstat(p.path)
        except FileNotFoundError:
            return Skip(f"{p.path} does not exist")
        if not stat.S_ISSOCK(st.st_mode):
            return Skip(f"{p.path} is {_kind(st.st_mode)}, not a socket: not touched")
        mode = stat.S_IMODE(st.st_mode)
        if (st.st_uid, st.st_gid) != (p.uid, p.gid):
            return Skip(
                f"{p.path} is owned by {st.st_uid}:{st.st_gid}, not {p.uid}:{p.gid}: nodemedic cannot "
                "chown it back (no CAP_CHOWN); a restart of containerd makes it anew"
            )
        if mode == p.bits:
            return Skip(f"{p.path} is already mode {p.bits:04o}")
        return Step(
            f"restore {p.path}'s mode to {p.bits:04o} (it is {mode:04o})",
            paths=(p.path,),
            data={"dev": str(st.st_dev), "ino": str(st.st_ino), "was": f"{mode:04o}"},
        )

    async def apply(self, ctx: ActionContext, step: Step) -> str:
        p = self.params
        fd = os.open(p.path, _PATH_ONLY)
        try:
            now = os.fstat(fd)
            if (str(now.st_dev), str(now.st_ino)) != (step.data["dev"], step.data["ino"]):
                raise UnsafePathError(f"{p.path} was replaced since it was checked: not touched")
            if not stat.S_ISSOCK(now.st_mode) or (now.st_uid, now.st_gid) != (p.uid, p.gid):
                raise UnsafePathError(f"{p.path} changed kind or owner since it was checked: not touched")
            # fchmod refuses an O_PATH descriptor; through /proc the very inode opened is changed.
            os.chmod(f"/proc/self/fd/{fd}", p.bits)
        finally:
            os.close(fd)
        return f"mode {step.data['was']} -> {p.bits:04o}, same socket (inode {step.data['ino']})"

    async def verify(self, ctx: ActionContext, step: Step) -> str:
        p = self.params
        try:
            st = os.lstat(p.path)
        except FileNotFoundError as exc:
            raise RepairFailedError(f"{p.path} is gone after the chmod") from exc
        mode = stat.S_IMODE(st.st_mode)
        if not stat.S_ISSOCK(st.st_mode) or mode != p.bits:
            raise RepairFailedError(f"{p.path} is {_kind(st.st_mode)} mode {mode:04o} after the chmod")
        return f"{p.path} is mode {mode:04o}"


def socket_owner(path: str) -> tuple[int, int] | None:
    """The owner of the socket at ``path`` (lstat, never following a symlink); None if there is no
    socket there. For ``restart-unit``'s ``if_socket_owner_differs``."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    return (st.st_uid, st.st_gid) if stat.S_ISSOCK(st.st_mode) else None


def _kind(mode: int) -> str:
    return "a socket" if stat.S_ISSOCK(mode) else _KINDS.get(stat.S_IFMT(mode), "a special file")
