"""Benchmark: a journal flood from containerd's unit, with nodemedic running (shipped policy).

A fresh lab node; journald's rate limit lifted (``RateLimitBurst=0`` in a journald.conf drop-in,
as busy nodes set it; journald restarted); nodemedic started with the shipped policy plus one
report-only rule whose journal trigger matches a marker line (and its metrics file written every
second, for its journal lag). Then, for each rate, a generator writes that many lines a second,
for ``--seconds``, that match no rule, and a numbered marker line every ``--marker-every`` seconds.

How the lines become containerd's: journald takes ``_SYSTEMD_UNIT`` from the sender's cgroup, not
from anything the sender says. The generator is started as a transient service (``systemd-run``;
a ``--scope`` would name the scope), moves itself into containerd's cgroup
(``/sys/fs/cgroup/system.slice/containerd.service/cgroup.procs``), then connects to journald's
stdout stream socket (``/run/systemd/journal/stdout``, the one a unit's stdout is), identifier
``containerd``, and writes its lines there: ``_SYSTEMD_UNIT=containerd.service``,
``_TRANSPORT=stdout``, as containerd's own lines.

Measured inside the node: nodemedic's CPU (utime + stime from /proc/PID/stat, per wall second of
the flood), its RSS every 0.25 s (max, end), its journal lag (``nodemedic_journal_lag_seconds``:
how long the last entry read had waited in the journal, at each read), the entries journald
stored (its own count: the lines that really arrived), and each marker's detection latency: from
the generator's write (and from the marker's journal timestamp) to nodemedic's detection record.

    .venv/bin/python bench/journal_flood.py --rates 5000 20000 --seconds 25
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lab.faults import SHIPPED_POLICY, realtime, records, start_nodemedic, wait_for
from lab.image import ensure_image
from lab.node import Node

RULE = "bench-marker"
MARKER_RULE = f'''
[[rule]]
name = "{RULE}"
description = "bench: a marker line in a journal flood (report only)"

[[rule.trigger]]
source = "journal"
unit = "containerd.service"
pattern = '^nodemedic-bench: marker [0-9]{{1,10}}$'
'''
JOURNALD_DROPIN = "/etc/systemd/journald.conf.d/bench-flood.conf"
JOURNALD_CONF = "[Journal]\nRateLimitBurst=0\nSystemMaxUse=512M\nRuntimeMaxUse=512M\n"
GENERATOR = "/root/flood.py"
SAMPLER = "/root/sample.py"
METRICS_FILE = "/var/lib/prometheus/node-exporter/nodemedic.prom"

# In containerd's cgroup, on journald's stdout stream: paced in 10 ms ticks; a marker line every
# EVERY seconds (the first at EVERY/2), each numbered, its time of writing kept.
GENERATOR_SCRIPT = r"""
import json, os, socket, sys, time
rate, seconds, every = int(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3])
prefix, out = sys.argv[4], sys.argv[5]
with open("/sys/fs/cgroup/system.slice/containerd.service/cgroup.procs", "w") as f:
    f.write(str(os.getpid()))
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.connect("/run/systemd/journal/stdout")
s.sendall(b"containerd\n\n6\n0\n0\n0\n0\n")
line = ('time="2026-12-02T14:00:00.%09dZ" level=info msg="loading plugin \\"io.containerd.snapshotter'
        '.v1.overlayfs\\"..." type=io.containerd.snapshotter.v1 n=%d\n')
total, sent, markers = int(rate * seconds), 0, []
start = time.monotonic()
while sent < total:
    now = time.monotonic() - start
    if now >= every * (len(markers) + 0.5):
        name = "%s%d" % (prefix, len(markers))
        markers.append([name, time.time()])
        s.sendall((name + "\n").encode())
    due = min(total, int(rate * (now + 0.01)))
    if due > sent:
        s.sendall("".join(line % (n, n) for n in range(sent, due)).encode())
        sent = due
    time.sleep(max(0.0, start + (now + 0.01) - time.monotonic()))
