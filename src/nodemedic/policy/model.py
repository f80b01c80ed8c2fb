"""The policy's models. Every field's docstring becomes the policy reference (docs/policy.md).

A policy is a ``[daemon]`` table and ``[[rule]]`` tables. A rule says when to look (its triggers),
whether to act (its confirm condition, checked against the real state at decision time) and what to do
(its ordered actions).
"""

from __future__ import annotations

import re
import signal as signals
from abc import ABC, abstractmethod
from collections import Counter
from pathlib import Path
from typing import Annotated, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from nodemedic.events import (
    Event,
    FdUsage,
    FileChanged,
    GrpcStreamsSetting,
    JournalLine,
    OomKills,
    PathChanged,
    PathKind,
    PressureSeen,
    ProbeFailed,
    SignalSeen,
    SocketModeSeen,
    UnitChanged,
    VersionSeen,
)
from nodemedic.policy.actions import ActionSpec
from nodemedic.policy.duration import Duration, Interval, PositiveDuration
from nodemedic.policy.paths import AbsoluteDir, AbsolutePath, absolute_path
from nodemedic.policy.patterns import Regex
from nodemedic.policy.placeholder import PlaceholderSettings
from nodemedic.policy.sighup import SighupSettings
from nodemedic.policy.signals import Signal

Mode = Literal["enforce", "observe"]
RULE_NAME = r"^[a-z0-9][a-z0-9-]{0,62}$"


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)


class ProbeSettings(Strict):
    """containerd's liveness probe: a real request (its Version API) over its socket."""

    socket: AbsolutePath = "/run/containerd/containerd.sock"
    """containerd's main gRPC socket."""
    interval: Interval = 5.0
    """Time between two requests."""
    timeout: PositiveDuration = 2.0
    """How long one request may take before it counts as failed."""


class ConfigBackup(Strict):
    """Last-known-good copies of containerd's config, for ``restore-config``."""

    path: AbsolutePath = "/etc/containerd/config.toml"
    """containerd's config file."""
    unit: str = "containerd.service"
    """The unit that loads it; followed over D-Bus, so it must be in ``[daemon].watch_units``."""
    settle: Duration = 60.0
    """How long containerd must have run healthy with a content before a copy of it is kept."""
    keep: int = Field(default=5, ge=1)
    """How many copies are kept (content-addressed, under ``<state_dir>/config-good``)."""


class ResourceSettings(Strict):
    """The resource watcher, which serves the ``fds``, ``pressure``, ``oom``, ``socket-mode``,
    ``version`` and ``grpc-streams`` triggers: one periodic reading of each check some rule uses,
    and none while no rule uses one."""

    interval: Interval = 5.0
    """Time between two readings."""
    unit: str = "containerd.service"
    """The unit whose main process (file descriptors) and cgroup (pressure, OOM kills) are read;
    its MainPID is learnt over D-Bus, so it must be in ``[daemon].watch_units``."""


class RepairBudget(Strict):
    """A ceiling on repairs across all rules, whatever each rule's own backoff and breaker allow."""

    repairs: int = Field(default=10, ge=1)
    """At most this many repairs (enforce mode, all rules together)..."""
    window: PositiveDuration = 3600.0
    """...within this sliding window. Beyond it nodemedic only reports, and says so."""


class MetricsSettings(Strict):
    """Prometheus metrics for the fleet, in node-exporter's textfile format: no socket is opened
    (nodemedic runs with ``PrivateNetwork=yes``); node-exporter's textfile collector serves the file.
    docs/operations.md ("The fleet: metrics") says which metric answers which question."""

    enabled: bool = True
    """Write ``nodemedic.prom``. A folder missing or not writable is said once and tried again at
    each interval; nodemedic runs on either way."""
    textfile_dir: AbsoluteDir = Path("/var/lib/prometheus/node-exporter")
    """The textfile collector's folder (node-exporter's ``--collector.textfile.directory``; this is
    Debian's default). Another folder needs a drop-in with ``ReadWritePaths=`` for it."""
    interval: Interval = 15.0
    """The file is written at each change (at most once a second) and at least this often, so its
    age (node-exporter's ``node_textfile_mtime_seconds``) shows a nodemedic that no longer runs."""


