"""Restore containerd's config.toml from the last-known-good copy (CASE C). A config containerd
loads is never touched; a broken one is kept aside (hard-linked as ``config.toml.broken-<UTC
time>``, never deleted) and the good copy renamed over it, byte for byte, with the file's mode
(setuid, setgid, sticky and world-write dropped) and owner: config.toml exists at every moment.
With no good copy: ``containerd config default`` with SystemdCgroup = true.

Everything is done relative to the folder's fd and nothing through a name that could have been
swapped: a symlink, FIFO, directory or device at config.toml is refused, never followed, and the
mode and owner are set on the new file's fd before it takes the name."""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import stat
from pathlib import Path

from nodemedic.actions.base import ActionContext, Skip, Step
from nodemedic.configs import config_problem, default_config, file_kind, read_config
from nodemedic.errors import RepairFailedError, UnsafePathError
from nodemedic.policy.actions import RestoreConfigParams
from nodemedic.store import fsync_directory, utc_stamp, write_all

# Not taken over from the broken file: setuid/setgid/sticky mean nothing on a config but could be
# a plant, and a config.toml anyone may write lets anyone choose what containerd runs as root.
DROPPED_MODE_BITS = stat.S_ISUID | stat.S_ISGID | stat.S_ISVTX | stat.S_IWOTH
DEFAULT_MODE = 0o644  # containerd's packages install config.toml 0644 root:root


class RestoreConfig:
    name = "restore-config"

    def __init__(self, params: RestoreConfigParams) -> None:
        self.params = params
        self.path = Path(params.path)

    async def check(self, ctx: ActionContext) -> Step | Skip:
        problem = await config_problem(self.path)
        if problem is None:
            return Skip(f"{self.path} loads; a healthy config is never touched")
        await asyncio.to_thread(self._require_regular_file)
        good = ctx.good_configs.latest() if ctx.good_configs else None
        if good is None and not self.params.generate:
            return Skip(
                f"{self.path} does not load ({problem}) and there is no last-known-good copy; "
                "left for a human (generate = false)"
            )
        source = f"the last-known-good copy {good.name}" if good else "`containerd config default`"
        return Step(
            f"restore {self.path} from {source}",
            paths=(str(self.path),),
            detail=problem,
            data={"good": str(good) if good else ""},
        )

    async def apply(self, ctx: ActionContext, step: Step) -> str:
        good = Path(step.data["good"]) if step.data.get("good") else None
        content = await asyncio.to_thread(read_config, good) if good else await default_config()
        return await asyncio.to_thread(self._replace, ctx, content, good)

    async def verify(self, ctx: ActionContext, step: Step) -> str:
        problem = await config_problem(self.path)
        if problem is not None:
            raise RepairFailedError(f"{self.path} still does not load: {problem}")
        good = step.data.get("good")
        if good and not await asyncio.to_thread(_same_bytes, Path(good), self.path):
            raise RepairFailedError(f"{self.path} differs from {good} after the restore")
        return f"{self.path} loads"

    def _require_regular_file(self) -> None:
        """A missing file or a regular one may be replaced; anything else is left for a human."""
        try:
            found = os.lstat(self.path)
        except FileNotFoundError:
            return
        if not stat.S_ISREG(found.st_mode):
            raise self._refused(found.st_mode)

    def _refused(self, mode: int) -> UnsafePathError:
        return UnsafePathError(
            f"{self.path} is {file_kind(mode)}, not a regular file: restore-config neither follows "
            "nor replaces it (look at what made it, then put a regular config.toml there by hand)"
        )

    def _replace(self, ctx: ActionContext, content: bytes, good: Path | None) -> str:
        folder = os.open(self.path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            kept = self._link_aside(ctx, folder)
            mode = DEFAULT_MODE if kept is None else stat.S_IMODE(kept[1].st_mode) & ~DROPPED_MODE_BITS
            _write_over(folder, self.path.name, content, mode)
        finally:
            os.close(folder)
        aside = f"broken file kept as {self.path.with_name(kept[0])}" if kept else f"{self.path} was missing"
        origin = f"last-known-good copy {good.name}" if good else "generated default (SystemdCgroup = true)"
        owner = _owner_note(kept[1]) if kept else ""
        return f"{aside}; wrote the {origin}{owner}"

    def _link_aside(self, ctx: ActionContext, folder: int) -> tuple[str, os.stat_result] | None:
        """Hard-link the broken file to a free ``.broken-<time>`` name (config.toml stays in
        place); its name and what was linked, or None if there is no file. The link is taken
        without following a symlink and checked to be the regular file examined."""
        name = self.path.name
        try:
            before = os.stat(name, dir_fd=folder, follow_symlinks=False)
        except FileNotFoundError:
            return None
        if not stat.S_ISREG(before.st_mode):
            raise self._refused(before.st_mode)
        stamp = utc_stamp(ctx.clock.wall())
        aside, n = f"{name}.broken-{stamp}", 0
        while True:
            try:
                os.link(name, aside, src_dir_fd=folder, dst_dir_fd=folder, follow_symlinks=False)
                break
            except FileExistsError:
                n += 1
                aside = f"{name}.broken-{stamp}.{n}"
        kept = os.stat(aside, dir_fd=folder, follow_symlinks=False)
        if (kept.st_dev, kept.st_ino) != (before.st_dev, before.st_ino) or not stat.S_ISREG(kept.st_mode):
            os.unlink(aside, dir_fd=folder)  # a link to whatever was swapped in: no follow either
            raise UnsafePathError(f"{self.path} was replaced while it was being kept aside; nothing written")
        return aside, kept


def _owner_note(broken: os.stat_result) -> str:
    """The restored file is root's, whoever owned the broken one: the unit has no CAP_CHOWN (an
    fchown to another owner fails with EPERM), and an owner planted by whoever broke the file
    could rewrite the restored one."""
    if (broken.st_uid, broken.st_gid) == (os.geteuid(), os.getegid()):
        return ""
    ours, theirs = f"{os.geteuid()}:{os.getegid()}", f"{broken.st_uid}:{broken.st_gid}"
    return f" (owned by {ours}; the broken file's owner {theirs} not kept)"


def _write_over(folder: int, name: str, content: bytes, mode: int) -> None:
    """Write ``content`` to a new file in ``folder``, give it ``mode`` on its fd, fsync it,
    rename it over ``name`` and fsync the folder: ``name`` holds the old or the new content at
    every moment, and the new content survives a crash once this returns."""
    tmp = f".{name}.nodemedic-{secrets.token_hex(4)}"
    fd = os.open(
        tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=folder
    )
    try:
        try:
            write_all(fd, content)
            os.fchmod(fd, mode)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, name, src_dir_fd=folder, dst_dir_fd=folder)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp, dir_fd=folder)
        raise
    fsync_directory(folder)


def _same_bytes(a: Path, b: Path) -> bool:
    return read_config(a) == read_config(b)
