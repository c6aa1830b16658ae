"""
Prometheus metrics of the relay and the agent: the definitions in one place, one registry
per service, and the ``/metrics`` listener.

Why a registry per service (never prometheus_client's global one): two services in one process
(tests, a demo) and repeated test cases would otherwise collide on metric names.

What goes into a label, and what never does: a lane label is the device key without its query
(L{medagent.destination.lane_key}, query cut: it may carry credentials), a destination label is
``host:port``; states, outcomes, schemes and phases are small fixed sets.  Payloads, patient
data, control ids and push ids are never labels.  A label whose values come from outside
(lanes, destinations) is capped at L{MAX_LABEL_VALUES} distinct values per metric; the rest are
counted as ``other``, so a stream of made-up destinations cannot grow the registry without end.

Counters and histograms are moved at the edges (the hub on connects, heartbeats and answers;
the agent's queue on delivery outcomes; the bot runner on runs) through the small methods
below.  Gauges that describe state (connected agents, lane depth, oldest age, subscription
backlog) read that state at scrape time: synchronous reads through callbacks, and database
reads through L{Metrics.refresh}, which the ``/metrics`` resource runs (bounded by a timeout)
before it renders.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Iterator

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from twisted.application import strports
from twisted.application.service import Service
from twisted.internet.defer import CancelledError, Deferred, DeferredList, maybeDeferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site

from medagent.destination import DestinationError, lane_key, parse_destination

log = Logger()

#: distinct values of an outside-controlled label (lane, destination) per metric, at most
MAX_LABEL_VALUES = 200
OTHER = "other"

#: seconds the database reads behind the gauges may take at scrape time; then the last values
REFRESH_TIMEOUT = 5.0

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
                   300.0, 1800.0, 3600.0)
#: what L{generate_latest} writes (prometheus_client's CONTENT_TYPE_LATEST moved to 1.0.0 in
#: later releases; the text written is the 0.0.4 format, which every scraper reads)
CONTENT_TYPE = b"text/plain; version=0.0.4; charset=utf-8"

RTT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


def lane_label(remote: str) -> str:
    """The lane label of a destination URL: its device key, without query."""
    try:
        key = lane_key(remote)
    except (DestinationError, ValueError):
        key = remote
    return key.split("?", 1)[0]


def destination_label(remote: str) -> str:
    """``host:port`` of a network destination; the lane label otherwise (serial, worklist)."""
    try:
        dest = parse_destination(remote, needs_port=False)
    except (DestinationError, ValueError):
        return "invalid"
    if dest.host and dest.port is not None:
        host = f"[{dest.host}]" if ":" in dest.host else dest.host
        return f"{host}:{dest.port}"
    return lane_label(remote)


class _Capped:
    """Label values from outside, at most C{limit} distinct ones; the rest are L{OTHER}."""

    def __init__(self, limit: int = MAX_LABEL_VALUES) -> None:
        self.limit = limit
        self.seen: set[str] = set()

    def __call__(self, value: str) -> str:
        if value in self.seen:
            return value
        if len(self.seen) >= self.limit:
            return OTHER
        self.seen.add(value)
        return value


class _CallbackCollector(Collector):
    """Metric families computed by a function at scrape time."""

    def __init__(self, collect: Callable[[], Iterable[Metric]]) -> None:
        self._collect = collect

    def collect(self) -> Iterator[Metric]:
        try:
            yield from self._collect()
        except Exception:
            log.failure("A metrics callback failed")


class Metrics:
    """One service's registry, plus the database reads to run before each scrape."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self._refreshers: list[Callable[[], Any]] = []

    def add_refresher(self, refresh: Callable[[], Any]) -> None:
        """C{refresh()} (may return a Deferred) updates cached values before a scrape."""
        self._refreshers.append(refresh)

    def refresh(self) -> Deferred[Any]:
        """Run every refresher; fires when all are done (failures logged, not raised)."""
        def failed(f: Failure) -> None:
            if not f.check(CancelledError):  # the scrape's timeout: the resource says so
                log.failure("Reading a metric failed", f)

        return DeferredList([maybeDeferred(r).addErrback(failed) for r in self._refreshers])

    def render(self) -> bytes:
        """The Prometheus text format of this registry."""
        return bytes(generate_latest(self.registry))

    def _collector(self, collect: Callable[[], Iterable[Metric]]) -> None:
        self.registry.register(_CallbackCollector(collect))


