"""Every state file nodemedic writes is checked when read back, and a full or read-only state
directory never stops a repair (issue 12, fault matrix item 3)."""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import pytest

from nodemedic import store as state
from nodemedic.actions.freezer import Freezer
from nodemedic.actions.sighup_reload import load_applied
from nodemedic.configs import GoodConfigs
from nodemedic.errors import StateSaveError
from nodemedic.events import PathChanged, PathKind, UnitChanged
from nodemedic.executor import Executor
from nodemedic.report import RecordKind
from nodemedic.sources import journal
from nodemedic.store import StateStore

from .test_runner import Harness

pytestmark = pytest.mark.unit

CURSOR = (
    "s=739ad463348b4ceca5a9e69c95a3c93f;i=4ece7;b=6c7c6013a8764c6eb1c3cb8a1c5be7ac;m=f9b71cf9;t=5d3b4d39ed4d1"
)


@pytest.fixture(autouse=True)
def _drained() -> None:
    state.take_set_aside(Path("/"))


def full_disk(*_: Any, **__: Any) -> None:
    raise OSError(errno.ENOSPC, "No space left on device")


def read_only_folder(*_: Any, **__: Any) -> None:
    raise OSError(errno.EROFS, "Read-only file system")


def aside(path: Path) -> list[Path]:
    return sorted(path.parent.glob(f"{path.name}.corrupt-*"))


# ---- checked loads ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "content", [b'{"version": 1, "rul', b"\xff\xfe", b"", b"[1, 2]", b'{"version": 7}'],
    ids=["half-written", "not-utf8", "empty", "not-a-dict", "other-version"],
)  # fmt: skip
def test_a_damaged_state_json_is_moved_aside_never_used(tmp_path: Path, content: bytes) -> None:
    store = StateStore(tmp_path)
    store.path.write_bytes(content)
    assert store.load() == {}
    assert not store.path.exists()
    [kept] = aside(store.path)
    assert kept.read_bytes() == content
    assert store.corrupt == str(kept)
    assert state.take_set_aside(tmp_path) == [], "the runner reports state.json itself"


def test_a_symlink_or_fifo_at_a_state_file_is_not_followed(tmp_path: Path) -> None:
    secret = tmp_path / "elsewhere"
    secret.write_text('{"version": 1}')
    link = tmp_path / "state.json"
    link.symlink_to(secret)
    assert StateStore(tmp_path).load() == {}
    assert secret.exists()
    assert not link.is_symlink()
    fifo = tmp_path / "cursor"
    os.mkfifo(fifo)
    assert state.load_checked(fifo, str) is None  # no hang on a FIFO
    assert [s.path for s in state.take_set_aside(tmp_path)] == [str(fifo)]


def test_a_damaged_file_in_a_read_only_folder_stays_but_is_refused_each_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "state.json"
    path.write_text("{")
    monkeypatch.setattr(state.os, "replace", read_only_folder)
    for _ in range(2):
        assert state.load_checked(path, json.loads) is None
    assert path.exists()
    assert [s.kept_as for s in state.take_set_aside(tmp_path)] == [str(path), str(path)]


def test_a_damaged_journal_cursor_is_moved_aside_and_noted(tmp_path: Path) -> None:
    cursor = tmp_path / "journal.cursor"
    cursor.write_text(CURSOR + "\n")
    assert state.load_checked(cursor, journal._checked_cursor) == CURSOR
    cursor.write_text(CURSOR[:40] + "\0garbage")
    assert state.load_checked(cursor, journal._checked_cursor) is None
    [noted] = state.take_set_aside(tmp_path)
    assert noted.path == str(cursor)
    assert "not a journal cursor" in noted.why
    assert aside(cursor)


def test_a_damaged_sighup_state_is_moved_aside(tmp_path: Path) -> None:
    path = tmp_path / "sighup.json"
    good = {"main_pid": 42, "started": "123", "applied": "ab" * 32}
    path.write_text(json.dumps(good))
    assert load_applied(path) == good
    path.write_text(json.dumps({**good, "applied": "not-a-digest"}))
    assert load_applied(path) == {}
    assert aside(path)
    assert [s.path for s in state.take_set_aside(tmp_path)] == [str(path)]


