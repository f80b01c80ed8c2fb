"""`make demo`: boot a real node, break containerd the way the GPU incident did, watch nodemedic fix it.

1. builds (first time, ~1-2 min) or unpacks the lab node image;
2. boots a node: systemd, D-Bus, journald, containerd 1.6.20, nodemedic.service from this checkout;
3. sends containerd a SIGHUP as nvidia-container-toolkit does (containerd exits; systemd schedules a
   restart in 5 s) and, in that window, makes a directory at /run/containerd/containerd.sock as a
   pod's hostPath mount does: from then on containerd can never start by itself;
4. prints nodemedic's journald records and the time from the fault to containerd serving again;
5. tears the node down.
"""

from __future__ import annotations

import sys
import time

from lab.faults import (
    SOCKET,
    directory_until_serving,
    realtime,
    records,
    sighup_containerd,
    start_nodemedic,
    wait_for,
)
from lab.image import ensure_image
from lab.node import Node

FIELDS = ("RULE", "ACTION", "OUTCOME", "MODE", "PATH", "UNIT", "ELAPSED_MS")


def say(text: str = "") -> None:
    print(text, flush=True)


def show_records(node: Node, since: float) -> None:
    for rec in records(node):
        at = realtime(rec) - since
        fields = " ".join(f"{k}={rec['NODEMEDIC_' + k]}" for k in FIELDS if "NODEMEDIC_" + k in rec)
        say(f"  {at * 1000:+8.1f} ms  [{rec['NODEMEDIC_KIND']:<8}] {rec['MESSAGE']}")
        if fields:
            say(f"{'':24}{fields}")


def main() -> int:
    say("== nodemedic demo: containerd's socket path turned into a directory ==\n")
    image = ensure_image()
    started = time.monotonic()
    with Node.boot(image=image) as node:
        say(f"\n1. booted a lab node in {time.monotonic() - started:.1f}s "
            "(systemd as PID 1, D-Bus, journald, containerd):")  # fmt: skip
        say("   " + node.run("ctr", "version").stdout.replace("\n", "\n   ").rstrip())
        start_nodemedic(node)
        say("\n2. nodemedic.service is " + node.unit_property("nodemedic.service", "ActiveState")
            + " (policy: /etc/nodemedic/policy.toml, the shipped one, mode enforce)")  # fmt: skip
        pid = sighup_containerd(node)
        say(f"\n3. fault: SIGHUP to containerd (PID {pid}), as nvidia-container-toolkit sends at pod start;")
        say("   containerd exited, systemd will restart it in 5 s. In that window a pod's hostPath mount")
        say(f"   creates a DIRECTORY at {SOCKET}: containerd could never start again.")
        fault, serving = directory_until_serving(node, SOCKET, timeout=30)
        wait_for(lambda: records(node, kind="outcome"), 30, "nodemedic's outcome record")
        say("\n4. nodemedic's journald records (ms after the fault;"
            " `journalctl -u nodemedic -o verbose` shows every field):")  # fmt: skip
        show_records(node, fault)
        if serving is None:
            say("\n!! containerd was NOT serving again within 30 s")
            return 1
        say(
            f"\n5. containerd answered `ctr version` again {(serving - fault) * 1000:.0f} ms after the fault."
        )
        say("   " + node.sh(f"ls -l {SOCKET}").stdout.strip())
        say("   Without nodemedic, systemd restarts containerd every 5 s and every start fails on the")
        say("   directory; `make bench` measures both (docs/benchmarks.md).")
        say("\n6. tearing the node down.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