class DaemonSettings(Strict):
    """Settings of the daemon as a whole."""

    mode: Mode = "enforce"
    """``enforce`` repairs; ``observe`` reports what would be done and touches nothing."""

    state_dir: AbsoluteDir = Path("/var/lib/nodemedic")
    """Where nodemedic keeps its state (journal cursor) and the quarantine."""

    quarantine_dir: AbsoluteDir | None = None
    """Where moved-aside files go; default ``<state_dir>/quarantine``. Never emptied by nodemedic."""

    watch_units: list[str] = Field(default=["containerd.service", "kubelet.service"])
    """systemd units whose state changes are followed over D-Bus."""

    journal_units: list[str] = Field(default=["containerd.service"])
    """Units whose own journal lines, and systemd's lines about them, are followed. ``"kernel"`` (not a
    unit) follows the kernel's own lines: OOM kills, SELinux and AppArmor denials."""

    budget: RepairBudget = RepairBudget()
    """The global repair budget."""

    probe: ProbeSettings = ProbeSettings()
    """The containerd probe used by ``source = "probe"`` triggers."""

    config_backup: ConfigBackup = ConfigBackup()
    """Last-known-good copies of containerd's config."""

    resources: ResourceSettings = ResourceSettings()
    """The resource watcher used by ``fds``, ``pressure``, ``oom``, ``socket-mode``, ``version`` and
    ``grpc-streams`` triggers."""

    metrics: MetricsSettings = MetricsSettings()
    """Prometheus metrics, written for node-exporter's textfile collector."""

    @property
    def quarantine(self) -> Path:
        return self.quarantine_dir or self.state_dir / "quarantine"


class TriggerModel(Strict, ABC):
    """What every trigger carries: the source that serves it (``served_by``), what it asks of that
    source (``wants``) and whether an event fires it (``fires``). A new kind of trigger is one
    subclass, added to the ``Trigger`` union."""

    served_by: ClassVar[str]  # inotify, journal, dbus, probe, files or resources

    @abstractmethod
    def fires(self, event: Event) -> str | None:
        """What fired, in a few words for the record, if ``event`` fires this trigger."""

    @abstractmethod
    def wants(self) -> frozenset[str]:
        """What the serving source must follow for this trigger: paths, files, units or checks."""

    def reads(self, event: Event) -> bool:
        """Is ``event`` a reading of the check this trigger looks at? Only the resource watcher's
        triggers read a check (``ResourceTrigger``); no event is a reading for any other."""
        return False


class ResourceTrigger(TriggerModel):
    """A trigger on one of the resource watcher's periodic readings (sources/resources.py)."""

    served_by: ClassVar[str] = "resources"

    @abstractmethod
    def reads(self, event: Event) -> bool:
        """Is ``event`` a reading of the check this trigger looks at (whether it fires or not)?
        Only such a reading can say that an incident of this trigger is over."""


class PathTrigger(TriggerModel):
    """Fires when one of ``paths`` is found to be of ``kind`` (inotify, and once at start-up)."""

    served_by: ClassVar[str] = "inotify"
    source: Literal["path"]
    paths: list[str] = Field(min_length=1)
    """Absolute paths to watch; their parent directories may be missing or recreated."""
    kind: PathKind
    """The kind that fires, as found by lstat (a symlink is ``symlink``, never its target's kind)."""

    @field_validator("paths")
    @classmethod
    def _absolute(cls, paths: list[str]) -> list[str]:
        for p in paths:
            absolute_path(p)
        return paths

    def fires(self, event: Event) -> str | None:
        if isinstance(event, PathChanged) and event.path in self.paths and event.kind == self.kind:
            return f"{event.path} is a {event.kind.value}"
        return None

    def wants(self) -> frozenset[str]:
        return frozenset(self.paths)


