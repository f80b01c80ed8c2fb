"""A hostile directory at containerd's socket path on a real node (issue 11): a FIFO, a unix socket,
symlinks to / and to /etc/shadow and a hard link. The repair succeeds, nothing outside the
directory is read, everything is in the quarantine's manifest; past a bound it still succeeds and
keeps the directory aside whole."""

from __future__ import annotations

import json
from typing import Any

import pytest
from lab.faults import (
    HOSTILE_ENTRIES,
    SHIPPED_POLICY,
    SOCKET,
    containerd_serving,
    make_hostile_directory_at,
    records,
    sighup_containerd,
    start_nodemedic,
    wait_for,
)
from lab.node import Node

pytestmark = pytest.mark.system
RULE = "socket-path-is-directory"
QUARANTINE = "/var/lib/nodemedic/quarantine"
MANIFEST = "MANIFEST.nodemedic.json"


def repaired(node: Node) -> list[dict[str, str]]:
    return records(node, rule=RULE, outcome="repaired")


def quarantined(node: Node) -> tuple[str, dict[str, Any], dict[str, dict[str, Any]]]:
    """The one quarantine entry, its manifest and the manifest's rows by path."""
    [kept] = node.sh(f"ls -d {QUARANTINE}/*-containerd.sock").stdout.split()
    manifest = json.loads(node.sh(f"cat {kept}/{MANIFEST}").stdout)
    return kept, manifest, {row["path"]: row for row in manifest["entries"]}


def asides(node: Node) -> list[str]:
    return [n for n in node.sh("ls -A /run/containerd").stdout.split() if "nodemedic" in n]


def test_hostile_directory_is_quarantined_without_reading_outside(node: Node) -> None:
    start_nodemedic(node)
    sighup_containerd(node)
    make_hostile_directory_at(node, SOCKET)

    wait_for(lambda: repaired(node), 30, "nodemedic's 'repaired' record")
    assert containerd_serving(node)
    actions = {r["NODEMEDIC_ACTION"]: r["NODEMEDIC_OUTCOME"] for r in records(node, rule=RULE, kind="action")}
    assert actions["remove-socket-dir"] == "done"
    assert records(node, outcome="failed") == [], "hostile content is not a failed repair"

    kept, manifest, rows = quarantined(node)
    assert manifest["complete"] is True
    assert {path: rows[path]["type"] for path in HOSTILE_ENTRIES} == HOSTILE_ENTRIES
    assert rows["root"]["target"] == "/"
    assert rows["shadow"]["target"] == "/etc/shadow"
    assert rows["data"]["inode"] == rows["sub/data.hardlink"]["inode"]
    assert rows["data"]["nlink"] == 2
    assert node.sh(f"cat {kept}/data").stdout == "pod data"
    assert node.sh(f"test -L {kept}/shadow && test -L {kept}/root", check=False).returncode == 0
    assert node.sh(f"test -e {kept}/pipe || test -e {kept}/pod.sock", check=False).returncode != 0, (
        "FIFOs and sockets are listed, never made again"
    )
    # nothing outside was read: no regular file in the quarantine holds /etc/shadow's content
    shadow = [line for line in node.sh("cat /etc/shadow").stdout.splitlines() if line]
    copied = node.sh(f"find {kept} -type f ! -name {MANIFEST} -exec cat {{}} +").stdout
    assert shadow
    assert not [line for line in shadow if line in copied]
    assert asides(node) == [], "all of it copied or listed: the aside copy is removed"


def test_past_a_bound_the_repair_succeeds_and_keeps_the_directory_aside(node: Node) -> None:
    policy = SHIPPED_POLICY.read_text().replace(
        'root = "/run/containerd"', 'root = "/run/containerd"\nmax_bytes = 4', 1
    )
    start_nodemedic(node, policy=policy)
    sighup_containerd(node)
    make_hostile_directory_at(node, SOCKET, data="more than four bytes")

    wait_for(lambda: repaired(node), 30, "nodemedic's 'repaired' record")
    assert containerd_serving(node)
    [aside] = asides(node)
    assert node.sh(f"cat /run/containerd/{aside}/data").stdout == "more than four bytes", "nothing lost"
    _, manifest, rows = quarantined(node)
    assert manifest["complete"] is False
    assert "max_bytes (4)" in rows["data"]["skipped"]
    [removal] = records(node, action="remove-socket-dir")
    assert removal["NODEMEDIC_OUTCOME"] == "done"
    assert f"/run/containerd/{aside}" in removal["NODEMEDIC_DETAIL"]
