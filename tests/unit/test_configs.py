"""configs.py: the generated default for containerd 1.x and 2.x (a fake `containerd` on PATH
prints each one's `config default`), the config check on files that are not what they seem, and
atomic_write's durability (the folder is fsynced)."""

from __future__ import annotations

import os
import stat
import sys
from pathlib import Path

import pytest

from nodemedic import configs
from nodemedic.configs import MAX_CONFIG_BYTES, config_problem, default_config, read_config
from nodemedic.errors import ConfigCheckError, ConfigFileError, DefaultConfigError, NodemedicError
from nodemedic.store import atomic_write

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

pytestmark = pytest.mark.unit

# Trimmed from `containerd config default` of 1.6.20 (lab) and of 2.x (config version 3: the CRI
# plugin split in two; `io.containerd.grpc.v1.cri` is still there, without a `containerd` table).
DEFAULT_1_6 = """version = 2
root = "/var/lib/containerd"

[plugins]
  [plugins."io.containerd.grpc.v1.cri"]
    sandbox_image = "registry.k8s.io/pause:3.6"
    [plugins."io.containerd.grpc.v1.cri".containerd]
      default_runtime_name = "runc"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes]
        [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
          runtime_type = "io.containerd.runc.v2"
          [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
            BinaryName = ""
            SystemdCgroup = false
"""
DEFAULT_2_X = """version = 3
root = '/var/lib/containerd'

[plugins]
  [plugins.'io.containerd.cri.v1.images']
    snapshotter = 'overlayfs'

  [plugins.'io.containerd.cri.v1.runtime']
    enable_selinux = false
    [plugins.'io.containerd.cri.v1.runtime'.containerd]
      default_runtime_name = 'runc'
      [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes]
        [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc]
          runtime_type = 'io.containerd.runc.v2'
          [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc.options]
            BinaryName = ''
            SystemdCgroup = false

  [plugins.'io.containerd.grpc.v1.cri']
    disable_tcp_service = true
"""
NO_RUNC = """version = 3

[plugins]
  [plugins.'io.containerd.grpc.v1.cri']
    disable_tcp_service = true
"""


def fake_containerd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, script: str) -> None:
    """A `containerd` first on PATH, running ``script`` (sh)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    binary = bin_dir / "containerd"
    binary.write_text(f"#!/bin/sh\n{script}\n")
    binary.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ.get('PATH', os.defpath)}")


def printing(config: str) -> str:
    return f"cat <<'TOML'\n{config}TOML"


@pytest.mark.parametrize(
    ("config", "plugin"),
    [(DEFAULT_1_6, "io.containerd.grpc.v1.cri"), (DEFAULT_2_X, "io.containerd.cri.v1.runtime")],
    ids=["containerd-1.6", "containerd-2.x"],
)
async def test_the_default_gets_systemd_cgroup_under_either_plugin(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, config: str, plugin: str
) -> None:
    fake_containerd(tmp_path, monkeypatch, printing(config))
    doc = tomllib.loads((await default_config()).decode())
    runc = doc["plugins"][plugin]["containerd"]["runtimes"]["runc"]
    assert runc["options"]["SystemdCgroup"] is True
    assert runc["options"]["BinaryName"] == "", "the rest of containerd's default is kept"
    assert doc["version"] == tomllib.loads(config)["version"]


async def test_a_default_without_a_runc_runtime_is_a_typed_error_naming_both_paths(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_containerd(tmp_path, monkeypatch, printing(NO_RUNC))
    with pytest.raises(DefaultConfigError) as caught:
        await default_config()
    message = str(caught.value)
    assert 'plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc' in message
    assert 'plugins."io.containerd.cri.v1.runtime".containerd.runtimes.runc' in message
    assert isinstance(caught.value, NodemedicError), "the runner's error handling applies"


@pytest.mark.parametrize(
    ("script", "expected"),
    [("echo boom >&2; exit 3", "config default failed: boom"), ("echo '[[[not toml'", "no valid TOML")],
    ids=["fails", "prints-garbage"],
)
async def test_a_failing_or_garbled_default_is_a_typed_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, script: str, expected: str
) -> None:
    fake_containerd(tmp_path, monkeypatch, script)
    with pytest.raises(DefaultConfigError, match=expected):
        await default_config()


async def test_a_default_with_runc_but_no_options_table_gets_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = (
        "version = 3\n[plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc]\nruntime_type = 'x'\n"
    )
    fake_containerd(tmp_path, monkeypatch, printing(config))
    doc = tomllib.loads((await default_config()).decode())
    runc = doc["plugins"]["io.containerd.cri.v1.runtime"]["containerd"]["runtimes"]["runc"]
    assert runc == {"runtime_type": "x", "options": {"SystemdCgroup": True}}


async def test_containerds_own_verdict_is_used_and_bounded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "config.toml"
    config.write_text("version = 2\n")
    fake_containerd(
        tmp_path,
        monkeypatch,
        'echo "containerd: invalid plugin key URI $(printf x%.0s $(seq 900))" >&2; exit 1',
    )
    problem = await config_problem(config)
    assert problem is not None
    assert problem.startswith("containerd: invalid plugin key URI")
    assert len(problem) <= 500, "containerd may echo a crafted file: the record stays short"


async def test_a_containerd_check_that_hangs_is_a_problem_not_a_hang(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "config.toml"
    config.write_text("version = 2\n")
    fake_containerd(tmp_path, monkeypatch, "exec sleep 60")
    monkeypatch.setattr(configs, "CONTAINERD_CHECK_TIMEOUT", 0.2)
    problem = await config_problem(config)
    assert problem is not None
    assert "did not load it within" in problem


async def test_a_containerd_check_killed_by_a_signal_gives_no_verdict(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The OOM killer at MemoryMax= ends `config dump` with SIGKILL: that says nothing about the
    file, so it must not read as "refused" (a valid edit would be rolled back to the good copy)."""
    config = tmp_path / "config.toml"
    config.write_text("version = 2\n")
    fake_containerd(tmp_path, monkeypatch, 'echo "partial output" >&2; kill -KILL $$')
    with pytest.raises(ConfigCheckError, match="killed by SIGKILL: cannot tell"):
        await config_problem(config)
    assert config.read_text() == "version = 2\n"