class JournalTrigger(TriggerModel):
    """Fires when a journal line from or about ``unit`` matches ``pattern`` (an RE2 regex)."""

    served_by: ClassVar[str] = "journal"
    source: Literal["journal"]
    pattern: Regex
    """Regular expression searched in the first 8 KiB of the MESSAGE field; compiled with RE2 when
    the policy loads (Python syntax, less backreferences and lookarounds; matching takes time linear
    in the line). Anchor it to the line's shape (``^containerd: ...``): an unanchored pattern also
    fires on a line that merely quotes the text, such as a pod's command echoed in an error."""
    unit: str = "containerd.service"
    """The unit whose lines (and systemd's lines about it) are searched; ``"kernel"``: the kernel's."""

    def fires(self, event: Event) -> str | None:
        if isinstance(event, JournalLine) and event.unit == self.unit and self.pattern.search(event.message):
            return f"journal: {event.message}"
        return None

    def wants(self) -> frozenset[str]:
        return frozenset({self.unit})


def in_states(seen: UnitChanged, active_state: list[str], sub_state: list[str]) -> bool:
    """A unit's state against wanted ActiveState and SubState values (an empty list means any)."""
    return (not active_state or seen.active_state in active_state) and (
        not sub_state or seen.sub_state in sub_state
    )


class UnitTrigger(TriggerModel):
    """Fires when a watched unit enters one of the given states (D-Bus PropertiesChanged)."""

    served_by: ClassVar[str] = "dbus"
    source: Literal["unit"]
    unit: str
    """The unit whose state changes fire; only units listed in ``[daemon].watch_units`` are followed."""
    active_state: list[str] = Field(default_factory=list)
    """ActiveState values that fire, e.g. ["failed"]; empty means any."""
    sub_state: list[str] = Field(default_factory=list)
    """SubState values that fire, e.g. ["auto-restart"]; empty means any."""

    def fires(self, event: Event) -> str | None:
        if not isinstance(event, UnitChanged) or event.unit != self.unit:
            return None
        if in_states(event, self.active_state, self.sub_state):
            return f"{event.unit} is {event.active_state}/{event.sub_state}"
        return None

    def wants(self) -> frozenset[str]:
        return frozenset({self.unit})


class ProbeTrigger(TriggerModel):
    """Fires when containerd has not answered a real request (its Version API over the socket)
    ``failures`` times in a row. The probe runs every ``[daemon.probe].interval``, and only while
    some rule has a probe trigger."""

    served_by: ClassVar[str] = "probe"
    source: Literal["probe"]
    failures: int = Field(default=3, ge=1)
    """Consecutive failed requests that fire (and each further one, while it lasts)."""

    def fires(self, event: Event) -> str | None:
        if isinstance(event, ProbeFailed) and event.consecutive >= self.failures:
            return f"containerd did not answer {event.consecutive} requests in a row: {event.error}"
        return None

    def wants(self) -> frozenset[str]:
        return frozenset({"probe"})


class FileTrigger(TriggerModel):
    """Fires when the file at ``path`` may have new content: written and closed, or renamed into place
    (inotify on its folder). Pair it with a confirm condition that reads the file (e.g.
    ``config_broken``): the event only says that something was written."""

    served_by: ClassVar[str] = "files"
    source: Literal["file"]
    path: str
    """An absolute path; its folder must exist when nodemedic starts."""
    settle: Duration = Field(default=0.0, le=60.0)
    """Decide only once the file has not been written again for this long (at most 1 min): each
    new write restarts the wait. A tool that writes the file in steps (the toolkit's runtime block:
    half, then the rest within ~100 ms) is judged on what it leaves, never on a half-written file;
    it adds ``settle`` to the repair's time. 0: decide at each write."""

    @field_validator("path")
    @classmethod
    def _absolute(cls, path: str) -> str:
        return absolute_path(path)

    def fires(self, event: Event) -> str | None:
        if isinstance(event, FileChanged) and event.path == self.path:
            return f"{event.path} was written"
        return None

    def wants(self) -> frozenset[str]:
        return frozenset({self.path})


