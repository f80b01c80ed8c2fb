"""The policy's models. Every field's docstring becomes the policy reference (docs/policy.md).

A policy is a ``[daemon]`` table and ``[[rule]]`` tables. A rule says when to look (its triggers),
whether to act (its confirm condition, checked against the real state at decision time) and what to do
(its ordered actions).
"""

from __future__ import annotations

import re
import signal as signals
from collections import Counter
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from nodemedic.events import PathKind
from nodemedic.policy.actions import ActionSpec
from nodemedic.policy.duration import Duration, Interval, PositiveDuration
from nodemedic.policy.paths import AbsoluteDir, AbsolutePath, absolute_path
from nodemedic.policy.patterns import Regex
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

    @property
    def quarantine(self) -> Path:
        return self.quarantine_dir or self.state_dir / "quarantine"


class PathTrigger(Strict):
    """Fires when one of ``paths`` is found to be of ``kind`` (inotify, and once at start-up)."""

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


class JournalTrigger(Strict):
    """Fires when a journal line from or about ``unit`` matches ``pattern`` (an RE2 regex)."""

    source: Literal["journal"]
    pattern: Regex
    """Regular expression searched in the first 8 KiB of the MESSAGE field; compiled with RE2 when
    the policy loads (Python syntax, less backreferences and lookarounds; matching takes time linear
    in the line). Anchor it to the line's shape (``^containerd: ...``): an unanchored pattern also
    fires on a line that merely quotes the text, such as a pod's command echoed in an error."""
    unit: str = "containerd.service"
    """The unit whose lines (and systemd's lines about it) are searched; ``"kernel"``: the kernel's."""


class UnitTrigger(Strict):
    """Fires when a watched unit enters one of the given states (D-Bus PropertiesChanged)."""

    source: Literal["unit"]
    unit: str
    """The unit whose state changes fire; only units listed in ``[daemon].watch_units`` are followed."""
    active_state: list[str] = Field(default_factory=list)
    """ActiveState values that fire, e.g. ["failed"]; empty means any."""
    sub_state: list[str] = Field(default_factory=list)
    """SubState values that fire, e.g. ["auto-restart"]; empty means any."""


class ProbeTrigger(Strict):
    """Fires when containerd has not answered a real request (its Version API over the socket)
    ``failures`` times in a row. The probe runs every ``[daemon.probe].interval``, and only while
    some rule has a probe trigger."""

    source: Literal["probe"]
    failures: int = Field(default=3, ge=1)
    """Consecutive failed requests that fire (and each further one, while it lasts)."""


class FileTrigger(Strict):
    """Fires when the file at ``path`` may have new content: written and closed, or renamed into place
    (inotify on its folder). Pair it with a confirm condition that reads the file (e.g.
    ``config_broken``): the event only says that something was written."""

    source: Literal["file"]
    path: str
    """An absolute path; its folder must exist when nodemedic starts."""

    @field_validator("path")
    @classmethod
    def _absolute(cls, path: str) -> str:
        return absolute_path(path)


class SignalTrigger(Strict):
    """Fires when a unit's main process was killed by ``signal``: systemd reports over D-Bus
    ExecMainCode CLD_KILLED (or CLD_DUMPED) with that signal as ExecMainStatus."""

    source: Literal["signal"]
    unit: str = "containerd.service"
    """The unit whose main process is watched; it must be in ``[daemon].watch_units``."""
    signal: Signal = int(signals.SIGHUP)
    """The signal, by name ("SIGHUP", "HUP") or number."""


class FdTrigger(Strict):
    """Fires when the watched unit's main process (``[daemon.resources].unit``) has more than
    ``fraction`` of its RLIMIT_NOFILE soft limit open: the entries of /proc/MainPID/fd against
    "Max open files" in /proc/MainPID/limits. Counting another process's fds needs CAP_SYS_PTRACE
    (see docs/operations.md)."""

    source: Literal["fds"]
    fraction: float = Field(default=0.8, gt=0.0, le=1.0)
    """Open descriptors over the soft limit that fire, e.g. 0.8 for 80 %."""


class PressureTrigger(Strict):
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


