"""
Device → cloud: what channels receive goes up through a durable outbox.

A received message is written to the agent's SQLite file first; the channel is told it is
L{Stored} (an enhanced-mode MLLP channel sends its commit ACK now), then the message goes to
the relay as an ``agent:transmit:request`` and the cloud's answer (a Bot's ACK) comes back
through C{Stored.answer}.  Messages still in the outbox when the link drops are sent again,
in order, after the reconnect, so a message the device handed over is never lost; the cloud
may see it twice in that case (at least once), and a Bot should be idempotent on the
message's control id.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Callable, Mapping

import attr
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from medagent import wire
from medagent.delivery import DeliveryError, Reply
from medagent.storage.sqlite.database import Database
from medagent.storage.sqlite.outbox import SQLiteOutboxStore

log = Logger()

DEFAULT_ANSWER_TIMEOUT = 55.0
RESEND_PAGE = 500


@attr.s(frozen=True, auto_attribs=True)
class Stored:
    """The message is on the agent's disk; C{answer} fires with the cloud's L{Reply}."""

    answer: Deferred


class Outbox:
    def __init__(
        self,
        db: Database,
        clock: Any,
        agent_id: str,
        send: Callable[[dict[str, Any]], bool],
        *,
        answer_timeout: float = DEFAULT_ANSWER_TIMEOUT,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.db = db
        #: the rows (all of the outbox's SQL is in L{medagent.storage.sqlite.outbox})
        self.rows = SQLiteOutboxStore(db)
        self.clock = clock
        self.agent_id = agent_id
        self.send = send  # returns False when the link is down (the message waits on disk)
        self.answer_timeout = answer_timeout
        self.wall = wall
        self.waiting: dict[str, Deferred[Reply | None]] = {}
        self.stats = {"stored": 0, "answered": 0, "resent": 0, "timeouts": 0}

    @staticmethod
    def schema() -> str:
        return SQLiteOutboxStore.schema()

    def _request(self, row: Mapping[str, Any]) -> dict[str, Any]:
        return {
            "type": wire.TRANSMIT_REQUEST,
            "accessToken": "placeholder",  # replaced by the current token when sent
            "channel": row["channel"],
            "remote": row["remote"],
            "contentType": row["content_type"],
            "body": row["body"],
            "callback": row["callback"],
        }

    def forward(self, channel: str, content_type: str, body: str, remote: str
                ) -> Deferred[Stored]:
        """Store, then send; fires with L{Stored} once the message is on disk."""
        callback = f"Agent/{self.agent_id}-{uuid.uuid4()}"
        row = {"callback": callback, "channel": channel, "remote": remote,
               "content_type": content_type, "body": body}
        now = self.wall()

        answer: Deferred[Reply | None] = Deferred()
        result: Deferred[Stored] = Deferred()

        def stored(_: Any) -> None:
            self.stats["stored"] += 1
            self.waiting[callback] = answer
            timer = self.clock.callLater(self.answer_timeout, self._timed_out, callback)
            answer.addBoth(lambda r: (timer.active() and timer.cancel(), r)[1])
            # The channel hears first (an enhanced-mode device gets its CA), then the
            # message goes up: the device's round trip does not wait for our JSON encoding.
            result.callback(Stored(answer))
            self.send(self._request(row))

        self.rows.add(row, now).addCallbacks(stored, result.errback).addErrback(
            lambda f: log.failure("Sending inbound message {callback} failed; it stays in the "
                                  "outbox", f, callback=callback))
        return result

    def forward_and_wait(self, channel: str, content_type: str, body: str, remote: str
                         ) -> Deferred[Reply | None]:
        """For channels with one answer per message: store, send, fire with the answer."""
        return self.forward(channel, content_type, body, remote).addCallback(
            lambda stored: stored.answer)

    def _timed_out(self, callback: str) -> None:
        d = self.waiting.pop(callback, None)
        if d is not None and not d.called:
            self.stats["timeouts"] += 1
            d.errback(Failure(DeliveryError(
                f"no answer from the cloud within {self.answer_timeout:g} s; the message is "
                "kept and will still be delivered to the cloud")))

    def answered(self, msg: Mapping[str, Any]) -> bool:
        """An ``agent:transmit:response`` for one of ours: forget the row, fire the waiter."""
        callback = msg.get("callback")
        if not isinstance(callback, str) or not callback.startswith(f"Agent/{self.agent_id}-"):
            return False
        self.rows.remove(callback)
        self.stats["answered"] += 1
        d = self.waiting.pop(callback, None)
        if d is not None and not d.called:
            status = msg.get("statusCode") or 200
            if status == 204:
                d.callback(None)
            else:
                d.callback(Reply(body=msg.get("body") or "",
                                 content_type=msg.get("contentType") or "text/plain",
                                 status_code=status, delivered=status < 400))
        return True

    def failed(self, msg: Mapping[str, Any]) -> bool:
        """An ``agent:error`` with one of our callbacks: the relay refused it."""
        callback = msg.get("callback")
        if not isinstance(callback, str) or callback not in self.waiting:
            return False
        self.rows.remove(callback)
        self.waiting.pop(callback).errback(Failure(DeliveryError(
            f"relay refused the message: {msg.get('body')}", transient=False)))
        return True

    def resend_pending(self) -> Deferred[int]:
        """After a reconnect: everything not answered yet goes again, oldest first."""

        def send(rows: list[dict[str, Any]]) -> int:
            for row in rows:
                if not self.send(self._request(row)):
                    break
                self.stats["resent"] += 1
            if rows:
                log.info("Re-sent {n} inbound message(s) the cloud had not answered",
                         n=len(rows))
            return len(rows)

        return self.rows.pending(RESEND_PAGE).addCallback(send)

    def depth(self) -> Deferred[int]:
        return self.rows.count()

