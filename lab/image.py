"""Build and cache the Debian 12 root filesystem that every lab node boots from.

`ensure_image()` returns `lab/.cache/node-<key>`, a ready rootfs. The key hashes this file's
source and the project's runtime dependencies, so editing either makes a fresh image. The first
build runs debootstrap (about a minute) and saves `node-<key>.tar.zst`; after that the tree is
only unpacked from the tarball (about a second), into RAM where the host has room (every boot
copies the whole tree, see ensure_image). Safe for concurrent callers (flock) and atomic
(everything is built in a temporary directory and renamed into place).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - the lab hosts run Debian 12 (Python 3.11)
    import tomli as tomllib

REPO = Path(__file__).resolve().parent.parent
CACHE = REPO / "lab" / ".cache"
LOGS = CACHE / "logs"
RAM_HOME = Path("/dev/shm/nodemedic-lab")
RAM_MIN_FREE = 4 << 30  # bytes free on the tmpfs to put the image (about 0.3 GB) and node copies there
MIRROR = "http://deb.debian.org/debian"
SUITE = "bookworm"
PACKAGES = (
    "systemd", "systemd-sysv", "dbus", "containerd", "runc", "python3", "python3-venv",
    "python3-systemd", "iproute2", "procps", "busybox-static", "ca-certificates", "coreutils",
    "faketime", "prometheus-node-exporter", "monit",
)  # fmt: skip
# Installed but not started at boot: a lab node shares the host's network, so a node-exporter
# enabled in every node would listen on the host's :9100, on every address. The metrics test
# starts it on loopback (lab/prometheus.py). monit is the peer bench/idle.py measures nodemedic
# against; the bench starts it with its own config.
DISABLED_UNITS = ("prometheus-node-exporter.service", "monit.service")
VENV = "/opt/nodemedic/venv"
# Dependencies that come from Debian inside the node instead of from wheels.
FROM_DEBIAN = {"systemd-python"}
WHEEL_PLATFORMS = ("manylinux2014_x86_64", "manylinux_2_17_x86_64", "manylinux_2_28_x86_64")
STEP_TIMEOUT = 1200  # seconds for any one build step (debootstrap on a slow mirror)
# Emptied in the image. Fewer files make every ephemeral copy faster; the lab reads none of them.
SLIM_AWAY = ("var/lib/apt/lists", "var/cache/apt", "tmp", "usr/share/doc", "usr/share/man",
             "usr/share/info", "usr/share/locale")  # fmt: skip
CHROOT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

LAUNCHER = """#!/bin/sh
export PYTHONPATH=/opt/nodemedic/src
exec /opt/nodemedic/venv/bin/python3 -m nodemedic "$@"
"""

KUBELET_UNIT = """[Unit]
Description=kubelet (lab stand-in: sleeps, not a real kubelet)
After=containerd.service

[Service]
ExecStart=/bin/sleep infinity
Restart=always

[Install]
WantedBy=multi-user.target
"""

_T0 = time.monotonic()


def log(msg: str) -> None:
    """Print one progress line to stderr."""
    print(f"[lab {time.monotonic() - _T0:6.1f}s] {msg}", file=sys.stderr, flush=True)


# Not nodemedic's: what lab code run inside a node needs (test_grpc_streams' stream holder speaks
# gRPC with grpcio); the daemon never imports them, its packages vendor only its own dependencies.
LAB_ONLY = ("grpcio>=1.60", "protobuf>=4.25")


def dependencies(pyproject: Path = REPO / "pyproject.toml") -> list[str]:
    """The requirements installed as wheels in the node: the project's runtime ones (less those
    from Debian) and LAB_ONLY."""
    with pyproject.open("rb") as f:
        deps: list[str] = tomllib.load(f)["project"]["dependencies"]
    own = [d for d in deps if _name(d) not in FROM_DEBIAN and not _py_below_311(d)]
    return [*own, *LAB_ONLY]


def _name(requirement: str) -> str:
    match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement)
    name = match.group(1) if match else requirement
    return re.sub(r"[-_.]+", "-", name).lower()


def _py_below_311(requirement: str) -> bool:
    """True for entries only needed on an older Python (marker `python_version < '3.11'` etc.)."""
    _, _, marker = requirement.partition(";")
    match = re.search(r"python_version\s*(<=?)\s*['\"](\d+)\.(\d+)['\"]", marker)
    if not match:
        return False
    op, major, minor = match.group(1), int(match.group(2)), int(match.group(3))
    return (major, minor) <= (3, 11) if op == "<" else (major, minor) < (3, 11)


def image_key(deps: Sequence[str] | None = None) -> str:
    """Short hash of this file's source and the dependency list."""
    digest = hashlib.sha256(Path(__file__).read_bytes())
    digest.update("\n".join(dependencies() if deps is None else deps).encode())
    return digest.hexdigest()[:12]


