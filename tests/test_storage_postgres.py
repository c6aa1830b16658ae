"""
The PostgreSQL implementation of L{medagent.storage.interfaces} against the same contract
suites as SQLite (C{tests/storage_contract.py}), on a real server (L{tests.pgenv}: a throwaway
cluster on a loopback port, or ``MEDAGENT_PG_DSN``), each store on its own worker threads and
the real reactor.  One database per test class, emptied before each test.  Plus what is
specific to L{PgDatabase} and to several relay nodes sharing one database.
"""

from __future__ import annotations

import os
import threading
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, DeferredList, ensureDeferred
from twisted.internet.task import Clock
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SynchronousTestCase, TestCase

from medagent.fhir import FHIRError
from medagent.storage import journal as j
from medagent.storage import open_storage
from medagent.storage.postgres import (
    DATA_TABLES,
    MIGRATIONS,
    PgClientRegistry,
    PgDatabase,
    PgDeliveryQueue,
    PgInboundLog,
    PgJournal,
    PgLanePauses,
    PgStore,
)
from medagent.storage.sqlite.database import DatabaseStopped
from tests import pgenv
from tests.peerenv import ROOT
from tests.storage_contract import (
    ClientRegistryContract,
    DeliveryQueueContract,
    LanePausesContract,
    InboundLogContract,
    PushJournalContract,
    ResourceStoreContract,
    _client,
    _new_delivery,
)

_databases: dict[str, str] = {}
_databases_lock = threading.Lock()


def _class_database(cls: type) -> str:
    """Worker thread: the (migrated) database of test class C{cls}, created on first use."""
    with _databases_lock:
        if cls.__name__ not in _databases:
            dsn = pgenv.fresh_database("medagent_" + cls.__name__.lower())
            PgDatabase(reactor, dsn, migrations=MIGRATIONS).migrate_sync()
            _databases[cls.__name__] = dsn
        return _databases[cls.__name__]


def _truncate(dsn: str) -> None:
    import psycopg

    with psycopg.connect(dsn, autocommit=True, connect_timeout=10) as conn:
        conn.execute(f"TRUNCATE {', '.join(DATA_TABLES)} RESTART IDENTITY CASCADE")


class _Pg:
    """A fresh (emptied) class database per test, behind a L{PgDatabase} of its own."""

    separate_database_thread = True
    dsn: str

    def setUp(self) -> Deferred[None]:
        def prepare() -> str:
            dsn = _class_database(type(self))
            _truncate(dsn)
            return dsn

        def ready(dsn: str) -> None:
            self.dsn = dsn
            super(_Pg, self).setUp()  # type: ignore[misc]

        # the blocking set-up runs on a thread: the reactor keeps turning meanwhile
        return deferToThread(prepare).addCallback(ready)

    def database(self) -> PgDatabase:
        if getattr(self, "_db", None) is None:
            self._db = self.open_database()
        return self._db

    def open_database(self, size: int = 4) -> PgDatabase:
        db = PgDatabase(reactor, self.dsn, migrations=MIGRATIONS, size=size,
                        name="test-relay-pg")
        self.addCleanup(db.stop)  # type: ignore[attr-defined]
        return db

    def make_store(self) -> PgStore:
        return PgStore(self.database())

    def make_queue(self) -> PgDeliveryQueue:
        return PgDeliveryQueue(self.database())

    def make_journal(self, clock: Clock) -> PgJournal:
        return PgJournal(self.database(), clock=clock)

    def make_registry(self) -> PgClientRegistry:
        return PgClientRegistry(self.database())

    def make_pauses(self) -> PgLanePauses:
        return PgLanePauses(self.database())

    def make_inbound(self) -> PgInboundLog:
        return PgInboundLog(self.database())


class PgResourceStoreTests(_Pg, ResourceStoreContract, TestCase):
    pass


class PgPushJournalTests(_Pg, PushJournalContract, TestCase):
    pass


class PgInboundLogTests(_Pg, InboundLogContract, TestCase):
    pass


class PgClientRegistryTests(_Pg, ClientRegistryContract, TestCase):
    pass


