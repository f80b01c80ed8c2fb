"""restore-config and the last-known-good copies, on real files (containerd absent here: the TOML
parse is the validator; the lab tests use containerd's own)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from nodemedic.actions.base import ActionContext, Skip, Step
from nodemedic.actions.config_restore import RestoreConfig, RestoreConfigParams
from nodemedic.configs import GoodConfigs

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
