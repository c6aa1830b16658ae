"""
The Subscription delivery queue in SQLite (L{medagent.storage.interfaces.DeliveryQueue}).

Rows are queued inside a resource write's own transaction (L{insert}, reached through
L{medagent.storage.sqlite.store.SQLiteTransaction.enqueue_deliveries}) or in one of their own
(L{SQLiteDeliveryQueue.enqueue}); they are claimed with a lease, one at a time per
(Subscription, resource) lane, oldest first.
"""

from __future__ import annotations

from typing import Any, Sequence

from twisted.internet.defer import Deferred, fail

from medagent.storage.records import (
    CANCELLED,
    DELIVERED,
    FAILED,
    PENDING,
    Delivery,
    NewDelivery,
    delivery_from_row,
)
from medagent.storage.sqlite.database import Database

SCHEMA = """
CREATE TABLE IF NOT EXISTS subscription_deliveries (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    subscription_id TEXT NOT NULL,
    interaction TEXT NOT NULL,
    resource_type TEXT NOT NULL,
    resource_id TEXT NOT NULL,
    version_id TEXT,
    payload TEXT,
    state TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    max_attempts INTEGER NOT NULL,
    leased INTEGER NOT NULL DEFAULT 0,
    next_attempt REAL NOT NULL,
    last_error TEXT,
    created REAL NOT NULL,
    updated REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS subscription_deliveries_due
    ON subscription_deliveries (state, next_attempt);
CREATE INDEX IF NOT EXISTS subscription_deliveries_lane
    ON subscription_deliveries (subscription_id, resource_type, resource_id, state);
"""

#: A pending row with an older pending row in its lane waits for that one.
_FIRST_IN_LANE = (
    "NOT EXISTS (SELECT 1 FROM subscription_deliveries e WHERE e.state=? AND "
    "e.subscription_id=d.subscription_id AND e.resource_type=d.resource_type AND "
    "e.resource_id=d.resource_id AND e.seq<d.seq)"
)


#: shared with the other backends (L{medagent.storage.records.delivery_from_row})
from_row = delivery_from_row


def insert(conn: Any, rows: Sequence[NewDelivery]) -> list[Delivery]:
    """Queue C{rows} on C{conn}, inside whatever transaction it is in; in C{rows} order."""
    if not rows:
        return []
    conn.executemany(
        "INSERT INTO subscription_deliveries (id, subscription_id, interaction, "
        "resource_type, resource_id, version_id, payload, state, max_attempts, "
        "next_attempt, created, updated) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
        [(r.id, r.subscription_id, r.interaction, r.resource_type, r.resource_id,
          r.version_id, r.payload, PENDING, r.max_attempts, r.next_attempt, r.created,
          r.created) for r in rows])
    marks = ",".join("?" * len(rows))
    return [from_row(r) for r in conn.execute(
        f"SELECT * FROM subscription_deliveries WHERE id IN ({marks}) ORDER BY seq",
        [r.id for r in rows])]


class SQLiteDeliveryQueue:
    """L{DeliveryQueue} on a L{Database}; see the interface for what each call guarantees."""

    def __init__(self, db: Database) -> None:
        self._db = db

    @staticmethod
    def schema() -> str:
        return SCHEMA

    def enqueue(self, rows: Sequence[NewDelivery]) -> Deferred[list[Delivery]]:
        return self._db.run(insert, list(rows))

    def recover(self, now: float) -> Deferred[int]:
        def txn(conn: Any) -> int:
            return conn.execute(
                "UPDATE subscription_deliveries SET leased=0, next_attempt=?, "
                "attempts=MAX(0, attempts-1) WHERE state=? AND leased=1", (now, PENDING)
            ).rowcount

        return self._db.run(txn)

    def claim(self, now: float, lease: float, limit: int
              ) -> Deferred[tuple[list[Delivery], float | None]]:
        def txn(conn: Any) -> tuple[list[Delivery], float | None]:
            rows = conn.execute(
                "SELECT * FROM subscription_deliveries d WHERE d.state=? AND d.leased=0 AND "
                f"d.next_attempt<=? AND {_FIRST_IN_LANE} ORDER BY d.seq LIMIT ?",
                (PENDING, now, PENDING, limit)).fetchall()
            claimed = []
            for row in rows:
                conn.execute(
                    "UPDATE subscription_deliveries SET leased=1, attempts=attempts+1, "
                    "next_attempt=?, updated=? WHERE id=?", (now + lease, now, row["id"]))
                delivery = from_row(row)
                delivery.attempts += 1
                claimed.append(delivery)
            nxt = conn.execute(
                "SELECT MIN(d.next_attempt) FROM subscription_deliveries d WHERE d.state=? AND "
                f"d.leased=0 AND d.next_attempt>? AND {_FIRST_IN_LANE}",
                (PENDING, now, PENDING)).fetchone()[0]
            return claimed, nxt

        return self._db.run(txn)

    def retry(self, delivery_id: str, *, attempts: int, next_attempt: float, error: str,
              now: float) -> Deferred[None]:
        def txn(conn: Any) -> None:
            conn.execute(
                "UPDATE subscription_deliveries SET leased=0, attempts=?, next_attempt=?, "
                "last_error=?, updated=? WHERE id=?",
                (attempts, next_attempt, error[:1000], now, delivery_id))

        return self._db.run(txn)

    def finish(self, delivery_id: str, state: str, *, error: str | None, now: float,
               keep_payload: bool) -> Deferred[None]:
        if state not in (DELIVERED, FAILED, CANCELLED):
            return fail(ValueError(f"not a final delivery state: {state!r}"))

        def txn(conn: Any) -> None:
            conn.execute(
                "UPDATE subscription_deliveries SET state=?, leased=0, last_error=?, "
                "updated=?, payload=CASE WHEN ? THEN payload ELSE NULL END WHERE id=?",
                (state, error and error[:1000], now, 1 if keep_payload else 0, delivery_id))

        return self._db.run(txn)

    def sweep(self, *, finished_before: float, failed_before: float) -> Deferred[int]:
        def txn(conn: Any) -> int:
            n = conn.execute(
                "DELETE FROM subscription_deliveries WHERE state IN (?, ?) AND updated<?",
                (DELIVERED, CANCELLED, finished_before)).rowcount
            n += conn.execute(
                "DELETE FROM subscription_deliveries WHERE state=? AND updated<?",
                (FAILED, failed_before)).rowcount
            return n

        return self._db.run(txn)

    def list(self, subscription_id: str | None = None, state: str | None = None,
             limit: int = 100) -> Deferred[list[Delivery]]:
        def txn(conn: Any) -> list[Delivery]:
            clauses, args = [], []
            if subscription_id:
                clauses.append("subscription_id=?")
                args.append(subscription_id)
            if state:
                clauses.append("state=?")
                args.append(state)
            where = " AND ".join(clauses) or "1=1"
            return [from_row(r) for r in conn.execute(
                f"SELECT * FROM subscription_deliveries WHERE {where} ORDER BY seq DESC "
                "LIMIT ?", (*args, limit))]

        return self._db.run(txn)

    def backlog(self) -> Deferred[tuple[int, float | None]]:
        def txn(conn: Any) -> tuple[int, float | None]:
            row = conn.execute(
                "SELECT count(*) AS n, min(created) AS t FROM subscription_deliveries "
                "WHERE state=?", (PENDING,)).fetchone()
            return int(row["n"]), row["t"]

        return self._db.run(txn)