elapsed = time.monotonic() - start
s.close()
json.dump({"sent": sent, "seconds": elapsed, "markers": markers}, open(out, "w"))
"""

# Outside the flood's cgroup: nodemedic's CPU ticks, RSS and journal lag every 0.25 s.
SAMPLER_SCRIPT = r"""
import json, os, sys, time
pid, seconds, prom = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3]
def lag():
    try:
        for l in open(prom):
            if l.startswith("nodemedic_journal_lag_seconds "):
                return float(l.split()[1])
    except OSError:
        pass
    return -1.0
out, end = [], time.monotonic() + seconds
while time.monotonic() < end:
    f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    status = dict(l.split(":", 1) for l in open(f"/proc/{pid}/status"))
    kb = {k: int(status[k].split()[0]) for k in ("VmRSS", "RssAnon", "RssFile", "RssShmem")}
    rss = [kb["VmRSS"] / 1024, kb["RssAnon"] / 1024, (kb["RssFile"] + kb["RssShmem"]) / 1024]
    cpu = (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")
    out.append([time.monotonic(), cpu, *rss, lag()])
    time.sleep(0.25)
print(json.dumps(out))
"""


def prepare(node: Node) -> int:
    """Lift journald's rate limit, install the scripts, start nodemedic: its main PID."""
    node.write_file(JOURNALD_DROPIN, JOURNALD_CONF)
    node.run("systemctl", "restart", "systemd-journald")
    node.write_file(GENERATOR, GENERATOR_SCRIPT)
    node.write_file(SAMPLER, SAMPLER_SCRIPT)
    policy = SHIPPED_POLICY.read_text() + MARKER_RULE
    policy = policy.replace("[daemon.metrics]\n", '[daemon.metrics]\ninterval = "1s"\n', 1)
    if 'interval = "1s"' not in policy:
        policy = policy.replace("[daemon.probe]", '[daemon.metrics]\ninterval = "1s"\n\n[daemon.probe]', 1)
    node.sh("mkdir -p /var/lib/prometheus/node-exporter")
    start_nodemedic(node, policy=policy)
    return int(node.unit_property("nodemedic.service", "MainPID"))


def sample(node: Node, pid: int, seconds: float) -> list[list[float]]:
    out = node.run("python3", SAMPLER, str(pid), str(seconds), METRICS_FILE, timeout=seconds + 30).stdout
    samples: list[list[float]] = json.loads(out)
    return samples


def flood(node: Node, pid: int, rate: int, seconds: float, n: int, every: float) -> dict[str, object]:
    result = f"/root/flood-{n}.json"
    args = [str(rate), str(seconds), str(every), f"nodemedic-bench: marker {n + 1}00", result]
    t0 = float(node.sh("date +%s.%N").stdout)
    node.run("systemd-run", f"--unit=bench-flood-{n}", "--collect", "-q", "python3", GENERATOR, *args)
    samples = sample(node, pid, seconds + 1)
    wait_for(lambda: node.sh(f"test -s {result}", check=False).returncode == 0, 60, "the generator's end")
    sent = json.loads(node.run("cat", result).stdout)
    t1 = float(node.sh("date +%s.%N").stdout)
    since = f"--since=@{t0:.6f} --until=@{t1:.6f}"
    stored = node.sh(f"journalctl -q _SYSTEMD_UNIT=containerd.service {since} -o cat | wc -l", timeout=120)
    time.sleep(1)  # the last marker's record
    detected = {r["MESSAGE"].rsplit("journal: ", 1)[-1]: realtime(r) for r in records(node, rule=RULE)
                if r.get("NODEMEDIC_KIND") == "detected"}  # fmt: skip
    markers = []
    for name, written in sent["markers"]:
        entry = node.journal("_SYSTEMD_UNIT=containerd.service", f"MESSAGE={name}")
        markers.append((written, realtime(entry[0]) if entry else None, detected.get(name)))
    return {"rate": rate, "sent": sent, "stored": int(stored.stdout.split()[0]), "samples": samples,
            "markers": markers}  # fmt: skip


def say(label: str, text: str) -> None:
    print(f"{label:<44} {text}")


def report(result: dict[str, object], idle_cpu: float, load: str) -> None:
    samples: list[list[float]] = result["samples"]  # type: ignore[assignment]
    sent: dict[str, float] = result["sent"]  # type: ignore[assignment]
    wall = samples[-1][0] - samples[0][0]
    cpu = (samples[-1][1] - samples[0][1]) / wall
    stored = int(result["stored"])  # type: ignore[call-overload]
    rate = stored / sent["seconds"]
    lags = [s[5] * 1000 for s in samples if s[5] >= 0]
    rss, anon, mapped = ([s[i] for s in samples] for i in (2, 3, 4))
    above = max(cpu - idle_cpu, 1e-9)
    asked = f"{result['rate']} lines/s asked"
    print(f"\nflood of {asked}, {rate:,.0f}/s stored by journald ({stored} lines, {sent['seconds']:.1f} s)")
    say("load (1, 5, 15 min) at the start", load)
    say(
        "nodemedic CPU (utime+stime per wall s)", f"{cpu * 100:.1f} % of a core (idle {idle_cpu * 100:.1f} %)"
    )
    say("per line (above idle)", f"{above / rate * 1e6:.1f} us   ({rate / above:,.0f} lines/s per core)")
    say("RSS max / end", f"{max(rss):.1f} / {rss[-1]:.1f} MB (start {rss[0]:.1f})")
    say("  of it anonymous (RssAnon) max / end", f"{max(anon):.1f} / {anon[-1]:.1f} MB (start {anon[0]:.1f})")
    say(
        "  mapped (RssFile+RssShmem) max / end",
        f"{max(mapped):.1f} / {mapped[-1]:.1f} MB (journal files)",
    )
    if lags:
        lag = f"median {statistics.median(lags):.0f} ms   max {max(lags):.0f} ms   (n={len(lags)})"
        say("journal lag (nodemedic_journal_lag_seconds)", lag)
    markers: list[tuple[float, float | None, float | None]] = result["markers"]  # type: ignore[assignment]
    seen = [(d - w, d - e) for w, e, d in markers if e is not None and d is not None]
    say(
        "markers in the flood: detected",
        f"{len(seen)}/{len(markers)}, each entry _SYSTEMD_UNIT=containerd.service",
    )
    if seen:
        say("  marker written -> detection record", summary([w for w, _ in seen]))
        say("  marker's journal entry -> record", summary([e for _, e in seen]))


def summary(values: list[float]) -> str:
    ms = sorted(v * 1000 for v in values)
    return f"median {statistics.median(ms):.0f} ms   max {ms[-1]:.0f} ms   min {ms[0]:.0f} ms"


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rates", type=int, nargs="+", default=[5000, 20000])
    parser.add_argument("--seconds", type=float, default=25.0)
    parser.add_argument("--marker-every", type=float, default=2.5, help="seconds between marker lines")
    args = parser.parse_args()
    with Node.boot(image=ensure_image()) as node:
        pid = prepare(node)
        time.sleep(2)
        idle = sample(node, pid, 5)
        idle_cpu = (idle[-1][1] - idle[0][1]) / (idle[-1][0] - idle[0][0])
        for n, rate in enumerate(args.rates):
            load = Path("/proc/loadavg").read_text().split()[:3]
            result = flood(node, pid, rate, args.seconds, n, args.marker_every)
            report(result, idle_cpu, " ".join(load))
            time.sleep(3)
        alive = node.unit_property("nodemedic.service", "MainPID") == str(pid)
        print(f"\nnodemedic still running, same process: {alive}")
    rates = " ".join(map(str, args.rates))
    print(f"\nreproduce: .venv/bin/python bench/journal_flood.py --rates {rates} --seconds {args.seconds:g} "
          f"--marker-every {args.marker_every:g}")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
