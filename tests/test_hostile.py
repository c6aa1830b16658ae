"""
Hostile input against the relay's edge: each test performs the attack and checks the relay
bounds it (size, time, count), answers with a clear error and keeps serving.

Units drive the hub, the site and the limits with a Clock and StringTransport; the attacks
over the network run an in-process relay on loopback (real reactor, real sockets).
"""

from __future__ import annotations

import base64
import json
import os
import struct
import tempfile
from typing import Any

import treq
from twisted.internet import protocol, reactor
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.task import Clock, deferLater
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import HTTPConnectionPool
from twisted.web.resource import Resource

from medagent import jsonsafe, wire
from medagent.fhir import FHIRError
from medagent.relay.auth import Authority
from medagent.relay.hub import MAX_FRAMES_BEFORE_CONNECT, Hub
from medagent.relay.limits import ConnectionLimits, LoginThrottle
from medagent.relay.service import RelayService
from medagent.storage.sqlite.clients import SQLiteClientRegistry
from medagent.storage.sqlite.journal import SQLiteJournal as Journal
from medagent.storage.sqlite.store import SQLiteStore
from medagent.relay.web import RelaySite
from tests.fakes import InlineReactor, inline_database
from tests.procs import free_port, wait_until
from tests.test_hub import FakeConnection, _Wall

DEEP = b"[" * 100_000 + b"]" * 100_000


# -- units ------------------------------------------------------------------------------------


class JSONDepthTests(SynchronousTestCase):
    def test_depth_bound_exact(self) -> None:
        ok = "[" * jsonsafe.MAX_JSON_DEPTH + "]" * jsonsafe.MAX_JSON_DEPTH
        self.assertIsInstance(jsonsafe.loads(ok), list)
        deeper = "[" + ok + "]"
        e = self.assertRaises(jsonsafe.JSONInputError, jsonsafe.loads, deeper)
        self.assertIn("nested deeper", e.msg)

    def test_brackets_in_strings_do_not_count(self) -> None:
        self.assertEqual(jsonsafe.loads(json.dumps({"a": "[" * 5000})), {"a": "[" * 5000})

    def test_too_deep_for_the_interpreter(self) -> None:
        e = self.assertRaises(jsonsafe.JSONInputError, jsonsafe.loads, DEEP)
        self.assertIn("nested deeper", e.msg)

    def test_bad_utf8_and_json(self) -> None:
        self.assertRaises(jsonsafe.JSONInputError, jsonsafe.loads, b"\xff{}")
        e = self.assertRaises(jsonsafe.JSONInputError, jsonsafe.loads, '{"secret": PID|1')
        self.assertNotIn("PID", e.msg)  # the reason never quotes the input


class WireHostileTests(SynchronousTestCase):
    def test_deep_nesting_is_a_wire_error(self) -> None:
        e = self.assertRaises(wire.WireError, wire.decode, DEEP)
        self.assertIn("nested deeper", e.reason)

    def test_huge_type_not_echoed(self) -> None:
        frame = json.dumps({"type": "x" * 5_000_000, "callback": "cb"}).encode()
        e = self.assertRaises(wire.WireError, wire.decode, frame)
        self.assertLessEqual(len(e.reason), wire.MAX_REASON + 40)
        self.assertEqual(e.callback, "cb")

    def test_agent_id_must_be_an_id(self) -> None:
        frame = json.dumps({"type": wire.CONNECT_REQUEST, "accessToken": "t",
                            "agentId": "a" * 65}).encode()
        e = self.assertRaises(wire.WireError, wire.decode, frame)
        self.assertEqual(e.reason, "agentId is not a valid id")


class HubHostileTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = InlineReactor()
        self.clock.advance(1_700_000_000)
        db = inline_database(
            self, SQLiteStore.schema() + SQLiteClientRegistry.schema() + Journal.schema(),
            self.clock)
        self.store = SQLiteStore(db)
        self.auth = Authority(SQLiteClientRegistry(db), b"k" * 32, clock=_Wall(self.clock))
        self.journal = Journal(db, clock=self.clock)
        self.hub = Hub(self.clock, self.auth, self.store, self.journal, connect_timeout=10)
        self.addCleanup(self.hub.close)
        self.agent = self.successResultOf(self.store.create({"resourceType": "Agent",
                                                             "name": "lab"}))
        client = self.successResultOf(self.auth.create_client("agent", [self.agent["id"]]))
        self.agent_token = self.successResultOf(self.auth.issue_token(
            client["clientId"], client["clientSecret"]))["access_token"]

    def connect_frame(self, token: str | None = None) -> bytes:
        return wire.encode({"type": wire.CONNECT_REQUEST, "agentId": self.agent["id"],
                            "accessToken": token or self.agent_token, "callback": "c"})

    def test_deep_frame_answered_connection_kept(self) -> None:
        conn = FakeConnection()
        session = self.hub.connection_made(conn)
        self.hub.frame_received(session, self.connect_frame())
        self.hub.frame_received(session, DEEP)
        self.assertIn("nested deeper", conn.sent[-1]["body"])
        self.assertEqual(conn.sent[-1]["type"], wire.ERROR)
        self.assertIsNone(conn.closed)

    def test_unauthenticated_socket_closed_after_deadline(self) -> None:
        conn = FakeConnection()
        session = self.hub.connection_made(conn)
        self.hub.frame_received(session, self.connect_frame(token="bad"))  # refused, kept
        self.clock.advance(9.9)
        self.assertIsNone(conn.closed)
        self.clock.advance(0.2)
        self.assertEqual(conn.closed, "no valid agent:connect:request in time")

    def test_authenticated_socket_not_closed_by_deadline(self) -> None:
        conn = FakeConnection()
        authenticated = []
        conn.authenticated = lambda: authenticated.append(True)  # type: ignore[attr-defined]
        session = self.hub.connection_made(conn)
        self.hub.frame_received(session, self.connect_frame())
        self.assertEqual(authenticated, [True])
        self.clock.advance(11)
        self.assertIsNone(conn.closed)
        self.hub.frame_received(session, wire.encode({"type": wire.HEARTBEAT_REQUEST}))
        self.assertEqual(conn.sent[-1]["type"], wire.HEARTBEAT_RESPONSE)

    def test_closed_socket_cancels_deadline(self) -> None:
        session = self.hub.connection_made(FakeConnection())
        self.hub.connection_lost(session, "gone")
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_too_many_frames_before_connect(self) -> None:
        conn = FakeConnection()
        session = self.hub.connection_made(conn)
        for _ in range(MAX_FRAMES_BEFORE_CONNECT):
            self.hub.frame_received(session, b'{"type":"agent:heartbeat:request"}')
        self.assertIsNone(conn.closed)
        self.hub.frame_received(session, b'{"type":"agent:heartbeat:request"}')
        self.assertEqual(conn.closed, "too many frames before agent:connect:request")
        answered = len(conn.sent)
        self.hub.frame_received(session, self.connect_frame())
        self.assertEqual(len(conn.sent), answered)  # nothing more is read or answered


class StoreHostileTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.store = SQLiteStore(inline_database(self, SQLiteStore.schema()))

    def test_malformed_meta_is_400(self) -> None:
        for meta in ("x", [1, 2], 7, {"versionId": {"a": 1}}):
            e = self.assertRaises(FHIRError, self.store.create,
                                  {"resourceType": "Device", "meta": meta})
            self.assertEqual(e.status, 400, meta)

    def test_bad_id_is_400(self) -> None:
        for rid in ({"a": 1}, 5, "a/b", "x" * 65):
            e = self.assertRaises(FHIRError, self.store.update,
                                  {"resourceType": "Device", "id": rid})
            self.assertEqual(e.status, 400, rid)

    def test_non_string_system_is_stored(self) -> None:
        created = self.successResultOf(self.store.create(
            {"resourceType": "Device", "identifier": [{"system": {"x": 1}, "value": "v1"}],
             "code": {"coding": [{"system": [1], "code": "c"}]}}))
        found = self.successResultOf(self.store.search("Device", {"identifier": ["v1"]}))
        self.assertEqual([d["id"] for d in found], [created["id"]])


class LoginThrottleTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.throttle = LoginThrottle(self.clock, max_failures_per_client=3,
                                      max_failures_per_address=5, window=60)

    def test_per_client_window(self) -> None:
        for _ in range(3):
            self.throttle.check("c1", "10.0.0.1")
            self.throttle.failed("c1", "10.0.0.1")
            self.clock.advance(10)
        e = self.assertRaises(FHIRError, self.throttle.check, "c1", "10.0.0.2")
        self.assertEqual(e.status, 429)
        self.assertEqual(e.headers["Retry-After"], "30")  # first failure leaves at t=60
        self.throttle.check("c2", "10.0.0.2")  # another client is not affected
        self.clock.advance(30)
        self.throttle.check("c1", "10.0.0.2")

    def test_per_address(self) -> None:
        for n in range(5):
            self.throttle.failed(f"guess-{n}", "10.0.0.9")
        e = self.assertRaises(FHIRError, self.throttle.check, "anyone", "10.0.0.9")
        self.assertEqual(e.headers["Retry-After"], "60")
        self.throttle.check("anyone", "10.0.0.10")

    def test_success_clears_client_not_address(self) -> None:
        for _ in range(2):
            self.throttle.failed("c1", "10.0.0.1")
        self.throttle.succeeded("c1")
        for _ in range(2):
            self.throttle.failed("c1", "10.0.0.1")
        self.throttle.check("c1", "10.0.0.3")  # 2 < 3 after the reset
        self.throttle.failed("c1", "10.0.0.1")
        self.assertRaises(FHIRError, self.throttle.check, "other", "10.0.0.1")  # 5 from it

    def test_bounded_memory(self) -> None:
        throttle = LoginThrottle(self.clock, max_keys=100)
        for n in range(1000):
            throttle.failed(f"c{n}", f"10.0.{n // 250}.{n % 250}")
        self.assertLessEqual(len(throttle._failures), 100)


class ConnectionLimitTests(SynchronousTestCase):
    def test_global_and_per_peer(self) -> None:
        factory = protocol.Factory.forProtocol(protocol.Protocol)
        limits = ConnectionLimits(factory, max_connections=3, max_per_peer=2)
        built = []
        for host in ("10.0.0.1", "10.0.0.1", "10.0.0.1", "10.0.0.2", "10.0.0.3"):
            p = limits.buildProtocol(IPv4Address("TCP", host, 5000))
            if p is not None:
                p.makeConnection(StringTransport(peerAddress=IPv4Address("TCP", host, 5000)))
            built.append(p)
        self.assertEqual([p is not None for p in built], [True, True, False, True, False])
        built[0].connectionLost(None)
        self.assertIsNotNone(limits.buildProtocol(IPv4Address("TCP", "10.0.0.1", 5001)))


class _BodySize(Resource):
    isLeaf = True

    def render(self, request: Any) -> bytes:
        return b"%d %s" % (len(request.content.read()),
                           str(getattr(request, "too_large", None)).encode())


