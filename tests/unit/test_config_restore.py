"""restore-config and the last-known-good copies, on real files (containerd absent here: the TOML
parse is the validator; the lab tests use containerd's own)."""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from nodemedic.actions.base import ActionContext, Skip, Step
from nodemedic.actions.config_restore import RestoreConfig
from nodemedic.configs import GoodConfigs
from nodemedic.errors import ConfigFileError, UnsafePathError
from nodemedic.policy.actions import RestoreConfigParams

from .fakes import FakeClock, FakeProbe, FakeUnits

pytestmark = pytest.mark.unit
GOOD = b'version = 2\n\n[plugins."io.containerd.grpc.v1.cri".containerd]\n  snapshotter = "overlayfs"\n'
BROKEN = b'version = 2\n[plugins."io.containerd.grpc.v1.cri".containerd\n'


def setup(tmp_path: Path) -> tuple[RestoreConfig, ActionContext, Path, GoodConfigs]:
    config = tmp_path / "etc" / "config.toml"
    config.parent.mkdir()
    store = GoodConfigs(tmp_path / "good", keep=2)
    ctx = ActionContext(FakeUnits(), FakeProbe(), FakeClock(), tmp_path / "q", good_configs=store)
    return RestoreConfig(RestoreConfigParams(do="restore-config", path=str(config))), ctx, config, store


async def test_a_loadable_config_is_never_touched(tmp_path: Path) -> None:
    action, ctx, config, store = setup(tmp_path)
    config.write_bytes(GOOD)
    store.save(b"version = 2\n")
    assert isinstance(await action.check(ctx), Skip)
    assert config.read_bytes() == GOOD


async def test_broken_config_is_kept_aside_and_the_good_copy_restored_byte_for_byte(tmp_path: Path) -> None:
    action, ctx, config, store = setup(tmp_path)
    store.save(GOOD)
    config.write_bytes(BROKEN)
    os.chmod(config, 0o640)
    step = await action.check(ctx)
    assert isinstance(step, Step)
    assert "not valid TOML" in step.detail
    detail = await action.apply(ctx, step)
    await action.verify(ctx, step)
    assert config.read_bytes() == GOOD
    assert oct(config.stat().st_mode & 0o777) == "0o640", "mode kept"
    [aside] = config.parent.glob("config.toml.broken-*")
    assert aside.read_bytes() == BROKEN, "the broken file is kept, never deleted"
    assert str(aside) in detail


def test_copies_are_content_addressed_and_pruned(tmp_path: Path) -> None:
    store = GoodConfigs(tmp_path, keep=2)
    first = store.save(b"a = 1\n")
    assert store.save(b"a = 1\n") == first, "the same content is one copy"
    store.save(b"a = 2\n")
    newest = store.save(b"a = 3\n")
    assert len(store.copies()) == 2
    assert store.latest() == newest
    assert not first.exists()


async def test_without_a_copy_and_generate_false_the_broken_file_is_left(tmp_path: Path) -> None:
    _, ctx, config, _ = setup(tmp_path)
    action = RestoreConfig(RestoreConfigParams(do="restore-config", path=str(config), generate=False))
    config.write_bytes(BROKEN)
    skip = await action.check(ctx)
    assert isinstance(skip, Skip)
    assert "no last-known-good copy" in skip.reason
    assert config.read_bytes() == BROKEN


async def restore_step(tmp_path: Path, mode: int = 0o640) -> tuple[RestoreConfig, ActionContext, Path, Step]:
    """A broken config.toml (``mode``) and a good copy: the step restore-config would take."""
    action, ctx, config, store = setup(tmp_path)
    store.save(GOOD)
    config.write_bytes(BROKEN)
    os.chmod(config, mode)
    step = await action.check(ctx)
    assert isinstance(step, Step)
    return action, ctx, config, step


def after_each_call(monkeypatch: pytest.MonkeyPatch, hook: Callable[[str, tuple[Any, ...]], None]) -> None:
    """Run ``hook(name, args)`` after each file-system call the restore may make."""
    for name in ("rename", "replace", "link", "unlink", "open", "write", "close", "fsync", "fchmod",
                 "fchown", "chmod", "chown"):  # fmt: skip
        real = getattr(os, name)

        def wrapped(*args: Any, _real: Any = real, _name: str = name, **kwargs: Any) -> Any:
            result = _real(*args, **kwargs)
            hook(_name, args)
            return result

        monkeypatch.setattr(os, name, wrapped)


