"""CASE C on a real node: containerd refuses its config.toml after a restart (the toolkit's SIGHUP).
nodemedic keeps the broken file aside, restores the last-known-good copy byte for byte (or
generates a default), and containerd serves again; running containers survive."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from lab.faults import SHIPPED_POLICY, containerd_serving, records, run_container, start_nodemedic, wait_for
from lab.node import Node

pytestmark = pytest.mark.system
RULE = "containerd-config-broken"
EDITED = "containerd-config-edited-broken"
DOWN = "containerd-config-broken-while-down"  # its own tests: test_config_down.py
CONFIG = "/etc/containerd/config.toml"
BROKEN = 'version = 2\\n[plugins."io.containerd.grpc.v1.cri"\\n  sandbox_image = "pause"\\n'


def policy(settle: str, *, edited_rule: bool = False) -> str:
    """The shipped policy with a shorter ``settle``. The CASE C tests below are about containerd meeting
    a broken file at its start (written while nodemedic was not watching, or before a reboot): they
    leave out the rules that catch the write itself, while containerd runs (tested at the end) and
    while it is down (test_config_down.py)."""
    import tomlkit

    text = SHIPPED_POLICY.read_text().replace('settle = "1m"', f'settle = "{settle}"')
    doc = tomlkit.parse(text)
    rules = doc["rule"]
    for name in [] if edited_rule else [EDITED, DOWN]:
        del rules[[r["name"] for r in rules].index(name)]  # type: ignore[union-attr]
    return tomlkit.dumps(doc)


def break_config_and_restart(node: Node) -> None:
    """A crashing toolkit leaves a partial section; its next SIGHUP makes containerd reload it."""
    node.sh(f"printf '{BROKEN}' > {CONFIG}")
    pid = node.unit_property("containerd.service", "MainPID")
    node.run("kill", "-HUP", pid)


def test_broken_config_is_restored_from_the_last_known_good_copy(node_factory: Callable[..., Node]) -> None:
    node = node_factory(containers=True)
    run_container(node, "app")
    good = node.run("sha256sum", CONFIG).stdout.split()[0]
    start_nodemedic(node, policy=policy("1s"))
    wait_for(lambda: records(node, outcome="config-kept"), 15, "a last-known-good copy")

    break_config_and_restart(node)
    wait_for(lambda: records(node, rule=RULE, outcome="repaired"), 40, "the repaired record")
    assert containerd_serving(node)
    assert node.run("sha256sum", CONFIG).stdout.split()[0] == good, "restored byte for byte"
    [aside] = node.sh(f"ls {CONFIG}.broken-*").stdout.split()
    assert node.sh(f"cat {aside}").stdout == BROKEN.replace("\\n", "\n"), "the broken file is kept"
    assert "RUNNING" in node.run("ctr", "task", "ls").stdout, "the container survived"
    said = node.run("journalctl", "-u", "containerd", "-q", "--grep", "failed to load TOML", check=False)
    assert said.returncode == 0, "containerd did refuse the broken file"


def test_without_a_good_copy_a_default_is_generated(node: Node) -> None:
    start_nodemedic(node, policy=policy("1h"))  # no copy will have been taken
    break_config_and_restart(node)
    wait_for(lambda: records(node, rule=RULE, outcome="repaired"), 40, "the repaired record")
    assert containerd_serving(node)
    assert "SystemdCgroup = true" in node.sh(f"cat {CONFIG}").stdout
    [restore] = records(node, rule=RULE, action="restore-config")
    assert "generated default" in restore["NODEMEDIC_DETAIL"]


def test_observe_mode_keeps_the_broken_config(node: Node) -> None:
    start_nodemedic(node, mode="observe", policy=policy("1s"))
    break_config_and_restart(node)
    wait_for(lambda: records(node, rule=RULE, outcome="observed"), 40, "the observed record")
    assert "restore-config" in {r["NODEMEDIC_ACTION"] for r in records(node, rule=RULE, outcome="would-do")}
    assert node.sh(f"cat {CONFIG}").stdout == BROKEN.replace("\\n", "\n")
    assert not containerd_serving(node)


@pytest.mark.parametrize("mode", ["enforce", "observe"])
def test_an_edit_containerd_would_refuse_is_caught_while_it_runs(node: Node, mode: str) -> None:
    """No restart needed to see it: the write itself is caught; containerd keeps running."""
    good = node.run("sha256sum", CONFIG).stdout.split()[0]
    start_nodemedic(node, mode=mode, policy=policy("1s", edited_rule=True))
    wait_for(lambda: records(node, outcome="config-kept"), 15, "a last-known-good copy")
    pid = node.unit_property("containerd.service", "MainPID")

    node.sh(f"printf '{BROKEN}' > {CONFIG}")
    if mode == "observe":
        wait_for(lambda: records(node, rule=EDITED, outcome="observed"), 15, "the observed record")
        assert len(records(node, rule=EDITED, action="restore-config", outcome="would-do")) == 1
        assert node.sh(f"cat {CONFIG}").stdout == BROKEN.replace("\\n", "\n"), "observe touches nothing"
    else:
        wait_for(lambda: records(node, rule=EDITED, outcome="repaired"), 15, "the repaired record")
        assert node.run("sha256sum", CONFIG).stdout.split()[0] == good, "restored byte for byte"
        [aside] = node.sh(f"ls {CONFIG}.broken-*").stdout.split()
        assert node.sh(f"cat {aside}").stdout == BROKEN.replace("\\n", "\n"), "the edit is kept aside"
    assert node.unit_property("containerd.service", "MainPID") == pid, "containerd was not restarted"
    assert containerd_serving(node)


def test_an_edit_containerd_would_refuse_is_left_alone_without_a_good_copy(node: Node) -> None:
    """No default is generated under a running containerd: it would drop settings (nvidia runtime)."""
    start_nodemedic(node, policy=policy("1h", edited_rule=True))  # no copy will have been taken
    node.sh(f"printf '{BROKEN}' > {CONFIG}")
    wait_for(lambda: records(node, rule=EDITED, outcome="nothing-to-do"), 15, "the nothing-to-do record")
    [skipped] = records(node, rule=EDITED, action="restore-config", outcome="skipped")
    assert "no last-known-good copy" in skipped["NODEMEDIC_DETAIL"]
    assert node.sh(f"cat {CONFIG}").stdout == BROKEN.replace("\\n", "\n"), "left for a human"
    assert containerd_serving(node)
