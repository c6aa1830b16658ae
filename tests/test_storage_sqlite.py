"""
The SQLite implementation of L{medagent.storage.interfaces} against the contract suites
(C{tests/storage_contract.py}), twice: driven inline (L{tests.fakes}: the "thread" is the
caller, so failures show as plain tracebacks) and on a real file with its own worker thread
(what the relay runs).  Plus what is specific to L{Database}.
"""

from __future__ import annotations

import os
from typing import Any

from twisted.internet import reactor
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase, TestCase

from medagent.storage.sqlite import (
    RELAY_SCHEMA,
    Database,
    DatabaseStopped,
    SQLiteClientRegistry,
    SQLiteDeliveryQueue,
    SQLiteJournal,
    SQLiteLanePauses,
    SQLiteStore,
)
from tests.fakes import InlineReactor, InlineThreadPool, inline_database
from medagent.storage.sqlite.agent_queue import SQLiteInbox
from medagent.storage.sqlite.inbound import SQLiteInboundLog
from medagent.storage.sqlite.outbox import SQLiteOutboxStore
from tests.storage_contract import (
    ClientRegistryContract,
    DeliveryQueueContract,
    InboxStoreContract,
    LanePausesContract,
    InboundLogContract,
    OutboxStoreContract,
    PushJournalContract,
    ResourceStoreContract,
)


#: The agent's tables (another file in production; here they share the test's database).
AGENT_SCHEMA = SQLiteInbox.schema() + SQLiteOutboxStore.schema()


class _Inline:
    """One relay database per test, driven synchronously (L{tests.fakes})."""

    separate_database_thread = False

    def database(self) -> Database:
        if getattr(self, "_db", None) is None:
            self._db = inline_database(self, RELAY_SCHEMA + AGENT_SCHEMA)
        return self._db


class _Threaded:
    """One relay database file per test on its own worker thread and the real reactor."""

    separate_database_thread = True

    def database(self) -> Database:
        if getattr(self, "_db", None) is None:
            folder = self.mktemp()
            os.makedirs(folder)
            self._db = Database(reactor, os.path.join(folder, "relay.sqlite"),
                                schema=RELAY_SCHEMA + AGENT_SCHEMA, name="test-relay-db",
                                migrations=[SQLiteJournal.migrate])
            self._db.start()
            self.addCleanup(self._db.stop)
        return self._db


class _Factories:
    def make_store(self) -> SQLiteStore:
        return SQLiteStore(self.database())

    def make_queue(self) -> SQLiteDeliveryQueue:
        return SQLiteDeliveryQueue(self.database())

    def make_journal(self, clock: Clock) -> SQLiteJournal:
        return SQLiteJournal(self.database(), clock=clock)

    def make_registry(self) -> SQLiteClientRegistry:
        return SQLiteClientRegistry(self.database())

    def make_inbox(self) -> SQLiteInbox:
        return SQLiteInbox(self.database())

    def make_outbox(self) -> SQLiteOutboxStore:
        return SQLiteOutboxStore(self.database())

    def make_pauses(self) -> SQLiteLanePauses:
        return SQLiteLanePauses(self.database())

    def make_inbound(self) -> SQLiteInboundLog:
        return SQLiteInboundLog(self.database())


class InlineResourceStoreTests(_Inline, _Factories, ResourceStoreContract, TestCase):
    pass


class ThreadedResourceStoreTests(_Threaded, _Factories, ResourceStoreContract, TestCase):
    pass


class InlinePushJournalTests(_Inline, _Factories, PushJournalContract, TestCase):
    pass


class ThreadedPushJournalTests(_Threaded, _Factories, PushJournalContract, TestCase):
    pass


class InlineClientRegistryTests(_Inline, _Factories, ClientRegistryContract, TestCase):
    pass


class ThreadedClientRegistryTests(_Threaded, _Factories, ClientRegistryContract, TestCase):
    pass


class InlineDeliveryQueueTests(_Inline, _Factories, DeliveryQueueContract, TestCase):
    pass


class ThreadedDeliveryQueueTests(_Threaded, _Factories, DeliveryQueueContract, TestCase):
    pass


class InlineInboxStoreTests(_Inline, _Factories, InboxStoreContract, TestCase):
    pass


class ThreadedInboxStoreTests(_Threaded, _Factories, InboxStoreContract, TestCase):
    pass


class InlineOutboxStoreTests(_Inline, _Factories, OutboxStoreContract, TestCase):
    pass


class ThreadedOutboxStoreTests(_Threaded, _Factories, OutboxStoreContract, TestCase):
    pass


class InlineLanePausesTests(_Inline, _Factories, LanePausesContract, TestCase):
    pass


class ThreadedLanePausesTests(_Threaded, _Factories, LanePausesContract, TestCase):
    pass


class InlineInboundLogTests(_Inline, _Factories, InboundLogContract, TestCase):
    pass


class ThreadedInboundLogTests(_Threaded, _Factories, InboundLogContract, TestCase):
    pass


