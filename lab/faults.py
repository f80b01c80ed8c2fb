"""nodemedic in a lab node, and the incident's faults injected the way they happen in production.

Shared by the system tests, `make demo` and the benchmarks, so all three inject the same fault.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

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


def records(node: Node, **fields: str) -> list[dict[str, str]]:
    """nodemedic's journald records, filtered on NODEMEDIC_* fields (e.g. OUTCOME="repaired")."""
    matches = [f"NODEMEDIC_{k.upper()}={v}" for k, v in fields.items()]
    entries = node.journal("-u", "nodemedic.service", *matches)
    return [e for e in entries if "NODEMEDIC_KIND" in e]


def containerd_serving(node: Node) -> bool:
    """containerd's socket is a socket and containerd answers a real request."""
    probe = node.sh(f"test -S {SOCKET} && ctr --timeout 2s version", check=False, timeout=10)
    return probe.returncode == 0


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


def run_container(node: Node, name: str) -> int:
    """A real container (busybox through runc, no registry), kept running; returns its shim's PID.
    The node must be booted with ``containers=True``."""
    node.run("ctr", "run", "-d", "--cpu-shares", "0", "--rootfs", "/opt/bbroot", name, "/bin/sleep", "3600")
    shim = f"pgrep -f 'containerd-shim.*-id {name} '"
    wait_for(lambda: node.sh(shim, check=False).returncode == 0, 10, f"the shim of {name}")
    wait_for(lambda: f"{name} " in node.sh("ctr task ls | grep RUNNING", check=False).stdout, 10,
             f"{name} to run")  # fmt: skip
    return int(node.sh(shim).stdout.split()[0])
