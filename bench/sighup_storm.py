"""Benchmark: the incident's SIGHUP storm replayed against containerd, without and with nodemedic.

Each mode boots a fresh lab node (real systemd, D-Bus, journald, containerd 1.6.20) with real
containers running, then starts two labelled stand-ins (there is no Kubernetes in the lab):
  - the nvidia-container-toolkit pod: per crash, 6 SIGHUPs 5 s apart (its SignalContainerd retries),
    then a fast burst of 680, each to the main PID that systemd names, with the shell's `kill`;
  - the CRI plugin's hostPath mount of the socket path: `mkdir -p` whenever the path is missing.
Inside the node a sampler (every 10 ms) records the socket path's kind and containerd's main PID.

Modes: stock (no nodemedic), observe, coalesce, coalesce+config (one real config.toml change
arrives mid-storm) and throttle ([sighup] mode; the shipped rules stay in enforce). Per mode it
prints containerd restarts (systemd's "Starting containerd.service" entries during the storm; also
the new main PIDs the sampler saw, which can miss one killed at once, and NRestarts, which does not
count a `systemctl restart`), seconds the socket path was missing and containerd had no main process,
directories made at the socket path, containers alive afterwards, SIGHUPs attempted/sent/delivered
(sent: containerd had a main PID; a storm finds it dead most of the time) and nodemedic's records.
Target: coalesce 0 restarts, coalesce+config exactly 1. `--no-hostpath` leaves the hostPath stand-in
out, to tell the damping of the SIGHUPs from the hostPath race around each restart.

    .venv/bin/python bench/sighup_storm.py --crashes 2
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import tomlkit

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lab.faults import (
    SHIPPED_POLICY,
    SOCKET,
    HostpathRacer,
    SighupPattern,
    SocketWatchResult,
    StandinCounts,
    ToolkitStandin,
    containerd_serving,
    hostpath_racer,
    records,
    socket_watch,
    start_nodemedic,
    start_toolkit_standin,
    wait_for,
)
from lab.image import LOGS, ensure_image
from lab.node import Node

MODES = ("stock", "observe", "coalesce", "coalesce+config", "throttle")
CONTAINERS = ("app1", "app2")
CONFIG = "/etc/containerd/config.toml"
# A real change containerd accepts (and a restart is needed to apply).
CONFIG_CHANGE = '\n[debug]\n  level = "debug"\n'
SIGHUP_POLICY = """
[sighup]
mode = "{mode}"
proc = "/host/proc"    # the trace's PIDs are the host's (lab only)

[sighup.storm]
signals = 3
window = "60s"

[sighup.coalesce]
interval = "{interval}"

[sighup.throttle]
burst = 3
refill = 1
per = "60s"
cooldown = "5m"
"""
# The SIGHUP guard's records (NODEMEDIC_RULE=sighup) by outcome; the generic outcomes (started,
# would-do, refused, failed) with their ACTION.
SIGHUP_OUTCOMES = ("sighup", "storm", "storm-ended", "frozen", "thawed")
SIGHUP_ACTIONS = ("sighup-", "freeze-")


@dataclass
class ModeResult:
    mode: str
    watch: SocketWatchResult
    nrestarts: int
    directories: int | None
    """Directories the hostPath stand-in made (None: it did not run)."""
    alive: int
    sighups: tuple[int, int, int]
    frozen_after: int | None
    setup_restarts: int
    outcomes: Counter[str] = field(default_factory=Counter)
    """nodemedic's SIGHUP records by outcome (and action, for would-do, refused, failed)."""
    repairs: Counter[str] = field(default_factory=Counter)
    """The other rules' outcomes (e.g. socket-path-is-directory repaired)."""
    storms: list[str] = field(default_factory=list)


def policy(mode: str, interval: str) -> str:
    """The shipped policy with its [sighup] section (if it has one) replaced by the bench's."""
    sighup_mode = "coalesce" if mode.startswith("coalesce") else mode
    shipped = tomlkit.parse(SHIPPED_POLICY.read_text())
    shipped["sighup"] = tomlkit.parse(SIGHUP_POLICY.format(mode=sighup_mode, interval=interval))["sighup"]
    return tomlkit.dumps(shipped)


