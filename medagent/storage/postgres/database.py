"""
PostgreSQL behind an owned thread pool (psycopg 3): connections, the schema version table and
the ordered write lane.

psycopg calls block, so they never run on the reactor thread: every statement runs in one of
a few worker threads this object owns, each holding its own connection.  Reads (L{run}) may
run side by side; writes that must keep their call order (L{run_ordered}, L{run_batched})
go through one lane, one transaction at a time, in the order they were issued on this node --
what the storage interfaces promise ("writes issued from the reactor thread are applied in
the order they were issued").  Across relay nodes, row locks (C{FOR UPDATE},
C{SKIP LOCKED}) keep writers apart.

The schema is a list of numbered migrations; C{schema_version} records the applied ones.
They run once at start, under an advisory lock, so two nodes starting together do not race.
"""

from __future__ import annotations

import hashlib
import select
import threading
import time
from typing import Any, Callable, Sequence, TypeVar

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from medagent.storage.sqlite.database import (
    DatabaseStopped,
    DatabaseUnavailable,
    _bounded,
    _SharedProbe,
)

T = TypeVar("T")
log = Logger()

#: Arbitrary, fixed: the advisory lock that serialises migrations across nodes.
_MIGRATION_LOCK = 0x6D656461  # "meda"

#: Bounds on every wait inside the database (milliseconds): no call hangs for ever.
_SESSION_OPTIONS = ("-c statement_timeout=30000 -c lock_timeout=15000"
                    " -c idle_in_transaction_session_timeout=60000")


def _hung_up(conn: Any) -> bool:
    """
    An idle connection whose socket is readable: the server closed it or said goodbye (a
    restart, an administrator's terminate), as we never LISTEN.  Dropped before use, so the
    first call after PostgreSQL came back does not fail on a dead connection.
    """
    try:
        return bool(select.select([conn.fileno()], [], [], 0)[0])
    except Exception:  # closed under us, or no socket: not usable either
        return True


def _applied(conn: Any) -> set[int] | None:
    """The migrations recorded in C{schema_version}; C{None} when there is no such table."""
    if conn.execute("SELECT to_regclass('schema_version') AS t").fetchone()["t"] is None:
        return None
    return {int(r["version"]) for r in conn.execute("SELECT version FROM schema_version")}


def _as_unavailable(e: Exception) -> Exception:
    """C{e}, or a L{DatabaseUnavailable} for PostgreSQL's operational errors (a timeout)."""
    import psycopg

    if isinstance(e, psycopg.OperationalError):
        unavailable = DatabaseUnavailable(f"PostgreSQL unavailable ({type(e).__name__})")
        unavailable.__cause__ = e
        return unavailable
    return e


