"""
The inbound log's record, whatever database keeps it: one row per message a device sent
through an agent's channel (device → agent → relay → Bot → answer), with what the console
and the CLI search it by and how it ended.  The contract of a log is
L{medagent.storage.interfaces.InboundLog}; the SQLite one is
L{medagent.storage.sqlite.inbound.SQLiteInboundLog}, the PostgreSQL one
L{medagent.storage.postgres.inbound.PgInboundLog}.

The payload (C{body}) is patient data: kept only when the relay keeps payloads
(``--inbound-log on``), shown only to roles that may see payloads, never in a log line.
"""

from __future__ import annotations

import math
from typing import Any

import attr

from medagent.storage import journal
from medagent.storage.journal import _iso

#: What a message's C{outcome} is: answered (status < 400, no negative ACK); the Bot answered
#: an HL7 negative acknowledgement (AE / AR); or failed (no channel, no Bot, the Bot failed:
#: the device got the relay's AE or an error status).
OUTCOMES = ("ok", "rejected", "error")

#: The columns of an inbound row, as L{InboundMessage} fields.
COLUMNS = ("seq id agent_id channel remote received content_type size message_type control_id "
           "patient_id accession study_uid sop_uid status ack_code outcome bot duration_ms "
           "error_kind body").split()

#: Filters of the inbound list that are equality on one column: query parameter → column.
FILTERS = (("agent", "agent_id"), ("channel", "channel"), ("control_id", "control_id"),
           ("patient_id", "patient_id"), ("accession", "accession"),
           ("study_uid", "study_uid"), ("sop_uid", "sop_uid"), ("outcome", "outcome"),
           ("ack", "ack_code"), ("message_type", "message_type"), ("remote", "remote"))


@attr.s(auto_attribs=True)
class InboundMessage:
    """One inbound message and its outcome (times: seconds on the relay's clock)."""

    id: str
    agent_id: str
    channel: str
    received: float
    content_type: str
    size: int
    remote: str | None = None
    message_type: str | None = None
    control_id: str | None = None
    patient_id: str | None = None
    accession: str | None = None
    study_uid: str | None = None
    sop_uid: str | None = None
    #: the status code of the answer the agent got
    status: int | None = None
    #: MSA-1 of an HL7 answer (AA, AE, AR, ...), else None
    ack_code: str | None = None
    #: one of L{OUTCOMES}
    outcome: str = "ok"
    #: ``Bot/{id}`` the channel ran, when it got that far
    bot: str | None = None
    duration_ms: float | None = None
    #: a word for what failed (``bot-timeout``, ``no-channel``...), never the Bot's text
    error_kind: str | None = None
    #: the message as the device sent it; None when payloads are not kept
    body: str | None = None
    seq: int | None = None

    def to_json(self, *, include_body: bool = False) -> dict[str, Any]:
        """The C{AgentInbound} document (the payload only when asked and kept)."""
        doc: dict[str, Any] = {
            "resourceType": "AgentInbound",
            "id": self.id,
            "agent": {"reference": f"Agent/{self.agent_id}"},
            "channel": self.channel,
            "received": _iso(self.received),
            "contentType": self.content_type,
            "size": self.size,
            "outcome": self.outcome,
            "payloadKept": self.body is not None,
        }
        for key, value in (("remote", self.remote), ("messageType", self.message_type),
                           ("controlId", self.control_id), ("patientId", self.patient_id),
                           ("accession", self.accession), ("studyInstanceUid", self.study_uid),
                           ("sopInstanceUid", self.sop_uid), ("statusCode", self.status),
                           ("ackCode", self.ack_code), ("errorKind", self.error_kind),
                           ("durationMs", self.duration_ms)):
            if value is not None:
                doc[key] = value
        if self.bot:
            doc["bot"] = {"reference": self.bot}
        if include_body and self.body is not None:
            doc["body"] = self.body
        return doc