class RelayMetrics(Metrics):
    """The relay node's metrics (one instance per relay service)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        super().__init__(registry)
        r = self.registry
        self.pushes = Counter(
            "medagent_relay_pushes", "Push state changes made by this node's hub, by new state",
            ["state"], registry=r)
        self.push_latency = Histogram(
            "medagent_relay_push_latency_seconds",
            "From a push's creation to its final state, by final state", ["state"],
            buckets=LATENCY_BUCKETS, registry=r)
        self.connects = Counter(
            "medagent_relay_agent_connects", "Agent sessions established on this node",
            registry=r)
        self.reconnects = Counter(
            "medagent_relay_agent_reconnects",
            "Agent sessions of an agent that had a session on this node before", registry=r)
        self.disconnects = Counter(
            "medagent_relay_agent_disconnects", "Agent sessions ended on this node", registry=r)
        self.heartbeat_rtt = Histogram(
            "medagent_relay_heartbeat_rtt_seconds",
            "From a heartbeat request to the agent's heartbeat response",
            buckets=RTT_BUCKETS, registry=r)
        self.bot_runs = Counter(
            "medagent_relay_bot_runs", "Bot runs, by trigger and outcome", ["trigger", "outcome"],
            registry=r)
        self.bot_failures = Counter(
            "medagent_relay_bot_failures", "Bot runs that did not succeed, by outcome",
            ["outcome"], registry=r)
        self.bot_duration = Histogram(
            "medagent_relay_bot_run_seconds", "Duration of Bot runs", buckets=LATENCY_BUCKETS,
            registry=r)
        self.inbound_messages = Counter(
            "medagent_relay_inbound_messages",
            "Messages devices sent through agents' channels, by outcome (ok, rejected, error)",
            ["outcome"], registry=r)
        self.inbound_log_errors = Counter(
            "medagent_relay_inbound_log_errors",
            "Inbound messages the inbound log could not record (answered all the same)",
            registry=r)
        self._seen_agents: set[str] = set()
        self._backlog: tuple[int, float | None] | None = None

    # -- edges (called by the hub and the bot runner) -----------------------------------------

    def push_state(self, state: str) -> None:
        self.pushes.labels(state=state).inc()

    def inbound_message(self, outcome: str) -> None:
        self.inbound_messages.labels(outcome=outcome).inc()

    def inbound_log_failed(self) -> None:
        self.inbound_log_errors.inc()

    def push_finished(self, state: str, seconds: float | None) -> None:
        self.push_state(state)
        if seconds is not None and seconds >= 0:
            self.push_latency.labels(state=state).observe(seconds)

    def agent_connected(self, agent_id: str) -> None:
        self.connects.inc()
        if agent_id in self._seen_agents:
            self.reconnects.inc()
        elif len(self._seen_agents) < 100_000:  # bounded: ids only, never labels
            self._seen_agents.add(agent_id)

    def agent_disconnected(self) -> None:
        self.disconnects.inc()

    def heartbeat_answered(self, seconds: float) -> None:
        if seconds >= 0:
            self.heartbeat_rtt.observe(seconds)

    def bot_run(self, run: Any, trigger: str) -> None:
        """A L{medagent.relay.bots.BotRunner} observer: C{observer(run, trigger)}."""
        outcome = str(run.outcome)
        self.bot_runs.labels(trigger=_trigger(trigger), outcome=outcome).inc()
        if not run.ok:
            self.bot_failures.labels(outcome=outcome).inc()
        if run.duration:
            self.bot_duration.observe(run.duration)

    # -- state read at scrape time -------------------------------------------------------------

    def watch_hub(self, hub: Any) -> None:
        """Connected agents, and what waits on their answers, read from C{hub.sessions}."""
        def collect() -> Iterator[Metric]:
            sessions = list(hub.sessions.values())
            yield GaugeMetricFamily("medagent_relay_connected_agents",
                                    "Agents with a live session on this node", len(sessions))
            yield GaugeMetricFamily("medagent_relay_in_flight_pushes",
                                    "Pushes sent to a connected agent and not yet answered",
                                    sum(len(s.in_flight) for s in sessions))

        self._collector(collect)

    def watch_alerts(self, alerts: Any, kinds: Iterable[str]) -> None:
        """The console's alerts raised and not cleared (L{medagent.relay.console.alerts}),
        by kind (every kind listed, 0 included)."""
        kinds = tuple(kinds)

        def collect() -> Iterator[Metric]:
            family = GaugeMetricFamily("medagent_relay_alerts_active",
                                       "Console alerts raised and not yet cleared",
                                       labels=["kind"])
            active = [a.kind for a in list(alerts.active.values())]
            for kind in kinds:
                family.add_metric([kind], active.count(kind))
            yield family

        self._collector(collect)

    def watch_alert_webhook(self, webhook: Any) -> None:
        """The alert webhook's changes by outcome (L{medagent.relay.console.webhook}):
        sent, retried (failed attempts), failed (given up), dropped (queue full)."""
        def collect() -> Iterator[Metric]:
            family = CounterMetricFamily("medagent_relay_alert_webhook",
                                         "Console alert changes posted to the webhook, by "
                                         "outcome", labels=["outcome"])
            for outcome, n in sorted(webhook.counts.items()):
                family.add_metric([outcome], n)
            yield family
            queued = GaugeMetricFamily("medagent_relay_alert_webhook_queued",
                                       "Console alert changes waiting to be posted")
            queued.add_metric([], len(webhook.queue))
            yield queued

        self._collector(collect)

    def watch_subscriptions(self, backlog: Callable[[], Deferred[tuple[int, float | None]]],
                            clock: Any) -> None:
        """
        C{backlog()} fires with (pending deliveries, creation time of the oldest or None),
        read before each scrape.
        """
        def refresh() -> Deferred[None]:
            def got(value: tuple[int, float | None]) -> None:
                self._backlog = value
            return backlog().addCallback(got)

        def collect() -> Iterator[Metric]:
            if self._backlog is None:
                return
            pending, oldest = self._backlog
            yield GaugeMetricFamily("medagent_relay_subscription_backlog",
                                    "Subscription deliveries waiting to be made", pending)
            yield GaugeMetricFamily(
                "medagent_relay_subscription_oldest_age_seconds",
                "Age of the oldest waiting Subscription delivery (0: none)",
                max(0.0, clock.seconds() - oldest) if oldest is not None else 0.0)

        self.add_refresher(refresh)
        self._collector(collect)


#: Bot triggers seen as labels; anything else is "other"
_TRIGGERS = frozenset({"execute", "subscription", "channel", "http", "agent"})


def _trigger(trigger: str) -> str:
    base = str(trigger).split(":", 1)[0].split("/", 1)[0]
    return base if base in _TRIGGERS else OTHER


class AgentMetrics(Metrics):
    """The agent's metrics (one instance per agent service)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        super().__init__(registry)
        r = self.registry
        self.deliveries = Counter(
            "medagent_agent_deliveries",
            "Delivery attempts ended, by outcome (delivered, refused: the device answered no, "
            "failed, retrying)", ["outcome"], registry=r)
        self.device_latency = Histogram(
            "medagent_agent_device_latency_seconds",
            "From handing a message to its device sender to the device's answer or failure",
            ["scheme"], buckets=LATENCY_BUCKETS, registry=r)
        self.device_errors = Counter(
            "medagent_agent_device_errors",
            "Failed delivery attempts, by destination (host:port) and phase",
            ["destination", "phase"], registry=r)
        self.relay_connects = Counter(
            "medagent_agent_relay_connects", "Sessions established with the relay", registry=r)
        self.relay_reconnects = Counter(
            "medagent_agent_relay_reconnects", "Sessions with the relay after the first",
            registry=r)
        self._destinations = _Capped()
        self._schemes = _Capped(20)
        self._sessions = 0
        self._oldest: dict[str, float] = {}

    def delivery(self, remote: str, outcome: str, seconds: float | None,
                 phase: str | None = None) -> None:
        """One attempt ended: C{outcome} delivered|refused|failed|retrying, C{phase} if failed."""
        self.deliveries.labels(outcome=outcome).inc()
        if seconds is not None and seconds >= 0:
            scheme = remote.split(":", 1)[0].lower()[:20] if ":" in remote else "unknown"
            self.device_latency.labels(scheme=self._schemes(scheme)).observe(seconds)
        if outcome in ("failed", "retrying"):
            self.device_errors.labels(destination=self._destinations(destination_label(remote)),
                                      phase=phase or "unknown").inc()

    def relay_connected(self) -> None:
        if self._sessions:
            self.relay_reconnects.inc()
        self._sessions += 1
        self.relay_connects.inc()

    def watch_queue(self, queue: Any) -> None:
        """Per lane depth and oldest age, read from the agent's L{DurableQueue}."""
        lanes = _Capped()

        def refresh() -> Deferred[None]:
            def got(ages: dict[str, float]) -> None:
                self._oldest = ages
            return queue.oldest_ages().addCallback(got)

        def collect() -> Iterator[Metric]:
            depth = GaugeMetricFamily("medagent_agent_lane_depth",
                                      "Messages waiting on a device lane (in flight included); "
                                      "a lane with none is not listed",
                                      labels=["lane"])
            busy = GaugeMetricFamily("medagent_agent_lane_in_flight",
                                     "1 while a lane's message is with its device",
                                     labels=["lane"])
            oldest = GaugeMetricFamily("medagent_agent_lane_oldest_age_seconds",
                                       "Age of the oldest unanswered message of a lane",
                                       labels=["lane"])
            for name, lane in sorted(queue.snapshot()["lanes"].items()):
                label = lanes(name)
                depth.add_metric([label], lane["waiting"])
                busy.add_metric([label], 1 if lane["inFlight"] else 0)
            for name, age in sorted(self._oldest.items()):
                oldest.add_metric([lanes(name)], age)
            yield depth
            yield busy
            yield oldest

        self.add_refresher(refresh)
        self._collector(collect)

    def watch_app(self, app: Any) -> None:
        """Heartbeat round trip to the relay, as the agent's app measured it last."""
        def collect() -> Iterator[Metric]:
            ms = getattr(app, "last_ping_ms", None)
            if ms is not None:
                yield GaugeMetricFamily("medagent_agent_heartbeat_rtt_seconds",
                                        "Round trip of the last heartbeat to the relay",
                                        ms / 1000.0)
            yield GaugeMetricFamily("medagent_agent_relay_connected",
                                    "1 while the session with the relay is live",
                                    1 if getattr(app, "live", False) else 0)

        self._collector(collect)


