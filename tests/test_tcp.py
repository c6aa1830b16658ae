"""
The ``tcp://host:port?startChar=&endChar=`` byte-stream destination: the framing codec, the
client protocol on a fake transport and clock, the sender against a raw socket peer on
loopback, and one push end to end through real relay and agent processes.
"""

from __future__ import annotations

import base64

from twisted.internet import reactor
from twisted.internet.defer import Deferred, ensureDeferred, fail, succeed
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase, TestCase

from medagent.contenttypes import OCTET_STREAM, TEXT
from medagent.delivery import BEFORE_WRITE, DeliveryError, NotWritten, http_status, in_doubt
from medagent.destination import parse_destination
from medagent.tcp.framing import (
    FrameDecoder,
    FrameTooLarge,
    FramingError,
    delimiters,
    frame,
)
from medagent.tcp.sender import FramedClientProtocol, TCPSender
from tests import procs

STX, ETX = 0x02, 0x03


class FramingTests(SynchronousTestCase):
    def test_frame_and_decode(self) -> None:
        self.assertEqual(frame(b"abc", STX, ETX), b"\x02abc\x03")
        d = FrameDecoder(STX, ETX)
        self.assertEqual(d.feed(b"\x02abc\x03\x02de"), [b"abc"])
        self.assertTrue(d.in_frame)
        self.assertEqual(d.buffered, 2)
        self.assertEqual(d.feed(b"f\x03"), [b"def"])
        self.assertFalse(d.in_frame)

    def test_junk_outside_frames_is_skipped_and_counted(self) -> None:
        d = FrameDecoder(STX, ETX)
        self.assertEqual(d.feed(b"xy\x03\x02a\x03zz"), [b"a"])
        self.assertEqual(d.skipped, 5)
        self.assertEqual(d.buffered, 0)

    def test_new_start_abandons_the_unfinished_frame(self) -> None:
        d = FrameDecoder(STX, ETX)
        self.assertEqual(d.feed(b"\x02lost\x02kept\x03"), [b"kept"])
        self.assertEqual(d.truncated, 1)

    def test_oversize_frame_refused_and_discarded_then_resyncs(self) -> None:
        d = FrameDecoder(STX, ETX, max_size=4)
        with self.assertRaises(FrameTooLarge) as e:
            d.feed(b"\x02ok\x03\x02toolong")
        self.assertEqual(e.exception.payloads, [b"ok"])
        self.assertEqual(d.buffered, 0)
        self.assertEqual(d.feed(b"more\x03\x02fine\x03"), [b"fine"])
        self.assertEqual(d.oversize, 1)

    def test_payload_with_a_delimiter_is_refused(self) -> None:
        self.assertRaises(FramingError, frame, b"a\x03b", STX, ETX)
        self.assertRaises(FramingError, frame, b"a\x02b", STX, ETX)

    def test_delimiters_from_destination_values(self) -> None:
        self.assertEqual(delimiters("\x02", "\x03"), (STX, ETX))
        self.assertEqual(delimiters("\x05xyz", "\x04"), (5, 4))  # first character, as Medplum
        for start, end in ((None, "\x03"), ("\x02", ""), ("\x02", "\x02"), ("\u0100", "\x03")):
            self.assertRaises(FramingError, delimiters, start, end)
        self.assertRaises(ValueError, FrameDecoder, STX, STX)


class ClientProtocolTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.proto = FramedClientProtocol(self.clock, STX, ETX, max_size=16)
        self.transport = StringTransport()
        self.proto.makeConnection(self.transport)

    def test_writes_a_frame_and_fires_with_the_reply_frame(self) -> None:
        d = self.proto.request(b"hello", timeout=5)
        self.assertEqual(self.transport.value(), b"\x02hello\x03")
        self.proto.dataReceived(b"junk\x02wor")
        self.assertNoResult(d)
        self.proto.dataReceived(b"ld\x03")
        self.assertEqual(self.successResultOf(d), b"world")
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_timeout_is_504_and_in_doubt(self) -> None:
        d = self.proto.request(b"hello", timeout=5)
        self.clock.advance(5)
        err = self.failureResultOf(d, DeliveryError).value
        self.assertTrue(err.timed_out)
        self.assertEqual(http_status(err), 504)
        self.assertTrue(in_doubt(err, may_have_written=True))
        self.assertTrue(self.transport.disconnecting)

    def test_closed_before_answering_is_502(self) -> None:
        d = self.proto.request(b"hello", timeout=5)
        self.proto.connectionLost(None)
        err = self.failureResultOf(d, DeliveryError).value
        self.assertEqual((err.phase, http_status(err)), ("ack", 502))
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_oversize_answer_fails(self) -> None:
        d = self.proto.request(b"hello", timeout=5)
        self.proto.dataReceived(b"\x02" + b"x" * 20)
        self.assertEqual(self.failureResultOf(d, DeliveryError).value.phase, "protocol")


class _FramedEcho(Protocol):
    """A raw byte-stream peer: answers each STX..ETX frame with STX 'ok:' payload ETX."""

    def connectionMade(self) -> None:
        self.decoder = FrameDecoder(STX, ETX)
        self.factory.connections.append(self)

    def dataReceived(self, data: bytes) -> None:
        for payload in self.decoder.feed(data):
            self.factory.received.append(payload)
            if not self.factory.silent:
                self.transport.write(frame(b"ok:" + payload, STX, ETX))


class _PeerFactory(Factory):
    protocol = _FramedEcho

    def __init__(self) -> None:
        self.received: list[bytes] = []
        self.connections: list[_FramedEcho] = []
        self.silent = False


