"""
Composition of the relay: database, store, auth, journal, hub, HTTP site and listeners.

Building a L{RelayService} only wires objects; it touches no disk and opens no socket.  The
data folder and the token key are made in C{privilegedStartService} (as the user twistd
starts as, like before), the database opens and the listeners bind on start.  Stopping is
ordered and waited for: listeners, then hub/bots/subscriptions/timers, then the database
once its in-flight calls are done (L{RelayService.stopService}).

Command line and .tac settings: L{medagent.relay.tap}.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Sequence, cast

from twisted.application import service
from twisted.application.internet import TimerService
from twisted.internet import defer, endpoints
from twisted.internet.defer import Deferred, DeferredList, maybeDeferred
from twisted.internet.task import LoopingCall, deferLater
from twisted.logger import Logger

from medagent import wire
from medagent.metrics import metrics_service, relay_metrics
from medagent.relay.auth import (
    DEFAULT_TOKEN_LIFETIME,
    FILE_KID,
    Authority,
    load_or_create_key,
)
from medagent.relay.bots import (DEFAULT_BOT_USER, DEFAULT_MEMORY_MB, DEFAULT_TIME_LIMIT,
                                 DEFAULT_WORKERS, BotRunner, BotsService, WorkerPool,
                                 base_url_from_listen)
from medagent.relay.channels import ChannelRouter
from medagent.relay.cluster import CLUSTER_POLL, ClusterLink
from medagent.relay.console import (DEFAULT_IDLE as DEFAULT_CONSOLE_IDLE,
                                    DEFAULT_OFFLINE_MINUTES as DEFAULT_ALERT_OFFLINE_MINUTES,
                                    DEFAULT_QUEUE_MINUTES as DEFAULT_ALERT_QUEUE_MINUTES,
                                    Console, EventBroker, ObservedJournal)
from medagent.relay.console.alerts import KINDS as ALERT_KINDS
from medagent.relay.console.alerts import DEFAULT_ERROR_MIN as DEFAULT_ALERT_ERROR_MIN
from medagent.relay.console.alerts import \
    DEFAULT_ERROR_MINUTES as DEFAULT_ALERT_ERROR_MINUTES
from medagent.relay.console.webhook import AlertWebhook, AlertWebhookService
from medagent.relay.console.inbound import inbound_event
from medagent.relay.hub import DEFAULT_CONNECT_TIMEOUT, Hub
from medagent.relay.lanes import LaneControl
from medagent.relay.limits import (
    DEFAULT_MAX_CONNECTIONS,
    DEFAULT_MAX_CONNECTIONS_PER_PEER,
    ConnectionLimits,
    LoginThrottle,
)
from medagent.relay.push import PushService
from medagent.relay.subscriptions import SubscriptionManager, treq_poster
from medagent.relay.webhooks import WebhookPolicy
from medagent.relay.web import DEFAULT_MAX_BODY, DEFAULT_REQUEST_TIMEOUT, Api, RelaySite, Root
from medagent.relay.ws import (
    DEFAULT_MAX_PENDING,
    AcceptGate,
    DEFAULT_MAX_PENDING_PER_PEER,
    websocket_resource,
)
from medagent.storage import open_storage
from medagent.storage.interfaces import PushJournal
from medagent.storage.sqlite import (
    RELAY_SCHEMA,
    Database,
    SQLiteClientRegistry,
    SQLiteDeliveryQueue,
    SQLiteInboundLog,
    SQLiteJournal,
    SQLiteLanePauses,
    SQLiteStore,
    open_relay_database,  # noqa: F401 (the CLI's database, without a running relay)
)

log = Logger()

#: the console's error rate alert, percent of the pushes ended in its window (0: off)
DEFAULT_ALERT_ERROR_PERCENT = 50.0

# The relay's defaults, one place each: used by RelayService, medagent.relay.tap (twistd
# options) and tac/relay.tac.  Others live with their subsystem and are re-exported here:
# DEFAULT_MAX_BODY (web), DEFAULT_MAX_MESSAGE (wire), DEFAULT_TOKEN_LIFETIME (auth),
# DEFAULT_WORKERS, DEFAULT_MEMORY_MB, DEFAULT_TIME_LIMIT, DEFAULT_BOT_USER (bots).
DEFAULT_LISTEN = "tcp:8103:interface=127.0.0.1"
DEFAULT_DATA = "./relay-data"
DEFAULT_HEARTBEAT_INTERVAL = 10.0
DEFAULT_SYNCHRONOUS = "NORMAL"
DEFAULT_RETENTION_DAYS = 30.0
#: The inbound log: payloads kept (``on``) or metadata only (``off``), for this many days,
#: at most this many messages (the oldest go first), pruned this often (seconds).
DEFAULT_INBOUND_LOG = "on"
DEFAULT_INBOUND_RETENTION_DAYS = 7.0
DEFAULT_INBOUND_MAX_ROWS = 1_000_000
INBOUND_PRUNE_INTERVAL = 600.0
#: One prune of the inbound log deletes in batches of this many, at most this many batches.
INBOUND_PRUNE_BATCH = 5000
INBOUND_PRUNE_BATCHES = 200
DEFAULT_MAX_MESSAGE = wire.DEFAULT_MAX_MESSAGE_SIZE
DEFAULT_SUBSCRIPTION_RETRY_BASE = 10.0
#: seconds a stop waits for the database calls still in flight before it closes it anyway
DRAIN_TIMEOUT = 10.0
#: failed /oauth2/token attempts per client id, per address, and the window they count in
DEFAULT_LOGIN_FAILURES_PER_CLIENT = 10
DEFAULT_LOGIN_FAILURES_PER_ADDRESS = 30
DEFAULT_LOGIN_FAILURE_WINDOW = 300.0


class _RelayDatabase(Database):
    """
    The relay's database: it knows its unfinished calls, so a stop can wait for them (a push
    or a bot's write in flight finishes, its follow-up writes included); a call after the
    stop fails as a Deferred (L{DatabaseStopped}), as for every L{Database}.
    """

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.pending: set[Deferred[Any]] = set()

    def run(self, fn: Any, *args: Any) -> Deferred[Any]:
        d = super().run(fn, *args)
        self.pending.add(d)

        def done(result: Any) -> Any:
            self.pending.discard(d)
            return result

        return d.addBoth(done)

    async def drain(self, clock: Any, timeout: float = DRAIN_TIMEOUT) -> None:
        """Wait (up to C{timeout}s) until no call is in flight, follow-up calls included."""
        if not self.pending:
            return
        deadline = clock.seconds() + timeout
        while self.pending:
            remaining = deadline - clock.seconds()
            if remaining <= 0:
                log.warn("Closing the database with {n} call(s) still in flight",
                         n=len(self.pending))
                return
            # a gate of our own: a timeout must not cancel the callers' Deferreds
            gate: Deferred[None] = Deferred()

            def open_gate(_: Any = None) -> None:
                if not gate.called:
                    gate.callback(None)

            DeferredList(list(self.pending)).addCallback(open_gate)
            timer = clock.callLater(remaining, open_gate)
            await gate
            if timer.active():
                timer.cancel()
            # a follow-up may be issued on the next turn (callFromThread, callLater(0))
            await deferLater(clock, 0, lambda: None)


def open_database(reactor: Any, data_dir: str,
                  synchronous: str = DEFAULT_SYNCHRONOUS) -> "_RelayDatabase":
    return _RelayDatabase(reactor, os.path.join(data_dir, "relay.sqlite"), schema=RELAY_SCHEMA,
                          synchronous=synchronous, name="relay-db",
                          migrations=[SQLiteJournal.migrate])


def open_authority(db: Database, data_dir: str, **kw: Any) -> Authority:
    return Authority(SQLiteClientRegistry(db),
                     load_or_create_key(os.path.join(data_dir, "token.key")), **kw)


def prepare_data_dir(data_dir: str) -> None:
    """The data folder, the relay's user only: it holds the token key and the database."""
    os.makedirs(data_dir, mode=0o700, exist_ok=True)
    os.chmod(data_dir, 0o700)


