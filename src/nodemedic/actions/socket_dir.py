"""Remove a directory found where containerd's socket must be, without ever losing data.

Safety rules:
- only names directly inside ``root`` (default /run/containerd), reached through a directory fd
  opened with O_NOFOLLOW, so a symlinked ``root`` or path is never followed;
- a symlink at the socket path is never followed and never touched (containerd unlinks it itself);
- a path that is, or contains, a mount point is refused: copying and removing it would destroy
  the mounted file system's data;
- an empty directory is removed; a non-empty one is first renamed aside inside ``root`` (atomic,
  frees the socket path at once), then copied to the quarantine, and the aside copy is removed only
  after the quarantined copy is complete. If copying fails the aside directory stays where it is.
"""

from __future__ import annotations

import asyncio
import errno
import os
import shutil
import stat
import time
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from nodemedic.actions.base import ActionContext, Skip, Step
from nodemedic.errors import RepairFailedError, UnsafePathError

DEFAULT_PATHS = ["/run/containerd/containerd.sock", "/run/containerd/containerd.sock.ttrpc"]


class RemoveSocketDirParams(BaseModel):
    """Remove directories found at containerd's socket paths (moved to the quarantine if not empty)."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    do: Literal["remove-socket-dir"]
    paths: list[str] = Field(default_factory=lambda: list(DEFAULT_PATHS))
    """Socket paths to check; each must be directly inside ``root``."""
    root: str = "/run/containerd"
    """The only directory this action ever removes anything from."""

    @model_validator(mode="after")
    def _inside_root(self) -> RemoveSocketDirParams:
        """Checked when the policy loads, not when containerd has already been stopped."""
        if not os.path.isabs(self.root) or os.path.normpath(self.root) != self.root:
            raise ValueError(f"root {self.root!r} must be an absolute, normalised path")
        for p in self.paths:
            if os.path.normpath(p) != p or os.path.dirname(p) != self.root:
                raise ValueError(f"{p!r} must be a normalised path directly inside root {self.root!r}")
        return self


class RemoveSocketDir:
    name = "remove-socket-dir"

    def __init__(self, params: RemoveSocketDirParams) -> None:
        self.params = params
        for p in params.paths:
            if os.path.dirname(p) != params.root.rstrip("/"):
                raise UnsafePathError(f"{p} is not directly inside {params.root}")

    async def check(self, ctx: ActionContext) -> Step | Skip:
        found = [p for p in self.params.paths if _is_real_directory(p)]
        if not found:
            return Skip("no directory at " + ", ".join(self.params.paths))
        return Step("remove the directory at " + ", ".join(found), paths=tuple(found))

    async def apply(self, ctx: ActionContext, step: Step) -> str:
        details = []
        for path in step.paths:
            # File copying can take a while: keep the event loop (and the watchdog) running.
            details.append(await asyncio.to_thread(self._remove_one, ctx, path))
        return "; ".join(details)

    async def verify(self, ctx: ActionContext, step: Step) -> str:
        still = [p for p in step.paths if _is_real_directory(p)]
        if still:
            raise RepairFailedError("still a directory: " + ", ".join(still))
        return "no directory left at " + ", ".join(step.paths)

    def _remove_one(self, ctx: ActionContext, path: str) -> str:
        name = os.path.basename(path)
        root_fd = os.open(self.params.root, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        try:
            st = os.stat(name, dir_fd=root_fd, follow_symlinks=False)
            if not stat.S_ISDIR(st.st_mode):
                return f"{path} is no longer a directory"
            _refuse_mounts(path)
            try:
                os.rmdir(name, dir_fd=root_fd)
            except OSError as exc:
                if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                    raise
            else:
                return f"removed empty directory {path}"
            return self._quarantine(ctx, root_fd, name)
        finally:
            os.close(root_fd)

    def _quarantine(self, ctx: ActionContext, root_fd: int, name: str) -> str:
        now = ctx.clock.wall()
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(now)) + f"-{int(now * 1e6) % 1_000_000:06d}"
        # first the quarantine (it may fail: read-only, full), and only then free the socket path
        ctx.quarantine_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        aside = f".{name}.nodemedic-{stamp}"
        os.rename(name, aside, src_dir_fd=root_fd, dst_dir_fd=root_fd)
        aside_path = os.path.join(self.params.root, aside)
        target = ctx.quarantine_dir / f"{stamp}-{name}"
        partial = target.with_name(target.name + ".partial")  # the final name only once complete
        try:
            shutil.copytree(aside_path, partial, symlinks=True)
            _same_tree(Path(aside_path), partial)
            os.rename(partial, target)
        except (OSError, shutil.Error) as exc:
            shutil.rmtree(partial, ignore_errors=True)  # a copy: the original stays aside
            raise RepairFailedError(
                f"moved {name} aside to {aside_path} but could not copy it to {target}: {exc}; "
                f"{aside_path} is kept"
            ) from exc
        shutil.rmtree(aside_path)
        return f"moved non-empty directory {os.path.join(self.params.root, name)} to {target}"


def _is_real_directory(path: str) -> bool:
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode)
    except FileNotFoundError:
        return False


def _mount_points() -> list[str]:
    with open("/proc/self/mountinfo", encoding="utf-8") as f:
        # Field 5 is the mount point, with spaces and the like written as octal escapes.
        return [line.split()[4].encode().decode("unicode_escape") for line in f if line.strip()]


def _refuse_mounts(path: str) -> None:
    inside = [m for m in _mount_points() if m == path or m.startswith(path + "/")]
    if inside:
        raise UnsafePathError(
            f"{path} is or contains a mount point ({', '.join(inside)}); unmount it first: "
            "nodemedic never removes a mounted file system"
        )


def _same_tree(src: Path, dst: Path) -> None:
    def listing(root: Path) -> list[tuple[str, int]]:
        out = []
        for dirpath, dirnames, filenames in os.walk(root):
            for n in dirnames + filenames:
                p = Path(dirpath, n)
                st = p.lstat()
                out.append((str(p.relative_to(root)), st.st_size if stat.S_ISREG(st.st_mode) else 0))
        return sorted(out)

    if listing(src) != listing(dst):
        raise RepairFailedError(f"the copy at {dst} differs from {src}")
