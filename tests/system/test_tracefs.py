"""The tracefs source on a real node, sandboxed like nodemedic.service, sees who SIGHUPs containerd.

The node binds the host's tracefs and the host's /proc (at /host/proc: the trace gives the host's
PIDs, the node has its own PID namespace; lab only). TraceSignals runs as a transient unit with
the hardening of units/nodemedic.service (its [Service] lines, read from the file) plus the lines
tracefs needs (TRACEFS_LINES), while a stand-in for the nvidia-container-toolkit pod, a unit named
toolkit-standin.service, sends containerd the "reload" SIGHUP.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from lab.node import Node

pytestmark = pytest.mark.system

REPO = Path(__file__).resolve().parents[2]
UNIT_FILE = REPO / "units" / "nodemedic.service"
RUNNER_PATH = "/opt/nodemedic-test/trace_run.py"
RUNNER_UNIT = "nodemedic-trace-test"
# What the sandbox needs for tracefs (measured with systemd 252): ProtectKernelTunables=yes mounts
# /sys/kernel/tracing read-only and neither ReadWritePaths= nor BindPaths= undo it (mkdir of the
# instance fails with EROFS); no capability is needed to make an instance.
TRACEFS_LINES = ["ProtectKernelTunables=no", "ReadOnlyPaths=/sys", "ReadWritePaths=-/sys/kernel/tracing"]
# [Service] lines that are not the sandbox
NOT_HARDENING = ("Type", "NotifyAccess", "ExecStartPre", "ExecStart", "ExecReload", "ExecStopPost",
                 "Restart", "RestartSec", "WatchdogSec", "TimeoutStopSec", "StateDirectory",
                 "StateDirectoryMode")  # fmt: skip

# Runs inside the node: TraceSignals with proc=/host/proc, JSON lines on stdout (the journal).
RUNNER = """
import asyncio, dataclasses, json, signal, sys, time
from pathlib import Path

from nodemedic.clock import MonotonicClock
from nodemedic.events import UnitChanged
from nodemedic.sources.tracefs import EVENT, TraceSignals, default_instance

TRACEFS = Path("/sys/kernel/tracing")


def out(kind, **fields):
    print(json.dumps({"kind": kind, "wall": time.time(), **fields}), flush=True)


async def main(seconds, main_pid, proc):
    source = TraceSignals(tracefs=TRACEFS, proc=Path(proc), unit="containerd.service",
                          emit=lambda e: out("event", **dataclasses.asdict(e)),
                          clock=MonotonicClock(), on_state=lambda m: out("state", message=m),
                          main_pid=lambda: main_pid)
    source.handle(UnitChanged("containerd.service", "active", "running", main_pid=main_pid))
    task = asyncio.create_task(source.run())
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    instance = TRACEFS / "instances" / default_instance()
    while not task.done():
        enable = instance / EVENT / "enable"
        if enable.exists() and enable.read_text().strip() == "1":
            out("ready", instance=str(instance))
            break
        await asyncio.sleep(0.01)
    try:
        await asyncio.wait_for(task, seconds)
    except (asyncio.TimeoutError, asyncio.CancelledError):
        pass
    out("end", instance_left=instance.exists())


asyncio.run(main(float(sys.argv[1]), int(sys.argv[2]), sys.argv[3]))
"""


def unit_hardening() -> list[str]:
    """The sandboxing lines of nodemedic.service's [Service] section."""
    lines, section = [], ""
    for raw in UNIT_FILE.read_text().splitlines():
        line = raw.strip()
        if line.startswith("["):
            section = line
        elif section == "[Service]" and line and not line.startswith("#"):
            lines.append(line)
    return [line for line in lines if line.partition("=")[0] not in NOT_HARDENING]


def sandbox(*, tracefs_lines: list[str]) -> list[str]:
    """The unit's hardening with its own tracefs-related lines replaced by ``tracefs_lines``."""

    def ours(line: str) -> bool:
        return line.startswith("ProtectKernelTunables=") or "/sys/kernel/tracing" in line

    return [*(line for line in unit_hardening() if not ours(line)), *tracefs_lines]


def wait_for(probe: Callable[[], object], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not probe():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.1)