class _DatabaseService(service.Service):
    """Opens the database on start; closing it is L{RelayService.stopService}'s last step."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def startService(self) -> None:
        self.db.start()
        super().startService()

    def stopService(self) -> None:
        super().stopService()
        self.db.stop()


class Listener(service.Service):
    """
    One endpoint (a strports string) serving C{factory}.  Like
    L{twisted.application.strports.service}, it binds in C{privilegedStartService} (ports
    below 1024 before twistd sheds root), and it keeps the port, so the relay can say (and a
    test can learn) the address it really got (C{tcp:0}).
    """

    def __init__(self, reactor: Any, description: str, factory: Any) -> None:
        self.reactor = reactor
        self.description = description
        self.factory = factory
        self.port: Any = None
        #: called with this listener once its port is bound
        self.on_bound: list[Callable[[Listener], None]] = []
        self._listening: Deferred[Any] | None = None

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        if self._listening is None:
            endpoint = endpoints.serverFromString(self.reactor, self.description)
            self._listening = endpoint.listen(self.factory)
            self._listening.addCallbacks(self._bound, self._failed)

    def startService(self) -> None:
        super().startService()
        if self._listening is None:
            self.privilegedStartService()  # _bound says the address (now or once bound)
        elif self.port is not None:
            self._say()

    def _bound(self, port: Any) -> Any:
        self.port = port
        for observer in self.on_bound:
            observer(self)
        if self.running:
            self._say()
        return port

    def _say(self) -> None:
        """Once started (the relay's listeners start last): the address this port got."""
        log.info("medagent relay listening on {url}", url=self.url() or self.description)

    def _failed(self, f: Any) -> None:
        if f.check(defer.CancelledError):
            return
        log.failure("Could not listen on {listen}", f, listen=self.description)

    def url(self) -> str | None:
        """C{http://host:port} of the bound TCP port (None until bound, or not TCP)."""
        host = getattr(self.port.getHost(), "host", None) if self.port is not None else None
        if host is None or not hasattr(self.port.getHost(), "port"):
            return None
        if host in ("0.0.0.0", ""):
            host = "127.0.0.1"
        elif host == "::":
            host = "::1"
        if ":" in host:
            host = f"[{host}]"
        scheme = "https" if self.description.lower().startswith("ssl") else "http"
        return f"{scheme}://{host}:{self.port.getHost().port}"

    def stopService(self) -> Deferred[Any]:
        super().stopService()
        listening, self._listening = self._listening, None
        if listening is None:
            return defer.succeed(None)
        if self.port is None:
            listening.cancel()
            return defer.succeed(None)
        port, self.port = self.port, None
        return maybeDeferred(port.stopListening)


#: Seconds between re-reads of the revoked clients (revocations made on another node, or by
#: ``medagent client revoke --data`` while the relay runs); one on this node applies at once.
REVOCATION_REFRESH = 5.0


#: seconds between a cluster node's reads of the shared signing keys (a third of
#: L{medagent.storage.postgres.keys.PUBLISH_DELAY}: a new key is read before it signs)
KEY_REFRESH = 60.0


class _Periodic(TimerService):
    """A TimerService that may be stopped without having started (the relay stops every
    child, started or not)."""

    def stopService(self) -> Any:
        if getattr(self, "_loop", None) is None:
            return service.Service.stopService(self)
        return super().stopService()


class _KeyRingRefresh(_Periodic):
    """
    On a cluster: reads the signing keys every node shares at start (tokens get 503 until
    then; the data folder's C{token.key}, when there is one, becomes the first key so the
    tokens it signed stay valid), then every L{KEY_REFRESH} seconds (rotations, retired
    keys).  A failed read keeps the ring it has.
    """

    def __init__(self, reactor: Any, authority: Authority, keys: Any, key_file: str) -> None:
        super().__init__(1.0, self.refresh)
        self.clock = reactor
        self.authority = authority
        self.keys = keys
        self.key_file = key_file
        self.first: tuple[str, bytes] | None = None
        self.reading = False
        self.failing = False
        self.loaded_at: float | None = None

    def startService(self) -> None:
        if os.path.exists(self.key_file):
            self.first = (FILE_KID, load_or_create_key(self.key_file))
        super().startService()

    def refresh(self) -> None:
        """Every second until the first read succeeds, then every L{KEY_REFRESH} seconds."""
        now = self.clock.seconds()
        if self.reading or (self.authority.ready and self.loaded_at is not None
                            and now - self.loaded_at < KEY_REFRESH):
            return
        self.reading = True

        def loaded(ring: tuple[dict[str, bytes], str]) -> None:
            keys, signing = ring
            self.authority.set_keys(keys, signing)
            self.loaded_at = now
            self.failing = False

        def failed(f: Any) -> None:
            if not self.failing:  # once per outage, not once a second
                log.warn("Reading the shared signing keys failed ({error}); keeping the ones "
                         "read before, trying again", error=f.getErrorMessage())
            self.failing = True

        def done(_: Any) -> None:
            self.reading = False

        self.keys.load(self.first).addCallbacks(loaded, failed).addBoth(done)


class _RevocationRefresh(_Periodic):
    """Reads the revoked clients at start (tokens get 503 until then), then periodically."""

    def __init__(self, reactor: Any, authority: Authority,
                 interval: float = REVOCATION_REFRESH) -> None:
        super().__init__(interval, self.refresh)
        self.clock = reactor
        self.authority = authority

    def refresh(self) -> None:
        self.authority.refresh_revocations().addErrback(
            lambda f: log.failure("Reading revoked clients failed", f))


def default_node_id() -> str:
    """This relay node's name in the cluster's session table: host and process."""
    import socket

    return f"{socket.gethostname()}-{os.getpid()}"


class _HubService(service.Service):
    """
    Closes the agents' sockets on stop; on a cluster, renews their session leases, listens
    for the other nodes' notices and polls (L{medagent.relay.cluster.ClusterLink}).
    """

    def __init__(self, hub: Hub) -> None:
        self.hub = hub
        self.renewal: LoopingCall | None = None
        self.poll: LoopingCall | None = None

    def startService(self) -> None:
        super().startService()
        self.hub.warm_agent_cache()
        if self.hub.agent_sessions is not None:
            self.renewal = LoopingCall(self.hub.renew_sessions)
            self.renewal.clock = self.hub.clock
            self.renewal.start(self.hub.session_lease / 3, now=False)
        if self.hub.cluster is not None:
            self.hub.cluster.start()
            self.poll = LoopingCall(self.hub.cluster.poll)
            self.poll.clock = self.hub.clock
            self.poll.start(CLUSTER_POLL, now=False)

    def stopService(self) -> None:
        for call in (self.renewal, self.poll):
            if call is not None and call.running:
                call.stop()
        self.renewal = self.poll = None
        if self.hub.cluster is not None:
            self.hub.cluster.stop()
        self.hub.close()
        return super().stopService()


class _Housekeeping(service.Service):
    """Expires overdue queued pushes every minute; prunes old final ones every hour."""

    def __init__(self, reactor: Any, journal: PushJournal, retention: float) -> None:
        self.reactor = reactor
        self.journal = journal
        self.retention = retention
        self.calls: list[LoopingCall] = []

    def startService(self) -> None:
        super().startService()
        for interval, job in ((60.0, self.expire), (3600.0, self.prune)):
            call = LoopingCall(job)
            call.clock = self.reactor
            call.start(interval, now=False)
            self.calls.append(call)

    def stopService(self) -> None:
        for call in self.calls:
            if call.running:
                call.stop()
        self.calls = []
        return super().stopService()

    def expire(self) -> None:
        def expired(n: int) -> None:
            if n:
                log.info("{n} queued push(es) expired", n=n)

        self.journal.expire_overdue().addCallbacks(
            expired, lambda f: log.failure("Expiring pushes failed", f))

    def prune(self) -> None:
        def pruned(n: int) -> None:
            if n:
                log.info("Pruned {n} old push(es) and their payloads", n=n)

        self.journal.prune(self.retention).addCallbacks(
            pruned, lambda f: log.failure("Pruning the journal failed", f))


class _InboundHousekeeping(service.Service):
    """Bounds the inbound log: every L{INBOUND_PRUNE_INTERVAL} seconds on C{clock}, deletes
    messages older than C{retention} seconds, then the oldest beyond C{max_rows}."""

    def __init__(self, clock: Any, inbound: Any, retention: float,
                 max_rows: int | None) -> None:
        self.clock = clock
        self.inbound = inbound
        self.retention = retention
        self.max_rows = max_rows
        self.call: LoopingCall | None = None

    def startService(self) -> None:
        super().startService()
        self.call = LoopingCall(self.prune)
        self.call.clock = self.clock
        self.call.start(INBOUND_PRUNE_INTERVAL, now=False)

    def stopService(self) -> None:
        if self.call is not None and self.call.running:
            self.call.stop()
        self.call = None
        return super().stopService()

    def prune(self) -> Deferred[None]:
        """Delete in batches (short transactions) until a batch is not full, at most
        L{INBOUND_PRUNE_BATCHES} of them a run (the rest waits for the next)."""
        return Deferred.fromCoroutine(self._prune())

    async def _prune(self) -> None:
        before = self.clock.seconds() - self.retention
        total = 0
        try:
            for _ in range(INBOUND_PRUNE_BATCHES):
                n = await self.inbound.prune(before, self.max_rows, INBOUND_PRUNE_BATCH)
                total += n
                if n < INBOUND_PRUNE_BATCH:
                    break
        except Exception:
            log.failure("Pruning the inbound log failed")
        if total:
            log.info("Pruned {n} old inbound message(s)", n=total)


class RelayService(service.MultiService):
    """
    The relay's service tree; attributes expose the parts to tests and tools.

    C{listen} is one strports string or several (each a listener on the same site).
    """

    def __init__(
        self,
        reactor: Any,
        *,
        data_dir: str = DEFAULT_DATA,
        listen: str | Sequence[str] = DEFAULT_LISTEN,
        base_url: str | None = None,
        max_body: int = DEFAULT_MAX_BODY,
        max_message_size: int = DEFAULT_MAX_MESSAGE,
        heartbeat_interval: float = DEFAULT_HEARTBEAT_INTERVAL,
        token_lifetime: int = DEFAULT_TOKEN_LIFETIME,
        synchronous: str = DEFAULT_SYNCHRONOUS,
        retention_days: float = DEFAULT_RETENTION_DAYS,
        bot_workers: int = DEFAULT_WORKERS,
        bot_memory_mb: int = DEFAULT_MEMORY_MB,
        bot_time_limit: float = DEFAULT_TIME_LIMIT,
        bot_base_url: str | None = None,
        bot_user: str | None = DEFAULT_BOT_USER,
        bots_unsandboxed: bool = False,
        subscription_retry_base: float = DEFAULT_SUBSCRIPTION_RETRY_BASE,
        webhook_allow: Sequence[str] = (),
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        max_connections_per_peer: int = DEFAULT_MAX_CONNECTIONS_PER_PEER,
        max_pending_agents: int = DEFAULT_MAX_PENDING,
        max_pending_agents_per_peer: int = DEFAULT_MAX_PENDING_PER_PEER,
        request_timeout: float = DEFAULT_REQUEST_TIMEOUT,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
        login_failures_per_client: int = DEFAULT_LOGIN_FAILURES_PER_CLIENT,
        login_failures_per_address: int = DEFAULT_LOGIN_FAILURES_PER_ADDRESS,
        login_failure_window: float = DEFAULT_LOGIN_FAILURE_WINDOW,
        metrics: str | None = None,
        database: str | None = None,
        node_id: str | None = None,
        access_log: bool = False,
        console_idle: float = DEFAULT_CONSOLE_IDLE,
        alert_offline_minutes: float = DEFAULT_ALERT_OFFLINE_MINUTES,
        alert_queue_minutes: float = DEFAULT_ALERT_QUEUE_MINUTES,
        alert_error_percent: float = DEFAULT_ALERT_ERROR_PERCENT,
        alert_error_minutes: float = DEFAULT_ALERT_ERROR_MINUTES,
        alert_error_min: int = DEFAULT_ALERT_ERROR_MIN,
        alert_webhook: str | None = None,
        inbound_log: str = DEFAULT_INBOUND_LOG,
        inbound_retention_days: float = DEFAULT_INBOUND_RETENTION_DAYS,
        inbound_max_rows: int | None = DEFAULT_INBOUND_MAX_ROWS,
    ) -> None:
        super().__init__()
        self.reactor = reactor
        self.data_dir = data_dir
        self.listen = [listen] if isinstance(listen, str) else list(listen)
        if not self.listen:
            raise ValueError("The relay needs at least one listen endpoint")
        self._prepared = False
        self._key_ring: _KeyRingRefresh | None = None
        # --database: SQLite in data_dir (none) or a shared PostgreSQL (postgresql://...)
        storage = open_storage(database, data_dir, reactor, synchronous=synchronous) \
            if database else None
        self.db = storage.db if storage is not None else \
            open_database(reactor, data_dir, synchronous)
        self._db_service = _DatabaseService(self.db)
        self._db_service.setServiceParent(self)
        self.store = storage.store if storage is not None else SQLiteStore(self.db)
        registry = storage.registry if storage is not None else SQLiteClientRegistry(self.db)
        deliveries = storage.deliveries if storage is not None else \
            SQLiteDeliveryQueue(self.db)
        # the key is read (or made) at start: L{_prepare}
        self.authority = Authority(registry, None,
                                   token_lifetime=token_lifetime)
        _RevocationRefresh(reactor, self.authority).setServiceParent(self)
        journal = storage.journal if storage is not None else SQLiteJournal(self.db)
        # the console's live view hears of every push created or moved on this node
        self.console_events = EventBroker(reactor)
        self.journal: PushJournal = cast(
            PushJournal, ObservedJournal(journal, self.console_events, reactor))
        self.hub = Hub(
            reactor,
            self.authority,
            self.store,
            self.journal,
            heartbeat_interval=heartbeat_interval,
            max_message_size=max_message_size,
            connect_timeout=connect_timeout,
        )
        shared_sessions = None
        if storage is not None and storage.backend == "postgresql":
            # relay nodes on one database: one session per agent across all of them
            from medagent.storage.postgres import (
                PgAgentCalls,
                PgAgentSessions,
                PgConsoleSessions,
                PgNotices,
                PgSigningKeys,
            )

            shared_sessions = PgConsoleSessions(storage.db)

            self.hub.agent_sessions = PgAgentSessions(storage.db)
            self._key_ring = _KeyRingRefresh(reactor, self.authority,
                                             PgSigningKeys(storage.db),
                                             os.path.join(data_dir, "token.key"))
            self._key_ring.setServiceParent(self)
            self.hub.node_id = node_id or default_node_id()
            ClusterLink(self.hub, PgNotices(storage.db, reactor), PgAgentCalls(storage.db),
                        reactor, self.hub.node_id)
        _HubService(self.hub).setServiceParent(self)
        _Housekeeping(reactor, self.journal, retention_days * 86400).setServiceParent(self)
        self.pushes = PushService(self.hub, self.store, self.journal, reactor)
        # paused lanes (issue 12): in the shared storage, read by the node holding the agent
        self.hub.lane_pauses = storage.pauses if storage is not None else \
            SQLiteLanePauses(self.db)
        self.lanes = LaneControl(self.hub, self.store, self.hub.lane_pauses, reactor)
        self.api = Api(self.authority, self.store, self.journal, self.hub, self.pushes,
                       base_url=base_url)
        self.api.database = self.db  # /readyz probes it
        self.api.lanes = self.lanes
        self.api.login_throttle = LoginThrottle(
            reactor, max_failures_per_client=login_failures_per_client,
            max_failures_per_address=login_failures_per_address, window=login_failure_window)
        # Bots (worker processes), Subscriptions and inbound channel routing (issue 6).
        self.bot_pool = WorkerPool(reactor, size=bot_workers, memory_mb=bot_memory_mb,
                                   bot_user=bot_user, unsandboxed=bots_unsandboxed,
                                   hide=[data_dir])
        self.bots = BotRunner(reactor, self.store, self.authority, self.bot_pool,
                              base_url=bot_base_url or base_url_from_listen(self.listen[0]),
                              default_time_limit=bot_time_limit,
                              insecure_loopback=bot_base_url is None)
        policy = WebhookPolicy(webhook_allow)
        post, close_post = treq_poster(reactor, policy)
        self.subscriptions = SubscriptionManager(reactor, deliveries,
                                                 self.store, self.bots,
                                                 poster=post, policy=policy,
                                                 retry_base=subscription_retry_base)
        if self.hub.cluster is not None:  # other nodes' Subscription writes, and ours
            self.hub.cluster.subscriptions = self.subscriptions
            self.subscriptions.subscriptions_changed.append(
                self.hub.cluster.subscriptions_changed)
        # the inbound log (device → agent → relay → Bot): every message and its outcome
        if inbound_log not in ("on", "off"):
            raise ValueError("inbound_log must be 'on' (payloads kept) or 'off' (metadata)")
        self.inbound = storage.inbound if storage is not None else SQLiteInboundLog(self.db)
        self.channels = ChannelRouter(self.store, self.bots, clock=reactor,
                                      inbound_log=self.inbound,
                                      keep_payloads=inbound_log == "on")
        self.hub.inbound = self.channels
        self.api.inbound = self.inbound
        _InboundHousekeeping(reactor, self.inbound, inbound_retention_days * 86400,
                             inbound_max_rows).setServiceParent(self)
        self.api.bots = self.bots
        bots_service = BotsService(self.bot_pool, self.bots, self.subscriptions, [close_post],
                                   reactor=reactor)
        bots_service.setServiceParent(self)
        #: pauses the listeners while max_pending_agents sockets wait to authenticate
        self.accept_gate = AcceptGate(reactor, high=max_pending_agents)
        ws = websocket_resource(reactor, self.hub, max_pending=max_pending_agents,
                                max_pending_per_peer=max_pending_agents_per_peer,
                                gate=self.accept_gate)
        self.site = RelaySite(Root(self.api, ws),  # type: ignore[arg-type]  # autobahn's
                              # WebSocketResource provides IResource via zope, unseen by mypy
                              max_body=max_body,
                              request_timeout=request_timeout,
                              authenticate=self.authority.authenticate, reactor=reactor,
                              access_log=access_log)
        bots_service.site = self.site
        # The operators' console at /console (issue 12).
        self.console = Console(reactor, self.authority, self.store, self.journal, self.hub,
                               self.pushes, self.console_events, base_url=base_url,
                               throttle=self.api.login_throttle, idle=console_idle,
                               alert_offline=alert_offline_minutes * 60,
                               alert_queue_age=alert_queue_minutes * 60,
                               alert_error_rate=alert_error_percent / 100,
                               alert_error_window=alert_error_minutes * 60,
                               alert_error_min=alert_error_min,
                               shared_sessions=shared_sessions)
        self.console.inbound = self.inbound
        self.channels.recorded.append(  # live: each message recorded here (no payload)
            lambda m: self.console_events.publish("inbound", inbound_event(m)))
        self.api.routes["console"] = self.console.resource
        self.console.lanes = self.lanes
        #: the alerts' webhook (--alert-webhook), or None
        self.alert_webhook: AlertWebhook | None = None
        if alert_webhook and self.console.alerts is not None:
            hook_post, close_hook = treq_poster(reactor, WebhookPolicy([alert_webhook]))
            self.alert_webhook = AlertWebhook(reactor, hook_post, alert_webhook)
            self.console.alerts.listeners.append(self.alert_webhook)
            AlertWebhookService(self.alert_webhook, close_hook).setServiceParent(self)
        self.console.service().setServiceParent(self)
        self.limits = ConnectionLimits(self.site, max_connections=max_connections,
                                       max_per_peer=max_connections_per_peer)
        self.listeners = [Listener(reactor, description, self.limits)
                          for description in self.listen]
        for listener in self.listeners:
            listener.setServiceParent(self)
            listener.on_bound.append(lambda bound: self.accept_gate.add_port(bound.port))
        if self.bots.base_url is None:
            # e.g. tcp:0: the first listener's address, once it has one
            self.listeners[0].on_bound.append(self._bot_url_from_listener)

        # Metrics (/metrics on a listener of its own, off unless --metrics names one).
        self.metrics = relay_metrics(self.hub, self.bots, deliveries.backlog, reactor)
        if self.console.alerts is not None:
            self.metrics.watch_alerts(self.console.alerts, ALERT_KINDS)
        if self.alert_webhook is not None:
            self.metrics.watch_alert_webhook(self.alert_webhook)
        self.channels.metrics = self.metrics
        if metrics:
            metrics_service(metrics, self.metrics, reactor).setServiceParent(self)

    @property
    def listener(self) -> Listener:
        """The first listener (most relays have one)."""
        return self.listeners[0]

    def urls(self) -> list[str]:
        """The bound listeners' C{http(s)://host:port} (after start)."""
        return [url for url in (lst.url() for lst in self.listeners) if url]

    def _prepare(self) -> None:
        """The disk work a constructor must not do: the data folder and the token key."""
        if self._prepared:
            return
        prepare_data_dir(self.data_dir)
        if self._key_ring is None:  # (a cluster's keys are in its database)
            self.authority.set_key(load_or_create_key(os.path.join(self.data_dir,
                                                                   "token.key")))
        self._prepared = True

    def privilegedStartService(self) -> None:
        self._prepare()
        super().privilegedStartService()

    def startService(self) -> None:
        self._prepare()
        super().startService()

    def _bot_url_from_listener(self, listener: Listener) -> None:
        if self.bots.base_url is None:
            self.bots.base_url = listener.url()

    def stopService(self) -> Deferred[None]:
        """
        In order, each step waited for (L{service.MultiService} stops all children at once,
        so the database could close under a write still in flight): the listeners; then the
        hub, bots, subscriptions and timers; then, once its in-flight calls are done, the
        database.
        """
        service.Service.stopService(self)
        children = list(self)[::-1]
        listeners = [c for c in children if isinstance(c, Listener)]
        middle = [c for c in children if c not in listeners and c is not self._db_service]
        return Deferred.fromCoroutine(self._stop(listeners, middle))

    async def _stop(self, listeners: list[Any], middle: list[Any]) -> None:
        for group in (listeners, middle):
            results = await DeferredList([maybeDeferred(c.stopService) for c in group])
            for ok, value in results:
                if not ok:
                    log.failure("Stopping a relay service failed", value)
            if group is listeners:
                self.accept_gate.stop()
        try:
            if isinstance(self.db, _RelayDatabase):  # (PostgreSQL: its pool finishes its work)
                await self.db.drain(self.reactor)
        finally:
            self._db_service.stopService()
