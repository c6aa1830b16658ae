"""
The push journal: every push is an entry before it is anything else.

States: ``queued`` (stored, not yet on the websocket) → ``sent`` (written to the agent's
socket) → ``accepted`` (a durable agent has it on its disk) → ``delivered`` (the device
acknowledged) | ``failed`` (with the reason) | ``expired`` | ``cancelled``.  Writes are group
committed: many concurrent pushes share one SQLite commit.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, Iterable, Mapping

import attr
from twisted.internet.defer import Deferred

from medagent.db import Database
from medagent.fhir import not_found

QUEUED = "queued"
SENT = "sent"
ACCEPTED = "accepted"
DELIVERED = "delivered"
FAILED = "failed"
EXPIRED = "expired"
CANCELLED = "cancelled"

STATES = (QUEUED, SENT, ACCEPTED, DELIVERED, FAILED, EXPIRED, CANCELLED)
FINAL_STATES = frozenset([DELIVERED, FAILED, EXPIRED, CANCELLED])
#: States in which the agent still owes an answer.
OPEN_STATES = (QUEUED, SENT, ACCEPTED)

#: How long an idempotency key is remembered.
IDEMPOTENCY_WINDOW = 24 * 3600

SCHEMA = """
CREATE TABLE IF NOT EXISTS pushes (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    agent_id TEXT NOT NULL,
    destination TEXT NOT NULL,
    remote TEXT NOT NULL,
    content_type TEXT NOT NULL,
    body TEXT NOT NULL,
    options TEXT NOT NULL DEFAULT '{}',
    idempotency_key TEXT,
    state TEXT NOT NULL,
    created REAL NOT NULL,
    updated REAL NOT NULL,
    expires_at REAL,
    attempts INTEGER NOT NULL DEFAULT 0,
    last_error TEXT,
    reply_status INTEGER,
    reply_content_type TEXT,
    reply_body TEXT,
    requester TEXT
);
CREATE INDEX IF NOT EXISTS pushes_open ON pushes (agent_id, state, seq);
CREATE INDEX IF NOT EXISTS pushes_agent_seq ON pushes (agent_id, seq);
CREATE INDEX IF NOT EXISTS pushes_idem ON pushes (agent_id, remote, idempotency_key);
"""

_COLUMNS = (
    "seq id agent_id destination remote content_type body options idempotency_key state created "
    "updated expires_at attempts last_error reply_status reply_content_type reply_body requester"
).split()


@attr.s(auto_attribs=True)
class Push:
    """One journal entry."""

    id: str
    agent_id: str
    destination: str
    remote: str
    content_type: str
    body: str
    options: dict[str, Any] = attr.ib(factory=dict)
    idempotency_key: str | None = None
    state: str = QUEUED
    created: float = 0.0
    updated: float = 0.0
    expires_at: float | None = None
    attempts: int = 0
    last_error: str | None = None
    reply_status: int | None = None
    reply_content_type: str | None = None
    reply_body: str | None = None
    requester: str | None = None
    seq: int | None = None

    @property
    def final(self) -> bool:
        return self.state in FINAL_STATES

    def to_json(self, *, include_body: bool = False) -> dict[str, Any]:
        """The status document shown at the push's status URL."""
        doc: dict[str, Any] = {
            "resourceType": "AgentPush",
            "id": self.id,
            "agent": {"reference": f"Agent/{self.agent_id}"},
            "destination": self.destination,
            "remote": self.remote,
            "contentType": self.content_type,
            "state": self.state,
            "created": _iso(self.created),
            "updated": _iso(self.updated),
            "attempts": self.attempts,
        }
        if self.idempotency_key:
            doc["idempotencyKey"] = self.idempotency_key
        if self.expires_at:
            doc["expiresAt"] = _iso(self.expires_at)
        if self.last_error:
            doc["error"] = self.last_error
        if self.reply_body is not None:
            doc["reply"] = {
                "statusCode": self.reply_status,
                "contentType": self.reply_content_type,
                "body": self.reply_body,
            }
        if include_body:
            doc["body"] = self.body
        return doc


class _WallClock:
    def seconds(self) -> float:
        return time.time()


def _iso(t: float | None) -> str | None:
    if t is None:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t * 1000) % 1000:03d}Z"


