"""
SQLite behind an owned single-thread pool: the connection, its PRAGMAs and group commit.

Everything SQLite-specific about opening and driving the file lives here; the SQL of each
store is in its sibling module (L{medagent.storage.sqlite.store}, C{journal}, C{clients},
C{deliveries}).

SQLite calls block (and a commit may fsync), so they never run on the reactor thread: every
statement runs in one dedicated worker thread that owns the connection.  One thread also gives
us a simple, total order of writes.  WAL mode keeps readers from blocking the writer.
"""

from __future__ import annotations

import os
import sqlite3
import threading
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Sequence, TypeVar

from twisted.internet.defer import Deferred, fail
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

T = TypeVar("T")
log = Logger()


class DatabaseUnavailable(RuntimeError):
    """
    The database cannot do the work now (stopped, unreachable, timed out, schema not
    current): transient, so the HTTP layer answers 503 with Retry-After.  The message is
    for logs only (it may name the database); callers never show it.  C{schema}: the
    database answers but its schema is not the one this build needs.
    """

    def __init__(self, message: str = "database unavailable", *, schema: bool = False) -> None:
        super().__init__(message)
        self.schema = schema


class DatabaseStopped(DatabaseUnavailable):
    """A call reached a L{Database} after its C{stop()}: the work was not run."""


def _bounded(work: Deferred[Any], clock: Any, timeout: float) -> Deferred[None]:
    """
    C{work}'s outcome as None or L{DatabaseUnavailable}, within C{timeout}s on C{clock}; the
    work itself is not cancelled (it runs on a worker thread), only no longer waited for.
    """
    d: Deferred[None] = Deferred()

    def settle(result: Any) -> None:
        if timer.active():
            timer.cancel()
        if d.called:
            return
        if isinstance(result, Failure):
            if result.check(DatabaseUnavailable):
                d.errback(result)
            else:
                d.errback(DatabaseUnavailable(f"database check failed: {result.type.__name__}"))
        else:
            d.callback(None)

    def expired() -> None:
        if not d.called:
            d.errback(DatabaseUnavailable(f"no answer from the database within {timeout}s"))

    timer = clock.callLater(timeout, expired)
    work.addBoth(settle)
    return d


class _SharedProbe:
    """
    At most one readiness round trip in flight: a probe asked for while one runs waits for
    that one (each caller with its own timeout), so a load balancer polling a database that
    hangs does not pile work onto the pool.
    """

    def __init__(self) -> None:
        self._waiters: list[Deferred[Any]] | None = None

    def __call__(self, start: Callable[[], Deferred[Any]]) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        if self._waiters is not None:
            self._waiters.append(d)
            return d
        self._waiters = [d]

        def done(result: Any) -> None:
            waiters, self._waiters = self._waiters or [], None
            for w in waiters:
                w.errback(result) if isinstance(result, Failure) else w.callback(result)

        start().addBoth(done)
        return d


