"""The packages, installed for real: the .deb into a fresh lab node with dpkg (install, repair under
the hardened unit, upgrade keeping an operator's policy edit, remove, purge), the .rpm's metadata
and an install into a scratch root. `packaging/build.py` builds them (cached under build/packages)."""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
import time
from pathlib import Path
from types import ModuleType

import pytest
from lab.faults import (
    POLICY_PATH,
    SOCKET,
    containerd_serving,
    make_directory_at,
    records,
    sighup_containerd,
    wait_for,
)
from lab.node import Node
from lab.package import bare_node as lab_bare_node
from lab.package import build_packages

from nodemedic.report import RecordKind

pytestmark = pytest.mark.system
REPO = Path(__file__).resolve().parents[2]
BUILD_SCRIPT = REPO / "packaging" / "build.py"
RULE = "socket-path-is-directory"
UNIT = "nodemedic.service"
# The exposure `systemd-analyze security` gives the hardened unit (docs/packaging.md); a change to
# the unit that weakens it fails here.
MAX_EXPOSURE = 1.2
CATALOG = REPO / "packaging" / "nodemedic.catalog"
CATALOG_IDS = tuple(kind.message_id for kind in RecordKind)
# Fields every record of a kind carries: a catalog entry may use only these (journalctl prints a
# missing field's bare name).
SURE_FIELDS = {
    "DAEMON": set(),
    "ERROR": set(),
    "DETECTED": {"RULE", "MODE", "INCIDENT"},
    "DECIDED": {"RULE", "OUTCOME"},
    "ACTION": {"RULE", "MODE", "INCIDENT", "ACTION", "OUTCOME"},
    "OUTCOME": {"RULE", "MODE", "INCIDENT", "OUTCOME"},
    "ESCALATED": {"RULE", "OUTCOME"},
}


@pytest.fixture(scope="module")
def packages() -> dict[str, str]:
    return build_packages()


@pytest.fixture(scope="module")
def build_tools() -> ModuleType:
    """packaging/build.py as a module (its interpreter finder), loaded by path: `packaging` is
    also the name of a PyPI library."""
    spec = importlib.util.spec_from_file_location("nodemedic_packaging_build", BUILD_SCRIPT)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def bare_node(node: Node) -> None:
    """lab/package.py's bare node, checked: the package alone will provide nodemedic."""
    lab_bare_node(node)
    assert node.sh("command -v nodemedic", check=False).returncode != 0


def put(node: Node, package: str) -> str:
    """Copy a package file into the node; returns its path there."""
    target = f"/root/{Path(package).name}"
    shutil.copyfile(package, node.root / target.lstrip("/"))
    return target


def dpkg(node: Node, *args: str) -> tuple[subprocess.CompletedProcess[str], float]:
    start = time.monotonic()
    done = node.run("dpkg", *args, timeout=180)
    return done, time.monotonic() - start


API_POLICY = "/usr/share/dbus-1/system.d/io.nodemedic1.conf"
ALERT_RULES = "/usr/share/nodemedic/prometheus/nodemedic-alerts.yml"


def _api_version(node: Node) -> str:
    got = node.run(
        "busctl",
        "get-property",
        "io.nodemedic1",
        "/io/nodemedic1",
        "io.nodemedic1.Manager",
        "Version",
        check=False,
    )
    return got.stdout if got.returncode == 0 else ""


def exists(node: Node, path: str) -> bool:
    return node.sh(f"test -e {path} || test -L {path}", check=False).returncode == 0


