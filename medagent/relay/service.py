"""
Composition of the relay: database, store, auth, journal, hub, HTTP site and listener.
"""

from __future__ import annotations

import os
from typing import Any, Sequence

from twisted.application import service, strports
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from medagent import wire
from medagent.relay.auth import Authority, load_or_create_key
from medagent.relay.bots import BotRunner, BotsService, WorkerPool, base_url_from_listen
from medagent.relay.channels import ChannelRouter
from medagent.relay.hub import Hub
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
    DEFAULT_MAX_PENDING_PER_PEER,
    websocket_resource,
)
from medagent.storage import open_storage
from medagent.storage.interfaces import PushJournal
from medagent.storage.sqlite import (
    Database,
    SQLiteClientRegistry,
    open_relay_database,
)

log = Logger()

DEFAULT_LISTEN = "tcp:8103:interface=127.0.0.1"
DEFAULT_DATA = "./relay-data"


def open_database(reactor: Any, data_dir: str, synchronous: str = "NORMAL") -> Database:
    return open_relay_database(reactor, data_dir, synchronous)


def open_authority(db: Database, data_dir: str, **kw: Any) -> Authority:
    return Authority(SQLiteClientRegistry(db),
                     load_or_create_key(os.path.join(data_dir, "token.key")), **kw)


class _DatabaseService(service.Service):
    def __init__(self, db: Database) -> None:
        self.db = db

    def startService(self) -> None:
        self.db.start()
        super().startService()

    def stopService(self) -> None:
        super().stopService()
        self.db.stop()


#: Seconds between re-reads of the revoked clients (revocations made on another node, or by
#: ``medagent client revoke --data`` while the relay runs); one on this node applies at once.
REVOCATION_REFRESH = 5.0


class _RevocationRefresh(service.Service):
    """Reads the revoked clients at start (tokens get 503 until then), then periodically."""

    def __init__(self, reactor: Any, authority: Authority,
                 interval: float = REVOCATION_REFRESH) -> None:
        self.reactor = reactor
        self.authority = authority
        self.interval = interval
        self.call: LoopingCall | None = None

    def startService(self) -> None:
        super().startService()
        self.call = LoopingCall(self.refresh)
        self.call.clock = self.reactor
        self.call.start(self.interval, now=True)

    def stopService(self) -> None:
        if self.call is not None and self.call.running:
            self.call.stop()
        self.call = None
        return super().stopService()

    def refresh(self) -> None:
        self.authority.refresh_revocations().addErrback(
            lambda f: log.failure("Reading revoked clients failed", f))


class _HubService(service.Service):
    def __init__(self, hub: Hub) -> None:
        self.hub = hub

    def stopService(self) -> None:
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
        self.journal.expire_overdue().addCallbacks(
            lambda n: n and log.info("{n} queued push(es) expired", n=n),
            lambda f: log.failure("Expiring pushes failed", f))

    def prune(self) -> None:
        self.journal.prune(self.retention).addCallbacks(
            lambda n: n and log.info("Pruned {n} old push(es) and their payloads", n=n),
            lambda f: log.failure("Pruning the journal failed", f))


