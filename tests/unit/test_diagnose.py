"""`nodemedic diagnose` on a tmp tree: socket paths, config.toml, state.json, a fake /proc and cgroup
tree are real files; systemd, the probe and the journal are fakes at the edges. Each check, the case
each fault is named, the rule and mode the real core decides, exit codes, the JSON schema, and that
nothing is written."""

from __future__ import annotations

import json
import shutil
import socket
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from nodemedic import cli
from nodemedic.errors import UnitControlError
from nodemedic.events import UnitChanged
from nodemedic.policy.load import parse_policy_text
from nodemedic.policy.model import Policy
from nodemedic.tools import diagnose as dg

from .fakes import FakeProbe

pytestmark = pytest.mark.unit
SHIPPED = Path(__file__).parents[2] / "policy" / "policy.toml"
NOW = 1_700_000_000.0
MAIN_PID = 555
SHIM_PID = 4242
GOOD_CONFIG = 'version = 2\n[plugins."io.containerd.grpc.v1.cri"]\n  sandbox_image = "pause"\n'
BROKEN_CONFIG = 'version = 2\n[plugins."io.containerd.grpc.v1.cri"\n  sandbox_image = "pause"\n'
PSI = "some avg10={some:.2f} avg60=0.00 total=0\nfull avg10={full:.2f} avg60=0.00 total=0\n"
LEFT_OVER = (
    f"containerd.service: Found left-over process {SHIM_PID} (containerd-shim) in control group while "
    "starting unit. Ignoring."
)


@dataclass
class Node:
    """A tmp tree standing for the node, and the fakes at its edges."""

    root: Path
    units: dict[str, UnitChanged] = field(default_factory=dict)
    entries: list[Mapping[str, object]] = field(default_factory=list)
    probe: FakeProbe = field(default_factory=FakeProbe)
    units_fail: bool = False
    journal_fail: bool = False

    @property
    def sock(self) -> Path:
        return self.root / "run/containerd/containerd.sock"

    @property
    def config(self) -> Path:
        return self.root / "etc/containerd/config.toml"

    @property
    def state(self) -> Path:
        return self.root / "state"

    @property
    def proc(self) -> Path:
        return self.root / "proc"

    def policy_text(self, mode: str = "enforce") -> str:
        text = SHIPPED.read_text().replace('mode = "enforce"', f'mode = "{mode}"', 1)
        text = text.replace(
            'do = "kill-orphaned-shims"',
            f'do = "kill-orphaned-shims"\nproc = "{self.proc}"'
            f'\nbundles = "{self.root}/run/containerd/io.containerd.runtime.v2.task"',
        )
        for old in ("/run/containerd", "/etc/containerd"):
            text = text.replace(f"{old}/", f"{self.root}{old}/").replace(f'"{old}"', f'"{self.root}{old}"')
        return text.replace('"/var/lib/nodemedic"', f'"{self.state}"')

    def policy(self, mode: str = "enforce") -> Policy:
        return parse_policy_text(self.policy_text(mode), "policy.toml")

    def unit(self, unit: str, active: str, sub: str, pid: int = 0, **more: object) -> None:
        self.units[unit] = UnitChanged(unit, active, sub, main_pid=pid, **more)  # type: ignore[arg-type]

    def line(
        self,
        message: str,
        *,
        ago: float = 10.0,
        unit: str = "containerd.service",
        pid: int = MAIN_PID,
        **more: object,
    ) -> None:
        entry: dict[str, object] = {"MESSAGE": message, "__REALTIME_TIMESTAMP": NOW - ago, "_PID": pid}
        entry |= {"_SYSTEMD_UNIT": unit} if pid != 1 else {"UNIT": unit, "_UID": 0}
        self.entries.append({**entry, **more})

    def pressure(self, memory_full: float = 0.0) -> None:
        for resource in dg.PRESSURE_RESOURCES:
            full = memory_full if resource == "memory" else 0.0
            write(self.proc / "pressure" / resource, PSI.format(some=full, full=full))

    def containerd(self, fds: int = 40, limit: int = 1024) -> None:
        base = self.proc / str(MAIN_PID)
        write(
            base / "limits",
            f"Max open files            {limit}                 {limit}                 files\n",
        )
        write(base / "cgroup", "0::/system.slice/containerd.service\n")
        write(base / "comm", "containerd\n")
        (base / "fd").mkdir(parents=True, exist_ok=True)
        for n in range(fds):
            (base / "fd" / str(n)).touch()

    def shim(self, *, orphan: bool) -> None:
        base = self.proc / str(SHIM_PID)
        write(base / "cmdline", "/usr/bin/containerd-shim-runc-v2\0-namespace\0default\0-id\0app\0")
        write(base / "cgroup", "0::/system.slice/containerd.service\n")
        write(base / "comm", "containerd-shim\n")
        write(base / "task" / str(SHIM_PID) / "children", "" if orphan else "4300 ")
        if not orphan:
            (self.root / "run/containerd/io.containerd.runtime.v2.task/default/app").mkdir(parents=True)

    def edges(self) -> dg.Edges:
        async def units(names: list[str]) -> tuple[dict[str, UnitChanged], str]:
            if self.units_fail:
                raise UnitControlError("no bus, no systemctl")
            return {u: s for u, s in self.units.items() if u in names}, "fake"

        def journal(names: list[str], since: float) -> list[Mapping[str, object]]:
            if self.journal_fail:
                raise OSError("no journal")
            return [e for e in self.entries if float(e["__REALTIME_TIMESTAMP"]) >= since]  # type: ignore[arg-type]

        async def sleep(_: float) -> None:
            return None

        return dg.Edges(
            units,
            self.probe,
            journal,
            proc=self.proc,
            cgroup_root=self.root / "cgroup",
            wall=lambda: NOW,
            sleep=sleep,
        )

    async def diagnose(self, mode: str = "enforce") -> dg.Diagnosis:
        return await dg.diagnose(self.policy(mode), self.edges())


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def listen(path: Path) -> socket.socket:
    path.parent.mkdir(parents=True, exist_ok=True)
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(path))
    path.chmod(0o660)
    return sock


