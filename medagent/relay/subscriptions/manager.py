"""
L{SubscriptionManager}: match writes to Subscriptions and deliver them, durably, retried and
in order.

Before each write goes to the database (the store's C{write_hooks},
L{medagent.storage.interfaces.WriteHook}) we match the resource against the active
Subscriptions (kept in memory, refreshed after Subscription writes) on the reactor thread; the
write's own transaction then queues one delivery per match
(L{medagent.storage.interfaces.Transaction.enqueue_deliveries}): a committed write always has
its deliveries, a failed one none.  Deliveries run outside the HTTP request that
wrote the resource: to a Bot (``channel.endpoint: Bot/{id}``) through the L{BotRunner}, or
as an HTTP POST of the resource to an ``http(s)`` URL (L{medagent.relay.subscriptions.webhook}),
signed with HMAC-SHA256 (``X-Signature``) when the Subscription has a secret.

A failed attempt is retried with exponential backoff (L{retry_delay}) up to the
Subscription's max attempts (default 4).  Deliveries for the same Subscription and resource
go one at a time, oldest first, so a cancel never overtakes the order it cancels.  Every
attempt is recorded as an C{AuditEvent} (the bot run's, or one for the HTTP POST), naming the
Subscription and the resource; the queue row keeps the attempt count, the next attempt time
and the last error.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, Callable, Mapping, Sequence

import attr
from twisted.application.internet import backoffPolicy
from twisted.internet.defer import Deferred, ensureDeferred, succeed
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from medagent.contenttypes import FHIR_JSON
from medagent.relay.bots.audit import audit_event
from medagent.relay.bots.outcomes import BUSY, ERROR, STOPPED, SUCCESS
from medagent.relay.bots.runner import MAX_TIME_LIMIT
from medagent.relay.subscriptions.criteria import matches
from medagent.relay.subscriptions.spec import DEFAULT_MAX_ATTEMPTS, Spec, subscription_spec
from medagent.relay.subscriptions.webhook import Poster, sign
from medagent.relay.webhooks import WebhookPolicy
from medagent.storage.interfaces import DeliveryQueue, Transaction
from medagent.storage.records import CANCELLED, DELIVERED, FAILED, Delivery, NewDelivery

log = Logger()

#: Resource types whose writes never fire Subscriptions: bot runs write AuditEvents, and a
#: Subscription on them would feed itself.
SKIP_TYPES = frozenset(["AuditEvent"])


def no_jitter() -> float:
    """No jitter: retries come exactly when L{retry_delay} says (the default)."""
    return 0.0


def retry_delay(attempts: int, base: float, cap: float,
                jitter: Callable[[], float] = no_jitter) -> float:
    """
    Seconds to wait after the C{attempts}-th failed attempt: base, 2·base, 4·base... ≤ cap
    (Twisted's C{backoffPolicy}, whose attempt 0 is our first failure), plus C{jitter()}.
    """
    return backoffPolicy(initialDelay=base, maxDelay=cap, factor=2.0,
                         jitter=jitter)(max(0, attempts - 1))



class SubscriptionManager:
    """Matches committed writes to Subscriptions and delivers them (see module docstring)."""

    def __init__(
        self,
        clock: Any,
        queue: DeliveryQueue,
        store: Any,
        runner: Any,
        *,
        poster: Poster | None = None,
        concurrency: int = 4,
        retry_base: float = 10.0,
        retry_cap: float = 600.0,
        http_timeout: float = 30.0,
        default_max_attempts: int = DEFAULT_MAX_ATTEMPTS,
        retention: float = 7 * 86400.0,
        failed_retention: float = 30 * 86400.0,
        policy: WebhookPolicy | None = None,
        retry_jitter: Callable[[], float] = no_jitter,
    ) -> None:
        self.clock = clock
        self.policy = policy or WebhookPolicy()
        self.queue = queue
        self.store = store
        self.runner = runner
        self.poster = poster
        self.concurrency = concurrency
        self.retry_base = retry_base
        self.retry_cap = retry_cap
        #: seconds added to each retry delay (none by default: the documented schedule)
        self.retry_jitter = retry_jitter
        self.http_timeout = http_timeout
        self.default_max_attempts = default_max_attempts
        self.retention = retention
        self.failed_retention = failed_retention
        self.specs: dict[str, Spec] = {}
        self._by_type: dict[str, list[Spec]] = {}
        self._loaded = False
        self._backlog: list[tuple[str, Any, Any]] = []
        self._running = False
        self._in_flight: dict[str, Delivery] = {}
        self._pumping = False
        self._pump_again = False
        self._timer: Any = None
        self._sweeper: LoopingCall | None = None
        #: called as (event, delivery, detail) on queued/delivered/retry/failed: demo, tests
        self.observers: list[Callable[[str, Delivery, str], None]] = []
        #: called after a Subscription was written here (a cluster tells its other nodes,
        #: which L{reload})
        self.subscriptions_changed: list[Callable[[], None]] = []
        self._reloading = False

    # -- lifecycle ------------------------------------------------------------------------

    def start(self) -> Deferred[None]:
        self._running = True
        if self not in self.store.write_hooks:
            self.store.write_hooks.append(self)
        self._sweeper = LoopingCall(self.sweep)
        self._sweeper.clock = self.clock
        self._sweeper.start(3600.0, now=False)
        return ensureDeferred(self._start())

    async def _read_all(self) -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = []
        offset = 0
        while True:
            page = await self.store.search("Subscription", {"_count": ["1000"],
                                                            "_offset": [str(offset)]})
            found += page
            if len(page) < 1000:
                return found
            offset += 1000

    async def _start(self) -> None:
        try:
            await self.queue.recover(self.clock.seconds())
            for resource in await self._read_all():
                self._remember(resource)
        except Exception:
            log.failure("Loading Subscriptions failed; subscriptions are not active")
            return
        self._loaded = True
        backlog, self._backlog = self._backlog, []
        for interaction, resource, previous in backlog:
            self.on_write(interaction, resource, previous)
        usable = sum(1 for s in self.specs.values() if s.usable)
        log.info("{n} active Subscription(s) loaded", n=usable)
        self._pump()

    def reload(self) -> Deferred[None]:
        """
        Read every Subscription again (another relay node wrote one: the cache here would
        not know).  One reload at a time; a failed one keeps the cache as it was.
        """
        if not self._loaded or self._reloading:
            return succeed(None)
        self._reloading = True

        async def go() -> None:
            try:
                found = await self._read_all()
            except Exception:
                log.failure("Reading Subscriptions again failed; the ones read before stay")
                return
            finally:
                self._reloading = False
            ids = {str(r.get("id")) for r in found}
            for gone in [i for i in self.specs if i not in ids]:
                self._forget(gone)
            for resource in found:
                self._remember(resource, warn=str(resource.get("id")) not in self.specs)

        return ensureDeferred(go())

    def stop(self) -> None:
        """Stop delivering; in-flight attempts finish without being recorded (their lease
        makes them due again after a restart)."""
        self._running = False
        if self in self.store.write_hooks:
            self.store.write_hooks.remove(self)
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        if self._sweeper is not None and self._sweeper.running:
            self._sweeper.stop()

    # -- the subscription cache -----------------------------------------------------------

    def _remember(self, resource: Mapping[str, Any], warn: bool = True) -> None:
        spec = subscription_spec(resource, self.default_max_attempts, self.policy)
        self._forget(spec.id)
        self.specs[spec.id] = spec
        if spec.criteria is not None:
            # copy on write: a prepared write keeps the list it matched against
            rtype = spec.criteria.resource_type
            self._by_type[rtype] = [*self._by_type.get(rtype, ()), spec]
        if spec.active and spec.problem and warn:
            log.warn("Subscription/{id} is active but will never fire: {problem}",
                     id=spec.id, problem=spec.problem)

    def _forget(self, id: str) -> None:
        old = self.specs.pop(id, None)
        if old is not None and old.criteria is not None:
            rtype = old.criteria.resource_type
            self._by_type[rtype] = [s for s in self._by_type.get(rtype, ()) if s is not old]

    # -- matching (store listener) ---------------------------------------------------------

    def prepare(self, resource_type: str, id: str,
                resource: dict[str, Any] | None) -> "_Plan":
        """
        The store's L{medagent.storage.interfaces.WriteHook}: on the reactor thread, before
        the write is handed to the database, match it against the Subscriptions.  The
        deliveries it triggers are then queued in the write's own transaction (no crash
        window between them).  Subscription writes and writes before the subscriptions are
        loaded are handled after the commit instead (L{on_write}).
        """
        if (not self._loaded or not self._running or resource_type == "Subscription"
                or resource_type in SKIP_TYPES):
            return _Plan(later=True)
        now = self.clock.seconds()
        if resource is not None:
            # create or update: only the store knows which; match for both
            return _Plan(now=now, matched={
                interaction: tuple(self.match(interaction, resource, now))
                for interaction in ("create", "update")})
        # a delete fires on the version it deletes, which only the transaction reads: the
        # plan carries the candidates, and the pure criteria test runs on that version
        candidates = tuple(spec for spec in self._by_type.get(resource_type, ())
                           if spec.live(now) and "delete" in spec.interactions
                           and spec.criteria is not None)
        return _Plan(now=now, matched={"delete": candidates}, recheck=True)

    def committed(self, token: Any) -> None:
        if token is None:
            return
        if token[0] == "later":
            self.on_write(*token[1:])
        else:
            _, interaction, target, deliveries = token
            self._queued(interaction, deliveries)

    def on_write(self, interaction: str, resource: dict[str, Any] | None,
                 previous: dict[str, Any] | None) -> None:
        """After a commit, for what L{prepare} left for later; never raises."""
        if not self._loaded:
            self._backlog.append((interaction, resource, previous))
            return
        target = resource if resource is not None else previous
        if target is None:
            return
        resource_type = target.get("resourceType")
        if resource_type == "Subscription":
            if interaction == "delete":
                self._forget(str(target.get("id")))
            else:
                self._remember(target)
            for changed in list(self.subscriptions_changed):
                changed()
        if resource_type in SKIP_TYPES:
            return
        found = self.match(interaction, target)
        if found and self._running:
            self.enqueue(found, interaction, resource, previous)

    def match(self, interaction: str, resource: Mapping[str, Any],
              now: float | None = None) -> list[Spec]:
        """
        The Subscriptions this write fires.  A write by a Bot never fires a Subscription that
        delivers to that same Bot: without this rule a Bot that updates what it is subscribed
        to would run forever.
        """
        now = self.clock.seconds() if now is None else now
        raw_meta = resource.get("meta")
        meta: Mapping[str, Any] = raw_meta if isinstance(raw_meta, Mapping) else {}
        raw_author = meta.get("author")
        author: Mapping[str, Any] = raw_author if isinstance(raw_author, Mapping) else {}
        by = author.get("reference") if interaction != "delete" else None
        return [
            spec for spec in self._by_type.get(str(resource.get("resourceType")), ())
            if spec.live(now) and interaction in spec.interactions
            and spec.criteria is not None and matches(spec.criteria, resource)
            and not (spec.kind == "bot" and by == spec.endpoint)
        ]

    def _queued(self, interaction: str, deliveries: list[Delivery]) -> list[Delivery]:
        for delivery in deliveries:
            log.info("Subscription/{sub} fired for {interaction} of {type}/{id}: "
                     "delivery {delivery} queued", sub=delivery.subscription_id,
                     interaction=interaction, type=delivery.resource_type,
                     id=delivery.resource_id, delivery=delivery.id)
            self._notify("queued", delivery, "")
        self._pump()
        return deliveries

    def enqueue(self, specs: Sequence[Spec], interaction: str, resource: Any,
                previous: Any) -> Deferred[list[Delivery]]:
        """Queue deliveries in a transaction of their own (writes seen only after commit)."""
        target = resource if resource is not None else previous
        rows = delivery_rows(specs, interaction, resource, previous, self.clock.seconds())

        def failed(f: Any) -> None:
            log.failure("Could not queue {n} subscription deliveries for {type}/{id}", f,
                        n=len(rows), type=target["resourceType"], id=target["id"])

        d = self.queue.enqueue(rows)
        d.addCallbacks(lambda deliveries: self._queued(interaction, deliveries), failed)
        return d

    # -- delivery loop --------------------------------------------------------------------

    def _pump(self) -> None:
        if not self._running or not self._loaded:
            return
        if self._pumping:
            self._pump_again = True
            return
        free = self.concurrency - len(self._in_flight)
        if free <= 0:
            return
        self._pumping = True
        self._pump_again = False
        now = self.clock.seconds()
        lease = self._lease()

        def claimed(result: tuple[list[Delivery], float | None]) -> None:
            deliveries, nxt = result
            self._pumping = False
            if not self._running:
                return
            for delivery in deliveries:
                self._in_flight[delivery.id] = delivery
                self._attempt(delivery)
            self._schedule(nxt)
            if self._pump_again:
                self._pump()

        def failed(f: Any) -> None:
            self._pumping = False
            log.failure("Reading the subscription delivery queue failed", f)
            self._schedule(self.clock.seconds() + 5.0)

        self.queue.claim(now, lease, free).addCallbacks(claimed, failed)

    def _lease(self) -> float:
        limit = getattr(self.runner, "max_time_limit", MAX_TIME_LIMIT)
        return max(limit, self.http_timeout) + 60.0

    def _schedule(self, when: float | None) -> None:
        if when is None or not self._running:
            return
        delay = max(0.0, when - self.clock.seconds())
        if self._timer is not None and self._timer.active():
            if self._timer.getTime() <= self.clock.seconds() + delay:
                return
            self._timer.cancel()
        self._timer = self.clock.callLater(delay, self._tick)

    def _tick(self) -> None:
        self._timer = None
        self._pump()

    def _attempt(self, delivery: Delivery) -> None:
        spec = self.specs.get(delivery.subscription_id)
        if spec is None or not spec.usable:
            why = ("Subscription deleted" if spec is None else
                   f"Subscription is {spec.resource.get('status')!r}" if not spec.active else
                   f"Subscription cannot fire: {spec.problem}")
            self._finish(delivery, CANCELLED, why)
            return
        if spec.kind == "bot":
            d = ensureDeferred(self._to_bot(spec, delivery))
        else:
            d = ensureDeferred(self._to_url(spec, delivery))

        def done(result: tuple[bool, str, bool]) -> None:
            ok, detail, counts = result
            self._attempted(delivery, spec, ok, detail, counts)

        def broke(f: Any) -> None:
            log.failure("Subscription delivery {id} failed unexpectedly", f, id=delivery.id)
            self._attempted(delivery, spec, False, "internal error", True)

        d.addCallbacks(done, broke)

    def _headers(self, spec: Spec, delivery: Delivery) -> dict[str, str]:
        headers = {
            "X-Medplum-Subscription": spec.id,
            "X-Medplum-Interaction": delivery.interaction,
            "X-Medagent-Delivery": delivery.id,
            "X-Medagent-Attempt": str(delivery.attempts),
        }
        if delivery.interaction == "delete":
            headers["X-Medplum-Deleted-Resource"] = (
                f"{delivery.resource_type}/{delivery.resource_id}")
        return headers

    async def _to_bot(self, spec: Spec, delivery: Delivery) -> tuple[bool, str, bool]:
        payload = delivery.payload or {}
        resource, previous = payload.get("resource"), payload.get("previous")
        headers = self._headers(spec, delivery)
        if delivery.interaction == "delete":
            bot_input: Any = {"deletedResource": previous}
        else:
            bot_input = resource
        body = json.dumps(bot_input, separators=(",", ":")).encode("utf-8")
        if spec.secret:
            headers["X-Signature"] = sign(spec.secret, body)
        target = resource or previous or {}
        author = (target.get("meta") or {}).get("author")
        run = await self.runner.execute(
            spec.endpoint[len("Bot/"):], bot_input, FHIR_JSON,
            trigger="subscription", requester=author, headers=headers,
            entities=[f"Subscription/{spec.id}",
                      f"{delivery.resource_type}/{delivery.resource_id}"],
            attempt=delivery.attempts,
            event_extra={"previous": previous, "interaction": delivery.interaction},
        )
        if run.ok:
            return True, f"Bot/{run.bot_id} ran ({run.outcome})", True
        # A shutdown or a full queue is not the bot's failure: the attempt does not count.
        counts = run.outcome not in (STOPPED, BUSY)
        return False, run.error_text(), counts

    async def _to_url(self, spec: Spec, delivery: Delivery) -> tuple[bool, str, bool]:
        payload = delivery.payload or {}
        headers = {"Content-Type": FHIR_JSON, **dict(spec.headers),
                   **self._headers(spec, delivery)}
        if delivery.interaction == "delete":
            body = b"{}"
        else:
            body = json.dumps(payload.get("resource"), separators=(",", ":")).encode("utf-8")
        if spec.secret:
            headers["X-Signature"] = sign(spec.secret, body)
        started = time.time()
        try:
            if self.poster is None:
                raise RuntimeError("no HTTP client configured")
            status = await self.poster(spec.endpoint, body, headers, self.http_timeout)
            ok = 200 <= int(status) < 300
            detail = f"HTTP {status}"
        except Exception as e:  # transport trouble: refused, reset, timeout
            ok = False
            detail = f"{type(e).__name__}: {str(e)[:200]}"
        ended = time.time()
        outcome = SUCCESS if ok else ERROR
        if getattr(self.runner, "audit", False) and not getattr(self.runner, "stopped", False) \
                and self._running:
            event = audit_event(
                trigger="subscription", outcome=outcome, started=started, ended=ended,
                summary=f"Subscription delivery to {spec.endpoint}: {detail}",
                entities=[f"Subscription/{spec.id}",
                          f"{delivery.resource_type}/{delivery.resource_id}"],
                attempt=delivery.attempts,
                extra=[{"url": "endpoint", "valueUrl": spec.endpoint}])
            try:
                await self.store.create(event)
            except Exception:
                log.failure("Could not record the AuditEvent of a subscription delivery")
        return ok, detail, True

    def _attempted(self, delivery: Delivery, spec: Spec, ok: bool, detail: str,
                   counts: bool) -> None:
        if not self._running:
            self._in_flight.pop(delivery.id, None)
            return  # leased: due again after a restart
        if ok:
            self._finish(delivery, DELIVERED, detail)
            return
        attempts = delivery.attempts if counts else delivery.attempts - 1
        if counts and attempts >= delivery.max_attempts:
            self._finish(delivery, FAILED, detail)
            return
        delay = retry_delay(max(1, attempts), self.retry_base, self.retry_cap,
                            self.retry_jitter)
        if not counts:
            delay = min(delay, 5.0)
        now = self.clock.seconds()
        delivery.attempts = attempts
        delivery.next_attempt = now + delay
        delivery.last_error = detail

        log.warn("Subscription/{sub} delivery {id} attempt {n}/{max} failed; retry in "
                 "{delay:g}s", sub=delivery.subscription_id, id=delivery.id,
                 n=delivery.attempts, max=delivery.max_attempts, delay=delay)
        self._notify("retry", delivery, detail)
        self._write(self.queue.retry(delivery.id, attempts=attempts, next_attempt=now + delay,
                                     error=detail, now=now), delivery)

    def _finish(self, delivery: Delivery, state: str, detail: str) -> None:
        now = self.clock.seconds()
        delivery.state = state
        delivery.last_error = None if state == DELIVERED else detail
        keep_payload = state == FAILED  # kept (until the sweep) so it can be examined

        (log.info if state == DELIVERED else log.warn)(
            "Subscription/{sub} delivery {id} {state} after {n} attempt(s)",
            sub=delivery.subscription_id, id=delivery.id, state=state, n=delivery.attempts)
        self._notify(state, delivery, detail)
        self._write(self.queue.finish(delivery.id, state, error=delivery.last_error, now=now,
                                      keep_payload=keep_payload), delivery)

    def _write(self, written: Deferred[None], delivery: Delivery) -> None:
        def done(_: Any) -> None:
            self._in_flight.pop(delivery.id, None)
            self._pump()

        def failed(f: Any) -> None:
            self._in_flight.pop(delivery.id, None)
            log.failure("Recording subscription delivery {id} failed", f, id=delivery.id)

        written.addCallbacks(done, failed)

    def _notify(self, event: str, delivery: Delivery, detail: str) -> None:
        for observer in list(self.observers):
            try:
                observer(event, delivery, detail)
            except Exception:
                log.failure("Subscription observer failed")

    # -- housekeeping and inspection ------------------------------------------------------

    def sweep(self) -> Deferred[int]:
        """Delete finished deliveries past their retention (and failed ones later)."""
        now = self.clock.seconds()

        d = self.queue.sweep(finished_before=now - self.retention,
                             failed_before=now - self.failed_retention)
        d.addErrback(lambda f: log.failure("Sweeping subscription deliveries failed", f))
        return d

    def deliveries(self, subscription_id: str | None = None, state: str | None = None,
                   limit: int = 100) -> Deferred[list[Delivery]]:
        """Queued and finished deliveries, newest first (for tools and tests)."""
        return self.queue.list(subscription_id, state, limit)


def delivery_rows(specs: Sequence[Spec], interaction: str, resource: Any, previous: Any,
                  now: float) -> list[NewDelivery]:
    """The deliveries a write fires, one per Subscription (pure: safe on any thread)."""
    target = resource if resource is not None else previous
    payload = json.dumps({"resource": resource, "previous": previous}, separators=(",", ":"))
    return [
        NewDelivery(id=uuid.uuid4().hex, subscription_id=spec.id, interaction=interaction,
                    resource_type=target["resourceType"], resource_id=str(target["id"]),
                    version_id=str((target.get("meta") or {}).get("versionId") or ""),
                    payload=payload, max_attempts=spec.max_attempts, next_attempt=now,
                    created=now)
        for spec in specs
    ]


@attr.s(frozen=True, auto_attribs=True)
class _Plan:
    """
    L{SubscriptionManager.prepare}'s plan for one write: what was matched on the reactor
    thread.  Its C{in_transaction} runs on the database thread and uses nothing else.
    """

    later: bool = False
    now: float = 0.0
    matched: Mapping[str, tuple[Spec, ...]] = attr.ib(factory=dict)
    #: the candidates' criteria still have to be tested against the stored version (delete)
    recheck: bool = False

    def in_transaction(self, tx: Transaction, interaction: str,
                       resource: dict[str, Any] | None,
                       previous: dict[str, Any] | None) -> Any:
        target = resource if resource is not None else previous
        if target is None:
            return None
        if self.later:
            return ("later", interaction, resource, previous)
        specs = self.matched.get(interaction, ())
        if self.recheck:
            specs = tuple(spec for spec in specs
                          if spec.criteria is not None and matches(spec.criteria, target))
        if not specs:
            return None
        return ("queued", interaction, target,
                tx.enqueue_deliveries(delivery_rows(specs, interaction, resource, previous,
                                                    self.now)))