def ensure_image() -> Path:
    """Return a directory holding a ready node rootfs, building or unpacking it if missing.

    The path is `lab/.cache/node-<key>`; where the host has a tmpfs at /dev/shm it is a symlink
    to the unpacked tree there (nspawn --ephemeral copies the tree for every boot, which takes
    about 0.6 s in RAM against 4-13 s on the lab VMs' disk). After a reboot the symlink dangles
    and the tree is unpacked again from `node-<key>.tar.zst`.
    """
    deps = dependencies()
    key = image_key(deps)
    final = CACHE / f"node-{key}"
    if final.is_dir():
        return final
    CACHE.mkdir(parents=True, exist_ok=True)
    with _locked(CACHE / f"node-{key}.lock"):
        if final.is_dir():  # another caller finished while we waited
            return final
        tarball = CACHE / f"node-{key}.tar.zst"
        if not tarball.is_file():
            _build(deps, tarball)
        _unpack(tarball, final)
        _prune_stale(key)
    return final


def _prune_stale(key: str) -> None:
    """Remove this checkout's images of other keys (left by edits of image.py or the deps)."""
    locks = (re.fullmatch(r"node-([0-9a-f]{12})\.lock", entry.name) for entry in CACHE.iterdir())
    for old in sorted({m.group(1) for m in locks if m} - {key}):
        lock = CACHE / f"node-{old}.lock"
        with lock.open("a") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # a process running the old lab code is preparing it: leave it
            log(f"removing the stale image node-{old}")
            tree = CACHE / f"node-{old}"
            if tree.is_symlink():
                target = Path(os.readlink(tree))
                tree.unlink()
                tree = target
            if tree.parent in (CACHE, RAM_HOME) and tree.is_dir():
                shutil.rmtree(tree, ignore_errors=True)
            (CACHE / f"node-{old}.tar.zst").unlink(missing_ok=True)
            lock.unlink()


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    with path.open("a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log(f"waiting for another process preparing the image ({path.name})")
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _image_home() -> Path:
    """Where unpacked trees live: RAM if the host has a usable tmpfs, else lab/.cache."""
    if os.environ.get("NODEMEDIC_LAB_RAM", "1") == "0":
        return CACHE
    try:
        RAM_HOME.mkdir(mode=0o755, parents=True, exist_ok=True)
        fs = os.statvfs(RAM_HOME)
    except OSError:
        return CACHE
    if fs.f_flag & os.ST_NOEXEC or fs.f_bavail * fs.f_frsize < RAM_MIN_FREE:
        return CACHE
    return RAM_HOME


def _unpack(tarball: Path, final: Path) -> None:
    home = _image_home()
    tree = home / final.name
    log(f"unpacking {tarball.name} into {home}")
    start = time.monotonic()
    if not tree.is_dir():
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=home))
        try:
            _run(["tar", "--zstd", "--numeric-owner", "--acls", "--xattrs", "--xattrs-include=*",
                  "-xpf", str(tarball), "-C", str(tmp)], log_name="unpack")  # fmt: skip
            tmp.chmod(0o755)
            with contextlib.suppress(OSError):  # lost a race with another checkout: same content
                tmp.rename(tree)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    if tree != final:
        link = final.with_name(f".{final.name}.link.{os.getpid()}")
        link.unlink(missing_ok=True)
        link.symlink_to(tree)
        link.replace(final)  # atomic, also over a dangling link left by a reboot
    log(f"image ready in {time.monotonic() - start:.1f}s: {final}")


