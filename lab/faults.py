"""nodemedic in a lab node, and the incident's faults injected the way they happen in production.

Shared by the system tests, `make demo` and the benchmarks, so all three inject the same fault.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from lab.cri import (
    CriClient,
    CriError,
    CriPod,
    create_container_request,
    prepare_cri,
    run_sandbox,
    runtime_ready,
    start_hostpath_container,
)
from lab.node import Node

REPO = Path(__file__).resolve().parent.parent
SHIPPED_POLICY = REPO / "policy" / "policy.toml"
POLICY_PATH = "/etc/nodemedic/policy.toml"
SOCKET = "/run/containerd/containerd.sock"
TTRPC = "/run/containerd/containerd.sock.ttrpc"


def wait_for(predicate: Callable[[], object], timeout: float, what: str, interval: float = 0.05) -> object:
    """Poll ``predicate`` until it returns something true; fail with ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(interval)


def start_nodemedic(node: Node, mode: str = "enforce", policy: str | None = None) -> None:
    """Install the shipped policy (or ``policy``) with ``mode`` and start nodemedic.service."""
    text = policy if policy is not None else SHIPPED_POLICY.read_text()
    text = text.replace('mode = "enforce"', f'mode = "{mode}"', 1)
    node.write_file(POLICY_PATH, text)
    # Type=notify: this returns once nodemedic said READY=1.
    node.run("systemctl", "start", "nodemedic.service", timeout=60)


def sighup_policy(mode: str, **tables: dict[str, object]) -> str:
    """The shipped policy with ``[sighup] mode`` set, ``proc`` set to the host's /proc (a lab node
    has its own PID namespace; the trace's PIDs are the host's: Node.boot(host_proc=True)), and
    keys of its subtables overridden, e.g. ``storm={"signals": 1, "window": "10s"}``."""
    import tomlkit

    doc = tomlkit.parse(SHIPPED_POLICY.read_text())
    section = doc["sighup"]
    section["mode"] = mode
    section["proc"] = "/host/proc"
    for name, values in tables.items():
        for key, value in values.items():
            section[name][key] = value
    return tomlkit.dumps(doc)


def records(node: Node, **fields: str) -> list[dict[str, str]]:
    """nodemedic's journald records, filtered on NODEMEDIC_* fields (e.g. OUTCOME="repaired")."""
    matches = [f"NODEMEDIC_{k.upper()}={v}" for k, v in fields.items()]
    entries = node.journal("-u", "nodemedic.service", *matches)
    return [e for e in entries if "NODEMEDIC_KIND" in e]


def containerd_serving(node: Node) -> bool:
    """containerd's socket is a socket and containerd answers a real request."""
    probe = node.sh(f"test -S {SOCKET} && ctr --timeout 2s version", check=False, timeout=10)
    return probe.returncode == 0


STARVE_UNIT = "lab-starve-containerd.service"


def starve_containerd(node: Node, seconds: int) -> None:
    """A stand-in for a CPU-starved containerd (the node's cgroup2 has no cpu controller, lab.md):
    for ``seconds`` its main process is stopped 350 ms of every 400 ms (SIGSTOP/SIGCONT from a
    transient unit, STARVE_UNIT), so a request waits up to ~360 ms for containerd's next 50 ms
    slice: slow, but alive. Returns at once; the unit ends with containerd running."""
    script = (
        "pid=$(systemctl show -p MainPID --value containerd); end=$(($(date +%s) + $1)); "
        "trap 'kill -CONT $pid' EXIT; "
        "while [ $(date +%s) -lt $end ]; do kill -STOP $pid; sleep 0.35; kill -CONT $pid; sleep 0.05; done"
    )
    node.run("systemd-run", f"--unit={STARVE_UNIT}", "/bin/sh", "-c", script, "sh", str(seconds))


def sighup_containerd(node: Node) -> int:
    """Send containerd the toolkit's "reload" SIGHUP; wait until it is dead and systemd has
    scheduled its restart (the RestartSec window). Returns the PID that was signalled."""
    pid = int(node.unit_property("containerd.service", "MainPID"))
    node.run("kill", "-HUP", str(pid))
    wait_for(lambda: node.unit_property("containerd.service", "SubState") == "auto-restart",
             10, "containerd to die and wait for its automatic restart")  # fmt: skip
    return pid


def make_directory_at(
    node: Node, path: str, *, content: str | None = None, symlink_to: str | None = None
) -> float:
    """What the CRI plugin's hostPath mount does when the socket path is missing: MkdirAll.

    The stale socket a SIGHUP leaves behind is removed first: the hostPath race needs the moment
    where the path is missing (domain.md). With ``symlink_to`` a symlink is made instead, with
    ``content`` a file is put inside the directory. Returns the node's wall-clock time of the fault.
    """
    # The time is read just before the fault: latencies measured from it are upper bounds.
    script = f"rm -f {path} && date +%s.%N && "
    if symlink_to:
        script += f"mkdir -p {symlink_to} && echo precious > {symlink_to}/file && ln -s {symlink_to} {path}"
    else:
        script += f"mkdir -p {path}"
        if content is not None:
            script += f" && printf %s '{content}' > {path}/data"
    return float(node.sh(script).stdout.split()[0])


