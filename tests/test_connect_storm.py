"""
What keeps a connect storm (a whole fleet reconnecting after a relay restart) converging:
the relay's accept gate, heartbeats spread over the interval, our agent's backoff.
Measured at scale by C{bench/connect_storm.py}; these are the units, on a Clock.
"""

from __future__ import annotations

from typing import Any

from autobahn.websocket import protocol as _autobahn_protocol
from twisted.application.internet import ClientService
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, succeed
from twisted.internet.error import ConnectionDone
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase

from medagent import wire
from medagent.agent.uplink import RelayBackoff, medplum_backoff, uplink_service
from medagent.relay.hub import AGENT_CACHE_TTL
from medagent.relay.ws import DEFAULT_MAX_PENDING, AcceptGate, websocket_resource
from tests.procs import in_process_relay, wait_until
from tests.test_hub import FakeConnection, _HubCase

HANDSHAKE = (b"GET /ws/agent HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
             b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
             b"Sec-WebSocket-Version: 13\r\n\r\n")


class FakePort:
    """The part of a listening L{twisted.internet.tcp.Port} the gate uses."""

    def __init__(self) -> None:
        self.reading = True
        self.connected = True
        self.disconnecting = False

    def stopReading(self) -> None:  # noqa: N802 (Twisted's name)
        self.reading = False

    def startReading(self) -> None:  # noqa: N802
        self.reading = True


class AcceptGateTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.gate = AcceptGate(self.clock, high=4, low=2, max_pause=1.0)
        self.port = FakePort()
        self.gate.add_port(self.port)

    def test_pauses_at_the_limit_and_resumes_below_low(self) -> None:
        for n in (1, 2, 3):
            self.gate.changed(n)
            self.assertTrue(self.port.reading)
        self.gate.changed(4)
        self.assertFalse(self.port.reading)
        self.gate.changed(3)
        self.gate.changed(2)
        self.assertFalse(self.port.reading)  # hysteresis: not until below low
        self.gate.changed(1)
        self.assertTrue(self.port.reading)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(self.gate.pauses, 1)

    def test_a_pause_ends_after_max_pause(self) -> None:
        """HTTP callers queued behind a storm wait at most max_pause."""
        self.gate.changed(4)
        self.clock.advance(1.0)
        self.assertTrue(self.port.reading)
        self.gate.changed(4)  # still at the limit: open as long again (refusing beyond it)
        self.assertTrue(self.port.reading)
        self.clock.advance(1.0)
        self.gate.changed(5)
        self.assertFalse(self.port.reading)
        self.assertEqual(self.gate.pauses, 2)

    def test_port_bound_while_paused_starts_paused(self) -> None:
        self.gate.changed(4)
        late = FakePort()
        self.gate.add_port(late)
        self.assertFalse(late.reading)
        self.gate.changed(0)
        self.assertTrue(late.reading)

    def test_closed_port_not_restarted(self) -> None:
        self.gate.changed(4)
        self.port.connected = False
        self.gate.changed(0)
        self.assertFalse(self.port.reading)

    def test_stop_leaves_no_timer(self) -> None:
        self.gate.changed(4)
        self.gate.stop()
        self.assertEqual(self.clock.getDelayedCalls(), [])


class _Hub:
    """What the websocket adapter needs of the hub before authentication."""

    max_message_size = 1024 * 1024

    def connection_made(self, conn: Any) -> object:
        return object()

    def connection_lost(self, session: Any, reason: str = "closed") -> None:
        pass


