"""
The rows of the agent's outbox in SQLite (L{medagent.storage.interfaces.OutboxStore}); the
outbox's behaviour is L{medagent.agent.outbox.Outbox}.  Writes are group committed.
"""

from __future__ import annotations

from typing import Any, Mapping

from twisted.internet.defer import Deferred

from medagent.storage.sqlite.database import Database

SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    callback TEXT NOT NULL UNIQUE,
    channel TEXT NOT NULL,
    remote TEXT NOT NULL,
    content_type TEXT NOT NULL,
    body TEXT NOT NULL,
    created REAL NOT NULL
);
"""


class SQLiteOutboxStore:
    """L{OutboxStore} on a L{Database}."""

    def __init__(self, db: Database) -> None:
        self._db = db

    @staticmethod
    def schema() -> str:
        return SCHEMA

    def add(self, row: Mapping[str, Any], created: float) -> Deferred[None]:
        values = (row["callback"], row["channel"], row["remote"], row["content_type"],
                  row["body"], created)

        def txn(conn: Any) -> None:
            conn.execute(
                "INSERT INTO outbox (callback, channel, remote, content_type, body, created)"
                " VALUES (?,?,?,?,?,?)", values)

        return self._db.run_batched(txn)

    def remove(self, callback: str) -> Deferred[None]:
        def txn(conn: Any) -> None:
            conn.execute("DELETE FROM outbox WHERE callback=?", (callback,))

        return self._db.run_batched(txn)

    def pending(self, limit: int) -> Deferred[list[dict[str, Any]]]:
        def txn(conn: Any) -> list[dict[str, Any]]:
            return [dict(r) for r in conn.execute(
                "SELECT * FROM outbox ORDER BY seq LIMIT ?", (limit,))]

        return self._db.run(txn)

    def count(self) -> Deferred[int]:
        return self._db.run(lambda conn: conn.execute("SELECT count(*) FROM outbox")
                            .fetchone()[0])
