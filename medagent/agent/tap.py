# -*- test-case-name: tests.test_tap -*-
"""
``twistd medagent-agent``: the agent's command-line options and its service.

Shaped like L{twisted.web.tap}: L{Options} parses and checks the settings (numbers coerced
and range-checked, a bad value a L{usage.UsageError}), and L{makeService} only wires.  The
agent's settings may also come from Medplum's ``agent.properties`` (C{--config}), which the
command line overrides, so most options have no default here: the defaults are
L{medagent.agent.config}'s constants (C{DEFAULT_DATA_DIR}, ...), applied by L{load_config}.

``tac/agent.tac`` uses the same L{Options} through L{options_from_env} (``MEDAGENT_*``
environment variables).
"""

from __future__ import annotations

import os
import sys
from typing import Any, Mapping

from twisted.python import usage

from medagent.agent.config import (DEFAULT_DATA_DIR, DEFAULT_HEARTBEAT_INTERVAL,
                                   DEFAULT_SYNCHRONOUS, HEARTBEAT_RANGE, AgentConfig,
                                   ConfigError, load_config)
from medagent.logs import with_log_format
from medagent.options import argv_from_env, number, operations_options, synchronous


class Options(usage.Options):
    """The agent's settings (the same for twistd and tac/agent.tac)."""

    synopsis = "[options]"
    longdesc = ("The medagent agent: delivers pushed messages to devices on site. Settings "
                "come from the command line, then --config (agent.properties), then defaults.")

    optFlags = [
        ["insecure", None, "Allow plain http:// to a relay that is not on this machine"],
    ]
    optParameters = [
        ["relay", "r", None, "Relay base URL, e.g. https://relay.example.org"],
        ["client-id", None, None, "OAuth2 client id of this agent"],
        ["client-secret", None, None,
         "OAuth2 client secret (visible in ps: prefer --client-secret-file or "
         "MEDAGENT_CLIENT_SECRET)"],
        ["client-secret-file", None, None, "File whose first line is the client secret"],
        ["agent-id", None, None, "Agent resource id"],
        ["config", "c", None, "Medplum-style agent.properties file"],
        ["data", "d", None,
         f"Data folder for the durable queue (default {DEFAULT_DATA_DIR})"],
        ["heartbeat-interval", None, None,
         f"Seconds between heartbeats (default {DEFAULT_HEARTBEAT_INTERVAL:g})",
         number(float, *HEARTBEAT_RANGE, " seconds")],
        ["synchronous", None, None,
         f"SQLite synchronous: NORMAL (crash-safe, default {DEFAULT_SYNCHRONOUS}) or FULL",
         synchronous],
        ["allow-destinations", None, None,
         "Comma-separated devices this agent may connect to (host:port, net/len:port, "
         "scheme://host:port, serial:/dev/..., worklist:NAME; * wildcards); default: any"],
        ["tls-ca", None, None, "PEM trust root for mllps:// (default: the platform's)"],
        ["tls-cert", None, None, "PEM client certificate for mllps://"],
        ["tls-key", None, None, "PEM private key of --tls-cert"],
        *operations_options("tcp:9464:interface=127.0.0.1"),
    ]

    def postOptions(self) -> None:
        self["insecure"] = bool(self["insecure"])

    def settings(self) -> dict[str, Any]:
        """The mapping L{load_config} takes (files are read there, in L{makeService})."""
        return {
            "relay": self["relay"],
            "client_id": self["client-id"],
            "client_secret": self["client-secret"],
            "client_secret_file": self["client-secret-file"],
            "insecure": self["insecure"],
            "agent_id": self["agent-id"],
            "config": self["config"],
            "data_dir": self["data"],
            "heartbeat_interval": self["heartbeat-interval"],
            "synchronous": self["synchronous"],
            "allow_destinations": self["allow-destinations"],
            "tls_ca": self["tls-ca"],
            "tls_cert": self["tls-cert"],
            "tls_key": self["tls-key"],
        }


def options_from_env(environ: Mapping[str, str] | None = None) -> Options:
    """L{Options} from C{MEDAGENT_*} variables (tac/agent.tac), e.g. C{MEDAGENT_CONFIG},
    C{MEDAGENT_DATA}, C{MEDAGENT_ALLOW_DESTINATIONS}, C{MEDAGENT_INSECURE=1}."""
    options = Options()
    options.parseOptions(argv_from_env(Options, os.environ if environ is None else environ))
    return options


def agent_config(options: Options) -> AgentConfig:
    """The agent's configuration (reads --config and --client-secret-file); a wrong or
    missing setting is a L{usage.UsageError}."""
    try:
        return load_config(options.settings())
    except ConfigError as e:
        raise usage.UsageError(str(e))


def makeService(options: Options, reactor: Any = None) -> Any:
    """The agent's service tree from parsed L{Options}; the global reactor unless given."""
    if reactor is None:
        from twisted.internet import reactor
    from medagent.agent.service import AgentService

    return with_log_format(AgentService(reactor, agent_config(options),
                                        metrics=options["metrics"]),
                           options["log-format"], sys.stdout)
