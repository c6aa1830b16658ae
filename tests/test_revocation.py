"""
Revoking a client: its tokens stop at once (REST and websocket), its live agent sockets are
closed, its reconnect is refused; agent sessions are re-checked on every heartbeat tick.
Units with a Clock and a fake connection, the HTTP API in-process, and the CLI against real
``twistd`` relay and agent processes.
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any, Callable

import treq
from twisted.internet import reactor
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase

from medagent import wire
from medagent.fhir import FHIRError
from medagent.relay.auth import Authority
from medagent.relay.hub import Hub
from medagent.storage.sqlite.clients import SQLiteClientRegistry
from medagent.storage.sqlite.database import Database
from medagent.storage.sqlite.journal import SQLiteJournal
from medagent.storage.sqlite.store import SQLiteStore
from tests import procs
from tests.fakes import InlineReactor, inline_database
from tests.test_hub import FakeConnection, _Wall


class _HeldThreadPool:
    """A thread pool whose work waits until the test releases it (a slow database)."""

    def __init__(self) -> None:
        self.held: list[tuple[Callable[..., Any], Callable[..., Any], tuple[Any, ...]]] = []

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass

    def callInThread(self, f: Callable[..., Any], *a: Any) -> None:
        f(*a)

    def callInThreadWithCallback(self, onResult: Callable[[bool, Any], None],
                                 f: Callable[..., Any], *a: Any) -> None:
        self.held.append((onResult, f, a))

    def release(self) -> None:
        while self.held:
            onResult, f, a = self.held.pop(0)
            try:
                result = f(*a)
            except BaseException:
                onResult(False, Failure())
            else:
                onResult(True, result)


def token_of(testcase: SynchronousTestCase, auth: Authority, client: dict[str, Any]) -> str:
    return testcase.successResultOf(
        auth.issue_token(client["clientId"], client["clientSecret"]))["access_token"]


class AuthorityRevocation(SynchronousTestCase):
    def setUp(self) -> None:
        self.db = inline_database(self, SQLiteClientRegistry.schema())
        self.auth = Authority(SQLiteClientRegistry(self.db), b"k" * 32)

    def test_revoked_token_fails_at_once(self) -> None:
        client = self.successResultOf(self.auth.create_client("pusher", ["a1"]))
        token = token_of(self, self.auth, client)
        self.auth.verify_token(token)
        self.successResultOf(self.auth.revoke_client(client["clientId"]))
        e = self.assertRaises(FHIRError, self.auth.authenticate, "Bearer " + token)
        self.assertEqual((e.status, e.message), (401, "Access token revoked"))
        f = self.failureResultOf(self.auth.issue_token(client["clientId"],
                                                       client["clientSecret"]), FHIRError)
        self.assertEqual(f.value.status, 401)

    def test_revoked_before_its_database_write(self) -> None:
        pool = _HeldThreadPool()
        folder = tempfile.mkdtemp(prefix="medagent-test-")
        db = Database(InlineReactor(), os.path.join(folder, "t.sqlite"),
                      schema=SQLiteClientRegistry.schema(), threadpool=pool)
        db.start()
        self.addCleanup(db.stop)
        auth = Authority(SQLiteClientRegistry(db), b"k" * 32)
        created = auth.create_client("agent", ["a1"])
        pool.release()
        client = self.successResultOf(created)
        issued = auth.issue_token(client["clientId"], client["clientSecret"])
        pool.release()
        token = self.successResultOf(issued)["access_token"]
        # the revoked set is not read yet: refused (503), never let through unchecked
        e = self.assertRaises(FHIRError, auth.verify_token, token)
        self.assertEqual(e.status, 503)
        pool.release()
        auth.verify_token(token)
        revoked = auth.revoke_client(client["clientId"])
        self.assertNoResult(revoked)  # the database write is still held...
        e = self.assertRaises(FHIRError, auth.verify_token, token)  # ...the token fails already
        self.assertEqual(e.status, 401)
        pool.release()
        self.successResultOf(revoked)

    def test_unknown_client(self) -> None:
        f = self.failureResultOf(self.auth.revoke_client("nope"), FHIRError)
        self.assertEqual(f.value.status, 404)
        self.assertFalse(self.auth.is_revoked("nope"))

    def test_revocation_by_another_writer_is_picked_up(self) -> None:
        client = self.successResultOf(self.auth.create_client("agent", ["a1"]))
        token = token_of(self, self.auth, client)
        self.auth.verify_token(token)
        heard: list[str] = []
        self.auth.revocation_listeners.append(heard.append)
        # another relay node, or `medagent client revoke --data`, on the same database
        Authority(SQLiteClientRegistry(self.db), b"k" * 32).revoke_client_sync(client["clientId"])
        self.assertEqual(self.successResultOf(self.auth.refresh_revocations()), 1)
        self.assertEqual(heard, [client["clientId"]])
        e = self.assertRaises(FHIRError, self.auth.verify_token, token)
        self.assertEqual(e.status, 401)


class HubRevocation(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = InlineReactor()
        self.clock.advance(1_700_000_000)
        db = inline_database(self, SQLiteStore.schema() + SQLiteClientRegistry.schema()
                             + SQLiteJournal.schema(), self.clock)
        self.store = SQLiteStore(db)
        self.auth = Authority(SQLiteClientRegistry(db), b"k" * 32, clock=_Wall(self.clock),
                              token_lifetime=60)
        self.hub = Hub(self.clock, self.auth, self.store, SQLiteJournal(db, clock=self.clock),
                       heartbeat_interval=10)
        self.addCleanup(self.hub.close)
        self.agent = self.successResultOf(self.store.create({"resourceType": "Agent"}))
        self.client = self.successResultOf(self.auth.create_client("agent", [self.agent["id"]]))

    def connect(self, token: str, capabilities: tuple[str, ...] = ()
                ) -> tuple[FakeConnection, Any]:
        conn = FakeConnection()
        session = self.hub.connection_made(conn)
        self.hub.frame_received(session, wire.encode({
            "type": wire.CONNECT_REQUEST, "accessToken": token, "agentId": self.agent["id"],
            **({"capabilities": list(capabilities)} if capabilities else {})}))
        return conn, session

    def test_revoked_agent_is_disconnected_and_refused(self) -> None:
        token = token_of(self, self.auth, self.client)
        conn, session = self.connect(token)
        self.assertTrue(self.hub.is_connected(self.agent["id"]))
        other = self.successResultOf(self.auth.create_client("pusher", ["*"]))
        self.successResultOf(self.auth.revoke_client(other["clientId"]))
        self.assertIsNone(conn.closed)  # another client's revocation changes nothing here
        self.successResultOf(self.auth.revoke_client(self.client["clientId"]))
        self.assertEqual(conn.closed, "client revoked")
        self.assertEqual(conn.of_type(wire.ERROR)[-1]["body"],
                         "Connection closed: client revoked")
        self.assertFalse(self.hub.is_connected(self.agent["id"]))
        self.assertEqual(self.hub.status(self.agent["id"])["status"], "disconnected")
        conn2, _ = self.connect(token)
        self.assertEqual(conn2.of_type(wire.ERROR)[0]["body"], "Access token revoked")
        self.assertEqual(conn2.of_type(wire.CONNECT_RESPONSE), [])
        self.assertFalse(self.hub.is_connected(self.agent["id"]))

    def test_expired_token_ends_the_session_on_a_heartbeat(self) -> None:
        """For an agent that announced it refreshes its token in-band (ours)."""
        conn, session = self.connect(token_of(self, self.auth, self.client),
                                     (wire.CAP_TOKEN_REFRESH,))
        for _ in range(6):  # 60 s lifetime + 5 s leeway, ticks every 10 s, agent answering
            self.clock.advance(10)
            self.hub.frame_received(session, wire.encode(wire.heartbeat_response()))
        self.assertIsNone(conn.closed)
        self.clock.advance(10)
        self.assertEqual(conn.closed, "access token expired")
        self.assertFalse(self.hub.is_connected(self.agent["id"]))
        # a fresh token connects again
        conn2, _ = self.connect(token_of(self, self.auth, self.client))
        self.assertTrue(self.hub.is_connected(self.agent["id"]))

    def push(self, control_id: str) -> Deferred[Any]:
        from medagent.relay.push import PushService

        admin = self.successResultOf(self.auth.create_client("admin"))
        device = self.successResultOf(self.store.create({"resourceType": "Device",
                                                         "url": "mllp://127.0.0.1:2575"}))
        return PushService(self.hub, self.store, self.hub.journal, self.clock).push(
            self.auth.verify_token(token_of(self, self.auth, admin)), (self.agent["id"], None),
            {"destination": f"Device/{device['id']}", "contentType": "x-application/hl7-v2+er7",
             "body": f"MSH|^~\\&|A|B|C|D|2024||ADT^A01|{control_id}|P|2.5"})

    def test_plain_agent_keeps_its_session_past_expiry_until_revoked(self) -> None:
        """
        Medplum's agent sends a token only with inbound messages: as on Medplum, an expired
        token does not end its established session (pushes in flight are not put in doubt),
        and revoking its client does, at once.
        """
        conn, session = self.connect(token_of(self, self.auth, self.client))
        self.successResultOf(self.push("C1"))
        for _ in range(30):  # 300 s, far past the 60 s lifetime
            self.clock.advance(10)
            self.hub.frame_received(session, wire.encode(wire.heartbeat_response()))
        self.assertIsNone(conn.closed)
        self.assertTrue(self.hub.is_connected(self.agent["id"]))
        self.successResultOf(self.auth.revoke_client(self.client["clientId"]))
        self.assertEqual(conn.closed, "client revoked")

    def test_fresh_token_on_a_heartbeat_keeps_the_session(self) -> None:
        conn, session = self.connect(token_of(self, self.auth, self.client),
                                     (wire.CAP_TOKEN_REFRESH,))
        for _ in range(20):  # 200 s: each heartbeat request carries a fresh token
            self.clock.advance(10)
            self.hub.frame_received(session, wire.encode({
                "type": wire.HEARTBEAT_REQUEST,
                "accessToken": token_of(self, self.auth, self.client)}))
            self.hub.frame_received(session, wire.encode(wire.heartbeat_response()))
        self.assertIsNone(conn.closed)
        # a token of another client on a heartbeat changes nothing
        other = self.successResultOf(self.auth.create_client("agent", [self.agent["id"]]))
        self.hub.frame_received(session, wire.encode({
            "type": wire.HEARTBEAT_REQUEST, "accessToken": token_of(self, self.auth, other)}))
        self.assertEqual(session.principal.client_id, self.client["clientId"])

    def test_fresh_token_in_band_keeps_the_session(self) -> None:
        conn, session = self.connect(token_of(self, self.auth, self.client))
        self.clock.advance(50)
        fresh = token_of(self, self.auth, self.client)
        self.hub.frame_received(session, wire.encode({
            "type": wire.TRANSMIT_REQUEST, "accessToken": fresh, "channel": "c",
            "remote": "x", "contentType": "text/plain", "body": "b", "callback": "cb1"}))
        for _ in range(6):  # to t=110: past the first token's expiry (65), not the fresh one's
            self.clock.advance(10)
            self.hub.frame_received(session, wire.encode(wire.heartbeat_response()))
        self.assertIsNone(conn.closed)
        self.assertTrue(self.hub.is_connected(self.agent["id"]))

    def test_inbound_with_another_clients_token_refused(self) -> None:
        conn, session = self.connect(token_of(self, self.auth, self.client))
        pusher = self.successResultOf(self.auth.create_client("pusher", [self.agent["id"]]))
        self.hub.frame_received(session, wire.encode({
            "type": wire.TRANSMIT_REQUEST, "accessToken": token_of(self, self.auth, pusher),
            "channel": "c", "remote": "x", "contentType": "text/plain", "body": "b",
            "callback": "cb1"}))
        self.assertEqual(conn.of_type(wire.ERROR)[-1],
                         {"type": wire.ERROR, "callback": "cb1",
                          "body": f"This access token cannot act as Agent/{self.agent['id']}"})


class RevokeOffline(SynchronousTestCase):
    """`medagent client revoke --data` for a relay that is not running."""

    def run_cli(self, *argv: str) -> tuple[int, str]:
        import io
        import sys

        from medagent.cli import main

        out = io.StringIO()
        self.patch(sys, "stdout", out)
        self.patch(sys, "stderr", io.StringIO())
        return main(list(argv)), out.getvalue()

    def test_revoke_in_the_database(self) -> None:
        data = tempfile.mkdtemp(prefix="medagent-cli-")
        self.assertEqual(self.run_cli("init", "--data", data)[0], 0)
        rc, out = self.run_cli("client", "create", "--data", data, "--role", "pusher",
                               "--agent", "a1")
        client_id = json.loads(out)["clientId"]
        rc, out = self.run_cli("client", "revoke", client_id, "--data", data)
        self.assertEqual((rc, json.loads(out)), (0, {"clientId": client_id, "revoked": True}))
        rc, out = self.run_cli("client", "list", "--data", data)
        self.assertEqual([c["revoked"] for c in json.loads(out) if c["clientId"] == client_id],
                         [True])
        self.assertEqual(self.run_cli("client", "revoke", "nope", "--data", data)[0], 2)
        self.assertEqual(self.run_cli("client", "revoke", client_id, "--data",
                                      data + "-missing")[0], 2)

    def test_through_the_relay_needs_admin_credentials(self) -> None:
        self.patch(os, "environ", {})
        self.assertEqual(self.run_cli("client", "revoke", "x", "--relay", "http://127.0.0.1:1",
                                      "--client-id", "")[0], 2)


class RevokeOverHTTP(TestCase):
    timeout = 60

    def setUp(self) -> Deferred:
        return ensureDeferred(self._setUp())

    async def _setUp(self) -> None:
        self.relay, self.base, self.pool = procs.in_process_relay(self, "relay-revoke-")
        self.agent = await self.relay.store.create({"resourceType": "Agent"})

    async def token(self, client: dict[str, Any]) -> str:
        r = await treq.post(self.base + "/oauth2/token", data={
            "grant_type": "client_credentials", "client_id": client["clientId"],
            "client_secret": client["clientSecret"]}, pool=self.pool)
        self.assertEqual(r.code, 200)
        return (await r.json())["access_token"]

    async def call(self, token: str, method: str, path: str) -> tuple[int, Any]:
        r = await treq.request(method, self.base + path, pool=self.pool,
                               headers={"Authorization": [f"Bearer {token}"]})
        return r.code, json.loads(await r.content())

    def test_revoke_then_old_token_401(self) -> Deferred:
        async def go() -> None:
            admin = await self.token(await self.relay.authority.create_client("admin"))
            pusher = await self.relay.authority.create_client("pusher", [self.agent["id"]])
            old = await self.token(pusher)
            path = f"/fhir/R4/Agent/{self.agent['id']}"
            self.assertEqual((await self.call(old, "GET", path))[0], 200)
            revoke = f"/fhir/R4/ClientApplication/{pusher['clientId']}/$revoke"
            self.assertEqual((await self.call(old, "POST", revoke))[0], 403)  # not an admin
            self.assertEqual((await self.call(admin, "GET", revoke))[0], 405)
            code, outcome = await self.call(admin, "POST", revoke)
            self.assertEqual(code, 200, outcome)
            code, outcome = await self.call(old, "GET", path)
            self.assertEqual((code, outcome["issue"][0]["details"]["text"]),
                             (401, "Access token revoked"))
            r = await treq.post(self.base + "/oauth2/token", data={
                "grant_type": "client_credentials", "client_id": pusher["clientId"],
                "client_secret": pusher["clientSecret"]}, pool=self.pool)
            self.assertEqual(r.code, 401)
            await r.content()
            code, _ = await self.call(admin, "POST", "/fhir/R4/ClientApplication/nope/$revoke")
            self.assertEqual(code, 404)
            clients = await self.relay.authority.list_clients()
            self.assertEqual([c["revoked"] for c in clients if c["clientId"] ==
                              pusher["clientId"]], [True])

        return ensureDeferred(go())


class RevokeWithTheCLI(TestCase):
    """`medagent client revoke` against a real relay, with a real agent connected."""

    timeout = 120

    def test_cli_revoke_disconnects_the_agent_and_refuses_its_reconnect(self) -> Deferred:
        async def go() -> None:
            relay = procs.RelayFixture(self)
            admin_creds = relay.create_client("admin")
            await relay.start()
            from medagent.client import MedagentClient

            admin = MedagentClient(reactor, relay.url, admin_creds["clientId"],
                                   admin_creds["clientSecret"])
            self.addCleanup(admin.close)
            agent = await admin.create({"resourceType": "Agent", "name": "A",
                                        "status": "active"})
            creds = relay.create_client("agent", [agent["id"]])
            agent_proc = procs.agent_process(self, relay.url, creds, agent["id"])
            await agent_proc.wait_for(f"Connected to the relay as Agent/{agent['id']}",
                                      timeout=30)

            async def status() -> str:
                params = await admin.request_json("GET",
                                                  f"/fhir/R4/Agent/{agent['id']}/$status")
                return params["parameter"][0]["valueCode"]

            await procs.wait_until(lambda: ensureDeferred(status()).addCallback(
                lambda s: s == "connected"), timeout=30, what="agent connected")
            cli = procs.python(self, "cli", [
                "-m", "medagent.cli", "client", "revoke", creds["clientId"],
                "--relay", relay.url], env={"MEDAGENT_CLIENT_ID": admin_creds["clientId"],
                                            "MEDAGENT_CLIENT_SECRET": admin_creds["clientSecret"]})
            await cli.ended
            self.assertEqual(cli.exit_code, 0, cli.text)
            self.assertEqual(json.loads(cli.text), {"clientId": creds["clientId"],
                                                    "revoked": True})
            # the relay answered only after closing the socket: disconnected already
            self.assertEqual(await status(), "disconnected")
            await agent_proc.wait_for("Connection closed: client revoked", timeout=20)
            # it reconnects by itself and is refused with its old token
            await agent_proc.wait_for("Relay says: Access token revoked", timeout=30)
            self.assertEqual(await status(), "disconnected")
            self.assertEqual(agent_proc.count("Connected to the relay as"), 1)
            await relay.proc.wait_for(f"Client {creds['clientId']} revoked by", timeout=5)

        return ensureDeferred(go())
