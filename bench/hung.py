"""Benchmark: containerd hung (SIGSTOP; systemd still reports active/running), with nodemedic.

Each run boots a fresh lab node with a real container running, SIGSTOPs containerd's main process
and measures, from the node's side, the time until `ctr version` answers again (polled every
20 ms; one try costs 20-40 ms), and nodemedic's detection record's own timestamp. GKE's node health
monitor takes about 70 s for this fault (domain.md); systemd alone never notices.

    .venv/bin/python bench/hung.py --runs 10
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lab.faults import realtime, records, run_container, start_nodemedic, wait_for
from lab.image import ensure_image
from lab.node import Node

from stats import summary

RULE = "containerd-hung"
HANG_AND_WAIT = (
    "pid=$(systemctl show -p MainPID --value containerd); t0=$(date +%s.%N); kill -STOP $pid; "
    "sleep 0.3; until ctr --timeout 1s --connect-timeout 1s version >/dev/null 2>&1; do sleep 0.02; done; "
    'echo "$t0 $(date +%s.%N)"'
)


def one_run(image: Path) -> tuple[float, float, bool]:
    with Node.boot(image=image, containers=True) as node:
        run_container(node, "app")
        start_nodemedic(node)
        hung, serving = (float(t) for t in node.sh(HANG_AND_WAIT, timeout=60).stdout.split())
        detected = wait_for(lambda: records(node, rule=RULE, kind="detected"), 10, "the detection record")
        survived = "RUNNING" in node.run("ctr", "task", "ls").stdout
        return realtime(detected[0]) - hung, serving - hung, survived  # type: ignore[index]


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=10)
    args = parser.parse_args()
    image = ensure_image()
    detections, recoveries, survived = [], [], 0
    for i in range(args.runs):
        detection, recovery, alive = one_run(image)
        detections.append(detection)
        recoveries.append(recovery)
        survived += alive
        print(
            f"run {i + 1}/{args.runs}: detected {detection:.2f} s, serving {recovery:.2f} s", file=sys.stderr
        )
    print("\ncontainerd hung (SIGSTOP), a container running (containerd 1.6.20, lab node)")
    print(summary("hang -> detection record", detections, unit="s"))
    print(summary("hang -> containerd serving again", recoveries, unit="s"))
    print(f"{'containers still running after the repair':<44} {survived}/{args.runs}")
    print(f"\nreproduce: .venv/bin/python bench/hung.py --runs {args.runs}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