class GatedSocketTests(SynchronousTestCase):
    """The websocket factory tells the gate each change of the pending-socket count."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.gate = AcceptGate(self.clock, high=2, low=1)
        self.port = FakePort()
        self.gate.add_port(self.port)
        self.resource = websocket_resource(self.clock, _Hub(), max_pending=2, gate=self.gate)
        self.factory = self.resource._factory
        # no autobahn timers on the global reactor in a unit test
        self.factory.setProtocolOptions(openHandshakeTimeout=0, closeHandshakeTimeout=0)

    def open_socket(self, host: str) -> Any:
        proto = self.factory.buildProtocol(IPv4Address("TCP", host, 5000))
        transport = StringTransport(peerAddress=IPv4Address("TCP", host, 5000))
        proto.makeConnection(transport)
        proto.dataReceived(HANDSHAKE)
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 101"), transport.value()[:60])
        return proto

    def test_refused_before_autobahn_builds_a_protocol(self) -> None:
        """Beyond the limit a socket costs an HTTP parse and a 503, no websocket protocol."""
        from twisted.web.test.requesthelper import DummyRequest

        self.open_socket("127.0.0.2")
        self.open_socket("127.0.0.3")
        built: list[Any] = []
        self.patch(self.factory, "buildProtocol", lambda addr: built.append(addr))
        request = DummyRequest([b""])
        request.client = IPv4Address("TCP", "127.0.0.4", 5000)
        body = self.resource.render(request)
        self.assertEqual((request.responseCode, built), (503, []))
        self.assertEqual(request.responseHeaders.getRawHeaders(b"Retry-After"), [b"5"])
        self.assertIn(b"Too many unauthenticated", body)
        self.assertEqual(self.factory.refused, 1)

    def test_handshake_does_not_pretty_print(self) -> None:
        """autobahn's per-connection debug line costs nothing while debug is not logged."""
        import pprint

        printed: list[Any] = []
        real = pprint.PrettyPrinter.pformat
        self.patch(pprint.PrettyPrinter, "pformat",
                   lambda printer, value: printed.append(value) or real(printer, value))
        self.open_socket("127.0.0.2")
        self.assertEqual(printed, [])
        self.assertIn("openHandshakeTimeout", str(_autobahn_protocol.pformat(
            [("openHandshakeTimeout", 0)])))  # and a line that is shown still says it

    def test_listeners_pause_while_sockets_wait_to_authenticate(self) -> None:
        first = self.open_socket("127.0.0.2")
        self.assertTrue(self.port.reading)
        second = self.open_socket("127.0.0.3")
        self.assertFalse(self.port.reading)
        self.assertEqual(self.factory.pending_total, 2)
        first.authenticated()  # the hub accepted it: one waits, below the limit
        self.assertEqual(self.factory.pending_total, 1)
        self.assertFalse(self.port.reading)  # not yet below low
        second.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(self.factory.pending_total, 0)
        self.assertTrue(self.port.reading)


class RelayWiringTests(TestCase):
    def test_relay_gates_its_listening_ports(self) -> Deferred[None]:
        relay, _, _ = in_process_relay(self, "medagent-gate-")

        async def go() -> None:
            await wait_until(lambda: relay.accept_gate.ports, timeout=10,
                             what="the listener's port handed to the gate")
            self.assertEqual(relay.accept_gate.ports, [relay.listener.port])
            self.assertEqual(relay.accept_gate.high, DEFAULT_MAX_PENDING)

        return Deferred.fromCoroutine(go())


class _RefusingRelay:
    """An endpoint whose every connection opens, then is lost (a relay refusing the agent)."""

    def __init__(self) -> None:
        self.protocols: list[Any] = []

    def connect(self, factory: Any) -> Deferred[Any]:
        proto = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 8103))
        proto.makeConnection(StringTransport())
        self.protocols.append(proto)
        return succeed(proto)


class AgentBackoffTests(SynchronousTestCase):
    def test_refused_sockets_back_off_further(self) -> None:
        """
        ClientService counts attempts from the last TCP connect; a relay that accepts TCP
        and then refuses the websocket must still see the agent's delay grow.
        """
        clock = Clock()
        backoff = medplum_backoff(rng=lambda low, high: 2.0)
        relay = _RefusingRelay()
        service = ClientService(relay, Factory.forProtocol(Protocol),  # type: ignore[arg-type]
                                retryPolicy=backoff, clock=clock)
        service.startService()
        delays = []
        for _ in range(4):
            relay.protocols[-1].connectionLost(Failure(ConnectionDone()))
            (retry,) = clock.getDelayedCalls()
            delays.append(round(retry.getTime() - clock.seconds(), 3))
            clock.advance(retry.getTime() - clock.seconds())
        self.assertEqual(delays, [2.0, 2.6, 3.38, 4.394])
        backoff.accepted()  # the relay took us: a later loss starts from the base again
        relay.protocols[-1].connectionLost(Failure(ConnectionDone()))
        (retry,) = clock.getDelayedCalls()
        self.assertEqual(retry.getTime() - clock.seconds(), 2.0)
        service.stopService()

    def test_capped_and_random_base(self) -> None:
        bases = {medplum_backoff().base for _ in range(20)}
        self.assertGreater(len(bases), 1)
        self.assertTrue(all(1.0 <= b <= 5.0 for b in bases))
        backoff = medplum_backoff(rng=lambda low, high: 5.0)
        self.assertEqual([backoff(1) for _ in range(5)][-1], 10.0)

    def test_uplink_resets_its_backoff_when_accepted(self) -> None:
        class App:
            max_message_size = 1024 * 1024

            def __init__(self) -> None:
                self.on_live: list[Any] = []

        app = App()
        uplink_service(Clock(), "http://127.0.0.1:8103", app)  # type: ignore[arg-type]
        (hook,) = app.on_live
        self.assertIsInstance(hook.__self__, RelayBackoff)
        self.assertEqual(hook.__name__, "accepted")


