"""Benchmark: config.toml turned broken while containerd is down (CASE C while it waits to restart).

Each run boots a fresh lab node (real systemd, D-Bus, journald, containerd 1.6.20), starts nodemedic
with the shipped policy (the last-known-good copy taken after 1 s instead of 1 min), SIGHUPs
containerd as the toolkit does and, once systemd has scheduled its automatic restart (RestartSec=5s,
SubState auto-restart), writes a half-written runtime block over config.toml (the nvidia runtime's
table and an options line cut off mid-value, as the toolkit's first step leaves it). Measured
inside the node with its wall clock: fault (the write) -> containerd answering `ctr version` again
(polled every 10 ms), and which rule repaired it, how many restores were made and whether containerd
met the broken file (its "failed to load TOML" line).

    .venv/bin/python bench/config_down.py --runs 10
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lab.faults import SHIPPED_POLICY, records, sighup_containerd, start_nodemedic, wait_for
from lab.image import ensure_image
from lab.node import Node

from stats import summary

CONFIG = "/etc/containerd/config.toml"
# printf's format: \\n is a newline in the file. It ends inside a string: containerd refuses it.
BROKEN = (
    'version = 2\\n[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.nvidia]\\n'
    '  runtime_type = "io.containerd.runc.v2"\\n'
    '  [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.nvidia.options]\\n'
    '    BinaryName = "/usr/bin/nvidia-contai'
)
BREAK_AND_WAIT = (
    f"t0=$(date +%s.%N); printf '{BROKEN}' > {CONFIG}; "
    "until ctr --timeout 1s --connect-timeout 1s version >/dev/null 2>&1; do sleep 0.01; done; "
    'echo "$t0 $(date +%s.%N)"'
)


def one_run(image: Path) -> tuple[float, str, int, bool]:
    """Fault -> serving (s), the rule that repaired, the restores made, whether containerd met the file."""
    with Node.boot(image=image) as node:
        start_nodemedic(node, policy=SHIPPED_POLICY.read_text().replace('settle = "1m"', 'settle = "1s"'))
        wait_for(lambda: records(node, outcome="config-kept"), 15, "a last-known-good copy")
        sighup_containerd(node)
        fault, serving = (float(t) for t in node.sh(BREAK_AND_WAIT, timeout=60).stdout.split())
        repaired = wait_for(lambda: records(node, outcome="repaired"), 10, "the repaired record")
        restores = records(node, action="restore-config", outcome="done")
        met = node.run("journalctl", "-u", "containerd", "-q", "--grep", "failed to load TOML", check=False)
        rule = repaired[0]["NODEMEDIC_RULE"]  # type: ignore[index]
        return serving - fault, rule, len(restores), met.returncode == 0


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=10)
    args = parser.parse_args()
    image = ensure_image()
    recoveries, rules, restores, met = [], set(), 0, 0
    for i in range(args.runs):
        recovery, rule, restored, refused = one_run(image)
        recoveries.append(recovery)
        rules.add(rule)
        restores += restored
        met += refused
        print(f"run {i + 1}/{args.runs}: serving {recovery * 1000:.0f} ms ({rule})", file=sys.stderr)
    print("\nconfig.toml broken while containerd waits for its automatic restart")
    print("(containerd 1.6.20, lab node, a last-known-good copy taken)")
    print(summary("fault -> containerd serving", recoveries))
    print(f"{'repaired by':<44} {', '.join(sorted(rules))}")
    print(f"{'restores of config.toml':<44} {restores} in {args.runs} runs")
    print(f"{'runs where containerd met the broken file':<44} {met}/{args.runs}")
    print(f"\nreproduce: .venv/bin/python bench/config_down.py --runs {args.runs}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
