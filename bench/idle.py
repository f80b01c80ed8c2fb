"""Benchmark: what nodemedic costs a node at rest, side by side with monit.

One lab node, nodemedic started with the shipped policy (probe every 250 ms; the D-Bus policy the
packages install, so its API is served as on an installed node) and Debian's monit
started in the same node with a config that checks containerd's socket every 5 s (`if failed
unixsocket`: a connect, no request). After a settle time both processes are sampled from the
node's own /proc for ``--seconds``:

- CPU: utime+stime (and the children's, cutime+cstime) from /proc/PID/stat, per wall second, as %
  of one core;
- memory: VmRSS from /proc/PID/status and Pss from /proc/PID/smaps_rollup, at the end;
- wake-ups a second: voluntary+nonvoluntary context switches summed over every thread in
  /proc/PID/task/* (the voluntary ones, the process blocking to wait, also on their own: the
  nonvoluntary ones are preemptions, which grow with the host's load).

    .venv/bin/python bench/idle.py --seconds 60
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lab.faults import REPO, start_nodemedic, wait_for
from lab.image import ensure_image
from lab.node import Node

API_POLICY = "/usr/share/dbus-1/system.d/io.nodemedic1.conf"
MONITRC = """set daemon 5
set log syslog
check process containerd matching "^/usr/bin/containerd"
  if failed unixsocket /run/containerd/containerd.sock then alert
"""
# One line per sample: utime stime cutime cstime (clock ticks), voluntary and nonvoluntary ctxt
# switches summed over the threads, then VmRSS and Pss (kB) and the number of threads.
SAMPLE = r"""p=$1
set -- $(cut -d')' -f2 /proc/$p/stat)
cpu="${12} ${13} ${14} ${15}"
cs=$(cat /proc/$p/task/*/status |
    awk '/^voluntary_ctxt/ {v += $2} /nonvoluntary_ctxt/ {n += $2} END {print v, n}')
rss=$(awk '/^VmRSS/ {print $2}' /proc/$p/status)
pss=$(awk '/^Pss:/ {print $2}' /proc/$p/smaps_rollup)
threads=$(ls /proc/$p/task | wc -l)
echo "$cpu $cs $rss $pss $threads"
"""


@dataclass(frozen=True)
class Sample:
    at: float
    ticks: int
    child_ticks: int
    voluntary: int
    preempted: int
    rss_kb: int
    pss_kb: int
    threads: int


@dataclass(frozen=True)
class Cost:
    cpu_percent: float
    child_percent: float
    wakeups: float
    voluntary: float
    rss_mb: float
    pss_mb: float
    threads: int


def sample(node: Node, pid: int) -> Sample:
    fields = [int(v) for v in node.sh(SAMPLE.replace("$1", str(pid))).stdout.split()]
    return Sample(time.monotonic(), fields[0] + fields[1], fields[2] + fields[3], *fields[4:])


def cost(first: Sample, last: Sample) -> Cost:
    wall = last.at - first.at
    tick = os.sysconf("SC_CLK_TCK")
    return Cost(
        cpu_percent=100.0 * (last.ticks - first.ticks) / tick / wall,
        child_percent=100.0 * (last.child_ticks - first.child_ticks) / tick / wall,
        wakeups=(last.voluntary + last.preempted - first.voluntary - first.preempted) / wall,
        voluntary=(last.voluntary - first.voluntary) / wall,
        rss_mb=last.rss_kb / 1024,
        pss_mb=last.pss_kb / 1024,
        threads=last.threads,
    )


def start_monit(node: Node) -> int:
    node.write_file("/etc/monit/bench-monitrc", MONITRC, mode=0o600)
    node.run("systemd-run", "--unit=bench-monit", "/usr/bin/monit", "-I", "-c", "/etc/monit/bench-monitrc")
    return int(wait_for(lambda: int(node.unit_property("bench-monit.service", "MainPID")), 10, "monit"))  # type: ignore[call-overload]


def install_api_policy(node: Node) -> None:
    """The D-Bus policy the packages install: without it a plain lab node's nodemedic retries
    owning io.nodemedic1 every few seconds, which no installed node does."""
    node.write_file(API_POLICY, (REPO / "packaging" / "dbus" / "io.nodemedic1.conf").read_text())
    node.run("systemctl", "reload", "dbus.service")


def measure(seconds: float, settle: float) -> tuple[Cost, Cost, str]:
    with Node.boot(image=ensure_image()) as node:
        install_api_policy(node)
        start_nodemedic(node)
        nodemedic = int(node.unit_property("nodemedic.service", "MainPID"))
        monit = start_monit(node)
        time.sleep(settle)
        firsts = sample(node, nodemedic), sample(node, monit)
        load = Path("/proc/loadavg").read_text().split()[0]
        time.sleep(seconds)
        lasts = sample(node, nodemedic), sample(node, monit)
        load += " -> " + Path("/proc/loadavg").read_text().split()[0]
        return cost(firsts[0], lasts[0]), cost(firsts[1], lasts[1]), load


def row(name: str, c: Cost) -> str:
    return (f"{name:<10} cpu {c.cpu_percent:6.3f} % of a core (children {c.child_percent:.3f} %)   "
            f"wake-ups {c.wakeups:5.1f}/s (voluntary {c.voluntary:4.1f})   VmRSS {c.rss_mb:5.1f} MB   "
            f"Pss {c.pss_mb:5.1f} MB   threads {c.threads}")  # fmt: skip


def ratio(a: float, b: float) -> str:
    return f"{a / b:.1f}x" if b else "n/a (monit: 0)"


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=60.0, help="sampling window (%(default)s)")
    parser.add_argument("--settle", type=float, default=10.0, help="wait after start (%(default)s)")
    args = parser.parse_args()
    ours, monit, load = measure(args.seconds, args.settle)
    print(f"\nidle, {args.seconds:g} s after {args.settle:g} s settling (lab node, shipped policy)")
    print(row("nodemedic", ours))
    print(row("monit", monit))
    print(f"nodemedic / monit: cpu {ratio(ours.cpu_percent, monit.cpu_percent)}   "
          f"wake-ups {ratio(ours.wakeups, monit.wakeups)}   VmRSS {ratio(ours.rss_mb, monit.rss_mb)}   "
          f"Pss {ratio(ours.pss_mb, monit.pss_mb)}")  # fmt: skip
    print("targets (issue 14): cpu <= 0.3 %, VmRSS <= 40 MB, wake-ups <= 10/s")
    print(f"host load (1 min) {load}")
    print(f"\nreproduce: .venv/bin/python bench/idle.py --seconds {args.seconds:g}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