def _build(deps: Sequence[str], tarball: Path) -> None:
    start = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix=f".build-{tarball.name}.", dir=CACHE))
    try:
        rootfs = work / "rootfs"
        wheels = work / "wheels"
        _download_wheels(deps, wheels)
        _debootstrap(rootfs)
        _customise(rootfs, wheels, deps)
        _save_tarball(rootfs, tarball)
    finally:
        log("removing the build tree")
        shutil.rmtree(work, ignore_errors=True)
    log(f"image built in {time.monotonic() - start:.1f}s")


def _download_wheels(deps: Sequence[str], dest: Path) -> None:
    log(f"downloading wheels on the host for {len(deps)} dependencies: {' '.join(deps)}")
    cmd = [*_host_pip(), "download", "--quiet", "--disable-pip-version-check",
           "--only-binary=:all:", "--python-version", "3.11", "--implementation", "cp",
           "--abi", "cp311", "-d", str(dest)]  # fmt: skip
    for platform in WHEEL_PLATFORMS:
        cmd += ["--platform", platform]
    _run([*cmd, *deps], log_name="pip-download")


def _host_pip() -> list[str]:
    """pip of the interpreter running the lab if it has one, else the host's pip3."""
    if importlib.util.find_spec("pip") is not None:
        return [sys.executable, "-m", "pip"]
    found = shutil.which("pip3") or shutil.which("pip")
    if found is None:
        raise RuntimeError("no pip found on the host to download the node's wheels")
    return [found]


def _debootstrap(rootfs: Path) -> None:
    log(f"debootstrap {SUITE} from {MIRROR} (about a minute; log: {LOGS / 'debootstrap.log'})")
    _run(["debootstrap", "--variant=minbase", f"--include={','.join(PACKAGES)}",
          SUITE, str(rootfs), MIRROR], log_name="debootstrap")  # fmt: skip


def _customise(rootfs: Path, wheels: Path, deps: Sequence[str]) -> None:
    log("installing the nodemedic venv and lab files into the image")
    shutil.copytree(wheels, rootfs / "tmp/wheels")
    _chroot(rootfs, "python3", "-m", "venv", "--system-site-packages", VENV)
    _chroot(rootfs, f"{VENV}/bin/pip", "install", "--quiet", "--no-index", "--no-cache-dir",
            "--disable-pip-version-check", "--find-links", "/tmp/wheels", *deps)  # fmt: skip
    shutil.rmtree(rootfs / "tmp/wheels")
    _write_lab_files(rootfs)
    _disable_units(rootfs)
    _make_busybox_root(rootfs)
    _chroot(rootfs, "apt-get", "clean")
    _clean_tree(rootfs)
    _check_imports(rootfs)


def _write_lab_files(rootfs: Path) -> None:
    for d in ("opt/nodemedic/src", "opt/nodemedic/units", "etc/nodemedic", "var/log/journal"):
        (rootfs / d).mkdir(parents=True, exist_ok=True)
    launcher = rootfs / "usr/bin/nodemedic"
    launcher.write_text(LAUNCHER)
    launcher.chmod(0o755)
    units = rootfs / "etc/systemd/system"
    (units / "nodemedic.service").symlink_to("/opt/nodemedic/units/nodemedic.service")
    (units / "kubelet.service").write_text(KUBELET_UNIT)
    wants = units / "multi-user.target.wants"
    wants.mkdir(exist_ok=True)
    (wants / "kubelet.service").symlink_to("/etc/systemd/system/kubelet.service")
    dropin = rootfs / "etc/systemd/journald.conf.d"
    dropin.mkdir(parents=True, exist_ok=True)
    (dropin / "lab.conf").write_text("[Journal]\nStorage=persistent\n")