class PgDeliveryQueueTests(_Pg, DeliveryQueueContract, TestCase):
    pass


class PgLanePausesTests(_Pg, LanePausesContract, TestCase):
    pass


class PgDatabaseTests(_Pg, TestCase):
    """The database object, and two relay nodes (two L{PgDatabase}s) on one database."""

    async def test_schema_version_is_recorded_and_migrating_again_changes_nothing(self) -> None:
        db = self.database()
        await db.start()
        rows = await db.run(lambda c: c.execute(
            "SELECT version FROM schema_version ORDER BY version").fetchall())
        self.assertEqual([r["version"] for r in rows], [v for v, _ in MIGRATIONS])
        other = self.open_database()
        await other.start()  # a second node starting on the same database
        self.assertEqual(await deferToThread(other.migrate_sync), MIGRATIONS[-1][0])
        rows = await db.run(lambda c: c.execute("SELECT count(*) AS n FROM schema_version")
                            .fetchone())
        self.assertEqual(rows["n"], len(MIGRATIONS))

    async def test_commits_are_durable_whatever_the_server_says(self) -> None:
        """
        C{synchronous_commit = off} (here, for the database) would let a crash of PostgreSQL
        lose commits it acknowledged: the relay's sessions raise it to C{on}; a level an
        operator chose otherwise (C{local}) is kept.
        """
        import psycopg
        from psycopg import sql

        def set_level(level: str | None) -> None:
            with psycopg.connect(self.dsn, autocommit=True, connect_timeout=10) as conn:
                name = sql.Identifier(conn.info.dbname)
                if level is None:
                    conn.execute(sql.SQL("ALTER DATABASE {} RESET synchronous_commit")
                                 .format(name))
                else:
                    conn.execute(sql.SQL("ALTER DATABASE {} SET synchronous_commit = {}")
                                 .format(name, sql.Literal(level)))

        def level(conn: Any) -> str:
            return str(conn.execute("SHOW synchronous_commit").fetchone()["synchronous_commit"])

        self.addCleanup(deferToThread, set_level, None)
        for server, wanted in (("off", "on"), ("local", "local"), ("on", "on")):
            await deferToThread(set_level, server)
            self.assertEqual(await self.open_database().run(level), wanted, server)

    async def test_work_runs_off_the_reactor_thread(self) -> None:
        main = threading.current_thread().name
        names = await self.database().run(lambda c: threading.current_thread().name)
        self.assertNotEqual(names, main)

    async def test_a_failing_call_rolls_back_and_the_connection_serves_again(self) -> None:
        db = self.database()

        def boom(conn: Any) -> None:
            conn.execute("INSERT INTO clients (client_id, salt, secret_hash, role, created)"
                         " VALUES ('x', '', '', 'admin', 1)")
            conn.execute("SELECT no_such_column FROM clients")

        try:
            await db.run(boom)
        except Exception as e:
            self.assertIn("no_such_column", str(e))
        else:
            self.fail("a failing statement did not fail the call")
        count = await db.run(lambda c: c.execute("SELECT count(*) AS n FROM clients")
                             .fetchone()["n"])
        self.assertEqual(count, 0)

    async def test_batched_calls_are_isolated_in_one_commit(self) -> None:
        db = self.database()

        def add(conn: Any, id: str) -> int:
            return conn.execute("INSERT INTO clients (client_id, salt, secret_hash, role,"
                                " created) VALUES (%s, '', '', 'admin', 1)", (id,)).rowcount

        ok = db.run_batched(add, "a")
        bad = db.run_batched(add, "a")  # duplicate key: only this call fails
        also = db.run_batched(add, "b")
        self.assertEqual(await ok, 1)
        try:
            await bad
        except Exception:
            pass
        else:
            self.fail("a duplicate insert succeeded")
        self.assertEqual(await also, 1)
        ids = await db.run(lambda c: [r["client_id"] for r in c.execute(
            "SELECT client_id FROM clients ORDER BY client_id")])
        self.assertEqual(ids, ["a", "b"])

    async def test_ordered_writes_keep_call_order(self) -> None:
        db = self.open_database(size=4)
        store = PgStore(db)
        first = await store.create({"resourceType": "Task", "id": "t", "status": "draft"})
        writes = [store.update({**first, "status": f"s{i}"}) for i in range(20)]
        results = await DeferredList(writes, fireOnOneErrback=True, consumeErrors=True)
        versions = [r["meta"]["versionId"] for _, r in results]
        self.assertEqual(versions, [str(i) for i in range(2, 22)])
        self.assertEqual((await store.read("Task", "t"))["status"], "s19")

    async def test_call_after_stop_fails_its_deferred(self) -> None:
        db = self.database()
        self.assertEqual(await db.run(lambda c: 7), 7)
        db.stop()
        for d in (db.run(lambda c: 1), db.run_ordered(lambda c: 1),
                  db.run_batched(lambda c: 1)):
            try:
                await d
            except DatabaseStopped:
                pass
            else:
                self.fail("a call after stop() ran")

    async def test_two_nodes_never_lease_one_delivery_twice(self) -> None:
        a, b = PgDeliveryQueue(self.open_database()), PgDeliveryQueue(self.open_database())
        await a.enqueue([_new_delivery(f"d{i}", resource=f"r{i}") for i in range(40)])
        claims = [q.claim(100.0, 60.0, 3) for _ in range(8) for q in (a, b)]
        results = await DeferredList(claims, fireOnOneErrback=True, consumeErrors=True)
        leased = [d.id for _, (claimed, _) in results for d in claimed]
        self.assertEqual(len(leased), len(set(leased)))  # nobody leased a delivery twice
        self.assertEqual(sorted(leased), sorted(f"d{i}" for i in range(40)))

    async def test_two_nodes_creating_one_id_one_wins(self) -> None:
        a, b = PgStore(self.open_database()), PgStore(self.open_database())
        results = await DeferredList(
            [s.create({"resourceType": "Device", "id": "dev", "status": n})
             for s, n in ((a, "a"), (b, "b"))], consumeErrors=True)
        won = [r for ok, r in results if ok]
        lost = [r.value for ok, r in results if not ok]
        self.assertEqual(len(won), 1)
        self.assertEqual([(type(e), e.status) for e in lost], [(FHIRError, 409)])
        self.assertEqual((await a.read("Device", "dev"))["status"], won[0]["status"])

    async def test_journal_seq_is_shared_by_nodes(self) -> None:
        clock = Clock()
        a, b = PgJournal(self.open_database(), clock=clock), PgJournal(self.open_database(),
                                                                         clock=clock)

        def push(journal: PgJournal) -> j.Push:
            return j.Push(id=journal.new_id(), agent_id="a1", destination="mllp://d:1",
                          remote="mllp://d:1", content_type="text/plain", body="x")

        first = await a.create(push(a))
        second = await b.create(push(b))
        self.assertLess(first.seq, second.seq)
        self.assertEqual([p.id for p in await a.open_for_agent("a1")], [first.id, second.id])


    async def test_per_agent_an_insert_waits_for_the_one_before_to_commit(self) -> None:
        """
        Node A's batch holds agent X's scope (a long transaction); node B's push for X waits
        for A's commit (so per agent, seq order is commit order and a lane's next-seq mark
        never skips a push committed late); node C's push for agent Y does not wait.
        """
        clock = Clock()
        db_a = self.open_database()
        b = PgJournal(self.open_database(), clock=clock)
        done: list[str] = []

        def push(agent: str) -> j.Push:
            return j.Push(id=b.new_id(), agent_id=agent, destination="mllp://d:1",
                          remote="mllp://d:1", content_type="text/plain", body="x")

        def long(conn: Any) -> None:
            conn.execute("SELECT pg_sleep(0.5)")

        held = db_a.run_batched(long, locks=j.write_scopes(push("X"))[:1])
        held.addCallback(lambda _: done.append("A committed"))
        from tests.procs import wait_until

        async def a_holds_it() -> bool:
            rows = await db_a.run(lambda conn: conn.execute(
                "SELECT count(*) AS n FROM pg_locks WHERE locktype = 'advisory'"
                " AND granted").fetchone())
            return bool(rows["n"])

        await wait_until(a_holds_it, timeout=10, what="node A's lock")
        x = b.create(push("X")).addCallback(lambda p: done.append("B's X") or p)
        c = PgJournal(self.open_database(), clock=clock)  # (B's own lane is busy with X)
        y = c.create(push("Y")).addCallback(lambda p: done.append("C's Y") or p)
        await DeferredList([held, x, y], fireOnOneErrback=True)
        self.assertEqual(done, ["C's Y", "A committed", "B's X"])

    async def test_two_nodes_never_journal_one_message_twice(self) -> None:
        """
        Thirty keys and thirty HL7 messages, each sent to two nodes at once (a client
        retrying through a balancer): each is journaled once; the loser is told which push
        won.  Without the insert's own check (under an advisory lock) both batches read
        "no earlier push" and insert.
        """
        clock = Clock()
        a, b = (PgJournal(self.open_database(), clock=clock) for _ in range(2))

        def push(journal: PgJournal, i: int, by_key: bool) -> j.Push:
            return j.Push(id=journal.new_id(), agent_id="a1", destination="mllp://d:1",
                          remote="mllp://d:1", content_type="x-application/hl7-v2+er7",
                          body=f"MSH|{i}", requester="c1" if by_key else f"c-{journal.new_id()}",
                          idempotency_key=f"k{i}" if by_key else None,
                          control_id=None if by_key else f"M{i}",
                          body_hash=None if by_key else f"h{i}")

        creates = [journal.create(push(journal, i, by_key))
                   for by_key in (True, False) for i in range(30) for journal in (a, b)]
        results = await DeferredList(creates, consumeErrors=True)
        won = [r for ok, r in results if ok]
        lost = [r.value for ok, r in results if not ok]
        self.assertEqual(len(won), 60)
        self.assertEqual([type(e) for e in lost], [j.RepeatedPush] * 60)
        self.assertEqual(sorted(e.earlier.id for e in lost), sorted(p.id for p in won))
        self.assertEqual(sorted((e.earlier.body, e.by_key) for e in lost),
                         sorted((p.body, p.idempotency_key is not None) for p in won))
        self.assertEqual(len(await a.open_for_agent("a1", limit=500)), 60)