HOSTILE_ENTRIES = {
    "data": "file",
    "sub/data.hardlink": "file",
    "pipe": "fifo",
    "pod.sock": "socket",
    "root": "symlink",
    "shadow": "symlink",
    "sub": "directory",
}
"""What `make_hostile_directory_at` puts in the directory, by path inside it, with their kinds."""


def make_hostile_directory_at(node: Node, path: str, *, data: str = "pod data") -> float:
    """A directory at ``path`` holding what a hostile pod could leave in its hostPath mount: a file
    (``data``) and a hard link to it, a FIFO, a unix socket, and symlinks to ``/`` and to
    /etc/shadow (see HOSTILE_ENTRIES). Made aside in /run/containerd, then renamed into place at
    once, so nodemedic sees it whole. Returns the node's wall-clock time of the fault."""
    prep = "/run/containerd/.lab-hostile-prep"
    bind = "import socket, sys; socket.socket(socket.AF_UNIX).bind(sys.argv[1])"
    script = (
        f"rm -rf {prep} && mkdir -p {prep}/sub && printf %s '{data}' > {prep}/data "
        f"&& ln {prep}/data {prep}/sub/data.hardlink && mkfifo {prep}/pipe "
        f"&& python3 -c '{bind}' {prep}/pod.sock && ln -s / {prep}/root && ln -s /etc/shadow {prep}/shadow "
        f"&& rm -f {path} && date +%s.%N && mv -T {prep} {path}"
    )
    return float(node.sh(script).stdout.split()[0])


def realtime(record: dict[str, str]) -> float:
    """A journal entry's wall-clock time in seconds."""
    return int(record["__REALTIME_TIMESTAMP"]) / 1e6


def directory_until_serving(node: Node, path: str, timeout: float) -> tuple[float, float | None]:
    """Make the directory at ``path`` and, in the same script inside the node, time how long until
    containerd answers ``ctr version`` again (polled every 10 ms, each try ~20-40 ms). The fault time
    is read just before the mkdir, so latencies measured from it are upper bounds. Returns the
    node's wall-clock times (fault, serving again); serving is None if it never did within ``timeout``."""
    script = (
        f"rm -f {path} && t0=$(date +%s.%N) && mkdir -p {path}; end=$(( $(date +%s) + {int(timeout)} )); "
        f"until ctr --timeout 1s version >/dev/null 2>&1 && test -S {SOCKET}; do "
        f'  if [ "$(date +%s)" -ge "$end" ]; then echo "$t0 never"; exit 0; fi; sleep 0.01; '
        f'done; echo "$t0 $(date +%s.%N)"'
    )
    fault, serving = node.sh(script, timeout=timeout + 30).stdout.split()
    return float(fault), None if serving == "never" else float(serving)


def serving_again(node: Node, timeout: float) -> float | None:
    """From now, poll inside the node (every 10 ms, each try ~20-40 ms) until containerd answers
    ``ctr version`` on a socket; the node's wall-clock time it did, None if not within ``timeout``."""
    script = (
        f"end=$(( $(date +%s) + {int(timeout)} )); "
        f"until ctr --timeout 1s version >/dev/null 2>&1 && test -S {SOCKET}; do "
        f'  if [ "$(date +%s)" -ge "$end" ]; then echo never; exit 0; fi; sleep 0.01; '
        "done; date +%s.%N"
    )
    said = node.sh(script, timeout=timeout + 30).stdout.split()[-1]
    return None if said == "never" else float(said)


def run_container(node: Node, name: str) -> int:
    """A real container (busybox through runc, no registry), kept running; returns its shim's PID.
    The node must be booted with ``containers=True``."""
    node.run("ctr", "run", "-d", "--cpu-shares", "0", "--rootfs", "/opt/bbroot", name, "/bin/sleep", "3600")
    shim = f"pgrep -f 'containerd-shim.*-id {name} '"
    wait_for(lambda: node.sh(shim, check=False).returncode == 0, 10, f"the shim of {name}")
    wait_for(lambda: f"{name} " in node.sh("ctr task ls | grep RUNNING", check=False).stdout, 10,
             f"{name} to run")  # fmt: skip
    return int(node.sh(shim).stdout.split()[0])


# ---- SIGHUP storms (issue 5): the toolkit's signals, the hostPath race, and what they did ------

LAB_STATE = "/run/nodemedic-lab"  # inside the node: what the stand-ins and the watcher record
TOOLKIT_STANDIN_UNIT = "toolkit-standin.service"
HOSTPATH_RACER_UNIT = "hostpath-racer.service"
SOCKET_WATCH_UNIT = "lab-socket-watch.service"
CONTAINERD_CGROUP = "/sys/fs/cgroup/system.slice/containerd.service"  # inside the node (cgroup2)
UNIT_STARTING = "7d4958e842da4a758f6c1cdc7b36dcc5"  # systemd's "Starting UNIT..." (SD_MESSAGE_UNIT_STARTING)


