"""
``/readyz`` (database reachable, schema current) and a push while the database cannot
journal: 503 with Retry-After, never 500 and never 202 without a journal row, and the relay
serves again by itself once the database is back.  SQLite unit tests (a relay in this process
on a loopback port, and L{Database.ping} on a L{Clock}), then a relay on the throwaway
PostgreSQL of L{tests.pgenv} whose server is stopped and started again.
"""

from __future__ import annotations

import json
import os
from typing import Any

import treq
from twisted.internet import reactor
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.task import Clock
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase

from medagent.storage.sqlite.database import Database, DatabaseStopped, DatabaseUnavailable
from tests import pgenv, procs
from tests.test_e2e import hl7


class _NeverRuns:
    """A thread pool that takes work and never does it: a database stuck behind a write."""

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass

    def __init__(self) -> None:
        self.taken = 0

    def callInThreadWithCallback(self, *args: Any, **kw: Any) -> None:  # noqa: N802
        self.taken += 1


class PingTimeoutTests(SynchronousTestCase):
    def test_no_answer_within_the_timeout_is_unavailable(self) -> None:
        clock = Clock()
        db = Database(reactor, ":memory:", threadpool=_NeverRuns())
        d = db.ping(clock, timeout=2.0)
        self.assertNoResult(d)
        clock.advance(1.9)
        self.assertNoResult(d)
        clock.advance(0.1)
        self.assertIsInstance(self.failureResultOf(d, DatabaseUnavailable).value,
                              DatabaseUnavailable)
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_one_probe_in_flight_at_a_time(self) -> None:
        """A load balancer polling a stuck database does not pile probes onto its pool."""
        clock = Clock()
        pool = _NeverRuns()
        db = Database(reactor, ":memory:", threadpool=pool)
        first = db.ping(clock, timeout=2.0)
        clock.advance(1)
        second = db.ping(clock, timeout=2.0)
        self.assertEqual(pool.taken, 1)
        clock.advance(1)
        self.failureResultOf(first, DatabaseUnavailable)
        self.assertNoResult(second)
        clock.advance(1)
        self.failureResultOf(second, DatabaseUnavailable)
        self.assertEqual(pool.taken, 1)

    def test_a_stopped_database_fails_at_once(self) -> None:
        clock = Clock()
        db = Database(reactor, ":memory:", threadpool=_NeverRuns())
        db.stop()
        self.failureResultOf(db.ping(clock), DatabaseStopped)
        self.assertEqual(clock.getDelayedCalls(), [])


class _RelayCalls:
    """HTTP calls to an in-process relay (C{self.base}, C{self.pool}, C{self.token})."""

    base: str
    pool: Any
    token: str | None = None

    async def call(self, method: str, path: str, body: Any = None,
                   token: bool = True) -> tuple[int, Any, Any]:
        headers = {"Content-Type": ["application/fhir+json"]}
        if token and self.token:
            headers["Authorization"] = [f"Bearer {self.token}"]
        r = await treq.request(method, self.base + path, pool=self.pool, headers=headers,
                               data=json.dumps(body).encode() if body is not None else None)
        content = await r.content()
        try:
            parsed = json.loads(content) if content else b""
        except ValueError:
            parsed = content.decode("utf-8", "replace")
        return r.code, parsed, r.headers

    async def login(self, relay: Any) -> None:
        # on PostgreSQL the signing keys are read at start, as other start-up reads are
        await procs.wait_until(lambda: relay.authority._key is not None, timeout=10,
                               what="signing keys read")
        admin = await relay.authority.create_client("admin")
        self.token = (await relay.authority.issue_token(
            admin["clientId"], admin["clientSecret"]))["access_token"]
        self.agent = await relay.store.create(
            {"resourceType": "Agent", "name": "Lab", "status": "active"})
        # the revoked set is read at start: tokens are checked against it from then on
        await procs.wait_until(lambda: relay.authority._revoked is not None, timeout=10,
                               what="revocations read")

    async def push(self, ctrl: str) -> tuple[int, Any, Any]:
        return await self.call("POST", f"/fhir/R4/Agent/{self.agent['id']}/$push", {
            "destination": "mllp://127.0.0.1:9", "contentType": "x-application/hl7-v2+er7",
            "body": hl7(ctrl)})

    def assert_unavailable(self, code: int, body: Any, headers: Any) -> None:
        self.assertEqual(code, 503)  # type: ignore[attr-defined]
        self.assertEqual(body["resourceType"], "OperationOutcome")  # type: ignore
        self.assertEqual(body["issue"][0]["code"], "transient")  # type: ignore
        self.assertTrue(headers.getRawHeaders("Retry-After"))  # type: ignore
        text = json.dumps(body)
        for secret in ("postgresql://", "127.0.0.1", "sqlite", "medagent@"):
            self.assertNotIn(secret, text)  # type: ignore[attr-defined]


