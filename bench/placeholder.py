"""Benchmark: [placeholder] off and on, in one run (issue 18, part 2).

Each case boots a fresh lab node (real systemd, D-Bus, journald, containerd 1.6.20) with nodemedic
running the shipped policy, `[placeholder] mode` "off" (the path left missing) or "enforce":
  - cri:      the real mechanism (lab/cri.py): containerd runs, its socket file is unlinked under
              a live CRI connection and a hostPath pod of the path is created over it; the CRI
              plugin's WithMounts MkdirAll makes the directory if the path is missing;
  - stand-in: the hostPath stand-in without a limit (mkdir -p whenever it finds the path missing,
              every 10 ms), and containerd's main process TERMed (a clean exit: containerd unlinks
              its socket; systemd restarts it after RestartSec=5s);
  - start:    containerd started (`systemctl start`) with nothing at its socket paths, or with a
              placeholder at both; its start time as systemd measures it (ExecMainStart ->
              ActiveEnter: containerd says READY after binding both sockets).
For cri and stand-in: directories made at the socket path (inotify inside the node; the stand-in
counts its own) and seconds without a working containerd (`ctr version` polled inside the node
every ~30 ms, from the fault until it answers again).

    .venv/bin/python bench/placeholder.py --runs 3 --starts 10
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lab.cri import CriError, prepare_cri
from lab.faults import (
    SOCKET,
    TTRPC,
    _start_directory_watch,
    containerd_serving,
    cri_socket_dir,
    hostpath_racer,
    placeholder_policy,
    records,
    start_nodemedic,
    wait_for,
)
from lab.image import ensure_image
from lab.node import Node

from stats import summary

MODES = ("off", "enforce")
_SERVING_WATCH = r"""
# Lab measurement: `ctr version` polled; prints "TIME 0|1" at each change, exits once containerd
# answered again after failing (or at the deadline).
import subprocess, sys, time
end, last, failed = time.time() + float(sys.argv[1]), None, False
print("ready", flush=True)
while time.time() < end:
    ok = subprocess.run(["ctr", "--timeout", "1s", "version"], capture_output=True).returncode == 0
    if ok != last:
        print(f"{time.time():.6f} {int(ok)}", flush=True)
        last = ok
    failed = failed or not ok
    if failed and ok:
        break
    time.sleep(0.01)
"""


class ServingWatch:
    """The poller above, inside the node; ``outage`` once it ended: first failure -> answering."""

    def __init__(self, node: Node, timeout: float) -> None:
        cmd = ["nsenter", "-t", str(node.leader), "-a", "--", "/usr/bin/python3", "-c", _SERVING_WATCH,
               f"{timeout:g}"]  # fmt: skip
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, start_new_session=True)
        if self.proc.stdout is None or self.proc.stdout.readline().strip() != "ready":
            raise RuntimeError("the serving watch did not start")
        self.timeout = timeout

    def outage(self) -> float | None:
        out, _ = self.proc.communicate(timeout=self.timeout + 30)
        changes = [(float(t), s == "1") for t, s in (line.split() for line in out.splitlines())]
        down = next((t for t, ok in changes if not ok), None)
        up = next((t for t, ok in changes if ok and down is not None and t > down), None)
        return None if down is None or up is None else up - down


def cri_case(image: Path, mode: str) -> tuple[int, float | None]:
    with Node.boot(image=image, containers=True) as node:
        start_nodemedic(node, policy=placeholder_policy(mode))
        prepare_cri(node)
        watch = ServingWatch(node, 60)
        made = _start_directory_watch(node, SOCKET, 8)  # our own count, whatever the pod does
        try:
            cri_socket_dir(node, SOCKET, timeout=5)
        except TimeoutError:
            pass  # no directory: what the placeholder is for
        except CriError as exc:  # e.g. containerd restarted (containerd-hung) under the pod's calls
            print(f"cri, placeholder {mode}: the pod's CRI calls failed: {exc}", file=sys.stderr)
        said = made.communicate(timeout=30)[0].split()
        return (0 if not said or said[-1] == "never" else 1), watch.outage()


def standin_case(image: Path, mode: str, window: float) -> tuple[int, float | None]:
    with Node.boot(image=image) as node:
        start_nodemedic(node, policy=placeholder_policy(mode))
        racer = hostpath_racer(node, SOCKET)  # no limit
        watch = ServingWatch(node, window)
        node.sh("kill -TERM $(systemctl show -p MainPID --value containerd.service)")
        outage = watch.outage()
        dirs = len(racer.directories_made())
        racer.stop()
        return dirs, outage


def start_case(image: Path, starts: int) -> dict[str, list[float]]:
    """containerd's start time, nothing vs a placeholder at both paths, alternated on one node."""
    times: dict[str, list[float]] = {"nothing": [], "placeholder": []}
    both = f"test -S {SOCKET} && test -S {TTRPC}"
    with Node.boot(image=image) as node:
        start_nodemedic(node, policy=placeholder_policy("enforce"))
        for i in range(2 * starts):
            kind = "placeholder" if i % 2 else "nothing"
            if kind == "nothing":
                node.run("systemctl", "stop", "nodemedic.service")  # nothing may come at the paths
            node.run("systemctl", "stop", "containerd.service")  # unlinks containerd.sock
            node.run("rm", "-f", TTRPC)  # stale after the stop: a placeholder comes, or nothing
            if kind == "placeholder":
                wait_for(lambda: node.sh(both, check=False).returncode == 0, 10, "placeholders at both paths")
            else:
                node.run("rm", "-f", SOCKET)
            node.run("systemctl", "reset-failed", "containerd.service")  # StartLimitBurst: 5 per 10 s
            node.run("systemctl", "start", "containerd.service")  # Type=notify: returns at READY
            wait_for(lambda: containerd_serving(node), 15, "containerd serving")
            began = int(node.unit_property("containerd.service", "ExecMainStartTimestampMonotonic"))
            active = int(node.unit_property("containerd.service", "ActiveEnterTimestampMonotonic"))
            times[kind].append((active - began) / 1e6)
            if kind == "nothing":
                node.run("systemctl", "start", "nodemedic.service", timeout=60)
        placed = len(records(node, action="placeholder-socket", outcome="done"))
        replaced = len(records(node, action="placeholder-socket", outcome="replaced"))
        print(f"start case: {placed} placeholders made, {replaced} replaced by containerd", file=sys.stderr)
    return times