class OpenStorageTests(SynchronousTestCase):
    """L{open_storage}: which backend a C{--database} value gives, and what it refuses."""

    def test_no_url_is_the_sqlite_file_in_the_data_folder(self) -> None:
        folder = self.mktemp()
        storage = open_storage(None, folder, reactor)
        self.addCleanup(storage.stop)
        self.assertEqual((storage.backend, type(storage.store).__name__,
                          type(storage.journal).__name__, type(storage.registry).__name__,
                          type(storage.deliveries).__name__),
                         ("sqlite", "SQLiteStore", "SQLiteJournal", "SQLiteClientRegistry",
                          "SQLiteDeliveryQueue"))
        self.assertEqual(storage.db.path, os.path.join(folder, "relay.sqlite"))

    def test_a_postgresql_url_gives_the_postgres_set_without_connecting(self) -> None:
        # port 9 (discard) on loopback: nothing listens; open_storage must not try
        storage = open_storage("postgresql://relay@127.0.0.1:9/medagent", self.mktemp(),
                               reactor)
        self.assertEqual((storage.backend, type(storage.store), type(storage.journal),
                          type(storage.registry), type(storage.deliveries)),
                         ("postgresql", PgStore, PgJournal, PgClientRegistry, PgDeliveryQueue))
        self.assertIs(storage.store._db, storage.db)

    def test_refusals_never_repeat_the_url(self) -> None:
        for url, why in [
            ("mysql://u@127.0.0.1/db", "postgresql:// URL"),
            ("postgresql://u:s3cret@127.0.0.1/db", "password"),
            ("postgresql://u@db.example:5432/db", "sslmode"),
            ("postgresql://u@db.example:5432/db?sslmode=prefer", "sslmode"),
        ]:
            with self.assertRaises(ValueError) as caught:
                open_storage(url, self.mktemp(), reactor)
            self.assertIn(why, str(caught.exception))
            self.assertNotIn("s3cret", str(caught.exception))
            self.assertNotIn("example", str(caught.exception))
        storage = open_storage("postgresql://u@db.example:5432/db?sslmode=verify-full",
                               self.mktemp(), reactor)
        self.assertEqual(storage.backend, "postgresql")


