# twistd -ny tac/agent.tac   (settings from MEDAGENT_* variables or MEDAGENT_CONFIG=agent.properties)
import os

from twisted.application import service
from twisted.internet import reactor

from medagent.agent.config import load_config
from medagent.agent.service import AgentService

application = service.Application("medagent-agent")
AgentService(
    reactor,
    load_config({"config": os.environ.get("MEDAGENT_CONFIG"),
                 "data_dir": os.environ.get("MEDAGENT_DATA")}),
).setServiceParent(application)