def test_a_damaged_freezer_registry_in_a_read_only_folder_still_thaws_what_it_names(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    registry = tmp_path / "frozen.json"
    registry.write_text('{"version": 1, "frozen": {"/system.slice/toolkit.scope": 17')
    monkeypatch.setattr(state.os, "replace", read_only_folder)
    monkeypatch.setattr(state, "atomic_write", read_only_folder)
    freezer = Freezer(cgroup_root=tmp_path / "cgroup", registry=registry)
    monkeypatch.setattr("nodemedic.actions.freezer.atomic_write", read_only_folder)
    assert freezer._load() == {"/system.slice/toolkit.scope": 0.0}


def test_a_good_config_copy_that_lost_its_content_is_never_restored(tmp_path: Path) -> None:
    good = GoodConfigs(tmp_path / "config-good")
    older = good.save(b"version = 2\n")
    newer = good.save(b'version = 2\n[plugins."io.containerd.grpc.v1.cri"]\n')
    os.utime(older, (1, 1))
    assert good.latest() == newer
    newer.write_bytes(b"version = 2\n[plugins")  # bit rot, a truncated disk block, a hand edit
    os.utime(newer, None)
    assert good.latest() == older
    assert aside(newer)
    assert not newer.exists()
    assert hashlib.sha256(older.read_bytes()).hexdigest() == older.stem
    [noted] = state.take_set_aside(tmp_path)
    assert "sha256" in noted.why


# ---- best-effort saves: said once, repairs go on ---------------------------------------------------


def test_a_failing_save_is_said_once_until_it_works_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "journal.cursor"
    monkeypatch.setattr(state, "atomic_write", full_disk)
    with caplog.at_level(logging.WARNING, logger="nodemedic.store"):
        assert [state.save_best_effort(path, "x") for _ in range(5)] == [False] * 5
        assert len(caplog.records) == 1
        assert "said once" in caplog.records[0].getMessage()
        monkeypatch.undo()
        assert state.save_best_effort(path, "x")
        assert "saved again" in caplog.records[-1].getMessage()


def test_state_json_save_fails_loudly_once_per_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = StateStore(tmp_path / "state")
    monkeypatch.setattr("nodemedic.store.atomic_write", full_disk)
    with pytest.raises(StateSaveError, match="repairs go on"):
        store.save({})
    store.save({})  # quiet: already said
    monkeypatch.undo()
    store.save({})
    monkeypatch.setattr("nodemedic.store.atomic_write", read_only_folder)
    with pytest.raises(StateSaveError, match="Read-only"):
        store.save({})


async def test_repairs_run_with_a_full_state_directory_and_say_it_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    h = Harness(tmp_path)
    h.runner = Executor(h.runner.policy, h.runner.ctx, h.runner.report, h._spawn, StateStore(tmp_path / "st"))
    h.runner.handle(UnitChanged("containerd.service", "activating", "auto-restart"))
    monkeypatch.setattr("nodemedic.store.atomic_write", full_disk)
    try:
        for _ in range(3):
            h.sock.mkdir()
            h.runner.handle(PathChanged(str(h.sock), PathKind.DIRECTORY))
            await h.settle()
            assert h.sock.is_socket()
            h.sock.unlink()
            h.clock.advance(60)
    finally:
        h.close()
    repaired = [r for r in h.sink.of(RecordKind.OUTCOME) if r.fields["OUTCOME"] == "repaired"]
    assert len(repaired) == 3
    errors = [r for r in h.sink.of(RecordKind.ERROR) if "cannot save state" in r.message]
    assert len(errors) == 1, [r.message for r in errors]


def test_a_reset_request_that_cannot_be_consumed_is_not_applied(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = StateStore(tmp_path)
    store.request_reset("socket-path-is-directory")
    monkeypatch.setattr(Path, "unlink", read_only_folder)
    assert store.take_resets() == [], "else it would be taken again at every reload"