@pytest.fixture
def node() -> Iterator[Node]:
    """A healthy node: containerd active and answering on its sockets, a config it loads, no
    pressure, few fds; nodemedic stopped. (A short root: a socket path has at most 107 bytes.)"""
    root = Path(tempfile.mkdtemp(prefix="nmd-"))
    n = Node(root)
    sockets = [listen(n.sock), listen(Path(f"{n.sock}.ttrpc"))]
    write(n.config, GOOD_CONFIG)
    n.state.mkdir()
    n.pressure()
    n.containerd()
    n.unit("containerd.service", "active", "running", MAIN_PID)
    n.unit("kubelet.service", "active", "running", 600)
    n.unit("nodemedic.service", "inactive", "dead")
    n.line(
        "Starting containerd.service - containerd container runtime...",
        ago=600,
        pid=1,
        MESSAGE_ID=dg.UNIT_STARTING,
    )
    n.line(
        "Started containerd.service - containerd container runtime.",
        ago=599,
        pid=1,
        MESSAGE_ID=dg.UNIT_STARTED,
    )
    yield n
    for s in sockets:
        s.close()
    shutil.rmtree(root)


def check(d: dg.Diagnosis, name: str) -> dg.Check:
    return next(c for c in d.checks if c.name == name)


def faults(d: dg.Diagnosis) -> list[dg.Case]:
    return [c for c in d.cases if c.fault]


def tree(root: Path) -> dict[str, float]:
    return {str(p): p.lstat().st_mtime for p in root.rglob("*")}


# ---- healthy, and the exit codes -----------------------------------------------------------------


async def test_a_healthy_node_is_healthy_with_the_known_bugs_as_an_advisory(node: Node) -> None:
    d = await node.diagnose()
    assert [c.name for c in d.checks if c.status != "ok"] == []
    assert faults(d) == []
    [advisory] = d.cases
    assert (advisory.name, advisory.rule) == ("known bugs", "containerd-known-bugs")
    assert "1.6.20" in advisory.evidence[0]
    assert (d.exit_code(), d.result()) == (0, "healthy")
    assert (
        "in the last hour: started 1 time(s), 0 automatic restart(s) scheduled" in check(d, "unit").evidence
    )
    assert "result: healthy (exit 0)" in dg.render(d, "policy.toml", colour=False)


async def test_nothing_is_written_and_a_damaged_state_file_is_left_where_it_is(node: Node) -> None:
    write(node.state / "state.json", "{not json")
    write(node.config, BROKEN_CONFIG)
    before = tree(node.root)
    d = await node.diagnose()
    assert tree(node.root) == before
    assert any("state.json cannot be used" in e for e in check(d, "nodemedic").evidence)