class SignalTrigger(TriggerModel):
    """Fires when a unit's main process was killed by ``signal``: systemd reports over D-Bus
    ExecMainCode CLD_KILLED (or CLD_DUMPED) with that signal as ExecMainStatus."""

    served_by: ClassVar[str] = "dbus"
    source: Literal["signal"]
    unit: str = "containerd.service"
    """The unit whose main process is watched; it must be in ``[daemon].watch_units``."""
    signal: Signal = int(signals.SIGHUP)
    """The signal, by name ("SIGHUP", "HUP") or number."""

    def fires(self, event: Event) -> str | None:
        if isinstance(event, SignalSeen) and event.unit == self.unit and event.signal == self.signal:
            return f"{event.unit}'s main process {event.target_pid} was killed by signal {event.signal}"
        return None

    def wants(self) -> frozenset[str]:
        return frozenset({self.unit})


class FdTrigger(ResourceTrigger):
    """Fires when the watched unit's main process (``[daemon.resources].unit``) has more than
    ``fraction`` of its RLIMIT_NOFILE soft limit open: the entries of /proc/MainPID/fd against
    "Max open files" in /proc/MainPID/limits. Counting another process's fds needs CAP_SYS_PTRACE
    (see docs/operations.md)."""

    source: Literal["fds"]
    fraction: float = Field(default=0.8, gt=0.0, le=1.0)
    """Open descriptors over the soft limit that fire, e.g. 0.8 for 80 %."""

    def reads(self, event: Event) -> bool:
        return isinstance(event, FdUsage)

    def fires(self, event: Event) -> str | None:
        if not isinstance(event, FdUsage) or event.limit <= 0 or event.open <= self.fraction * event.limit:
            return None
        share = 100 * event.open / event.limit
        return (
            f"{event.unit}'s main process {event.pid} has {event.open} of {event.limit} file "
            f"descriptors open ({share:.0f} %)"
        )

    def wants(self) -> frozenset[str]:
        return frozenset({"fd"})


class PressureTrigger(ResourceTrigger):
    """Fires when a PSI average (the share of the last 10 s in which tasks waited for
    ``resource``) is at or above ``above`` percent: host-wide (/proc/pressure/RESOURCE) or in the
    watched unit's cgroup (RESOURCE.pressure)."""

    source: Literal["pressure"]
    resource: Literal["cpu", "memory", "io"]
    """Which resource's pressure."""
    scope: Literal["host", "containerd"] = "containerd"
    """``host``: the whole machine; ``containerd``: the cgroup of ``[daemon.resources].unit``."""
    line: Literal["some", "full"] = "some"
    """``some``: at least one task waited; ``full``: all non-idle tasks waited at once."""
    above: float = Field(default=40.0, ge=0.0, le=100.0)
    """The avg10 percentage that fires."""

    def reads(self, event: Event) -> bool:
        return isinstance(event, PressureSeen) and (event.scope, event.resource) == (
            self.scope,
            self.resource,
        )

    def fires(self, event: Event) -> str | None:
        if not isinstance(event, PressureSeen) or not self.reads(event):
            return None
        value = event.some_avg10 if self.line == "some" else event.full_avg10
        if value >= self.above:  # not "value < above": a NaN reading fires nothing
            where = "host" if event.scope == "host" else "containerd's cgroup"
            return f"{self.resource} pressure ({where}): {self.line} avg10={value:.2f} % >= {self.above:g} %"
        return None

    def wants(self) -> frozenset[str]:
        return frozenset({f"pressure:{self.scope}:{self.resource}"})


class OomTrigger(ResourceTrigger):
    """Fires when the kernel's OOM killer killed a process in the watched unit's cgroup: the
    ``oom_kill`` count in its memory.events grew since the previous reading. Needs the memory
    controller on that cgroup (without it there is no memory.events and this never fires)."""

    source: Literal["oom"]

    def reads(self, event: Event) -> bool:
        return isinstance(event, OomKills)

    def fires(self, event: Event) -> str | None:
        if isinstance(event, OomKills) and event.new > 0:
            return (
                f"the OOM killer killed {event.new} process(es) in {event.unit}'s cgroup "
                f"({event.total} in all)"
            )
        return None

    def wants(self) -> frozenset[str]:
        return frozenset({"oom"})


