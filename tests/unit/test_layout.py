"""The layout shows the architecture, and stays that way (issue 10 items 4 and 7).

Data flows one way: sources -> core -> executor -> actions, with policy/ beside and a foundation of
small modules under all of them. These tests read src/nodemedic with ``ast`` (nothing is imported)
and name every offender as file:line, so one run lists all there is to fix.
"""

from __future__ import annotations

import ast
import io
import tokenize
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit
SRC = Path(__file__).parents[2] / "src"
PACKAGE = SRC / "nodemedic"

# ---- import direction ---------------------------------------------------------------------------

# The small modules every layer may use. nodemedic.__version__ is the package's one attribute.
FOUNDATION = (
    "nodemedic.__version__",
    "nodemedic.errors",
    "nodemedic.events",
    "nodemedic.ports",
    "nodemedic.clock",
    "nodemedic.store",
    "nodemedic.fs",
    "nodemedic.procfs",
    "nodemedic.configs",
    "nodemedic.report",
    "nodemedic.backoff",
)
POLICY = ("nodemedic.policy",)

# layer: the modules (or packages) that make it up. A module in none of them is an offender too:
# a new package takes a conscious place here.
LAYERS: dict[str, tuple[str, ...]] = {
    "foundation": FOUNDATION,
    "policy": POLICY,
    "sources": ("nodemedic.sources",),
    "core": ("nodemedic.core",),
    "actions": ("nodemedic.actions",),
    "executor": ("nodemedic.executor",),
    "wiring": ("nodemedic.app", "nodemedic.daemon", "nodemedic.cli", "nodemedic.__main__"),
    "tools": ("nodemedic.tools", "nodemedic.api", "nodemedic.snapshot", "nodemedic.metrics"),
}

# layer: what of nodemedic it may import (a module, a package, or one name of a module).
MAY_IMPORT: dict[str, tuple[str, ...]] = {
    "foundation": FOUNDATION,
    "policy": (*FOUNDATION, *POLICY),
    "sources": (*FOUNDATION, *POLICY, "nodemedic.sources"),
    # The pure core: no report sink, no store, no /proc, no config reading; backoff is arithmetic.
    "core": (
        "nodemedic.events",
        "nodemedic.ports",
        "nodemedic.errors",
        "nodemedic.backoff",
        "nodemedic.report.RecordKind",
        *POLICY,
        "nodemedic.core",
    ),
    "actions": (*FOUNDATION, *POLICY, "nodemedic.actions"),
    "executor": (*FOUNDATION, *POLICY, "nodemedic.core", "nodemedic.actions", "nodemedic.executor"),
    "wiring": ("nodemedic",),
    # the operator's tools read what the daemon knows (its status, the API) and reuse its parts
    "tools": ("nodemedic",),
}

# What the core may not import from outside nodemedic: anything that reads or writes the world,
# sleeps or reads the clock. The core gets the time and the node as arguments.
CORE_FORBIDDEN = (
    "asyncio",
    "os",
    "subprocess",
    "socket",
    "time",
    "threading",
    "pathlib",
    "shutil",
    "signal",
    "select",
    "selectors",
    "io",
    "tempfile",
    "fcntl",
    "multiprocessing",
    "concurrent",
    "dbus_fast",
    "systemd",
    "asyncinotify",
)

# ---- the other rules ----------------------------------------------------------------------------

MAX_FUNCTION_LINES = 40  # from `def` to its last line, after `ruff format`
WIRING_FILES = {"cli.py"}  # the only file that may exit the process

# `# fmt: skip` only where a table really reads better than ruff's layout: "path:the line's code
# (stripped, without the comment)": why. At most a handful.
FMT_SKIP_ALLOWED: dict[str, str] = {}
MAX_FMT_SKIPS = 5


@dataclass(frozen=True)
class Module:
    """One source file of the package, parsed."""

    path: Path
    name: str  # dotted: nodemedic.core.rules
    text: str
    tree: ast.Module

    @property
    def rel(self) -> str:
        return str(self.path.relative_to(SRC.parent))

    def at(self, node: ast.AST | int) -> str:
        line = node if isinstance(node, int) else getattr(node, "lineno", 0)
        return f"{self.rel}:{line}"


@cache
def modules() -> tuple[Module, ...]:
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(SRC).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        text = path.read_text(encoding="utf-8")
        found.append(Module(path, name, text, ast.parse(text, str(path))))
    return tuple(found)


