"""Typed errors. Each subclasses NodemedicError and the builtin it resembles; messages say what to fix."""

from __future__ import annotations


class NodemedicError(Exception):
    """Base class of every error nodemedic raises on purpose."""


class PolicyError(NodemedicError, ValueError):
    """The policy file cannot be used. ``problems`` lists every problem found, one line each."""

    def __init__(self, path: str, problems: list[str]) -> None:
        self.path = path
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"invalid policy {path}:\n{lines}")


class UnsafePathError(NodemedicError, PermissionError):
    """A repair refused to touch a path because doing so could lose data or escape its root."""


class RepairFailedError(NodemedicError, RuntimeError):
    """An action ran but the state it was meant to produce did not come about."""


class UnitControlError(NodemedicError, RuntimeError):
    """systemd refused or failed a unit job (start, stop, restart)."""


class ProbeError(NodemedicError, ConnectionError):
    """containerd did not answer a real request in time."""


class UnknownRuleError(NodemedicError, LookupError):
    """No ``[[rule]]`` has the name given on the command line."""


class DropinError(NodemedicError, ValueError):
    """containerd's drop-in cannot be written or wrapped (no ExecStart, someone else's file at our path)."""


class FreezeRefusedError(NodemedicError, PermissionError):
    """A cgroup that must never be frozen (deny list, protected, root, not a leaf with processes)."""


class FreezeFailedError(NodemedicError, RuntimeError):
    """Freezing or thawing a cgroup was asked of the kernel but did not take effect."""


class ConfigFileError(NodemedicError, OSError):
    """containerd's config is not a file nodemedic reads: not a regular file (a symlink, FIFO,
    directory or device at its path), or larger than any real containerd config."""


class DefaultConfigError(NodemedicError, RuntimeError):
    """``containerd config default`` failed or printed a config without the runc runtime to set
    SystemdCgroup on: nothing to restore from."""


class ConfigCheckError(NodemedicError, ChildProcessError):
    """containerd's own config check ended without a verdict (``containerd config dump`` killed by
    a signal, e.g. the OOM killer at the unit's MemoryMax=): whether the file loads is not known,
    so nothing is restored over it and no copy of it is kept."""


class StateSaveError(NodemedicError, OSError):
    """A state file could not be saved (a full or read-only state directory); nodemedic goes on."""


class SourceFailedError(NodemedicError, RuntimeError):
    """A source (D-Bus, journald, inotify, ...) stopped with an error: nodemedic cannot see the node
    any more, so it exits (systemd's Restart= starts it again) rather than run blind."""
