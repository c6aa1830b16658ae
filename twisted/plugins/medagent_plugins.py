"""
``twistd medagent-relay`` and ``twistd medagent-agent``.

The global reactor is imported here, in ``makeService``, and nowhere else.
"""

from __future__ import annotations

from twisted.application.service import IServiceMaker
from twisted.plugin import IPlugin
from twisted.python import usage
from zope.interface import implementer


class RelayOptions(usage.Options):
    optParameters = [
        ["listen", "l", "tcp:8103:interface=127.0.0.1", "Endpoint string to listen on"],
        ["data", "d", "./relay-data", "Data folder (SQLite database, token key)"],
        ["base-url", None, None, "Public base URL (for status links); default: from Host"],
        ["max-body", None, str(32 * 1024 * 1024), "Largest HTTP request body, bytes"],
        ["max-message", None, str(64 * 1024 * 1024), "Largest websocket message, bytes"],
        ["heartbeat-interval", None, "10", "Seconds between heartbeats to each agent"],
        ["token-lifetime", None, "3600", "Access token lifetime, seconds"],
        ["synchronous", None, "NORMAL", "SQLite synchronous: NORMAL (crash-safe) or FULL"],
        ["database", None, None, "Shared PostgreSQL for several relay nodes,"
         " postgresql://user@host:port/db (password in ~/.pgpass; default: SQLite in --data)"],
        ["retention-days", None, "30", "Days to keep finished pushes (and payloads)"],
        ["bot-workers", None, "2", "Bot worker processes (kept warm, reused)"],
        ["bot-memory-mb", None, "256", "Memory limit of one bot worker, MiB"],
        ["bot-time-limit", None, "10", "Seconds one bot run may take"],
        ["bot-base-url", None, None, "URL bots use to reach this relay (default: from --listen)"],
        ["bot-user", None, "medagent-bot",
         "Dedicated user (name or UID:GID) bots run as, in their sandbox"],
        ["webhook-allow", None, "",
         "Comma-separated origins (scheme://host:port) Subscription rest-hooks may reach "
         "although plain http or a private/loopback address"],
        ["max-connections", None, "2048", "Open HTTP/websocket connections, at most"],
        ["max-connections-per-peer", None, "128", "Open connections from one address"],
        ["max-pending-agents", None, "512", "Websockets not yet authenticated, at most"],
        ["max-pending-agents-per-peer", None, "32",
         "Websockets not yet authenticated from one address"],
        ["request-timeout", None, "60", "Seconds to receive a request's headers and body"],
        ["connect-timeout", None, "10",
         "Seconds a websocket has to send a valid agent:connect:request"],
        ["login-failures-per-client", None, "10",
         "Failed /oauth2/token attempts per client id per window (then 429)"],
        ["login-failures-per-address", None, "30",
         "Failed /oauth2/token attempts per source address per window (then 429)"],
        ["login-failure-window", None, "300", "Window of the login failure limits, seconds"],
    ]
    optFlags = [
        ["bots-unsandboxed", None,
         "Development only: run bots without the sandbox (e.g. a relay that is not root)"],
    ]


class AgentOptions(usage.Options):
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
        ["data", "d", None, "Data folder for the durable queue (default ./agent-data)"],
        ["heartbeat-interval", None, None, "Seconds between heartbeats"],
        ["synchronous", None, None, "SQLite synchronous: NORMAL (crash-safe, default) or FULL"],
        ["allow-destinations", None, None,
         "Comma-separated devices this agent may connect to (host:port, net/len:port, "
         "scheme://host:port, serial:/dev/..., worklist:NAME; * wildcards); default: any"],
        ["tls-ca", None, None, "PEM trust root for mllps:// (default: the platform's)"],
        ["tls-cert", None, None, "PEM client certificate for mllps://"],
        ["tls-key", None, None, "PEM private key of --tls-cert"],
    ]


@implementer(IServiceMaker, IPlugin)
class RelayServiceMaker:
    tapname = "medagent-relay"
    description = "medagent relay: HTTP API, agent websocket, store and push journal"
    options = RelayOptions

    def makeService(self, options: RelayOptions):
        from twisted.internet import reactor

        from medagent.relay.service import RelayService

        return RelayService(
            reactor,
            data_dir=options["data"],
            listen=options["listen"],
            base_url=options["base-url"],
            max_body=int(options["max-body"]),
            max_message_size=int(options["max-message"]),
            heartbeat_interval=float(options["heartbeat-interval"]),
            token_lifetime=int(options["token-lifetime"]),
            synchronous=options["synchronous"],
            database=options["database"],
            retention_days=float(options["retention-days"]),
            bot_workers=int(options["bot-workers"]),
            bot_memory_mb=int(options["bot-memory-mb"]),
            bot_time_limit=float(options["bot-time-limit"]),
            bot_base_url=options["bot-base-url"],
            bot_user=options["bot-user"],
            bots_unsandboxed=bool(options["bots-unsandboxed"]),
            webhook_allow=[o.strip() for o in options["webhook-allow"].split(",") if o.strip()],
            max_connections=int(options["max-connections"]),
            max_connections_per_peer=int(options["max-connections-per-peer"]),
            max_pending_agents=int(options["max-pending-agents"]),
            max_pending_agents_per_peer=int(options["max-pending-agents-per-peer"]),
            request_timeout=float(options["request-timeout"]),
            connect_timeout=float(options["connect-timeout"]),
            login_failures_per_client=int(options["login-failures-per-client"]),
            login_failures_per_address=int(options["login-failures-per-address"]),
            login_failure_window=float(options["login-failure-window"]),
        )


@implementer(IServiceMaker, IPlugin)
class AgentServiceMaker:
    tapname = "medagent-agent"
    description = "medagent agent: delivers pushed messages to devices on site"
    options = AgentOptions

    def makeService(self, options: AgentOptions):
        from twisted.internet import reactor

        from medagent.agent.config import ConfigError, load_config
        from medagent.agent.service import AgentService

        try:
            config = load_config(
                {
                    "relay": options["relay"],
                    "client_id": options["client-id"],
                    "client_secret": options["client-secret"],
                    "client_secret_file": options["client-secret-file"],
                    "insecure": options["insecure"],
                    "agent_id": options["agent-id"],
                    "config": options["config"],
                    "data_dir": options["data"],
                    "heartbeat_interval": options["heartbeat-interval"],
                    "synchronous": options["synchronous"],
                    "allow_destinations": options["allow-destinations"],
                    "tls_ca": options["tls-ca"],
                    "tls_cert": options["tls-cert"],
                    "tls_key": options["tls-key"],
                }
            )
        except ConfigError as e:
            raise usage.UsageError(str(e))
        return AgentService(reactor, config)


relay = RelayServiceMaker()
agent = AgentServiceMaker()