class SocketModeTrigger(ResourceTrigger):
    """Fires when a socket's permission bits or owner differ from what is expected (a path that is
    missing or not a socket is another rule's business and fires nothing here)."""

    source: Literal["socket-mode"]
    path: AbsolutePath = "/run/containerd/containerd.sock"
    """The socket to look at."""
    mode: str = "0660"
    """Its expected permission bits, in octal (containerd creates its socket 0660)."""
    uid: int = Field(default=0, ge=0)
    """Its expected owner (containerd's ``[grpc].uid``, 0 by default)."""
    gid: int = Field(default=0, ge=0)
    """Its expected group (containerd's ``[grpc].gid``, 0 by default)."""

    @field_validator("mode")
    @classmethod
    def _octal(cls, mode: str) -> str:
        if not re.fullmatch(r"0?[0-7]{3,4}", mode):
            raise ValueError(f'{mode!r} is not an octal permission mode like "0660"')
        return mode

    @property
    def bits(self) -> int:
        return int(self.mode, 8)

    def reads(self, event: Event) -> bool:
        return isinstance(event, SocketModeSeen) and event.path == self.path

    def fires(self, event: Event) -> str | None:
        if not isinstance(event, SocketModeSeen) or not self.reads(event):
            return None
        if (event.mode, event.uid, event.gid) == (self.bits, self.uid, self.gid):
            return None
        return (
            f"{event.path} is mode {event.mode:04o} owner {event.uid}:{event.gid}, "
            f"expected {self.bits:04o} {self.uid}:{self.gid}"
        )

    def wants(self) -> frozenset[str]:
        return frozenset({f"socket-mode:{self.path}"})


class KnownBug(Strict):
    """A range of containerd versions with a known bug: ``first`` <= version < ``fixed``."""

    first: str = Field(pattern=r"^\d+(\.\d+)*$")
    """The first affected version, e.g. "1.6.0"."""
    fixed: str | None = Field(default=None, pattern=r"^\d+(\.\d+)*$")
    """The first version without the bug, e.g. "1.6.38"; none: every later version is affected."""
    reason: str = Field(min_length=1)
    """What the bug is, for the operator (a CVE, an issue), written in the record."""


def version_tuple(version: str) -> tuple[int, ...]:
    """The leading numbers of a version: "1.6.20~ds1" -> (1, 6, 20); "v2.0.0-rc.1" -> (2, 0, 0)."""
    found = re.match(r"v?(\d+(?:\.\d+)*)", version.strip())
    return tuple(int(n) for n in found.group(1).split(".")) if found else ()


def known_bugs(bugs: list[KnownBug], version: str) -> list[KnownBug]:
    """The ranges ``version`` falls in (first <= version < fixed); none for an unparsable version."""
    seen = version_tuple(version)
    if not seen:
        return []

    def affects(bug: KnownBug) -> bool:
        return version_tuple(bug.first) <= seen and (bug.fixed is None or seen < version_tuple(bug.fixed))

    return [b for b in bugs if affects(b)]


class VersionTrigger(ResourceTrigger):
    """Fires when the version containerd reports over its Version API (asked once per reading, on
    ``[daemon.probe].socket``) falls in one of ``known_bugs``; once per version seen."""

    source: Literal["version"]
    known_bugs: list[KnownBug] = Field(min_length=1)
    """The affected ranges, each with its reason."""

    def reads(self, event: Event) -> bool:
        return isinstance(event, VersionSeen)

    def fires(self, event: Event) -> str | None:
        if not isinstance(event, VersionSeen):
            return None
        bugs = known_bugs(self.known_bugs, event.version)
        if not bugs:
            return None
        return f"containerd {event.version} has known bugs: " + "; ".join(b.reason for b in bugs)

    def wants(self) -> frozenset[str]:
        return frozenset({"version"})


