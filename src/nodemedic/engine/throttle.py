"""``[sighup] mode = "throttle"``: a sender that overdraws its token bucket has its cgroup frozen for a
cool-down, then thawed.

Deciding is cheap and happens as each SIGHUP is seen; everything that touches the cgroup file system
(the refusal check, freezing, thawing) runs off the event loop at the guard's next turn. The freezer
records a cgroup before it freezes it, so `nodemedic thaw` (the unit's ExecStopPost) can always undo
it, however nodemedic ends.
"""

from __future__ import annotations

import asyncio

from nodemedic.core.ratelimit import SenderBuckets
from nodemedic.engine.sighup_context import ACTION_ERRORS, GuardContext, Say
from nodemedic.events import SignalSeen
from nodemedic.policy.model import Mode
from nodemedic.policy.sighup import SighupSettings
from nodemedic.ports import Clock
from nodemedic.report import RecordKind


class Throttler:
    def __init__(self, settings: SighupSettings, ctx: GuardContext, say: Say, clock: Clock) -> None:
        self.ctx, self._say, self._clock = ctx, say, clock
        self.daemon_mode: Mode = "enforce"
        self._over: dict[str, str] = {}  # cgroup -> sender: over budget, to be judged and frozen
        self.inflight: asyncio.Future[None] | None = None  # the freeze under way, if any
        self._told: set[str] = set()
        self.configure(settings)

    def configure(self, settings: SighupSettings) -> None:
        """Take (reloaded) settings: fresh buckets, the new deny list."""
        self.settings = settings
        t = settings.throttle
        self._buckets = SenderBuckets(t.burst, t.refill, t.per, self._clock)
        self.ctx.freezer.deny = list(t.deny)

    def seen(self, event: SignalSeen, sender: str) -> bool:
        """Count one SIGHUP against its sender; True if it is now over budget."""
        cgroup = event.sender_cgroup
        if not cgroup or self._buckets.take(cgroup):
            return False
        self._over[cgroup] = sender
        return True

    def forget(self) -> None:
        self._over.clear()

    async def tick(self) -> None:
        while self._over:
            cgroup, sender = self._over.popitem()
            await self._judge(cgroup, sender)
        due = await asyncio.to_thread(self.ctx.freezer.thaw_due, self._clock.wall())
        self.thawed(due, "its cool-down is over")

    async def _judge(self, cgroup: str, sender: str) -> None:
        freezer, t = self.ctx.freezer, self.settings.throttle
        try:
            refusal = await asyncio.to_thread(freezer.refusal, cgroup)
            if refusal is None and cgroup in await asyncio.to_thread(freezer.frozen):
                return
        except OSError as exc:  # e.g. the sender's cgroup vanished while it was looked at
            refusal = f"its cgroup could not be read: {exc}"
        if refusal is not None:
            if cgroup not in self._told:
                self._told.add(cgroup)
                self._say(RecordKind.DECIDED, f"{sender} exceeds its SIGHUP budget but is not frozen: "
                          f"{refusal}", CGROUP=cgroup, SENDERS=sender, OUTCOME="refused", DETAIL=refusal,
                          ACTION="freeze-sender")  # fmt: skip
            return
        if self.daemon_mode == "observe":
            self._say(RecordKind.DECIDED, f"would freeze {cgroup} ({sender}) for {t.cooldown:g}s: it "
                      "exceeds its SIGHUP budget", CGROUP=cgroup, SENDERS=sender, MODE="observe",
                      OUTCOME="would-do", ACTION="freeze-sender")  # fmt: skip
            return
        # shielded: a freeze cut off by nodemedic's stop must finish before the exit-time thaw
        self.inflight = asyncio.ensure_future(
            asyncio.to_thread(freezer.freeze, cgroup, self._clock.wall() + t.cooldown)
        )
        try:
            await asyncio.shield(self.inflight)
        except ACTION_ERRORS as exc:
            self._say(RecordKind.ERROR, f"could not freeze {cgroup}: {exc}", CGROUP=cgroup, SENDERS=sender,
                      OUTCOME="failed", ACTION="freeze-sender")  # fmt: skip
            return
        self._say(RecordKind.ACTION, f"froze {cgroup} ({sender}) for {t.cooldown:g}s: it sent more SIGHUPs "
                  f"than its budget ({t.burst} at once, {t.refill} per {t.per:g}s)", CGROUP=cgroup,
                  SENDERS=sender, OUTCOME="frozen", ACTION="freeze-sender")  # fmt: skip

    async def thaw_all(self, why: str) -> None:
        self._over.clear()
        self.thawed(await asyncio.to_thread(self.ctx.freezer.thaw_all), why)

    def thawed(self, cgroups: list[str], why: str) -> None:
        for cgroup in cgroups:
            self._say(RecordKind.ACTION, f"thawed {cgroup}: {why}", CGROUP=cgroup, OUTCOME="thawed",
                      ACTION="freeze-sender")  # fmt: skip