@dataclass(frozen=True)
class SighupPattern:
    """What a crashlooping nvidia-container-toolkit pod sends containerd (domain.md): per crash
    (pod start or stop) ``signals`` SIGHUPs ``every`` seconds apart (its SignalContainerd retries),
    ``pause`` seconds between crashes (CrashLoopBackOff), then ``bursts`` fast bursts of ``burst``
    SIGHUPs (one after the other, as fast as reading containerd's PID allows)."""

    crashes: int = 2
    signals: int = 6
    every: float = 5.0
    pause: float = 5.0
    bursts: int = 1
    burst: int = 680

    @property
    def total(self) -> int:
        """How many SIGHUPs the pattern tries to send."""
        return self.crashes * self.signals + self.bursts * self.burst

    @property
    def crash_seconds(self) -> float:
        """How long the crash cycles take (the bursts come after them)."""
        return self.crashes * ((self.signals - 1) * self.every + self.pause)


@dataclass(frozen=True)
class StandinCounts:
    """What the toolkit stand-in did: SIGHUPs it tried to send (``attempts``), sent (containerd had
    a main PID: 0 while it waits for its restart), delivered (``kill`` succeeded). A stand-in frozen
    right after a kill has that signal in ``sent`` but not in ``delivered``."""

    attempts: int
    sent: int
    delivered: int
    finished: bool


_TOOLKIT_STANDIN = r"""
# STAND-IN for the nvidia-container-toolkit pod (lab only: there is no Kubernetes here).
# Like the toolkit's SignalContainerd it looks up containerd's main PID and sends SIGHUP to "reload"
# it, with the shell's builtin kill: the sender is this long-lived shell, in this unit's cgroup.
counts="$1"; crashes=$2; signals=$3; every=$4; pause=$5; bursts=$6; burst=$7
attempts=0; sent=0; delivered=0
hup() {
    attempts=$((attempts + 1))
    pid=$(systemctl show -p MainPID --value containerd.service)
    # MainPID is 0 while containerd waits for its restart: `kill -HUP 0` would signal ourselves.
    if [ "${pid:-0}" -gt 0 ]; then
        sent=$((sent + 1))
        # Written before the kill too: a freeze right after the kill must not hide this signal.
        echo "$attempts $sent $delivered" > "$counts.tmp" && mv -f "$counts.tmp" "$counts"
        if kill -HUP "$pid" 2>/dev/null; then delivered=$((delivered + 1)); fi
    fi
    echo "$attempts $sent $delivered" > "$counts.tmp" && mv -f "$counts.tmp" "$counts"
}
c=0
while [ $c -lt $crashes ]; do
    i=0
    while [ $i -lt $signals ]; do
        hup; i=$((i + 1))
        if [ $i -lt $signals ]; then sleep "$every"; fi
    done
    c=$((c + 1)); sleep "$pause"
done
b=0
while [ $b -lt $bursts ]; do
    i=0
    while [ $i -lt $burst ]; do hup; i=$((i + 1)); done
    b=$((b + 1))
done
echo "$attempts $sent $delivered done" > "$counts.tmp" && mv -f "$counts.tmp" "$counts"
echo "toolkit stand-in: $attempts SIGHUPs attempted, $sent sent, $delivered delivered"
"""


class ToolkitStandin:
    """The running stand-in unit; see `start_toolkit_standin`."""

    def __init__(self, node: Node, unit: str, counts_path: str) -> None:
        self.node = node
        self.unit = unit
        self.counts_path = counts_path

    def counts(self) -> StandinCounts:
        text = self.node.sh(f"cat {self.counts_path} 2>/dev/null", check=False).stdout.split()
        attempts, sent, delivered = (int(n) for n in text[:3]) if len(text) >= 3 else (0, 0, 0)
        return StandinCounts(attempts, sent, delivered, finished="done" in text)

    def running(self) -> bool:
        state = self.node.run("systemctl", "is-active", self.unit, check=False).stdout.strip()
        return state in ("active", "activating", "deactivating")

    def stop(self) -> None:
        """Stop it, also when frozen (its KillSignal is SIGKILL, which a frozen cgroup2 task
        still receives)."""
        self.node.run("systemctl", "stop", self.unit, check=False, timeout=30)


def start_toolkit_standin(
    node: Node, pattern: SighupPattern | None = None, unit: str = TOOLKIT_STANDIN_UNIT
) -> ToolkitStandin:
    """Start a systemd unit in the node, labelled as a stand-in for the nvidia-container-toolkit
    pod, that SIGHUPs containerd in ``pattern`` (default: the incident's). Its counts are kept in
    /run/nodemedic-lab/<unit>.counts as it goes, so a stand-in frozen or stopped halfway still
    says what it sent."""
    p = pattern or SighupPattern()
    counts = f"{LAB_STATE}/{unit}.counts"
    node.sh(f"mkdir -p {LAB_STATE} && rm -f {counts}")
    node.run("systemd-run", f"--unit={unit}", "--collect", "-p", "KillSignal=SIGKILL",
             "--description=STAND-IN for the nvidia-container-toolkit pod (lab only, no Kubernetes): "
             "SIGHUPs containerd", "/bin/sh", "-c", _TOOLKIT_STANDIN, "toolkit-standin", counts,
             str(p.crashes), str(p.signals), f"{p.every:g}", f"{p.pause:g}", str(p.bursts),
             str(p.burst))  # fmt: skip
    return ToolkitStandin(node, unit, counts)