class PreAuthBodyTests(SynchronousTestCase):
    """A stranger cannot make the relay store a big body: only a valid token lifts 64 KiB."""

    def post(self, auth: bytes) -> bytes:
        site = RelaySite(_BodySize(), max_body=1024 * 1024, reactor=Clock())

        def check(header: str | None) -> None:
            if header != "Bearer good":
                raise FHIRError(401, "no")

        site.authenticate = check
        channel = site.buildProtocol(IPv4Address("TCP", "10.0.0.1", 5000))
        transport = StringTransport(peerAddress=IPv4Address("TCP", "10.0.0.1", 5000))
        channel.makeConnection(transport)
        body = b"x" * 300_000
        channel.dataReceived(b"POST /x HTTP/1.1\r\nHost: x\r\n" + auth
                             + b"Content-Length: %d\r\n\r\n" % len(body))
        for i in range(0, len(body), 16384):
            channel.dataReceived(body[i:i + 16384])
        return transport.value().rsplit(b"\r\n\r\n", 1)[-1]

    def test_no_token_body_not_stored(self) -> None:
        self.assertEqual(self.post(b""), b"0 True")
        self.assertEqual(self.post(b"Authorization: Bearer forged\r\n"), b"0 True")

    def test_valid_token_body_stored(self) -> None:
        self.assertEqual(self.post(b"Authorization: Bearer good\r\n"), b"300000 False")


class RequestDeadlineTests(SynchronousTestCase):
    def channel(self, clock: Clock) -> tuple[Any, StringTransport]:
        site = RelaySite(Resource(), request_timeout=30, reactor=clock)
        channel = site.buildProtocol(IPv4Address("TCP", "10.0.0.1", 5000))
        transport = StringTransport(peerAddress=IPv4Address("TCP", "10.0.0.1", 5000))
        channel.makeConnection(transport)
        return channel, transport

    def test_trickled_headers_get_408(self) -> None:
        clock = Clock()
        channel, transport = self.channel(clock)
        for byte in b"GET /healthz HTTP/1.1\r\nHost: x\r\n":
            channel.dataReceived(bytes([byte]))
            clock.advance(0.5)  # a byte every half second resets an idle timer every time
        self.assertFalse(transport.disconnecting)
        clock.advance(14)
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 408 "))
        self.assertTrue(transport.disconnecting)

    def test_trickled_body_get_408(self) -> None:
        clock = Clock()
        channel, transport = self.channel(clock)
        channel.dataReceived(b"POST /x HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n")
        for _ in range(29):
            channel.dataReceived(b"a")
            clock.advance(1)
        self.assertFalse(transport.disconnecting)
        clock.advance(2)
        self.assertIn(b"408 Request Timeout", transport.value())
        self.assertTrue(transport.disconnecting)

    def test_idle_connection_gets_408(self) -> None:
        clock = Clock()
        channel, transport = self.channel(clock)
        clock.advance(31)
        self.assertTrue(transport.disconnecting)


# -- attacks over loopback -------------------------------------------------------------------


class RawWebSocket(protocol.Protocol):
    """A minimal, deliberately misbehaving websocket client."""

    def __init__(self) -> None:
        self.buffer = b""
        self.handshake: Deferred[None] = Deferred()
        self.closed: Deferred[None] = Deferred()
        self.frames: list[tuple[int, bytes]] = []
        self._shook = False

    def connectionMade(self) -> None:
        self.transport.write(
            b"GET /ws/agent HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
            b"Connection: Upgrade\r\nSec-WebSocket-Key: " + base64.b64encode(os.urandom(16))
            + b"\r\nSec-WebSocket-Version: 13\r\n\r\n")

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        if not self._shook:
            if b"\r\n\r\n" not in self.buffer:
                return
            head, self.buffer = self.buffer.split(b"\r\n\r\n", 1)
            self._shook = True
            self.status = int(head.split(b" ")[1])
            self.handshake.callback(None)
        while len(self.buffer) >= 2:
            opcode, n = self.buffer[0] & 0x0F, self.buffer[1] & 0x7F
            start = 2
            if n == 126:
                n, start = struct.unpack("!H", self.buffer[2:4])[0], 4
            elif n == 127:
                n, start = struct.unpack("!Q", self.buffer[2:10])[0], 10
            if len(self.buffer) < start + n:
                return
            self.frames.append((opcode, self.buffer[start:start + n]))
            self.buffer = self.buffer[start + n:]

    def connectionLost(self, reason: Any) -> None:
        if not self.handshake.called:
            self.handshake.errback(reason)
        self.closed.callback(None)

    @staticmethod
    def header(length: int, opcode: int = 1) -> bytes:
        if length < 126:
            head = struct.pack("!BB", 0x80 | opcode, 0x80 | length)
        elif length < 65536:
            head = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, length)
        else:
            head = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, length)
        return head + b"\0\0\0\0"  # zero mask: payload goes as is

    def send_text(self, payload: bytes) -> None:
        self.transport.write(self.header(len(payload)) + payload)

    def messages(self) -> list[dict[str, Any]]:
        return [json.loads(p) for op, p in self.frames if op == 1]

    def close_code(self) -> int | None:
        for op, payload in self.frames:
            if op == 8 and len(payload) >= 2:
                return struct.unpack("!H", payload[:2])[0]
        return None