class RelayService(service.MultiService):
    """The relay's service tree; attributes expose the parts to tests and tools."""

    def __init__(
        self,
        reactor: Any,
        *,
        data_dir: str = DEFAULT_DATA,
        listen: str = DEFAULT_LISTEN,
        base_url: str | None = None,
        max_body: int = DEFAULT_MAX_BODY,
        max_message_size: int = wire.DEFAULT_MAX_MESSAGE_SIZE,
        heartbeat_interval: float = 10.0,
        token_lifetime: int = 3600,
        synchronous: str = "NORMAL",
        retention_days: float = 30.0,
        bot_workers: int = 2,
        bot_memory_mb: int = 256,
        bot_time_limit: float = 10.0,
        bot_base_url: str | None = None,
        bot_user: str | None = "medagent-bot",
        bots_unsandboxed: bool = False,
        subscription_retry_base: float = 10.0,
        webhook_allow: Sequence[str] = (),
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        max_connections_per_peer: int = DEFAULT_MAX_CONNECTIONS_PER_PEER,
        max_pending_agents: int = DEFAULT_MAX_PENDING,
        max_pending_agents_per_peer: int = DEFAULT_MAX_PENDING_PER_PEER,
        request_timeout: float = DEFAULT_REQUEST_TIMEOUT,
        connect_timeout: float = 10.0,
        login_failures_per_client: int = 10,
        login_failures_per_address: int = 30,
        login_failure_window: float = 300.0,
        database: str | None = None,
    ) -> None:
        super().__init__()
        os.makedirs(data_dir, mode=0o700, exist_ok=True)
        os.chmod(data_dir, 0o700)  # the key and the database: the relay's user only
        # --database: SQLite in data_dir (none) or a shared PostgreSQL (postgresql://...)
        self.storage = open_storage(database, data_dir, reactor, synchronous=synchronous)
        self.db = self.storage.db
        _DatabaseService(self.db).setServiceParent(self)
        self.store = self.storage.store
        self.authority = Authority(self.storage.registry,
                                   load_or_create_key(os.path.join(data_dir, "token.key")),
                                   token_lifetime=token_lifetime)
        _RevocationRefresh(reactor, self.authority).setServiceParent(self)
        self.journal = self.storage.journal
        self.hub = Hub(
            reactor,
            self.authority,
            self.store,
            self.journal,
            heartbeat_interval=heartbeat_interval,
            max_message_size=max_message_size,
            connect_timeout=connect_timeout,
        )
        _HubService(self.hub).setServiceParent(self)
        _Housekeeping(reactor, self.journal, retention_days * 86400).setServiceParent(self)
        self.pushes = PushService(self.hub, self.store, self.journal, reactor)
        self.api = Api(self.authority, self.store, self.journal, self.hub, self.pushes,
                       base_url=base_url)
        self.api.login_throttle = LoginThrottle(
            reactor, max_failures_per_client=login_failures_per_client,
            max_failures_per_address=login_failures_per_address, window=login_failure_window)
        # Bots (worker processes), Subscriptions and inbound channel routing (issue 6).
        self.bot_pool = WorkerPool(reactor, size=bot_workers, memory_mb=bot_memory_mb,
                                   bot_user=bot_user, unsandboxed=bots_unsandboxed,
                                   hide=[data_dir])
        self.bots = BotRunner(reactor, self.store, self.authority, self.bot_pool,
                              base_url=bot_base_url or base_url_from_listen(listen),
                              default_time_limit=bot_time_limit,
                              insecure_loopback=bot_base_url is None)
        policy = WebhookPolicy(webhook_allow)
        post, close_post = treq_poster(reactor, policy)
        self.subscriptions = SubscriptionManager(reactor, self.storage.deliveries,
                                                 self.store, self.bots,
                                                 poster=post, policy=policy,
                                                 retry_base=subscription_retry_base)
        self.channels = ChannelRouter(self.store, self.bots)
        self.hub.inbound = self.channels
        self.api.bots = self.bots
        bots_service = BotsService(self.bot_pool, self.bots, self.subscriptions, [close_post],
                                   reactor=reactor)
        bots_service.setServiceParent(self)
        ws = websocket_resource(reactor, self.hub, max_pending=max_pending_agents,
                                max_pending_per_peer=max_pending_agents_per_peer)
        self.site = RelaySite(Root(self.api, ws), max_body=max_body,
                              request_timeout=request_timeout,
                              authenticate=self.authority.authenticate, reactor=reactor)
        bots_service.site = self.site
        self.limits = ConnectionLimits(self.site, max_connections=max_connections,
                                       max_per_peer=max_connections_per_peer)
        self.listener = strports.service(listen, self.limits, reactor=reactor)
        self.listener.setServiceParent(self)
        self.listen = listen

    def startService(self) -> None:
        super().startService()
        log.info("medagent relay listening on {listen}", listen=self.listen)