_HOSTPATH_RACER = r"""
# STAND-IN for the CRI plugin's hostPath mount (lab only: there is no Kubernetes here): a pod that
# mounts the socket path with hostPath (type unset) makes the CRI plugin MkdirAll it when missing.
import json, os, sys, time
path, state, interval, limit = sys.argv[1], sys.argv[2], float(sys.argv[3]), int(sys.argv[4])
made = []
def save():
    with open(state + ".tmp", "w") as f:
        json.dump({"made": made}, f)
    os.replace(state + ".tmp", state)
save()
while True:
    if not os.path.lexists(path) and (limit == 0 or len(made) < limit):
        try:
            os.makedirs(path, 0o755)
        except FileExistsError:
            pass
        else:
            made.append(time.time())
            print(f"hostPath stand-in: made a directory at {path}", flush=True)
            save()
    time.sleep(interval)
"""


class HostpathRacer:
    """The running hostPath stand-in; see `hostpath_racer`."""

    def __init__(self, node: Node, unit: str, state_path: str) -> None:
        self.node = node
        self.unit = unit
        self.state_path = state_path

    def directories_made(self) -> list[float]:
        """The node's wall-clock times at which it made a directory at the socket path."""
        text = self.node.sh(f"cat {self.state_path} 2>/dev/null", check=False).stdout
        return list(json.loads(text)["made"]) if text.strip() else []

    def stop(self) -> None:
        self.node.run("systemctl", "stop", self.unit, check=False, timeout=30)


def hostpath_racer(
    node: Node,
    path: str = SOCKET,
    interval: float = 0.01,
    limit: int | None = None,
    unit: str = HOSTPATH_RACER_UNIT,
) -> HostpathRacer:
    """Start a unit in the node, labelled as a stand-in for the CRI plugin's hostPath mount, that
    makes a directory at ``path`` (mkdir -p) whenever it finds the path missing, checking every
    ``interval`` seconds, so it races every moment containerd leaves the path empty (a clean stop
    unlinks the socket; a start unlinks the stale one before binding). Records each directory made.
    With ``limit`` it makes at most that many: an unlimited racer also recreates the directory in
    the few milliseconds between a repair's removal and containerd's start, which no real pod does
    (the CRI plugin runs inside containerd)."""
    state = f"{LAB_STATE}/{unit}.json"
    node.sh(f"mkdir -p {LAB_STATE} && rm -f {state}")
    node.run("systemd-run", f"--unit={unit}", "--collect",
             "--description=STAND-IN for the CRI plugin's hostPath mount of the containerd socket "
             "(lab only, no Kubernetes): mkdir -p when missing",
             "/usr/bin/python3", "-c", _HOSTPATH_RACER, path, state, f"{interval:g}",
             str(limit or 0))  # fmt: skip
    wait_for(lambda: node.sh(f"test -e {state}", check=False).returncode == 0, 10,
             "the hostPath stand-in to start")  # fmt: skip
    return HostpathRacer(node, unit, state)


_SOCKET_WATCH = r"""
# Lab measurement (not a stand-in): the kind of the socket path and containerd's main process,
# sampled every interval; only changes are written, as "TIME path KIND" and "TIME pid PID|-".
import os, signal, stat, sys, time
path, cgroup, out, interval = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
def kind():
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return "missing"
    if stat.S_ISSOCK(mode):
        return "socket"
    return "directory" if stat.S_ISDIR(mode) else "other"
def main_pid():
    # containerd itself among its cgroup's processes (the shims are there too: KillMode=process).
    try:
        pids = open(cgroup + "/cgroup.procs").read().split()
    except OSError:
        return "-"
    for pid in pids:
        try:
            if open(f"/proc/{pid}/comm").read().strip() == "containerd":
                return pid
        except OSError:
            pass
    return "-"
last = {}
with open(out, "a", buffering=1) as f:
    try:
        while True:
            now = time.time()
            for what, value in (("path", kind()), ("pid", main_pid())):
                if last.get(what) != value:
                    last[what] = value
                    f.write(f"{now:.3f} {what} {value}\n")
            time.sleep(interval)
    finally:
        f.write(f"{time.time():.3f} end -\n")
"""


@dataclass(frozen=True)
class SocketWatchResult:
    """What `SocketWatch.result` measured between the watch's start and its stop."""

    start: float
    """The node's wall-clock time of the first sample."""
    seconds: float
    missing_seconds: float
    """Total time the socket path did not exist."""
    directory_seconds: float
    directory_sightings: int
    """How many times the path was seen turning into a directory."""
    down_seconds: float
    """Total time containerd had no main process."""
    pids: tuple[int, ...]
    """containerd main PIDs in the order seen, the one running at the start first. A process
    killed within a sample or two of its start (a fast burst of SIGHUPs does that) can be missed."""
    starts: int = 0
    """containerd start jobs systemd logged ("Starting containerd.service...") during the watch:
    automatic restarts and `systemctl restart`s alike, however short the process lived."""

    @property
    def new_pids(self) -> int:
        """containerd main processes seen after the first one."""
        return max(len(self.pids) - 1, 0)


