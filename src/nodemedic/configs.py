"""containerd's config.toml: validation, and the last-known-good copies nodemedic keeps.

A copy is taken only once containerd has run healthy with that content for a while (the keeper in
actions/good_config.py decides when); copies are content-addressed (sha256) and the newest ``keep``
are kept. Validation is containerd's own: ``containerd --config FILE config dump`` loads the file
as containerd does; without the binary, a TOML parse is the fallback.

The file is read as hostile input (a pod with a hostPath mount of /etc/containerd can write it):
only a regular file, never through a symlink at its path, without blocking, at most
MAX_CONFIG_BYTES. A symlinked (or otherwise not regular) config.toml gets no verdict: nodemedic
neither follows, judges nor replaces it, so a node that links its config elsewhere gets a record
saying so (OUTCOME=unchecked), never a repair over a file that may well load.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import glob
import hashlib
import itertools
import os
import shutil
import signal
import stat
import sys
from collections.abc import MutableMapping
from pathlib import Path
from typing import Any

from nodemedic.errors import ConfigCheckError, ConfigFileError, DefaultConfigError
from nodemedic.store import atomic_write, set_aside

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

CONTAINERD = "containerd"
# Real configs are 7-15 KiB (containerd's default is 7 KiB, each extra runtime about 1 KiB), so
# 1 MiB leaves a wide margin while bounding the cost of a crafted file: measured at 1 MiB, a
# parse peaks at about 110 MB in tomllib and 105 MB in `containerd config dump` (4 MiB: 450 MB),
# which fits nodemedic.service's MemoryMax=.
MAX_CONFIG_BYTES = 1 << 20
_MAX_IMPORTS = 64
# `containerd config dump` answers in well under a second; a config that makes it wait longer
# (``imports`` of a FIFO, say) would hang containerd's own start as well.
CONTAINERD_CHECK_TIMEOUT = 30.0
# Where the runc options live: containerd 1.x (config version 2), then 2.x (version 3).
RUNC_RUNTIME_PATHS = (
    ("plugins", "io.containerd.grpc.v1.cri", "containerd", "runtimes", "runc"),
    ("plugins", "io.containerd.cri.v1.runtime", "containerd", "runtimes", "runc"),
)
_PROBLEM_CHARS = 500  # of containerd's message: it may echo a crafted file's content


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
        """The newest copy whose content still has its name's sha256; a damaged one (a disk error,
        a hand edit) is moved aside (``NAME.corrupt-<time>``) and never restored."""
        for copy in self.copies():
            try:
                content = read_config(copy)
            except OSError as exc:
                set_aside(copy, f"cannot read: {exc}")
                continue
            if hashlib.sha256(content).hexdigest() == copy.stem:
                return copy
            set_aside(copy, "its content no longer has the sha256 it is named after")
        return None


def file_kind(mode: int) -> str:
    """What a file of ``mode`` is, in words for a record."""
    kinds = (
        (stat.S_ISLNK, "a symbolic link"),
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
    )
    return next((name for test, name in kinds if test(mode)), "not a regular file")


def not_regular(path: Path, mode: int) -> ConfigFileError:
    return ConfigFileError(
        f"{path} is {file_kind(mode)}, not a regular file: nodemedic neither follows nor replaces it "
        "(put a regular file there by hand)"
    )


def read_config(path: Path) -> bytes:
    """The bytes of the regular file at ``path``, read without following a symlink there, without
    blocking (a FIFO), and at most MAX_CONFIG_BYTES (a link to /dev/zero, a crafted huge file).
    FileNotFoundError if there is none; ConfigFileError if it is not a file nodemedic reads."""
    found = os.lstat(path)  # a device or FIFO is refused before any open (opening one can act)
    if not stat.S_ISREG(found.st_mode):
        raise not_regular(path, found.st_mode)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno == errno.ELOOP:  # swapped for a symlink since the lstat
            raise not_regular(path, stat.S_IFLNK) from exc
        raise
    try:
        opened = os.fstat(fd)
        if not stat.S_ISREG(opened.st_mode):
            raise not_regular(path, opened.st_mode)
        chunks, size = [], 0
        while size <= MAX_CONFIG_BYTES and (chunk := os.read(fd, 1 << 16)):
            chunks.append(chunk)
            size += len(chunk)
    finally:
        os.close(fd)
    if size > MAX_CONFIG_BYTES:
        raise ConfigFileError(
            f"{path} is larger than {MAX_CONFIG_BYTES >> 20} MiB: not a containerd "
            "config nodemedic parses (real ones are a few KiB)"
        )
    return b"".join(chunks)


async def config_problem(path: Path) -> str | None:
    """Why containerd would refuse the config at ``path``, or None if it loads. Never raises on
    the file's content: crafted content is a problem like any other. What gives no verdict raises
    instead, so that nothing is restored over a file that may well load: ConfigFileError for a file
    nodemedic does not read (a symlink, FIFO, directory or device at the path, an oversized or
    unreadable file), ConfigCheckError when containerd's own check was killed."""
    try:
        content = await asyncio.to_thread(read_config, path)
    except FileNotFoundError:
        return f"{path} is missing"
    except ConfigFileError:
        raise
    except OSError as exc:
        raise ConfigFileError(f"{path} cannot be read: {exc.strerror or exc}") from exc
    problem = await asyncio.to_thread(toml_problem, content) or await asyncio.to_thread(
        imports_problem, content, path
    )
    if problem is not None:
        return problem
    binary = shutil.which(CONTAINERD)
    return None if binary is None else await _containerd_problem(binary, path)