class SenderOnLoopbackTests(TestCase):
    def setUp(self) -> None:
        self.peer = _PeerFactory()
        self.port = reactor.listenTCP(0, self.peer, interface="127.0.0.1")
        self.addCleanup(self.port.stopListening)
        self.sender = TCPSender(reactor, connect_timeout=5, ack_timeout=5)
        self.addCleanup(self.sender.close)
        self.url = f"tcp://127.0.0.1:{self.port.getHost().port}?startChar=%02&endChar=%03"

    def send(self, url: str, content_type: str, body: str,
             options: dict | None = None) -> Deferred:
        return self.sender.send(parse_destination(url, needs_port=False), content_type, body,
                                options or {})

    async def _text(self) -> None:
        reply = await self.send(self.url, TEXT, "héllo")
        self.assertEqual((reply.body, reply.content_type), ("ok:héllo", TEXT))
        self.assertEqual(self.peer.received, ["héllo".encode()])

    def test_text_message_and_reply(self) -> Deferred:
        return ensureDeferred(self._text())

    async def _binary(self) -> None:
        marks: list[str] = []
        payload = bytes(range(4, 256))

        def before_write() -> Deferred:
            marks.append("marked")
            return succeed(None)

        reply = await self.send(self.url, OCTET_STREAM, base64.b64encode(payload).decode(),
                                {BEFORE_WRITE: before_write})
        self.assertEqual(reply.content_type, OCTET_STREAM)
        self.assertEqual(base64.b64decode(reply.body), b"ok:" + payload)
        self.assertEqual(marks, ["marked"])
        self.assertEqual(self.peer.received, [payload])

    def test_binary_message_base64_and_first_write_marked(self) -> Deferred:
        return ensureDeferred(self._binary())

    async def _not_marked(self) -> None:
        with self.assertRaises(NotWritten):
            await self.send(self.url, TEXT, "x",
                            {BEFORE_WRITE: lambda: fail(NotWritten("no mark"))})
        await procs.wait_until(lambda: self.peer.connections, what="peer connection")
        self.assertEqual(self.peer.received, [])

    def test_nothing_written_when_the_mark_fails(self) -> Deferred:
        return ensureDeferred(self._not_marked())

    async def _refused(self) -> None:
        port = procs.free_port()
        with self.assertRaises(DeliveryError) as e:
            await self.send(f"tcp://127.0.0.1:{port}?startChar=%02&endChar=%03", TEXT, "x")
        self.assertEqual(e.exception.phase, "connect")
        self.assertFalse(in_doubt(e.exception, may_have_written=True))

    def test_connection_refused_is_not_in_doubt(self) -> Deferred:
        return ensureDeferred(self._refused())

    def test_bad_requests_are_400_before_connecting(self) -> None:
        cases = [
            (f"tcp://127.0.0.1:{self.port.getHost().port}", TEXT, "x"),  # no startChar
            (self.url + "&ackTimeout=0", TEXT, "x"),
            (self.url, OCTET_STREAM, "not base64!"),
            (self.url, TEXT, "has \x03 inside"),
        ]
        for url, ct, body in cases:
            err = self.failureResultOf(self.send(url, ct, body), DeliveryError).value
            self.assertEqual(http_status(err), 400, (url, body))
        self.assertEqual(self.peer.connections, [])

    async def _silent(self) -> None:
        self.peer.silent = True
        with self.assertRaises(DeliveryError) as e:
            await self.send(self.url + "&ackTimeout=0.2", TEXT, "x")
        self.assertTrue(e.exception.timed_out)

    def test_silent_peer_times_out(self) -> Deferred:
        return ensureDeferred(self._silent())

    async def _ping(self) -> None:
        reply = await self.sender.ping(parse_destination(self.url))
        self.assertIn("connected in", reply.body)

    def test_ping(self) -> Deferred:
        return ensureDeferred(self._ping())


class EndToEndTests(TestCase):
    """A push over HTTP → real relay → real agent process → a raw TCP peer on loopback."""

    timeout = 120

    async def _go(self) -> None:
        from medagent.client import RelayError

        peer = _PeerFactory()
        port = reactor.listenTCP(0, peer, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        relay, admin = await procs.relay_with_admin(self)
        agent = await admin.create({"resourceType": "Agent", "name": "tcp agent",
                                    "status": "active"})
        creds = relay.create_client("agent", [agent["id"]])
        url = f"tcp://127.0.0.1:{port.getHost().port}?startChar=%02&endChar=%03"
        device = await admin.create({"resourceType": "Device", "url": url})
        procs.agent_process(self, relay.url, creds, agent["id"])

        async def connected() -> bool:
            params = await admin.request_json("GET", f"/fhir/R4/Agent/{agent['id']}/$status")
            return params["parameter"][0]["valueCode"] == "connected"

        await procs.wait_until(connected, timeout=30, interval=0.1, what="agent connected")
        reply = await admin.push_to_agent(agent, f"Device/{device['id']}",
                                          base64.b64encode(b"\x05RAW\x06").decode(),
                                          OCTET_STREAM, True)
        self.assertEqual(base64.b64decode(reply), b"ok:\x05RAW\x06")
        self.assertEqual(peer.received, [b"\x05RAW\x06"])
        # The connected agent announced its schemes: another one is refused at once, with them.
        with self.assertRaises(RelayError) as e:
            await admin.push_to_agent(agent, "nosuch://127.0.0.1:1", "x", TEXT, True)
        self.assertEqual(e.exception.status, 400)
        self.assertIn(f"Agent/{agent['id']} supports:", str(e.exception))
        self.assertIn("tcp", str(e.exception))

    def test_push_to_a_raw_tcp_peer(self) -> Deferred:
        return ensureDeferred(self._go())
