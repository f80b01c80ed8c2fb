"""Benchmark: containerd's socket path turned into a directory, with and without nodemedic.

Each run boots a fresh lab node (real systemd, D-Bus, journald, containerd 1.6.20) and makes a
directory at the socket path by one of two mechanisms (--mechanism):
  - standin (default): SIGHUP containerd as the toolkit does, and in systemd's restart window
    `mkdir -p` the socket path, standing in for the CRI plugin's hostPath mount;
  - cri: the real thing (lab.faults.cri_hostpath_fault): containerd running, its socket file
    unlinked under an open CRI connection, and containerd's own CRI plugin makes the directory
    for a hostPath pod of the socket path (CreateContainer's WithMounts MkdirAll). containerd
    stays active with no socket: new clients get "connection refused" (the incident's pod log);
  - cri-stop: the real thing without any unlink (lab.faults.cri_stop_race): containerd stopped
    cleanly (SIGTERM) while such a CreateContainer is in flight, tried until the CRI plugin makes
    the directory (a few % of tries); containerd is left down on it.
Measured inside the node with its wall clock, from the directory's appearance (standin: just
before the mkdir; cri: inotify):
  - fault -> nodemedic's "detected" journald record (the record's own timestamp);
  - fault -> containerd answering `ctr version` on a socket again (polled every 10 ms);
and the same fault with nodemedic absent (systemd's Restart= alone).

    .venv/bin/python bench/socket_dir.py --runs 10 --baseline-runs 2
    .venv/bin/python bench/socket_dir.py --mechanism cri --runs 10 --baseline-runs 1
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lab.cri import prepare_cri
from lab.faults import (
    SOCKET,
    cri_hostpath_fault,
    cri_socket_dir,
    directory_until_serving,
    realtime,
    records,
    serving_again,
    sighup_containerd,
    start_nodemedic,
    wait_for,
)
from lab.image import ensure_image
from lab.node import Node

from stats import summary

RULE = "socket-path-is-directory"


def standin_fault(node: Node, timeout: float) -> tuple[float, float | None]:
    sighup_containerd(node)
    return directory_until_serving(node, SOCKET, timeout)


def cri_fault(node: Node, timeout: float) -> tuple[float, float | None]:
    fault = cri_hostpath_fault(node)
    if fault.directory_at is None:
        raise RuntimeError(f"the CRI plugin made no directory at {SOCKET}: {fault.error}")
    return fault.directory_at, serving_again(node, timeout)


def cri_stop_fault(node: Node, timeout: float) -> tuple[float, float | None]:
    return cri_socket_dir(node, via="stop"), serving_again(node, timeout)


MECHANISMS = {"standin": standin_fault, "cri": cri_fault, "cri-stop": cri_stop_fault}
STUCK = {"standin": "restart loop", "cri": "containerd active, its socket a directory: clients refused",
         "cri-stop": "restart loop"}  # fmt: skip


def one_run(
    image: Path, mechanism: str, with_nodemedic: bool, baseline_wait: float
) -> tuple[float | None, float | None]:
    with Node.boot(image=image, containers=mechanism.startswith("cri")) as node:
        if mechanism.startswith("cri"):
            prepare_cri(node)  # before nodemedic: it restarts containerd once for the lab's settings
        if with_nodemedic:
            start_nodemedic(node)
        fault, serving = MECHANISMS[mechanism](node, 30 if with_nodemedic else baseline_wait)
        detection = None
        if with_nodemedic:
            detected = wait_for(lambda: records(node, rule=RULE, kind="detected"), 10, "the detection record")
            detection = realtime(detected[0]) - fault  # type: ignore[index]
        return detection, None if serving is None else serving - fault


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--mechanism", choices=sorted(MECHANISMS), default="standin",
                        help="what makes the directory: the stand-in mkdir after a SIGHUP, or the real "
                        "CRI plugin after an unlink (cri) or in a clean stop (cri-stop); "
                        "default standin")  # fmt: skip
    parser.add_argument("--runs", type=int, default=10, help="runs with nodemedic (default 10)")
    parser.add_argument("--baseline-runs", type=int, default=1, help="runs without nodemedic (default 1)")
    parser.add_argument("--baseline-wait", type=float, default=60.0,
                        help="seconds to wait for containerd without nodemedic (default 60)")  # fmt: skip
    args = parser.parse_args()
    image = ensure_image()
    detections, recoveries = [], []
    for i in range(args.runs):
        detection, recovery = one_run(image, args.mechanism, True, args.baseline_wait)
        if detection is None or recovery is None:
            print(f"run {i + 1}: containerd NOT serving within 30 s with nodemedic", file=sys.stderr)
            return 1
        detections.append(detection)
        recoveries.append(recovery)
        ms = (detection * 1000, recovery * 1000)
        print(f"run {i + 1}/{args.runs}: detected {ms[0]:.1f} ms, serving {ms[1]:.0f} ms", file=sys.stderr)
    baseline = [one_run(image, args.mechanism, False, args.baseline_wait)[1]
                for _ in range(args.baseline_runs)]  # fmt: skip

    print(f"\nsocket path turned into a directory by the {args.mechanism} (containerd 1.6.20, lab node)")
    print(summary("with nodemedic: fault -> detection record", detections))
    print(summary("with nodemedic: fault -> containerd serving", recoveries))
    for i, value in enumerate(baseline, 1):
        stuck = STUCK[args.mechanism]
        outcome = (f"serving after {value:.1f} s" if value is not None
                   else f"NOT serving after {args.baseline_wait:.0f} s ({stuck})")  # fmt: skip
        print(f"{'without nodemedic (systemd Restart= alone), run ' + str(i):<44} {outcome}")
    print(f"\nreproduce: .venv/bin/python bench/socket_dir.py --mechanism {args.mechanism} "
          f"--runs {args.runs} --baseline-runs {args.baseline_runs} "
          f"--baseline-wait {args.baseline_wait:g}")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