class MetricsResource(Resource):
    """``GET /metrics``: refresh the database-backed gauges (bounded), then render."""

    isLeaf = True

    def __init__(self, metrics: Metrics, clock: Any,
                 timeout: float = REFRESH_TIMEOUT) -> None:
        super().__init__()
        self.metrics = metrics
        self.clock = clock
        self.timeout = timeout

    def render_GET(self, request: Any) -> Any:  # noqa: N802 (twisted.web name)
        if request.postpath not in ([b"metrics"], [b"metrics", b""]):
            request.setResponseCode(404)
            return b"Not found: the metrics are at /metrics\n"
        gone: list[bool] = []
        request.notifyFinish().addErrback(lambda _: gone.append(True))
        d = self.metrics.refresh()
        d.addTimeout(self.timeout, self.clock)
        d.addErrback(lambda f: log.warn("Metrics refresh: {error}; serving the last values",
                                        error=f.getErrorMessage()))

        def write(_: Any) -> None:
            if gone:
                return
            try:
                body = self.metrics.render()
            except Exception:
                log.failure("Rendering the metrics failed")
                request.setResponseCode(500)
                body = b"metrics unavailable\n"
            else:
                request.setHeader(b"Content-Type", CONTENT_TYPE)
            request.write(body)
            request.finish()

        d.addCallback(write)
        return NOT_DONE_YET


