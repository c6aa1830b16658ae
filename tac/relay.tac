# twistd -ny tac/relay.tac
#
# Every setting of `twistd medagent-relay` (see `twistd medagent-relay --help`), read from a
# MEDAGENT_* environment variable named after the option and parsed by the same Options
# (medagent.relay.tap.options_from_env): --max-body is MEDAGENT_MAX_BODY, --data MEDAGENT_DATA,
# a flag is on with 1/true/yes (MEDAGENT_BOTS_UNSANDBOXED=1), and MEDAGENT_LISTEN may hold
# several endpoints separated by spaces. Unset: the same defaults as the plugin. A bad value
# stops the start with the option's usage error.
from twisted.application import service

from medagent.relay import tap

application = service.Application("medagent-relay")
tap.makeService(tap.options_from_env()).setServiceParent(application)
