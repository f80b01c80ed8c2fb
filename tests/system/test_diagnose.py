"""`nodemedic diagnose` on a real node with nodemedic stopped (and once with D-Bus down too): each
fault injected as it happens in production (see lab/faults.py and the tests of each rule) is named,
with the shipped policy's rule, and exits 1; a healthy node is "healthy" and exits 0. diagnose
changes nothing: the fault is still there after it ran."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest
from lab.faults import (
    POLICY_PATH,
    SHIPPED_POLICY,
    SOCKET,
    make_directory_at,
    run_container,
    sighup_containerd,
    wait_for,
)
from lab.node import Node

pytestmark = pytest.mark.system
CONFIG = "/etc/containerd/config.toml"
BROKEN = 'version = 2\\n[plugins."io.containerd.grpc.v1.cri"\\n  sandbox_image = "pause"\\n'
BUNDLES = "/run/containerd/io.containerd.runtime.v2.task/default"
FAULT_DROPIN = "/etc/systemd/system/containerd.service.d/50-lab-fault.conf"
HOLD_FDS = (
    "import socket, time\nheld = []\nfor _ in range({n}):\n    s = socket.socket(socket.AF_UNIX)\n"
    "    s.connect('{sock}')\n    held.append(s)\ntime.sleep(3600)\n"
)


def installed_and_stopped(node: Node) -> None:
    """The shipped policy installed, nodemedic.service stopped: nothing repairs the fault."""
    node.write_file(POLICY_PATH, SHIPPED_POLICY.read_text())
    node.run("systemctl", "stop", "nodemedic.service", timeout=60)
    assert node.unit_property("nodemedic.service", "ActiveState") == "inactive"


def diagnose(node: Node) -> tuple[int, dict[str, Any]]:
    done = node.run("nodemedic", "diagnose", "--json", check=False, timeout=120)
    assert done.stdout.startswith("{"), done.stderr
    return done.returncode, json.loads(done.stdout)


def the_fault(report: dict[str, Any]) -> dict[str, Any]:
    faults = [c for c in report["cases"] if c["fault"]]
    assert len(faults) == 1, json.dumps(report, indent=1)
    return faults[0]


def status(report: dict[str, Any], check: str) -> str:
    return str(next(c["status"] for c in report["checks"] if c["name"] == check))


def journal_has(node: Node, text: str) -> bool:
    return text in node.run("journalctl", "-q", "-u", "containerd.service", "-o", "cat").stdout


def test_a_healthy_node_is_healthy(node: Node) -> None:
    installed_and_stopped(node)
    code, report = diagnose(node)
    assert (code, report["result"]) == (0, "healthy"), json.dumps(report, indent=1)
    assert report["schema"] == 1
    assert [c for c in report["cases"] if c["fault"]] == []
    assert {c["name"]: c["status"] for c in report["checks"]}["unit"] == "ok"
    # the text form says so too
    assert "result: healthy (exit 0)" in node.run("nodemedic", "diagnose", check=False, timeout=120).stdout


def test_socket_directory(node: Node) -> None:
    installed_and_stopped(node)
    sighup_containerd(node)
    make_directory_at(node, SOCKET)
    wait_for(lambda: journal_has(node, "is a directory"), 20, "containerd's start to fail on the directory")
    code, report = diagnose(node)
    case = the_fault(report)
    assert code == 1
    assert (case["name"], case["rule"]) == ("socket directory", "socket-path-is-directory")
    assert "remove-socket-dir" in case["would"]
    assert status(report, "paths") == "problem"
    assert node.sh(f"test -d {SOCKET}", check=False).returncode == 0, "diagnose changed nothing"


def test_hang(node: Node) -> None:
    installed_and_stopped(node)
    pid = node.unit_property("containerd.service", "MainPID")
    node.run("kill", "-STOP", pid)
    try:
        code, report = diagnose(node)
        case = the_fault(report)
        assert code == 1
        assert (case["name"], case["rule"]) == ("hang", "containerd-hung")
        assert status(report, "unit") == "ok", "systemd still says active/running"
        assert status(report, "probe") == "problem"
        assert node.unit_property("containerd.service", "MainPID") == pid, "diagnose restarted nothing"
    finally:
        node.run("kill", "-CONT", pid)


def test_broken_config(node: Node) -> None:
    installed_and_stopped(node)
    node.sh(f"printf '{BROKEN}' > {CONFIG}")
    node.run("systemctl", "restart", "containerd.service", check=False, timeout=60)
    wait_for(lambda: journal_has(node, "failed to load TOML"), 20, "containerd to refuse its config")
    code, report = diagnose(node)
    case = the_fault(report)
    assert code == 1
    assert (case["name"], case["rule"]) == ("broken config", "containerd-config-broken")
    assert "restore-config" in case["would"]
    assert node.sh(f"cat {CONFIG}").stdout == BROKEN.replace("\\n", "\n"), "diagnose changed nothing"


def test_orphaned_shim(node_factory: Callable[..., Node]) -> None:
    node = node_factory(containers=True)
    installed_and_stopped(node)
    live_shim, gone_shim = run_container(node, "app"), run_container(node, "gone")
    node.run("systemctl", "stop", "containerd.service")  # KillMode=process: the shims stay
    child = node.sh(f"cat /proc/{gone_shim}/task/*/children").stdout.split()[0]
    node.run("kill", "-9", child)
    node.run("mv", f"{BUNDLES}/gone", "/run/moved-bundle-of-gone")
    node.run("systemctl", "start", "containerd.service")  # systemd: "Found left-over process ..."
    wait_for(lambda: journal_has(node, f"Found left-over process {gone_shim}"), 20, "systemd's naming")
    code, report = diagnose(node)
    case = the_fault(report)
    assert code == 1
    assert (case["name"], case["rule"]) == ("left-over shims", "left-over-shims")
    shims = next(c["evidence"] for c in report["checks"] if c["name"] == "shims")
    assert f"shim {gone_shim} (named by systemd): proven orphan" in shims
    assert any(line.startswith(f"shim {live_shim} ") and "kept" in line for line in shims)
    assert node.sh(f"test -d /proc/{gone_shim}", check=False).returncode == 0, "diagnose killed nothing"


def test_fd_exhaustion(node: Node) -> None:
    installed_and_stopped(node)
    node.write_file(FAULT_DROPIN, "[Service]\nLimitNOFILE=256\n")
    node.run("systemctl", "daemon-reload")
    node.run("systemctl", "restart", "containerd.service")
    node.write_file("/root/hold.py", HOLD_FDS.format(n=230, sock=SOCKET))
    node.run("systemd-run", "--unit=fd-holder", "python3", "/root/hold.py")
    pid = node.unit_property("containerd.service", "MainPID")
    held = lambda: int(node.sh(f"ls /proc/{pid}/fd | wc -l").stdout) > 0.8 * 256  # noqa: E731
    wait_for(held, 15, "containerd to hold over 80 % of its fds")
    code, report = diagnose(node)
    case = the_fault(report)
    assert code == 1
    assert (case["name"], case["rule"]) == ("fd exhaustion", "containerd-fd-exhaustion")
    assert case["would"].startswith("observe"), "the rule ships in observe mode"
    assert "LimitNOFILE" in case["advice"]
    assert status(report, "fds") == "problem"


def test_with_the_bus_down_units_are_read_with_systemctl(node: Node) -> None:
    installed_and_stopped(node)
    node.run("systemctl", "stop", "dbus.socket", "dbus.service")
    pid = node.unit_property("containerd.service", "MainPID")
    node.run("kill", "-STOP", pid)
    try:
        code, report = diagnose(node)
        assert code == 1
        assert (the_fault(report)["name"], the_fault(report)["rule"]) == ("hang", "containerd-hung")
        unit = next(c for c in report["checks"] if c["name"] == "unit")
        assert unit["status"] == "ok"
        assert "read over systemctl (D-Bus: " in unit["evidence"][0]
    finally:
        node.run("kill", "-CONT", pid)
