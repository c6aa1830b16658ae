"""
Console alerts: one per condition, raised once when it starts and cleared when it ends (no
alert per retry or per check).  Today's condition: an agent offline longer than
C{offline_after} seconds (``--alert-offline-minutes`` on the relay).

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

log = Logger()

AGENT_OFFLINE = "agent-offline"
#: every kind of alert (the metrics list each, 0 included)
KINDS = (AGENT_OFFLINE,)
DEFAULT_OFFLINE_MINUTES = 5.0
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

    @property
    def key(self) -> tuple[str, str]:
        return (self.kind, self.agent_id)

    def text(self) -> str:
        return f"Agent/{self.agent_id} offline"


class AlertMonitor:
    def __init__(self, clock: Any, hub: Any, store: Any, *,
                 offline_after: float = DEFAULT_OFFLINE_MINUTES * 60,
                 interval: float | None = None) -> None:
        if interval is None:  # a short threshold is checked more often (at most each second)
            interval = min(DEFAULT_INTERVAL, max(1.0, offline_after / 4))
        if offline_after <= 0 or interval <= 0:
            raise ValueError("alert thresholds must be positive")
        self.clock = clock
        self.hub = hub
        self.store = store
        self.offline_after = offline_after
        self.interval = interval
        #: when the checks started (set by L{start}: a constructor reads no clock)
        self.started: float | None = None
        self.active: dict[tuple[str, str], Alert] = {}
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
        agents = await self.store.search("Agent", {"_count": [str(MAX_AGENTS)]})
        now = self.clock.seconds()
        started = self.started if self.started is not None else now
        seen = set()
        for agent in agents:
            agent_id = agent["id"]
            seen.add(agent_id)
            key = (AGENT_OFFLINE, agent_id)
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
                alert = Alert(AGENT_OFFLINE, agent_id, since, now)
                self.active[key] = alert
                log.warn("Alert: Agent/{agent_id} offline for {minutes:.1f} min",
                         agent_id=agent_id, minutes=(now - since) / 60)
                self._tell(alert, True)
        for key in [k for k in self.active if k[1] not in seen]:
            self._clear(key, now)  # the agent was deleted

    def _clear(self, key: tuple[str, str], now: float) -> None:
        alert = self.active.pop(key)
        alert.cleared = now
        self.history.appendleft(alert)
        log.info("Alert cleared: Agent/{agent_id} is back", agent_id=alert.agent_id)
        self._tell(alert, False)

    def _tell(self, alert: Alert, raised: bool) -> None:
        for listener in list(self.listeners):
            try:
                listener(alert, raised)
            except Exception:
                log.failure("Alert listener failed")


async def _nothing() -> None:
    return None
