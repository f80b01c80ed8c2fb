"""The parts that act on SIGHUP storms, on a real node: containerd's drop-in (started with SIGHUP
ignored, survives a SIGHUP, stock again once removed), the cgroup freezer (a stand-in sender
frozen and thawed; kubelet's and containerd's cgroups refused), the unit's ExecStopPost thawing
after a SIGKILL under the hardened sandbox, and `nodemedic sighup-restore`.

nodemedic's modules run inside the node with the node's own Python (as on a real node), against
its real systemd (D-Bus), its real /proc and cgroup2 tree.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable

import pytest
from lab.faults import containerd_serving, run_container, start_nodemedic, wait_for
from lab.node import Node

pytestmark = pytest.mark.system

UNIT = "containerd.service"
RUN_DROPIN = "/run/systemd/system/containerd.service.d/50-nodemedic-sighup.conf"
# A stand-in for the nvidia-container-toolkit pod that sends the SIGHUPs: a unit counting in a loop.
STANDIN = "toolkit-standin.service"
STANDIN_CGROUP = f"/system.slice/{STANDIN}"
COUNTER = "/run/toolkit-standin.counter"
REGISTRY = "/var/lib/nodemedic/frozen.json"

BUS = """
import asyncio, json, sys
from nodemedic.clock import MonotonicClock
from nodemedic.sources.dbus import SystemdBus

async def main():
    bus = SystemdBus([], lambda event: None, MonotonicClock())
    task = asyncio.get_running_loop().create_task(bus.run())
    try:
        if sys.argv[1] == "exec-start":
            print(json.dumps(await bus.exec_start(sys.argv[2])))
        else:
            await bus.daemon_reload()
    finally:
        task.cancel()
        await bus.close()

asyncio.run(main())
"""


def node_python(node: Node, code: str, *args: str, timeout: float = 30) -> str:
    """Run ``code`` with nodemedic importable, inside the node; its stdout."""
    python = ("env", "PYTHONPATH=/opt/nodemedic/src", "/opt/nodemedic/venv/bin/python3", "-c", code)
    return node.run(*python, *args, timeout=timeout).stdout


def exec_start(node: Node, unit: str = UNIT) -> list[list[str]]:
    """ExecStart as SystemdBus.exec_start reads it over the node's D-Bus."""
    return list(json.loads(node_python(node, BUS, "exec-start", unit)))


def daemon_reload(node: Node) -> None:
    node_python(node, BUS, "daemon-reload")


def install(node: Node, lines: list[list[str]], path: str = RUN_DROPIN) -> bool:
    code = (
        "import json, sys; from pathlib import Path; from nodemedic.actions import sighup_dropin as dropin; "
        "print(dropin.install_dropin(Path(sys.argv[2]), dropin.render_dropin(json.loads(sys.argv[1]))))"
    )
    return node_python(node, code, json.dumps(lines), path).strip() == "True"


def ignores_sighup(node: Node, pid: int) -> bool:
    code = (
        "import sys; from nodemedic.actions.sighup_dropin import ignores_sighup as i; "
        "print(i(int(sys.argv[1])))"
    )
    return node_python(node, code, str(pid)).strip() == "True"


def main_pid(node: Node) -> int:
    return int(node.unit_property(UNIT, "MainPID"))


def start_standin(node: Node) -> None:
    loop = f"i=0; while true; do i=$((i+1)); echo $i > {COUNTER}; sleep 0.1; done"
    node.run(
        "systemd-run",
        f"--unit={STANDIN}",
        "--description=stand-in for the toolkit pod",
        "/bin/sh",
        "-c",
        loop,
    )
    wait_for(lambda: node.sh(f"test -s {COUNTER}", check=False).returncode == 0, 10, "the stand-in to count")


def counting(node: Node) -> bool:
    """Does the stand-in's counter move within a second?"""
    before = node.run("cat", COUNTER).stdout
    time.sleep(1.0)
    return node.run("cat", COUNTER).stdout != before


def freezer_call(node: Node, call: str, registry: str = REGISTRY) -> str:
    code = (
        "import sys, time; from pathlib import Path; from nodemedic.actions.freezer import Freezer; "
        "from nodemedic.policy.sighup import DEFAULT_DENY; "
        "f = Freezer(registry=Path(sys.argv[1]), deny=DEFAULT_DENY, "
        "protected=['/system.slice/containerd.service']); "
        f"print({call})"
    )
    return node_python(node, code, registry).strip()


def cgroup_events(node: Node, cgroup: str) -> str:
    return node.run("cat", f"/sys/fs/cgroup{cgroup}/cgroup.events").stdout


def test_dropin_quoting_is_what_systemd_parses(node: Node) -> None:
    """Each argv word comes out of systemd's parser exactly as given (spaces, %, $, quotes, empty)."""
    node.write_file(
        "/etc/systemd/system/argv-standin.service", "[Service]\nType=oneshot\nExecStart=/bin/false\n"
    )
    words = ["a b", "100%", "$HOME", 'q"uo\\te', "", "tab\there", "${X}"]
    script = 'printf "%s\\n" "$@" > /run/argv.txt'
    path = "/run/systemd/system/argv-standin.service.d/50-nodemedic-sighup.conf"
    assert install(node, [["/bin/sh", "-c", script, "argv0", *words]], path)
    daemon_reload(node)
    node.run("systemctl", "start", "argv-standin.service")
    assert node.run("cat", "/run/argv.txt").stdout == "".join(f"{w}\n" for w in words)


