"""
The rows of the agent's durable inbox in SQLite (L{medagent.storage.interfaces.InboxStore});
the queue's behaviour (lanes, retries, the in-doubt rules) is
L{medagent.agent.queue.DurableQueue}.

Calls that the queue orders with each other (store, claim, mark, answer, requeue, cancel,
confirm) go through the group commit (L{Database.run_batched}), so they are applied in the
order they were made; the others are transactions of their own.
"""

from __future__ import annotations

import json
from typing import Any, Callable, Mapping, Sequence

from twisted.internet.defer import Deferred

from medagent.storage.sqlite.database import Database

QUEUED = "queued"
DELIVERING = "delivering"
DONE = "done"

SCHEMA = """
CREATE TABLE IF NOT EXISTS inbox (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    push_id TEXT NOT NULL UNIQUE,
    remote TEXT NOT NULL,
    content_type TEXT NOT NULL,
    body TEXT NOT NULL,
    options TEXT NOT NULL DEFAULT '{}',
    callback TEXT,
    state TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    last_error TEXT,
    answer TEXT,
    confirmed INTEGER NOT NULL DEFAULT 0,
    created REAL NOT NULL,
    updated REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS inbox_open ON inbox (state, seq);
CREATE INDEX IF NOT EXISTS inbox_unconfirmed ON inbox (confirmed, state);
CREATE TABLE IF NOT EXISTS lane_holds (
    lane TEXT PRIMARY KEY
);
"""

#: C{resolve(remote, callback, push_id)} of L{SQLiteInbox.recover}: C{None} to queue the entry
#: again, or C{(reason, answer)} to end it with that answer.
Resolver = Callable[[str, Any, str], "tuple[str, dict[str, Any]] | None"]


