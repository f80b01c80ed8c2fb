"""containerd's drop-in for ``[sighup] mode = "coalesce"``: start containerd with SIGHUP ignored.

containerd does not handle SIGHUP, so Go's default (exit) applies, unless the process starts with
SIGHUP already ignored: Go keeps an inherited SIG_IGN for a signal the program never asks for, and
containerd never asks for SIGHUP. coreutils ``env --ignore-signal=HUP`` (>= 8.31) starts a program
that way, so the drop-in replaces the unit's ExecStart by the same command under that ``env``.

The drop-in is ours only if it has our name AND our marker line: nothing else is ever removed.
It takes effect at containerd's next start; ``ignores_sighup`` proves it did (SigIgn in /proc).
"""

from __future__ import annotations

import errno
import logging
import re
import stat
import subprocess
from pathlib import Path

from nodemedic.errors import DropinError
from nodemedic.ports import SystemdManager
from nodemedic.store import atomic_write

log = logging.getLogger(__name__)

DROPIN_NAME = "50-nodemedic-sighup.conf"
MARKER = "# nodemedic-sighup-dropin: written by nodemedic; `nodemedic sighup-restore` removes it"
ENV = "/usr/bin/env"
IGNORE_HUP = "--ignore-signal=HUP"
_ENVS = frozenset({"/usr/bin/env", "/bin/env"})
_UNIT_NAME = re.compile(r"^[A-Za-z0-9:_.\\@-]+\.service$")
# Words that need no quoting in a systemd command line (anything else is double-quoted).
_PLAIN = re.compile(r"^[A-Za-z0-9_@%+=:,./-]+$")
SIGHUP_BIT = 1 << 0  # SigIgn is a mask of signals 1..64: SIGHUP (1) is bit 0


def dropin_path(unit: str, persistent: bool, root: Path = Path("/")) -> Path:
    """The drop-in file for ``unit``: under /etc/systemd/system (survives a reboot) if
    ``persistent``, else under /run/systemd/system (a reboot reverts to stock)."""
    if not _UNIT_NAME.match(unit):
        raise DropinError(f"{unit!r} is not a service unit name (e.g. containerd.service)")
    base = "etc" if persistent else "run"
    return root / base / "systemd" / "system" / f"{unit}.d" / DROPIN_NAME


def render_dropin(exec_start: list[list[str]]) -> str:
    """The drop-in's text for the unit's ExecStart command lines, each run under ``env
    --ignore-signal=HUP``.

    ``exec_start`` is what ``SystemdBus.exec_start`` returns: per command line, the executable's
    path then its arguments; a path written ``-/usr/bin/x`` means ignore-failure (kept as systemd's
    ``-`` prefix). A command line we wrapped already is unwrapped first: never wrapped twice.
    """
    if not exec_start or any(not argv for argv in exec_start):
        raise DropinError("the unit has no ExecStart command to wrap; is it loaded and a service?")
    lines = [
        '# Written by nodemedic for its policy\'s [sighup] mode = "coalesce".',
        '# containerd exits on SIGHUP; started with SIGHUP ignored, a "reload" signal (e.g. from',
        "# nvidia-container-toolkit) no longer restarts it. nodemedic applies real config changes itself.",
        "# Undo: `nodemedic sighup-restore` (removes this file, reloads systemd; containerd ignores",
        "# SIGHUP until its next start), or set another [sighup] mode and reload nodemedic.",
        MARKER,
        "[Service]",
        "ExecStart=",
    ]
    for argv in exec_start:
        ignore_failure, command = _split_prefix(argv)
        command = unwrap(command)
        words = " ".join(quote(w) for w in [ENV, IGNORE_HUP, *command])
        lines.append(f"ExecStart={'-' if ignore_failure else ''}{words}")
    return "\n".join(lines) + "\n"


def unwrap(command: list[str]) -> list[str]:
    """The command without our ``env --ignore-signal=HUP`` in front (any number of times)."""
    while len(command) > 2 and command[0] in _ENVS and command[1] == IGNORE_HUP:
        command = command[2:]
    return command