async def within(d: Deferred[Any], seconds: float, what: str) -> Any:
    """Wait for C{d}, failing the test (not hanging) if it takes longer."""
    d.addTimeout(seconds, reactor)
    try:
        return await d
    except Exception as e:
        raise AssertionError(f"{what}: not within {seconds}s ({e!r})")


class LiveAttacks(TestCase):
    timeout = 60

    def setUp(self) -> Deferred:
        return ensureDeferred(self._setUp())

    async def _setUp(self) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.relay = RelayService(reactor, data_dir=tempfile.mkdtemp(prefix="relay-hostile-"),
                                  listen=f"tcp:{self.port}:interface=127.0.0.1",
                                  max_body=1024 * 1024, connect_timeout=1.0,
                                  request_timeout=1.0, max_connections_per_peer=20)
        self.relay.startService()
        self.addCleanup(self.relay.stopService)
        self.pool = HTTPConnectionPool(reactor)
        self.addCleanup(self.pool.closeCachedConnections)
        self.admin = await self.relay.authority.create_client("admin")
        self.token = await self.login(self.admin)
        self.agent = await self.relay.store.create({"resourceType": "Agent", "name": "A"})
        self.agent_client = await self.relay.authority.create_client("agent",
                                                                     [self.agent["id"]])

    async def login(self, client: dict[str, Any], secret: str | None = None) -> Any:
        r = await treq.post(self.base + "/oauth2/token", data={
            "grant_type": "client_credentials", "client_id": client["clientId"],
            "client_secret": secret or client["clientSecret"]}, pool=self.pool)
        body = await r.json()
        if secret is not None:
            return r
        self.assertEqual(r.code, 200)
        return body["access_token"]

    async def raw_socket(self) -> RawWebSocket:
        ws = await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", self.port),
                                   RawWebSocket())

        async def gone() -> None:
            if not ws.closed.called:
                ws.transport.abortConnection()
                await ws.closed
            # and the relay has seen it go (no close handshake timer left behind)
            await wait_until(lambda: not self.relay.hub.sessions, timeout=5,
                             what="relay forgets the socket")

        self.addCleanup(lambda: ensureDeferred(gone()))
        await within(ws.handshake, 5, "websocket handshake")
        return ws

    def test_big_frame_before_connect_closed_1009(self) -> None:
        async def go() -> None:
            ws = await self.raw_socket()
            self.assertEqual(ws.status, 101)
            # announce 1 MiB, send 100 KiB of it: refused at the header, nothing buffered
            ws.transport.write(RawWebSocket.header(1024 * 1024) + b" " * 100_000)
            await within(ws.closed, 5, "socket closed after an oversize pre-auth frame")
            self.assertEqual(self.relay.hub.sessions, {})

        return ensureDeferred(go())

    def test_normal_limit_after_connect(self) -> None:
        async def go() -> None:
            ws = await self.raw_socket()
            token = await self.login(self.agent_client)
            ws.send_text(wire.encode({"type": wire.CONNECT_REQUEST, "agentId": self.agent["id"],
                                      "accessToken": token, "callback": "c1"}))
            await wait_until(lambda: ws.messages(), timeout=5, what="connect response")
            self.assertEqual(ws.messages()[0]["type"], wire.CONNECT_RESPONSE)
            big = wire.encode({"type": wire.HEARTBEAT_REQUEST, "pad": "x" * 200_000})
            ws.send_text(big)
            await wait_until(lambda: len(ws.messages()) >= 2, timeout=5, what="heartbeat answer")
            self.assertEqual(ws.messages()[1]["type"], wire.HEARTBEAT_RESPONSE)
            await deferLater(reactor, 1.5, lambda: None)  # past the connect deadline
            self.assertFalse(ws.closed.called)

        return ensureDeferred(go())

    def test_silent_socket_closed_after_connect_deadline(self) -> None:
        async def go() -> None:
            ws = await self.raw_socket()
            # the deadline (1 s here), then autobahn's close handshake timeout (5 s)
            await within(ws.closed, 10, "unauthenticated silent socket closed")
            self.assertEqual(ws.close_code(), 4000)

        return ensureDeferred(go())

    def test_long_type_not_echoed(self) -> None:
        async def go() -> None:
            ws = await self.raw_socket()
            ws.send_text(json.dumps({"type": "t" * 60_000, "callback": "cb"}).encode())
            await wait_until(lambda: ws.messages(), timeout=5, what="agent:error")
            error = ws.messages()[0]
            self.assertEqual((error["type"], error["callback"]), (wire.ERROR, "cb"))
            self.assertLess(len(error["body"]), 300)
            self.assertFalse(ws.closed.called)

        return ensureDeferred(go())

    def test_pending_websockets_capped_per_peer(self) -> None:
        async def go() -> None:
            ws_factory = self.relay.site.resource.children[b"ws"].children[b"agent"]._factory
            ws_factory.max_pending_per_peer = 3
            sockets = [await self.raw_socket() for _ in range(3)]
            self.assertEqual([s.status for s in sockets], [101] * 3)
            refused = await self.raw_socket()
            self.assertEqual(refused.status, 503)
            sockets[0].transport.loseConnection()
            await within(sockets[0].closed, 5, "close")
            await wait_until(lambda: ws_factory.pending_total == 2, timeout=5,
                             what="pending count drops")
            again = await self.raw_socket()
            self.assertEqual(again.status, 101)

        return ensureDeferred(go())

    def test_connections_capped_per_peer(self) -> None:
        async def go() -> None:
            await self.pool.closeCachedConnections()
            held = []
            for _ in range(20):
                p = await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", self.port),
                                          _Recorder())
                held.append(p)
                self.addCleanup(p.transport.abortConnection)
            extra = await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", self.port),
                                          _Recorder())
            self.addCleanup(extra.transport.abortConnection)
            await within(extra.lost, 5, "connection over the per-address cap closed")
            self.assertEqual(extra.data, b"")
            self.assertFalse(held[0].lost.called)

        return ensureDeferred(go())

    def test_slow_sender_cut_off(self) -> None:
        async def go() -> None:
            p = await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", self.port),
                                      _Recorder())
            self.addCleanup(p.transport.abortConnection)
            request = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Pad: " + b"a" * 100
            for byte in request:
                if p.lost.called:
                    break
                p.transport.write(bytes([byte]))
                await deferLater(reactor, 0.05, lambda: None)
            await within(p.lost, 5, "trickling connection closed")
            self.assertTrue(p.data.startswith(b"HTTP/1.1 408"), p.data[:100])

        return ensureDeferred(go())

    def test_deep_json_everywhere_is_400(self) -> None:
        async def go() -> None:
            deep = b"[" * 50_000 + b"]" * 50_000
            headers = {"Authorization": [f"Bearer {self.token}"],
                       "Content-Type": ["application/fhir+json"]}
            for path in ("/fhir/R4/Device", f"/fhir/R4/Agent/{self.agent['id']}/$push"):
                r = await treq.post(self.base + path, data=deep, headers=headers,
                                    pool=self.pool)
                body = await r.json()
                self.assertEqual((r.code, body["resourceType"]), (400, "OperationOutcome"))
                self.assertIn("nested deeper", body["issue"][0]["details"]["text"])
            r = await treq.post(self.base + "/oauth2/token", data=deep[49_000:-49_000],
                                headers={"Content-Type": ["application/json"]}, pool=self.pool)
            self.assertEqual(r.code, 400)
            self.assertEqual((await r.json())["resourceType"], "OperationOutcome")
            for meta in ('"x"', "[1]", '{"versionId": {}}'):
                r = await treq.post(self.base + "/fhir/R4/Device", headers=headers,
                                    data=b'{"resourceType":"Device","meta":' + meta.encode()
                                    + b"}", pool=self.pool)
                self.assertEqual(r.code, 400, meta)
                self.assertEqual((await r.json())["resourceType"], "OperationOutcome")
            r = await treq.get(self.base + "/healthz", pool=self.pool)
            self.assertEqual(r.code, 200)
            await r.content()

        return ensureDeferred(go())

    def test_big_body_without_token_is_401(self) -> None:
        async def go() -> None:
            device = {"resourceType": "Device", "url": "mllp://127.0.0.1:1",
                      "note": [{"text": "x" * 200_000}]}
            for auth in (None, "Bearer forged", f"Bearer {self.token}"):
                headers = {"Content-Type": ["application/fhir+json"]}
                if auth:
                    headers["Authorization"] = [auth]
                r = await treq.post(self.base + "/fhir/R4/Device", pool=self.pool,
                                    data=json.dumps(device).encode(), headers=headers)
                # not read, and still a 401 (not 413), so a client refreshes its token
                self.assertEqual(r.code, 201 if auth and self.token in auth else 401, auth)
                await r.content()

        return ensureDeferred(go())

    def test_token_failures_rate_limited(self) -> None:
        async def go() -> None:
            clock = Clock()
            self.relay.api.login_throttle = LoginThrottle(
                clock, max_failures_per_client=5, max_failures_per_address=8, window=60)
            for _ in range(5):
                r = await self.login(self.admin, secret="wrong")
                self.assertEqual(r.code, 401)
                await r.content()
            r = await self.login(self.admin, secret="wrong")
            self.assertEqual(r.code, 429)
            self.assertEqual(r.headers.getRawHeaders("retry-after"), ["60"])
            await r.content()
            # locked out even with the right secret, until the window passes
            r = await self.login(self.admin, secret=self.admin["clientSecret"])
            self.assertEqual(r.code, 429)
            await r.content()
            # another client from the same address still logs in (address limit is 8)
            self.assertTrue(await self.login(self.agent_client))
            clock.advance(61)
            self.assertTrue(await self.login(self.admin))

        return ensureDeferred(go())


class _Recorder(protocol.Protocol):
    def __init__(self) -> None:
        self.data = b""
        self.lost: Deferred[None] = Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason: Any) -> None:
        self.lost.callback(None)


class BotInputDepthTests(SynchronousTestCase):
    """Deep JSON from a device (channel message) or a caller ($execute) reaches bots parsed
    with the same depth bound: never a RecursionError."""

    def test_deep_channel_json_is_given_as_text(self) -> None:
        from medagent.relay.bots import parse_input

        deep = "[" * 100_000 + "]" * 100_000
        self.assertEqual(parse_input("application/json", deep), deep)
        self.assertEqual(parse_input("application/json", '{"a": [1]}'), {"a": [1]})
