# twistd -ny tac/relay.tac   (settings from MEDAGENT_* environment variables)
import os

from twisted.application import service
from twisted.internet import reactor

from medagent.relay.service import RelayService

application = service.Application("medagent-relay")
RelayService(
    reactor,
    data_dir=os.environ.get("MEDAGENT_DATA", "./relay-data"),
    listen=os.environ.get("MEDAGENT_LISTEN", "tcp:8103:interface=127.0.0.1"),
    base_url=os.environ.get("MEDAGENT_BASE_URL") or None,
).setServiceParent(application)