def test_deb_installs_repairs_upgrades_and_purges(
    node: Node, packages: dict[str, str], tmp_path: Path
) -> None:
    bare_node(node)
    deb = put(node, packages["deb"])
    _, install_seconds = dpkg(node, "-i", deb)
    print(f"\ndpkg -i {Path(deb).name} ({packages['deb_bytes']} bytes): {install_seconds:.1f}s")

    # postinst enabled and started it; Type=notify: active means nodemedic said READY=1.
    assert node.unit_property(UNIT, "ActiveState") == "active"
    assert node.unit_property(UNIT, "UnitFileState") == "enabled"
    # Debian 12's systemd names /usr/lib/systemd/system by its /lib alias (usrmerge)
    assert node.unit_property(UNIT, "FragmentPath").endswith("/lib/systemd/system/nodemedic.service")
    assert re.fullmatch(r"watching \d+ rule\(s\)", node.unit_property(UNIT, "StatusText"))
    wait_for(lambda: node.unit_property(UNIT, "WatchdogTimestampMonotonic") not in ("", "0"), 10,
             "a watchdog ping")  # fmt: skip
    assert (
        node.run("nodemedic", "--version").stdout.strip()
        == f"nodemedic {packages['version'].rsplit('-', 1)[0]}"
    )
    [started] = records(node, kind="daemon", outcome="started")
    assert started["NODEMEDIC_MODE"] == "enforce"
    # the D-Bus API, under the shipped bus policy: anyone may read
    assert exists(node, API_POLICY)
    assert exists(node, ALERT_RULES), "the shipped Prometheus alert rules"
    wait_for(lambda: _api_version(node).startswith("s "), 10, "the D-Bus API's Version property")

    verify = node.run("systemd-analyze", "verify", "/usr/lib/systemd/system/nodemedic.service", check=False)
    assert (verify.returncode, verify.stdout + verify.stderr) == (0, ""), "systemd-analyze verify is clean"
    security = node.run("systemd-analyze", "security", "--no-pager", UNIT).stdout
    score = float(re.search(r"Overall exposure level for \S+: ([0-9.]+)", security).group(1))  # type: ignore[union-attr]
    print(f"systemd-analyze security {UNIT}: {score}")
    assert score <= MAX_EXPOSURE, security

    # The incident, repaired by the installed package under the hardened unit.
    sighup_containerd(node)
    make_directory_at(node, SOCKET)
    wait_for(lambda: records(node, rule=RULE, outcome="repaired"), 30, "the 'repaired' record")
    assert containerd_serving(node)
    # A directory holding other users' folders and files (0700/0600): the capabilities the unit
    # keeps (DAC_OVERRIDE, DAC_READ_SEARCH, FOWNER) are what lets nodemedic quarantine it.
    sighup_containerd(node)
    # Made aside, then renamed into place at once: nodemedic acts the moment the directory appears.
    prep = "/run/containerd/prep"
    node.sh(f"mkdir -p {prep}/pod/sticky && echo secret > {prep}/pod/data "
            f"&& echo mine > {prep}/pod/sticky/other && chown -R 1000:1000 {prep}/pod "
            f"&& chmod 1777 {prep}/pod/sticky && chmod 0600 {prep}/pod/data && chmod 0700 {prep}/pod "
            f"&& rm -f {SOCKET} && mv -T {prep} {SOCKET}")  # fmt: skip
    wait_for(lambda: len(records(node, rule=RULE, outcome="repaired")) == 2, 30, "the second repair")
    assert containerd_serving(node)
    [kept] = node.sh("ls -d /var/lib/nodemedic/quarantine/*-containerd.sock").stdout.split()
    assert node.sh(f"cat {kept}/pod/data").stdout == "secret\n"
    assert node.sh(f"stat -c %u:%a {kept}/pod").stdout.strip() == "0:700"
    assert not [n for n in node.sh("ls -A /run/containerd").stdout.split() if "nodemedic" in n]

    # journalctl -x explains each record with the catalog, fields filled in.
    explained = node.run("journalctl", "-x", "-u", UNIT, "--no-pager").stdout
    assert "nodemedic action remove-socket-dir: done" in explained
    assert "copy what you need back from the quarantine folder" in explained
    assert f"nodemedic incident repaired (rule {RULE})" in explained
    assert f"nodemedic decided: repair (rule {RULE})" in explained
    assert not re.search(r"NODEMEDIC_(RULE|MODE|INCIDENT|ACTION|OUTCOME)\b(?!=)", explained), (
        "unfilled fields"
    )

    # Upgrade to a rebuilt package whose shipped policy changed too: the operator's edit survives.
    node.sh(f"echo '# tuned by the operator' >> {POLICY_PATH}")
    shipped = (REPO / "policy" / "policy.toml").read_text()
    new_policy = tmp_path / "policy.toml"
    new_policy.write_text(shipped + "\n# shipped with release 2\n")
    upgrade = build_packages("--release", "2", "--policy", str(new_policy))
    pid_before = node.unit_property(UNIT, "MainPID")
    _, upgrade_seconds = dpkg(node, "--force-confold", "-i", put(node, upgrade["deb"]))
    print(f"dpkg -i (upgrade to {upgrade['version']}): {upgrade_seconds:.1f}s")
    assert node.run("dpkg-query", "-W", "-f", "${Version}", "nodemedic").stdout == upgrade["version"]
    assert node.run("cat", POLICY_PATH).stdout.endswith("# tuned by the operator\n")
    assert "# shipped with release 2" in node.run("cat", f"{POLICY_PATH}.dpkg-dist").stdout
    assert node.unit_property(UNIT, "ActiveState") == "active"
    assert node.unit_property(UNIT, "MainPID") != pid_before, "postinst restarted it on the new code"
    assert len(records(node, kind="daemon", outcome="started")) == 2

    # Removal stops it and keeps the conffile and the state; purge removes them (not a quarantine
    # that holds something).
    dpkg(node, "-r", "nodemedic")
    assert node.unit_property(UNIT, "LoadState") == "not-found"
    assert node.unit_property(UNIT, "ActiveState") in ("inactive", "failed")
    for gone in (
        "/usr/bin/nodemedic",
        "/opt/nodemedic",
        "/usr/lib/systemd/system/nodemedic.service",
        API_POLICY,
        ALERT_RULES,
    ):
        assert not exists(node, gone), gone
    assert exists(node, POLICY_PATH)
    assert exists(node, "/var/lib/nodemedic/state.json")
    catalog = node.run("journalctl", "--list-catalog").stdout
    assert not any(i in catalog for i in CATALOG_IDS), "the catalog entries went with the package"
    done, _ = dpkg(node, "--purge", "nodemedic")
    assert "kept /var/lib/nodemedic/quarantine" in done.stderr
    for gone in ("/etc/nodemedic", "/var/lib/nodemedic/state.json", "/var/lib/nodemedic/journal.cursor",
                 "/etc/systemd/system/multi-user.target.wants/nodemedic.service"):  # fmt: skip
        assert not exists(node, gone), gone
    assert node.sh(f"cat {kept}/pod/data").stdout == "secret\n"
    assert node.run("dpkg-query", "-W", "nodemedic", check=False).returncode != 0


