"""
The Subscription delivery queue in PostgreSQL (L{medagent.storage.interfaces.DeliveryQueue}).

Claims lock the rows they lease with C{FOR UPDATE SKIP LOCKED}, so relay nodes sharing the
database never lease one delivery twice; only the oldest pending row of a lane is claimable.
"""

from __future__ import annotations

from typing import Any, Sequence

from twisted.internet.defer import Deferred, fail

from medagent.storage.postgres.database import PgDatabase
from medagent.storage.records import (
    CANCELLED,
    DELIVERED,
    FAILED,
    PENDING,
    Delivery,
    NewDelivery,
    delivery_from_row,
)

#: A pending row with an older pending row in its lane waits for that one.
_FIRST_IN_LANE = (
    "NOT EXISTS (SELECT 1 FROM subscription_deliveries e WHERE e.state=%s AND "
    "e.subscription_id=d.subscription_id AND e.resource_type=d.resource_type AND "
    "e.resource_id=d.resource_id AND e.seq<d.seq)"
)


def insert(conn: Any, rows: Sequence[NewDelivery]) -> list[Delivery]:
    """Queue C{rows} on C{conn}, inside whatever transaction it is in; in C{rows} order."""
    out = []
    for r in rows:
        row = conn.execute(
            "INSERT INTO subscription_deliveries (id, subscription_id, interaction, "
            "resource_type, resource_id, version_id, payload, state, max_attempts, "
            "next_attempt, created, updated) VALUES (%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s)"
            " RETURNING *",
            (r.id, r.subscription_id, r.interaction, r.resource_type, r.resource_id,
             r.version_id, r.payload, PENDING, r.max_attempts, r.next_attempt, r.created,
             r.created)).fetchone()
        out.append(delivery_from_row(row))
    return out


class PgDeliveryQueue:
    """L{DeliveryQueue} on a L{PgDatabase}; see the interface for what each call guarantees."""

    def __init__(self, db: PgDatabase) -> None:
        self._db = db

    def enqueue(self, rows: Sequence[NewDelivery]) -> Deferred[list[Delivery]]:
        return self._db.run_ordered(insert, list(rows))

    def recover(self, now: float) -> Deferred[int]:
        def txn(conn: Any) -> int:
            return conn.execute(
                "UPDATE subscription_deliveries SET leased=false, next_attempt=%s, "
                "attempts=GREATEST(0, attempts-1) WHERE state=%s AND leased",
                (now, PENDING)).rowcount

        return self._db.run_ordered(txn)

    def claim(self, now: float, lease: float, limit: int
              ) -> Deferred[tuple[list[Delivery], float | None]]:
        def txn(conn: Any) -> tuple[list[Delivery], float | None]:
            rows = conn.execute(
                "SELECT * FROM subscription_deliveries d WHERE d.state=%s AND NOT d.leased AND"
                f" d.next_attempt<=%s AND {_FIRST_IN_LANE} ORDER BY d.seq LIMIT %s"
                " FOR UPDATE SKIP LOCKED",
                (PENDING, now, PENDING, limit)).fetchall()
            claimed = []
            for row in rows:
                conn.execute(
                    "UPDATE subscription_deliveries SET leased=true, attempts=attempts+1, "
                    "next_attempt=%s, updated=%s WHERE id=%s", (now + lease, now, row["id"]))
                delivery = delivery_from_row(row)
                delivery.attempts += 1
                claimed.append(delivery)
            nxt = conn.execute(
                "SELECT MIN(d.next_attempt) AS t FROM subscription_deliveries d WHERE"
                f" d.state=%s AND NOT d.leased AND d.next_attempt>%s AND {_FIRST_IN_LANE}",
                (PENDING, now, PENDING)).fetchone()["t"]
            return claimed, nxt

        return self._db.run_ordered(txn)

    def retry(self, delivery_id: str, *, attempts: int, next_attempt: float, error: str,
              now: float) -> Deferred[None]:
        def txn(conn: Any) -> None:
            conn.execute(
                "UPDATE subscription_deliveries SET leased=false, attempts=%s, next_attempt=%s,"
                " last_error=%s, updated=%s WHERE id=%s",
                (attempts, next_attempt, error[:1000], now, delivery_id))

        return self._db.run_ordered(txn)

    def finish(self, delivery_id: str, state: str, *, error: str | None, now: float,
               keep_payload: bool) -> Deferred[None]:
        if state not in (DELIVERED, FAILED, CANCELLED):
            return fail(ValueError(f"not a final delivery state: {state!r}"))

        def txn(conn: Any) -> None:
            conn.execute(
                "UPDATE subscription_deliveries SET state=%s, leased=false, last_error=%s, "
                "updated=%s, payload=CASE WHEN %s THEN payload ELSE NULL END WHERE id=%s",
                (state, error and error[:1000], now, bool(keep_payload), delivery_id))

        return self._db.run_ordered(txn)

    def sweep(self, *, finished_before: float, failed_before: float) -> Deferred[int]:
        def txn(conn: Any) -> int:
            n = conn.execute(
                "DELETE FROM subscription_deliveries WHERE state IN (%s, %s) AND updated<%s",
                (DELIVERED, CANCELLED, finished_before)).rowcount
            n += conn.execute(
                "DELETE FROM subscription_deliveries WHERE state=%s AND updated<%s",
                (FAILED, failed_before)).rowcount
            return n

        return self._db.run_ordered(txn)

    def backlog(self) -> Deferred[tuple[int, float | None]]:
        """Pending deliveries and the oldest one's creation time (for metrics)."""
        def txn(conn: Any) -> tuple[int, float | None]:
            row = conn.execute(
                "SELECT count(*) AS n, min(created) AS t FROM subscription_deliveries "
                "WHERE state=%s", (PENDING,)).fetchone()
            return int(row["n"]), row["t"]

        return self._db.run(txn)

    def list(self, subscription_id: str | None = None, state: str | None = None,
             limit: int = 100) -> Deferred[list[Delivery]]:
        clauses, args = [], []
        if subscription_id:
            clauses.append("subscription_id=%s")
            args.append(subscription_id)
        if state:
            clauses.append("state=%s")
            args.append(state)
        where = " AND ".join(clauses) or "true"

        def txn(conn: Any) -> list[Delivery]:
            return [delivery_from_row(r) for r in conn.execute(
                f"SELECT * FROM subscription_deliveries WHERE {where} ORDER BY seq DESC"
                " LIMIT %s", (*args, limit))]

        return self._db.run(txn)