class SQLiteInbox:
    """L{InboxStore} on a L{Database}."""

    def __init__(self, db: Database) -> None:
        self._db = db

    @staticmethod
    def schema() -> str:
        return SCHEMA

    def recover(self, now: float, resolve: Resolver
                ) -> Deferred[tuple[list[tuple[int, str, str, str]], int]]:
        """
        End or re-queue the entries left ``delivering`` (C{resolve} decides, a pure function
        run in the transaction), then list the queued ones in order:
        C{([(seq, push_id, remote, content_type)], how many were delivering)}.
        """

        def txn(conn: Any) -> tuple[list[tuple[int, str, str, str]], int]:
            rows = conn.execute(
                "SELECT seq, push_id, remote, callback FROM inbox WHERE state=? ORDER BY seq",
                (DELIVERING,),
            ).fetchall()
            for row in rows:
                ending = resolve(row["remote"], row["callback"], row["push_id"])
                if ending is None:
                    conn.execute("UPDATE inbox SET state=?, updated=? WHERE seq=?",
                                 (QUEUED, now, row["seq"]))
                    continue
                reason, answer = ending
                conn.execute(
                    "UPDATE inbox SET state=?, last_error=?, answer=?, updated=? WHERE seq=?",
                    (DONE, reason, json.dumps(answer), now, row["seq"]),
                )
            return [
                (r["seq"], r["push_id"], r["remote"], r["content_type"])
                for r in conn.execute(
                    "SELECT seq, push_id, remote, content_type FROM inbox WHERE state=?"
                    " ORDER BY seq", (QUEUED,),
                )
            ], len(rows)

        return self._db.run(txn)

    def store(self, values: Sequence[Any]) -> Deferred[tuple[bool, Any]]:
        """
        Insert C{(push_id, remote, content_type, body, options, callback, state, attempts,
        created, updated)} unless the push id is held already: C{(True, seq)} for a new row,
        C{(False, (state, answer))} for one we had.
        """
        push_id = values[0]

        def txn(conn: Any) -> tuple[bool, Any]:
            cur = conn.execute(
                "INSERT OR IGNORE INTO inbox (push_id, remote, content_type, body, options,"
                " callback, state, attempts, created, updated) VALUES (?,?,?,?,?,?,?,?,?,?)",
                tuple(values),
            )
            if cur.rowcount == 1:
                return True, cur.lastrowid
            row = conn.execute("SELECT state, answer FROM inbox WHERE push_id=?",
                               (push_id,)).fetchone()
            return False, (row["state"], row["answer"])

        return self._db.run_batched(txn)

    def claim(self, seq: int, state: str, now: float) -> Deferred[dict[str, Any] | None]:
        """A queued entry counts an attempt and moves to C{state}; fires with the row after."""

        def txn(conn: Any) -> dict[str, Any] | None:
            conn.execute(
                "UPDATE inbox SET state=?, attempts=attempts+1, updated=? WHERE seq=? AND"
                " state=?", (state, now, seq, QUEUED),
            )
            row = conn.execute("SELECT * FROM inbox WHERE seq=?", (seq,)).fetchone()
            return dict(row) if row is not None else None

        return self._db.run_batched(txn)

    def mark_delivering(self, seq: int, now: float,
                        refuse: Callable[[], Exception]) -> Deferred[None]:
        """A queued entry becomes ``delivering``; fails with C{refuse()} if it is not queued."""

        def txn(conn: Any) -> None:
            marked = conn.execute(
                "UPDATE inbox SET state=?, updated=? WHERE seq=? AND state=?",
                (DELIVERING, now, seq, QUEUED)).rowcount
            if marked != 1:
                raise refuse()

        return self._db.run_batched(txn)

    def answer(self, seq: int, answer: Mapping[str, Any], error: str | None,
               now: float) -> Deferred[None]:
        """The entry is done, with its answer."""

        def txn(conn: Any) -> None:
            conn.execute(
                "UPDATE inbox SET state=?, answer=?, last_error=?, updated=? WHERE seq=?",
                (DONE, json.dumps(answer), error, now, seq),
            )

        return self._db.run_batched(txn)

    def requeue(self, seq: int, error: str, now: float) -> Deferred[None]:
        """A queued or delivering entry is queued again (for a retry), with its error."""

        def txn(conn: Any) -> None:
            conn.execute("UPDATE inbox SET state=?, last_error=?, updated=? WHERE seq=? AND"
                         " state IN (?, ?)", (QUEUED, error, now, seq, QUEUED, DELIVERING))

        return self._db.run_batched(txn)

    def cancel(self, push_id: str, now: float, reason: str,
               answer_for: Callable[[str, Any], Mapping[str, Any]]
               ) -> Deferred[tuple[str, tuple[int, str] | None]]:
        """
        End a queued entry with C{answer_for(remote, callback)}: C{("cancelled", (seq,
        remote))}; C{(state, None)} if it is not queued, C{("unknown", None)} if we do not
        hold it.
        """

        def txn(conn: Any) -> tuple[str, tuple[int, str] | None]:
            row = conn.execute("SELECT seq, remote, callback, state FROM inbox WHERE push_id=?",
                               (push_id,)).fetchone()
            if row is None:
                return "unknown", None
            if row["state"] != QUEUED:
                return row["state"], None
            conn.execute("UPDATE inbox SET state=?, answer=?, last_error=?, updated=? "
                         "WHERE seq=? AND state=?",
                         (DONE, json.dumps(dict(answer_for(row["remote"], row["callback"]))),
                          reason, now, row["seq"], QUEUED))
            return "cancelled", (row["seq"], row["remote"])

        return self._db.run_batched(txn)

    def confirm(self, push_id: str) -> Deferred[None]:
        def txn(conn: Any) -> None:
            conn.execute("UPDATE inbox SET confirmed=1 WHERE push_id=? AND state=?",
                         (push_id, DONE))

        return self._db.run_batched(txn)

    def unconfirmed(self, limit: int) -> Deferred[list[dict[str, Any]]]:
        """The answers not confirmed yet, oldest first, each with its C{callback}."""

        def txn(conn: Any) -> list[dict[str, Any]]:
            return [
                dict(json.loads(r["answer"]), callback=r["callback"])
                for r in conn.execute(
                    "SELECT answer, callback FROM inbox WHERE state=? AND confirmed=0 "
                    "ORDER BY seq LIMIT ?", (DONE, limit))
            ]

        return self._db.run(txn)

    def prune(self, before: float) -> Deferred[int]:
        """Delete confirmed answered entries last updated before C{before}."""

        def txn(conn: Any) -> int:
            return conn.execute("DELETE FROM inbox WHERE state=? AND confirmed=1 AND updated<?",
                                (DONE, before)).rowcount

        return self._db.run(txn)

    def holds(self) -> Deferred[list[str]]:
        """The lanes the relay said to hold (its paused lanes), as last recorded."""
        return self._db.run(lambda conn: [r[0] for r in conn.execute(
            "SELECT lane FROM lane_holds ORDER BY lane")])

    def set_holds(self, lanes: Sequence[str]) -> Deferred[None]:
        """Record the lanes to hold: exactly C{lanes} (the relay sends the whole set)."""
        rows = [(lane,) for lane in sorted(set(lanes))]

        def txn(conn: Any) -> None:
            conn.execute("DELETE FROM lane_holds")
            conn.executemany("INSERT INTO lane_holds (lane) VALUES (?)", rows)

        return self._db.run_batched(txn)

    def oldest_open(self) -> Deferred[list[tuple[str, float]]]:
        """C{(remote, oldest created)} of the queued and delivering entries per remote URL."""

        def txn(conn: Any) -> list[tuple[str, float]]:
            return [(r["remote"], r["t"]) for r in conn.execute(
                "SELECT remote, min(created) AS t FROM inbox WHERE state IN (?, ?)"
                " GROUP BY remote", (QUEUED, DELIVERING))]

        return self._db.run(txn)