class HeartbeatPhaseTests(_HubCase):
    """Sessions accepted in one tick (a storm) beat at phases spread over the interval."""

    def beats(self, conn: Any) -> int:
        return len(conn.of_type(wire.HEARTBEAT_REQUEST))

    def test_first_heartbeat_at_the_sessions_phase(self) -> None:
        phases = iter([0.0, 0.8])
        self.hub.heartbeat_phase = lambda: next(phases)
        early, _ = self.connect(caps=["durable"])
        other_agent = self.successResultOf(self.store.create({"resourceType": "Agent",
                                                              "name": "b"}))
        client = self.successResultOf(self.auth.create_client("agent", [other_agent["id"]]))
        late = FakeConnection()
        session = self.hub.connection_made(late)
        self.hub.frame_received(session, wire.encode({
            "type": wire.CONNECT_REQUEST, "accessToken": self.token(client),
            "agentId": other_agent["id"], "capabilities": ["durable"]}))
        self.assertIsNotNone(session.agent_id)
        self.clock.advance(5)  # half an interval: the first session's phase
        self.assertEqual((self.beats(early), self.beats(late)), (1, 0))
        self.clock.advance(4)  # 9 s: the second one's (0.5 + 0.4 intervals)
        self.assertEqual((self.beats(early), self.beats(late)), (1, 1))
        self.clock.advance(6)  # 15 s: the first one's second beat, one interval on
        self.assertEqual((self.beats(early), self.beats(late)), (2, 1))
        self.clock.advance(4)
        self.assertEqual((self.beats(early), self.beats(late)), (2, 2))

    def test_lost_before_its_first_heartbeat_leaves_no_timer(self) -> None:
        conn, session = self.connect(caps=["durable"])
        self.assertTrue(session.heartbeat_start.active())
        self.hub.connection_lost(session)
        self.assertIsNone(session.heartbeat_start)
        self.clock.advance(60)
        self.assertEqual(self.beats(conn), 0)


class AgentLookupCacheTests(_HubCase):
    """A fleet reconnecting at once reads each Agent resource once a minute, not per try."""

    def setUp(self) -> None:
        super().setUp()
        self.reads: list[str] = []
        real = self.store.read

        def read(resource_type: str, id: str) -> Any:
            self.reads.append(f"{resource_type}/{id}")
            return real(resource_type, id)

        self.patch(self.store, "read", read)

    def reconnect(self) -> FakeConnection:
        conn, session = self.connect(caps=["durable"])
        self.hub.connection_lost(session)
        return conn

    def test_reconnects_read_the_agent_once_per_ttl(self) -> None:
        for _ in range(3):
            conn = self.reconnect()
            self.assertEqual(conn.of_type(wire.CONNECT_RESPONSE)[0]["type"],
                             wire.CONNECT_RESPONSE)
        self.assertEqual(self.reads, [f"Agent/{self.agent['id']}"])
        self.clock.advance(AGENT_CACHE_TTL)
        self.reconnect()
        self.assertEqual(len(self.reads), 2)

    def test_deleted_agent_refused_at_once(self) -> None:
        self.reconnect()
        self.successResultOf(self.store.delete("Agent", self.agent["id"]))
        conn, session = self.connect(caps=["durable"])
        self.assertIsNone(session.agent_id)
        self.assertEqual(conn.of_type(wire.CONNECT_RESPONSE), [])
        self.assertIn("not found", conn.of_type(wire.ERROR)[0]["body"])

    def test_warmed_at_start_no_read_per_connect(self) -> None:
        """After a restart the fleet's connects cost no Agent read each."""
        for i in range(3):
            self.successResultOf(self.store.create({"resourceType": "Agent", "name": f"a{i}"}))
        self.assertEqual(self.successResultOf(self.hub.warm_agent_cache(page=2)), 4)
        conn = self.reconnect()
        self.assertEqual(len(conn.of_type(wire.CONNECT_RESPONSE)), 1)
        self.assertEqual(self.reads, [])