def sort_records(entries: list[dict[str, str]]) -> tuple[Counter[str], Counter[str]]:
    """(SIGHUP records by outcome, the other rules' final outcomes by rule)."""
    sighup: Counter[str] = Counter()
    repairs: Counter[str] = Counter()
    for entry in entries:
        outcome, action = entry.get("NODEMEDIC_OUTCOME", ""), entry.get("NODEMEDIC_ACTION", "")
        named = outcome in SIGHUP_OUTCOMES or outcome.startswith(("dropin-", "reload-"))
        rule = entry.get("NODEMEDIC_RULE")
        if rule == "sighup" or (rule is None and (named or action.startswith(SIGHUP_ACTIONS))):
            sighup[outcome if named else f"{outcome} {action}"] += 1
        elif rule is not None and outcome in ("repaired", "not-repaired", "held"):
            repairs[f"{rule} {outcome}"] += 1
    return sighup, repairs


def main_pid(node: Node) -> int:
    return int(node.unit_property("containerd.service", "MainPID") or 0)


def ignores_sighup(node: Node) -> bool:
    """containerd's main process has SIGHUP ignored (SigIgn bit 0): the coalesce drop-in is in."""
    pid = main_pid(node)
    status = node.sh(f"grep SigIgn /proc/{pid}/status", check=False).stdout.split()
    return pid > 0 and len(status) == 2 and int(status[1], 16) & 1 == 1 and containerd_serving(node)


def container_pids(node: Node) -> list[int]:
    """The containers' own processes (ctr task ls's PID column), checked later without containerd."""
    lines = node.run("ctr", "task", "ls").stdout.splitlines()[1:]
    return [int(line.split()[1]) for line in lines if line.split()[0] in CONTAINERS]


def alive(node: Node, pids: list[int]) -> int:
    script = " ".join(f'[ "$(cat /proc/{p}/comm 2>/dev/null)" = sleep ] && echo {p};' for p in pids)
    return len(node.sh(script, check=False).stdout.split())


def frozen(node: Node, standin: ToolkitStandin) -> bool:
    events = f"/sys/fs/cgroup/system.slice/{standin.unit}/cgroup.events"
    return "frozen 1" in node.sh(f"cat {events} 2>/dev/null", check=False).stdout


def set_up_nodemedic(node: Node, mode: str, interval: str) -> int:
    """Start nodemedic; in coalesce wait until containerd runs with SIGHUP ignored. Returns the
    restarts that took (the drop-in's one restart), which are not counted as the storm's."""
    before = main_pid(node)
    start_nodemedic(node, "enforce", policy(mode, interval))
    if mode.startswith("coalesce"):
        try:
            wait_for(lambda: ignores_sighup(node), 60, "containerd to run with SIGHUP ignored", 0.5)
        except TimeoutError as err:
            print(f"  {mode}: {err}", file=sys.stderr)
    return int(main_pid(node) != before)


def drive_storm(
    node: Node, args: argparse.Namespace, pattern: SighupPattern, mode: str
) -> tuple[StandinCounts, int | None]:
    """Run the stand-in to its end (or until it has been frozen for --frozen-hold seconds); with
    coalesce+config, change config.toml halfway through the crash cycles. Returns what the
    stand-in did, and the SIGHUPs it had attempted when it was found frozen (None if never)."""
    standin = start_toolkit_standin(node, pattern)
    start = time.monotonic()
    deadline = start + pattern.crash_seconds + 0.1 * pattern.bursts * pattern.burst + 120
    changed = mode != "coalesce+config"
    frozen_at: tuple[float, int] | None = None
    while standin.running() and time.monotonic() < deadline:
        if not changed and time.monotonic() - start >= pattern.crash_seconds / 2:
            node.sh(f"printf '%s' '{CONFIG_CHANGE}' >> {CONFIG}")
            print(f"  {mode}: config.toml changed at {time.monotonic() - start:.0f} s", file=sys.stderr)
            changed = True
        if frozen_at is None and frozen(node, standin):
            frozen_at = (time.monotonic(), standin.counts().attempts)
            print(f"  {mode}: stand-in frozen after {frozen_at[1]} attempts", file=sys.stderr)
        if frozen_at and time.monotonic() - frozen_at[0] > args.frozen_hold:
            break
        time.sleep(0.5)
    if standin.running():
        standin.stop()
    return standin.counts(), frozen_at[1] if frozen_at else None