class SearchIndexTests(_Inline, _Factories, TestCase):
    """The console's searches by patient id, DICOM UIDs (pushes) and by every inbound field
    read an index (SQLite's plan names it), not the table."""

    def plan(self, sql: str) -> str:
        rows = self.database().run_sync(lambda conn: conn.execute(
            "EXPLAIN QUERY PLAN " + sql, ("x",)).fetchall())
        return " ".join(str(tuple(r)) for r in rows)

    def test_push_searches_use_their_indexes(self) -> None:
        for column, index in (("patient_id", "pushes_patient"), ("study_uid", "pushes_study"),
                              ("sop_uid", "pushes_sop")):
            self.assertIn(index, self.plan(
                f"SELECT * FROM pushes WHERE {column}=? ORDER BY seq DESC"))

    def test_inbound_searches_use_their_indexes(self) -> None:
        for column, index in (("control_id", "inbound_control"),
                              ("patient_id", "inbound_patient"),
                              ("accession", "inbound_accession"),
                              ("study_uid", "inbound_study"), ("sop_uid", "inbound_sop"),
                              ("agent_id", "inbound_agent")):
            self.assertIn(index, self.plan(
                f"SELECT * FROM inbound WHERE {column}=? ORDER BY seq DESC"))


class _CountingPool(InlineThreadPool):
    def __init__(self) -> None:
        self.starts = 0

    def start(self) -> None:
        self.starts += 1


class DatabaseTests(SynchronousTestCase):
    def make(self) -> tuple[Database, _CountingPool]:
        folder = self.mktemp()
        os.makedirs(folder)
        pool = _CountingPool()
        db = Database(InlineReactor(), os.path.join(folder, "t.sqlite"),
                      schema="CREATE TABLE IF NOT EXISTS t (x INTEGER);", threadpool=pool)
        self.addCleanup(db.stop)
        return db, pool

    def test_run_after_stop_fails_its_deferred_and_does_not_restart(self) -> None:
        db, pool = self.make()
        ran: list[Any] = []
        self.assertEqual(self.successResultOf(db.run(lambda conn: ran.append(1) or 1)), 1)
        db.stop()
        d = db.run(lambda conn: ran.append(2))  # must not raise
        self.failureResultOf(d, DatabaseStopped)
        self.failureResultOf(db.run_batched(lambda conn: ran.append(3)), DatabaseStopped)
        self.assertEqual((ran, pool.starts), ([1], 1))

    def test_stop_before_start_also_refuses_later_calls(self) -> None:
        db, pool = self.make()
        db.stop()
        self.failureResultOf(db.run(lambda conn: None), DatabaseStopped)
        self.assertEqual(pool.starts, 0)

    def test_explicit_start_after_stop_serves_again(self) -> None:
        db, pool = self.make()
        db.start()
        db.stop()
        db.start()
        self.assertEqual(self.successResultOf(db.run(lambda conn: 7)), 7)
        self.assertEqual(pool.starts, 2)

    def test_batched_calls_are_isolated_in_one_commit(self) -> None:
        db, _ = self.make()

        def boom(conn: Any) -> None:
            conn.execute("INSERT INTO t VALUES (2)")
            raise ValueError("no")

        ok = db.run_batched(lambda conn: conn.execute("INSERT INTO t VALUES (1)").rowcount)
        bad = db.run_batched(boom)
        self.assertEqual(self.successResultOf(ok), 1)
        self.failureResultOf(bad, ValueError)
        rows = self.successResultOf(db.run(lambda c: [r[0] for r in c.execute("SELECT x FROM t")]))
        self.assertEqual(rows, [1])

    def test_hold_gathers_batched_calls_into_one_commit_at_its_end(self) -> None:
        db, _ = self.make()
        transactions: list[int] = []
        run = db.run

        def counting_run(fn: Any, *args: Any) -> Any:
            transactions.append(1)
            return run(fn, *args)

        db.run = counting_run  # type: ignore[method-assign]
        with db.hold():
            first = db.run_batched(lambda conn: conn.execute("INSERT INTO t VALUES (1)").rowcount)
            second = db.run_batched(lambda conn: conn.execute("INSERT INTO t VALUES (2)").rowcount)
            self.assertNoResult(first)
            self.assertNoResult(second)
            self.assertEqual(transactions, [])
        self.assertEqual((self.successResultOf(first), self.successResultOf(second)), (1, 1))
        self.assertEqual(transactions, [1])
        with db.hold():
            pass  # nothing held: no empty transaction
        self.assertEqual(transactions, [1])

    def test_together_puts_batched_calls_in_one_commit_in_order(self) -> None:
        """Without it, the first call commits alone; inside it, the calls share one."""
        db, _ = self.make()
        transactions: list[int] = []
        run = db.run

        def counting_run(fn: Any, *args: Any) -> Any:
            transactions.append(1)
            return run(fn, *args)

        db.run = counting_run  # type: ignore[method-assign]
        insert = "INSERT INTO t VALUES (?)"
        db.run_batched(lambda conn: conn.execute(insert, (1,)))
        db.run_batched(lambda conn: conn.execute(insert, (2,)))
        self.assertEqual(len(transactions), 2)
        with db.together():
            first = db.run_batched(lambda conn: conn.execute(insert, (3,)).rowcount)
            second = db.run_batched(lambda conn: conn.execute(insert, (4,)).rowcount)
            self.assertNoResult(first)
        self.assertEqual((self.successResultOf(first), self.successResultOf(second)), (1, 1))
        self.assertEqual(len(transactions), 3)
        rows = self.successResultOf(run(lambda c: [r[0] for r in c.execute(
            "SELECT x FROM t ORDER BY rowid")]))
        self.assertEqual(rows, [1, 2, 3, 4])

    def test_together_while_a_batch_commits_joins_the_next_batch(self) -> None:
        db, _ = self.make()
        with db.hold():  # as a batch being committed
            with db.together():
                d = db.run_batched(lambda conn: conn.execute("INSERT INTO t VALUES (1)").rowcount)
            self.assertNoResult(d)  # still behind the "committing" batch
        self.assertEqual(self.successResultOf(d), 1)
