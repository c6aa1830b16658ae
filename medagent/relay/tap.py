# -*- test-case-name: tests.test_tap -*-
"""
``twistd medagent-relay``: the relay's command-line options and its service.

Shaped like L{twisted.web.tap}: L{Options} parses and checks every setting (numbers coerced
and range-checked, a bad value a L{usage.UsageError}, never a traceback), ``--listen`` may be
given several times (each a listener on the one site), L{Options.postOptions} fills the
defaults, and L{makeService} only wires.  Every default is a constant of
L{medagent.relay.service}, so the plugin, L{RelayService} and ``tac/relay.tac`` agree.

``tac/relay.tac`` uses the same L{Options} through L{options_from_env} (``MEDAGENT_*``
environment variables).
"""

from __future__ import annotations

import os
import sys
from typing import Any, Mapping

from twisted.internet import endpoints
from twisted.python import usage

from medagent.logs import with_log_format
from medagent.options import (argv_from_env, http_url, number, operations_options,
                              synchronous)
from medagent.relay import service as relay_service
from medagent.relay.bots import MAX_TIME_LIMIT
from medagent.relay.console.webhook import webhook_url_problem

MIB = 1024 * 1024


def _origins(text: str) -> list[str]:
    origins = [o.strip() for o in text.split(",") if o.strip()]
    for item in origins:
        http_url(item)
    return origins


_origins.coerceDoc = "Comma-separated."  # type: ignore[attr-defined]


def _inbound_log(value: str) -> str:
    if value not in ("on", "off"):
        raise ValueError("must be 'on' (payloads kept) or 'off' (metadata only)")
    return value


_inbound_log.coerceDoc = "on or off."  # type: ignore[attr-defined]