def _within(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def layer_of(name: str) -> str | None:
    for layer, members in LAYERS.items():
        if _within(name, members):
            return layer
    return None


def imported(module: Module) -> Iterator[tuple[ast.AST, str]]:
    """Every name the module imports, dotted in full (``from a import b`` gives ``a.b``), with
    relative imports resolved; imports inside functions and ``if TYPE_CHECKING:`` count too."""
    package = module.name if module.path.name == "__init__.py" else module.name.rpartition(".")[0]
    for node in ast.walk(module.tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node, alias.name
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, *([base] if base else [])])
            if base == "__future__":
                continue
            for alias in node.names:
                yield node, f"{base}.{alias.name}"


def test_every_module_has_a_layer() -> None:
    offenders = [
        f"{m.rel}: {m.name} is in no layer of LAYERS"
        for m in modules()
        if m.name != "nodemedic" and layer_of(m.name) is None
    ]
    assert not offenders, "place each module in a layer (or remove it):\n" + "\n".join(offenders)


def test_imports_run_one_way() -> None:
    offenders = []
    for m in modules():
        layer = layer_of(m.name)
        if layer is None:
            continue  # reported by test_every_module_has_a_layer
        for node, name in imported(m):
            if name.split(".")[0] == "nodemedic" and not _within(name, MAY_IMPORT[layer]):
                offenders.append(f"{m.at(node)}: {layer} module {m.name} imports {name}")
    assert not offenders, "imports that run against the layers:\n" + "\n".join(offenders)


def test_the_core_imports_nothing_that_does_io() -> None:
    offenders = [
        f"{m.at(node)}: {m.name} imports {name}"
        for m in modules()
        if layer_of(m.name) == "core"
        for node, name in imported(m)
        if name.split(".")[0] in CORE_FORBIDDEN
    ]
    assert not offenders, "the core takes the world as arguments; it imports no I/O:\n" + "\n".join(offenders)


def test_module_names_are_unique() -> None:
    where: defaultdict[str, list[str]] = defaultdict(list)
    for m in modules():
        if m.path.stem not in ("__init__", "__main__"):
            where[m.path.stem].append(f"{m.rel}:1")
    offenders = [f"{stem}: {', '.join(paths)}" for stem, paths in sorted(where.items()) if len(paths) > 1]
    assert not offenders, "modules named alike (rename one):\n" + "\n".join(offenders)


def test_functions_are_short() -> None:
    offenders = [
        f"{m.at(node)}: {node.name} is {length} lines"
        for m in modules()
        for node in ast.walk(m.tree)
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        and (length := (node.end_lineno or node.lineno) - node.lineno + 1) > MAX_FUNCTION_LINES
    ]
    assert not offenders, (
        f"functions over {MAX_FUNCTION_LINES} lines (split them into well-named parts):\n"
        + "\n".join(offenders)
    )


def _format_escapes(m: Module) -> Iterator[tuple[int, str]]:
    """Comments that turn ruff format off: ``# fmt: skip``, ``# fmt: off`` (only real comments)."""
    lines = m.text.splitlines()
    for token in tokenize.generate_tokens(io.StringIO(m.text).readline):
        if token.type == tokenize.COMMENT and token.string.lstrip("# ").startswith(("fmt: skip", "fmt: off")):
            row = token.start[0]
            yield row, f"{m.rel}:{lines[row - 1][: token.start[1]].strip()}"


def test_no_fmt_skip() -> None:
    assert len(FMT_SKIP_ALLOWED) <= MAX_FMT_SKIPS, "keep # fmt: skip for a handful of tables at most"
    assert all(why.strip() for why in FMT_SKIP_ALLOWED.values()), "say why each one reads better"
    offenders = [
        f"{m.rel}:{row}" for m in modules() for row, key in _format_escapes(m) if key not in FMT_SKIP_ALLOWED
    ]
    assert not offenders, (
        "ruff format turned off (drop the comment and let ruff lay it out, or list a real table "
        "in FMT_SKIP_ALLOWED with why):\n" + "\n".join(offenders)
    )


def _is_exit(node: ast.AST) -> bool:
    """SystemExit named anywhere (raised, caught, referred to), or sys.exit."""
    if isinstance(node, ast.Name):
        return node.id == "SystemExit"
    return (
        isinstance(node, ast.Attribute)
        and node.attr in ("SystemExit", "exit")
        and isinstance(node.value, ast.Name)
        and node.value.id in ("sys", "builtins")
    )


def test_only_the_command_line_exits() -> None:
    offenders = [
        f"{m.at(node)}: {ast.unparse(node)}"
        for m in modules()
        if m.path.name not in WIRING_FILES or m.path.parent != PACKAGE
        for node in ast.walk(m.tree)
        if _is_exit(node)
    ]
    assert not offenders, (
        "SystemExit outside cli.py (library code raises a nodemedic.errors "
        "error; cli.py turns it into an exit status):\n" + "\n".join(offenders)
    )
