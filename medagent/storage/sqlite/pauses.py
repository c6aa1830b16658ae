"""
Paused lanes in SQLite (L{medagent.storage.interfaces.LanePauses}).
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred

from medagent.storage.sqlite.database import Database

SCHEMA = """
CREATE TABLE IF NOT EXISTS lane_pauses (
    agent_id TEXT NOT NULL,
    lane TEXT NOT NULL,
    paused_by TEXT NOT NULL,
    since REAL NOT NULL,
    PRIMARY KEY (agent_id, lane)
);
"""


def _row(r: Any) -> dict[str, Any]:
    return {"agent": r["agent_id"], "lane": r["lane"], "by": r["paused_by"],
            "since": float(r["since"])}


class SQLiteLanePauses:
    """L{LanePauses} on a L{Database}."""

    def __init__(self, db: Database) -> None:
        self._db = db

    @staticmethod
    def schema() -> str:
        return SCHEMA

    def pause(self, agent_id: str, lane: str, by: str, now: float) -> Deferred[bool]:
        def txn(conn: Any) -> bool:
            cur = conn.execute(
                "INSERT OR IGNORE INTO lane_pauses (agent_id, lane, paused_by, since)"
                " VALUES (?,?,?,?)", (agent_id, lane, by, now))
            return bool(cur.rowcount)

        return self._db.run(txn)

    def resume(self, agent_id: str, lane: str) -> Deferred[bool]:
        def txn(conn: Any) -> bool:
            cur = conn.execute("DELETE FROM lane_pauses WHERE agent_id=? AND lane=?",
                               (agent_id, lane))
            return bool(cur.rowcount)

        return self._db.run(txn)

    def list(self, agent_id: str | None = None, limit: int = 1000
             ) -> Deferred[list[dict[str, Any]]]:
        def txn(conn: Any) -> list[dict[str, Any]]:
            if agent_id is None:
                rows = conn.execute("SELECT * FROM lane_pauses ORDER BY agent_id, lane"
                                    " LIMIT ?", (limit,))
            else:
                rows = conn.execute("SELECT * FROM lane_pauses WHERE agent_id=?"
                                    " ORDER BY lane LIMIT ?", (agent_id, limit))
            return [_row(r) for r in rows]

        return self._db.run(txn)
