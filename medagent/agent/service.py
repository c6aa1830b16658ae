"""
Composition of the agent: relay client, dispatcher with every device sender, the protocol
app, and the websocket uplink.
"""

from __future__ import annotations

import base64
import os
from typing import Any, Callable, Mapping, cast

from twisted.application import service
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.task import LoopingCall
from twisted.internet.threads import deferToThreadPool
from twisted.logger import ILogObserver, Logger, globalLogPublisher
from twisted.python.threadpool import ThreadPool

from medagent import schemes
from medagent.agent.allow import DestinationPolicy
from medagent.agent.app import AgentApp
from medagent.agent.channels import ChannelManager, ChannelSpec, specs_from_resources
from medagent.agent.config import AgentConfig
from medagent.agent.dispatch import Dispatcher
from medagent.agent.outbox import Outbox
from medagent.agent.queue import DurableQueue
from medagent.agent.uplink import uplink_service
from medagent.client import MedagentClient
from medagent.delivery import Sender
from medagent.storage.sqlite.database import Database
from medagent.logbuffer import LogBuffer
from medagent.metrics import agent_metrics, metrics_service

log = Logger()


def default_senders(reactor: Any, worklist: Callable[[str], Any],
                    astm_inbound: Callable[[str, str, str], Any] | None = None,
                    config: AgentConfig | None = None) -> dict[str, Sender]:
    """
    One sender per destination scheme of the registry (L{medagent.schemes});
    C{worklist(name)} finds a worklist channel.
    """
    context = schemes.SenderContext(
        tls_ca=config.tls_ca if config else None,
        tls_cert=config.tls_cert if config else None,
        tls_key=config.tls_key if config else None,
        worklist=worklist,
        astm_inbound=astm_inbound,
    )
    return schemes.build_senders(reactor, context)


class AgentService(service.MultiService):
    def __init__(
        self,
        reactor: Any,
        config: AgentConfig,
        *,
        senders: Mapping[str, Sender] | None = None,
        metrics: str | None = None,
    ) -> None:
        super().__init__()
        self.reactor = reactor
        self.config = config
        self.client = MedagentClient(reactor, config.relay, config.client_id,
                                     config.client_secret)
        self.dispatcher = Dispatcher({})
        self.dispatcher.policy = DestinationPolicy.from_setting(config.allow_destinations)
        self.logs = LogBuffer()
        self.db = Database(reactor, os.path.join(config.data_dir, "agent.sqlite"),
                           schema=DurableQueue.schema() + Outbox.schema(),
                           synchronous=config.synchronous, name="agent-db")
        self.app = AgentApp(
            reactor,
            config.agent_id,
            self.client,
            self.dispatcher,
            self.db,
            heartbeat_interval=config.heartbeat_interval,
            log_buffer=self.logs.newest,
            reload_config=self.reload_channels,
        )
        self.channels = ChannelManager(reactor, self.app.outbox,
                                       lambda: Deferred.fromCoroutine(self._fetch_config()),
                                       config.data_dir, upload_binary=self._upload_binary)
        self._files = ThreadPool(minthreads=0, maxthreads=2, name="agent-files")
        # Analyzer results arriving on an ASTM push link (contention) go up like a channel's,
        # as channel "astm" (give the Agent a channel of that name to route them to a Bot).
        astm_inbound = lambda ct, body, remote: self.app.outbox.forward_and_wait(  # noqa: E731
            "astm", ct, body, remote)
        for scheme, sender in (senders if senders is not None
                               else default_senders(reactor, self.channels.worklist,
                                                    astm_inbound, config)).items():
            self.dispatcher.add_sender(scheme, sender)
        self.app.capabilities = (*self.app.capabilities, *self.dispatcher.schemes())
        self.channels.setServiceParent(self)
        self._channels_loaded = False
        self.app.on_live.append(self._first_live)
        self.uplink = uplink_service(reactor, config.relay, self.app)
        self.uplink.setServiceParent(self)
        # Metrics (/metrics on a listener of its own, off unless --metrics names one).
        self.metrics = agent_metrics(self.app)
        if metrics:
            metrics_service(metrics, self.metrics, reactor).setServiceParent(self)

    def startService(self) -> None:
        globalLogPublisher.addObserver(cast(ILogObserver, self.logs))
        log.info("medagent agent {agent_id} starting; relay {relay}",
                 agent_id=self.config.agent_id, relay=self.config.relay)
        if self.dispatcher.policy.open:
            log.warn("No allowDestinations set: this agent connects to any host:port the relay "
                     "names. Set allowDestinations (agent.properties) or --allow-destinations "
                     "to the site's devices.")
        self.db.start()
        self.app.start().addErrback(
            lambda f: log.failure("Could not open the agent's queue in {path}", f,
                                  path=self.db.path))
        self._pruner = LoopingCall(self._prune)
        self._pruner.clock = self.reactor
        self._pruner.start(3600, now=False)
        super().startService()

    async def _fetch_config(self) -> list[ChannelSpec]:
        agent = await self.client.read("Agent", self.config.agent_id)
        endpoints = {}
        for channel in agent.get("channel") or []:
            ref = (channel.get("endpoint") or {}).get("reference") or ""
            if ref.startswith("Endpoint/"):
                endpoints[ref[len("Endpoint/"):]] = await self.client.read(
                    "Endpoint", ref[len("Endpoint/"):])
        return specs_from_resources(agent, endpoints)

    def _upload_binary(self, path: str, content_type: str) -> Deferred[str]:
        """A file on the agent's disk → a ``Binary`` on the relay; fires with its reference."""
        def read() -> str:
            with open(path, "rb") as f:
                return base64.b64encode(f.read()).decode("ascii")

        if not self._files.started:
            self._files.start()

        async def upload() -> str:
            data = await deferToThreadPool(self.reactor, self._files, read)
            binary = await self.client.create({"resourceType": "Binary",
                                               "contentType": content_type, "data": data})
            return f"Binary/{binary['id']}"

        return Deferred.fromCoroutine(upload())

    def reload_channels(self) -> Deferred[None]:
        """Re-read Agent + Endpoints and apply the channel changes ($reload-config)."""
        return Deferred.fromCoroutine(self._fetch_config()).addCallback(self.channels.apply)

    def _first_live(self) -> None:
        if self._channels_loaded:
            return

        def loaded(_: Any) -> None:
            self._channels_loaded = True

        self.reload_channels().addCallbacks(
            loaded, lambda f: log.error("Could not load channel settings: {error}; will retry "
                                        "on the next connect", error=f.getErrorMessage()))

    def _prune(self) -> None:
        def pruned(n: int) -> None:
            if n:
                log.info("Pruned {n} confirmed answer(s) from the queue", n=n)

        self.app.queue.prune(self.config.retention_seconds).addCallbacks(
            pruned, lambda f: log.failure("Pruning the queue failed", f))

    def stopService(self) -> Deferred[Any]:
        self.app.stop()
        if self._files.started:
            self._files.stop()
        if self._pruner.running:
            self._pruner.stop()
        d = super().stopService() or Deferred.fromCoroutine(_none())

        def closed(_: Any) -> Deferred[Any]:
            globalLogPublisher.removeObserver(cast(ILogObserver, self.logs))
            d2 = DeferredList([self.dispatcher.close(), self.client.close()],
                              consumeErrors=True)
            return d2.addCallback(lambda _: self.db.stop())

        return d.addCallback(closed)


async def _none() -> None:
    return None
