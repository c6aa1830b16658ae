"""
The inbound log in SQLite (L{medagent.storage.interfaces.InboundLog}); the record is
L{medagent.storage.inbound}.  Writes are group committed with the relay's other writes.
"""

from __future__ import annotations

import uuid
from typing import Any, Mapping

from twisted.internet.defer import Deferred

from medagent.fhir import not_found
from medagent.storage import inbound as i
from medagent.storage.sqlite.database import Database

SCHEMA = """
CREATE TABLE IF NOT EXISTS inbound (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    agent_id TEXT NOT NULL,
    channel TEXT NOT NULL,
    remote TEXT,
    received REAL NOT NULL,
    content_type TEXT NOT NULL,
    size INTEGER NOT NULL,
    message_type TEXT,
    control_id TEXT,
    patient_id TEXT,
    accession TEXT,
    study_uid TEXT,
    sop_uid TEXT,
    status INTEGER,
    ack_code TEXT,
    outcome TEXT NOT NULL,
    bot TEXT,
    duration_ms REAL,
    error_kind TEXT,
    body TEXT
);
CREATE INDEX IF NOT EXISTS inbound_agent ON inbound (agent_id, channel, seq);
CREATE INDEX IF NOT EXISTS inbound_received ON inbound (received);
CREATE INDEX IF NOT EXISTS inbound_control ON inbound (control_id, seq);
CREATE INDEX IF NOT EXISTS inbound_patient ON inbound (patient_id, seq);
CREATE INDEX IF NOT EXISTS inbound_accession ON inbound (accession, seq);
CREATE INDEX IF NOT EXISTS inbound_study ON inbound (study_uid, seq);
CREATE INDEX IF NOT EXISTS inbound_sop ON inbound (sop_uid, seq);
"""

_INSERT = (f"INSERT INTO inbound ({', '.join(i.COLUMNS[1:])})"
           f" VALUES ({','.join('?' * (len(i.COLUMNS) - 1))})")


class SQLiteInboundLog:
    """L{InboundLog} on a L{Database}; see the interface for what each call guarantees."""

    def __init__(self, db: Database) -> None:
        self._db = db

    @staticmethod
    def schema() -> str:
        return SCHEMA

    def new_id(self) -> str:
        return uuid.uuid4().hex

    def add(self, message: i.InboundMessage) -> Deferred[i.InboundMessage]:
        values = i.insert_values(message)

        def txn(conn: Any) -> i.InboundMessage:
            message.seq = conn.execute(_INSERT, values).lastrowid
            return message

        return self._db.run_batched(txn)

    def get(self, message_id: str) -> Deferred[i.InboundMessage]:
        def txn(conn: Any) -> i.InboundMessage:
            row = conn.execute("SELECT * FROM inbound WHERE id=?", (message_id,)).fetchone()
            if row is None:
                raise not_found(f"No inbound message {message_id}")
            return i.inbound_from_row(row)

        return self._db.run(txn)

    def search_page(self, params: Mapping[str, str], *, count: int,
                    before_seq: int | None = None
                    ) -> Deferred[tuple[list[i.InboundMessage], int, int | None]]:
        return self._db.run(i.search_page, "?", params, count, before_seq)

    def channel_summaries(self, agent_id: str, since: float
                          ) -> Deferred[list[dict[str, Any]]]:
        return self._db.run(i.channel_summaries, "?", agent_id, since)

    def prune(self, before: float, max_rows: int | None = None,
              limit: int = i.PRUNE_BATCH) -> Deferred[int]:
        return self._db.run(i.prune, "?", before, max_rows, limit)
