"""FileWatcher with real inotify: the ways tools write a config file all wake it."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from pathlib import Path

import pytest

from nodemedic.clock import MonotonicClock
from nodemedic.events import Event, FileChanged
from nodemedic.sources.filewatch import FileWatcher

from .helpers import Recorder, running

pytestmark = pytest.mark.component


def is_change(path: Path) -> Callable[[Event], bool]:
    return lambda e: isinstance(e, FileChanged) and e.path == str(path)


async def test_in_place_writes_and_renames_over_are_seen(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text("version = 2\n")
    recorder = Recorder()
    async with running(recorder, FileWatcher([str(config)], recorder.emit, MonotonicClock()).run()):
        await asyncio.sleep(0.05)
        config.write_text("version = 2\n# edited in place\n")
        await recorder.until(is_change(config))
        assert recorder.pending() == [], "one write, one event"
        staged = tmp_path / ".config.toml.tmp"
        staged.write_text("version = 2\n# renamed over\n")
        os.replace(staged, config)
        await recorder.until(is_change(config))


async def test_other_files_in_the_folder_are_not_reported(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text("")
    recorder = Recorder()
    async with running(recorder, FileWatcher([str(config)], recorder.emit, MonotonicClock()).run()):
        await asyncio.sleep(0.05)
        (tmp_path / "other.toml").write_text("x")
        await asyncio.sleep(0.2)
        assert recorder.pending() == []


async def test_a_missing_folder_is_reported_and_the_source_keeps_running(tmp_path: Path) -> None:
    said: list[str] = []
    recorder = Recorder()
    watcher = FileWatcher(
        [str(tmp_path / "absent" / "config.toml")], recorder.emit, MonotonicClock(), said.append
    )
    async with running(recorder, watcher.run()) as task:
        await asyncio.sleep(0.1)
        assert not task.done()
    assert "does not exist" in said[0]
