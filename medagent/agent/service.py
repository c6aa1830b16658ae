"""
Composition of the agent: relay client, dispatcher with every device sender, the protocol
app, and the websocket uplink.
"""

from __future__ import annotations

from typing import Any, Mapping

from twisted.application import service
from twisted.internet.defer import Deferred, DeferredList
from twisted.logger import Logger, globalLogPublisher

from medagent.agent.app import AgentApp
from medagent.agent.config import AgentConfig
from medagent.agent.dispatch import Dispatcher, Sender
from medagent.agent.uplink import uplink_service
from medagent.client import MedagentClient
from medagent.logbuffer import LogBuffer

log = Logger()


def default_senders(reactor: Any) -> dict[str, Sender]:
    """One sender per destination scheme."""
    from medagent.astm.transport import ASTMSender
    from medagent.hl7.protocol import MLLPSender

    mllp = MLLPSender(reactor)
    astm = ASTMSender(reactor)
    return {"mllp": mllp, "mllps": mllp, "astm": astm, "astm+serial": astm}


class AgentService(service.MultiService):
    def __init__(
        self,
        reactor: Any,
        config: AgentConfig,
        *,
        senders: Mapping[str, Sender] | None = None,
    ) -> None:
        super().__init__()
        self.reactor = reactor
        self.config = config
        self.client = MedagentClient(reactor, config.relay, config.client_id,
                                     config.client_secret)
        self.dispatcher = Dispatcher(reactor, senders if senders is not None
                                     else default_senders(reactor))
        self.logs = LogBuffer()
        self.app = AgentApp(
            reactor,
            config.agent_id,
            self.client,
            self.dispatcher,
            heartbeat_interval=config.heartbeat_interval,
            capabilities=tuple(self.dispatcher.schemes()),
            log_buffer=self.logs.newest,
        )
        self.uplink = uplink_service(reactor, config.relay, self.app)
        self.uplink.setServiceParent(self)

    def startService(self) -> None:
        globalLogPublisher.addObserver(self.logs)
        log.info("medagent agent {agent_id} starting; relay {relay}",
                 agent_id=self.config.agent_id, relay=self.config.relay)
        self.app.start()
        super().startService()

    def stopService(self) -> Deferred[Any]:
        self.app.stop()
        d = super().stopService() or Deferred.fromCoroutine(_none())

        def closed(_: Any) -> Deferred[Any]:
            globalLogPublisher.removeObserver(self.logs)
            return DeferredList([self.dispatcher.close(), self.client.close()],
                                consumeErrors=True)

        return d.addCallback(closed)


async def _none() -> None:
    return None
