"""
The push journal in PostgreSQL (L{medagent.storage.interfaces.PushJournal}); the record and
its states are L{medagent.storage.journal}.  Writes are group committed in the database's
ordered lane (L{PgDatabase.run_batched}); C{seq} is an identity column, read back with
C{RETURNING}.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, Iterable, Mapping

from twisted.internet.defer import Deferred

from medagent.fhir import not_found
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
    push_from_row,
    search_where,
    timeline_text,
    trends_from_rows,
    write_scopes,
)
from medagent.storage.postgres.database import PgDatabase


class _WallClock:
    def seconds(self) -> float:
        return time.time()


def _where(params: Mapping[str, str]) -> tuple[str, list[Any]]:
    return search_where(params, "%s")


def _get(conn: Any, push_id: str) -> Push:
    row = conn.execute("SELECT * FROM pushes WHERE id=%s", (push_id,)).fetchone()
    if row is None:
        raise not_found(f"No push {push_id}")
    return push_from_row(row)


class PgJournal:
    """L{PushJournal} on a L{PgDatabase}; see the interface for what each call guarantees."""

    def __init__(self, db: PgDatabase, *, clock: Any = None) -> None:
        self._db = db
        self._clock = clock if clock is not None else _WallClock()

    @property
    def database(self) -> PgDatabase:
        """The database this journal writes to (the relay's C{/readyz} pings it)."""
        return self._db

    def new_id(self) -> str:
        return uuid.uuid4().hex

    def create(self, push: Push) -> Deferred[Push]:
        now = self._clock.seconds()
        push.created = push.updated = now
        values = (push.id, push.agent_id, push.destination, push.remote, push.content_type,
                  push.body, json.dumps(push.options), push.idempotency_key, push.state,
                  push.created, push.updated, push.expires_at, push.requester,
                  push.control_id, push.body_hash, timeline_text(push), push.accession,
                  push.resent_from, push.patient_id, push.study_uid, push.sop_uid)
        since = now - IDEMPOTENCY_WINDOW

        def txn(conn: Any) -> Push:
            check_not_repeated(conn, "%s", push, since)  # (under the locks below)
            row = conn.execute(
                "INSERT INTO pushes (id, agent_id, destination, remote, content_type, body,"
                " options, idempotency_key, state, created, updated, expires_at, requester,"
                " control_id, body_hash, timeline, accession, resent_from, patient_id,"
                " study_uid, sop_uid)"
                " VALUES (%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s)"
                " RETURNING seq", values).fetchone()
            push.seq = row["seq"]
            return push

        return self._db.run_batched(txn, locks=write_scopes(push))

    def find_by_key(self, requester: str, key: str) -> Deferred[Push | None]:
        since = self._clock.seconds() - IDEMPOTENCY_WINDOW
        return self._db.run(earlier_by_key, "%s", requester, key, since)

    def remember_key(self, requester: str, key: str, push_id: str) -> Deferred[None]:
        now = self._clock.seconds()

        def txn(conn: Any) -> None:
            conn.execute(
                "INSERT INTO push_keys (requester, idempotency_key, push_id, created)"
                " VALUES (%s,%s,%s,%s) ON CONFLICT DO NOTHING",
                (requester, key, push_id, now))

        return self._db.run_batched(txn)

    def find_same_message(
        self, agent_id: str, device: str, control_id: str, body_hash: str
    ) -> Deferred[Push | None]:
        since = self._clock.seconds() - IDEMPOTENCY_WINDOW
        return self._db.run(earlier_same_message, "%s", agent_id, device, control_id,
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
        push.state = state
        if in_doubt:
            push.in_doubt = True
        push.updated = self._clock.seconds()
        if count_attempt:
            push.attempts += 1
        if error is not None:
            push.last_error = error
        if reply is not None:
            push.reply_status, push.reply_content_type, push.reply_body = reply
        values = (push.state, push.updated, push.attempts, push.last_error, push.reply_status,
                  push.reply_content_type, push.reply_body, bool(in_doubt),
                  timeline_text(push), push.expires_at, push.id)

        def txn(conn: Any) -> Push:
            # (expires_at too: a retry clears it, or the expiry sweep would expire the
            # retried push again)
            conn.execute(
                "UPDATE pushes SET state=%s, updated=%s, attempts=%s, last_error=%s,"
                " reply_status=%s, reply_content_type=%s, reply_body=%s,"
                " in_doubt=(in_doubt OR %s), timeline=%s, expires_at=%s WHERE id=%s", values)
            return push

        return self._db.run_batched(txn)

    def expire_overdue(self) -> Deferred[int]:
        now = self._clock.seconds()

        def txn(conn: Any) -> int:
            return conn.execute(
                "UPDATE pushes SET state=%s, updated=%s, last_error=%s WHERE state=%s AND"
                " expires_at IS NOT NULL AND expires_at<=%s",
                (EXPIRED, now, "Expired before it could be sent", QUEUED, now)).rowcount

        return self._db.run_ordered(txn)

    def prune(self, older_than: float) -> Deferred[int]:
        now = self._clock.seconds()
        cutoff, key_cutoff = now - older_than, now - IDEMPOTENCY_WINDOW
        finals = sorted(FINAL_STATES)

        def txn(conn: Any) -> int:
            conn.execute("DELETE FROM push_keys WHERE created<%s", (key_cutoff,))
            return conn.execute(
                "DELETE FROM pushes WHERE state = ANY(%s) AND updated<%s",
                (finals, cutoff)).rowcount

        return self._db.run_ordered(txn)

    def flushed(self) -> Deferred[None]:
        return self._db.run_batched(lambda conn: None)

    def get(self, push_id: str) -> Deferred[Push]:
        return self._db.run(_get, push_id)

    def current(self, push_id: str) -> Deferred[Push]:
        return self._db.run_batched(_get, push_id)

    def open_for_agent(
        self, agent_id: str, *, after_seq: int = 0, limit: int = 500,
        states: Iterable[str] = OPEN_STATES,
    ) -> Deferred[list[Push]]:
        return self._db.run(self._open_txn, agent_id, list(states), None, [], after_seq,
                            limit)

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
        return self._db.run_batched(
            self._open_txn, agent_id, list(states),
            None if remotes is None else list(remotes), list(exclude_remotes), after_seq, limit)

    @staticmethod
    def _open_txn(conn: Any, agent_id: str, states: list[str], remotes: list[str] | None,
                  exclude: list[str], after_seq: int, limit: int) -> list[Push]:
        clauses = ["agent_id=%s", "state = ANY(%s)", "seq>%s"]
        args: list[Any] = [agent_id, states, after_seq]
        if remotes is not None:
            clauses.append("remote = ANY(%s)")
            args.append(remotes)
        if exclude:
            clauses.append("NOT (remote = ANY(%s))")
            args.append(exclude)
        rows = conn.execute(
            f"SELECT * FROM pushes WHERE {' AND '.join(clauses)} ORDER BY seq LIMIT %s",
            (*args, limit))
        return [push_from_row(r) for r in rows]

    def agents_with_queued(self, agent_ids: Iterable[str]) -> Deferred[set[str]]:
        ids = sorted(set(agent_ids))

        def txn(conn: Any) -> set[str]:
            if not ids:
                return set()
            rows = conn.execute(
                "SELECT a.id FROM unnest(%s::text[]) AS a(id) WHERE EXISTS (SELECT 1 FROM"
                " pushes WHERE agent_id = a.id AND state = %s)", (ids, QUEUED)).fetchall()
            return {r["id"] for r in rows}

        return self._db.run(txn)

    def search(self, params: Mapping[str, str], limit: int = 100) -> Deferred[list[Push]]:
        where, args = _where(params)

        def txn(conn: Any) -> list[Push]:
            rows = conn.execute(
                f"SELECT * FROM pushes WHERE {where} ORDER BY seq DESC LIMIT %s",
                (*args, limit))
            return [push_from_row(r) for r in rows]

        return self._db.run(txn)

    def search_page(
        self, params: Mapping[str, str], *, count: int, before_seq: int | None = None
    ) -> Deferred[tuple[list[Push], int, int | None]]:
        where, args = _where(params)

        def txn(conn: Any) -> tuple[list[Push], int, int | None]:
            total = conn.execute(f"SELECT count(*) AS n FROM pushes WHERE {where}",
                                 args).fetchone()["n"]
            if count <= 0:
                return [], total, None
            page_where, page_args = where, list(args)
            if before_seq is not None:
                page_where, page_args = f"({where}) AND seq<%s", [*args, before_seq]
            rows = conn.execute(
                f"SELECT * FROM pushes WHERE {page_where} ORDER BY seq DESC LIMIT %s",
                (*page_args, count + 1)).fetchall()
            pushes = [push_from_row(r) for r in rows[:count]]
            more = len(rows) > count
            return pushes, total, (pushes[-1].seq if more and pushes else None)

        return self._db.run(txn)

    def counts(self, agent_id: str) -> Deferred[dict[str, Any]]:
        now = self._clock.seconds()

        def txn(conn: Any) -> dict[str, Any]:
            out: dict[str, Any] = {s: 0 for s in STATES}
            for row in conn.execute(
                    "SELECT state, count(*) AS n FROM pushes WHERE agent_id=%s GROUP BY state",
                    (agent_id,)):
                out[row["state"]] = row["n"]
            oldest = conn.execute(
                "SELECT min(created) AS t FROM pushes WHERE agent_id=%s AND state = ANY(%s)",
                (agent_id, list(OPEN_STATES))).fetchone()
            out["oldestOpenAgeSeconds"] = (
                round(now - oldest["t"], 3) if oldest["t"] is not None else None)
            return out

        return self._db.run(txn)

    def agent_summaries(self, since: float) -> Deferred[dict[str, dict[str, Any]]]:
        """Per agent: open pushes, the oldest one's creation time, failures since C{since}
        (L{medagent.storage.journal.agent_summary_rows})."""
        return self._db.run(agent_summary_rows, "%s", since)

    def outcome_counts(self, since: float, limit: int = 1000
                       ) -> Deferred[dict[str, dict[str, int]]]:
        """Per agent: pushes delivered or failed since C{since}, and the failed ones
        (L{medagent.storage.journal.outcome_count_rows})."""
        return self._db.run(outcome_count_rows, "%s", since, limit)

    def lane_summaries(self, agent_id: str) -> Deferred[list[dict[str, Any]]]:
        """One entry per device URL of the agent's pushes (L{lane_summary})."""
        now = self._clock.seconds()

        def txn(conn: Any) -> list[dict[str, Any]]:
            rows = conn.execute(
                "SELECT r.remote AS remote, r.open_count, r.oldest_open,"
                " l.state AS last_state, l.updated AS last_updated, l.last_error AS last_error"
                " FROM (SELECT remote,"
                "   count(*) FILTER (WHERE state = ANY(%s)) AS open_count,"
                "   min(created) FILTER (WHERE state = ANY(%s)) AS oldest_open,"
                "   max(seq) FILTER (WHERE state = ANY(%s)) AS last_seq"
                "   FROM pushes WHERE agent_id=%s GROUP BY remote) r"
                " LEFT JOIN pushes l ON l.seq=r.last_seq ORDER BY r.remote COLLATE \"C\""
                " LIMIT 500",
                (list(OPEN_STATES), list(OPEN_STATES), list(FINAL_STATES), agent_id),
            ).fetchall()
            return lane_summary(rows, now)

        return self._db.run(txn)

    def trends(self, start: float, width: float, count: int, agent_id: str | None = None
               ) -> Deferred[dict[str, Trend]]:
        """
        Pushes created, failed and open per bucket (L{trends_from_rows}), in one query over
        the rows open now or updated since C{start} (index C{(state, updated)}, or for one
        agent C{(agent_id, state, seq)}).
        """
        check_trend_buckets(width, count)
        sql, args = trend_query(start, float(width), count, agent_id)

        def txn(conn: Any) -> dict[str, Trend]:
            return trends_from_rows(conn.execute(sql, args).fetchall(), start, width, count)

        return self._db.run(txn)


def trend_query(start: float, width: float, count: int, agent_id: str | None
                ) -> tuple[str, tuple[Any, ...]]:
    """The PostgreSQL trends query and its arguments (L{PgJournal.trends})."""
    agent = " AND agent_id=%s" if agent_id is not None else ""
    aargs: tuple[Any, ...] = (agent_id,) if agent_id is not None else ()
    last = count - 1
    by_created = ("CASE WHEN created<%s THEN -1"
                  " ELSE LEAST(%s, floor((created-%s)/%s)::int) END")
    cargs = (start, last, start, width)
    opens, finals = list(OPEN_STATES), list(FINAL_STATES)
    sql = (
        "SELECT agent_id, kind, bucket, count(*) AS n FROM ("
        f" SELECT agent_id, '{TREND_CREATED}'::text AS kind, {by_created} AS bucket"
        f"  FROM pushes WHERE state = ANY(%s){agent}"
        f" UNION ALL SELECT agent_id, '{TREND_CREATED}'::text, {by_created} FROM pushes"
        f"  WHERE state = ANY(%s) AND updated>=%s{agent}"
        f" UNION ALL SELECT agent_id, CASE WHEN state = ANY(%s) THEN '{TREND_FAILED}'"
        f"  ELSE '{TREND_DONE}' END, LEAST(%s, floor((updated-%s)/%s)::int) FROM pushes"
        f"  WHERE state = ANY(%s) AND updated>=%s{agent}"
        ") t GROUP BY agent_id, kind, bucket")
    args = (*cargs, opens, *aargs,
            *cargs, finals, start, *aargs,
            list(FAILURE_STATES), last, start, width, finals, start, *aargs)
    return sql, args