def advisory_key(scope: str) -> int:
    """A scope's PostgreSQL advisory lock: a stable signed 64-bit hash of its text."""
    digest = hashlib.blake2b(scope.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


class PgDatabase:
    """
    One PostgreSQL database, C{size} worker threads with a connection each.
    C{run(fn, *args)} calls C{fn(connection, *args)} on a worker inside a transaction and fires
    on the reactor thread with its result.  C{migrations} is a sequence of
    C{(version, sql)} pairs, applied in version order at start.
    """

    def __init__(
        self,
        reactor: Any,
        dsn: str,
        *,
        migrations: Sequence[tuple[int, str]] = (),
        size: int = 4,
        name: str = "medagent-pg",
        connect_timeout: int = 10,
    ) -> None:
        import psycopg  # noqa: F401  (fail at construction, not in a thread, when missing)

        if size < 1:
            raise ValueError("size must be at least 1")
        self.dsn = dsn
        self._reactor = reactor
        self._migrations = sorted(migrations)
        self._connect_timeout = connect_timeout
        self._local = threading.local()
        self._pool = ThreadPool(minthreads=1, maxthreads=size, name=name)
        self._lock = threading.Lock()
        self._connections: list[Any] = []
        self._started = False
        self._stopped = False
        #: None: not migrated yet; True: migrated; a list: waiters of a migration under way
        self._ready: Any = None
        self._lane: list[tuple[bool, Callable[..., Any], tuple[Any, ...], Deferred[Any]]] = []
        #: advisory locks the batched call with this Deferred declared (L{run_batched})
        self._locks: dict[int, tuple[int, ...]] = {}
        self._lane_busy = False
        self._trigger: Any = None
        self._probe = _SharedProbe()
        self._warned_commit_level = False

    # -- connections (worker threads) ------------------------------------------------

    def _connect(self) -> Any:
        import psycopg
        from psycopg.rows import dict_row

        conn = psycopg.connect(self.dsn, autocommit=False, row_factory=dict_row,
                               connect_timeout=self._connect_timeout,
                               options=_SESSION_OPTIONS)
        try:
            self._durable_commits(conn)
        except Exception:
            conn.close()
            raise
        return conn

    def _durable_commits(self, conn: Any) -> None:
        """
        A commit this session is told of has reached the server's WAL: with the server's (or
        the database's, or the role's) C{synchronous_commit = off} a crash of PostgreSQL
        loses the last commits it acknowledged -- pushes answered 202 that the journal then
        does not have.  Only C{off} is raised (to C{on}); C{local} and the replication
        levels an operator chose are kept.
        """
        level = conn.execute("SHOW synchronous_commit").fetchone()["synchronous_commit"]
        if level == "off":
            conn.execute("SET synchronous_commit = on")
            if not self._warned_commit_level:
                self._warned_commit_level = True
                log.warn("PostgreSQL has synchronous_commit = off for the relay's sessions;"
                         " the relay sets it on for its own (an acknowledged push must"
                         " survive a crash of the database)")
        conn.commit()

    def _connection(self) -> Any:
        conn = getattr(self._local, "conn", None)
        if conn is not None and (conn.closed or conn.broken or _hung_up(conn)):
            self._forget(conn)
            conn = None
        if conn is None:
            conn = self._connect()
            self._local.conn = conn
            with self._lock:
                self._connections.append(conn)
        return conn

    def _forget(self, conn: Any) -> None:
        self._local.conn = None
        with self._lock:
            if conn in self._connections:
                self._connections.remove(conn)
        try:
            conn.close()
        except Exception:
            pass

    def _in_transaction(self, fn: Callable[..., T], *args: Any) -> T:
        """
        Worker thread: C{fn} in one transaction.  PostgreSQL's operational errors (no server,
        a connection lost, a timeout) come out as L{DatabaseUnavailable}: transient, so the
        relay answers 503 and the next call connects again (a broken connection is dropped).
        """
        import psycopg

        try:
            return self._transaction(fn, *args)
        except psycopg.OperationalError as e:
            raise _as_unavailable(e) from e

    def _transaction(self, fn: Callable[..., T], *args: Any) -> T:
        conn = self._connection()
        try:
            result = fn(conn, *args)
        except BaseException:
            try:
                conn.rollback()
            except Exception:
                self._forget(conn)
            raise
        try:
            conn.commit()
        except BaseException:
            # the outcome of a commit that broke is unknown: never reuse that connection
            self._forget(conn)
            raise
        return result

    # -- migrations ------------------------------------------------------------------

    def _migrate(self, conn: Any) -> int:
        """
        Worker thread: apply, in order, every migration C{schema_version} does not record -
        also one numbered below the highest applied (features developed side by side merge
        their migrations in any order: a database already at 9 still gets 7).  Returns the
        highest version applied.
        """
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
        conn.execute("CREATE TABLE IF NOT EXISTS schema_version ("
                     " version INTEGER PRIMARY KEY, applied DOUBLE PRECISION NOT NULL)")
        applied = _applied(conn) or set()
        for version, sql in self._migrations:
            if version in applied:
                continue
            conn.execute(sql)
            conn.execute("INSERT INTO schema_version (version, applied) VALUES (%s, %s)",
                         (version, time.time()))
            applied.add(version)
        return max(applied, default=0)

    def migrate_sync(self) -> int:
        """Apply the migrations on the calling thread (tools, tests); the schema version."""
        conn = self._connect()
        try:
            with conn.transaction():
                return self._migrate(conn)
        finally:
            conn.close()

    @property
    def wanted_version(self) -> int:
        """The schema version this build's migrations bring the database to."""
        return max((version for version, _ in self._migrations), default=0)

    def schema_version_sync(self) -> int:
        """The version the database is at (0: never migrated), on the calling thread (tools)."""
        conn = self._connect()
        try:
            with conn.transaction():
                return max(_applied(conn) or {0})
        finally:
            conn.close()

    def _when_ready(self) -> Deferred[None]:
        if self._ready is True:
            return succeed(None)
        d: Deferred[None] = Deferred()
        if isinstance(self._ready, list):
            self._ready.append(d)
            return d
        self._ready = [d]

        def done(result: Any) -> None:
            waiters, self._ready = self._ready, None
            if isinstance(result, Failure):
                log.error("PostgreSQL schema migration failed: {error}",
                          error=result.getErrorMessage())
            else:
                self._ready = True
                log.info("PostgreSQL schema at version {version}", version=result)
            for w in waiters:
                w.callback(None) if not isinstance(result, Failure) else w.errback(result)

        deferToThreadPool(self._reactor, self._pool, self._in_transaction,
                          self._migrate).addBoth(done)
        return d

    # -- the public calls (reactor thread) --------------------------------------------

    def start(self) -> Deferred[None]:
        """Start the workers and apply the migrations; fires when the schema is ready."""
        if not self._started:
            self._stopped = False
            self._pool.start()
            self._started = True
            # as the reactor's own pool: threads left running would keep the process alive
            add_trigger = getattr(self._reactor, "addSystemEventTrigger", None)
            if add_trigger is not None:
                self._trigger = add_trigger("during", "shutdown", self.stop)
        return self._when_ready()

    def run(self, fn: Callable[..., T], *args: Any) -> Deferred[T]:
        """
        Run C{fn(conn, *args)} in one transaction on a worker; calls may run side by side.
        A call after C{stop()} fails with L{DatabaseStopped}.
        """
        if self._stopped:
            return fail(DatabaseStopped(f"database {self._safe_name()} is stopped"))
        if not self._started:
            self.start()

        def go(_: None) -> Deferred[T]:
            if self._stopped:
                raise DatabaseStopped(f"database {self._safe_name()} is stopped")
            return deferToThreadPool(self._reactor, self._pool, self._in_transaction, fn,
                                     *args)

        return self._when_ready().addCallback(go)

    def ping(self, clock: Any, timeout: float = 2.0) -> Deferred[None]:
        """
        Readiness: C{SELECT 1} through this pool and every migration of this build recorded
        in C{schema_version}; fails with L{DatabaseUnavailable} when not, or when no answer
        came within C{timeout} seconds on C{clock}.  A failed migration at start is tried
        again here (L{run}), so a node whose database came back becomes ready by itself.
        """
        wanted = {version for version, _ in self._migrations}

        def check(conn: Any) -> None:
            conn.execute("SELECT 1").fetchone()
            if not wanted:
                return
            applied = _applied(conn)
            if applied is None:
                raise DatabaseUnavailable("schema not current: no schema_version table",
                                          schema=True)
            missing = wanted - applied
            if missing:
                raise DatabaseUnavailable(
                    f"schema not current: migration(s) {sorted(missing)} not applied", schema=True)

        return _bounded(self._probe(lambda: self.run(check)), clock, timeout)

    def run_ordered(self, fn: Callable[..., T], *args: Any) -> Deferred[T]:
        """L{run} in the write lane: one transaction at a time, in call order."""
        return self._enqueue(False, fn, args)

    def run_batched(self, fn: Callable[..., T], *args: Any,
                    locks: Sequence[str] = ()) -> Deferred[T]:
        """
        In the write lane, grouped with the batched calls next to it into one transaction
        (group commit), each call in its own savepoint so one failing call does not undo
        the others.  C{locks}: scopes (any text) this call's writers serialise on across
        every node until commit; the batch takes the locks of all its calls first, in one
        global order, so batches on two nodes never deadlock on them.
        """
        return self._enqueue(True, fn, args, tuple(advisory_key(scope) for scope in locks))

    def _enqueue(self, batched: bool, fn: Callable[..., Any], args: tuple[Any, ...],
                 locks: tuple[int, ...] = ()) -> Deferred[Any]:
        if self._stopped:
            return fail(DatabaseStopped(f"database {self._safe_name()} is stopped"))
        d: Deferred[Any] = Deferred()
        if locks:
            self._locks[id(d)] = locks
        self._lane.append((batched, fn, args, d))
        if not self._lane_busy:
            self._next()
        return d

    def _next(self) -> None:
        if not self._lane:
            self._lane_busy = False
            return
        self._lane_busy = True
        if not self._lane[0][0]:
            _, fn, args, d = self._lane.pop(0)

            def one(result: Any) -> None:
                d.callback(result) if not isinstance(result, Failure) else d.errback(result)
                self._next()

            self.run(fn, *args).addBoth(one)
            return
        batch = []
        while self._lane and self._lane[0][0]:
            batch.append(self._lane.pop(0))
        keys = sorted({k for _, _, _, d in batch for k in self._locks.pop(id(d), ())})

        def apply(conn: Any) -> list[tuple[bool, Any]]:
            if keys:  # all of them, ascending: one order on every node (no deadlock)
                conn.execute("SELECT count(pg_advisory_xact_lock(k)) FROM"
                             " (SELECT k FROM unnest(%s::bigint[]) AS k ORDER BY k) AS s",
                             (keys,))
            results: list[tuple[bool, Any]] = []
            for _, fn, args, _ in batch:
                conn.execute("SAVEPOINT call")
                try:
                    results.append((True, fn(conn, *args)))
                except Exception as e:
                    conn.execute("ROLLBACK TO SAVEPOINT call")
                    results.append((False, _as_unavailable(e)))
                conn.execute("RELEASE SAVEPOINT call")
            return results

        def done(results: Any) -> None:
            if isinstance(results, Failure):
                for _, _, _, d in batch:
                    d.errback(results)
            else:
                for (ok, value), (_, _, _, d) in zip(results, batch):
                    d.callback(value) if ok else d.errback(Failure(value))
            self._next()

        self.run(apply).addBoth(done)

    def run_sync(self, fn: Callable[..., T], *args: Any) -> T:
        """
        Run on the calling thread with a connection of its own (migrating first).  Only for
        tools that run without a reactor (the CLI), never from the reactor thread.
        """
        conn = self._connect()
        try:
            with conn.transaction():
                self._migrate(conn)
            with conn.transaction():
                return fn(conn, *args)
        finally:
            conn.close()

    def _safe_name(self) -> str:
        """The database without credentials, for errors and logs."""
        try:
            from psycopg.conninfo import conninfo_to_dict

            info = conninfo_to_dict(self.dsn)
            return f"{info.get('host', '')}:{info.get('port', '')}/{info.get('dbname', '')}"
        except Exception:
            return "(postgresql)"

    def stop(self) -> None:
        """Stop the workers and close their connections; later calls fail (L{run})."""
        self._stopped = True
        lane, self._lane = self._lane, []
        self._locks.clear()
        for _, _, _, d in lane:
            d.errback(DatabaseStopped(f"database {self._safe_name()} is stopped"))
        if not self._started:
            return
        self._started = False
        trigger, self._trigger = self._trigger, None
        if trigger is not None:
            try:
                self._reactor.removeSystemEventTrigger(trigger)
            except (ValueError, KeyError):
                pass  # already fired: this is the shutdown
        self._pool.stop()
        with self._lock:
            conns, self._connections = self._connections, []
        for conn in conns:
            try:
                conn.close()
            except Exception:
                pass
        self._ready = None
        self._pool = ThreadPool(minthreads=1, maxthreads=self._pool.max, name=self._pool.name)