class GrpcStreamsTrigger(ResourceTrigger):
    """Fires while containerd's config file sets ``[grpc] max_concurrent_streams`` (any value),
    read with the file's own checks (a regular file of at most 1 MiB, no symlink followed) and
    parsed again only when the file changed. No containerd release reads that key: its gRPC
    server (grpc-go) allows 2^32-1 streams per connection whatever the file says (checked in
    containerd's source, 1.6 to 2.x, and measured in the lab: 1.6.20 with the key at 2 answers a
    request on one connection that holds four live event streams). So the record tells an operator
    that a limit they believe in is not in effect and that stalled clients have another cause; a
    hang stays the probe rule's record. A file that is missing, unreadable or not TOML fires
    nothing here (the config rule's business)."""

    source: Literal["grpc-streams"]
    config: AbsolutePath = "/etc/containerd/config.toml"
    """containerd's config file (its ``--config``)."""

    def reads(self, event: Event) -> bool:
        return isinstance(event, GrpcStreamsSetting) and event.path == self.config

    def fires(self, event: Event) -> str | None:
        if not isinstance(event, GrpcStreamsSetting) or not self.reads(event) or not event.value:
            return None
        return (
            f"{event.path} sets [grpc] max_concurrent_streams = {event.value}, a key containerd does not "
            "read: its gRPC server has no stream limit, so this limit is not in effect"
        )

    def wants(self) -> frozenset[str]:
        return frozenset({f"grpc-streams:{self.config}"})


AnyTrigger = (
    PathTrigger
    | JournalTrigger
    | UnitTrigger
    | ProbeTrigger
    | SignalTrigger
    | FileTrigger
    | FdTrigger
    | PressureTrigger
    | OomTrigger
    | SocketModeTrigger
    | VersionTrigger
    | GrpcStreamsTrigger
)
Trigger = Annotated[AnyTrigger, Field(discriminator="source")]


class Confirm(Strict):
    """Whether to act, checked against the real state at decision time (not the event's word for it):
    a path's kind, that a unit was not stopped by an operator, that containerd really does not answer."""

    paths: list[AbsolutePath] = Field(default_factory=list)
    """Paths to check; the condition holds if any one of them is of ``kind``. Empty: no path check."""
    kind: PathKind | None = None
    """What one of ``paths`` must be found to be (the path itself, never a symlink's target)."""
    unit: str | None = None
    """A unit that must not have been stopped by someone else: after an operator's ``systemctl stop``
    (the unit is inactive and nodemedic did not stop it) the rule does not act, because nodemedic
    does not start what a human stopped. It acts again once the unit has been started."""
    config_broken: AbsolutePath | None = None
    """Act only if containerd would refuse this config file right now (``containerd config dump``)."""
    probe: bool = False
    """Act only if containerd does not answer a Version request right now (``[daemon.probe]``'s socket
    and timeout): a stale journal line or a probe failure that has passed leads to nothing."""
    orphaned_shims: bool = False
    """Act only if the triggering journal line names a left-over shim proven orphaned right now (the
    proof of the rule's ``kill-orphaned-shims`` action, with its settings, or its defaults if the rule
    has none), and once per process: shims serving containers, named at every containerd start, are
    decided silently. When the rule only reports (observe mode, a held rule, no kill), a process
    named again is not a new incident; in enforce mode one still there is a failed kill, tried again."""

    @model_validator(mode="after")
    def _paths_and_kind(self) -> Confirm:
        if bool(self.paths) != (self.kind is not None):
            raise ValueError("paths and kind go together: give both or neither")
        return self