class SocketWatch:
    """The running sampler; see `socket_watch`."""

    def __init__(self, node: Node, unit: str, log_path: str) -> None:
        self.node = node
        self.unit = unit
        self.log_path = log_path

    def result(self) -> SocketWatchResult:
        """Stop the sampler (if still running) and sum up what it saw."""
        self.node.run("systemctl", "stop", self.unit, check=False, timeout=30)
        watched = _sum_up_watch(self.node.sh(f"cat {self.log_path}").stdout)
        return replace(watched, starts=containerd_starts(self.node, since=watched.start))


def containerd_starts(node: Node, since: float = 0.0) -> int:
    """How many times systemd started containerd.service at or after ``since`` (node wall clock)."""
    entries = node.journal("UNIT=containerd.service", f"MESSAGE_ID={UNIT_STARTING}")
    return sum(realtime(e) >= since for e in entries)


def _sum_up_watch(text: str) -> SocketWatchResult:
    lines = [line.split() for line in text.splitlines() if len(line.split()) == 3]
    start, end = float(lines[0][0]), float(lines[-1][0])
    spans: dict[str, dict[str, float]] = {"path": {}, "pid": {}}
    current: dict[str, tuple[float, str]] = {}
    pids: list[int] = []
    sightings = 0
    for stamp, what, value in lines:
        now = float(stamp)
        for key, (since, old) in current.items():  # close every open span at each event
            spans[key][old] = spans[key].get(old, 0.0) + now - since
            current[key] = (now, old)
        if what in spans:
            current[what] = (now, value)
        if what == "pid" and value != "-" and int(value) not in pids:
            pids.append(int(value))
        sightings += what == "path" and value == "directory"
    return SocketWatchResult(
        start=start,
        seconds=end - start,
        missing_seconds=spans["path"].get("missing", 0.0),
        directory_seconds=spans["path"].get("directory", 0.0),
        directory_sightings=sightings,
        down_seconds=spans["pid"].get("-", 0.0),
        pids=tuple(pids),
    )


def socket_watch(
    node: Node, path: str = SOCKET, interval: float = 0.01, unit: str = SOCKET_WATCH_UNIT
) -> SocketWatch:
    """Start sampling, every ``interval`` seconds inside the node, the kind of ``path`` (socket,
    missing, directory) and containerd's main PID (a new PID is a restart, which NRestarts does not
    count for a `systemctl restart`). `SocketWatch.result()` stops it and sums up."""
    log_path = f"{LAB_STATE}/{unit}.log"
    node.sh(f"mkdir -p {LAB_STATE} && rm -f {log_path}")
    node.run("systemd-run", f"--unit={unit}", "--collect",
             "--description=lab measurement: containerd socket path kind and main PID",
             "/usr/bin/python3", "-c", _SOCKET_WATCH, path, CONTAINERD_CGROUP, log_path,
             f"{interval:g}")  # fmt: skip
    wait_for(lambda: node.sh(f"test -s {log_path}", check=False).returncode == 0, 10,
             "the socket watch's first sample")  # fmt: skip
    return SocketWatch(node, unit, log_path)


# ---- the fault matrix (issue 12): the node's own plumbing failing under nodemedic ---------------

MATRIX_WRITER_UNIT = "lab-matrix-writer.service"


def bus_down(node: Node) -> None:
    """Take the D-Bus system bus away and keep it away: its socket unit stopped (else the next
    connection activates it again), the daemon killed. systemctl still works (systemd's private socket)."""
    node.run("systemctl", "stop", "dbus.socket")
    node.run("systemctl", "kill", "-s", "KILL", "dbus.service")
    state = ("systemctl", "is-active", "dbus.service")
    wait_for(lambda: node.run(*state, check=False).stdout.strip() != "active", 10, "the bus to be gone")


def bus_up(node: Node) -> float:
    """Give the bus back (its socket unit started: the next connection starts the daemon). Returns
    the node's wall-clock time just before."""
    now = float(node.sh("date +%s.%N").stdout)
    node.run("systemctl", "start", "dbus.socket")
    return now


def write_matrix_line(node: Node, text: str) -> None:
    """One journal line from the unit MATRIX_WRITER_UNIT (a lab unit, not a stand-in of anything):
    stdout of a transient unit, so journald attributes it by its own fields."""
    node.run("systemd-run", f"--unit={MATRIX_WRITER_UNIT}", "--collect", "--wait", "-q",
             "--description=lab: writes one journal line for the fault matrix", "/bin/echo",
             text)  # fmt: skip


# ---- nodemedic killed in the middle of a repair (issue 12) -------------------------------------

