"""Paths in the policy: absolute and normalised, so what nodemedic acts on as root is what was meant.

A relative path would be resolved against whatever directory nodemedic was started in, and ``..`` or
``//`` make two spellings of one file that string comparisons (mount checks, "directly inside root")
tell apart. Shared by the policy's models and the actions' params models.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

from pydantic import AfterValidator, BeforeValidator

PATH_MAX = 4096  # Linux's limit on a path handed to a system call


def absolute_path(path: str) -> str:
    """``path`` itself if it is absolute and normalised; a ValueError that says what to fix if not."""
    shown = repr(path) if len(path) <= 60 else f"{path[:57]!r}..."
    if "\0" in path:
        raise ValueError(f"{shown} contains a NUL character, which no path can hold: remove it")
    if len(path.encode("utf-8", "surrogateescape")) >= PATH_MAX:
        raise ValueError(f"{shown} is longer than Linux allows in a path ({PATH_MAX - 1} bytes)")
    if not path.startswith("/") or path == "/" or os.path.normpath(path) != path or path.startswith("//"):
        raise ValueError(
            f"{shown} must be an absolute, normalised path: start it with /, and leave out '.', '..', "
            "'//' and a trailing /"
        )
    return path


def _absolute_dir(value: object) -> object:
    """Checked on the text as written: pathlib would quietly drop a trailing / or a '.'."""
    if isinstance(value, str | Path):
        absolute_path(str(value))
    return value  # anything else: pydantic's own "not a valid path"


AbsolutePath = Annotated[str, AfterValidator(absolute_path)]
"""A path kept as text (compared with paths found in events)."""

AbsoluteDir = Annotated[Path, BeforeValidator(_absolute_dir)]
"""A directory nodemedic reads or writes (its state, tracefs, a /proc)."""