def quote(word: str) -> str:
    """One word of a systemd command line: ``%`` and ``$`` doubled (no specifier, no variable
    expansion), double-quoted with C escapes where it holds anything but plain characters."""
    word = word.replace("%", "%%").replace("$", "$$")
    if _PLAIN.match(word):
        return word
    escaped = word.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\t", "\\t")
    return f'"{escaped}"'


def _split_prefix(argv: list[str]) -> tuple[bool, list[str]]:
    first = argv[0]
    if first.startswith("-"):
        return True, [first[1:], *argv[1:]]
    return False, list(argv)


def is_ours(path: Path) -> bool:
    """A regular file (not a symlink) with our name whose lines include our marker."""
    try:
        if path.name != DROPIN_NAME or not stat.S_ISREG(path.lstat().st_mode):
            return False
        return MARKER in path.read_text(encoding="utf-8", errors="replace").splitlines()
    except FileNotFoundError:
        return False


def install_dropin(path: Path, text: str) -> bool:
    """Write the drop-in atomically (mode 0644); False if it is there already with this text.
    Refuses to replace a file at our path that lacks our marker: it is someone else's."""
    if MARKER not in text.splitlines():
        raise DropinError("refusing to write a drop-in without nodemedic's marker line")
    if path.exists() or path.is_symlink():
        if not is_ours(path):
            raise DropinError(f"{path} exists and is not nodemedic's (no marker line): remove it by hand")
        if path.read_text(encoding="utf-8") == text:
            return False
    atomic_write(path, text, mode=0o644)
    return True


async def dropin_text(systemd: SystemdManager, unit: str) -> str:
    """The check of an install: the drop-in for ``unit``'s ExecStart as systemd has it now."""
    return render_dropin(await systemd.exec_start(unit))


def install_for(unit: str, persistent: bool, text: str, root: Path = Path("/")) -> bool:
    """The apply step: install the drop-in at its place (/etc if ``persistent``, else /run); our
    copy at the other place goes, so that turning ``persistent`` off really reverts at the next
    reboot. False if nothing changed."""
    other = dropin_path(unit, not persistent, root)
    moved = is_ours(other)
    if moved:
        other.unlink()
    return install_dropin(dropin_path(unit, persistent, root), text) or moved


def remove_dropins(unit: str, root: Path = Path("/")) -> list[Path]:
    """Remove our drop-in for ``unit`` from /run and /etc; returns what was removed. A file with
    our name but without our marker is left alone (and logged). The ``.d`` folder goes only if empty
    (inside nodemedic's sandbox it is a mount point and stays)."""
    removed = []
    for persistent in (False, True):
        path = dropin_path(unit, persistent, root)
        if not is_ours(path):
            if path.exists() or path.is_symlink():
                log.warning("%s is not nodemedic's (no marker line): left alone", path)
            continue
        path.unlink()
        removed.append(path)
        try:
            path.parent.rmdir()
        except OSError as exc:
            if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.EBUSY, errno.EROFS):
                raise
    return removed


def ignores_sighup(pid: int, proc: Path = Path("/proc")) -> bool:
    """Whether process ``pid`` has SIGHUP ignored (SigIgn in /proc/PID/status); False if it is gone."""
    try:
        text = (proc / str(pid) / "status").read_text(encoding="utf-8")
    except (FileNotFoundError, ProcessLookupError):
        return False
    for line in text.splitlines():
        if line.startswith("SigIgn:"):
            return bool(int(line.split()[1], 16) & SIGHUP_BIT)
    return False


def env_ignores_signals(env: str = ENV) -> bool:
    """Whether ``env`` supports ``--ignore-signal`` (coreutils >= 8.31). Without it, coalesce cannot
    work: the drop-in would make containerd fail to start."""
    try:
        done = subprocess.run(  # noqa: S603 (a fixed program and arguments)
            [env, IGNORE_HUP, "true"], check=False, capture_output=True, timeout=10
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0