class Runner:
    """TraceSignals in the node as a hardened transient unit; its JSON lines from the journal."""

    def __init__(self, node: Node, properties: list[str], seconds: float = 60) -> None:
        self.node = node
        node.write_file(RUNNER_PATH, RUNNER)
        main_pid = node.unit_property("containerd.service", "MainPID")
        props = [arg for line in ["Type=exec", *properties] for arg in ("-p", line)]
        node.run("systemd-run", f"--unit={RUNNER_UNIT}", *props,
                 "--setenv=PYTHONPATH=/opt/nodemedic/src", "/opt/nodemedic/venv/bin/python3",
                 RUNNER_PATH, str(seconds), main_pid, "/host/proc")  # fmt: skip
        wait_for(lambda: self.lines("ready", "state", "end"), 30, "the trace source to start")

    def lines(self, *kinds: str) -> list[dict[str, object]]:
        text = self.node.run("journalctl", "-u", RUNNER_UNIT, "-o", "cat", "--no-pager").stdout
        found = [json.loads(line) for line in text.splitlines() if line.startswith("{")]
        return [entry for entry in found if entry["kind"] in kinds]

    def stop(self) -> dict[str, object]:
        self.node.run("systemctl", "stop", RUNNER_UNIT, timeout=30)
        (end,) = self.lines("end")
        return end


def toolkit_standin_sighup(node: Node) -> float:
    """A stand-in for the nvidia-container-toolkit pod (a unit, not a pod: there is no kubelet in
    the lab) sends containerd the "reload" SIGHUP, as its SignalContainerd does. Returns the
    node's wall-clock time just before the kill."""
    main_pid = node.unit_property("containerd.service", "MainPID")
    out = node.run("systemd-run", "--unit=toolkit-standin", "--wait", "--pipe", "--collect",
                   "-p", "Description=stand-in for the nvidia-container-toolkit pod",
                   "/bin/sh", "-c", f"date +%s.%N; kill -HUP {main_pid}; sleep 1").stdout  # fmt: skip
    return float(out.split()[0])


def test_sighup_sender_is_named_under_the_units_hardening(node_factory: Callable[..., Node]) -> None:
    node = node_factory(tracefs=True, host_proc=True)
    other = node_factory()  # another node on the same kernel: its containerd is not ours
    runner = Runner(node, sandbox(tracefs_lines=TRACEFS_LINES))
    assert runner.lines("state") == []
    (ready,) = runner.lines("ready")
    machine_id = node.run("cat", "/etc/machine-id").stdout.strip()
    assert ready["instance"] == f"/sys/kernel/tracing/instances/nodemedic-{machine_id[:12]}"

    other.sh("kill -HUP $(systemctl show -p MainPID --value containerd.service)")
    wait_for(lambda: other.unit_property("containerd.service", "SubState") == "auto-restart", 10,
             "the other node's containerd to die of its SIGHUP")  # fmt: skip
    main_pid = int(node.unit_property("containerd.service", "MainPID"))
    sent = toolkit_standin_sighup(node)
    wait_for(lambda: runner.lines("event"), 10, "the SignalSeen")
    wait_for(lambda: node.unit_property("containerd.service", "SubState") == "auto-restart", 10,
             "containerd to die of the SIGHUP")  # fmt: skip
    end = runner.stop()

    (event,) = runner.lines("event")  # one: the other node's SIGHUP gave nothing
    assert event["source"] == "tracefs"
    assert (event["signal"], event["unit"], event["target_pid"], event["target_comm"]) == (
        1, "containerd.service", main_pid, "containerd")  # fmt: skip
    assert event["sender_comm"] == "sh"
    assert event["sender_cgroup"] == "/system.slice/toolkit-standin.service"
    assert (event["sender_unit"], event["sender_pod"], event["result"]) == ("toolkit-standin.service", "", 0)
    latency = float(str(event["wall"])) - sent
    print(f"kill -> SignalSeen inside the hardened unit: {latency * 1000:.1f} ms")
    assert latency < 2
    assert end["instance_left"] is False
    assert node.run("test", "-e", str(ready["instance"]), check=False).returncode == 1


def test_protect_kernel_tunables_keeps_tracefs_read_only(node_factory: Callable[..., Node]) -> None:
    """Why TRACEFS_LINES turn ProtectKernelTunables off: ReadWritePaths= does not undo it."""
    node = node_factory(tracefs=True, host_proc=True)
    runner = Runner(node, sandbox(tracefs_lines=["ProtectKernelTunables=yes",
                                                 "ReadWritePaths=-/sys/kernel/tracing"]))  # fmt: skip
    (state,) = runner.lines("state")
    message = str(state["message"])
    assert "Read-only file system" in message
    assert "will not be known" in message
    assert "ProtectKernelTunables=no" in message
    assert runner.lines("ready") == []
