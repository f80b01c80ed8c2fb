"""Benchmark: containerd hung (SIGSTOP; systemd still reports active/running), with nodemedic.

Each run boots a fresh lab node with a real container running, SIGSTOPs containerd's main process
and measures, from the node's side, the time until `ctr version` answers again (polled every
20 ms; one try costs 20-40 ms), and nodemedic's detection record's own timestamp. GKE's node health
monitor takes about 70 s for this fault (domain.md); systemd alone never notices.

The slow-but-alive case (no false alarm): a containerd that is CPU-starved answers late but
answers. The lab node's cgroup2 has no cpu controller (lab.md), so the starvation is a stand-in
(lab.faults.starve_containerd): containerd's main process is stopped 350 ms of every 400 ms, so
a request waits up to ~360 ms for containerd's next 50 ms slice; `ctr version` is timed meanwhile.
For ``--slow-seconds`` nodemedic must restart nothing and record no hang.

    .venv/bin/python bench/hung.py --runs 10 --slow-runs 3
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lab.faults import (
    STARVE_UNIT,
    realtime,
    records,
    run_container,
    start_nodemedic,
    starve_containerd,
    wait_for,
)
from lab.image import ensure_image
from lab.node import Node

from stats import summary

RULE = "containerd-hung"
HANG_AND_WAIT = (
    "pid=$(systemctl show -p MainPID --value containerd); t0=$(date +%s.%N); kill -STOP $pid; "
    "sleep 0.3; until ctr --timeout 1s --connect-timeout 1s version >/dev/null 2>&1; do sleep 0.02; done; "
    'echo "$t0 $(date +%s.%N)"'
)

# Request latencies while slowed, as ctr sees them (each on a fresh connection), until the end.
TIMED_REQUESTS = (
    f"while systemctl -q is-active {STARVE_UNIT}; do t0=$(date +%s%N); "
    "ctr --timeout 5s version >/dev/null 2>&1; echo $(( ($(date +%s%N) - t0) / 1000000 )); "
    "sleep 0.$((RANDOM % 4))3; done"
)


def slow_run(image: Path, seconds: int) -> tuple[int, int, list[float]]:
    """containerd slowed for ``seconds``: (restarts, hang records, ctr's latencies in s)."""
    with Node.boot(image=image) as node:
        start_nodemedic(node)
        before = node.unit_property("containerd.service", "MainPID")
        starve_containerd(node, seconds)
        latencies = node.run("bash", "-c", TIMED_REQUESTS, timeout=seconds + 60)
        restarts = int(node.unit_property("containerd.service", "NRestarts"))
        restarts += node.unit_property("containerd.service", "MainPID") != before
        hangs = len(records(node, rule=RULE, kind="detected"))
        return restarts, hangs, [int(ms) / 1000 for ms in latencies.stdout.split()]


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
    parser.add_argument("--slow-runs", type=int, default=3, help="slow-but-alive runs (%(default)s)")
    parser.add_argument("--slow-seconds", type=int, default=20, help="each slowed for (%(default)s)")
    args = parser.parse_args()
    image = ensure_image()
    load = Path("/proc/loadavg").read_text().split()[0]
    slow_restarts, slow_hangs, slow_latencies = 0, 0, []
    for i in range(args.slow_runs):
        restarts, hangs, latencies = slow_run(image, args.slow_seconds)
        slow_restarts, slow_hangs = slow_restarts + restarts, slow_hangs + hangs
        slow_latencies += latencies
        print(
            f"slow run {i + 1}/{args.slow_runs}: {restarts} restarts, {hangs} hang records", file=sys.stderr
        )
    detections, recoveries, survived = [], [], 0
    for i in range(args.runs):
        detection, recovery, alive = one_run(image)
        detections.append(detection)
        recoveries.append(recovery)
        survived += alive
        print(
            f"run {i + 1}/{args.runs}: detected {detection:.2f} s, serving {recovery:.2f} s", file=sys.stderr
        )
    if args.runs:
        print("\ncontainerd hung (SIGSTOP), a container running (containerd 1.6.20, lab node)")
        print(summary("hang -> detection record", detections, unit="s"))
        print(summary("hang -> containerd serving again", recoveries, unit="s"))
        print(f"{'containers still running after the repair':<44} {survived}/{args.runs}")
    if args.slow_runs:
        runs = f"{args.slow_runs} x {args.slow_seconds} s"
        print(f"\nslow but alive (stand-in: SIGSTOP 350 ms of every 400 ms), {runs}")
        print(summary("ctr version while slowed", slow_latencies))
        print(f"{'restarts of containerd / hang records':<44} {slow_restarts} / {slow_hangs}")
    print(f"host load (1 min) {load} -> {Path('/proc/loadavg').read_text().split()[0]}")
    print(f"\nreproduce: .venv/bin/python bench/hung.py --runs {args.runs} --slow-runs {args.slow_runs}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
