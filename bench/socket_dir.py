"""Benchmark: containerd's socket path turned into a directory, with and without nodemedic.

Each run boots a fresh lab node (real systemd, D-Bus, journald, containerd 1.6.20), SIGHUPs
containerd as the toolkit does, and in systemd's restart window makes a directory at the socket
path as the CRI hostPath mount does. Measured inside the node with its wall clock:
  - fault -> nodemedic's "detected" journald record (the record's own timestamp);
  - fault -> containerd answering `ctr version` on a socket again (polled every 10 ms);
and the same fault with nodemedic absent (systemd's Restart= alone).

    .venv/bin/python bench/socket_dir.py --runs 10 --baseline-runs 2
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

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

from stats import summary

RULE = "socket-path-is-directory"


def one_run(image: Path, with_nodemedic: bool, baseline_wait: float) -> tuple[float | None, float | None]:
    with Node.boot(image=image) as node:
        if with_nodemedic:
            start_nodemedic(node)
        sighup_containerd(node)
        fault, serving = directory_until_serving(node, SOCKET, 30 if with_nodemedic else baseline_wait)
        detection = None
        if with_nodemedic:
            detected = wait_for(lambda: records(node, rule=RULE, kind="detected"), 10, "the detection record")
            detection = realtime(detected[0]) - fault  # type: ignore[index]
        return detection, None if serving is None else serving - fault


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=10, help="runs with nodemedic (default 10)")
    parser.add_argument("--baseline-runs", type=int, default=1, help="runs without nodemedic (default 1)")
    parser.add_argument("--baseline-wait", type=float, default=60.0,
                        help="seconds to wait for containerd without nodemedic (default 60)")  # fmt: skip
    args = parser.parse_args()
    image = ensure_image()
    detections, recoveries = [], []
    for i in range(args.runs):
        detection, recovery = one_run(image, True, args.baseline_wait)
        if detection is None or recovery is None:
            print(f"run {i + 1}: containerd NOT serving within 30 s with nodemedic", file=sys.stderr)
            return 1
        detections.append(detection)
        recoveries.append(recovery)
        ms = (detection * 1000, recovery * 1000)
        print(f"run {i + 1}/{args.runs}: detected {ms[0]:.1f} ms, serving {ms[1]:.0f} ms", file=sys.stderr)
    baseline = [one_run(image, False, args.baseline_wait)[1] for _ in range(args.baseline_runs)]

    print("\nsocket path turned into a directory (containerd 1.6.20, lab node)")
    print(summary("with nodemedic: fault -> detection record", detections))
    print(summary("with nodemedic: fault -> containerd serving", recoveries))
    for i, value in enumerate(baseline, 1):
        outcome = (f"serving after {value:.1f} s" if value is not None
                   else f"NOT serving after {args.baseline_wait:.0f} s (restart loop)")  # fmt: skip
        print(f"{'without nodemedic (systemd Restart= alone), run ' + str(i):<44} {outcome}")
    print(f"\nreproduce: .venv/bin/python bench/socket_dir.py --runs {args.runs} "
          f"--baseline-runs {args.baseline_runs} --baseline-wait {args.baseline_wait:g}")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
