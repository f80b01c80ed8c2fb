"""A pristine, ephemeral systemd node booted with systemd-nspawn (see lab/README.md).

    with Node.boot() as node:
        node.run("systemctl", "is-active", "containerd")

Each node gets its own cgroup folders on the host, its own `.#machine.*` copy of the image
(nspawn --ephemeral) and a console log under lab/.cache/logs/. Teardown always runs and only ever
signals this node's own processes, by PID.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import re
import secrets
import shlex
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import IO, TypeVar

from lab.image import LOGS, REPO, ensure_image, log

CGROUP_ROOT = Path("/sys/fs/cgroup")
NODE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
NODE_ENV = {"PATH": NODE_PATH, "LANG": "C.UTF-8", "HOME": "/root", "SYSTEMD_PAGER": "cat",
            "SYSTEMD_COLORS": "0"}  # fmt: skip
TRACEFS = Path("/sys/kernel/tracing")
HOST_PROC = "/host/proc"  # where host_proc=True binds the host's /proc inside a node
KEEP_LOGS = 50
# ctr's own --timeout does not bound the dial: with no socket it retries for 10 s.
CTR = ("ctr", "--connect-timeout", "1s", "--timeout", "2s")
STOP_TIMEOUT = 20.0  # seconds for a poweroff before nspawn is signalled
COPY_TIMEOUT = 30.0  # seconds nspawn may take to copy the image (0.6 s in RAM, 4-13 s on disk)
_counter = itertools.count()
T = TypeVar("T")


class NodeError(RuntimeError):
    """The node could not be booted or is not in the expected state."""


class NodeCommandError(subprocess.CalledProcessError):
    """A command run inside the node failed; the message carries its output."""

    def __str__(self) -> str:
        return (f"{super().__str__()}\n--- stdout ---\n{_tail(self.stdout)}"
                f"\n--- stderr ---\n{_tail(self.stderr)}")  # fmt: skip


class Node:
    """One booted node. Create with `Node.boot()`, use as a context manager."""

    leader: int
    root: Path
    cgroups: tuple[Path, ...]
    copy: Path | None

    def __init__(self, image: Path, name: str, nspawn_args: list[str]) -> None:
        self.image = image.resolve()  # nspawn puts the ephemeral copy next to the real tree
        self.name = name
        self.log_path = LOGS / f"node-{name}.log"
        self.leader = 0
        self.root = Path("/nonexistent")
        self.cgroups = ()
        self.copy = None
        self.boot_seconds = 0.0
        self.teardown_seconds = 0.0
        self._started_at = 0.0
        self._nspawn_args = nspawn_args
        self._nspawn: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self._leader_start = ""
        self._closed = False

    # ---- boot ------------------------------------------------------------------------------

    @classmethod
    def boot(
        cls,
        *,
        tracefs: bool = False,
        containers: bool = False,
        host_proc: bool = False,
        ready_timeout: float = 30,
        image: Path | None = None,
    ) -> Node:
        """Boot a fresh node and wait until systemd is up and containerd answers.

        tracefs: bind the host's /sys/kernel/tracing into the node (read-write).
        containers: allow `ctr run` inside (keyring/bpf syscalls, CAP_NET_ADMIN; lab.md).
        host_proc: bind the host's /proc read-only at /host/proc. The node has its own PID
        namespace, but the kernel's trace gives initial-namespace PIDs: a tracefs reader inside
        looks them up there (policy ``[sighup] proc = "/host/proc"``). Lab only: a real node has
        one PID namespace and uses /proc.
        """
        extra = []
        if tracefs:
            _ensure_tracefs()
            extra.append(f"--bind={TRACEFS}")
        if host_proc:
            extra.append(f"--bind-ro=/proc:{HOST_PROC}")
        if containers:
            extra += ["--system-call-filter=@keyring bpf", "--capability=CAP_NET_ADMIN"]
        name = f"lab-{os.getpid()}-{next(_counter)}-{secrets.token_hex(2)}"
        node = cls(image or ensure_image(), name, extra)
        try:
            node._start()
            node._wait_ready(ready_timeout)
        except BaseException:
            try:
                node.shutdown()
            except Exception as err:  # keep the boot failure as the error that is raised
                log(f"node {name}: teardown after the failed boot failed too: {err!r}")
            raise
        return node

    def __enter__(self) -> Node:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.shutdown()

    def _start(self) -> None:
        self.cgroups = tuple(_make_cgroups(self.name))
        LOGS.mkdir(parents=True, exist_ok=True)
        _prune_logs()
        self._log = self.log_path.open("wb")
        argv = ["systemd-nspawn", "-D", str(self.image), "--ephemeral", "--boot",
                "--register=no", "--keep-unit", "--console=passive", f"--machine={self.name}",
                f"--bind-ro={REPO / 'src'}:/opt/nodemedic/src",
                f"--bind-ro={REPO / 'units'}:/opt/nodemedic/units", *self._nspawn_args]  # fmt: skip
        # The shell moves itself into the node's own cgroups, then becomes nspawn (same PID).
        join = "".join(f"echo $$ > {shlex.quote(str(cg / 'cgroup.procs'))} || exit 1; "
                       for cg in self.cgroups)  # fmt: skip
        env = {**os.environ, "SYSTEMD_NSPAWN_UNIFIED_HIERARCHY": "1"}
        self._started_at = time.monotonic()
        self._nspawn = subprocess.Popen(
            ["/bin/sh", "-c", join + 'exec "$@"', "sh", *argv],
            stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT,
            env=env, start_new_session=True,
        )  # fmt: skip

    def _wait_ready(self, timeout: float) -> None:
        deadline = self._started_at + timeout
        self.leader = self._wait(self._find_leader, deadline, "the node's PID 1 to appear")
        self._leader_start = _start_time(self.leader)
        self.copy = self._copy_path()
        self.root = Path(f"/proc/{self.leader}/root")
        bus = self.root / "run/dbus/system_bus_socket"
        self._wait(bus.exists, deadline, "the D-Bus system bus socket")
        state = self.run("systemctl", "is-system-running", "--wait", check=False,
                         timeout=max(deadline - time.monotonic(), 1)).stdout.strip()  # fmt: skip
        if state == "degraded":
            failed = self.run("systemctl", "--failed", "--no-legend", "--plain", check=False)
            log(f"node {self.name} is degraded; failed units:\n{failed.stdout.rstrip()}")
        elif state != "running":
            raise NodeError(f"node {self.name}: systemd state {state!r}{self._log_tail()}")
        self._wait(self._containerd_answers, deadline, "containerd to answer `ctr version`")
        self.boot_seconds = time.monotonic() - self._started_at
        log(f"node {self.name} ready in {self.boot_seconds:.2f}s (leader PID {self.leader})")

    def _wait(self, probe: Callable[[], T], deadline: float, what: str) -> T:
        while True:
            if self._nspawn is not None and self._nspawn.poll() is not None:
                raise NodeError(f"node {self.name}: systemd-nspawn exited "
                                f"({self._nspawn.returncode}) while waiting for {what}"
                                f"{self._log_tail()}")  # fmt: skip
            result = probe()
            if result:
                return result
            if time.monotonic() > deadline:
                raise NodeError(f"node {self.name}: timed out waiting for {what}{self._log_tail()}")
            time.sleep(0.05)

    def _find_leader(self) -> int:
        """The nspawn child that is PID 1 of its own PID namespace (never found by name)."""
        for pid in _children(self._nspawn.pid if self._nspawn else 0):
            nspid = _status_field(pid, "NSpid").split()
            if len(nspid) > 1 and nspid[-1] == "1":
                return pid
        return 0

    def _containerd_answers(self) -> bool:
        probe = self.run(*CTR, "version", check=False, timeout=5)
        return probe.returncode == 0 and "Server:" in probe.stdout

    def _log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return f"\n--- tail of {self.log_path} ---\n{_tail(text, lines)}"

    # ---- use -------------------------------------------------------------------------------

    def run(
        self,
        *argv: str,
        check: bool = True,
        timeout: float = 30,
        input: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run a command in all of the node's namespaces (it stays in the host's cgroup).

        On timeout the whole command is killed (nsenter and what it forked in the node's PID
        namespace: they share a process group) and subprocess.TimeoutExpired is raised.
        """
        cmd = ["nsenter", "-t", str(self.leader), "-a", "--", *argv]
        stdin = subprocess.DEVNULL if input is None else subprocess.PIPE
        with subprocess.Popen(cmd, stdin=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=NODE_ENV, start_new_session=True) as proc:  # fmt: skip
            try:
                out, err = proc.communicate(input, timeout=timeout)
            except BaseException as exc:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                try:
                    out, err = proc.communicate(timeout=5)
                except subprocess.TimeoutExpired:  # a process that left the group holds the pipes
                    out, err = "", ""
                if isinstance(exc, subprocess.TimeoutExpired):
                    raise subprocess.TimeoutExpired(list(argv), timeout, out, err) from None
                raise
        if check and proc.returncode != 0:
            raise NodeCommandError(proc.returncode, list(argv), out, err)
        return subprocess.CompletedProcess(list(argv), proc.returncode, out, err)

    def sh(
        self,
        script: str,
        *,
        check: bool = True,
        timeout: float = 30,
        input: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run a /bin/sh script inside the node."""
        return self.run("/bin/sh", "-c", script, check=check, timeout=timeout, input=input)

    def write_file(self, path: str, text: str, mode: int = 0o644) -> None:
        """Write a file inside the node (parents created), as root, with the given mode."""
        script = 'mkdir -p -- "$(dirname -- "$1")" && cat > "$1" && chmod "$2" -- "$1"'
        self.run("/bin/sh", "-c", script, "sh", path, f"{mode:o}", input=text)

    def journal(self, *args: str) -> list[dict[str, str]]:
        """Journal entries of the node, `journalctl -o json --no-pager ARGS`."""
        out = self.run("journalctl", "-o", "json", "--no-pager", *args).stdout
        return [_journal_entry(line) for line in out.splitlines() if line.startswith("{")]

    def unit_property(self, unit: str, prop: str) -> str:
        """One property of a unit as `systemctl show -p PROP --value UNIT` prints it."""
        return self.run("systemctl", "show", "-p", prop, "--value", unit).stdout.rstrip("\n")

    # ---- teardown --------------------------------------------------------------------------

    def shutdown(self) -> None:
        """Stop the node and remove everything it left; safe to call more than once."""
        if self._closed:
            return
        self._closed = True
        start = time.monotonic()
        try:
            self._stop_gracefully()
        finally:
            try:
                self._stop_hard()
            finally:
                self._clean_up()
        self.teardown_seconds = time.monotonic() - start
        log(f"node {self.name} torn down in {self.teardown_seconds:.2f}s")

    def _leader_alive(self) -> bool:
        return self.leader > 0 and _start_time(self.leader) == self._leader_start

    def _nspawn_alive(self) -> bool:
        return self._nspawn is not None and self._nspawn.poll() is None

    def _stop_gracefully(self) -> None:
        if not (self._nspawn_alive() and self._leader_alive()):
            return
        with contextlib.suppress(subprocess.TimeoutExpired):
            self._kill_tasks()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.run("systemctl", "poweroff", check=False, timeout=10)
        self._wait_nspawn(STOP_TIMEOUT)

    def _kill_tasks(self) -> None:
        """A running runc task ignores SIGTERM and stalls the halt: kill every task first."""
        namespaces = self.run(*CTR, "namespaces", "ls", "-q", check=False, timeout=5)
        for ns in namespaces.stdout.split() if namespaces.returncode == 0 else []:
            tasks = self.run(*CTR, "-n", ns, "task", "ls", "-q", check=False, timeout=5)
            for task in tasks.stdout.split() if tasks.returncode == 0 else []:
                self.run(*CTR, "-n", ns, "task", "kill", "-s", "KILL", task,
                         check=False, timeout=5)  # fmt: skip

    def _wait_nspawn(self, timeout: float) -> bool:
        if self._nspawn is None:
            return True
        try:
            self._nspawn.wait(timeout)
        except subprocess.TimeoutExpired:
            return False
        return True

    def _stop_hard(self) -> None:
        if self._nspawn is not None and self._nspawn.poll() is None:
            # Stopped while copying the image, nspawn leaves a partial copy that nothing names:
            # let it finish the copy (and say its name) first.
            deadline = time.monotonic() + COPY_TIMEOUT
            while self._copy_path() is None and self._nspawn_alive() and time.monotonic() < deadline:
                time.sleep(0.05)
            log(f"node {self.name}: stopping systemd-nspawn with SIGTERM")
            self._nspawn.send_signal(signal.SIGTERM)
            if not self._wait_nspawn(5):
                self._nspawn.kill()
                self._wait_nspawn(5)
        if self._leader_alive():  # nspawn is gone but PID 1 is not: kill the PID namespace
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.leader, signal.SIGKILL)
        for cg in self.cgroups:
            _kill_cgroup(cg)

    def _clean_up(self) -> None:
        try:
            for cg in self.cgroups:
                _remove_cgroup(cg)
            self._remove_ephemeral_copy()
        finally:
            if self._log is not None:
                self._log.close()

    def _copy_path(self) -> Path | None:
        """The `.#machine.*` copy nspawn made for this node, as named in this node's own log."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return None
        match = re.search(r"^Spawning container \S+ on (.+)\.$", text, re.MULTILINE)
        if not match:
            return None
        copy = Path(match.group(1))
        if copy.parent != self.image.parent or not copy.name.startswith(".#machine."):
            return None
        return copy

    def _remove_ephemeral_copy(self) -> None:
        """Remove this node's own copy if nspawn left it (it does not when killed)."""
        copy = self.copy or self._copy_path()
        if copy is None:
            return
        if copy.is_dir():
            log(f"node {self.name}: removing the ephemeral copy nspawn left: {copy}")
            subprocess.run(["rm", "-rf", "--one-file-system", "--", str(copy)],
                           check=False, timeout=120)  # fmt: skip
        copy.with_name(f".#{copy.name}.lck").unlink(missing_ok=True)


# ---- host helpers --------------------------------------------------------------------------


def _cgroup_hierarchies() -> list[Path]:
    """Where a process's cgroup must be set: the named systemd and the unified hierarchies
    on a hybrid host (like the lab VMs), or the root on a pure cgroup2 host."""
    found = [h for h in (CGROUP_ROOT / "systemd", CGROUP_ROOT / "unified")
             if (h / "cgroup.procs").exists()]  # fmt: skip
    if not found and (CGROUP_ROOT / "cgroup.procs").exists():
        found = [CGROUP_ROOT]
    return found


def _ensure_tracefs() -> None:
    """Mount the host's tracefs if nothing is mounted there yet (it stays mounted)."""
    if (TRACEFS / "trace").exists():
        return
    log(f"mounting tracefs at {TRACEFS} on the host")
    subprocess.run(["mount", "-t", "tracefs", "tracefs", str(TRACEFS)], check=True, timeout=10)


def _make_cgroups(name: str) -> list[Path]:
    made = []
    for hierarchy in _cgroup_hierarchies():
        folder = hierarchy / name
        folder.mkdir()
        made.append(folder)
    return made


def _kill_cgroup(folder: Path) -> None:
    """SIGKILL whatever is still in this node's cgroup (only its own processes can be there)."""
    if not folder.exists():
        return
    kill_file = folder / "cgroup.kill"
    if kill_file.exists():
        with contextlib.suppress(OSError):
            kill_file.write_text("1")
    else:
        for procs in folder.rglob("cgroup.procs"):
            for pid in _read_pids(procs):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)


