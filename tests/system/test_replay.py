"""`nodemedic replay` against what really happened (issue 13 item 4): on a lab node the daemon meets a
broken config.toml (containerd refuses it after the toolkit's SIGHUP) and repairs it; the node's
journal, exported (`journalctl -o export`) and as its journal file, is replayed on the host with the
node's policy (and on the node from its own journal), and gives the incidents the live daemon
detected from the journal. The incidents it detected from other sources (the version reading at
start, the SIGHUP guard) are those replay names as not replayable. The same for an orphaned shim,
whose only trigger is systemd's line in the journal; the faults seen only by inotify (a socket path
made a directory) or by the probe (a hang) are named as not replayed, with the reason.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from lab.faults import SHIPPED_POLICY, containerd_serving, records, run_container, start_nodemedic, wait_for
from lab.node import Node

from nodemedic.tools.replay import WHY_NOT

pytestmark = pytest.mark.system
RULE = "containerd-config-broken"
EDITED = "containerd-config-edited-broken"
CONFIG = "/etc/containerd/config.toml"
SHIMS = "left-over-shims"
BUNDLES = "/run/containerd/io.containerd.runtime.v2.task/default"
CURSOR = "/var/lib/nodemedic/journal.cursor"
BROKEN = 'version = 2\\n[plugins."io.containerd.grpc.v1.cri"\\n  sandbox_image = "pause"\\n'


def node_policy() -> str:
    """The shipped policy with a 1 s settle (a good copy is kept at once), without the rules that
    catch the write itself (while containerd runs, and while it is down: the SIGHUP follows the write
    within the file triggers' settle): containerd must meet the file at its start."""
    import tomlkit

    doc = tomlkit.parse(SHIPPED_POLICY.read_text().replace('settle = "1m"', 'settle = "1s"'))
    rules = doc["rule"]
    for name in (EDITED, "containerd-config-broken-while-down"):
        del rules[[r["name"] for r in rules].index(name)]  # type: ignore[union-attr]
    return tomlkit.dumps(doc)


def export_journal(node: Node, tmp_path: Path) -> Path:
    """The node's whole journal as `journalctl -o export` writes it, copied to the host."""
    node.sh("journalctl --sync && journalctl -o export > /tmp/node.export")
    export = tmp_path / "node.export"
    shutil.copyfile(node.root / "tmp/node.export", export)
    return export


def replay(*args: str) -> dict[str, Any]:
    """The real command on the host, as an operator runs it."""
    done = subprocess.run(
        [sys.executable, "-m", "nodemedic", "replay", "--json", *args],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert done.stderr == "", "no progress bar off a terminal"
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def test_replay_of_a_repaired_node_finds_the_live_incidents(node: Node, tmp_path: Path) -> None:
    text = node_policy()
    start_nodemedic(node, policy=text)
    wait_for(lambda: records(node, outcome="config-kept"), 15, "a last-known-good copy")
    node.sh(f"printf '{BROKEN}' > {CONFIG}")
    node.run("kill", "-HUP", node.unit_property("containerd.service", "MainPID"))
    wait_for(lambda: records(node, rule=RULE, outcome="repaired"), 40, "the repaired record")
    wait_for(lambda: containerd_serving(node), 15, "containerd serving again")
    node.run("systemctl", "stop", "nodemedic.service", timeout=60)  # the live record is complete

    detected = records(node, kind="detected")
    live = Counter(r["NODEMEDIC_RULE"] for r in detected if r["NODEMEDIC_SOURCE"] == "journal")
    assert live == {RULE: 1}
    export = export_journal(node, tmp_path)
    policy = tmp_path / "policy.toml"
    policy.write_text(text)

    result = replay("--file", str(export), "--policy", str(policy))
    assert Counter(i["rule"] for i in result["incidents"]) == live
    [incident] = result["incidents"]
    assert (incident["decided"], incident["outcome"]) == ("repair", "repaired")
    assert "failed to load TOML" in incident["trigger"]
    not_replayed = {r["rule"] for r in result["not_replayed"] if not r["partly"]}
    others = {r["NODEMEDIC_RULE"] for r in detected if r["NODEMEDIC_SOURCE"] != "journal"}
    assert others <= not_replayed, "what the live daemon saw elsewhere is named as not replayable"

    journal_file = node.sh(
        "ls /var/log/journal/*/system.journal /run/log/journal/*/system.journal 2>/dev/null | head -1"
    )
    copy = tmp_path / "system.journal"
    shutil.copyfile(node.root / journal_file.stdout.strip().lstrip("/"), copy)
    from_file = replay("--file", str(copy), "--policy", str(policy))
    assert from_file["source"]["kind"] == "journal-file"
    assert from_file["incidents"] == result["incidents"], "the journal file replays as its export"

    # On the node itself: its own journal (read with the journal source's matches), the last hour.
    local = json.loads(node.run("nodemedic", "replay", "--json", "--since=-1h", timeout=120).stdout)
    assert local["source"]["kind"] == "journal"
    assert Counter(i["rule"] for i in local["incidents"]) == live


def orphan_a_shim(node: Node) -> int:
    """A real orphan, as test_shims.py makes one: containerd stopped (KillMode=process keeps the
    shim), the container's process killed, its bundle moved away, containerd started again: systemd
    names the shim ("Found left-over process ..."), the only trigger of the rule."""
    shim = run_container(node, "gone")
    node.run("systemctl", "stop", "containerd.service")
    node.run("kill", "-9", node.sh(f"cat /proc/{shim}/task/*/children").stdout.split()[0])
    node.run("mv", f"{BUNDLES}/gone", "/run/moved-bundle-of-gone")
    node.run("systemctl", "start", "containerd.service")
    return shim


def test_replay_of_an_orphaned_shim_finds_the_live_incidents(
    node_factory: Callable[..., Node], tmp_path: Path
) -> None:
    node = node_factory(containers=True)
    text = SHIPPED_POLICY.read_text()
    start_nodemedic(node, policy=text)
    shim = orphan_a_shim(node)
    wait_for(lambda: records(node, rule=SHIMS, action="kill-orphaned-shims", outcome="done"), 20, "the kill")
    wait_for(lambda: node.sh(f"test -d /proc/{shim}", check=False).returncode != 0, 10, "the shim gone")
    # every line of systemd's naming read (the journal cursor past it) before the record is complete
    named = "journalctl -q -u containerd.service -g 'Found left-over process' -o cat"
    behind = f'{named} --after-cursor="$(cat {CURSOR})"'
    read_past = f'test -s {CURSOR} && test -z "$({behind})"'
    wait_for(lambda: node.sh(read_past, check=False).returncode == 0, 20, "nodemedic to read past them")
    node.run("systemctl", "stop", "nodemedic.service", timeout=60)

    detected = records(node, kind="detected", rule=SHIMS)
    live = Counter(r["NODEMEDIC_RULE"] for r in detected)
    assert live == {SHIMS: 1}, "one incident: systemd's lines of one start, one orphan"
    assert {r["NODEMEDIC_SOURCE"] for r in detected} == {"journal"}
    policy = tmp_path / "policy.toml"
    policy.write_text(text)
    result = replay("--file", str(export_journal(node, tmp_path)), "--policy", str(policy))

    incidents = [i for i in result["incidents"] if i["rule"] == SHIMS]
    assert Counter(i["rule"] for i in incidents) == live, "the same incidents of the rule as live"
    assert all(i["would"] == ["kill-orphaned-shims containerd.service"] for i in incidents)
    assert any(str(shim) in i["trigger"] for i in incidents), "systemd's line naming the orphan"
    why = {r["rule"]: r for r in result["not_replayed"]}
    assert SHIMS not in why, "a journal-only rule is replayed"
    # Their journal lines are replayed (partly); what the fault is seen by is not in the journal.
    for rule, reason, seen_by in (
        ("socket-path-is-directory", "inotify", "path"),
        ("containerd-hung", "probe", "probe"),
    ):
        assert WHY_NOT[reason] in why[rule]["why"], f"{rule}: named as not replayed, with why"
        assert why[rule]["triggers"] == [seen_by]
