"""Restore containerd's config.toml from the last-known-good copy (CASE C). A config containerd
loads is never touched; a broken one is renamed aside (``config.toml.broken-<UTC time>``, never
deleted) and the good copy written in its place, byte for byte, with the file's mode and owner.
With no good copy: ``containerd config default`` with SystemdCgroup = true."""

from __future__ import annotations

import asyncio
import os
import stat
import time
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict

from nodemedic.actions.base import ActionContext, Skip, Step
from nodemedic.configs import config_problem, default_config
from nodemedic.errors import RepairFailedError
from nodemedic.policy.paths import AbsolutePath
from nodemedic.state import atomic_write


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


class RestoreConfig:
    name = "restore-config"

    def __init__(self, params: RestoreConfigParams) -> None:
        self.params = params
        self.path = Path(params.path)

    async def check(self, ctx: ActionContext) -> Step | Skip:
        problem = await config_problem(self.path)
        if problem is None:
            return Skip(f"{self.path} loads; a healthy config is never touched")
        good = ctx.good_configs.latest() if ctx.good_configs else None
        if good is None and not self.params.generate:
            return Skip(
                f"{self.path} does not load ({problem}) and there is no last-known-good copy; "
                "left for a human (generate = false)"
            )
        source = f"the last-known-good copy {good.name}" if good else "`containerd config default`"
        return Step(f"restore {self.path} from {source}", paths=(str(self.path),),
                    detail=problem, data={"good": str(good) if good else ""})  # fmt: skip

    async def apply(self, ctx: ActionContext, step: Step) -> str:
        good = Path(step.data["good"]) if step.data.get("good") else None
        content = await asyncio.to_thread(good.read_bytes) if good else await default_config()
        return await asyncio.to_thread(self._replace, ctx, content, good)

    def _replace(self, ctx: ActionContext, content: bytes, good: Path | None) -> str:
        aside = self._move_aside(ctx)
        mode, uid, gid = 0o644, 0, 0
        if aside is not None:
            st = aside.stat()
            mode, uid, gid = stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid
        atomic_write(self.path, content.decode("utf-8", "surrogateescape"))
        written = self.path.stat()
        if (written.st_uid, written.st_gid) != (uid, gid):  # needs CAP_CHOWN: only when it must
            os.chown(self.path, uid, gid)
        os.chmod(self.path, mode)
        kept = f"broken file kept as {aside}" if aside else f"{self.path} was missing"
        origin = f"last-known-good copy {good.name}" if good else "generated default (SystemdCgroup = true)"
        return f"{kept}; wrote the {origin}"

    async def verify(self, ctx: ActionContext, step: Step) -> str:
        problem = await config_problem(self.path)
        if problem is not None:
            raise RepairFailedError(f"{self.path} still does not load: {problem}")
        good = step.data.get("good")
        if good and not await asyncio.to_thread(_same_bytes, Path(good), self.path):
            raise RepairFailedError(f"{self.path} differs from {good} after the restore")
        return f"{self.path} loads"

    def _move_aside(self, ctx: ActionContext) -> Path | None:
        if not self.path.exists():
            return None
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(ctx.clock.wall()))
        aside = self.path.with_name(f"{self.path.name}.broken-{stamp}")
        n = 1
        while aside.exists():
            aside = self.path.with_name(f"{self.path.name}.broken-{stamp}.{n}")
            n += 1
        os.rename(self.path, aside)
        return aside


def _same_bytes(a: Path, b: Path) -> bool:
    return a.read_bytes() == b.read_bytes()
