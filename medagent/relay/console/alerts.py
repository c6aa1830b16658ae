"""
Console alerts: one per condition, raised once when it starts and cleared when it ends (no
alert per retry or per check).  The conditions: an agent offline longer than
C{offline_after} seconds (``--alert-offline-minutes`` on the relay); a device lane of an
agent whose oldest open push has waited longer than C{queue_age_after} seconds
(``--alert-queue-minutes``): a stuck lane, one alert however many pushes wait in it, one per
lane (a journal without lane summaries: one per agent); and an agent whose pushes failed
too often (``--alert-error-rate``): of its pushes that ended in the last C{error_window}
seconds, at least C{error_min} and a fraction C{error_rate} or more failed.

Each change can also be POSTed to a webhook (L{AlertWebhook}, ``--alert-webhook``).

Checked every C{interval} seconds (default 15, or a quarter of a shorter threshold) on the
injected clock.  An agent that never connected
since this relay started counts as offline from the start.  In a cluster, an agent held by
another node is online.
"""

from __future__ import annotations

from collections import deque
from typing import Any, Callable

import attr
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from medagent.destination import lane_key

log = Logger()

AGENT_OFFLINE = "agent-offline"
QUEUE_AGE = "queue-age"
ERROR_RATE = "error-rate"
#: every kind of alert (the metrics list each, 0 included)
KINDS = (AGENT_OFFLINE, QUEUE_AGE, ERROR_RATE)
#: the error rate alert's window (``--alert-error-minutes``) and least count of outcomes
DEFAULT_ERROR_MINUTES = 15.0
DEFAULT_ERROR_MIN = 5
DEFAULT_OFFLINE_MINUTES = 5.0
DEFAULT_QUEUE_MINUTES = 15.0
DEFAULT_INTERVAL = 15.0
#: cleared alerts kept for the page
HISTORY = 200
#: agents looked at per check, at most
MAX_AGENTS = 1000


@attr.s(auto_attribs=True)
class Alert:
    kind: str
    agent_id: str
    since: float
    raised: float
    cleared: float | None = None
    #: the device lane (key) of a lane's alert; None: the agent's
    lane: str | None = None
    #: figures that say how bad it was when raised (never message content)
    detail: str | None = None

    @property
    def key(self) -> tuple[str, ...]:
        return (self.kind, self.agent_id) if self.lane is None else \
            (self.kind, self.agent_id, self.lane)

    def text(self) -> str:
        if self.kind == QUEUE_AGE:
            where = f" to {self.lane}" if self.lane is not None else ""
            return f"Agent/{self.agent_id}: pushes{where} waiting too long"
        if self.kind == ERROR_RATE:
            return f"Agent/{self.agent_id}: too many pushes failed" + (
                f" ({self.detail})" if self.detail else "")
        return f"Agent/{self.agent_id} offline"