class OpenStoragePgTests(_Pg, TestCase):
    """The set L{open_storage} gives for a URL works on a real server, hooks included."""

    async def test_the_set_shares_one_database_and_transaction(self) -> None:
        storage = open_storage(self.dsn, self.mktemp(), reactor)
        self.addCleanup(storage.stop)
        await storage.start()

        class Hook:
            def prepare(self, resource_type: str, id: str, resource: Any) -> Any:
                return self

            def in_transaction(self, tx: Any, interaction: str, resource: Any,
                               previous: Any) -> Any:
                return tx.enqueue_deliveries([_new_delivery("d1", resource=resource["id"])])

            def committed(self, token: Any) -> None:
                pass

        storage.store.write_hooks.append(Hook())
        await storage.store.create({"resourceType": "Task", "id": "t1"})
        self.assertEqual([d.id for d in await storage.deliveries.list()], ["d1"])
        await storage.registry.add(_client("c1", 1.0))
        self.assertEqual((await storage.registry.lookup("c1")).client_id, "c1")
        push = await storage.journal.create(j.Push(
            id=storage.journal.new_id(), agent_id="a1", destination="mllp://d:1",
            remote="mllp://d:1", content_type="text/plain", body="x"))
        self.assertEqual((await storage.journal.current(push.id)).state, j.QUEUED)


