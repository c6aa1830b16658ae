"""
The inbound log in PostgreSQL (L{medagent.storage.interfaces.InboundLog}); the record is
L{medagent.storage.inbound}, the table migration 7 (L{medagent.storage.postgres.schema}).
"""

from __future__ import annotations

import uuid
from typing import Any, Mapping

from twisted.internet.defer import Deferred

from medagent.fhir import not_found
from medagent.storage import inbound as i
from medagent.storage.postgres.database import PgDatabase

_INSERT = (f"INSERT INTO inbound ({', '.join(i.COLUMNS[1:])})"
           f" VALUES ({','.join(['%s'] * (len(i.COLUMNS) - 1))}) RETURNING seq")


class PgInboundLog:
    """L{InboundLog} on a L{PgDatabase}; see the interface for what each call guarantees."""

    def __init__(self, db: PgDatabase) -> None:
        self._db = db

    def new_id(self) -> str:
        return uuid.uuid4().hex

    def add(self, message: i.InboundMessage) -> Deferred[i.InboundMessage]:
        values = i.insert_values(message)

        def txn(conn: Any) -> i.InboundMessage:
            message.seq = conn.execute(_INSERT, values).fetchone()["seq"]
            return message

        return self._db.run_batched(txn)

    def get(self, message_id: str) -> Deferred[i.InboundMessage]:
        def txn(conn: Any) -> i.InboundMessage:
            row = conn.execute("SELECT * FROM inbound WHERE id=%s", (message_id,)).fetchone()
            if row is None:
                raise not_found(f"No inbound message {message_id}")
            return i.inbound_from_row(row)

        return self._db.run(txn)

    def search_page(self, params: Mapping[str, str], *, count: int,
                    before_seq: int | None = None
                    ) -> Deferred[tuple[list[i.InboundMessage], int, int | None]]:
        return self._db.run(i.search_page, "%s", params, count, before_seq)

    def channel_summaries(self, agent_id: str, since: float
                          ) -> Deferred[list[dict[str, Any]]]:
        return self._db.run(i.channel_summaries, "%s", agent_id, since)

    def prune(self, before: float, max_rows: int | None = None,
              limit: int = i.PRUNE_BATCH) -> Deferred[int]:
        return self._db.run(i.prune, "%s", before, max_rows, limit)
