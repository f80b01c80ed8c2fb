"""containerd's config.toml: validation, and the last-known-good copies nodemedic keeps.

A copy is taken only once containerd has run healthy with that content for a while (the keeper in
engine/lastgood.py decides when); copies are content-addressed (sha256) and the newest ``keep``
are kept. Validation is containerd's own: ``containerd --config FILE config dump`` loads the file
as containerd does; without the binary, a TOML parse is the fallback.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
import sys
from pathlib import Path

from nodemedic.state import atomic_write

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

CONTAINERD = "containerd"


class GoodConfigs:
    """Last-known-good copies of a config file under ``directory``, newest ``keep`` kept."""

    def __init__(self, directory: Path, keep: int = 5) -> None:
        self.directory = directory
        self.keep = keep

    def save(self, content: bytes) -> Path:
        digest = hashlib.sha256(content).hexdigest()
        path = self.directory / f"{digest}.toml"
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        if path.exists():
            os.utime(path)  # the newest again
        else:
            atomic_write(path, content.decode("utf-8", "surrogateescape"))
        for old in self.copies()[self.keep :]:
            old.unlink(missing_ok=True)
        return path

    def copies(self) -> list[Path]:
        """Newest first."""
        try:
            found = [
                p for p in self.directory.iterdir() if p.suffix == ".toml" and not p.name.startswith(".")
            ]
        except FileNotFoundError:
            return []
        return sorted(found, key=lambda p: p.stat().st_mtime, reverse=True)

    def latest(self) -> Path | None:
        copies = self.copies()
        return copies[0] if copies else None


async def config_problem(path: Path) -> str | None:
    """Why containerd would refuse the config at ``path``, or None if it loads."""
    try:
        content = await asyncio.to_thread(path.read_bytes)
    except FileNotFoundError:
        return f"{path} is missing"
    try:
        tomllib.loads(content.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        return f"not valid TOML: {exc}"
    binary = shutil.which(CONTAINERD)
    if binary is None:
        return None
    proc = await asyncio.create_subprocess_exec(
        binary, "--config", str(path), "config", "dump",
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    _, err = await proc.communicate()
    if proc.returncode != 0:
        return (
            err.decode("utf-8", "replace").strip().splitlines()[-1]
            if err.strip()
            else "refused by containerd"
        )
    return None


async def default_config() -> bytes:
    """``containerd config default`` with SystemdCgroup = true for runc (what Kubernetes needs)."""
    import tomlkit

    binary = shutil.which(CONTAINERD)
    if binary is None:
        raise FileNotFoundError("containerd is not installed: cannot generate a default config")
    proc = await asyncio.create_subprocess_exec(
        binary, "config", "default", stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"containerd config default failed: {err.decode(errors='replace').strip()}")
    doc = tomlkit.parse(out.decode())
    runc = doc["plugins"]["io.containerd.grpc.v1.cri"]["containerd"]["runtimes"]["runc"]
    runc["options"]["SystemdCgroup"] = True
    return tomlkit.dumps(doc).encode()