def test_catalog_explains_every_record_kind_with_fields_it_has() -> None:
    entries = dict(re.findall(r"^-- ([0-9a-f]{32})\n(.*?)(?=^-- |\Z)", CATALOG.read_text(), re.M | re.S))
    assert sorted(entries) == sorted(CATALOG_IDS), "one entry per MESSAGE_ID nodemedic writes"
    for kind in RecordKind:
        text = entries[kind.message_id]
        assert re.search(r"^Subject: .+", text, re.M)
        assert "Defined-By: nodemedic" in text
        used = set(re.findall(r"@NODEMEDIC_([A-Z_]+)@", text))
        assert used <= SURE_FIELDS[kind.name], f"{kind.name} uses fields its records may lack: {used}"
        assert "undo" in text.lower() or "nothing" in text.lower(), f"{kind.name}: what changed, how to undo"


def test_rpm_metadata(packages: dict[str, str]) -> None:
    rpm = packages["rpm"]
    info = subprocess.run(["rpm", "-qip", rpm], capture_output=True, text=True, check=True).stdout
    version, release = packages["version"].rsplit("-", 1)
    assert re.search(r"^Name\s*: nodemedic$", info, re.M)
    assert re.search(rf"^Version\s*: {re.escape(version)}$", info, re.M)
    assert re.search(rf"^Release\s*: {release}$", info, re.M)
    assert re.search(r"^Architecture: x86_64$", info, re.M)
    assert re.search(r"^License\s*: Apache-2.0$", info, re.M)
    requires = subprocess.run(["rpm", "-qpR", rpm], capture_output=True, text=True, check=True).stdout
    for dep in ("systemd", "systemd-libs", "coreutils", "libstdc++", "(python3.12 or python3.11)"):
        assert dep in requires.splitlines(), f"requires {dep}"
    flags = subprocess.run(["rpm", "-qp", "--qf", "[%{FILEFLAGS:fflags} %{FILENAMES}\n]", rpm],
                           capture_output=True, text=True, check=True).stdout  # fmt: skip
    assert "cn /etc/nodemedic/policy.toml" in flags.splitlines(), "%config(noreplace)"
    scripts = subprocess.run(
        ["rpm", "-qp", "--scripts", rpm], capture_output=True, text=True, check=True
    ).stdout
    assert all(
        s in scripts for s in ("postinstall scriptlet", "preuninstall scriptlet", "postuninstall scriptlet")
    )


