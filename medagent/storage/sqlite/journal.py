"""
The push journal in SQLite: every push is an entry before it is anything else.

The record and its states are L{medagent.storage.journal}; the contract (what any journal
guarantees) is L{medagent.storage.interfaces.PushJournal}.  Writes are group committed
(L{Database.run_batched}): many concurrent pushes share one SQLite commit.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, Iterable, Mapping

from twisted.internet.defer import Deferred
from twisted.logger import Logger

from medagent.contenttypes import HL7_V2
from medagent.fhir import not_found
from medagent.hl7.message import HL7Error, normalise
from medagent.hl7.message import control_id as hl7_control_id
from medagent.storage.journal import (
    EXPIRED,
    FAILURE_STATES,
    FINAL_STATES,
    IDEMPOTENCY_WINDOW,
    OPEN_STATES,
    QUEUED,
    STATES,
    TREND_CREATED,
    TREND_DONE,
    TREND_FAILED,
    Push,
    Trend,
    agent_summary_rows,
    outcome_count_rows,
    check_not_repeated,
    check_trend_buckets,
    earlier_by_key,
    earlier_same_message,
    lane_summary,
    message_hash,
    push_from_row,
    search_where,
    timeline_text,
    trends_from_rows,
)
from medagent.storage.sqlite.database import Database

log = Logger()

SCHEMA = """
CREATE TABLE IF NOT EXISTS pushes (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    agent_id TEXT NOT NULL,
    destination TEXT NOT NULL,
    remote TEXT NOT NULL,
    content_type TEXT NOT NULL,
    body TEXT NOT NULL,
    options TEXT NOT NULL DEFAULT '{}',
    idempotency_key TEXT,
    state TEXT NOT NULL,
    created REAL NOT NULL,
    updated REAL NOT NULL,
    expires_at REAL,
    attempts INTEGER NOT NULL DEFAULT 0,
    last_error TEXT,
    reply_status INTEGER,
    reply_content_type TEXT,
    reply_body TEXT,
    requester TEXT,
    control_id TEXT,
    body_hash TEXT,
    in_doubt INTEGER NOT NULL DEFAULT 0,
    timeline TEXT NOT NULL DEFAULT '{}',
    accession TEXT,
    resent_from TEXT,
    patient_id TEXT,
    study_uid TEXT,
    sop_uid TEXT
);
CREATE INDEX IF NOT EXISTS pushes_open ON pushes (agent_id, state, seq);
CREATE INDEX IF NOT EXISTS pushes_agent_seq ON pushes (agent_id, seq);
DROP INDEX IF EXISTS pushes_idem;
CREATE INDEX IF NOT EXISTS pushes_key ON pushes (requester, idempotency_key);
CREATE INDEX IF NOT EXISTS pushes_message ON pushes (agent_id, control_id, body_hash);
CREATE INDEX IF NOT EXISTS pushes_control ON pushes (control_id, seq);
CREATE INDEX IF NOT EXISTS pushes_accession ON pushes (accession, seq);
CREATE INDEX IF NOT EXISTS pushes_state_updated ON pushes (state, updated);
CREATE INDEX IF NOT EXISTS pushes_patient ON pushes (patient_id, seq);
CREATE INDEX IF NOT EXISTS pushes_study ON pushes (study_uid, seq);
CREATE INDEX IF NOT EXISTS pushes_sop ON pushes (sop_uid, seq);
CREATE TABLE IF NOT EXISTS push_keys (
    requester TEXT NOT NULL,
    idempotency_key TEXT NOT NULL,
    push_id TEXT NOT NULL REFERENCES pushes (id) ON DELETE CASCADE,
    created REAL NOT NULL,
    PRIMARY KEY (requester, idempotency_key)
);
CREATE INDEX IF NOT EXISTS push_keys_push ON push_keys (push_id);
"""

#: Columns added after the first release, with their SQL types (see L{SQLiteJournal.migrate}).
_ADDED_COLUMNS = (("requester", "TEXT"), ("control_id", "TEXT"), ("body_hash", "TEXT"),
                  ("in_doubt", "INTEGER NOT NULL DEFAULT 0"),
                  ("timeline", "TEXT NOT NULL DEFAULT '{}'"),
                  # the console (issue 12): order number search, resend links
                  ("accession", "TEXT"), ("resent_from", "TEXT"),
                  # inbound & search (issue 12): patient id, DICOM Study / SOP Instance UID
                  ("patient_id", "TEXT"), ("study_uid", "TEXT"), ("sop_uid", "TEXT"))


class _WallClock:
    def seconds(self) -> float:
        return time.time()


#: shared with the other backends (L{medagent.storage.journal.push_from_row})
_row_to_push = push_from_row


def _where(params: Mapping[str, str]) -> tuple[str, list[Any]]:
    return search_where(params, "?")


class SQLiteJournal:
    """L{PushJournal} on a L{Database}; see the interface for what each call guarantees."""

    def __init__(self, db: Database, *, clock: Any = None) -> None:
        self._db = db
        self._clock = clock if clock is not None else _WallClock()

    @property
    def database(self) -> Database:
        """The database this journal writes to (the relay's C{/readyz} pings it)."""
        return self._db

    @staticmethod
    def schema() -> str:
        return SCHEMA

    @staticmethod
    def migrate(conn: Any) -> None:
        """
        Bring a journal written by an older relay up to L{SCHEMA}, before the schema script runs
        (L{Database} C{migrations}): add the columns it lacks, and fill them for the
        pushes still inside the idempotency window, so a repeat sent across the upgrade is
        still recognised.  Safe to run on every start and from two processes at once.
        """
        conn.execute("BEGIN IMMEDIATE")
        try:
            have = {row[1] for row in conn.execute("PRAGMA table_info(pushes)")}
            if not have:  # a new file: the schema script creates the table as it is now
                conn.execute("COMMIT")
                return
            added = [(name, sql) for name, sql in _ADDED_COLUMNS if name not in have]
            for name, sql in added:
                conn.execute(f"ALTER TABLE pushes ADD COLUMN {name} {sql}")
            if any(name in ("control_id", "body_hash") for name, _ in added):
                SQLiteJournal._backfill(conn, time.time() - IDEMPOTENCY_WINDOW)
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")
        if added:
            log.info("Push journal upgraded: added columns {columns}",
                     columns=",".join(name for name, _ in added))

    @staticmethod
    def _backfill(conn: Any, since: float) -> None:
        """
        Older relays kept the MSH-10 rule's key as C{idempotency_key} ``msh10:...``; move it to
        C{control_id} and hash the body of each push that is still young enough to be repeated.
        """
        after = 0
        while True:  # in pages: bodies can be large, and the window can hold many pushes
            rows = conn.execute(
                "SELECT seq, id, content_type, body, idempotency_key FROM pushes"
                " WHERE created>=? AND seq>? ORDER BY seq LIMIT 200",
                (since, after),
            ).fetchall()
            if not rows:
                return
            after = rows[-1][0]
            for _, push_id, content_type, body, key in rows:
                SQLiteJournal._backfill_one(conn, push_id, content_type, body, key)

    @staticmethod
    def _backfill_one(conn: Any, push_id: str, content_type: Any, body: Any, key: Any) -> None:
        control_id = None
        if isinstance(key, str) and key.startswith("msh10:"):
            control_id, key = key[len("msh10:"):], None
        elif content_type == HL7_V2 and isinstance(body, str):
            try:
                control_id = hl7_control_id(normalise(body))
            except HL7Error:
                control_id = None
        body_hash = (message_hash(content_type, body)
                     if isinstance(content_type, str) and isinstance(body, str) else None)
        conn.execute(
            "UPDATE pushes SET control_id=?, body_hash=?, idempotency_key=? WHERE id=?",
            (control_id, body_hash, key, push_id),
        )

    def new_id(self) -> str:
        return uuid.uuid4().hex

    def create(self, push: Push) -> Deferred[Push]:
        """Store a new push (group committed); fires once it is on disk."""
        now = self._clock.seconds()
        push.created = push.updated = now
        since = now - IDEMPOTENCY_WINDOW

        def txn(conn: Any) -> Push:
            check_not_repeated(conn, "?", push, since)  # (one writer: no lock needed)
            cur = conn.execute(
                "INSERT INTO pushes (id, agent_id, destination, remote, content_type, body,"
                " options, idempotency_key, state, created, updated, expires_at, requester,"
                " control_id, body_hash, timeline, accession, resent_from, patient_id,"
                " study_uid, sop_uid)"
                " VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (
                    push.id,
                    push.agent_id,
                    push.destination,
                    push.remote,
                    push.content_type,
                    push.body,
                    json.dumps(push.options),
                    push.idempotency_key,
                    push.state,
                    push.created,
                    push.updated,
                    push.expires_at,
                    push.requester,
                    push.control_id,
                    push.body_hash,
                    timeline_text(push),
                    push.accession,
                    push.resent_from,
                    push.patient_id,
                    push.study_uid,
                    push.sop_uid,
                ),
            )
            push.seq = cur.lastrowid
            return push

        return self._db.run_batched(txn)

    def find_by_key(self, requester: str, key: str) -> Deferred[Push | None]:
        """
        The first push C{requester} sent with Idempotency-Key C{key} inside the window (not
        cancelled).  Keys are scoped to the caller: another client's key is another key.
        """
        since = self._clock.seconds() - IDEMPOTENCY_WINDOW

        return self._db.run(earlier_by_key, "?", requester, key, since)

    def remember_key(self, requester: str, key: str, push_id: str) -> Deferred[None]:
        """
        C{requester}'s key C{key} came with a repeat of push C{push_id} (recognised as the
        same message): bind the key to that push, so the key reused later for another message
        is a conflict, as for a key that created its push.
        """
        now = self._clock.seconds()

        def txn(conn: Any) -> None:
            conn.execute(
                "INSERT OR IGNORE INTO push_keys (requester, idempotency_key, push_id, created)"
                " VALUES (?,?,?,?)",
                (requester, key, push_id, now),
            )

        return self._db.run_batched(txn)

    def find_same_message(
        self, agent_id: str, device: str, control_id: str, body_hash: str
    ) -> Deferred[Push | None]:
        """
        The first push through C{agent_id} to C{device} (a L{lane_key}) with this MSH-10 and
        this body inside the window (not cancelled), whoever sent it.
        """
        since = self._clock.seconds() - IDEMPOTENCY_WINDOW

        return self._db.run(earlier_same_message, "?", agent_id, device, control_id,
                            body_hash, since)

    def transition(
        self,
        push: Push,
        state: str,
        *,
        error: str | None = None,
        reply: tuple[int, str, str] | None = None,
        count_attempt: bool = False,
        in_doubt: bool = False,
    ) -> Deferred[Push]:
        """
        Move C{push} to C{state} (in memory now, on disk with the next batch); C{in_doubt}
        marks it as possibly received by the device (kept once set).
        """
        push.state = state
        if in_doubt:
            push.in_doubt = True
        mark_in_doubt = in_doubt
        push.updated = self._clock.seconds()
        if count_attempt:
            push.attempts += 1
        if error is not None:
            push.last_error = error
        if reply is not None:
            push.reply_status, push.reply_content_type, push.reply_body = reply
        values = (
            push.state,
            push.updated,
            push.attempts,
            push.last_error,
            push.reply_status,
            push.reply_content_type,
            push.reply_body,
            timeline_text(push),
            push.expires_at,
            push.id,
        )

        def txn(conn: Any) -> Push:
            # (expires_at too: a retry clears it, or the expiry sweep would expire the
            # retried push again)
            conn.execute(
                "UPDATE pushes SET state=?, updated=?, attempts=?, last_error=?, reply_status=?,"
                " reply_content_type=?, reply_body=?, timeline=?, expires_at=? WHERE id=?",
                values,
            )
            if mark_in_doubt:
                conn.execute("UPDATE pushes SET in_doubt=1 WHERE id=?", (push.id,))
            return push

        return self._db.run_batched(txn)

    def expire_overdue(self) -> Deferred[int]:
        """Queued pushes past their ``expiresAt`` become ``expired`` (never sent)."""
        now = self._clock.seconds()

        def txn(conn: Any) -> int:
            return conn.execute(
                "UPDATE pushes SET state=?, updated=?, last_error=? WHERE state=? AND"
                " expires_at IS NOT NULL AND expires_at<=?",
                (EXPIRED, now, "Expired before it could be sent", QUEUED, now),
            ).rowcount

        return self._db.run(txn)

    def prune(self, older_than: float) -> Deferred[int]:
        """Delete final pushes (and their payloads) last updated more than C{older_than} s ago."""
        cutoff = self._clock.seconds() - older_than
        finals = tuple(FINAL_STATES)

        key_cutoff = self._clock.seconds() - IDEMPOTENCY_WINDOW

        def txn(conn: Any) -> int:
            conn.execute("DELETE FROM push_keys WHERE created<?", (key_cutoff,))
            return conn.execute(
                f"DELETE FROM pushes WHERE state IN ({','.join('?' * len(finals))})"
                " AND updated<?",
                (*finals, cutoff),
            ).rowcount

        return self._db.run(txn)

    def flushed(self) -> Deferred[None]:
        """Fires once every write queued before this call is committed."""
        return self._db.run_batched(lambda conn: None)

    def get(self, push_id: str) -> Deferred[Push]:
        def txn(conn: Any) -> Push:
            row = conn.execute("SELECT * FROM pushes WHERE id=?", (push_id,)).fetchone()
            if row is None:
                raise not_found(f"No push {push_id}")
            return _row_to_push(row)

        return self._db.run(txn)

    def open_for_agent(
        self, agent_id: str, *, after_seq: int = 0, limit: int = 500,
        states: Iterable[str] = OPEN_STATES,
    ) -> Deferred[list[Push]]:
        """
        The next page of pushes the agent still owes an answer for, oldest first.  Paged so a
        million queued pushes are streamed from disk, never held in memory.
        """
        states = tuple(states)
        marks = ",".join("?" * len(states))

        def txn(conn: Any) -> list[Push]:
            rows = conn.execute(
                f"SELECT * FROM pushes WHERE agent_id=? AND state IN ({marks}) AND seq>?"
                " ORDER BY seq LIMIT ?",
                (agent_id, *states, after_seq, limit),
            )
            return [_row_to_push(r) for r in rows]

        return self._db.run(txn)

    def open_pushes(
        self,
        agent_id: str,
        *,
        after_seq: int = 0,
        remotes: Iterable[str] | None = None,
        exclude_remotes: Iterable[str] = (),
        limit: int = 500,
        states: Iterable[str] = OPEN_STATES,
    ) -> Deferred[list[Push]]:
        """
        Like L{open_for_agent}, restricted to (or excluding) some device URLs, and ordered
        after every write queued before it (it runs in the write batch): a push the hub has
        just sent or answered is never read back in its old state, so never sent twice.
        """
        states = tuple(states)
        clauses = [f"state IN ({','.join('?' * len(states))})"]
        args: list[Any] = [agent_id, *states]
        if remotes is not None:
            remotes = tuple(remotes)
            clauses.append(f"remote IN ({','.join('?' * len(remotes))})")
            args.extend(remotes)
        exclude = tuple(exclude_remotes)
        if exclude:
            clauses.append(f"remote NOT IN ({','.join('?' * len(exclude))})")
            args.extend(exclude)
        where = " AND ".join(clauses)

        def txn(conn: Any) -> list[Push]:
            rows = conn.execute(
                f"SELECT * FROM pushes WHERE agent_id=? AND {where} AND seq>? ORDER BY seq"
                " LIMIT ?",
                (*args, after_seq, limit),
            )
            return [_row_to_push(r) for r in rows]

        return self._db.run_batched(txn)

    def current(self, push_id: str) -> Deferred[Push]:
        """L{get}, ordered after every write queued before it."""

        def txn(conn: Any) -> Push:
            row = conn.execute("SELECT * FROM pushes WHERE id=?", (push_id,)).fetchone()
            if row is None:
                raise not_found(f"No push {push_id}")
            return _row_to_push(row)

        return self._db.run_batched(txn)

    def search(self, params: Mapping[str, str], limit: int = 100) -> Deferred[list[Push]]:
        where, args = _where(params)

        def txn(conn: Any) -> list[Push]:
            rows = conn.execute(
                f"SELECT * FROM pushes WHERE {where} ORDER BY seq DESC LIMIT ?", (*args, limit)
            )
            return [_row_to_push(r) for r in rows]

        return self._db.run(txn)

    def search_page(
        self, params: Mapping[str, str], *, count: int, before_seq: int | None = None
    ) -> Deferred[tuple[list[Push], int, int | None]]:
        """
        One page of the push list, newest first: C{(pushes, total, next_before)}.  C{total}
        counts every match; C{next_before} is the cursor of the next page (C{None} on the last).
        The cursor is a position in C{seq} order, so pushes written meanwhile (higher C{seq})
        never shift a page or appear twice while a list is walked.
        """
        where, args = _where(params)

        def txn(conn: Any) -> tuple[list[Push], int, int | None]:
            total = conn.execute(f"SELECT count(*) FROM pushes WHERE {where}", args).fetchone()[0]
            if count <= 0:
                return [], total, None
            page_where, page_args = where, list(args)
            if before_seq is not None:
                page_where, page_args = f"({where}) AND seq<?", [*args, before_seq]
            rows = conn.execute(
                f"SELECT * FROM pushes WHERE {page_where} ORDER BY seq DESC LIMIT ?",
                (*page_args, count + 1),
            ).fetchall()
            pushes = [_row_to_push(r) for r in rows[:count]]
            more = len(rows) > count
            return pushes, total, (pushes[-1].seq if more and pushes else None)

        return self._db.run(txn)

    def agents_with_queued(self, agent_ids: Iterable[str]) -> Deferred[set[str]]:
        ids = sorted(set(agent_ids))

        def txn(conn: Any) -> set[str]:
            found: set[str] = set()
            for i in range(0, len(ids), 500):  # (SQLite's limit on parameters)
                chunk = ids[i:i + 500]
                marks = ",".join("?" * len(chunk))
                found.update(r[0] for r in conn.execute(
                    f"SELECT DISTINCT agent_id FROM pushes WHERE state = ? AND agent_id IN"
                    f" ({marks})", (QUEUED, *chunk)))
            return found

        return self._db.run(txn)

    def counts(self, agent_id: str) -> Deferred[dict[str, Any]]:
        def txn(conn: Any) -> dict[str, Any]:
            out: dict[str, Any] = {s: 0 for s in STATES}
            for row in conn.execute(
                "SELECT state, count(*) AS n FROM pushes WHERE agent_id=? GROUP BY state",
                (agent_id,),
            ):
                out[row["state"]] = row["n"]
            oldest = conn.execute(
                "SELECT min(created) AS t FROM pushes WHERE agent_id=? AND state IN"
                " ('queued','sent','accepted')",
                (agent_id,),
            ).fetchone()
            out["oldestOpenAgeSeconds"] = (
                round(self._clock.seconds() - oldest["t"], 3) if oldest["t"] is not None else None
            )
            return out

        return self._db.run(txn)

    def agent_summaries(self, since: float) -> Deferred[dict[str, dict[str, Any]]]:
        """Per agent: open pushes, the oldest one's creation time, failures since C{since}
        (L{medagent.storage.journal.agent_summary_rows})."""
        return self._db.run(agent_summary_rows, "?", since)

    def outcome_counts(self, since: float, limit: int = 1000
                       ) -> Deferred[dict[str, dict[str, int]]]:
        """Per agent: pushes delivered or failed since C{since}, and the failed ones
        (L{medagent.storage.journal.outcome_count_rows})."""
        return self._db.run(outcome_count_rows, "?", since, limit)

    def lane_summaries(self, agent_id: str) -> Deferred[list[dict[str, Any]]]:
        """
        One entry per device URL the agent's pushes went to (L{lane_summary}): open pushes,
        the oldest one's age, and the last final outcome; by URL.
        """
        now = self._clock.seconds()
        finals = tuple(FINAL_STATES)
        fmarks = ",".join("?" * len(finals))

        opens = tuple(OPEN_STATES)
        omarks = ",".join("?" * len(opens))

        def txn(conn: Any) -> list[dict[str, Any]]:
            rows = conn.execute(
                "SELECT r.remote AS remote, r.open_count, r.oldest_open,"
                " l.state AS last_state, l.updated AS last_updated, l.last_error AS last_error"
                " FROM (SELECT remote,"
                f"   sum(CASE WHEN state IN ({omarks}) THEN 1 ELSE 0 END) AS open_count,"
                f"   min(CASE WHEN state IN ({omarks}) THEN created END) AS oldest_open,"
                f"   max(CASE WHEN state IN ({fmarks}) THEN seq END) AS last_seq"
                "   FROM pushes WHERE agent_id=? GROUP BY remote) r"
                " LEFT JOIN pushes l ON l.seq=r.last_seq ORDER BY r.remote LIMIT 500",
                (*opens, *opens, *finals, agent_id),
            ).fetchall()
            return lane_summary(rows, now)

        return self._db.run(txn)

    def trends(self, start: float, width: float, count: int, agent_id: str | None = None
               ) -> Deferred[dict[str, Trend]]:
        """
        Pushes created, failed and open per bucket (L{trends_from_rows}), in one query over
        the rows open now or updated since C{start}: both halves are searches of the
        C{(state, updated)} index (or, for one agent, of C{(agent_id, state, seq)}).
        """
        check_trend_buckets(width, count)
        return self._db.run(_trend_rows, start, float(width), count, agent_id)