def _row_to_push(row: Any) -> Push:
    values = {c: row[c] for c in _COLUMNS}
    values["options"] = json.loads(values["options"] or "{}")
    return Push(**values)


class Journal:
    def __init__(self, db: Database, *, clock: Any = None) -> None:
        self._db = db
        self._clock = clock if clock is not None else _WallClock()

    @staticmethod
    def schema() -> str:
        return SCHEMA

    def new_id(self) -> str:
        return uuid.uuid4().hex

    def create(self, push: Push) -> Deferred[Push]:
        """Store a new push (group committed); fires once it is on disk."""
        now = self._clock.seconds()
        push.created = push.updated = now

        def txn(conn: Any) -> Push:
            cur = conn.execute(
                "INSERT INTO pushes (id, agent_id, destination, remote, content_type, body,"
                " options, idempotency_key, state, created, updated, expires_at, requester)"
                " VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (
                    push.id,
                    push.agent_id,
                    push.destination,
                    push.remote,
                    push.content_type,
                    push.body,
                    json.dumps(push.options),
                    push.idempotency_key,
                    push.state,
                    push.created,
                    push.updated,
                    push.expires_at,
                    push.requester,
                ),
            )
            push.seq = cur.lastrowid
            return push

        return self._db.run_batched(txn)

    def find_idempotent(self, agent_id: str, remote: str, key: str) -> Deferred[Push | None]:
        since = self._clock.seconds() - IDEMPOTENCY_WINDOW

        def txn(conn: Any) -> Push | None:
            row = conn.execute(
                "SELECT * FROM pushes WHERE agent_id=? AND remote=? AND idempotency_key=?"
                " AND created>=? AND state != 'cancelled' ORDER BY seq LIMIT 1",
                (agent_id, remote, key, since),
            ).fetchone()
            return _row_to_push(row) if row is not None else None

        return self._db.run(txn)

    def transition(
        self,
        push: Push,
        state: str,
        *,
        error: str | None = None,
        reply: tuple[int, str, str] | None = None,
        count_attempt: bool = False,
    ) -> Deferred[Push]:
        """Move C{push} to C{state} (in memory now, on disk with the next batch)."""
        push.state = state
        push.updated = self._clock.seconds()
        if count_attempt:
            push.attempts += 1
        if error is not None:
            push.last_error = error
        if reply is not None:
            push.reply_status, push.reply_content_type, push.reply_body = reply
        values = (
            push.state,
            push.updated,
            push.attempts,
            push.last_error,
            push.reply_status,
            push.reply_content_type,
            push.reply_body,
            push.id,
        )

        def txn(conn: Any) -> Push:
            conn.execute(
                "UPDATE pushes SET state=?, updated=?, attempts=?, last_error=?, reply_status=?,"
                " reply_content_type=?, reply_body=? WHERE id=?",
                values,
            )
            return push

        return self._db.run_batched(txn)

    def expire_overdue(self) -> Deferred[int]:
        """Queued pushes past their ``expiresAt`` become ``expired`` (never sent)."""
        now = self._clock.seconds()

        def txn(conn: Any) -> int:
            return conn.execute(
                "UPDATE pushes SET state=?, updated=?, last_error=? WHERE state=? AND"
                " expires_at IS NOT NULL AND expires_at<=?",
                (EXPIRED, now, "Expired before it could be sent", QUEUED, now),
            ).rowcount

        return self._db.run(txn)

    def prune(self, older_than: float) -> Deferred[int]:
        """Delete final pushes (and their payloads) last updated more than C{older_than} s ago."""
        cutoff = self._clock.seconds() - older_than
        finals = tuple(FINAL_STATES)

        def txn(conn: Any) -> int:
            return conn.execute(
                f"DELETE FROM pushes WHERE state IN ({','.join('?' * len(finals))})"
                " AND updated<?",
                (*finals, cutoff),
            ).rowcount

        return self._db.run(txn)

    def flushed(self) -> Deferred[None]:
        """Fires once every write queued before this call is committed."""
        return self._db.run_batched(lambda conn: None)

    def get(self, push_id: str) -> Deferred[Push]:
        def txn(conn: Any) -> Push:
            row = conn.execute("SELECT * FROM pushes WHERE id=?", (push_id,)).fetchone()
            if row is None:
                raise not_found(f"No push {push_id}")
            return _row_to_push(row)

        return self._db.run(txn)

    def open_for_agent(
        self, agent_id: str, *, after_seq: int = 0, limit: int = 500, states: Iterable[str] = OPEN_STATES
    ) -> Deferred[list[Push]]:
        """
        The next page of pushes the agent still owes an answer for, oldest first.  Paged so a
        million queued pushes are streamed from disk, never held in memory.
        """
        states = tuple(states)
        marks = ",".join("?" * len(states))

        def txn(conn: Any) -> list[Push]:
            rows = conn.execute(
                f"SELECT * FROM pushes WHERE agent_id=? AND state IN ({marks}) AND seq>?"
                " ORDER BY seq LIMIT ?",
                (agent_id, *states, after_seq, limit),
            )
            return [_row_to_push(r) for r in rows]

        return self._db.run(txn)

    def open_pushes(
        self,
        agent_id: str,
        *,
        after_seq: int = 0,
        remotes: Iterable[str] | None = None,
        exclude_remotes: Iterable[str] = (),
        limit: int = 500,
        states: Iterable[str] = OPEN_STATES,
    ) -> Deferred[list[Push]]:
        """
        Like L{open_for_agent}, restricted to (or excluding) some device URLs, and ordered
        after every write queued before it (it runs in the write batch): a push the hub has
        just sent or answered is never read back in its old state, so never sent twice.
        """
        states = tuple(states)
        clauses = [f"state IN ({','.join('?' * len(states))})"]
        args: list[Any] = [agent_id, *states]
        if remotes is not None:
            remotes = tuple(remotes)
            clauses.append(f"remote IN ({','.join('?' * len(remotes))})")
            args.extend(remotes)
        exclude = tuple(exclude_remotes)
        if exclude:
            clauses.append(f"remote NOT IN ({','.join('?' * len(exclude))})")
            args.extend(exclude)
        where = " AND ".join(clauses)

        def txn(conn: Any) -> list[Push]:
            rows = conn.execute(
                f"SELECT * FROM pushes WHERE agent_id=? AND {where} AND seq>? ORDER BY seq"
                " LIMIT ?",
                (*args, after_seq, limit),
            )
            return [_row_to_push(r) for r in rows]

        return self._db.run_batched(txn)

    def current(self, push_id: str) -> Deferred[Push]:
        """L{get}, ordered after every write queued before it."""

        def txn(conn: Any) -> Push:
            row = conn.execute("SELECT * FROM pushes WHERE id=?", (push_id,)).fetchone()
            if row is None:
                raise not_found(f"No push {push_id}")
            return _row_to_push(row)

        return self._db.run_batched(txn)

    def search(self, params: Mapping[str, str], limit: int = 100) -> Deferred[list[Push]]:
        clauses, args = [], []
        for key, column in (("agent", "agent_id"), ("state", "state"), ("destination", "destination")):
            if params.get(key):
                clauses.append(f"{column}=?")
                args.append(params[key])
        where = " AND ".join(clauses) or "1=1"

        def txn(conn: Any) -> list[Push]:
            rows = conn.execute(
                f"SELECT * FROM pushes WHERE {where} ORDER BY seq DESC LIMIT ?", (*args, limit)
            )
            return [_row_to_push(r) for r in rows]

        return self._db.run(txn)

    def counts(self, agent_id: str) -> Deferred[dict[str, Any]]:
        def txn(conn: Any) -> dict[str, Any]:
            out: dict[str, Any] = {s: 0 for s in STATES}
            for row in conn.execute(
                "SELECT state, count(*) AS n FROM pushes WHERE agent_id=? GROUP BY state",
                (agent_id,),
            ):
                out[row["state"]] = row["n"]
            oldest = conn.execute(
                "SELECT min(created) AS t FROM pushes WHERE agent_id=? AND state IN"
                " ('queued','sent','accepted')",
                (agent_id,),
            ).fetchone()
            out["oldestOpenAgeSeconds"] = (
                round(self._clock.seconds() - oldest["t"], 3) if oldest["t"] is not None else None
            )
            return out

        return self._db.run(txn)