def settle(node: Node, mode: str, interval: float) -> None:
    """Let the last restart (RestartSec=5) or the coalesced reload happen before measuring."""
    if mode == "coalesce+config":
        ends = ("reload-applied", "reload-refused", "failed restart-unit")
        try:
            wait_for(lambda: any(k in ends for k in sort_records(records(node))[0]), interval + 30,
                     "the config change to be applied or refused", 1)  # fmt: skip
        except TimeoutError as err:
            print(f"  {mode}: {err}", file=sys.stderr)
    time.sleep(2)
    try:
        wait_for(lambda: containerd_serving(node), 15, "containerd serving again", 0.5)
    except TimeoutError:
        print(f"  {mode}: containerd NOT serving 15 s after the storm", file=sys.stderr)


def save_journal(node: Node, mode: str) -> Path:
    path = LOGS / f"bench-sighup-{mode}.journal"
    text = node.run("journalctl", "--no-pager", "-o", "short-precise", "-u", "nodemedic.service",
                    "-u", "containerd.service", "-u", "toolkit-standin.service",
                    "-u", "hostpath-racer.service", check=False).stdout  # fmt: skip
    path.write_text(text)
    return path


def unbreak(node: Node, racer: HostpathRacer | None) -> None:
    """Without nodemedic a directory at the socket path stays: remove it so teardown is quick."""
    if racer is not None:
        racer.stop()
    node.sh(f"if [ -d {SOCKET} ]; then systemctl stop containerd; rmdir {SOCKET}; "
            "systemctl start containerd; fi", check=False, timeout=60)  # fmt: skip


def one_mode(image: Path, mode: str, args: argparse.Namespace, pattern: SighupPattern) -> ModeResult:
    interval = float(args.coalesce_interval.rstrip("s"))
    with Node.boot(image=image, containers=True, tracefs=True, host_proc=True) as node:
        for name in CONTAINERS:
            node.run("ctr", "run", "-d", "--cpu-shares", "0", "--rootfs", "/opt/bbroot", name,
                     "/bin/sleep", "3600")  # fmt: skip
        wait_for(lambda: len(container_pids(node)) == len(CONTAINERS), 15, "the containers to run")
        pids = container_pids(node)
        setup = 0 if mode == "stock" else set_up_nodemedic(node, mode, args.coalesce_interval)
        nrestarts = int(node.unit_property("containerd.service", "NRestarts"))
        watch = socket_watch(node)
        racer = (hostpath_racer(node, interval=args.racer_interval, limit=args.racer_limit or None)
                 if args.hostpath else None)  # fmt: skip
        counts, frozen_after = drive_storm(node, args, pattern, mode)
        settle(node, mode, interval)
        directories = len(racer.directories_made()) if racer else 0
        if racer:
            racer.stop()
        result = watch.result()
        outcomes, repairs = sort_records(records(node))
        storms = [r.get("MESSAGE", "") for r in records(node)
                  if r.get("NODEMEDIC_OUTCOME") in ("storm", "storm-ended")]  # fmt: skip
        journal = save_journal(node, mode)
        print(f"  {mode}: journal saved to {journal}", file=sys.stderr)
        done = ModeResult(
            mode=mode,
            watch=result,
            nrestarts=int(node.unit_property("containerd.service", "NRestarts")) - nrestarts,
            directories=directories if racer else None,
            alive=alive(node, pids),
            sighups=(counts.attempts, counts.sent, counts.delivered),
            frozen_after=frozen_after,
            setup_restarts=setup,
            outcomes=outcomes,
            repairs=repairs,
            storms=storms,
        )
        unbreak(node, racer)
        return done


HEADER = ("mode", "restarts", "new PIDs", "NRestarts", "sock missing s", "cd down s", "sock→dir", "alive",
          "SIGHUPs att/sent/deliv", "storm recs", "other records")  # fmt: skip


def row(r: ModeResult) -> tuple[str, ...]:
    others = ", ".join(f"{k} {v}" for k, v in sorted(r.outcomes.items()) if k != "storm")
    became_dir = f"yes ({r.directories})" if r.directories or r.watch.directory_sightings else "no"
    if r.directories is None:
        became_dir = "no racer"
    w = r.watch
    return (r.mode, str(w.starts), str(w.new_pids), str(r.nrestarts), f"{w.missing_seconds:.2f}",
            f"{w.down_seconds:.1f}", became_dir, f"{r.alive}/{len(CONTAINERS)}",
            "/".join(map(str, r.sighups)), str(r.outcomes.get("storm", 0)), others or "-")  # fmt: skip