async def test_what_cannot_be_read_is_unknown_and_exits_2(node: Node) -> None:
    node.units_fail = node.journal_fail = True
    d = await node.diagnose()
    assert check(d, "unit").status == "unknown"
    assert check(d, "journal").status == "unknown"
    assert check(d, "fds").status == "unknown"  # no MainPID known
    assert faults(d) == []
    assert (d.exit_code(), d.result()) == (2, "unknown")


async def test_json_has_schema_1(node: Node) -> None:
    data = json.loads(json.dumps((await node.diagnose()).to_json("/etc/nodemedic/policy.toml")))
    assert data["schema"] == 1
    assert set(data) >= {"schema", "result", "exit", "policy", "checks", "cases"}
    assert {c["name"] for c in data["checks"]} == {
        "unit",
        "paths",
        "probe",
        "config",
        "shims",
        "fds",
        "pressure",
        "socket-mode",
        "journal",
        "nodemedic",
    }
    for c in data["checks"]:
        assert set(c) == {"name", "status", "evidence"}
        assert c["status"] in ("ok", "problem", "unknown")
        assert all(isinstance(e, str) for e in c["evidence"])
    for c in data["cases"]:
        assert set(c) == {"name", "rule", "would", "advice", "evidence", "fault"}


# ---- each fault, named, with the rule that would act ---------------------------------------------


async def test_socket_directory(node: Node) -> None:
    node.sock.unlink()
    node.sock.mkdir()
    node.probe.answers = False
    node.unit("containerd.service", "activating", "auto-restart")
    node.line("containerd: failed to get listener for main endpoint: is a directory", ago=5)
    d = await node.diagnose()
    [case] = faults(d)
    assert (case.name, case.rule) == ("socket directory", "socket-path-is-directory")
    assert case.would.startswith("enforce once nodemedic.service runs")
    assert "stop-unit -> remove-socket-dir -> start-unit" in case.would
    assert f"mv {node.sock} /root/" in case.advice
    assert "systemctl start nodemedic" in case.advice
    assert f"{node.sock}: directory" in check(d, "paths").evidence
    assert check(d, "probe").status == "problem"
    assert d.exit_code() == 1


async def test_hang(node: Node) -> None:
    node.probe.answers = False
    d = await node.diagnose()
    [case] = faults(d)
    assert (case.name, case.rule) == ("hang", "containerd-hung")
    assert "signal-unit -> restart-unit" in case.would
    assert node.probe.calls == 2, "the requests the probe trigger needs, then the confirming one"


async def test_broken_config_while_containerd_fails_on_it(node: Node) -> None:
    write(node.config, BROKEN_CONFIG)
    node.probe.answers = False
    node.unit("containerd.service", "failed", "failed", result="exit-code")
    node.line("Starting containerd.service - containerd container runtime...", ago=8, pid=1)
    node.line(f"containerd: failed to load TOML: {node.config}: (3, 1): unexpected token", ago=7)
    d = await node.diagnose()
    [case] = faults(d)
    assert (case.name, case.rule) == ("broken config", "containerd-config-broken")
    assert "restore-config" in case.would
    assert check(d, "config").status == "problem"
    assert check(d, "journal").status == "problem"
    assert any("failed to load TOML" in e for e in check(d, "journal").evidence)


async def test_broken_config_while_containerd_runs(node: Node) -> None:
    write(node.config, BROKEN_CONFIG)
    write(node.state / "config-good" / f"{'0' * 64}.toml", GOOD_CONFIG)
    d = await node.diagnose()
    [case] = faults(d)
    assert (case.name, case.rule) == ("broken config", "containerd-config-edited-broken")
    assert str(node.state / "config-good" / f"{'0' * 64}.toml") in case.advice
    assert any("1 last-known-good copy" in e for e in check(d, "config").evidence)


async def test_broken_config_while_containerd_waits_for_its_restart(node: Node) -> None:
    """Nothing in the journal yet: the while-down rule, its settle run at once (the file as it is)."""
    write(node.config, BROKEN_CONFIG)
    write(node.state / "config-good" / f"{'0' * 64}.toml", GOOD_CONFIG)
    node.probe.answers = False
    node.unit("containerd.service", "activating", "auto-restart")
    d = await node.diagnose()
    [case] = faults(d)
    assert (case.name, case.rule) == ("broken config", "containerd-config-broken-while-down")
    assert "restore-config" in case.would
    assert "restart-unit" in case.would