class AlertMonitor:
    def __init__(self, clock: Any, hub: Any, store: Any, *,
                 offline_after: float | None = DEFAULT_OFFLINE_MINUTES * 60,
                 journal: Any = None, queue_age_after: float | None = None,
                 interval: float | None = None, error_rate: float | None = None,
                 error_window: float = DEFAULT_ERROR_MINUTES * 60,
                 error_min: int = DEFAULT_ERROR_MIN) -> None:
        thresholds = [t for t in (offline_after, queue_age_after) if t]
        if interval is None:  # a short threshold is checked more often (at most each second)
            interval = min(DEFAULT_INTERVAL, max(1.0, min(thresholds or [60.0]) / 4))
        if not (thresholds or error_rate) \
                or any(t < 0 for t in (offline_after or 0, queue_age_after or 0)) \
                or interval <= 0 or ((queue_age_after or error_rate) and journal is None):
            raise ValueError("alert thresholds must be positive (a queue alert needs a journal)")
        if error_rate is not None and not (0 < error_rate <= 1 and error_window > 0
                                           and error_min >= 1):
            raise ValueError("the error rate is a fraction in (0, 1], over a positive window "
                             "and at least one outcome")
        self.clock = clock
        self.hub = hub
        self.store = store
        self.offline_after = offline_after
        self.journal = journal
        self.queue_age_after = queue_age_after
        self.error_rate = error_rate
        self.error_window = error_window
        self.error_min = error_min
        self.interval = interval
        #: when the checks started (set by L{start}: a constructor reads no clock)
        self.started: float | None = None
        self.active: dict[tuple[str, ...], Alert] = {}
        self.history: deque[Alert] = deque(maxlen=HISTORY)
        #: called with (alert, raised?) when one is raised or cleared
        self.listeners: list[Callable[[Alert, bool], None]] = []
        self._call: LoopingCall | None = None
        self._checking = False

    def start(self) -> None:
        self.started = self.clock.seconds()
        self._call = LoopingCall(self.check)
        self._call.clock = self.clock
        self._call.start(self.interval, now=False)

    def stop(self) -> None:
        if self._call is not None and self._call.running:
            self._call.stop()
        self._call = None

    def check(self) -> Deferred[None]:
        if self._checking:  # the previous check is still reading
            return Deferred.fromCoroutine(_nothing())
        self._checking = True

        def done(result: Any) -> None:
            self._checking = False
            if result is not None and hasattr(result, "value"):
                log.failure("Checking console alerts failed", result)

        return ensureDeferred(self._check()).addBoth(done)

    async def _online_elsewhere(self, agent_id: str) -> bool:
        sessions = getattr(self.hub, "agent_sessions", None)
        if sessions is None:
            return False
        return (await sessions.holder(agent_id)) is not None

    async def _check(self) -> None:
        if self.offline_after:
            await self._check_offline()
        if self.queue_age_after:
            await self._check_queues()
        if self.error_rate:
            await self._check_errors()

    async def _check_queues(self) -> None:
        """
        A device lane whose oldest open push waited longer than C{queue_age_after}: one
        alert per lane, cleared once it is no longer so (delivered, failed, cancelled or
        expired).  The per-agent summaries say which agents can have such a lane; only
        theirs are read lane by lane.
        """
        assert self.queue_age_after is not None
        now = self.clock.seconds()
        summaries = await self.journal.agent_summaries(now - 3600)
        candidates = sorted(
            agent_id for agent_id, s in list(summaries.items())[:MAX_AGENTS]
            if s.get("oldestOpen") is not None
            and now - float(s["oldestOpen"]) >= self.queue_age_after)
        stuck: dict[tuple[str, ...], Alert] = {}
        by_lane = hasattr(self.journal, "lane_summaries")
        for agent_id in candidates:
            if not by_lane:
                alert = Alert(QUEUE_AGE, agent_id, float(summaries[agent_id]["oldestOpen"]), now)
                stuck[alert.key] = alert
                continue
            oldest: dict[str, float] = {}
            for lane in await self.journal.lane_summaries(agent_id):
                waited = lane.get("oldestOpenAgeSeconds")
                if waited is not None and float(waited) >= self.queue_age_after:
                    key = lane_key(lane["remote"])
                    oldest[key] = max(oldest.get(key, 0.0), float(waited))
            for lane_id, waited in oldest.items():
                alert = Alert(QUEUE_AGE, agent_id, now - waited, now, lane=lane_id)
                stuck[alert.key] = alert
        for found in sorted(stuck):
            if found not in self.active:
                self._raise(stuck[found])
        for gone in [k for k in self.active if k[0] == QUEUE_AGE and k not in stuck]:
            self._clear(gone, now)

    async def _check_errors(self) -> None:
        """
        An agent whose pushes that ended in the last C{error_window} seconds are at least
        C{error_min}, and failed in a fraction C{error_rate} or more of them: one alert,
        cleared once the window's rate is under the threshold (or too few ended).
        """
        assert self.error_rate is not None
        now = self.clock.seconds()
        counts = await self.journal.outcome_counts(now - self.error_window, MAX_AGENTS)
        bad = {agent_id: c for agent_id, c in counts.items()
               if c["finished"] >= self.error_min
               and c["failed"] >= self.error_rate * c["finished"]}
        for agent_id in sorted(bad):
            if (ERROR_RATE, agent_id) not in self.active:
                c = bad[agent_id]
                minutes = self.error_window / 60
                self._raise(Alert(ERROR_RATE, agent_id, now, now,
                                  detail=f"{c['failed']} of {c['finished']} failed in "
                                         f"{minutes:g} min"))
        for gone in [k for k in self.active if k[0] == ERROR_RATE and k[1] not in bad]:
            self._clear(gone, now)

    async def _check_offline(self) -> None:
        assert self.offline_after is not None
        agents = await self.store.search("Agent", {"_count": [str(MAX_AGENTS)]})
        now = self.clock.seconds()
        started = self.started if self.started is not None else now
        seen = set()
        for agent in agents:
            agent_id = agent["id"]
            seen.add(agent_id)
            key: tuple[str, ...] = (AGENT_OFFLINE, agent_id)
            online = self.hub.is_connected(agent_id) or agent.get("status") == "off" or \
                await self._online_elsewhere(agent_id)
            if online:
                if key in self.active:
                    self._clear(key, now)
                continue
            if key in self.active:
                continue
            status = self.hub.status(agent_id)
            last = status.get("lastUpdated")
            since = max(float(last), started) if isinstance(last, (int, float)) else started
            if now - since >= self.offline_after:
                self._raise(Alert(AGENT_OFFLINE, agent_id, since, now))
        for gone in [k for k in self.active if k[0] == AGENT_OFFLINE and k[1] not in seen]:
            self._clear(gone, now)  # the agent was deleted

    def _raise(self, alert: Alert) -> None:
        self.active[alert.key] = alert
        log.warn("Alert: {what} (for {minutes:.1f} min)", what=alert.text(),
                 minutes=(alert.raised - alert.since) / 60)
        self._tell(alert, True)

    def _clear(self, key: tuple[str, ...], now: float) -> None:
        alert = self.active.pop(key)
        alert.cleared = now
        self.history.appendleft(alert)
        log.info("Alert cleared: {what}", what=alert.text())
        self._tell(alert, False)

    def _tell(self, alert: Alert, raised: bool) -> None:
        for listener in list(self.listeners):
            try:
                listener(alert, raised)
            except Exception:
                log.failure("Alert listener failed")


async def _nothing() -> None:
    return None