STATE_DIR = "/var/lib/nodemedic"
REPAIR_RECORD = f"{STATE_DIR}/repair.json"
QUARANTINE = f"{STATE_DIR}/quarantine"


def make_large_directory_at(node: Node, path: str, files: int) -> float:
    """A directory at ``path`` holding ``files`` small files, so that copying it to the quarantine
    (and removing it after) takes a while: a wide window to kill nodemedic in. Made aside in
    /run/containerd and renamed into place at once, after the stale socket is removed. Returns the
    node's wall-clock time of the fault."""
    prep = "/run/containerd/.lab-large-prep"
    make = ("import pathlib, sys; d = pathlib.Path(sys.argv[1]); "
            "[(d / f'f{n}').write_text('x') for n in range(int(sys.argv[2]))]")  # fmt: skip
    script = (f"rm -rf {prep} && mkdir -p {prep} && python3 -c \"{make}\" {prep} {files} "
              f"&& rm -f {path} && date +%s.%N && mv -T {prep} {path}")  # fmt: skip
    return float(node.sh(script, timeout=120).stdout.split()[0])


def kill_nodemedic_when(node: Node, condition: str, timeout: float = 60) -> float | None:
    """SIGKILL nodemedic (``systemctl kill -s KILL``, as the OOM killer or a watchdog would) as soon
    as the shell ``condition`` holds inside the node, polled every 5 ms by one script in the node
    (no round trip between seeing and killing). The node's wall-clock time of the kill, or None if
    the condition never held within ``timeout``."""
    script = (
        f"end=$(( $(date +%s) + {int(timeout)} )); until {condition}; do "
        f'if [ "$(date +%s)" -ge "$end" ]; then echo never; exit 0; fi; sleep 0.005; done; '
        "date +%s.%N && systemctl kill -s KILL nodemedic.service"
    )
    said = node.sh(script, timeout=timeout + 30).stdout.split()[-1]
    return None if said == "never" else float(said)


# ---- a full or read-only state directory (issue 12, fault matrix item 3) ------------------------


def state_dir_full(node: Node, path: str = "/var/lib/nodemedic") -> None:
    """Mount a small tmpfs over the state directory and fill it: every write gets ENOSPC. Before
    nodemedic starts (systemd's StateDirectory= keeps the mount). Gone with the node."""
    node.sh(f"mkdir -p -m 0700 {path} && mount -t tmpfs -o size=256k,mode=0700 tmpfs {path} && "
            f"(dd if=/dev/zero of={path}/fill bs=4k 2>/dev/null || true)")  # fmt: skip


def state_dir_read_only(node: Node, path: str = "/var/lib/nodemedic") -> None:
    """Make the state directory read-only under a running nodemedic (EROFS; a remount of the
    tmpfs from `state_dir_full`, or of a fresh one, reaches the service's own mount namespace)."""
    script = f"mountpoint -q {path} || mount -t tmpfs -o size=1m,mode=0700 tmpfs {path}; "
    script += f"rm -f {path}/fill; mount -o remount,ro {path}"
    node.sh(script)


# ---- the wall clock jumping under nodemedic (issue 12, fault matrix item 4) ---------------------

FAKETIME_LIB = "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1"  # Debian's libfaketime
FAKETIME_FILE = "/run/nodemedic-faketime"  # inside the node: the offset nodemedic's clock runs at
FAKETIME_DROPIN = "/run/systemd/system/nodemedic.service.d/lab-faketime.conf"


def fake_clock_for_nodemedic(node: Node, offset: str = "+0") -> None:
    """Run nodemedic (from its next start) on a wall clock ``offset`` from the real one (libfaketime
    preloaded; ``offset`` as libfaketime reads it: "+0", "-1h", "+90m"). A lab node shares the host's
    CLOCK_REALTIME, so the real clock is never touched: only nodemedic's process sees the jump. The
    monotonic clock is left alone, as a real step of the wall clock leaves it. The file is re-read at
    every clock read, so `step_nodemedic_clock` takes effect at once."""
    step_nodemedic_clock(node, offset)
    env = (f"LD_PRELOAD={FAKETIME_LIB} FAKETIME_TIMESTAMP_FILE={FAKETIME_FILE} FAKETIME_NO_CACHE=1 "
           "FAKETIME_DONT_FAKE_MONOTONIC=1")  # fmt: skip
    node.write_file(FAKETIME_DROPIN, f"[Service]\nEnvironment={env}\n")
    node.run("systemctl", "daemon-reload")


def step_nodemedic_clock(node: Node, offset: str) -> None:
    """Step nodemedic's wall clock to ``offset`` from the real one (renamed into place: never read half
    written)."""
    node.sh(f"printf '%s\\n' '{offset}' > {FAKETIME_FILE}.tmp && mv -f {FAKETIME_FILE}.tmp {FAKETIME_FILE}")


# ---- the real mechanism (issue 18): containerd's own CRI plugin makes the directory ------------

