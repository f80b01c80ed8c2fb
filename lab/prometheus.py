"""The fleet's monitoring around a lab node: Debian's prometheus-node-exporter inside the node and
Debian's Prometheus on the host, both on loopback only.

A lab node shares the host's network namespace (lab.md), so a node-exporter listening on
127.0.0.1 inside the node is scraped by a Prometheus on the host's 127.0.0.1, and nothing listens
on any other address. Ports are chosen free per test: several nodes may run at once.

    with Prometheus.start([f"127.0.0.1:{port}"], tmp_path) as prom:
        prom.wait_value('up{job="node"}', lambda v: v == 1, 20, "the first scrape")
"""

from __future__ import annotations

import contextlib
import json
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

from lab.image import log
from lab.node import Node

NODE_EXPORTER = "prometheus-node-exporter.service"
NODE_EXPORTER_DEFAULTS = "/etc/default/prometheus-node-exporter"
TEXTFILE_DIR = "/var/lib/prometheus/node-exporter"  # Debian's default --collector.textfile.directory
JOB = "node"
# Loopback requests never go through a proxy the environment may name.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class PrometheusError(RuntimeError):
    """Prometheus did not start, or a query failed; the message carries its answer or log."""


def free_port() -> int:
    """A TCP port free on the host's loopback now (the node shares the host's network)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def http_get(url: str, timeout: float = 5) -> str:
    """GET ``url`` (loopback, no proxy) and return the body."""
    with _OPENER.open(url, timeout=timeout) as answer:
        body: bytes = answer.read()
        return body.decode()


def _answers(url: str) -> bool:
    try:
        http_get(url, timeout=2)
    except (OSError, urllib.error.URLError):
        return False
    return True


def start_node_exporter(node: Node, port: int, *, timeout: float = 20) -> str:
    """Start the node's prometheus-node-exporter (Debian's unit, as user prometheus) on
    127.0.0.1:``port`` with only its textfile collector, reading Debian's default folder (not
    named: what the package does is what is tested). The image ships the unit disabled: enabled,
    every node would listen on the host's :9100. Returns the scrape target."""
    # Only the textfile collector: the others read the host's hardware and are not under test.
    args = f"--web.listen-address=127.0.0.1:{port} --collector.disable-defaults --collector.textfile"
    node.write_file(NODE_EXPORTER_DEFAULTS, f'ARGS="{args}"\n')
    node.run("systemctl", "start", NODE_EXPORTER, timeout=30)
    target = f"127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while not _answers(f"http://{target}/metrics"):
        if time.monotonic() > deadline:
            status = node.run("systemctl", "status", "--no-pager", NODE_EXPORTER, check=False).stdout
            raise PrometheusError(f"node-exporter did not answer on {target}:\n{status}")
        time.sleep(0.1)
    return target


