"""
L{BotsService}: the bots' part of the relay's life -- the API socket bots reach the relay
through, the worker pool and the subscription deliveries -- and L{base_url_from_listen}, the
URL an unsandboxed bot uses to reach this relay.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from typing import Any, Callable, Sequence

from twisted.application import service
from twisted.internet.defer import Deferred, DeferredList, maybeDeferred
from twisted.logger import Logger

from medagent.relay.bots.runner import BotRunner
from medagent.relay.bots.workers import WorkerPool

log = Logger()


def base_url_from_listen(listen: str) -> str | None:
    """
    The URL a bot worker on this machine uses to reach the relay, from the listen endpoint
    string (``tcp:8103:interface=127.0.0.1``, ``ssl:8443:...``); None when it cannot tell.
    """
    parts = re.split(r"(?<!\\):", listen)
    if not parts:
        return None
    kind = parts[0].lower()
    if kind not in ("tcp", "ssl", "tcp6", "ssl6"):
        return None
    port = None
    interface = ""
    for part in parts[1:]:
        if "=" in part:
            key, _, value = part.partition("=")
            if key == "port":
                port = value
            elif key == "interface":
                interface = value.replace("\\:", ":")
        elif port is None:
            port = part
    if not port or not port.isdigit() or int(port) == 0:
        return None
    if interface in ("", "0.0.0.0"):
        host = "127.0.0.1"
    elif interface == "::":
        host = "[::1]"
    elif ":" in interface:
        host = f"[{interface}]"
    else:
        host = interface
    scheme = "https" if kind.startswith("ssl") else "http"
    return f"{scheme}://{host}:{port}"


class BotsService(service.Service):
    """Starts the relay's API socket for bots, the worker pool and the subscription
    deliveries; stops them, and its Deferred fires once the workers are gone.  The relay
    closes its database only after that (L{medagent.relay.service.RelayService.stopService}
    waits for it)."""

    def __init__(self, pool: WorkerPool, runner: BotRunner, subscriptions: Any = None,
                 closers: Sequence[Callable[[], Any]] = (), reactor: Any = None) -> None:
        self.pool = pool
        self.runner = runner
        self.subscriptions = subscriptions
        self.closers = list(closers)
        self.reactor = reactor
        #: the relay's HTTP site, served to bots on a Unix socket (set by the relay)
        self.site: Any = None
        self._api_port: Any = None
        self._api_dir: str | None = None

    def _listen_api(self) -> None:
        """The API on a Unix socket in a folder of its own (0700): bots reach it only
        through the bind the sandbox makes; it carries no more than any HTTP request."""
        if self.site is None or self.reactor is None:
            return
        self._api_dir = tempfile.mkdtemp(prefix="medagent-botapi-")
        path = os.path.join(self._api_dir, "api.sock")
        try:
            self._api_port = self.reactor.listenUNIX(path, self.site, mode=0o666)
        except Exception:
            log.failure("Could not listen on the bots' API socket {path}", path=path)
            shutil.rmtree(self._api_dir, ignore_errors=True)
            self._api_dir = None
            return
        self.pool.api_socket = path

    def startService(self) -> None:  # noqa: N802 (Twisted name)
        super().startService()
        self.runner.stopped = False
        self._listen_api()
        self.pool.start()
        if self.subscriptions is not None:
            self.subscriptions.start()

    def stopService(self) -> Deferred[Any]:  # noqa: N802
        super().stopService()
        if self.subscriptions is not None:
            self.subscriptions.stop()
        self.runner.stop()
        waits = [self.pool.stop()]
        if self._api_port is not None:
            port, self._api_port = self._api_port, None
            folder = self._api_dir
            waits.append(maybeDeferred(port.stopListening).addBoth(
                lambda _: shutil.rmtree(folder or "", ignore_errors=True)))
        for close in self.closers:
            waits.append(maybeDeferred(close))
        return DeferredList(waits, consumeErrors=True).addCallback(lambda _: None)