def parsed_config(path: Path) -> dict[str, Any] | None:
    """containerd's config at ``path`` as TOML, read as ``read_config`` does (a regular file, never
    through a symlink, at most 1 MiB); None if it cannot be read or is not TOML. For readers that
    only look a setting up: a broken config is the config rules' business, never an error here."""
    try:  # ValueError: UnicodeDecodeError, TOMLDecodeError; a nesting too deep is RecursionError
        return tomllib.loads(read_config(path).decode("utf-8"))
    except (OSError, ValueError, RecursionError, MemoryError):
        return None


def imports_problem(content: bytes, path: Path) -> str | None:
    """``imports`` that containerd would read but nodemedic would not: a FIFO, a device or
    /dev/zero would hang `containerd config dump` (and containerd's start) or have it read until
    the unit's MemoryMax= kills it. Each import must be a regular file of at most
    MAX_CONFIG_BYTES (stat only, never opened); missing ones are containerd's to refuse."""
    imports = tomllib.loads(content.decode("utf-8")).get("imports", [])
    if not isinstance(imports, list):
        return None  # containerd refuses it itself
    for pattern in (i for i in imports[:_MAX_IMPORTS] if isinstance(i, str)):
        for found in itertools.islice(glob.iglob(os.path.join(path.parent, pattern)), _MAX_IMPORTS):
            try:
                st = os.stat(found)
            except OSError:
                continue
            if not stat.S_ISREG(st.st_mode):
                return f"imports {found}, which is {file_kind(st.st_mode)}, not a regular file"
            if st.st_size > MAX_CONFIG_BYTES:
                return f"imports {found}, larger than {MAX_CONFIG_BYTES} bytes"
    if len(imports) > _MAX_IMPORTS:
        return f"more than {_MAX_IMPORTS} imports: no real config has that many"
    return None


def toml_problem(content: bytes) -> str | None:
    """Why ``content`` is not TOML, or None. tomllib's own errors and what a crafted file gets out
    of it instead (RecursionError from deep nesting, ValueError from a 5,000-digit integer, memory)
    are all "not valid TOML"."""
    try:
        tomllib.loads(content.decode("utf-8"))
    except RecursionError:
        return "not valid TOML: nested too deeply"
    except MemoryError:
        return "not valid TOML: too large to parse"
    except ValueError as exc:  # TOMLDecodeError and UnicodeDecodeError are ValueErrors too
        return f"not valid TOML: {exc}"
    return None


async def _containerd_problem(binary: str, path: Path) -> str | None:
    """containerd's own verdict: ``config dump`` loads the file (imports included) as a start would."""
    argv = (binary, "--config", str(path), "config", "dump")
    proc = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE
    )
    try:
        _, err = await asyncio.wait_for(proc.communicate(), CONTAINERD_CHECK_TIMEOUT)
    except asyncio.TimeoutError:  # not the builtin TimeoutError on 3.10
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
        return (
            f"containerd did not load it within {CONTAINERD_CHECK_TIMEOUT:.0f} s (imports a FIFO or device?)"
        )
    code = proc.returncode or 0
    if code == 0:
        return None
    if code < 0:  # killed, not refused: a valid edit must not be rolled back on a guess
        raise ConfigCheckError(
            f"`containerd config dump` of {path} was killed by {_signal_name(-code)}: cannot tell "
            "whether it loads (out of memory? see MemoryMax= in docs/packaging.md); left as it is"
        )
    lines = err.decode("utf-8", "replace").strip().splitlines()
    return lines[-1][:_PROBLEM_CHARS] if lines else "refused by containerd"


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


async def default_config() -> bytes:
    """``containerd config default`` with SystemdCgroup = true for runc (what Kubernetes needs),
    for containerd 1.x and 2.x alike."""
    import tomlkit

    binary = shutil.which(CONTAINERD)
    if binary is None:
        raise DefaultConfigError("containerd is not installed: cannot generate a default config")
    proc = await asyncio.create_subprocess_exec(
        binary, "config", "default", stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await proc.communicate()
    if proc.returncode != 0:
        raise DefaultConfigError(f"containerd config default failed: {err.decode(errors='replace').strip()}")
    try:
        doc = tomlkit.parse(out.decode())
    except (ValueError, tomlkit.exceptions.TOMLKitError) as exc:
        raise DefaultConfigError(f"containerd config default printed no valid TOML: {exc}") from exc
    _runc_options(doc)["SystemdCgroup"] = True
    return tomlkit.dumps(doc).encode()


def _runc_options(doc: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """The runc runtime's ``options`` table, under whichever plugin this containerd has."""
    import tomlkit

    for keys in RUNC_RUNTIME_PATHS:
        table: Any = doc
        for key in keys:
            table = table.get(key) if isinstance(table, MutableMapping) else None
        if isinstance(table, MutableMapping):
            if "options" not in table:
                table["options"] = tomlkit.table()
            options = table["options"]
            if isinstance(options, MutableMapping):
                return options
    wanted = " or ".join(f'plugins."{keys[1]}".containerd.runtimes.runc' for keys in RUNC_RUNTIME_PATHS)
    raise DefaultConfigError(
        f"`containerd config default` has no runc runtime table ({wanted}) to set SystemdCgroup on: "
        "restore config.toml by hand or keep a last-known-good copy"
    )
