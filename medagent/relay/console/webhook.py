"""
The console alerts' optional webhook (``--alert-webhook URL`` on the relay): every alert
raised or cleared is POSTed as a small JSON object, so the people on call hear of it where
they already are (a chat room, a paging service behind a small adapter)::

    {"kind": "queue-age", "key": "queue-age/<agent>/<lane>", "state": "raised",
     "agent": "<agent id>", "lane": "<lane key or null>", "since": "<ISO time>",
     "at": "<ISO time>", "text": "Agent/<agent>: pushes to <lane> waiting too long"}

Never a payload or anything from a message: kinds, ids, device lanes and times only.

The monitor is never held up: a change is put on a bounded in-memory queue (L{MAX_QUEUE};
when full, the oldest change waiting behind the one being tried is dropped and counted) and
sent one at a time, each POST with a timeout; a failure (no answer, a refused connection, a
non-2xx status) is retried with a doubling backoff on the injected clock, up to
L{MAX_ATTEMPTS} attempts, then dropped, logged and counted.  Changes are sent in the order they
happened.  The queue is not kept across a restart: the alert page (and the metrics) remain the
record.
"""

from __future__ import annotations

import json
from collections import deque
from typing import Any, Callable, Mapping
from urllib.parse import urlsplit

from twisted.application import service
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from medagent.storage.resources import now_iso

log = Logger()

#: changes waiting to be sent, at most
MAX_QUEUE = 100
#: attempts per change before it is dropped
MAX_ATTEMPTS = 6
#: seconds before the first retry (then doubling, up to L{RETRY_CAP})
RETRY_BASE = 2.0
RETRY_CAP = 300.0
#: seconds one POST may take
TIMEOUT = 10.0
_LOOPBACK = frozenset(["localhost", "127.0.0.1", "::1"])

#: (url, body, headers, timeout) -> Deferred firing with the HTTP status
Poster = Callable[[str, bytes, Mapping[str, str], float], "Deferred[int]"]


def webhook_url_problem(url: str) -> str | None:
    """Why C{url} cannot be the alert webhook, or None: https (http only to this machine),
    no credentials in it (a command line is no place for secrets)."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 (raises on a bad port)
    except ValueError:
        return "--alert-webhook is not a valid URL"
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https") or not parts.hostname:
        return "--alert-webhook must be an https:// URL"
    if parts.username or parts.password:
        return "--alert-webhook must not carry credentials"
    if scheme == "http" and parts.hostname not in _LOOPBACK:
        return "--alert-webhook must use https unless it is on this machine (loopback)"
    return None


def alert_payload(alert: Any, raised: bool) -> dict[str, Any]:
    """What the webhook says of one change (no payload, no patient data)."""
    return {
        "kind": alert.kind,
        "key": "/".join(alert.key),
        "state": "raised" if raised else "cleared",
        "agent": alert.agent_id,
        "lane": alert.lane,
        "since": now_iso(alert.since),
        "at": now_iso(alert.raised if raised else (alert.cleared or alert.raised)),
        "text": alert.text(),
    }


class AlertWebhook:
    """An alert listener (L{medagent.relay.console.alerts.AlertMonitor.listeners})."""

    def __init__(self, clock: Any, post: Poster, url: str, *, max_queue: int = MAX_QUEUE,
                 max_attempts: int = MAX_ATTEMPTS, retry_base: float = RETRY_BASE,
                 retry_cap: float = RETRY_CAP, timeout: float = TIMEOUT) -> None:
        problem = webhook_url_problem(url)
        if problem is not None:
            raise ValueError(problem)
        self.clock = clock
        self.post = post
        self.url = url
        self.max_queue = max_queue
        self.max_attempts = max_attempts
        self.retry_base = retry_base
        self.retry_cap = retry_cap
        self.timeout = timeout
        self.queue: deque[dict[str, Any]] = deque()
        #: what happened to the changes: sent, retried (attempts), failed (given up), dropped
        self.counts = {"sent": 0, "retried": 0, "failed": 0, "dropped": 0}
        self._attempts = 0
        self._sending: Deferred[Any] | None = None
        self._retry: Any = None
        self._stopped = False

    def __call__(self, alert: Any, raised: bool) -> None:
        self.enqueue(alert_payload(alert, raised))

    def enqueue(self, payload: dict[str, Any]) -> None:
        if self._stopped:
            return
        if len(self.queue) >= self.max_queue:
            # the oldest waiting change goes; not the one being tried
            trying = self._sending is not None or self._retry is not None
            if trying and len(self.queue) > 1:
                dropped = self.queue[1]
                del self.queue[1]
            else:
                dropped = self.queue.popleft()
                self._attempts = 0
            self.counts["dropped"] += 1
            log.warn("Alert webhook queue full ({n}): dropped the change {key}",
                     n=self.max_queue, key=dropped.get("key"))
        self.queue.append(payload)
        self._next()

    def _next(self) -> None:
        if self._stopped or self._sending is not None or self._retry is not None \
                or not self.queue:
            return
        head = self.queue[0]
        body = json.dumps(head).encode("utf-8")
        d = maybeDeferred(self.post, self.url, body,
                          {"Content-Type": "application/json"}, self.timeout)
        d.addTimeout(self.timeout + 1, self.clock)  # (even a poster that ignores its timeout)
        self._sending = d
        d.addBoth(self._done, head)

    def _done(self, result: Any, head: dict[str, Any]) -> None:
        self._sending = None
        if self._stopped:
            return
        ok = isinstance(result, int) and 200 <= result < 300
        if not (self.queue and self.queue[0] is head):  # dropped meanwhile (queue full)
            self.counts["sent" if ok else "failed"] += 1
            self._next()
            return
        if ok:
            self.queue.popleft()
            self.counts["sent"] += 1
            self._attempts = 0
            self._next()
            return
        why = (f"HTTP {result}" if isinstance(result, int)
               else result.getErrorMessage() if isinstance(result, Failure) else str(result))
        self._attempts += 1
        if self._attempts >= self.max_attempts:
            self.queue.popleft()
            self.counts["failed"] += 1
            self._attempts = 0
            log.warn("Alert webhook: gave up on the change {key} after {n} attempts "
                     "({why})", key=head.get("key"), n=self.max_attempts, why=why[:200])
            self._next()
            return
        self.counts["retried"] += 1
        delay = min(self.retry_cap, self.retry_base * 2 ** (self._attempts - 1))
        log.info("Alert webhook: the change {key} not sent ({why}); again in {delay:.0f}s",
                 key=head.get("key"), why=why[:200], delay=delay)
        self._retry = self.clock.callLater(delay, self._retry_now)

    def _retry_now(self) -> None:
        self._retry = None
        self._next()

    def stop(self) -> None:
        """No more sending (what waits is lost: the alert page is the record)."""
        self._stopped = True
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        self._retry = None
        if self._sending is not None:
            self._sending.cancel()
            self._sending = None


class AlertWebhookService(service.Service):
    """Stops the webhook and closes its HTTP connections with the relay."""

    def __init__(self, webhook: AlertWebhook, close: Callable[[], Any]) -> None:
        self.webhook = webhook
        self.close = close

    def stopService(self) -> Any:
        self.webhook.stop()
        super().stopService()
        return self.close()
