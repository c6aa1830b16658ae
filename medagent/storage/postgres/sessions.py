"""
Which relay node holds each agent's websocket (L{medagent.storage.interfaces.AgentSessions}),
in PostgreSQL: one row per agent, a lease on PostgreSQL's own clock (nodes' clocks may
differ), so a node that died without a word loses its agents once their leases run out.
"""

from __future__ import annotations

from typing import Any, Sequence

from twisted.internet.defer import Deferred

from medagent.storage.postgres.database import PgDatabase


class PgAgentSessions:
    """L{AgentSessions} on a L{PgDatabase}; see the interface for each call's guarantee."""

    def __init__(self, db: PgDatabase) -> None:
        self._db = db

    def claim(self, agent_id: str, node_id: str, session_id: str, lease: float
              ) -> Deferred[str | None]:
        def txn(conn: Any) -> str | None:
            row = conn.execute(
                "INSERT INTO agent_sessions (agent_id, node_id, session_id, connected_at,"
                " lease_expires) VALUES (%s, %s, %s, clock_timestamp(),"
                " clock_timestamp() + make_interval(secs => %s))"
                " ON CONFLICT (agent_id) DO UPDATE SET node_id = EXCLUDED.node_id,"
                " session_id = EXCLUDED.session_id, connected_at = EXCLUDED.connected_at,"
                " lease_expires = EXCLUDED.lease_expires"
                " WHERE agent_sessions.lease_expires < clock_timestamp()"
                " OR agent_sessions.node_id = EXCLUDED.node_id"
                " RETURNING node_id", (agent_id, node_id, session_id, lease)).fetchone()
            if row is not None:
                return None
            holder = conn.execute("SELECT node_id FROM agent_sessions WHERE agent_id = %s",
                                  (agent_id,)).fetchone()
            return holder["node_id"] if holder is not None else None

        return self._db.run(txn)

    def renew(self, node_id: str, session_ids: Sequence[str], lease: float
              ) -> Deferred[set[str]]:
        def txn(conn: Any) -> set[str]:
            if not session_ids:
                return set()
            rows = conn.execute(
                "UPDATE agent_sessions SET lease_expires = clock_timestamp()"
                " + make_interval(secs => %s) WHERE node_id = %s AND session_id = ANY(%s)"
                " RETURNING session_id", (lease, node_id, list(session_ids))).fetchall()
            return {r["session_id"] for r in rows}

        return self._db.run(txn)

    def release(self, agent_id: str, session_id: str) -> Deferred[None]:
        def txn(conn: Any) -> None:
            conn.execute("DELETE FROM agent_sessions WHERE agent_id = %s AND session_id = %s",
                         (agent_id, session_id))

        return self._db.run(txn)

    def holder(self, agent_id: str) -> Deferred[str | None]:
        def txn(conn: Any) -> str | None:
            row = conn.execute(
                "SELECT node_id FROM agent_sessions WHERE agent_id = %s"
                " AND lease_expires >= clock_timestamp()", (agent_id,)).fetchone()
            return row["node_id"] if row is not None else None

        return self._db.run(txn)

    def holders(self, limit: int) -> Deferred[dict[str, str]]:
        def txn(conn: Any) -> dict[str, str]:
            rows = conn.execute(
                "SELECT agent_id, node_id FROM agent_sessions"
                " WHERE lease_expires >= clock_timestamp() ORDER BY agent_id LIMIT %s",
                (limit,)).fetchall()
            return {r["agent_id"]: r["node_id"] for r in rows}

        return self._db.run(txn)