async def test_an_orphaned_shim_systemd_named(node: Node) -> None:
    node.shim(orphan=True)
    node.line(LEFT_OVER, ago=599.5, pid=1)
    d = await node.diagnose()
    [case] = faults(d)
    assert (case.name, case.rule) == ("left-over shims", "left-over-shims")
    assert f"kill {SHIM_PID}" in case.advice
    assert f"shim {SHIM_PID} (named by systemd): proven orphan" in check(d, "shims").evidence


async def test_a_shim_serving_a_container_is_no_case(node: Node) -> None:
    node.shim(orphan=False)
    node.line(LEFT_OVER, ago=599.5, pid=1)
    d = await node.diagnose()
    assert faults(d) == []
    assert check(d, "shims").evidence == [
        f"shim {SHIM_PID} (named by systemd): kept: it has child processes (a container)"
    ]


async def test_an_orphan_systemd_did_not_name_is_found_in_the_cgroup(node: Node) -> None:
    node.shim(orphan=True)
    d = await node.diagnose()
    [case] = faults(d)
    assert (case.name, case.rule) == ("left-over shims", "")
    assert "names when containerd starts" in case.would


async def test_fd_exhaustion_in_the_shipped_observe_mode(node: Node) -> None:
    node.containerd(fds=90, limit=100)
    d = await node.diagnose()
    [case] = faults(d)
    assert (case.name, case.rule) == ("fd exhaustion", "containerd-fd-exhaustion")
    assert case.would.startswith("observe")
    assert "raise-nofile-limit" in case.would
    assert "rule containerd-fd-exhaustion is in observe mode" in case.advice
    assert "LimitNOFILE" in case.advice, "the rule's own advice"
    assert check(d, "fds").evidence == [
        f"containerd.service (PID {MAIN_PID}): 90 of 100 fds open (90%; threshold 80%)"
    ]


async def test_pressure_is_a_report_only_rule_with_its_advice(node: Node) -> None:
    node.pressure(memory_full=50.0)
    d = await node.diagnose()
    [case] = faults(d)
    assert (case.name, case.rule) == ("pressure", "containerd-starved")
    assert case.would.startswith("report only")
    assert "systemd-cgtop" in case.advice


async def test_socket_mode(node: Node) -> None:
    node.sock.chmod(0o666)
    d = await node.diagnose()
    [case] = faults(d)
    assert (case.name, case.rule) == ("socket mode", "containerd-socket-mode")
    assert check(d, "socket-mode").status == "problem"


# ---- what nodemedic would not do, and what a human should run ---------------------------------------


async def test_an_open_breaker_holds_the_rule_to_observing(node: Node) -> None:
    breaker = {"state": "open", "opened_at": NOW - 60, "recent_failures": [NOW - 60], "history": []}
    state = {"version": 1, "rules": {"containerd-hung": {"breaker": breaker}}, "budget": {"spent": []}}
    write(node.state / "state.json", json.dumps(state))
    node.probe.answers = False
    d = await node.diagnose()
    [case] = faults(d)
    assert case.would.startswith("observe")
    assert "circuit breaker open" in case.advice
    assert "nodemedic reset containerd-hung" in case.advice
    assert "rule containerd-hung: breaker open (state.json)" in check(d, "nodemedic").evidence


async def test_observe_mode_of_the_daemon_says_how_to_enforce(node: Node) -> None:
    node.probe.answers = False
    node.unit("nodemedic.service", "active", "running", 700)
    [case] = faults(await node.diagnose(mode="observe"))
    assert (
        case.would
        == "observe: would signal-unit -> restart-unit -> verify-containerd -> restart-unit; changes nothing"
    )
    assert "`nodemedic mode enforce`" in case.advice


async def test_a_running_nodemedic_repairs_it_itself(node: Node) -> None:
    node.probe.answers = False
    node.unit("nodemedic.service", "active", "running", 700)
    [case] = faults(await node.diagnose())
    assert case.would.startswith("enforce: ")
    assert case.advice == ""