def trend_query(start: float, width: float, count: int, agent_id: str | None
                ) -> tuple[str, tuple[Any, ...]]:
    """The SQLite trends query and its arguments (L{SQLiteJournal.trends})."""
    opens, finals = tuple(OPEN_STATES), tuple(FINAL_STATES)
    om, fm = ",".join("?" * len(opens)), ",".join("?" * len(finals))
    fails = ",".join("?" * len(FAILURE_STATES))
    agent = " AND agent_id=?" if agent_id is not None else ""
    # the finished halves search (state, updated) for one agent too: "+" keeps SQLite from
    # the (agent_id, state) index, which would read every push the agent ever finished
    agent_ended = " AND +agent_id=?" if agent_id is not None else ""
    aargs: tuple[Any, ...] = (agent_id,) if agent_id is not None else ()
    last = count - 1
    # (a bucket is a whole number: CAST truncates, and the value is >= 0 where it is used)
    by_created = "CASE WHEN created<? THEN -1 ELSE min(?, CAST((created-?)/? AS INTEGER)) END"
    cargs = (start, last, start, width)
    sql = (
        "SELECT agent_id, kind, bucket, count(*) AS n FROM ("
        f" SELECT agent_id, '{TREND_CREATED}' AS kind, {by_created} AS bucket FROM pushes"
        f"  WHERE state IN ({om}){agent}"
        f" UNION ALL SELECT agent_id, '{TREND_CREATED}', {by_created} FROM pushes"
        f"  WHERE state IN ({fm}) AND updated>=?{agent_ended}"
        f" UNION ALL SELECT agent_id, CASE WHEN state IN ({fails}) THEN '{TREND_FAILED}'"
        f"  ELSE '{TREND_DONE}' END, min(?, CAST((updated-?)/? AS INTEGER)) FROM pushes"
        f"  WHERE state IN ({fm}) AND updated>=?{agent_ended}"
        ") GROUP BY agent_id, kind, bucket")
    args = (*cargs, *opens, *aargs,
            *cargs, *finals, start, *aargs,
            *FAILURE_STATES, last, start, width, *finals, start, *aargs)
    return sql, args


def _trend_rows(conn: Any, start: float, width: float, count: int,
                agent_id: str | None) -> dict[str, Trend]:
    sql, args = trend_query(start, width, count, agent_id)
    return trends_from_rows(conn.execute(sql, args).fetchall(), start, width, count)