_FORGOTTEN_STOP = """
import sys
from twisted.internet import reactor
from medagent.storage.postgres import MIGRATIONS, PgDatabase
db = PgDatabase(reactor, sys.argv[1], migrations=MIGRATIONS)
def done(value):
    print("answered", value, flush=True)
    reactor.stop()  # db.stop() forgotten: the process must exit all the same
db.run(lambda c: c.execute("SELECT 41 + 1 AS n").fetchone()["n"]).addBoth(done)
reactor.run()
"""


class PgConsoleSessionsTests(_Pg, TestCase):
    """The console's shared sign-in sessions (two nodes: two databases objects)."""

    async def test_one_nodes_session_is_the_others_until_it_ends(self) -> None:
        from medagent.storage.postgres import PgConsoleSessions
        from medagent.storage.records import SharedConsoleSession

        a = PgConsoleSessions(self.open_database())
        b = PgConsoleSessions(self.open_database())
        key, other = b"k" * 32, b"o" * 32
        await a.add(SharedConsoleSession(id_hash=key, client_id="c1", role="operator",
                                         agents=frozenset({"x", "y"}), name="Ann",
                                         csrf="tok"))
        await a.add(SharedConsoleSession(id_hash=other, client_id="c2", role="viewer",
                                         agents=frozenset(), name=None, csrf="t2"))
        seen = await b.use(key, 60.0)
        assert seen is not None
        self.assertEqual((seen.client_id, seen.role, seen.agents, seen.name, seen.csrf),
                         ("c1", "operator", frozenset({"x", "y"}), "Ann", "tok"))
        self.assertIsNone(await b.use(b"nope" * 8, 60.0))
        self.assertIsNone(await b.use(other, 0.0))  # idle for longer than 0 s: expired
        self.assertEqual(await b.prune(0.0), 2)  # both rows idle for longer than 0 s
        self.assertIsNone(await a.use(key, 60.0))
        await a.add(SharedConsoleSession(id_hash=key, client_id="c1", role="operator",
                                         agents=frozenset(), name=None, csrf="tok"))
        await a.add(SharedConsoleSession(id_hash=other, client_id="c2", role="viewer",
                                         agents=frozenset(), name=None, csrf="t2"))
        self.assertEqual(await b.prune(60.0), 0)
        await b.drop(key)
        self.assertIsNone(await a.use(key, 60.0))
        await b.drop_client("c2")
        self.assertIsNone(await a.use(other, 60.0))


