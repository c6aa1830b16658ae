"""
``twistd medagent-relay`` and ``twistd medagent-agent``.

Each points at its subsystem's tap module (L{medagent.relay.tap}, L{medagent.agent.tap}),
which holds the Options and C{makeService}, as Twisted's own plugins do; nothing is imported
until twistd asks for that plugin.
"""

from twisted.application.service import ServiceMaker

relay = ServiceMaker(
    "medagent-relay", "medagent.relay.tap",
    "medagent relay: HTTP API, agent websocket, store and push journal", "medagent-relay")
agent = ServiceMaker(
    "medagent-agent", "medagent.agent.tap",
    "medagent agent: delivers pushed messages to devices on site", "medagent-agent")