async def test_config_toml_exists_at_every_step_of_the_restore(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    action, ctx, config, step = await restore_step(tmp_path)
    missing: list[str] = []
    after_each_call(
        monkeypatch, lambda name, _: missing.append(name) if not os.path.lexists(config) else None
    )
    await action.apply(ctx, step)
    assert missing == [], "a containerd starting in that gap would run on its built-in defaults"
    assert config.read_bytes() == GOOD
    [aside] = config.parent.glob("config.toml.broken-*")
    assert aside.read_bytes() == BROKEN


async def test_mode_and_owner_are_set_on_the_new_file_not_through_the_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A symlink swapped in at config.toml right after the rename is not chmodded through."""
    action, ctx, config, step = await restore_step(tmp_path)
    victim = tmp_path / "victim"
    victim.write_bytes(b"not yours\n")
    os.chmod(victim, 0o600)
    by_name: list[str] = []

    def swap_after_rename(name: str, args: tuple[Any, ...]) -> None:
        if name in ("chmod", "chown"):
            by_name.append(name)
        if name in ("rename", "replace") and Path(args[1]).name == config.name and not config.is_symlink():
            config.unlink()
            config.symlink_to(victim)

    after_each_call(monkeypatch, swap_after_rename)
    await action.apply(ctx, step)
    assert stat.S_IMODE(victim.stat().st_mode) == 0o600, "the victim keeps its mode"
    assert victim.read_bytes() == b"not yours\n"
    assert by_name == [], "mode and owner are set on the fd"


async def test_the_restored_file_is_roots_and_setuid_setgid_sticky_and_world_write_are_dropped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """nodemedic.service has no CAP_CHOWN: keeping another owner failed the restore (EPERM)."""
    action, ctx, config, step = await restore_step(tmp_path, mode=0o7777)
    os.chown(config, 1234, 4321)

    def no_cap_chown(*args: object, **kwargs: object) -> None:
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "fchown", no_cap_chown)
    monkeypatch.setattr(os, "chown", no_cap_chown)
    detail = await action.apply(ctx, step)
    restored = config.lstat()
    assert stat.S_IMODE(restored.st_mode) == 0o775
    assert (restored.st_uid, restored.st_gid) == (os.geteuid(), os.getegid())
    assert "1234:4321 not kept" in detail


async def test_the_folder_is_fsynced_after_the_rename(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    action, ctx, config, step = await restore_step(tmp_path)
    synced: list[tuple[int, bytes]] = []
    real_fsync = os.fsync

    def recording_fsync(fd: int) -> None:
        found = os.fstat(fd)
        if stat.S_ISDIR(found.st_mode):
            synced.append((found.st_ino, config.read_bytes()))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    await action.apply(ctx, step)
    assert synced == [(config.parent.stat().st_ino, GOOD)], (
        "config.toml's folder, once it holds the good copy"
    )


@pytest.mark.parametrize("kind", ["symlink", "fifo", "directory"])
async def test_what_is_not_a_regular_file_is_refused_never_followed(tmp_path: Path, kind: str) -> None:
    action, ctx, config, store = setup(tmp_path)
    store.save(GOOD)
    target = tmp_path / "elsewhere.toml"
    target.write_bytes(BROKEN)
    {"symlink": lambda: config.symlink_to(target), "fifo": lambda: os.mkfifo(config),
     "directory": config.mkdir}[kind]()  # fmt: skip
    with pytest.raises(ConfigFileError, match="not a regular file: nodemedic neither follows nor replaces"):
        await action.check(ctx)
    assert target.read_bytes() == BROKEN, "a symlink's target is never replaced"
    assert sorted(p.name for p in config.parent.iterdir()) == ["config.toml"], "nothing written or kept aside"


async def test_a_symlink_swapped_in_before_the_link_aside_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    action, ctx, config, step = await restore_step(tmp_path)
    victim = tmp_path / "victim"
    victim.write_bytes(b"not yours\n")
    real_link = os.link

    def swap_then_link(*args: Any, **kwargs: Any) -> None:
        config.unlink()
        config.symlink_to(victim)
        real_link(*args, **kwargs)

    monkeypatch.setattr(os, "link", swap_then_link)
    with pytest.raises(UnsafePathError, match="was replaced while it was being kept aside"):
        await action.apply(ctx, step)
    assert config.is_symlink(), "left as found"
    assert victim.read_bytes() == b"not yours\n"
    assert sorted(p.name for p in config.parent.iterdir()) == ["config.toml"], "no aside link, no temp file"
