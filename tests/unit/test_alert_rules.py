"""The shipped alert rules (issue 15 item 3) load in Prometheus and do what they say; the shipped
Grafana dashboard's queries parse.

``promtool check rules`` parses packaging/prometheus/nodemedic-alerts.yml as Prometheus would;
``promtool test rules`` runs tests/alerts/nodemedic-alerts.test.yml, where every alert has a node
on which it fires and nodes on which it must not. promtool comes with Debian's ``prometheus``
package (`make deps`): without it these tests fail under CI (CI=true) and skip elsewhere, saying why.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit
REPO = Path(__file__).parents[2]
RULES = REPO / "packaging" / "prometheus" / "nodemedic-alerts.yml"
RULE_TESTS = REPO / "tests" / "alerts" / "nodemedic-alerts.test.yml"
DASHBOARD = REPO / "packaging" / "grafana" / "nodemedic-dashboard.json"
OPERATIONS = REPO / "docs" / "operations.md"
# The metric names nodemedic writes (issue 15's shared list) and the one node-exporter adds for it.
NODEMEDIC_METRICS = """
    build_info mode rule_observe problem_active problems_detected_total repairs_total
    repair_duration_seconds_bucket detection_latency_seconds_bucket breaker_open
    repair_budget_remaining repair_budget_limit sighups_total sighup_storms_total
    sighup_storm_active sighups_absorbed_total cgroups_frozen last_loop_timestamp_seconds
    event_loop_lag_seconds journal_lag_seconds journal_last_read_timestamp_seconds
    journal_skipped_entries_total
    metrics_written_timestamp_seconds
"""
METRICS = {f"nodemedic_{name}" for name in NODEMEDIC_METRICS.split()} | {"node_textfile_mtime_seconds"}
# Grafana's variables, replaced by values PromQL accepts so that promtool can parse the queries.
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$instance": ".*"}
ALERTS = (
    "NodemedicBreakerOpen",
    "NodemedicRepairBudgetExhausted",
    "NodemedicSighupStormObserved",
    "NodemedicDown",
    "NodemedicStale",
    "NodemedicLoopLagging",
    "NodemedicJournalLagging",
    "NodemedicFleetRepairWave",
)


@pytest.fixture(scope="module")
def promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        reason = (
            "promtool is not installed: it comes with Debian's prometheus package "
            "(apt-get install prometheus, or make deps)"
        )
        if os.environ.get("CI") == "true":
            pytest.fail(f"{reason}; under CI the alert rules must be tested, not skipped")
        pytest.skip(reason)
    return found


def run_promtool(promtool: str, *args: str, cwd: Path = REPO) -> str:
    """promtool's output; a failure shows all of it (which rule, which test, expected and got)."""
    proc = subprocess.run(
        [promtool, *args], cwd=cwd, capture_output=True, text=True, check=False, timeout=120
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"promtool {' '.join(args)} failed ({proc.returncode}):\n{output}"
    return output


def test_rules_load_in_prometheus(promtool: str) -> None:
    output = run_promtool(promtool, "check", "rules", str(RULES))
    assert "SUCCESS" in output


def test_every_alert_fires_and_stays_quiet_as_its_tests_say(promtool: str) -> None:
    # From the tests' folder: its rule_files path is relative to it, as promtool resolves it.
    output = run_promtool(promtool, "test", "rules", RULE_TESTS.name, cwd=RULE_TESTS.parent)
    assert "SUCCESS" in output


def test_every_alert_is_tested_firing_and_quiet() -> None:
    rules, tests = RULES.read_text(), RULE_TESTS.read_text()
    for alert in ALERTS:
        assert f"- alert: {alert}\n" in rules, f"{alert} is not in {RULES.name}"
        cases = tests.split(f"alertname: {alert}\n")[1:]
        quiet = [c for c in cases if c.lstrip().startswith("exp_alerts: []")]
        assert quiet, f"{RULE_TESTS.name} has no case where {alert} must not fire"
        assert len(quiet) < len(cases), f"{RULE_TESTS.name} has no case where {alert} fires"
    assert rules.count("- alert: ") == len(ALERTS), f"an alert in {RULES.name} is missing from ALERTS"


def dashboard_queries() -> list[str]:
    panels = json.loads(DASHBOARD.read_text())["panels"]
    return [target["expr"] for panel in panels for target in panel["targets"]]


def test_dashboard_queries_parse(promtool: str, tmp_path: Path) -> None:
    # promtool parses PromQL offline only inside a rule file: one recording rule per query.
    rules = []
    for n, expr in enumerate(dashboard_queries()):
        for variable, value in GRAFANA_VARIABLES.items():
            expr = expr.replace(variable, value)
        rules.append({"record": f"dashboard:query_{n}", "expr": expr})
    parsed = tmp_path / "dashboard-queries.yml"
    parsed.write_text(json.dumps({"groups": [{"name": "dashboard", "rules": rules}]}))
    run_promtool(promtool, "check", "rules", str(parsed))


def test_rules_and_dashboard_use_only_metrics_nodemedic_writes() -> None:
    text = RULES.read_text() + "\n".join(dashboard_queries())
    # Every nodemedic_* or node_* word; recording rules (fleet:nodemedic_...:count) are not metrics.
    names = set(re.findall(r"(?<![:\w])(?:nodemedic|node)_[a-z_]+", text))
    unknown = names - METRICS
    assert not unknown, f"metrics nodemedic does not write: {sorted(unknown)}"


# A query on the repairs counter, its selector if any, and the rest of the line (a "by" that follows).
REPAIRS_QUERY = re.compile(r"nodemedic_repairs_total(?P<selector>\{[^}]*\})?(?=[\[{)\s]|$)")


def adds_held_to_other_results(query: str) -> bool:
    """Whether a query on nodemedic_repairs_total counts result="held" along with other results: a
    held incident ends as observed too, so that counts it twice. Each use of the counter in the
    text is judged with the text between it and the uses beside it (where its "by" is)."""
    matches = list(REPAIRS_QUERY.finditer(query))
    assert matches, query
    edges = [0, *(m.end() for m in matches)]
    for n, match in enumerate(matches):
        around = query[edges[n] : matches[n + 1].start() if n + 1 < len(matches) else len(query)]
        if re.search(r"by \([^)]*\bresult\b", around):
            continue  # one series per result: nothing is added across results
        selector = match.group("selector") or ""
        if chosen := re.search(r'result=~?"([^"]*)"', selector):
            if "held" in chosen.group(1).split("|") and chosen.group(1) != "held":
                return True
        elif 'result!="held"' not in selector:
            return True
    return False


def test_no_query_adds_held_repairs_to_the_others() -> None:
    queries = [*dashboard_queries()]
    for text in (RULES.read_text(), OPERATIONS.read_text()):
        # each line naming the counter in a query (followed by a selector or a range), in the rules'
        # expressions and annotations and the docs' PromQL
        queries += [line for line in text.splitlines() if re.search(r"nodemedic_repairs_total[{\[]", line)]
    queries = [q for q in queries if "nodemedic_repairs_total" in q]
    assert len(queries) >= 5, "the rules, the dashboard and the docs query the repairs"
    double = [q.strip() for q in queries if adds_held_to_other_results(q)]
    assert not double, f'these add result="held" to the incident\'s own end (leave it out): {double}'