class SQLiteReadyTests(_RelayCalls, TestCase):
    timeout = 30

    def setUp(self) -> Deferred[None]:
        self.relay, self.base, self.pool = procs.in_process_relay(self, "relay-readyz-")
        return ensureDeferred(self.login(self.relay))

    def test_ready_without_a_token_for_get_and_head(self) -> Deferred:
        async def go() -> None:
            code, body, _ = await self.call("GET", "/readyz", token=False)
            self.assertEqual((code, body), (200, {"status": "ready"}))
            code, body, _ = await self.call("HEAD", "/readyz", token=False)
            self.assertEqual((code, body), (200, b""))

        return ensureDeferred(go())

    def test_not_ready_while_the_signing_keys_are_not_loaded(self) -> Deferred:
        """A cluster node reads its keys from the database after start: not ready until."""
        async def go() -> None:
            keys = self.relay.authority._key
            self.relay.authority._key = None
            code, body, headers = await self.call("GET", "/readyz", token=False)
            self.assert_unavailable(code, body, headers)
            self.assertIn("signing keys", body["issue"][0]["details"]["text"])
            self.relay.authority._key = keys
            code, _, _ = await self.call("GET", "/readyz", token=False)
            self.assertEqual(code, 200)

        return ensureDeferred(go())

    def test_a_stopped_database_is_not_ready_and_a_push_gets_503(self) -> Deferred:
        async def go() -> None:
            self.relay.db.stop()
            code, body, headers = await self.call("GET", "/readyz", token=False)
            self.assert_unavailable(code, body, headers)
            self.assertEqual(body["issue"][0]["details"]["text"],
                             "The database is unreachable")
            code, body, headers = await self.push("RZ000001")
            self.assert_unavailable(code, body, headers)

        return ensureDeferred(go())


def _pg_ctl(cluster: pgenv.Cluster, *argv: str) -> None:
    cluster._run(os.path.join(cluster.bindir, "pg_ctl"), "-D", cluster.data, "-w", "-t", "30",
                 *argv, timeout=60)


def _stop_server(cluster: pgenv.Cluster) -> None:
    _pg_ctl(cluster, "-m", "fast", "stop")


def _start_server(cluster: pgenv.Cluster) -> None:
    """The same cluster again, on the same loopback port (what the relay's URL names)."""
    options = (f"-c listen_addresses=127.0.0.1 -p {cluster.port} -k {cluster.folder}"
               " -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
               " -c max_connections=200")
    _pg_ctl(cluster, "-l", os.path.join(cluster.folder, "server.log"), "-o", options, "start")