def _remove_cgroup(folder: Path, timeout: float = 5) -> None:
    deadline = time.monotonic() + timeout
    while folder.exists():
        try:
            for dirpath, _dirs, _files in os.walk(folder, topdown=False):
                os.rmdir(dirpath)
        except FileNotFoundError:
            continue
        except OSError as err:  # EBUSY while killed processes are still exiting
            if time.monotonic() > deadline:
                log(f"could not remove cgroup {folder}: {err}")
                return
            time.sleep(0.05)


def _read_pids(procs: Path) -> list[int]:
    try:
        return [int(p) for p in procs.read_text().split()]
    except OSError:
        return []


def _children(pid: int) -> list[int]:
    if pid <= 0:
        return []
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except FileNotFoundError:  # kernel without CONFIG_PROC_CHILDREN: scan /proc
        return [int(p.name) for p in Path("/proc").iterdir()
                if p.name.isdigit() and _status_field(int(p.name), "PPid") == str(pid)]  # fmt: skip


def _status_field(pid: int, field: str) -> str:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return ""


def _start_time(pid: int) -> str:
    """The process's start time (field 22 of /proc/PID/stat): tells a PID from its reuse."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    return stat.rpartition(")")[2].split()[19]


def _prune_logs() -> None:
    """Keep the newest node logs (a live node's log is among them: it is being written)."""
    logs = sorted(LOGS.glob("node-lab-*.log"), key=_mtime)
    for old in logs[:-KEEP_LOGS]:
        old.unlink(missing_ok=True)


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except FileNotFoundError:  # pruned by a concurrent boot
        return 0.0


def _journal_entry(line: str) -> dict[str, str]:
    entry: dict[str, object] = json.loads(line)
    return {key: _journal_value(value) for key, value in entry.items()}


def _journal_value(value: object) -> str:
    """journalctl's JSON gives binary fields as byte lists and repeated fields as lists."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(b, int) for b in value):
        return bytes(value).decode(errors="replace")
    if isinstance(value, list):
        return "\n".join(_journal_value(v) for v in value)
    return "" if value is None else str(value)


def _tail(text: str | bytes | None, lines: int = 40) -> str:
    if text is None:
        return ""
    if isinstance(text, bytes):
        text = text.decode(errors="replace")
    return "\n".join(text.splitlines()[-lines:])