class PgDatabaseShutdownTests(_Pg, TestCase):
    async def test_a_database_not_stopped_does_not_keep_the_process_alive(self) -> None:
        import subprocess
        import sys

        def child() -> subprocess.CompletedProcess[bytes]:
            try:
                return subprocess.run([sys.executable, "-c", _FORGOTTEN_STOP, self.dsn],
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      timeout=30, env={**os.environ,
                                                       "PYTHONPATH": ROOT + os.pathsep
                                                       + os.environ.get("PYTHONPATH", "")})
            except subprocess.TimeoutExpired as e:  # the process is killed by run()
                raise AssertionError("the process did not exit after reactor.stop()") from e

        result = await deferToThread(child)
        self.assertIn(b"answered 42", result.stdout)
        self.assertEqual(result.returncode, 0, result.stdout[-2000:])


class PgMigrationsByNumber(TestCase):
    """A migration numbered below one a database already has (features merged in another
    order than numbered: lane pauses, 8, after the console's sessions, 9) is applied too."""

    def test_a_missing_lower_migration_is_applied(self) -> Deferred[None]:
        async def go() -> None:
            dsn = await deferToThread(pgenv.fresh_database, "medagent_migration_order")
            without_8 = tuple(m for m in MIGRATIONS if m[0] != 8)
            old = PgDatabase(reactor, dsn, migrations=without_8)
            self.addCleanup(old.stop)
            self.assertEqual(await deferToThread(old.migrate_sync), 9)
            db = PgDatabase(reactor, dsn, migrations=MIGRATIONS)
            self.addCleanup(db.stop)
            self.assertEqual(await deferToThread(db.migrate_sync), 9)
            await db.start()
            versions = await db.run(lambda c: [r["version"] for r in c.execute(
                "SELECT version FROM schema_version ORDER BY version").fetchall()])
            self.assertEqual(versions, [v for v, _ in MIGRATIONS])
            pauses = PgLanePauses(db)
            self.assertTrue(await pauses.pause("a1", "mllp://h:1", "op", 1.0))
            await db.ping(reactor)  # every migration of this build recorded: ready

        return ensureDeferred(go())


class PgConsoleMigration(TestCase):
    """Migrations 4 and 5 (the timeline; the console's columns and indexes) on a database of
    version 3 that holds pushes: they stay readable, and the MSH-10 search reads its index."""

    def test_version_3_database_upgrades_with_its_pushes(self) -> Deferred[None]:
        async def go() -> None:
            dsn = await deferToThread(pgenv.fresh_database, "medagent_console_migration")
            old = PgDatabase(reactor, dsn, migrations=MIGRATIONS[:3])
            self.addCleanup(old.stop)
            await deferToThread(old.migrate_sync)
            await old.start()
            await old.run(lambda c: c.execute(
                "INSERT INTO pushes (id, agent_id, destination, remote, content_type, body,"
                " state, created, updated, control_id) VALUES"
                " ('p1','a1','d','mllp://h:1','x-application/hl7-v2+er7','MSH|','delivered',"
                " 1, 1, 'OLD1')"))
            old.stop()
            db = PgDatabase(reactor, dsn, migrations=MIGRATIONS)
            self.addCleanup(db.stop)
            self.assertEqual(await deferToThread(db.migrate_sync), db.wanted_version)
            await db.start()
            journal = PgJournal(db)
            push = await journal.get("p1")
            self.assertEqual((push.control_id, push.accession, push.resent_from,
                              push.timeline), ("OLD1", None, None, {}))
            self.assertEqual([p.id for p in await journal.search({"control_id": "OLD1"})],
                             ["p1"])

            def plan(c: Any) -> str:
                c.execute("SET enable_seqscan = off")
                rows = c.execute("EXPLAIN SELECT * FROM pushes WHERE control_id='OLD1'"
                                 " ORDER BY seq DESC").fetchall()
                return " ".join(str(list(r.values())[0]) for r in rows)

            self.assertIn("pushes_control", await db.run(plan))

        return ensureDeferred(go())