class Database:
    """
    One SQLite file, one worker thread.  C{run(fn, *args)} calls C{fn(connection, *args)} in
    that thread inside a transaction and fires with its result.

    C{synchronous} is SQLite's PRAGMA: ``NORMAL`` (default) survives a process crash
    (``kill -9``) in WAL mode; ``FULL`` also survives power loss, at an fsync per commit.
    """

    def __init__(
        self,
        reactor: Any,
        path: str,
        *,
        schema: str = "",
        synchronous: str = "NORMAL",
        name: str = "medagent-db",
        threadpool: Any = None,
        migrations: Sequence[Callable[[sqlite3.Connection], None]] = (),
    ) -> None:
        synchronous = synchronous.upper()
        if synchronous not in ("OFF", "NORMAL", "FULL", "EXTRA"):
            raise ValueError(f"synchronous must be OFF, NORMAL, FULL or EXTRA, not {synchronous!r}")
        self.path = path
        self._reactor = reactor
        self._schema = schema
        #: run before the schema script on each new connection, so that script's
        #: CREATE INDEX statements may name the columns a migration adds to an older file
        self._migrations = tuple(migrations)
        self._synchronous = synchronous
        self._local = threading.local()
        self._pool = threadpool or ThreadPool(minthreads=1, maxthreads=1, name=name)
        self._started = False
        #: set by C{stop()}: later calls fail instead of silently starting a new pool
        self._stopped = False
        self._connections: list[sqlite3.Connection] = []
        self._batch: list[tuple[Callable[..., Any], tuple[Any, ...], Deferred[Any]]] = []
        self._flushing = False
        self._probe = _SharedProbe()

    def start(self) -> None:
        """Start the worker thread (also after a C{stop()}, when called explicitly)."""
        if self._started:
            return
        self._stopped = False
        if self.path != ":memory:":
            parent = os.path.dirname(os.path.abspath(self.path))
            os.makedirs(parent, exist_ok=True)
        self._pool.start()
        self._started = True

    def _connection(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            conn.row_factory = sqlite3.Row
            if self.path != ":memory:":
                conn.execute("PRAGMA journal_mode=WAL")
                try:
                    os.chmod(self.path, 0o600)
                except OSError:
                    pass
            conn.execute(f"PRAGMA synchronous={self._synchronous}")
            conn.execute("PRAGMA foreign_keys=ON")
            conn.execute("PRAGMA busy_timeout=5000")
            for migrate in self._migrations:
                migrate(conn)
            if self._schema:
                conn.executescript(self._schema)
            self._local.conn = conn
            self._connections.append(conn)
        return conn

    def _in_transaction(self, fn: Callable[..., T], *args: Any) -> T:
        conn = self._connection()
        conn.execute("BEGIN IMMEDIATE")
        try:
            result = fn(conn, *args)
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")
        return result

    def run(self, fn: Callable[..., T], *args: Any) -> Deferred[T]:
        """
        Run C{fn(conn, *args)} in one transaction on the database thread.  The first call
        starts the thread; a call after C{stop()} fires its Deferred with L{DatabaseStopped}
        (it never raises and never brings a stopped pool back to life).
        """
        if self._stopped:
            return fail(DatabaseStopped(f"database {self.path} is stopped"))
        if not self._started:
            self.start()
        return deferToThreadPool(self._reactor, self._pool, self._in_transaction, fn, *args)

    def ping(self, clock: Any, timeout: float = 2.0) -> Deferred[None]:
        """
        Readiness: a trivial round trip (C{SELECT 1}) on the database thread, which also
        opens the file with its schema (a file that cannot be opened or migrated fails).
        Fails with L{DatabaseUnavailable} when stopped, failing, or not done within
        C{timeout} seconds on C{clock} (the worker may be stuck behind a long write).
        """
        return _bounded(self._probe(
            lambda: self.run(lambda conn: conn.execute("SELECT 1").fetchone())),
            clock, timeout)

    def run_batched(self, fn: Callable[..., T], *args: Any) -> Deferred[T]:
        """
        Like L{run}, but grouped with other batched calls into one transaction (group commit):
        while one batch commits, the next one gathers.  Each call runs in its own savepoint, so
        one failing call does not undo the others.  Throughput then pays one commit per batch,
        not per call.
        """
        d: Deferred[T] = Deferred()
        self._batch.append((fn, args, d))
        if not self._flushing:
            self._flush()
        return d

    @contextmanager
    def hold(self) -> Iterator[None]:
        """
        Test seam: L{run_batched} calls made inside the block wait, as they do while the
        database thread is busy committing a batch, and go in one batch when it ends.  Lets a
        test put events (a cancel, a lost caller) between a write and its commit without
        reaching into the group-commit state.
        """
        if self._flushing:
            raise RuntimeError("a batch is already being committed")
        with self.together():
            yield

    @contextmanager
    def together(self) -> Iterator[None]:
        """
        L{run_batched} calls made inside the block go in one transaction (one thread hop, one
        commit), in the order they were made: the block's first call does not start a batch
        of its own that the others would wait behind.  When a batch is committing already,
        they wait for it as any batched call does (and again go together).  For a sequence
        such as "record message N's answer, claim message N+1" on one lane.
        """
        if self._flushing:
            yield
            return
        self._flushing = True
        try:
            yield
        finally:
            self._flushing = False
            if self._batch:
                self._flush()

    def _flush(self) -> None:
        batch, self._batch = self._batch, []
        self._flushing = True

        def apply(conn: sqlite3.Connection) -> list[tuple[bool, Any]]:
            results: list[tuple[bool, Any]] = []
            for fn, args, _ in batch:
                conn.execute("SAVEPOINT call")
                try:
                    results.append((True, fn(conn, *args)))
                except Exception as e:
                    conn.execute("ROLLBACK TO call")
                    results.append((False, e))
                conn.execute("RELEASE call")
            return results

        def done(results: Any) -> None:
            if isinstance(results, Failure):
                for _, _, d in batch:
                    d.errback(results)
            else:
                for (ok, value), (_, _, d) in zip(results, batch):
                    d.callback(value) if ok else d.errback(Failure(value))
            self._flushing = False
            if self._batch:
                self._flush()

        self.run(apply).addBoth(done)

    def run_sync(self, fn: Callable[..., T], *args: Any) -> T:
        """
        Run on the calling thread.  Only for tools and start-up code that runs before the
        reactor (the CLI's ``init``), never from the reactor thread in a service.
        """
        return self._in_transaction(fn, *args)

    def stop(self) -> None:
        """Close the connection and stop the thread; later calls fail (L{run})."""
        self._stopped = True
        if not self._started:
            return
        self._started = False

        def close_all() -> None:
            conn = getattr(self._local, "conn", None)
            if conn is not None:
                conn.close()
                self._local.conn = None

        self._pool.callInThread(close_all)
        self._pool.stop()