def seconds(value: float | None) -> str:
    return "never (within the window)" if value is None else f"{value:6.2f} s"


Result = tuple[str, str, int, float | None]  # case, mode, directories made, seconds without containerd


def fault_cases(image: Path, runs: int, window: float) -> list[Result]:
    cases = {"cri": lambda m: cri_case(image, m), "stand-in": lambda m: standin_case(image, m, window)}
    results = []
    for name, case in cases.items():
        for mode in MODES:
            for run in range(runs):
                dirs, outage = case(mode)
                print(f"{name:<9} placeholder {mode:<8} run {run + 1}: directories {dirs}, "
                      f"without containerd {seconds(outage)}", file=sys.stderr)  # fmt: skip
                results.append((name, mode, dirs, outage))
    return results


def report(results: list[Result]) -> None:
    for name in ("cri", "stand-in"):
        for mode in MODES:
            mine = [(d, o) for n, m, d, o in results if n == name and m == mode]
            outages = [o for _, o in mine if o is not None]
            never = len(mine) - len(outages)
            spread = (
                f"median {statistics.median(outages):6.2f} s, max {max(outages):6.2f} s" if outages else "-"
            )
            tail = f"; {never} run(s) not serving again within the window" if never else ""
            print(f"{name:<9} placeholder {mode:<8} directories made {sum(d for d, _ in mine)} in "
                  f"{len(mine)} runs; without a working containerd: {spread}{tail}")  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=3, help="runs of each fault case and mode (default 3)")
    parser.add_argument("--starts", type=int, default=10, help="containerd starts of each kind (default 10)")
    parser.add_argument("--window", type=float, default=30.0, help="seconds the stand-in case is watched")
    args = parser.parse_args()
    image = ensure_image()
    load_before = Path("/proc/loadavg").read_text().split()[:3]
    began = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    results = fault_cases(image, args.runs, args.window)
    starts = start_case(image, args.starts)
    load_after = Path("/proc/loadavg").read_text().split()[:3]

    print(f"\n[placeholder] off vs enforce (containerd 1.6.20, lab node), {began}")
    print(f"load (1/5/15 min) before {' '.join(load_before)}, after {' '.join(load_after)}")
    report(results)
    print(summary("containerd start, nothing at its paths", starts["nothing"]))
    print(summary("containerd start, placeholders at both paths", starts["placeholder"]))
    print(f"\nreproduce: .venv/bin/python bench/placeholder.py --runs {args.runs} --starts {args.starts} "
          f"--window {args.window:g}")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