@pytest.mark.parametrize("kind", ["fifo", "dev-zero", "directory", "large"])
async def test_imports_that_would_hang_or_flood_containerds_check_are_a_problem(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str
) -> None:
    """`imports = ["/dev/zero"]` is valid TOML: containerd would read it until MemoryMax= killed
    the check (or block on a FIFO), so nodemedic refuses it before running containerd on it."""
    fake_containerd(tmp_path, monkeypatch, "touch ran; exit 0")
    monkeypatch.chdir(tmp_path)
    imported = tmp_path / "imported.toml"
    if kind == "fifo":
        os.mkfifo(imported)
    elif kind == "directory":
        imported.mkdir()
    elif kind == "large":
        imported.write_bytes(b"#" * (MAX_CONFIG_BYTES + 1))
    target = "/dev/zero" if kind == "dev-zero" else "imported.toml"  # relative: beside config.toml
    config = tmp_path / "config.toml"
    config.write_text(f'version = 2\nimports = ["{target}"]\n')
    problem = await config_problem(config)
    assert problem is not None
    assert problem.startswith("imports ")
    assert not (tmp_path / "ran").exists(), "containerd never ran on it"


async def test_regular_imports_are_left_to_containerd(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_containerd(tmp_path, monkeypatch, "exit 0")
    (tmp_path / "conf.d").mkdir()
    (tmp_path / "conf.d" / "nvidia.toml").write_text("version = 2\n")
    config = tmp_path / "config.toml"
    config.write_text('version = 2\nimports = ["conf.d/*.toml", "/absent/x.toml"]\n')
    assert await config_problem(config) is None


def test_read_config_refuses_what_is_not_a_regular_file(tmp_path: Path) -> None:
    target = tmp_path / "real.toml"
    target.write_text("version = 2\n")
    link, fifo, folder = tmp_path / "link.toml", tmp_path / "fifo.toml", tmp_path / "dir.toml"
    link.symlink_to(target)
    os.mkfifo(fifo)
    folder.mkdir()
    for path, kind in ((link, "a symbolic link"), (fifo, "a FIFO"), (folder, "a directory")):
        with pytest.raises(ConfigFileError, match=f"is {kind}, not a regular file"):
            read_config(path)
    assert read_config(target) == b"version = 2\n"
    with pytest.raises(FileNotFoundError):
        read_config(tmp_path / "absent.toml")


def test_read_config_stops_past_the_cap(tmp_path: Path) -> None:
    big = tmp_path / "config.toml"
    big.write_bytes(b"#" * (MAX_CONFIG_BYTES + 1))
    with pytest.raises(ConfigFileError, match="larger than 1 MiB"):
        read_config(big)
    big.write_bytes(b"#" * MAX_CONFIG_BYTES)
    assert len(read_config(big)) == MAX_CONFIG_BYTES


def test_read_config_refuses_a_symlink_swapped_in_after_the_lstat(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config, victim = tmp_path / "config.toml", tmp_path / "victim"
    config.write_text("version = 2\n")
    victim.write_text("secret\n")
    real_lstat = os.lstat

    def lstat_then_swap(path: os.PathLike[str] | str) -> os.stat_result:
        found = real_lstat(path)
        config.unlink()
        config.symlink_to(victim)
        return found

    monkeypatch.setattr(os, "lstat", lstat_then_swap)
    with pytest.raises(ConfigFileError, match="a symbolic link"):
        read_config(config)


def test_atomic_write_fsyncs_the_folder_and_keeps_the_mode(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    synced: list[tuple[bool, set[str]]] = []
    real_fsync = os.fsync

    def recording_fsync(fd: int) -> None:
        is_dir = stat.S_ISDIR(os.fstat(fd).st_mode)
        synced.append((is_dir, set(os.listdir(fd)) if is_dir else set()))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    path = tmp_path / "state" / "file.json"
    atomic_write(path, "{}\n", mode=0o644)
    assert path.read_text() == "{}\n"
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert [d for d, _ in synced] == [False, True], "the file, then its folder"
    assert synced[-1][1] == {"file.json"}, "the folder is synced after the rename, with no temp left"
