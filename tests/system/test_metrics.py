"""The fleet's view of a node, end to end (issue 15): nodemedic's own .deb on a lab node writes
nodemedic.prom into Debian's textfile folder, Debian's prometheus-node-exporter in the node serves
it on loopback, Debian's Prometheus on the host scrapes it every second, the socket-directory
fault is injected, and PromQL over Prometheus's HTTP API gives the repair, its duration and a
fresh file; nodemedic stopped, the file goes stale."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest
import tomlkit
from lab.faults import POLICY_PATH, SOCKET, make_directory_at, realtime, records, sighup_containerd, wait_for
from lab.node import Node
from lab.package import build_packages, install_deb
from lab.prometheus import Prometheus, free_port, start_node_exporter

pytestmark = pytest.mark.system
RULE = "socket-path-is-directory"
UNIT = "nodemedic.service"
INTERVAL = 2  # seconds: [daemon.metrics] interval here (default 15 s), so staleness shows fast
REPAIRED = f'nodemedic_repairs_total{{rule="{RULE}",result="repaired"}}'
# Debian's node-exporter 1.5 labels the file with its full path (measured), others with its name.
MTIME = 'node_textfile_mtime_seconds{file=~"(.*/)?nodemedic[.]prom"}'
AGE = f"time() - {MTIME}"
ALERT_RULES = "usr/share/nodemedic/prometheus/nodemedic-alerts.yml"  # installed by the package


@pytest.fixture(scope="module")
def prometheus_binary() -> str:
    """Debian's prometheus on the host (`make deps`); missing fails under CI, skips elsewhere."""
    found = shutil.which("prometheus")
    if found is None:
        reason = "prometheus is not installed on the host: apt-get install prometheus (make deps)"
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    return found


@pytest.fixture(scope="module")
def deb() -> str:
    return build_packages()["deb"]


def with_metrics_interval(node: Node, seconds: int) -> None:
    """Set ``[daemon.metrics] interval`` in the installed policy and restart nodemedic on it."""
    doc = tomlkit.parse(node.run("cat", POLICY_PATH).stdout)
    daemon = doc["daemon"]
    assert isinstance(daemon, tomlkit.items.Table)
    metrics = daemon.setdefault("metrics", tomlkit.table())
    metrics["interval"] = f"{seconds}s"
    node.write_file(POLICY_PATH, tomlkit.dumps(doc))
    node.run("systemctl", "restart", UNIT, timeout=60)


def listening(node: Node, port: int) -> set[str]:
    """The local addresses of the TCP listeners on ``port`` (the node shares the host's network)."""
    return {line.split()[3] for line in node.run("ss", "-Hltn", f"sport = :{port}").stdout.splitlines()}


def test_prometheus_sees_the_repair_its_duration_and_a_fresh_file(
    node: Node, deb: str, prometheus_binary: str, tmp_path: Path
) -> None:
    install_deb(node, deb)
    with_metrics_interval(node, INTERVAL)
    port = free_port()
    target = start_node_exporter(node, port)
    rules = tmp_path / "nodemedic-alerts.yml"
    shutil.copyfile(node.root / ALERT_RULES, rules)
    with Prometheus.start(
        [target], tmp_path / "prometheus", rule_files=[rules], binary=prometheus_binary
    ) as prom:
        assert listening(node, port) == {target}, "node-exporter on loopback only"
        assert listening(node, prom.port) == {f"127.0.0.1:{prom.port}"}, "Prometheus on loopback only"
        # The pipeline works before any fault: the file is written at start and scraped.
        prom.wait_value("nodemedic_build_info", lambda v: v == 1, 30, "nodemedic's file, scraped")
        assert prom.value('node_textfile_scrape_error{job="node"}') == 0, "node-exporter read the file"
        assert prom.value(REPAIRED) in (None, 0.0)

        sighup_containerd(node)
        make_directory_at(node, SOCKET)
        wait_for(lambda: records(node, rule=RULE, outcome="repaired"), 30, "nodemedic's 'repaired' record")
        [repaired] = records(node, rule=RULE, outcome="repaired")
        assert prom.wait_value(REPAIRED, lambda v: v >= 1, 15, "the repair in Prometheus") == 1
        seen = time.time() - realtime(repaired)
        print(f"\nrepaired record to Prometheus's answer: {seen:.2f}s (debounce <= 1s, scrape every 1s)")
        _assert_repair_duration(prom, float(repaired["NODEMEDIC_ELAPSED_MS"]) / 1000)
        assert prom.value(f'nodemedic_problems_detected_total{{rule="{RULE}"}}') == 1
        active = f'nodemedic_problem_active{{rule="{RULE}"}}'
        assert prom.wait_value(active, lambda v: v == 0, 10, "the problem no longer active") == 0
        assert prom.value(f'nodemedic_breaker_open{{rule="{RULE}"}}') == 0
        _assert_rules_evaluate_and_page_nobody(prom)
        _assert_fresh_then_stale(node, prom)


def _assert_rules_evaluate_and_page_nobody(prom: Prometheus) -> None:
    """The shipped alert rules, on the real series of a node that repaired once: each evaluates
    without error, and none is pending or firing (one repair is no one's page)."""
    wait_for(lambda: all(r["health"] != "unknown" for r in prom.rules()), 10, "every rule evaluated")
    evaluated = prom.rules()
    assert {r["name"]: r.get("lastError", "") for r in evaluated if r["health"] != "ok"} == {}
    assert [r["name"] for r in evaluated if r.get("state") in ("pending", "firing")] == []
    assert any(r["name"] == "NodemedicStale" for r in evaluated)


def duration(series: str) -> str:
    """A series of the repair-duration histogram of RULE: "sum", "count" or "bucket"."""
    return f'nodemedic_repair_duration_seconds_{series}{{rule="{RULE}"}}'


def _assert_repair_duration(prom: Prometheus, elapsed: float) -> None:
    """The histogram holds the one repair, as long as the journal's record says, under 2 s."""
    assert prom.value(duration("count")) == 1
    mean = prom.value(f"{duration('sum')} / {duration('count')}")
    assert mean is not None
    assert mean == pytest.approx(elapsed, abs=0.002), "the journal's ELAPSED_MS, in seconds"
    assert mean < 2.0, "the socket directory repaired in milliseconds, not systemd's minutes"
    median = prom.value(f"histogram_quantile(0.5, sum by (le) ({duration('bucket')}))")
    assert median is not None
    assert median <= 2.5, "the bucket the repair fell in"
    print(f"repair duration: {mean:.3f}s (histogram_quantile(0.5) estimates {median:.3f}s)")


def _assert_fresh_then_stale(node: Node, prom: Prometheus) -> None:
    """Rewritten at least every INTERVAL without any event; once nodemedic stops, the file stays
    and ages: node_textfile_mtime_seconds shows a dead nodemedic."""
    first = prom.value(MTIME)
    assert first is not None
    age = prom.value(AGE)
    assert age is not None
    assert age < INTERVAL + 3, f"fresh: written {age:.1f}s ago (interval {INTERVAL}s, scrape 1s)"
    prom.wait_value(MTIME, lambda v: v > first, 2 * INTERVAL + 3, "a rewrite with nothing happening")

    node.run("systemctl", "stop", UNIT, timeout=60)
    stopped = time.monotonic()
    stale = 3 * INTERVAL
    age = prom.wait_value(AGE, lambda v: v > stale, stale + 10, f"the file older than {stale}s")
    print(f"nodemedic stopped: the file {age:.1f}s old after {time.monotonic() - stopped:.1f}s")
