"""
Paused lanes in PostgreSQL (L{medagent.storage.interfaces.LanePauses}), shared by every relay
node on the database (migration 8).
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred

from medagent.storage.postgres.database import PgDatabase


def _row(r: Any) -> dict[str, Any]:
    return {"agent": r["agent_id"], "lane": r["lane"], "by": r["paused_by"],
            "since": float(r["since"])}


class PgLanePauses:
    """L{LanePauses} on a L{PgDatabase}."""

    def __init__(self, db: PgDatabase) -> None:
        self._db = db

    def pause(self, agent_id: str, lane: str, by: str, now: float) -> Deferred[bool]:
        def txn(conn: Any) -> bool:
            row = conn.execute(
                "INSERT INTO lane_pauses (agent_id, lane, paused_by, since)"
                " VALUES (%s, %s, %s, %s) ON CONFLICT (agent_id, lane) DO NOTHING"
                " RETURNING agent_id", (agent_id, lane, by, now)).fetchone()
            return row is not None

        return self._db.run(txn)

    def resume(self, agent_id: str, lane: str) -> Deferred[bool]:
        def txn(conn: Any) -> bool:
            row = conn.execute("DELETE FROM lane_pauses WHERE agent_id = %s AND lane = %s"
                               " RETURNING agent_id", (agent_id, lane)).fetchone()
            return row is not None

        return self._db.run(txn)

    def list(self, agent_id: str | None = None, limit: int = 1000
             ) -> Deferred[list[dict[str, Any]]]:
        def txn(conn: Any) -> list[dict[str, Any]]:
            if agent_id is None:
                rows = conn.execute("SELECT * FROM lane_pauses ORDER BY agent_id, lane"
                                    " LIMIT %s", (limit,)).fetchall()
            else:
                rows = conn.execute("SELECT * FROM lane_pauses WHERE agent_id = %s"
                                    " ORDER BY lane LIMIT %s", (agent_id, limit)).fetchall()
            return [_row(r) for r in rows]

        return self._db.run(txn)
