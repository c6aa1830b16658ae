"""
The console's sign-in sessions shared by relay nodes (L{medagent.storage.interfaces.
ConsoleSessions}), in PostgreSQL: one row per session, keyed by the SHA-256 of its id, idle
expiry on PostgreSQL's own clock (the nodes' clocks may differ).
"""

from __future__ import annotations

import json
from typing import Any

from twisted.internet.defer import Deferred

from medagent.storage.postgres.database import PgDatabase
from medagent.storage.records import SharedConsoleSession


class PgConsoleSessions:
    """L{ConsoleSessions} on a L{PgDatabase}; see the interface for each call's guarantee."""

    def __init__(self, db: PgDatabase) -> None:
        self._db = db

    def add(self, session: SharedConsoleSession) -> Deferred[None]:
        def txn(conn: Any) -> None:
            conn.execute(
                "INSERT INTO console_sessions (id_hash, client_id, role, agents, name, csrf)"
                " VALUES (%s, %s, %s, %s, %s, %s)",
                (session.id_hash, session.client_id, session.role,
                 json.dumps(sorted(session.agents)), session.name, session.csrf))

        return self._db.run(txn)

    def use(self, id_hash: bytes, idle: float) -> Deferred[SharedConsoleSession | None]:
        def txn(conn: Any) -> SharedConsoleSession | None:
            row = conn.execute(
                "UPDATE console_sessions SET last_seen = clock_timestamp()"
                " WHERE id_hash = %s"
                " AND last_seen >= clock_timestamp() - make_interval(secs => %s)"
                " RETURNING client_id, role, agents, name, csrf", (id_hash, idle)).fetchone()
            if row is None:
                return None
            return SharedConsoleSession(
                id_hash=id_hash, client_id=row["client_id"], role=row["role"],
                agents=frozenset(json.loads(row["agents"])), name=row["name"],
                csrf=row["csrf"])

        return self._db.run(txn)

    def live(self, id_hash: bytes, idle: float) -> Deferred[bool]:
        def txn(conn: Any) -> bool:
            return conn.execute(
                "SELECT 1 AS one FROM console_sessions WHERE id_hash = %s"
                " AND last_seen >= clock_timestamp() - make_interval(secs => %s)",
                (id_hash, idle)).fetchone() is not None

        return self._db.run(txn)

    def drop(self, id_hash: bytes) -> Deferred[None]:
        def txn(conn: Any) -> None:
            conn.execute("DELETE FROM console_sessions WHERE id_hash = %s", (id_hash,))

        return self._db.run(txn)

    def drop_client(self, client_id: str) -> Deferred[None]:
        def txn(conn: Any) -> None:
            conn.execute("DELETE FROM console_sessions WHERE client_id = %s", (client_id,))

        return self._db.run(txn)

    def prune(self, idle: float) -> Deferred[int]:
        def txn(conn: Any) -> int:
            return int(conn.execute(
                "DELETE FROM console_sessions"
                " WHERE last_seen < clock_timestamp() - make_interval(secs => %s)",
                (idle,)).rowcount)

        return self._db.run(txn)