def test_containerd_under_the_dropin_survives_sighup_and_is_stock_once_removed(
    node_factory: Callable[..., Node],
) -> None:
    node = node_factory(containers=True)
    stock = exec_start(node)
    assert stock == [["/usr/bin/containerd"]]
    assert not ignores_sighup(node, main_pid(node))  # stock: SIGHUP kills it

    assert install(node, stock)
    assert not install(node, stock)  # idempotent
    daemon_reload(node)
    wrapped = exec_start(node)
    assert wrapped == [["/usr/bin/env", "--ignore-signal=HUP", "/usr/bin/containerd"]]
    assert not install(node, wrapped)  # read back wrapped, rendered again: the same file, no double wrap
    survivor_shim = run_container(node, "survivor")
    node.run("systemctl", "restart", UNIT)
    wait_for(lambda: containerd_serving(node), 15, "containerd to serve after the restart")
    pid = main_pid(node)
    assert ignores_sighup(node, pid)

    node.run("kill", "-HUP", str(pid))
    time.sleep(3)
    assert main_pid(node) == pid
    assert node.unit_property(UNIT, "NRestarts") == "0"
    assert node.run("ctr", "--timeout", "3s", "version").returncode == 0
    assert "RUNNING" in node.sh("ctr task ls | grep '^survivor '").stdout
    assert node.sh(f"test -d /proc/{survivor_shim}", check=False).returncode == 0

    removed = node_python(
        node,
        "from nodemedic.actions.sighup_dropin import remove_dropins; "
        "print(remove_dropins('containerd.service'))",
    )
    assert RUN_DROPIN in removed
    daemon_reload(node)
    assert exec_start(node) == stock
    node.run("systemctl", "restart", UNIT)
    wait_for(lambda: containerd_serving(node), 15, "containerd to serve after the restart")
    stock_pid = main_pid(node)
    assert not ignores_sighup(node, stock_pid)
    node.run("kill", "-HUP", str(stock_pid))
    wait_for(lambda: main_pid(node) != stock_pid, 10, "a SIGHUP to kill stock containerd again")
    assert node.unit_property(UNIT, "ExecMainStatus") == "1"  # died of SIGHUP


def test_freezer_freezes_a_standin_sender_and_refuses_kubelet_and_containerd(node: Node) -> None:
    start_standin(node)
    until = time.time() + 300

    assert freezer_call(node, f"f.refusal('{STANDIN_CGROUP}')") == "None"
    freezer_call(node, f"f.freeze('{STANDIN_CGROUP}', {until})")
    assert "frozen 1" in cgroup_events(node, STANDIN_CGROUP)
    assert not counting(node)
    for pid in node.run("cat", f"/sys/fs/cgroup{STANDIN_CGROUP}/cgroup.procs").stdout.split():
        # cgroup v2 freezer: the tasks sleep in the freezer's trap (not state T as with SIGSTOP)
        assert node.sh(f"ps -o stat=,wchan= -p {pid}").stdout.split()[-1] == "get_signal"
    assert STANDIN_CGROUP in freezer_call(node, "f.frozen()")

    assert freezer_call(node, "f.thaw_all()") == str([STANDIN_CGROUP])
    assert "frozen 0" in cgroup_events(node, STANDIN_CGROUP)
    assert counting(node)
    assert freezer_call(node, "f.frozen()") == "{}"

    # kubelet.service is the lab's stand-in for the real kubelet
    assert "deny-list" in freezer_call(node, "f.refusal('/system.slice/kubelet.service')")
    assert "deny-list" in freezer_call(node, "f.refusal('/system.slice/containerd.service')")
    assert "ancestor" in freezer_call(node, "f.refusal('/system.slice')")
    assert "frozen 0" in cgroup_events(node, "/system.slice/containerd.service")


def test_execstoppost_thaws_after_sigkill_under_the_sandbox(node: Node) -> None:
    start_standin(node)
    start_nodemedic(node)  # shipped policy: [sighup] mode = "observe", so the daemon itself thaws nothing
    freezer_call(node, f"f.freeze('{STANDIN_CGROUP}', {time.time() + 3600})")
    assert not counting(node)
    assert STANDIN_CGROUP in node.run("cat", REGISTRY).stdout

    node.run("systemctl", "kill", "-s", "KILL", "nodemedic.service")

    wait_for(
        lambda: "frozen 0" in cgroup_events(node, STANDIN_CGROUP), 20, "ExecStopPost to thaw the stand-in"
    )
    assert counting(node)
    assert json.loads(node.run("cat", REGISTRY).stdout)["frozen"] == {}
    lines = node.run("journalctl", "-u", "nodemedic.service", "-o", "cat", "--no-pager").stdout
    assert f"thawed {STANDIN_CGROUP}" in lines


def test_sighup_restore_removes_only_our_dropin_and_thaws(node: Node) -> None:
    start_standin(node)
    assert install(node, exec_start(node))
    node.write_file(
        "/run/systemd/system/containerd.service.d/10-operator.conf", "[Service]\nLimitNOFILE=1048576\n"
    )
    daemon_reload(node)
    freezer_call(node, f"f.freeze('{STANDIN_CGROUP}', {time.time() + 3600})")

    out = node.run("nodemedic", "sighup-restore").stdout

    assert f"removed {RUN_DROPIN}" in out
    assert f"thawed {STANDIN_CGROUP}" in out
    assert "daemon-reload" in out
    assert "stock SIGHUP behaviour" in out  # containerd was not restarted under the drop-in
    assert node.sh(f"test -e {RUN_DROPIN}", check=False).returncode != 0
    assert node.sh("test -e /run/systemd/system/containerd.service.d/10-operator.conf").returncode == 0
    assert exec_start(node) == [["/usr/bin/containerd"]]
    assert counting(node)
    again = node.run("nodemedic", "sighup-restore").stdout
    assert "no nodemedic drop-in" in again
