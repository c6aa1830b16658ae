"""
Wake-up hints between relay nodes through PostgreSQL's C{LISTEN/NOTIFY}
(L{medagent.storage.interfaces.ClusterNotices}).

Why a thread of its own: a listening connection sits idle waiting for notices, which no
worker of L{PgDatabase}'s pool may do, and psycopg's waiting is blocking.  The thread owns one
autocommit connection, hands each notice to the reactor with C{callFromThread} as it
arrives, and reconnects with a backoff when the connection breaks.  Notices are hints
only: nothing depends on one arriving.
"""

from __future__ import annotations

import json
import threading
from typing import Any, Callable, Mapping

from twisted.internet.defer import Deferred
from twisted.logger import Logger

from medagent.storage.postgres.database import PgDatabase

log = Logger()

#: the one channel every relay node listens on
CHANNEL = "medagent_cluster"
#: PostgreSQL refuses notice payloads of 8000 bytes or more
MAX_PAYLOAD = 7900
#: seconds the thread waits for notices before it checks whether it should stop
WAIT = 0.5
BACKOFF_FIRST, BACKOFF_CAP = 0.5, 10.0


def encode_notice(notice: Mapping[str, Any]) -> str:
    """A notice as its payload: compact JSON of ids only, refused when too long."""
    text = json.dumps(notice, separators=(",", ":"))
    if len(text.encode()) > MAX_PAYLOAD:
        raise ValueError("cluster notice too long")
    return text


def decode_notice(payload: str) -> dict[str, Any] | None:
    """A received payload as a notice; C{None} for anything that is not one of ours."""
    try:
        notice = json.loads(payload)
    except ValueError:
        return None
    return notice if isinstance(notice, dict) else None


class PgNotices:
    """L{ClusterNotices} on a L{PgDatabase}: sent in its write lane, received on a thread."""

    def __init__(self, db: PgDatabase, reactor: Any) -> None:
        self._db = db
        self._reactor = reactor
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._conn: Any = None

    def notify(self, notice: Mapping[str, Any]) -> Deferred[None]:
        payload = encode_notice(notice)

        def txn(conn: Any) -> None:
            conn.execute("SELECT pg_notify(%s, %s)", (CHANNEL, payload))

        return self._db.run_batched(txn)

    def listen(self, received: Callable[[list[dict[str, Any]]], None],
               connected: Callable[[], None], lost: Callable[[str], None]) -> None:
        if self._thread is not None:
            raise RuntimeError("already listening")
        self._stopping.clear()
        self._thread = threading.Thread(
            target=self._run, args=(received, connected, lost), name="relay-pg-listen",
            daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        conn, thread, self._thread = self._conn, self._thread, None
        if conn is not None:
            try:
                conn.cancel_safe(timeout=1.0)  # ends a wait under way at once
            except Exception:
                pass
        if thread is not None:
            thread.join(timeout=2 * WAIT + 1)

    # -- the listening thread --------------------------------------------------------

    def _run(self, received: Callable[[list[dict[str, Any]]], None],
             connected: Callable[[], None], lost: Callable[[str], None]) -> None:
        import psycopg

        backoff = BACKOFF_FIRST
        while not self._stopping.is_set():
            try:
                with psycopg.connect(self._db.dsn, autocommit=True, connect_timeout=10) as conn:
                    self._conn = conn
                    conn.execute(f"LISTEN {CHANNEL}")
                    self._reactor.callFromThread(connected)
                    backoff = BACKOFF_FIRST
                    while not self._stopping.is_set():
                        for x in conn.notifies(timeout=WAIT):
                            notice = decode_notice(x.payload)
                            if notice is not None:  # handed over at once: a wake-up is late
                                self._reactor.callFromThread(received, [notice])
            except Exception as e:
                if self._stopping.is_set():
                    break
                self._reactor.callFromThread(lost, type(e).__name__)
                self._stopping.wait(backoff)
                backoff = min(backoff * 2, BACKOFF_CAP)
            finally:
                self._conn = None
