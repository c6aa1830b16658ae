"""
FHIR Subscriptions (``rest-hook``) with durable, retried, ordered delivery.

Inside each write's own transaction (L{SQLiteStore.write_hooks}) we match the resource
against the active Subscriptions (kept in memory, refreshed after Subscription writes) and
queue one delivery per match in the same transaction: a committed write always has its
deliveries, a failed one none.  Deliveries run outside the HTTP request that
wrote the resource: to a Bot (``channel.endpoint: Bot/{id}``) through the L{BotRunner}, or
as an HTTP POST of the resource to an ``http(s)`` URL, signed with HMAC-SHA256
(``X-Signature``) when the Subscription has a secret.

A failed attempt is retried with exponential backoff up to the Subscription's max attempts
(default 4).  Deliveries for the same Subscription and resource go one at a time, oldest
first, so a cancel never overtakes the order it cancels.  Every attempt is recorded as an
C{AuditEvent} (the bot run's, or one for the HTTP POST), naming the Subscription and the
resource; the queue row keeps the attempt count, the next attempt time and the last error.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import time
import uuid
from datetime import datetime, timezone
from typing import Any, Callable, Iterable, Mapping, Sequence
from urllib.parse import parse_qsl

import attr
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from medagent.contenttypes import FHIR_JSON
from medagent.relay import bots as b
from medagent.relay.store import SEARCH_PARAMS, index_values
from medagent.relay.webhooks import GuardedEndpointFactory, WebhookPolicy, header_problem

log = Logger()

EXT_INTERACTION = "subscription-supported-interaction"
EXT_SECRET = "subscription-secret"
EXT_MAX_ATTEMPTS = "subscription-max-attempts"
EXT_FHIRPATH = "fhir-path-criteria-expression"
_MEDPLUM_EXT = re.compile(r"^https?://(?:www\.)?medplum\.com/fhir/StructureDefinition/(.+)$")

INTERACTIONS = ("create", "update", "delete")
DEFAULT_MAX_ATTEMPTS = 4
MAX_ATTEMPTS_CAP = 18
#: Resource types whose writes never fire Subscriptions: bot runs write AuditEvents, and a
#: Subscription on them would feed itself.
SKIP_TYPES = frozenset(["AuditEvent"])

#: Bytes of a webhook's answer we read (and drop) before giving up on the connection.
MAX_HOOK_RESPONSE = 64 * 1024

PENDING, DELIVERED, FAILED, CANCELLED = "pending", "delivered", "failed", "cancelled"

SCHEMA = """
CREATE TABLE IF NOT EXISTS subscription_deliveries (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    subscription_id TEXT NOT NULL,
    interaction TEXT NOT NULL,
    resource_type TEXT NOT NULL,
    resource_id TEXT NOT NULL,
    version_id TEXT,
    payload TEXT,
    state TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    max_attempts INTEGER NOT NULL,
    leased INTEGER NOT NULL DEFAULT 0,
    next_attempt REAL NOT NULL,
    last_error TEXT,
    created REAL NOT NULL,
    updated REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS subscription_deliveries_due
    ON subscription_deliveries (state, next_attempt);
CREATE INDEX IF NOT EXISTS subscription_deliveries_lane
    ON subscription_deliveries (subscription_id, resource_type, resource_id, state);
"""


# -- criteria ------------------------------------------------------------------------------


class CriteriaError(ValueError):
    """A Subscription.criteria we cannot evaluate; the text says why."""


@attr.s(frozen=True, auto_attribs=True)
class Criteria:
    """``Type?param=a,b&other=c``: AND across parameters, OR across comma values."""

    resource_type: str
    params: tuple[tuple[str, str, tuple[str, ...]], ...] = ()


def parse_criteria(text: Any) -> Criteria:
    """Parse ``ServiceRequest`` or ``ServiceRequest?status=active`` (the store's params)."""
    if not isinstance(text, str) or not text.strip():
        raise CriteriaError("Subscription.criteria is required")
    text = text.strip()
    resource_type, _, query = text.partition("?")
    if not re.fullmatch(r"[A-Z][A-Za-z]{1,63}", resource_type):
        raise CriteriaError(f"Subscription.criteria must start with a resource type, not "
                            f"{resource_type!r}")
    params = []
    for raw_name, value in parse_qsl(query, keep_blank_values=True):
        name, _, modifier = raw_name.partition(":")
        if name.startswith("_") and name != "_id":
            continue  # _count, _sort...: meaningless for one resource
        if name not in SEARCH_PARAMS:
            raise CriteriaError(f"Unsupported search parameter {name!r} in criteria "
                                f"(supported: {', '.join(SEARCH_PARAMS)})")
        if modifier and not (name == "name" and modifier in ("exact", "contains")):
            raise CriteriaError(f"Unsupported modifier {raw_name!r} in criteria")
        params.append((name, modifier, tuple(value.split(","))))
    return Criteria(resource_type, tuple(params))


def _value_matches(name: str, modifier: str, wanted: str,
                   rows: Sequence[tuple[str, str | None, str]], resource_id: Any) -> bool:
    if name == "_id":
        return resource_id == wanted
    if name in ("identifier", "code"):
        if "|" in wanted:
            system, _, token = wanted.partition("|")
            return any(p == name and v == token and (s == system if system else s is None)
                       for p, s, v in rows)
        return any(p == name and v == wanted for p, s, v in rows)
    if name == "name":
        wanted = wanted.lower()
        if modifier == "exact":
            return any(p == name and v == wanted for p, _, v in rows)
        if modifier == "contains":
            return any(p == name and wanted in v for p, _, v in rows)
        return any(p == name and v.startswith(wanted) for p, _, v in rows)
    return any(p == name and v == wanted for p, _, v in rows)


def matches(criteria: Criteria, resource: Mapping[str, Any]) -> bool:
    """Does C{resource} satisfy C{criteria} (same semantics as the store's search)?"""
    if resource.get("resourceType") != criteria.resource_type:
        return False
    if not criteria.params:
        return True
    rows = index_values(resource)
    return all(
        any(_value_matches(name, modifier, alt, rows, resource.get("id")) for alt in alts)
        for name, modifier, alts in criteria.params
    )


# -- subscriptions -------------------------------------------------------------------------


def _extensions(resource: Mapping[str, Any]) -> Iterable[tuple[str, Mapping[str, Any]]]:
    for ext in resource.get("extension") or []:
        if isinstance(ext, Mapping) and isinstance(ext.get("url"), str):
            m = _MEDPLUM_EXT.match(ext["url"])
            yield (m.group(1) if m else ext["url"]), ext


@attr.s(frozen=True, auto_attribs=True)
class Spec:
    """What we need from one Subscription resource, checked once when it is written."""

    id: str
    resource: Mapping[str, Any]
    active: bool
    criteria: Criteria | None
    interactions: frozenset[str]
    endpoint: str
    kind: str  # "bot" | "url" | ""
    secret: str | None
    max_attempts: int
    headers: tuple[tuple[str, str], ...]
    problem: str | None  # why it can never fire, if it cannot
    end: float | None = None  # Subscription.end: no notifications after it

    @property
    def usable(self) -> bool:
        return self.active and self.problem is None

    def live(self, now: float) -> bool:
        return self.usable and (self.end is None or now < self.end)


def subscription_spec(resource: Mapping[str, Any],
                      default_max_attempts: int = DEFAULT_MAX_ATTEMPTS,
                      policy: WebhookPolicy | None = None) -> Spec:
    """
    What a Subscription resource asks for, and why it can never fire if it cannot: an
    unusable Subscription is kept (and reported), never half-applied.
    """
    policy = policy or WebhookPolicy()
    problems: list[str] = []
    criteria: Criteria | None = None
    try:
        criteria = parse_criteria(resource.get("criteria"))
    except CriteriaError as e:
        problems.append(str(e))
    interactions: set[str] = set()
    secret = None
    max_attempts = default_max_attempts
    for name, ext in _extensions(resource):
        if name == EXT_INTERACTION:
            code = ext.get("valueCode")
            if code not in INTERACTIONS:
                problems.append(f"supported-interaction must be one of "
                                f"{', '.join(INTERACTIONS)}, not {code!r}")
            else:
                interactions.add(code)
        elif name == EXT_SECRET:
            if isinstance(ext.get("valueString"), str) and ext["valueString"]:
                secret = ext["valueString"]
        elif name == EXT_MAX_ATTEMPTS:
            value = ext.get("valueInteger")
            if isinstance(value, int) and not isinstance(value, bool):
                max_attempts = max(1, min(MAX_ATTEMPTS_CAP, value))
        elif name == EXT_FHIRPATH:
            # Firing without the filter could send orders the user meant to hold back.
            problems.append("fhir-path-criteria-expression is not supported by this relay")
    channel = resource.get("channel") if isinstance(resource.get("channel"), Mapping) else {}
    endpoint = channel.get("endpoint") if isinstance(channel.get("endpoint"), str) else ""
    kind = ""
    if channel.get("type") != "rest-hook":
        problems.append(f"channel.type {channel.get('type')!r} is not supported "
                        "(only rest-hook)")
    elif re.fullmatch(r"Bot/[A-Za-z0-9\-.]{1,64}", endpoint):
        kind = "bot"
    elif re.match(r"https?://", endpoint, re.I):
        kind = "url"
        problem = policy.url_problem(endpoint)
        if problem:
            problems.append(problem)
    else:
        problems.append("channel.endpoint must be Bot/{id} or an https URL")
    end = None
    if resource.get("end") is not None:
        try:
            end = datetime.fromisoformat(str(resource["end"]).replace("Z", "+00:00"))
            if end.tzinfo is None:
                end = end.replace(tzinfo=timezone.utc)
            end = end.timestamp()
        except ValueError:
            problems.append(f"Subscription.end {resource['end']!r} is not a dateTime")
    headers = []
    for header in channel.get("header") or []:
        key, _, value = header.partition(":") if isinstance(header, str) else ("", "", "")
        key, value = key.strip(), value.strip()
        if not re.fullmatch(r"[A-Za-z0-9\-]{1,64}", key) or len(value) > 1024:
            problems.append("channel.header entries must be 'Name: value' (a token name, "
                            "at most 1024 characters of value)")
            continue
        problem = header_problem(key, value)
        if problem:
            problems.append(problem)
        else:
            headers.append((key, value))
    return Spec(
        id=str(resource.get("id")),
        resource=resource,
        active=resource.get("status") == "active",
        criteria=criteria,
        interactions=frozenset(interactions) or frozenset(INTERACTIONS),
        endpoint=endpoint,
        kind=kind,
        secret=secret,
        max_attempts=max_attempts,
        headers=tuple(headers),
        problem="; ".join(problems) or None,
        end=end,
    )


def sign(secret: str, body: bytes) -> str:
    """``X-Signature``: hex HMAC-SHA256 of the exact body bytes, keyed by the secret."""
    return hmac.new(secret.encode("utf-8"), body, hashlib.sha256).hexdigest()


def retry_delay(attempts: int, base: float, cap: float) -> float:
    """Seconds to wait after the C{attempts}-th failed attempt: base, 2·base, 4·base... ≤ cap."""
    return min(cap, base * (2 ** max(0, attempts - 1)))


@attr.s(auto_attribs=True)
class Delivery:
    """One queued delivery (a row of ``subscription_deliveries``)."""

    id: str
    seq: int
    subscription_id: str
    interaction: str
    resource_type: str
    resource_id: str
    version_id: str | None
    payload: dict[str, Any] | None
    state: str
    attempts: int
    max_attempts: int
    next_attempt: float
    last_error: str | None
    created: float
    updated: float

    @classmethod
    def from_row(cls, row: Any) -> "Delivery":
        return cls(
            id=row["id"], seq=row["seq"], subscription_id=row["subscription_id"],
            interaction=row["interaction"], resource_type=row["resource_type"],
            resource_id=row["resource_id"], version_id=row["version_id"],
            payload=json.loads(row["payload"]) if row["payload"] else None,
            state=row["state"], attempts=row["attempts"], max_attempts=row["max_attempts"],
            next_attempt=row["next_attempt"], last_error=row["last_error"],
            created=row["created"], updated=row["updated"],
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "subscription": f"Subscription/{self.subscription_id}",
            "interaction": self.interaction,
            "resource": f"{self.resource_type}/{self.resource_id}",
            "versionId": self.version_id,
            "state": self.state,
            "attempts": self.attempts,
            "maxAttempts": self.max_attempts,
            "nextAttempt": b.now_iso(self.next_attempt) if self.state == PENDING else None,
            "lastError": self.last_error,
        }


Poster = Callable[[str, bytes, Mapping[str, str], float], Deferred]


def treq_poster(reactor: Any, policy: WebhookPolicy | None = None
                ) -> tuple[Poster, Callable[[], Deferred]]:
    """
    An HTTP POST for URL endpoints (treq, own pool) and the function that closes it.  Every
    connection goes through L{GuardedEndpointFactory}: resolved, checked against the
    L{WebhookPolicy}, connected to the checked address; redirects are not followed.
    """
    import treq
    from treq.client import HTTPClient
    from twisted.web.client import Agent, HTTPConnectionPool

    pool = HTTPConnectionPool(reactor, persistent=True)
    pool.maxPersistentPerHost = 4
    agent = Agent.usingEndpointFactory(
        reactor, GuardedEndpointFactory(reactor, policy or WebhookPolicy()), pool=pool)
    client = HTTPClient(agent)

    async def post(url: str, body: bytes, headers: Mapping[str, str], timeout: float) -> int:
        response = await client.post(url, data=body,
                                     headers={k: [v] for k, v in headers.items()},
                                     allow_redirects=False, timeout=timeout)
        seen = [0]

        def drain(data: bytes) -> None:
            seen[0] += len(data)
            if seen[0] > MAX_HOOK_RESPONSE:
                raise ValueError("webhook response too large")

        try:
            await treq.collect(response, drain)  # read it, so the connection can be reused
        except Exception:
            pass  # the status is what counts; an oversized body just loses the connection
        return response.code

    return ((lambda *a: ensureDeferred(post(*a))), pool.closeCachedConnections)


class SubscriptionManager:
    """Matches committed writes to Subscriptions and delivers them (see module docstring)."""

    def __init__(
        self,
        clock: Any,
        db: Any,
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
    ) -> None:
        self.clock = clock
        self.policy = policy or WebhookPolicy()
        self.db = db
        self.store = store
        self.runner = runner
        self.poster = poster
        self.concurrency = concurrency
        self.retry_base = retry_base
        self.retry_cap = retry_cap
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

    @staticmethod
    def schema() -> str:
        return SCHEMA

    # -- lifecycle ------------------------------------------------------------------------

    def start(self) -> Deferred[None]:
        self._running = True
        if self not in self.store.write_hooks:
            self.store.write_hooks.append(self)
        self._sweeper = LoopingCall(self.sweep)
        self._sweeper.clock = self.clock
        self._sweeper.start(3600.0, now=False)
        return ensureDeferred(self._start())

    async def _start(self) -> None:
        try:
            await self.db.run(self._recover, self.clock.seconds())
            offset = 0
            while True:
                page = await self.store.search("Subscription", {"_count": ["1000"],
                                                                "_offset": [str(offset)]})
                for resource in page:
                    self._remember(resource)
                if len(page) < 1000:
                    break
                offset += 1000
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

    @staticmethod
    def _recover(conn: Any, now: float) -> int:
        """Attempts cut short by a stop or crash are due again, and get their try back."""
        return conn.execute(
            "UPDATE subscription_deliveries SET leased=0, next_attempt=?, "
            "attempts=MAX(0, attempts-1) WHERE state=? AND leased=1", (now, PENDING)
        ).rowcount

    # -- the subscription cache -----------------------------------------------------------

    def _remember(self, resource: Mapping[str, Any]) -> None:
        spec = subscription_spec(resource, self.default_max_attempts, self.policy)
        self._forget(spec.id)
        self.specs[spec.id] = spec
        if spec.criteria is not None:
            # copy on write: the database thread matches against these lists concurrently
            rtype = spec.criteria.resource_type
            self._by_type[rtype] = [*self._by_type.get(rtype, ()), spec]
        if spec.active and spec.problem:
            log.warn("Subscription/{id} is active but will never fire: {problem}",
                     id=spec.id, problem=spec.problem)

    def _forget(self, id: str) -> None:
        old = self.specs.pop(id, None)
        if old is not None and old.criteria is not None:
            rtype = old.criteria.resource_type
            self._by_type[rtype] = [s for s in self._by_type.get(rtype, ()) if s is not old]

    # -- matching (store listener) ---------------------------------------------------------

    def in_transaction(self, conn: Any, interaction: str, resource: dict[str, Any] | None,
                       previous: dict[str, Any] | None) -> Any:
        """
        Runs inside the store's write transaction, on the database thread: the deliveries a
        write triggers commit together with the write (no crash window between them).
        Subscription writes and writes before the subscriptions are loaded are handled after
        the commit instead (L{on_write}).
        """
        target = resource if resource is not None else previous
        if target is None:
            return None
        resource_type = target.get("resourceType")
        if (not self._loaded or not self._running or resource_type == "Subscription"
                or resource_type in SKIP_TYPES):
            return ("later", interaction, resource, previous)
        specs = self.match(interaction, target)
        if not specs:
            return None
        return ("queued", interaction, target,
                self._insert(conn, self._delivery_rows(specs, interaction, resource, previous)))

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
        """After a commit, for what L{in_transaction} left for later; never raises."""
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
        if resource_type in SKIP_TYPES:
            return
        found = self.match(interaction, target)
        if found and self._running:
            self.enqueue(found, interaction, resource, previous)

    def match(self, interaction: str, resource: Mapping[str, Any]) -> list[Spec]:
        """
        The Subscriptions this write fires.  A write by a Bot never fires a Subscription that
        delivers to that same Bot: without this rule a Bot that updates what it is subscribed
        to would run forever.
        """
        now = self.clock.seconds()
        meta = resource.get("meta") if isinstance(resource.get("meta"), Mapping) else {}
        author = meta.get("author") if isinstance(meta.get("author"), Mapping) else {}
        by = author.get("reference") if interaction != "delete" else None
        return [
            spec for spec in self._by_type.get(str(resource.get("resourceType")), ())
            if spec.live(now) and interaction in spec.interactions
            and spec.criteria is not None and matches(spec.criteria, resource)
            and not (spec.kind == "bot" and by == spec.endpoint)
        ]

    def _delivery_rows(self, specs: Sequence[Spec], interaction: str, resource: Any,
                       previous: Any) -> list[tuple[Any, ...]]:
        target = resource if resource is not None else previous
        now = self.clock.seconds()
        payload = json.dumps({"resource": resource, "previous": previous},
                             separators=(",", ":"))
        return [
            (uuid.uuid4().hex, spec.id, interaction, target["resourceType"], str(target["id"]),
             str((target.get("meta") or {}).get("versionId") or ""), payload, PENDING,
             spec.max_attempts, now, now, now)
            for spec in specs
        ]

    @staticmethod
    def _insert(conn: Any, rows: list[tuple[Any, ...]]) -> list[Delivery]:
        conn.executemany(
            "INSERT INTO subscription_deliveries (id, subscription_id, interaction, "
            "resource_type, resource_id, version_id, payload, state, max_attempts, "
            "next_attempt, created, updated) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)", rows)
        marks = ",".join("?" * len(rows))
        return [Delivery.from_row(r) for r in conn.execute(
            f"SELECT * FROM subscription_deliveries WHERE id IN ({marks}) ORDER BY seq",
            [r[0] for r in rows])]

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
        rows = self._delivery_rows(specs, interaction, resource, previous)

        def failed(f: Any) -> None:
            log.failure("Could not queue {n} subscription deliveries for {type}/{id}", f,
                        n=len(rows), type=target["resourceType"], id=target["id"])

        d = self.db.run(self._insert, rows)
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

        def claim(conn: Any) -> tuple[list[Delivery], float | None]:
            rows = conn.execute(
                "SELECT * FROM subscription_deliveries d WHERE d.state=? AND d.leased=0 AND "
                "d.next_attempt<=? AND NOT EXISTS (SELECT 1 FROM subscription_deliveries e "
                "WHERE e.state=? AND e.subscription_id=d.subscription_id AND "
                "e.resource_type=d.resource_type AND e.resource_id=d.resource_id AND "
                "e.seq<d.seq) ORDER BY d.seq LIMIT ?",
                (PENDING, now, PENDING, free)).fetchall()
            claimed = []
            for row in rows:
                conn.execute(
                    "UPDATE subscription_deliveries SET leased=1, attempts=attempts+1, "
                    "next_attempt=?, updated=? WHERE id=?", (now + lease, now, row["id"]))
                delivery = Delivery.from_row(row)
                delivery.attempts += 1
                claimed.append(delivery)
            # The next time something becomes due by itself; rows due now but left for lack
            # of a free slot, or waiting behind an older one, are picked up when an attempt
            # finishes.
            nxt = conn.execute(
                "SELECT MIN(d.next_attempt) FROM subscription_deliveries d WHERE d.state=? AND "
                "d.leased=0 AND d.next_attempt>? AND NOT EXISTS (SELECT 1 FROM "
                "subscription_deliveries e WHERE e.state=? AND "
                "e.subscription_id=d.subscription_id AND e.resource_type=d.resource_type AND "
                "e.resource_id=d.resource_id AND e.seq<d.seq)",
                (PENDING, now, PENDING)).fetchone()[0]
            return claimed, nxt

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

        self.db.run(claim).addCallbacks(claimed, failed)

    def _lease(self) -> float:
        limit = getattr(self.runner, "max_time_limit", b.MAX_TIME_LIMIT)
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
        counts = run.outcome not in (b.STOPPED, b.BUSY)
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
        outcome = b.SUCCESS if ok else b.ERROR
        if getattr(self.runner, "audit", False) and not getattr(self.runner, "stopped", False) \
                and self._running:
            event = b.audit_event(
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
        delay = retry_delay(max(1, attempts), self.retry_base, self.retry_cap)
        if not counts:
            delay = min(delay, 5.0)
        now = self.clock.seconds()
        delivery.attempts = attempts
        delivery.next_attempt = now + delay
        delivery.last_error = detail

        def txn(conn: Any) -> None:
            conn.execute(
                "UPDATE subscription_deliveries SET leased=0, attempts=?, next_attempt=?, "
                "last_error=?, updated=? WHERE id=?",
                (attempts, now + delay, detail[:1000], now, delivery.id))

        log.warn("Subscription/{sub} delivery {id} attempt {n}/{max} failed; retry in "
                 "{delay:g}s", sub=delivery.subscription_id, id=delivery.id,
                 n=delivery.attempts, max=delivery.max_attempts, delay=delay)
        self._notify("retry", delivery, detail)
        self._write(txn, delivery)

    def _finish(self, delivery: Delivery, state: str, detail: str) -> None:
        now = self.clock.seconds()
        delivery.state = state
        delivery.last_error = None if state == DELIVERED else detail
        keep_payload = state == FAILED  # kept (until the sweep) so it can be examined

        def txn(conn: Any) -> None:
            conn.execute(
                "UPDATE subscription_deliveries SET state=?, leased=0, last_error=?, "
                "updated=?, payload=CASE WHEN ? THEN payload ELSE NULL END WHERE id=?",
                (state, delivery.last_error and delivery.last_error[:1000], now,
                 1 if keep_payload else 0, delivery.id))

        (log.info if state == DELIVERED else log.warn)(
            "Subscription/{sub} delivery {id} {state} after {n} attempt(s)",
            sub=delivery.subscription_id, id=delivery.id, state=state, n=delivery.attempts)
        self._notify(state, delivery, detail)
        self._write(txn, delivery)

    def _write(self, txn: Callable[[Any], None], delivery: Delivery) -> None:
        def done(_: Any) -> None:
            self._in_flight.pop(delivery.id, None)
            self._pump()

        def failed(f: Any) -> None:
            self._in_flight.pop(delivery.id, None)
            log.failure("Recording subscription delivery {id} failed", f, id=delivery.id)

        self.db.run(txn).addCallbacks(done, failed)

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

        def txn(conn: Any) -> int:
            n = conn.execute(
                "DELETE FROM subscription_deliveries WHERE state IN (?, ?) AND updated<?",
                (DELIVERED, CANCELLED, now - self.retention)).rowcount
            n += conn.execute(
                "DELETE FROM subscription_deliveries WHERE state=? AND updated<?",
                (FAILED, now - self.failed_retention)).rowcount
            return n

        d = self.db.run(txn)
        d.addErrback(lambda f: log.failure("Sweeping subscription deliveries failed", f))
        return d

    def deliveries(self, subscription_id: str | None = None, state: str | None = None,
                   limit: int = 100) -> Deferred[list[Delivery]]:
        """Queued and finished deliveries, newest first (for tools and tests)."""
        def txn(conn: Any) -> list[Delivery]:
            clauses, args = [], []
            if subscription_id:
                clauses.append("subscription_id=?")
                args.append(subscription_id)
            if state:
                clauses.append("state=?")
                args.append(state)
            where = " AND ".join(clauses) or "1=1"
            return [Delivery.from_row(r) for r in conn.execute(
                f"SELECT * FROM subscription_deliveries WHERE {where} ORDER BY seq DESC "
                "LIMIT ?", (*args, limit))]

        return self.db.run(txn)