_DIRECTORY_WATCH = r"""
# Lab measurement (not a stand-in): inotify on the socket's folder; prints the wall-clock time at
# which a directory named like the socket path is created there (its mtime if it is still there
# when this wakes, else the time of waking), then exits.
import ctypes, os, struct, sys, time
folder, name, timeout = os.path.dirname(sys.argv[1]), os.path.basename(sys.argv[1]), float(sys.argv[2])
libc = ctypes.CDLL(None, use_errno=True)
IN_CREATE, IN_MOVED_TO, IN_ISDIR = 0x100, 0x80, 0x40000000
fd = libc.inotify_init1(os.O_NONBLOCK)
if fd < 0 or libc.inotify_add_watch(fd, folder.encode(), IN_CREATE | IN_MOVED_TO) < 0:
    sys.exit(f"inotify on {folder} failed: errno {ctypes.get_errno()}")
print("ready", flush=True)
end = time.monotonic() + timeout
import select
while time.monotonic() < end:
    if not select.select([fd], [], [], 0.05)[0]:
        continue
    now, data = time.time(), os.read(fd, 65536)
    while data:
        _wd, mask, _cookie, size = struct.unpack("iIII", data[:16])
        entry, data = data[16:16 + size].rstrip(b"\0").decode(), data[16 + size:]
        if entry == name and mask & IN_ISDIR:
            try:  # the new directory's mtime is its mkdir, to the nanosecond (tmpfs)
                now = min(now, os.lstat(sys.argv[1]).st_mtime_ns / 1e9)
            except OSError:
                pass
            print(f"{now:.6f}", flush=True)
            sys.exit(0)
print("never", flush=True)
"""


def _start_directory_watch(node: Node, path: str, timeout: float) -> subprocess.Popen[str]:
    cmd = ["nsenter", "-t", str(node.leader), "-a", "--", "/usr/bin/python3", "-c", _DIRECTORY_WATCH,
           path, f"{timeout:g}"]  # fmt: skip
    watch = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             start_new_session=True)  # fmt: skip
    if watch.stdout is None or watch.stdout.readline().strip() != "ready":
        watch.kill()
        raise RuntimeError(f"the directory watch did not start: {watch.communicate()[1]}")
    return watch


@dataclass(frozen=True)
class CriHostpathFault:
    """What `cri_hostpath_fault` did: node wall-clock times, the pod if the CRI plugin made it."""

    unlinked_at: float
    """Just before the socket file was unlinked."""
    directory_at: float | None
    """When the CRI plugin's MkdirAll made the directory; None if it made none (the path existed
    again when CreateContainer looked, e.g. a placeholder put there in time)."""
    pod: CriPod | None
    """The pod, if every CRI call succeeded (a repair may stop containerd in the middle)."""
    error: str | None
    """containerd's error if a CRI call failed."""


def cri_hostpath_fault(
    node: Node, path: str = SOCKET, name: str = "hostpath-socket", timeout: float = 30.0, gap: float = 0.0
) -> CriHostpathFault:
    """The incident's directory made by containerd's own CRI plugin (lab/cri.py; the node booted
    with ``containers=True``, `prepare_cri` done before nodemedic starts: it restarts containerd
    once). As the kubelet restarting a crashlooping container: the pod's sandbox runs, the
    kubelet's connection to containerd is open; the socket file at ``path`` is unlinked while
    containerd runs (from the host through the node's root: it stands for whatever unlinks a live
    socket; the open connection outlives it); ``gap`` seconds later CreateContainer + StartContainer
    of a container with a hostPath volume of ``path`` (type unset) go over that connection, and
    CreateContainer's ``WithMounts`` finds the host path missing and does ``MkdirAll(path, 0755)``.
    The directory's time comes from inotify inside the node (its mtime). The host and the node
    share one wall clock. See docs/incident.md for why this is the one case in which the CRI
    plugin makes the directory."""
    prepare_cri(node)
    watch = _start_directory_watch(node, path, timeout)
    container, error = None, None
    try:
        with CriClient(node) as client:
            sandbox = run_sandbox(node, name, client)
            unlinked_at = time.time()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(f"{node.root}{path}")
            time.sleep(gap)
            try:
                container = start_hostpath_container(node, sandbox, name, path, client)
            except CriError as err:  # e.g. a repair stopped containerd once the directory was there
                error = str(err)
        try:  # WithMounts ran inside CreateContainer: the directory, if any, is there by now
            said = watch.communicate(timeout=1)[0].split()
        except subprocess.TimeoutExpired:
            said = []
    finally:
        if watch.poll() is None:
            watch.kill()
        watch.communicate()  # reaps it and closes its pipes (else a ResourceWarning fails the test)
    made = float(said[-1]) if said and said[-1] != "never" else None
    pod = CriPod(sandbox, container, name) if container else None
    return CriHostpathFault(unlinked_at, made, pod, error)


def containerd_host_pid(node: Node) -> int:
    """containerd's main PID as the host sees it (the node has its own PID namespace): the
    process in the node's PID namespace whose innermost PID is the unit's MainPID."""
    main = node.unit_property("containerd.service", "MainPID")
    namespace = os.readlink(f"/proc/{node.leader}/ns/pid")
    for entry in os.listdir("/proc"):
        with contextlib.suppress(OSError):
            if entry.isdigit() and os.readlink(f"/proc/{entry}/ns/pid") == namespace:
                status = Path(f"/proc/{entry}/status").read_text()
                nspid = next(line for line in status.splitlines() if line.startswith("NSpid:"))
                if nspid.split()[-1] == main:
                    return int(entry)
    raise RuntimeError(f"containerd's main PID {main} is not among the node's processes")