class Options(usage.Options):
    """The relay's settings (the same for twistd and tac/relay.tac)."""

    synopsis = "[options]"
    longdesc = ("The medagent relay: HTTP API, agent websocket, store and push journal. "
                "Settings can also come from MEDAGENT_* environment variables (tac/relay.tac).")

    optParameters = [
        ["data", "d", relay_service.DEFAULT_DATA, "Data folder (SQLite database, token key)"],
        ["base-url", None, None, "Public base URL (for status links); default: from Host",
         http_url],
        ["max-body", None, relay_service.DEFAULT_MAX_BODY, "Largest HTTP request body, bytes",
         number(int, 1024, 4096 * MIB)],
        ["max-message", None, relay_service.DEFAULT_MAX_MESSAGE, "Largest websocket message, bytes",
         number(int, 1024, 4096 * MIB)],
        ["heartbeat-interval", None, relay_service.DEFAULT_HEARTBEAT_INTERVAL,
         "Seconds between heartbeats to each agent", number(float, 1, 300, " seconds")],
        ["token-lifetime", None, relay_service.DEFAULT_TOKEN_LIFETIME,
         "Access token lifetime, seconds", number(int, 60, 7 * 86400, " seconds")],
        ["synchronous", None, relay_service.DEFAULT_SYNCHRONOUS,
         "SQLite synchronous: NORMAL (crash-safe) or FULL", synchronous],
        ["retention-days", None, relay_service.DEFAULT_RETENTION_DAYS,
         "Days to keep finished pushes (and payloads)", number(float, 0.001, 36500, " days")],
        ["bot-workers", None, relay_service.DEFAULT_WORKERS,
         "Bot worker processes (kept warm, reused)", number(int, 1, 256)],
        ["bot-memory-mb", None, relay_service.DEFAULT_MEMORY_MB,
         "Memory limit of one bot worker, MiB", number(int, 16, 1024 * 1024, " MiB")],
        ["bot-time-limit", None, relay_service.DEFAULT_TIME_LIMIT, "Seconds one bot run may take",
         number(float, 0.1, MAX_TIME_LIMIT, " seconds")],
        ["bot-base-url", None, None, "URL bots use to reach this relay (default: from --listen)",
         http_url],
        ["bot-user", None, relay_service.DEFAULT_BOT_USER,
         "Dedicated user (name or UID:GID) bots run as, in their sandbox"],
        ["webhook-allow", None, None,
         "Comma-separated origins (scheme://host:port) Subscription rest-hooks may reach "
         "although plain http or a private/loopback address", _origins],
        ["max-connections", None, relay_service.DEFAULT_MAX_CONNECTIONS,
         "Open HTTP/websocket connections, at most", number(int, 1, 1_000_000)],
        ["max-connections-per-peer", None, relay_service.DEFAULT_MAX_CONNECTIONS_PER_PEER,
         "Open connections from one address", number(int, 1, 1_000_000)],
        ["max-pending-agents", None, relay_service.DEFAULT_MAX_PENDING,
         "Websockets not yet authenticated, at most", number(int, 1, 1_000_000)],
        ["max-pending-agents-per-peer", None, relay_service.DEFAULT_MAX_PENDING_PER_PEER,
         "Websockets not yet authenticated from one address", number(int, 1, 1_000_000)],
        ["request-timeout", None, relay_service.DEFAULT_REQUEST_TIMEOUT,
         "Seconds to receive a request's headers and body", number(float, 1, 3600, " seconds")],
        ["connect-timeout", None, relay_service.DEFAULT_CONNECT_TIMEOUT,
         "Seconds a websocket has to send a valid agent:connect:request",
         number(float, 1, 600, " seconds")],
        ["login-failures-per-client", None, relay_service.DEFAULT_LOGIN_FAILURES_PER_CLIENT,
         "Failed /oauth2/token attempts per client id per window (then 429)",
         number(int, 1, 1_000_000)],
        ["login-failures-per-address", None, relay_service.DEFAULT_LOGIN_FAILURES_PER_ADDRESS,
         "Failed /oauth2/token attempts per source address per window (then 429)",
         number(int, 1, 1_000_000)],
        ["login-failure-window", None, relay_service.DEFAULT_LOGIN_FAILURE_WINDOW,
         "Window of the login failure limits, seconds", number(float, 1, 86400, " seconds")],
        ["database", None, None,
         "postgresql://user@host:port/db to share the relay's data with other nodes "
         "(default: SQLite in --data; no password in the URL: use ~/.pgpass)"],
        ["node-id", None, None,
         "This node's name in the cluster's agent session table (--database postgresql:"
         " default <hostname>-<pid>)"],
        ["console-idle-minutes", None, relay_service.DEFAULT_CONSOLE_IDLE / 60,
         "Minutes a console sign-in lasts without use", number(float, 1, 24 * 60, " minutes")],
        ["alert-offline-minutes", None, relay_service.DEFAULT_ALERT_OFFLINE_MINUTES,
         "Console alert: an agent offline longer than this many minutes (0: no such alerts)",
         number(float, 0, 7 * 24 * 60, " minutes")],
        ["alert-queue-minutes", None, relay_service.DEFAULT_ALERT_QUEUE_MINUTES,
         "Console alert: an agent's oldest open push waiting longer than this many minutes "
         "(0: no such alerts)", number(float, 0, 7 * 24 * 60, " minutes")],
        ["alert-error-percent", None, relay_service.DEFAULT_ALERT_ERROR_PERCENT,
         "Console alert: an agent whose pushes that ended in the last --alert-error-minutes "
         "failed in this percentage or more (0: no such alerts)",
         number(float, 0, 100, " percent")],
        ["alert-error-minutes", None, relay_service.DEFAULT_ALERT_ERROR_MINUTES,
         "The error rate alert's window, minutes", number(float, 1, 24 * 60, " minutes")],
        ["alert-error-min", None, relay_service.DEFAULT_ALERT_ERROR_MIN,
         "The error rate alert needs at least this many pushes ended in its window",
         number(int, 1, 1_000_000)],
        ["alert-webhook", None, None,
         "POST each console alert raised or cleared as JSON to this URL (https, or http on "
         "loopback); @PATH reads the URL from a file (a URL with a secret in it stays off "
         "the command line)"],
        ["inbound-log", None, relay_service.DEFAULT_INBOUND_LOG,
         "Inbound messages (device → agent → relay → Bot): 'on' keeps each message's payload "
         "with its record (shown to operators and admins only, each view audited); 'off' "
         "keeps the record (ids, search fields, outcome) without the payload", _inbound_log],
        ["inbound-retention-days", None, relay_service.DEFAULT_INBOUND_RETENTION_DAYS,
         "Days to keep inbound messages (records and payloads)",
         number(float, 0.001, 36500, " days")],
        ["inbound-max-rows", None, relay_service.DEFAULT_INBOUND_MAX_ROWS,
         "Inbound messages kept at most (the oldest are pruned first)",
         number(int, 1, 1_000_000_000)],
        *operations_options("tcp:9465:interface=127.0.0.1"),
    ]
    optFlags = [
        ["bots-unsandboxed", None,
         "Development only: run bots without the sandbox (e.g. a relay that is not root)"],
        ["access-log", None, "Log every HTTP request (method, path without query, status) at "
         "debug level; off by default: a line per request is the push path's cost"],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["listen"] = []

    def opt_listen(self, description: str) -> None:
        # the help text (this method's docstring) is set below, from DEFAULT_LISTEN
        if not description.strip():
            raise usage.UsageError("--listen needs an endpoint string, e.g. tcp:8103")
        try:
            # parses only: the reactor is used once the relay listens
            endpoints.serverFromString(None, description)
        except Exception as e:
            raise usage.UsageError(f"--listen {description!r} is not an endpoint string "
                                   f"(e.g. tcp:8103:interface=127.0.0.1): {e}")
        self["listen"].append(description)

    opt_listen.__doc__ = ("Endpoint string to listen on, repeatable "
                          f"(default: {relay_service.DEFAULT_LISTEN})")
    opt_l = opt_listen

    def postOptions(self) -> None:
        if not self["listen"]:
            self["listen"] = [relay_service.DEFAULT_LISTEN]
        if not self["bot-user"]:
            raise usage.UsageError("--bot-user must name a user (or UID:GID)")
        self["bots-unsandboxed"] = bool(self["bots-unsandboxed"])
        hook = self["alert-webhook"]
        if hook:
            if hook.startswith("@"):
                try:
                    with open(hook[1:], encoding="utf-8") as f:
                        hook = f.read(4096).strip()
                except OSError as e:
                    raise usage.UsageError(f"--alert-webhook: cannot read {hook[1:]!r} "
                                           f"({e.strerror})")
            problem = webhook_url_problem(hook)
            if problem is not None:
                raise usage.UsageError(problem)
            self["alert-webhook"] = hook

    def service_kwargs(self) -> dict[str, Any]:
        """L{RelayService}'s keyword arguments."""
        return {
            "data_dir": self["data"],
            "listen": list(self["listen"]),
            "base_url": self["base-url"],
            "max_body": self["max-body"],
            "max_message_size": self["max-message"],
            "heartbeat_interval": self["heartbeat-interval"],
            "token_lifetime": self["token-lifetime"],
            "synchronous": self["synchronous"],
            "retention_days": self["retention-days"],
            "bot_workers": self["bot-workers"],
            "bot_memory_mb": self["bot-memory-mb"],
            "bot_time_limit": self["bot-time-limit"],
            "bot_base_url": self["bot-base-url"],
            "bot_user": self["bot-user"],
            "bots_unsandboxed": self["bots-unsandboxed"],
            "webhook_allow": list(self["webhook-allow"] or []),
            "max_connections": self["max-connections"],
            "max_connections_per_peer": self["max-connections-per-peer"],
            "max_pending_agents": self["max-pending-agents"],
            "max_pending_agents_per_peer": self["max-pending-agents-per-peer"],
            "request_timeout": self["request-timeout"],
            "connect_timeout": self["connect-timeout"],
            "login_failures_per_client": self["login-failures-per-client"],
            "login_failures_per_address": self["login-failures-per-address"],
            "login_failure_window": self["login-failure-window"],
            "metrics": self["metrics"],
            "database": self["database"],
            "node_id": self["node-id"],
            "access_log": bool(self["access-log"]),
            "console_idle": self["console-idle-minutes"] * 60,
            "alert_offline_minutes": self["alert-offline-minutes"],
            "alert_queue_minutes": self["alert-queue-minutes"],
            "alert_error_percent": self["alert-error-percent"],
            "alert_error_minutes": self["alert-error-minutes"],
            "alert_error_min": self["alert-error-min"],
            "alert_webhook": self["alert-webhook"] or None,
            "inbound_log": self["inbound-log"],
            "inbound_retention_days": self["inbound-retention-days"],
            "inbound_max_rows": self["inbound-max-rows"],
        }


def options_from_env(environ: Mapping[str, str] | None = None) -> Options:
    """L{Options} from the environment (tac/relay.tac); C{MEDAGENT_LISTEN} may hold several
    endpoints separated by spaces."""
    options = Options()
    options.parseOptions(argv_from_env(Options, os.environ if environ is None else environ,
                                       {"listen": " "}))
    return options


def makeService(options: Options, reactor: Any = None) -> Any:
    """The relay's service tree from parsed L{Options}; the global reactor unless given."""
    if reactor is None:
        from twisted.internet import reactor

    return with_log_format(relay_service.RelayService(reactor, **options.service_kwargs()),
                           options["log-format"], sys.stdout)