class PgInboundMigration(TestCase):
    """Migration 7 (the inbound log; a push's patient id and DICOM UIDs) on a database of
    version 5 that holds pushes: they stay readable, and the new searches read their
    indexes."""

    def test_version_5_database_upgrades_with_its_pushes(self) -> Deferred[None]:
        async def go() -> None:
            dsn = await deferToThread(pgenv.fresh_database, "medagent_inbound_migration")
            old = PgDatabase(reactor, dsn, migrations=[m for m in MIGRATIONS if m[0] <= 5])
            self.addCleanup(old.stop)
            self.assertEqual(await deferToThread(old.migrate_sync), 5)
            await old.start()
            await old.run(lambda c: c.execute(
                "INSERT INTO pushes (id, agent_id, destination, remote, content_type, body,"
                " state, created, updated, control_id) VALUES"
                " ('p1','a1','d','mllp://h:1','x-application/hl7-v2+er7','MSH|','delivered',"
                " 1, 1, 'OLD1')"))
            old.stop()
            db = PgDatabase(reactor, dsn, migrations=MIGRATIONS)
            self.addCleanup(db.stop)
            self.assertGreaterEqual(await deferToThread(db.migrate_sync), 7)
            await db.start()
            push = await PgJournal(db).get("p1")
            self.assertEqual((push.control_id, push.patient_id, push.study_uid, push.sop_uid),
                             ("OLD1", None, None, None))
            inbound = PgInboundLog(db)
            found, total, _ = await inbound.search_page({}, count=10)
            self.assertEqual((found, total), ([], 0))

            def plan(c: Any, sql: str) -> str:
                c.execute("SET enable_seqscan = off")
                rows = c.execute("EXPLAIN " + sql).fetchall()
                return " ".join(str(list(r.values())[0]) for r in rows)

            for table, column, index in (
                    ("pushes", "patient_id", "pushes_patient"),
                    ("pushes", "study_uid", "pushes_study"),
                    ("pushes", "sop_uid", "pushes_sop"),
                    ("inbound", "control_id", "inbound_control"),
                    ("inbound", "patient_id", "inbound_patient"),
                    ("inbound", "accession", "inbound_accession"),
                    ("inbound", "study_uid", "inbound_study"),
                    ("inbound", "sop_uid", "inbound_sop")):
                self.assertIn(index, await db.run(
                    plan, f"SELECT * FROM {table} WHERE {column}='x' ORDER BY seq DESC"))

        return ensureDeferred(go())

    def test_a_migration_merged_below_the_highest_applied_still_runs(self) -> Deferred[None]:
        """Features merge their migrations in any order: a database that a build without 7
        brought to its highest version gets 7 from a build that has it."""

        async def go() -> None:
            highest = MIGRATIONS[-1][0]
            self.assertGreater(highest, 7, "no migration after 7 to test this with")
            dsn = await deferToThread(pgenv.fresh_database, "medagent_out_of_order")
            old = PgDatabase(reactor, dsn, migrations=[m for m in MIGRATIONS if m[0] != 7])
            self.addCleanup(old.stop)
            self.assertEqual(await deferToThread(old.migrate_sync), highest)
            db = PgDatabase(reactor, dsn, migrations=MIGRATIONS)
            self.addCleanup(db.stop)
            self.assertEqual(await deferToThread(db.migrate_sync), highest)
            await db.start()
            await db.ping(reactor)  # every migration of this build recorded: ready
            found, total, _ = await PgInboundLog(db).search_page({}, count=1)
            self.assertEqual(total, 0)
            versions = await db.run(lambda c: [r["version"] for r in c.execute(
                "SELECT version FROM schema_version ORDER BY applied, version").fetchall()])
            self.assertEqual(sorted(versions), sorted(v for v, _ in MIGRATIONS))
            self.assertEqual(versions[-1], 7)  # applied last, by the newer build

        return ensureDeferred(go())