@dataclass(frozen=True)
class CriStopRace:
    """What `cri_stop_race` did: how many clean stops it tried, and when the directory appeared
    (None: not within the tries)."""

    attempts: int
    directory_at: float | None


def _restart_cri(node: Node) -> None:
    node.run("systemctl", "reset-failed", "containerd.service", check=False)
    node.run("systemctl", "restart", "containerd.service", timeout=60)
    wait_for(lambda: runtime_ready(node), 30, "the CRI plugin to be ready")


def _stop_during_create(node: Node, client: CriClient, sandbox: str, name: str, path: str) -> None:
    """CreateContainer sent, and SIGTERM to containerd (what `systemctl stop` sends) 2-10 ms
    later, busy-waited; returns once that containerd has exited."""
    pid = containerd_host_pid(node)
    future = client.future("CreateContainer", create_container_request(sandbox, "stop-race", name, path))
    delay = random.uniform(0.002, 0.010)  # noqa: S311 -- spreading a race over its window, not crypto
    start = time.perf_counter()
    while time.perf_counter() - start < delay:
        pass
    os.kill(pid, signal.SIGTERM)
    future.exception()  # done: created, or cut off by the stop
    wait_for(lambda: not os.path.exists(f"/proc/{pid}"), 30, "containerd to exit")


def cri_stop_race(node: Node, path: str = SOCKET, tries: int = 200) -> CriStopRace:
    """The second real way (docs/incident.md, case (b)): no one unlinks anything, containerd is
    stopped cleanly while a CreateContainer with a hostPath volume of ``path`` is in flight.
    SIGTERM makes containerd call grpc-go's ``Server.Stop``, which closes the listeners (Go
    unlinks the socket file) before the connections and does not wait for running handlers: a
    handler that reaches ``WithMounts`` after that finds the path missing and makes it a
    directory. Tried up to ``tries`` times (a clean restart between tries; about 5 % hit in the
    lab, 1 s a try) until the directory appears; containerd is then left down, systemd's automatic
    restart failing on the directory: the incident's end state. Times from inotify in the node."""
    prepare_cri(node)
    _restart_cri(node)
    with CriClient(node) as client:
        sandbox = run_sandbox(node, "stop-race", client)
    watch = _start_directory_watch(node, path, tries * 30.0)
    attempts = 0
    try:
        while attempts < tries and watch.poll() is None:
            if attempts:
                _restart_cri(node)
            attempts += 1
            with CriClient(node) as client:
                _stop_during_create(node, client, sandbox, f"stop-race-{attempts}", path)
            with contextlib.suppress(subprocess.TimeoutExpired):
                watch.wait(timeout=0.2)
        said = watch.communicate(timeout=1)[0].split() if watch.poll() is not None else []
    finally:
        if watch.poll() is None:
            watch.kill()
        watch.communicate()  # reaps it and closes its pipes
    made = float(said[-1]) if said and said[-1] != "never" else None
    return CriStopRace(attempts, made)


def cri_socket_dir(
    node: Node, path: str = SOCKET, name: str = "hostpath-socket", timeout: float = 30.0, via: str = "unlink"
) -> float:
    """The real mechanism beside the stand-ins (`make_directory_at`, `hostpath_racer`): returns
    the node's wall-clock time at which containerd's own CRI plugin made the directory at
    ``path``; raises TimeoutError if it made none. ``via="unlink"``: `cri_hostpath_fault`
    (containerd keeps running, refusing new clients); ``via="stop"``: `cri_stop_race` (a clean
    stop with a CreateContainer in flight; containerd is left down on the directory)."""
    if via == "stop":
        race = cri_stop_race(node, path)
        if race.directory_at is None:
            raise TimeoutError(f"no directory at {path} in {race.attempts} clean stops in CreateContainer")
        return race.directory_at
    if via != "unlink":
        raise ValueError(f"via must be 'unlink' or 'stop', not {via!r}")
    fault = cri_hostpath_fault(node, path, name, timeout)
    if fault.directory_at is None:
        why = f": {fault.error}" if fault.error else ""
        raise TimeoutError(f"the CRI plugin made no directory at {path}{why}")
    return fault.directory_at


# ---- [placeholder] (issue 18, part 2) ----------------------------------------------------------


def placeholder_policy(mode: str = "enforce", policy: str | None = None) -> str:
    """The shipped policy (or ``policy``) with ``[placeholder] mode`` set: "enforce" keeps
    containerd's socket paths from ever being missing, "observe" says what it would make, "off"."""
    import tomlkit

    doc = tomlkit.parse(policy if policy is not None else SHIPPED_POLICY.read_text())
    doc["placeholder"]["mode"] = mode  # type: ignore[index]
    return tomlkit.dumps(doc)