class _QuietSite(Site):
    def log(self, request: Any) -> None:
        """No access log: a scrape every few seconds is not worth a line."""


def metrics_site(metrics: Metrics, clock: Any) -> Site:
    site = _QuietSite(MetricsResource(metrics, clock))
    site.displayTracebacks = False
    return site


def metrics_service(endpoint: str, metrics: Metrics, reactor: Any) -> Service:
    """A listener serving C{metrics} at ``/metrics`` on C{endpoint} (a strports string)."""
    factory: Any = metrics_site(metrics, reactor)  # a Site is an IProtocolFactory
    listener: Service = strports.service(endpoint, factory, reactor=reactor)
    return listener


# -- wiring (composition roots call these; duck-typed so this module imports neither side) -----

def relay_metrics(hub: Any, bots: Any, backlog: Callable[[], Deferred[tuple[int, float | None]]],
                  clock: Any) -> RelayMetrics:
    """
    The relay's registry, attached: the hub moves its counters, the bot runner reports its
    runs, and the gauges read C{hub.sessions} and C{backlog()} (the Subscription queue's).
    """
    metrics = RelayMetrics()
    hub.metrics = metrics
    metrics.watch_hub(hub)
    bots.observers.append(metrics.bot_run)
    metrics.watch_subscriptions(backlog, clock)
    return metrics


def agent_metrics(app: Any) -> AgentMetrics:
    """The agent's registry, attached to its app (queue outcomes, lanes, relay session)."""
    metrics = AgentMetrics()
    app.queue.metrics = metrics
    metrics.watch_queue(app.queue)
    metrics.watch_app(app)
    app.on_live.append(metrics.relay_connected)
    return metrics