class PostgresOutageTests(_RelayCalls, TestCase):
    timeout = 60

    def setUp(self) -> Deferred[None]:
        return ensureDeferred(self._setUp())

    async def _setUp(self) -> None:
        if pgenv._external:
            raise SkipTest("MEDAGENT_PG_DSN names a server this test must not stop")
        self.dsn = await deferToThread(pgenv.fresh_database, "medagent_readyz")
        self.cluster = pgenv._cluster
        assert self.cluster is not None
        self.relay, self.base, self.pool = procs.in_process_relay(
            self, "relay-readyz-pg-", database=self.dsn)
        await self.relay.db.start()
        await procs.wait_until(lambda: self.relay.authority.ready, what="the signing keys")
        await self.login(self.relay)

    async def journaled(self) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = await self.relay.db.run(lambda c: c.execute(
            "SELECT id, state FROM pushes ORDER BY seq").fetchall())
        return rows

    def test_outage_gives_503_and_the_relay_recovers_by_itself(self) -> Deferred:
        async def go() -> None:
            code, body, _ = await self.call("GET", "/readyz", token=False)
            self.assertEqual((code, body), (200, {"status": "ready"}))
            code, first, _ = await self.push("RZPG0001")
            self.assertEqual(code, 202)
            self.assertEqual(len(await self.journaled()), 1)

            await deferToThread(_stop_server, self.cluster)
            try:
                code, body, headers = await self.call("GET", "/readyz", token=False)
                self.assert_unavailable(code, body, headers)
                self.assertEqual(body["issue"][0]["details"]["text"],
                                 "The database is unreachable")
                code, body, headers = await self.push("RZPG0002")
                self.assert_unavailable(code, body, headers)
                code, body, headers = await self.push("RZPG0003")
                self.assert_unavailable(code, body, headers)
            finally:
                await deferToThread(_start_server, self.cluster)

            # back: the next calls are served, no restart of the relay, no retry loop here
            code, body, _ = await self.call("GET", "/readyz", token=False)
            self.assertEqual((code, body), (200, {"status": "ready"}))
            code, accepted, _ = await self.push("RZPG0004")
            self.assertEqual(code, 202)
            status_url = accepted["issue"][0]["diagnostics"]
            rows = await self.journaled()
            self.assertEqual(len(rows), 2)  # the refused pushes left no row
            self.assertTrue(status_url.endswith(rows[1]["id"]))
            self.assertEqual(rows[1]["state"], "queued")

        return ensureDeferred(go())

    def test_a_restart_between_calls_fails_no_call(self) -> Deferred:
        """The pool's idle connections died with the server: dropped before use, not used."""
        async def go() -> None:
            code, _, _ = await self.push("RZPG0101")
            self.assertEqual(code, 202)
            await deferToThread(_stop_server, self.cluster)
            await deferToThread(_start_server, self.cluster)
            code, _, _ = await self.push("RZPG0102")
            self.assertEqual(code, 202)
            code, body, _ = await self.call("GET", "/readyz", token=False)
            self.assertEqual((code, body), (200, {"status": "ready"}))
            self.assertEqual(len(await self.journaled()), 2)

        return ensureDeferred(go())

    def test_a_schema_missing_a_migration_is_not_ready(self) -> Deferred:
        async def go() -> None:
            await self.relay.db.run(lambda c: c.execute(
                "DELETE FROM schema_version WHERE version = 1"))
            try:
                code, body, headers = await self.call("GET", "/readyz", token=False)
                self.assert_unavailable(code, body, headers)
                self.assertEqual(body["issue"][0]["details"]["text"],
                                 "The database schema is not current")
            finally:
                await self.relay.db.run(lambda c: c.execute(
                    "INSERT INTO schema_version (version, applied) VALUES (1, 0)"))
            code, body, _ = await self.call("GET", "/readyz", token=False)
            self.assertEqual((code, body), (200, {"status": "ready"}))

        return ensureDeferred(go())

    def test_a_timeout_in_a_batched_write_is_unavailable(self) -> Deferred:
        """One call of a group commit hitting PostgreSQL's statement timeout: 503, not 500."""
        def slow(conn: Any) -> None:
            conn.execute("SET LOCAL statement_timeout = 50")
            conn.execute("SELECT pg_sleep(2)")

        async def go() -> None:
            d = self.relay.db.run_batched(slow)
            ok = self.relay.db.run_batched(lambda c: c.execute("SELECT 1").fetchone())
            with self.assertRaises(DatabaseUnavailable):
                await d
            self.assertEqual(await ok, {"?column?": 1})

        return ensureDeferred(go())