class Prometheus:
    """A Prometheus server on the host's loopback with a config and storage of its own (in
    ``workdir``), scraping ``targets`` as job "node". Start with `Prometheus.start()`; leaving
    the ``with`` stops it (its own process only, by PID)."""

    def __init__(self, binary: str, workdir: Path, port: int) -> None:
        self.binary = binary
        self.workdir = workdir
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = workdir / "prometheus.log"
        self._proc: subprocess.Popen[bytes] | None = None

    @classmethod
    def start(
        cls,
        targets: Sequence[str],
        workdir: Path,
        *,
        scrape_interval: str = "1s",
        rule_files: Sequence[Path] = (),
        binary: str | None = None,
        timeout: float = 30,
    ) -> Prometheus:
        """Write the config (scraping and evaluating ``rule_files`` every ``scrape_interval``),
        start the server and wait until it is ready."""
        found = binary or shutil.which("prometheus")
        if found is None:
            raise PrometheusError("prometheus is not installed on the host (apt-get install prometheus)")
        workdir.mkdir(parents=True, exist_ok=True)
        prom = cls(found, workdir, free_port())
        prom._write_config(targets, scrape_interval, rule_files)
        try:
            prom._launch()
            prom._wait_ready(timeout)
        except BaseException:
            prom.stop()
            raise
        return prom

    def __enter__(self) -> Prometheus:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _write_config(self, targets: Sequence[str], scrape_interval: str, rule_files: Sequence[Path]) -> None:
        # JSON is YAML: no YAML library needed on the host.
        config = {
            "global": {"scrape_interval": scrape_interval, "evaluation_interval": scrape_interval,
                       "scrape_timeout": scrape_interval},
            "rule_files": [str(f) for f in rule_files],
            "scrape_configs": [{"job_name": JOB, "static_configs": [{"targets": list(targets)}]}],
        }  # fmt: skip
        (self.workdir / "prometheus.yml").write_text(json.dumps(config, indent=2) + "\n")

    def _launch(self) -> None:
        argv = [self.binary, f"--config.file={self.workdir / 'prometheus.yml'}",
                f"--storage.tsdb.path={self.workdir / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}"]  # fmt: skip
        with self.log_path.open("wb") as out:
            self._proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out,
                                          stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
        log(f"prometheus on {self.url} (PID {self._proc.pid}), log {self.log_path}")

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not _answers(f"{self.url}/-/ready"):
            if self._proc is not None and self._proc.poll() is not None:
                raise PrometheusError(f"prometheus exited ({self._proc.returncode}){self._log_tail()}")
            if time.monotonic() > deadline:
                raise PrometheusError(f"prometheus not ready after {timeout:g}s{self._log_tail()}")
            time.sleep(0.1)

    def _log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n--- tail of {} ---\n{}".format(self.log_path, "\n".join(text.splitlines()[-lines:]))

    def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL after 10 s); safe to call more than once."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(5)

    def _get_json(self, path: str) -> dict[str, Any]:
        try:
            answer: dict[str, Any] = json.loads(http_get(f"{self.url}{path}"))
        except urllib.error.HTTPError as err:  # a bad query: Prometheus says why in the body
            raise PrometheusError(f"{path}: {err.read().decode(errors='replace')}") from err
        if answer.get("status") != "success":
            raise PrometheusError(f"{path}: {answer}")
        return answer

    def rules(self) -> list[dict[str, Any]]:
        """Every rule of the loaded rule files as /api/v1/rules gives it (name, health, lastError,
        state of an alert, ...)."""
        groups = self._get_json("/api/v1/rules")["data"]["groups"]
        return [rule for group in groups for rule in group["rules"]]

    def query(self, expr: str) -> list[tuple[dict[str, str], float]]:
        """An instant PromQL query over the HTTP API: (labels, value) per series of the vector
        (a scalar is one series without labels)."""
        data = self._get_json(f"/api/v1/query?{urllib.parse.urlencode({'query': expr})}")["data"]
        if data["resultType"] == "scalar":
            return [({}, float(data["result"][1]))]
        if data["resultType"] != "vector":
            raise PrometheusError(f"query {expr!r}: a {data['resultType']}, not a vector")
        return [(series["metric"], float(series["value"][1])) for series in data["result"]]

    def value(self, expr: str) -> float | None:
        """The one value ``expr`` gives now; None if it gives no series (raises if several)."""
        found = self.query(expr)
        if len(found) > 1:
            raise PrometheusError(f"query {expr!r} gave {len(found)} series: {found}")
        return found[0][1] if found else None

    def wait_value(self, expr: str, accept: Callable[[float], bool], timeout: float, what: str) -> float:
        """Poll ``expr`` until its one value is accepted; fail with the last value seen."""
        deadline = time.monotonic() + timeout
        last: float | None = None
        while True:
            last = self.value(expr)
            if last is not None and accept(last):
                return last
            if time.monotonic() > deadline:
                raise TimeoutError(f"timed out after {timeout:g}s waiting for {what}: {expr} = {last}")
            time.sleep(0.2)