class OomTrigger(Strict):
    """Fires when the kernel's OOM killer killed a process in the watched unit's cgroup: the
    ``oom_kill`` count in its memory.events grew since the previous reading. Needs the memory
    controller on that cgroup (without it there is no memory.events and this never fires)."""

    source: Literal["oom"]


class SocketModeTrigger(Strict):
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


class KnownBug(Strict):
    """A range of containerd versions with a known bug: ``first`` <= version < ``fixed``."""

    first: str = Field(pattern=r"^\d+(\.\d+)*$")
    """The first affected version, e.g. "1.6.0"."""
    fixed: str | None = Field(default=None, pattern=r"^\d+(\.\d+)*$")
    """The first version without the bug, e.g. "1.6.38"; none: every later version is affected."""
    reason: str = Field(min_length=1)
    """What the bug is, for the operator (a CVE, an issue), written in the record."""


class VersionTrigger(Strict):
    """Fires when the version containerd reports over its Version API (asked once per reading, on
    ``[daemon.probe].socket``) falls in one of ``known_bugs``; once per version seen."""

    source: Literal["version"]
    known_bugs: list[KnownBug] = Field(min_length=1)
    """The affected ranges, each with its reason."""


class GrpcStreamsTrigger(Strict):
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


ResourceTriggerType = (
    FdTrigger | PressureTrigger | OomTrigger | SocketModeTrigger | VersionTrigger | GrpcStreamsTrigger
)
RESOURCE_TRIGGERS = (
    FdTrigger, PressureTrigger, OomTrigger, SocketModeTrigger, VersionTrigger, GrpcStreamsTrigger,
)  # fmt: skip

Trigger = Annotated[
    PathTrigger | JournalTrigger | UnitTrigger | ProbeTrigger | SignalTrigger | FileTrigger
    | FdTrigger | PressureTrigger | OomTrigger | SocketModeTrigger | VersionTrigger | GrpcStreamsTrigger,
    Field(discriminator="source"),
]  # fmt: skip


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
        problems = []
        for rule in self.rule:
            for trig in rule.trigger:
                if isinstance(trig, UnitTrigger | SignalTrigger) and trig.unit not in self.daemon.watch_units:
                    problems.append(f"rule {rule.name!r}: {trig.source} trigger on {trig.unit}, which is not "
                                    f"in [daemon].watch_units {self.daemon.watch_units}")  # fmt: skip
                if isinstance(trig, JournalTrigger) and trig.unit not in self.daemon.journal_units:
                    problems.append(f"rule {rule.name!r}: journal trigger on {trig.unit}, which is not in "
                                    f"[daemon].journal_units {self.daemon.journal_units}")  # fmt: skip
            if rule.when.unit is not None and rule.when.unit not in self.daemon.watch_units:
                problems.append(f"rule {rule.name!r}: when.unit {rule.when.unit} is not in "
                                f"[daemon].watch_units {self.daemon.watch_units}")  # fmt: skip
        if self.resource_checks() and self.daemon.resources.unit not in self.daemon.watch_units:
            problems.append(f"[daemon.resources].unit {self.daemon.resources.unit} is not in "
                            f"[daemon].watch_units {self.daemon.watch_units}")  # fmt: skip
        if self.sighup.mode != "off" and self.sighup.unit not in self.daemon.watch_units:
            problems.append(f"[sighup].unit {self.sighup.unit} is not in [daemon].watch_units "
                            f"{self.daemon.watch_units}")  # fmt: skip
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def mode_of(self, rule: Rule) -> Mode:
        return rule.mode or self.daemon.mode

    def uses_probe(self) -> bool:
        return any(isinstance(t, ProbeTrigger) for r in self.rule for t in r.trigger)

    def resource_checks(self) -> list[ResourceTriggerType]:
        """The triggers the resource watcher must serve."""
        return [t for r in self.rule for t in r.trigger if isinstance(t, RESOURCE_TRIGGERS)]

    def watched_files(self) -> list[str]:
        """Files whose content is followed: file triggers' paths."""
        files = [t.path for r in self.rule for t in r.trigger if isinstance(t, FileTrigger)]
        return list(dict.fromkeys(files))

    def watched_paths(self) -> list[str]:
        paths = [p for r in self.rule for t in r.trigger if isinstance(t, PathTrigger) for p in t.paths]
        return list(dict.fromkeys(paths))