class Conditions(Strict):
    """Further conditions, checked each time a trigger fires, before anything else is decided."""

    occurrences: int = Field(default=1, ge=1)
    """The rule's triggers must have fired this many times... (each source's report counts once:
    inotify, the journal and D-Bus may each report the same incident)"""
    within: PositiveDuration = 60.0
    """...within this window."""
    unit: str | None = None
    """A unit whose current state, as last reported over D-Bus, must match ``active_state`` and
    ``sub_state``; it must be in ``[daemon].watch_units``."""
    active_state: list[str] = Field(default_factory=list)
    """ActiveState values ``unit`` must be in, e.g. ["activating", "failed"]; empty means any."""
    sub_state: list[str] = Field(default_factory=list)
    """SubState values ``unit`` must be in, e.g. ["auto-restart"]; empty means any."""


class Backoff(Strict):
    """Delay before the next attempt after a failed repair: initial * factor^n, at most max."""

    initial: Duration = 5.0
    """Delay after the first failure."""
    factor: float = Field(default=2.0, ge=1.0, le=10.0)
    """Growth of the delay with each further failure."""
    max: Duration = 300.0
    """Longest delay."""
    jitter: float = Field(default=0.1, ge=0.0, le=1.0)
    """Each delay is shortened by a random fraction up to this, so a fleet does not retry in step."""


class Breaker(Strict):
    """Stops a rule that keeps failing, and hands over to a human.

    After ``failures`` failed repairs within ``window`` the breaker opens: nodemedic stops acting on the
    rule (it still observes and reports) and writes a record with the history of attempts. After
    ``cooldown`` one trial repair is allowed (half-open): success closes the breaker, failure opens it
    again. ``nodemedic reset RULE`` closes it by hand. The state survives a restart of nodemedic.
    """

    failures: int = Field(default=3, ge=1)
    """Failed repairs that open the breaker..."""
    window: PositiveDuration = 900.0
    """...when they fall within this window."""
    cooldown: PositiveDuration = 3600.0
    """How long the breaker stays open before one trial repair."""


class Rule(Strict):
    """A diagnosis and its repair."""

    name: Annotated[str, Field(pattern=RULE_NAME)]
    """Lower-case letters, digits and dashes; appears as NODEMEDIC_RULE in every record."""
    description: str = ""
    """One sentence for the operator: what fault this rule repairs."""
    advice: str = ""
    """What an operator can do about the fault, written in the rule's records (NODEMEDIC_DETAIL):
    for faults nodemedic only reports."""
    mode: Mode | None = None
    """Overrides ``[daemon].mode`` for this rule."""
    trigger: list[Trigger] = Field(min_length=1)
    """When to look: any trigger firing starts a decision."""
    when: Conditions = Conditions()
    """Further conditions on the triggers: how often, and in which state of a unit."""
    confirm: Confirm | None = None
    """Whether to act: re-checked against the real state before acting, so one incident reported by
    several sources leads to one repair, and a stale event leads to none."""
    action: list[ActionSpec] = Field(default_factory=list)
    """What to do, in order; the first failure stops the sequence. None: the rule only reports
    (NODEMEDIC_OUTCOME=reported), once per incident, as in observe mode."""
    backoff: Backoff = Backoff()
    """How long to wait before trying again after a failed repair."""
    breaker: Breaker = Breaker()
    """When to stop trying and ask for a human."""


