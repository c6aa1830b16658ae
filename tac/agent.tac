# twistd -ny tac/agent.tac
#
# Every setting of `twistd medagent-agent` (see `twistd medagent-agent --help`), read from a
# MEDAGENT_* environment variable named after the option and parsed by the same Options
# (medagent.agent.tap.options_from_env): --config is MEDAGENT_CONFIG (an agent.properties),
# --data MEDAGENT_DATA, --client-secret-file MEDAGENT_CLIENT_SECRET_FILE, a flag is on with
# 1/true/yes (MEDAGENT_INSECURE=1). Variables override the properties file, as options do.
# A bad or missing setting stops the start with its usage error.
from twisted.application import service

from medagent.agent import tap

application = service.Application("medagent-agent")
tap.makeService(tap.options_from_env()).setServiceParent(application)