def _disable_units(rootfs: Path) -> None:
    """Packages enable their units when installed; DISABLED_UNITS must not start at boot."""
    for unit in DISABLED_UNITS:
        _chroot(rootfs, "systemctl", "disable", unit)


def _make_busybox_root(rootfs: Path) -> None:
    """A tiny rootfs for `ctr run --rootfs /opt/bbroot ...` (there is no image registry)."""
    bb = rootfs / "opt/bbroot"
    for d in ("bin", "dev", "etc", "proc", "sys", "tmp"):
        (bb / d).mkdir(parents=True, exist_ok=True)
    shutil.copy2(rootfs / "bin/busybox", bb / "bin/busybox")
    applets = subprocess.run(
        [str(bb / "bin/busybox"), "--list"], capture_output=True, text=True, check=True, timeout=30
    ).stdout.split()
    for applet in applets:
        if applet != "busybox":
            (bb / "bin" / applet).symlink_to("busybox")


def _clean_tree(rootfs: Path) -> None:
    """Empty machine-id (systemd makes a transient one per boot); no apt caches, docs, locales."""
    (rootfs / "etc/machine-id").write_text("")
    dbus_id = rootfs / "var/lib/dbus/machine-id"
    dbus_id.unlink(missing_ok=True)
    dbus_id.symlink_to("/etc/machine-id")
    (rootfs / "etc/hostname").unlink(missing_ok=True)  # the host's; nspawn sets the node's name
    for d in SLIM_AWAY:
        for entry in (rootfs / d).glob("*"):
            if entry.name in ("partial", "lock") or entry.name.endswith("-old"):
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()


def _check_imports(rootfs: Path) -> None:
    modules = "dbus_fast, asyncinotify, pydantic, tomlkit, hpack, systemd.journal"
    _chroot(rootfs, f"{VENV}/bin/python3", "-c", f"import {modules}")


def _save_tarball(rootfs: Path, tarball: Path) -> None:
    log(f"saving {tarball.name}")
    tmp = tarball.with_name(f".{tarball.name}.{os.getpid()}")
    try:
        _run(["tar", "--use-compress-program=zstd -T0 -3", "--numeric-owner", "--acls",
              "--xattrs", "--xattrs-include=*", "-cf", str(tmp), "-C", str(rootfs), "."],
             log_name="save")  # fmt: skip
        tmp.rename(tarball)
    finally:
        tmp.unlink(missing_ok=True)
    log(f"saved {tarball.name} ({tarball.stat().st_size / 1e6:.0f} MB)")


def _chroot(rootfs: Path, *argv: str) -> None:
    env = {"PATH": CHROOT_PATH, "LANG": "C.UTF-8", "HOME": "/root",
           "DEBIAN_FRONTEND": "noninteractive", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}  # fmt: skip
    _run(["chroot", str(rootfs), *argv], env=env, log_name="chroot")


def _run(argv: Sequence[str], *, env: dict[str, str] | None = None, log_name: str = "") -> None:
    """Run a build step; on failure raise with the tail of its output."""
    LOGS.mkdir(parents=True, exist_ok=True)
    logfile = LOGS / f"{log_name or 'build'}.log"
    with logfile.open("a") as out:
        out.write(f"\n$ {' '.join(argv)}\n")
        out.flush()
        proc = subprocess.run(
            argv, stdout=out, stderr=subprocess.STDOUT, env=env, check=False, timeout=STEP_TIMEOUT
        )
    if proc.returncode != 0:
        tail = "\n".join(logfile.read_text(errors="replace").splitlines()[-25:])
        raise RuntimeError(f"image build step failed ({proc.returncode}): {' '.join(argv)}\n"
                           f"--- tail of {logfile} ---\n{tail}")  # fmt: skip