class Policy(Strict):
    """A whole policy file."""

    daemon: DaemonSettings = DaemonSettings()
    """Settings of the daemon as a whole."""
    rule: list[Rule] = Field(default_factory=list)
    """The rules, each a diagnosis and its repair."""
    sighup: SighupSettings = SighupSettings()
    """SIGHUP storms against containerd: how they are seen and damped."""
    placeholder: PlaceholderSettings = PlaceholderSettings(mode="off")
    """A placeholder socket at containerd's socket paths whenever one goes missing (off if absent)."""

    @model_validator(mode="after")
    def _unique_names(self) -> Policy:
        counts = Counter(r.name for r in self.rule)  # linear: a policy file may hold 10,000 rules
        dupes = sorted(n for n, count in counts.items() if count > 1)
        if dupes:
            raise ValueError(f"rule names must be unique; repeated: {', '.join(dupes)}")
        return self

    @model_validator(mode="after")
    def _triggers_are_watched(self) -> Policy:
        """A trigger on a unit nodemedic does not follow would silently never fire."""
        problems = [problem for rule in self.rule for problem in self._unfollowed_units(rule)]
        watched = self.daemon.watch_units
        resources = self.daemon.resources.unit
        if self.resource_checks() and resources not in watched:
            problems.append(f"[daemon.resources].unit {resources} is not in [daemon].watch_units {watched}")
        if self.sighup.mode != "off" and self.sighup.unit not in watched:
            problems.append(f"[sighup].unit {self.sighup.unit} is not in [daemon].watch_units {watched}")
        if self.placeholder.mode != "off" and self.placeholder.unit not in watched:
            problems.append(
                f"[placeholder].unit {self.placeholder.unit} is not in [daemon].watch_units {watched}"
            )
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def _unfollowed_units(self, rule: Rule) -> list[str]:
        """The units ``rule``'s D-Bus and journal triggers, and its ``when``, name but nodemedic does
        not follow."""
        watched = self.daemon.watch_units
        followed = {"dbus": ("watch_units", watched), "journal": ("journal_units", self.daemon.journal_units)}
        problems = []
        for trig in rule.trigger:
            setting, units = followed.get(trig.served_by, ("", []))
            for unit in sorted(trig.wants() - set(units)) if setting else []:
                where = f"which is not in [daemon].{setting} {units}"
                problems.append(f"rule {rule.name!r}: {trig.source} trigger on {unit}, {where}")
        if rule.when.unit is not None and rule.when.unit not in watched:
            problems.append(
                f"rule {rule.name!r}: when.unit {rule.when.unit} is not in [daemon].watch_units {watched}"
            )
        return problems

    def mode_of(self, rule: Rule) -> Mode:
        return rule.mode or self.daemon.mode

    def uses_probe(self) -> bool:
        return any(t.served_by == "probe" for r in self.rule for t in r.trigger)

    def resource_checks(self) -> list[ResourceTrigger]:
        """The triggers the resource watcher must serve."""
        return [t for r in self.rule for t in r.trigger if isinstance(t, ResourceTrigger)]

    def watched_files(self) -> list[str]:
        """Files whose content is followed: file triggers' paths."""
        files = [t.path for r in self.rule for t in r.trigger if isinstance(t, FileTrigger)]
        return list(dict.fromkeys(files))

    def watched_paths(self) -> list[str]:
        """Paths whose kind is followed (inotify): path triggers' paths, then the paths of every
        rule's confirm condition (the node view learns their kind from the same events)."""
        paths = [p for r in self.rule for t in r.trigger if isinstance(t, PathTrigger) for p in t.paths]
        paths += [p for r in self.rule if r.confirm is not None for p in r.confirm.paths]
        return list(dict.fromkeys(paths + self.placeholder_paths()))

    def placeholder_paths(self) -> list[str]:
        """The socket paths ``[placeholder]`` keeps from being missing (none while it is off)."""
        return list(self.placeholder.paths) if self.placeholder.mode != "off" else []

    def served(self) -> dict[str, frozenset[str]]:
        """Per source (a trigger's ``served_by``), what this policy asks of it: "inotify" the paths
        of ``watched_paths``, "files" the files, "journal" and "dbus" the units, "probe" {"probe"},
        "resources" one description per check ("fd", "pressure:host:memory", "socket-mode:PATH",
        ...). A source missing here is not asked for anything. A reload compares it with what the
        running sources serve."""
        wanted: dict[str, set[str]] = {}
        for rule in self.rule:
            for trig in rule.trigger:
                wanted.setdefault(trig.served_by, set()).update(trig.wants())
        confirm_paths = [p for r in self.rule if r.confirm is not None for p in r.confirm.paths]
        if confirm_paths or self.placeholder_paths():
            wanted.setdefault("inotify", set()).update(confirm_paths + self.placeholder_paths())
        return {source: frozenset(items) for source, items in wanted.items()}