def inbound_from_row(row: Any) -> InboundMessage:
    """A stored row (a mapping by column) as an L{InboundMessage}."""
    values = {c: row[c] for c in COLUMNS}
    values["size"] = int(values["size"] or 0)
    duration = values["duration_ms"]
    values["duration_ms"] = float(duration) if duration is not None and \
        math.isfinite(float(duration)) else None
    return InboundMessage(**values)


def insert_values(m: InboundMessage) -> tuple[Any, ...]:
    """The values of an insert, in L{COLUMNS} order without C{seq}."""
    return tuple(getattr(m, c) for c in COLUMNS[1:])


def search_where(params: Any, mark: str) -> tuple[str, list[Any]]:
    """The WHERE clause and arguments of an inbound search (L{FILTERS}, C{since}/C{until} on
    C{received}) in a backend's placeholder C{mark}."""
    return journal.search_where(params, mark, FILTERS, "received")


def search_page(conn: Any, mark: str, params: Any, count: int, before_seq: int | None
                ) -> tuple[list[InboundMessage], int, int | None]:
    """In a transaction (either backend): one page, newest first, its total and the next
    cursor (L{medagent.storage.interfaces.InboundLog.search_page})."""
    where, args = search_where(params, mark)
    return journal.search_page_rows(conn, mark, "inbound", where, args, count, before_seq,
                                    inbound_from_row)


def channel_summaries(conn: Any, mark: str, agent_id: str, since: float
                      ) -> list[dict[str, Any]]:
    """
    In a transaction (either backend): per channel of C{agent_id} with a message in the log,
    by name (at most 200): C{channel}, C{count} (messages received at or after C{since}),
    C{lastReceived}, and the newest message's C{lastOutcome}, C{lastStatus}, C{lastAck},
    C{lastBot}, C{lastErrorKind} and C{lastId}.
    """
    rows = conn.execute(
        "SELECT s.channel AS channel, s.n AS n, l.received AS received, l.outcome AS outcome,"
        " l.status AS status, l.ack_code AS ack_code, l.bot AS bot, l.error_kind AS error_kind,"
        " l.id AS id FROM (SELECT channel, max(seq) AS last_seq,"
        f"   sum(CASE WHEN received>={mark} THEN 1 ELSE 0 END) AS n"
        f"   FROM inbound WHERE agent_id={mark} GROUP BY channel) s"
        " JOIN inbound l ON l.seq=s.last_seq ORDER BY s.channel LIMIT 200",
        (since, agent_id)).fetchall()
    return [{"channel": r["channel"], "count": int(r["n"] or 0), "lastReceived": r["received"],
             "lastOutcome": r["outcome"], "lastStatus": r["status"], "lastAck": r["ack_code"],
             "lastBot": r["bot"], "lastErrorKind": r["error_kind"], "lastId": r["id"]}
            for r in rows]


#: Most messages one L{prune} call deletes (one short transaction: the relay's other writes
#: wait for it); the housekeeping calls again while a call deletes this many.
PRUNE_BATCH = 5000


def prune(conn: Any, mark: str, before: float, max_rows: int | None,
          limit: int = PRUNE_BATCH) -> int:
    """
    In a transaction (either backend): delete messages received before C{before}, then the
    oldest beyond C{max_rows} (None: no count bound), at most C{limit} in all; how many.
    """
    n = conn.execute(
        f"DELETE FROM inbound WHERE seq IN (SELECT seq FROM inbound WHERE received<{mark}"
        f" ORDER BY received LIMIT {mark})", (before, limit)).rowcount or 0
    if max_rows is not None and n < limit:
        row = conn.execute(
            f"SELECT seq FROM inbound ORDER BY seq DESC LIMIT 1 OFFSET {mark}",
            (max_rows,)).fetchone()
        if row is not None:
            n += conn.execute(
                f"DELETE FROM inbound WHERE seq IN (SELECT seq FROM inbound WHERE seq<={mark}"
                f" ORDER BY seq LIMIT {mark})", (row["seq"], limit - n)).rowcount or 0
    return int(n)
