"""
Agent operations asked on one relay node of an agent another node holds
(L{medagent.storage.interfaces.AgentCalls}), in PostgreSQL.  Deadlines are on PostgreSQL's
clock (nodes' clocks may differ).  Placing and answering a call also sends a wake-up notice
in the same transaction (delivered when it commits), so the other node need not wait for its
next poll.
"""

from __future__ import annotations

import json
from typing import Any, Mapping

from twisted.internet.defer import Deferred

from medagent.storage.postgres.database import PgDatabase
from medagent.storage.postgres.notices import CHANNEL, encode_notice

#: seconds past its deadline a call nobody removed (its asking node died) is kept
STALE_AFTER = 600.0


class PgAgentCalls:
    """L{AgentCalls} on a L{PgDatabase}; see the interface for each call's guarantee."""

    def __init__(self, db: PgDatabase) -> None:
        self._db = db

    def place(self, call_id: str, agent_id: str, node_id: str, from_node: str,
              request: Mapping[str, Any], timeout: float) -> Deferred[None]:
        def txn(conn: Any) -> None:
            conn.execute(
                "INSERT INTO agent_calls (id, agent_id, node_id, from_node, request, deadline)"
                " VALUES (%s, %s, %s, %s, %s, clock_timestamp() + make_interval(secs => %s))",
                (call_id, agent_id, node_id, from_node, json.dumps(request), timeout))
            conn.execute("SELECT pg_notify(%s, %s)", (CHANNEL, encode_notice(
                {"k": "call", "to": node_id, "id": call_id})))

        return self._db.run(txn)

    def take(self, node_id: str, limit: int = 100) -> Deferred[list[dict[str, Any]]]:
        def txn(conn: Any) -> list[dict[str, Any]]:
            conn.execute("DELETE FROM agent_calls WHERE deadline < clock_timestamp()"
                         " - make_interval(secs => %s)", (STALE_AFTER,))
            rows = conn.execute(
                "UPDATE agent_calls SET taken = true WHERE id IN (SELECT id FROM agent_calls"
                " WHERE node_id = %s AND NOT taken AND deadline > clock_timestamp()"
                " ORDER BY deadline LIMIT %s FOR UPDATE SKIP LOCKED)"
                " RETURNING id, agent_id, from_node, request", (node_id, limit)).fetchall()
            return [{"id": r["id"], "agent_id": r["agent_id"], "from_node": r["from_node"],
                     "request": json.loads(r["request"])} for r in rows]

        return self._db.run(txn)

    def answer(self, call_id: str, answer: Mapping[str, Any]) -> Deferred[None]:
        def txn(conn: Any) -> None:
            row = conn.execute(
                "UPDATE agent_calls SET answer = %s WHERE id = %s AND taken AND answer IS NULL"
                " RETURNING from_node", (json.dumps(answer), call_id)).fetchone()
            if row is not None:
                conn.execute("SELECT pg_notify(%s, %s)", (CHANNEL, encode_notice(
                    {"k": "answer", "to": row["from_node"], "id": call_id})))

        return self._db.run(txn)

    def result(self, call_id: str) -> Deferred[dict[str, Any] | None]:
        def txn(conn: Any) -> dict[str, Any] | None:
            row = conn.execute("SELECT answer FROM agent_calls WHERE id = %s",
                               (call_id,)).fetchone()
            if row is None or row["answer"] is None:
                return None
            answer: dict[str, Any] = json.loads(row["answer"])
            return answer

        return self._db.run(txn)

    def forget(self, call_id: str) -> Deferred[None]:
        def txn(conn: Any) -> None:
            conn.execute("DELETE FROM agent_calls WHERE id = %s", (call_id,))

        return self._db.run(txn)