async def test_a_stale_line_from_before_the_last_start_is_history(node: Node) -> None:
    node.line("containerd: failed to get listener for main endpoint: is a directory", ago=900)
    d = await node.diagnose()
    assert faults(d) == []
    assert d.exit_code() == 0
    assert any("1 older match(es)" in e for e in check(d, "journal").evidence)


async def test_a_line_whose_fault_is_gone_names_nothing(node: Node) -> None:
    node.line("containerd: failed to get listener for main endpoint: is a directory", ago=5)
    assert faults(await node.diagnose()) == [], "the path is a socket now"


async def test_a_forged_line_is_not_containerd_s(node: Node) -> None:
    write(node.config, GOOD_CONFIG)
    node.line("containerd: failed to load TOML: x", ago=5, unit="evil.service", UNIT="containerd.service")
    d = await node.diagnose()
    assert faults(d) == []


async def test_containerd_down_with_no_rule_for_it(node: Node) -> None:
    node.probe.answers = False
    node.unit("containerd.service", "failed", "failed", result="exit-code")
    d = await node.diagnose()
    [case] = faults(d)
    assert (case.name, case.rule) == ("containerd down", "")
    assert "journalctl -u containerd" in case.advice


# ---- the edges and the command ----------------------------------------------------------------------


def test_unit_state_from_systemctl_show() -> None:
    text = "LoadState=loaded\nActiveState=active\nSubState=running\nResult=success\nNRestarts=3\nMainPID=77\n"
    seen = dg.unit_from_show("containerd.service", text)
    assert (seen.active_state, seen.sub_state, seen.n_restarts, seen.main_pid) == ("active", "running", 3, 77)
    assert seen.source == "systemctl"


async def test_units_fall_back_to_systemctl_when_the_bus_is_down(monkeypatch: pytest.MonkeyPatch) -> None:
    async def no_bus(units: list[str], wait: float) -> dict[str, UnitChanged]:
        raise UnitControlError("D-Bus connection failed")

    show = {"containerd.service": UnitChanged("containerd.service", "active", "running")}
    monkeypatch.setattr(dg, "_units_over_dbus", no_bus)
    monkeypatch.setattr(dg, "_units_over_systemctl", lambda units: show)
    found, how = await dg.read_units(["containerd.service"])
    assert found == show
    assert how == "systemctl (D-Bus: D-Bus connection failed)"


@pytest.mark.parametrize(
    ("tty", "no_color", "expected"), [(True, False, True), (True, True, False), (False, False, False)]
)
def test_colours_only_on_a_terminal_without_no_color(
    monkeypatch: pytest.MonkeyPatch, tty: bool, no_color: bool, expected: bool
) -> None:
    monkeypatch.delenv("NO_COLOR", raising=False)
    if no_color:
        monkeypatch.setenv("NO_COLOR", "1")

    class Stream:
        def isatty(self) -> bool:
            return tty

    assert dg.wants_colour(Stream()) is expected


@pytest.mark.parametrize(("json_out", "probe_answers", "code"), [(False, True, 0), (True, False, 1)])
def test_the_command(
    node: Node,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    json_out: bool,
    probe_answers: bool,
    code: int,
) -> None:
    policy = node.root / "policy.toml"
    policy.write_text(node.policy_text())
    node.probe.answers = probe_answers
    monkeypatch.setattr(dg, "real_edges", node.edges)
    assert cli.main(["diagnose", "--policy", str(policy), *(["--json"] if json_out else [])]) == code
    out = capsys.readouterr().out
    if json_out:
        assert json.loads(out)["cases"][0]["name"] == "hang"
        assert out.startswith('{\n  "schema"')  # indent 2, as status and replay print
    else:
        assert "\033[" not in out
        assert "result: healthy (exit 0)" in out


@pytest.mark.parametrize("broken", [None, "[daemon]\nmode = 'sometimes'\n"])
def test_a_policy_that_cannot_be_read_is_could_not_check(
    node: Node,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    broken: str | None,
) -> None:
    policy = node.root / "policy.toml"
    if broken is not None:
        policy.write_text(broken)
    monkeypatch.setattr(dg, "real_edges", node.edges)
    assert cli.main(["diagnose", "--policy", str(policy)]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert f"invalid policy {policy}" in err
    assert "nothing checked" in err
    assert ("file not found" if broken is None else f"{policy}:2: ") in err


def test_diagnose_is_in_the_help() -> None:
    parser = cli._parser()
    assert "diagnose" in parser.format_help()