def table(results: list[ModeResult]) -> str:
    rows = [HEADER, *(row(r) for r in results)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(HEADER))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |" for r in rows]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def verdicts(results: list[ModeResult]) -> list[str]:
    by_mode = {r.mode: r for r in results}
    lines = []
    for mode, want in (("coalesce", 0), ("coalesce+config", 1)):
        if mode in by_mode:
            got = by_mode[mode].watch.starts
            lines.append(f"target {mode}: {want} restart(s) during the storm: got {got} "
                         f"({'met' if got == want else 'NOT met'})")  # fmt: skip
    for r in results:
        storms = r.outcomes.get("storm", 0)
        if r.mode != "stock":
            lines.append(f"{r.mode}: {storms} storm record(s) for {r.sighups[0]} SIGHUPs attempted")
            lines += [f"{r.mode}:   {message}" for message in r.storms]
        if r.setup_restarts:
            lines.append(f"{r.mode}: {r.setup_restarts} restart before the storm to apply the drop-in "
                         "(not counted above)")  # fmt: skip
        if r.repairs:
            repairs = ", ".join(f"{k} {v}" for k, v in sorted(r.repairs.items()))
            lines.append(f"{r.mode}: other rules: {repairs}")
        if r.frozen_after is not None:
            lines.append(f"{r.mode}: the toolkit stand-in was frozen after {r.frozen_after} attempts")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--crashes", type=int, default=2, help="toolkit crash cycles (default 2)")
    parser.add_argument("--signals", type=int, default=6, help="SIGHUPs per crash (default 6)")
    parser.add_argument("--every", type=float, default=5.0, help="seconds between them (default 5)")
    parser.add_argument("--pause", type=float, default=5.0, help="seconds between crashes (default 5)")
    parser.add_argument("--burst", type=int, default=680, help="SIGHUPs in the fast burst (default 680)")
    parser.add_argument("--modes", default=",".join(MODES),
                        help=f"comma-separated, from {', '.join(MODES)} (default all)")  # fmt: skip
    parser.add_argument("--coalesce-interval", default="30s",
                        help='[sighup.coalesce] interval, in seconds: "30s" (default)')  # fmt: skip
    parser.add_argument("--racer-interval", type=float, default=0.01,
                        help="seconds between the hostPath stand-in's checks (default 0.01)")  # fmt: skip
    parser.add_argument("--racer-limit", type=int, default=1,
                        help="most directories the hostPath stand-in makes, 0: any (default 1)")  # fmt: skip
    parser.add_argument("--hostpath", action=argparse.BooleanOptionalAction, default=True,
                        help="run the hostPath stand-in (default: yes)")  # fmt: skip
    parser.add_argument("--frozen-hold", type=float, default=10.0,
                        help="throttle: seconds to go on once the stand-in froze (default 10)")  # fmt: skip
    args = parser.parse_args()
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = sorted(set(modes) - set(MODES))
    if unknown:
        parser.error(f"unknown mode(s): {', '.join(unknown)}")
    pattern = SighupPattern(crashes=args.crashes, signals=args.signals, every=args.every,
                            pause=args.pause, bursts=1 if args.burst else 0, burst=args.burst)  # fmt: skip
    image = ensure_image()
    results = []
    for mode in modes:
        begun = time.monotonic()
        print(f"mode {mode}: {pattern.total} SIGHUPs in {pattern.crashes} crash cycles and a burst",
              file=sys.stderr)  # fmt: skip
        results.append(one_mode(image, mode, args, pattern))
        print(f"mode {mode}: done in {time.monotonic() - begun:.0f} s: {row(results[-1])}", file=sys.stderr)

    print(f"\nSIGHUP storm replay (containerd 1.6.20, lab node, {len(CONTAINERS)} containers running): "
          f"{args.crashes} crash cycles of {args.signals} SIGHUPs {args.every:g} s apart, "
          f"then a burst of {args.burst}")  # fmt: skip
    print(table(results))
    for line in verdicts(results):
        print(line)
    print(f"\nreproduce: .venv/bin/python bench/sighup_storm.py --crashes {args.crashes} "
          f"--signals {args.signals} --every {args.every:g} --pause {args.pause:g} --burst {args.burst} "
          f"--modes {','.join(modes)} --coalesce-interval {args.coalesce_interval} "
          f"{'' if args.hostpath else '--no-hostpath '}"
          f"--racer-interval {args.racer_interval:g} --racer-limit {args.racer_limit} "
          f"--frozen-hold {args.frozen_hold:g}")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