def test_rpm_in_a_scratch_root_runs_on_each_python(
    packages: dict[str, str], build_tools: ModuleType, tmp_path: Path
) -> None:
    root = tmp_path / "root"
    # --noscripts: the scratch root has no shell or systemd to run them (the .deb test runs them).
    subprocess.run(["rpm", "--root", str(root), "--dbpath", "/var/lib/rpm", "-i", "--nodeps", "--noscripts",
                    packages["rpm"]], check=True, capture_output=True, text=True)  # fmt: skip
    installed = subprocess.run(["rpm", "--root", str(root), "--dbpath", "/var/lib/rpm", "-q", "nodemedic"],
                               capture_output=True, text=True, check=True).stdout  # fmt: skip
    assert installed.strip() == f"nodemedic-{packages['version']}.x86_64"
    launcher = root / "usr/bin/nodemedic"
    policy = root / "etc/nodemedic/policy.toml"
    for version in ("3.11", "3.12"):  # RHEL 9's python3.11 and python3.12
        python = build_tools.find_python(version)
        env = {"PATH": "/usr/bin:/bin", "NODEMEDIC_PYTHON": str(python)}
        out = subprocess.run(
            [str(launcher), "--version"], env=env, capture_output=True, text=True, check=True
        )
        assert out.stdout.strip() == f"nodemedic {packages['version'].rsplit('-', 1)[0]}"
        check = subprocess.run([str(launcher), "check", str(policy)], env=env, capture_output=True, text=True,
                               check=True)  # fmt: skip
        assert re.search(r"valid, \d+ rule\(s\), mode enforce", check.stdout)
    # A Python it has no tree for (or none at all) is refused with what to install.
    env = {"PATH": "/usr/bin:/bin", "NODEMEDIC_PYTHON": "/nonexistent/python3.10"}
    missing = subprocess.run(
        [str(launcher), "--version"], capture_output=True, text=True, check=False, env=env
    )
    assert missing.returncode == 127
    assert "install python3.12, python3.11 or python3.10" in missing.stderr


def test_rpm_scriptlets_on_a_node(node: Node, packages: dict[str, str]) -> None:
    """The .rpm's own scriptlets, run in a node the way rpm runs them (%post 1, %preun 0, %postun 0),
    with its files put in place by the host's rpm (the node has no rpm of its own)."""
    bare_node(node)
    rpm = ["rpm", "--root", str(node.root), "--dbpath", "/var/lib/rpm"]
    subprocess.run([*rpm, "-i", "--nodeps", "--noscripts", packages["rpm"]], check=True, capture_output=True)

    def scriptlet(tag: str, arg: str) -> None:
        script = subprocess.run(["rpm", "-qp", "--qf", f"%{{{tag}}}", packages["rpm"]], capture_output=True,
                                text=True, check=True).stdout  # fmt: skip
        node.run("/bin/sh", "-c", script, "sh", arg, timeout=60)

    scriptlet("POSTIN", "1")
    assert node.unit_property(UNIT, "ActiveState") == "active"
    assert node.unit_property(UNIT, "UnitFileState") == "enabled"
    assert (
        "nodemedic detected a fault"
        in node.run("journalctl", "--list-catalog").stdout + node.run("journalctl", "--dump-catalog").stdout
    )
    scriptlet("PREUN", "0")
    assert node.unit_property(UNIT, "ActiveState") in ("inactive", "failed")
    assert node.unit_property(UNIT, "UnitFileState") == "disabled"
    subprocess.run([*rpm, "-e", "--noscripts", "nodemedic"], check=True, capture_output=True)
    scriptlet("POSTUN", "0")
    assert node.unit_property(UNIT, "LoadState") == "not-found"
    assert not exists(node, "/opt/nodemedic")
    assert not exists(node, "/usr/bin/nodemedic")
    assert exists(node, POLICY_PATH + ".rpmsave") or not exists(node, POLICY_PATH)


def test_deb_tree_runs_on_python_3_10(
    packages: dict[str, str], build_tools: ModuleType, tmp_path: Path
) -> None:
    """Ubuntu 22.04's Python: only the .deb ships a 3.10 tree."""
    subprocess.run(["dpkg-deb", "-x", packages["deb"], str(tmp_path)], check=True)
    python = build_tools.find_python("3.10")
    env = {"PATH": "/usr/bin:/bin", "NODEMEDIC_PYTHON": str(python)}
    launcher, policy = tmp_path / "usr/bin/nodemedic", tmp_path / "etc/nodemedic/policy.toml"
    check = subprocess.run([str(launcher), "check", str(policy)], env=env, capture_output=True, text=True,
                           check=True)  # fmt: skip
    assert re.search(r"valid, \d+ rule\(s\)", check.stdout)
    tree = tmp_path / "opt/nodemedic/lib/python3.10"
    probe = (f"import sys; sys.path.insert(0, {str(tree)!r}); import systemd.journal, systemd.daemon, hpack, "
             "pydantic_core, dbus_fast; print(systemd.journal.__file__)")  # fmt: skip
    out = subprocess.run([str(python), "-I", "-c", probe], capture_output=True, text=True, check=True).stdout
    assert out.startswith(str(tree / "systemd"))
