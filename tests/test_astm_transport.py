"""
Tests for L{medagent.astm.transport}: L{ASTMSender} over loopback TCP against scripted
instruments (happy path, NAKs, silence, contention, a dropped connection, ping, close) and
L{ASTMChannel} receiving and answering over TCP.
"""

from __future__ import annotations

import json
from typing import Any, Callable

from twisted.internet import reactor
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase

from medagent.contenttypes import ASTM, JSON, PING
from medagent.delivery import DeliveryError, Reply
from medagent.astm import codec
from medagent.astm.codec import ACK, ENQ, EOT, NAK
from medagent.astm.transport import ASTMChannel, ASTMSender, link_settings, serial_settings
from medagent.astm.link import LinkConfig
from medagent.destination import DestinationError, parse_destination

ORDER = ("H|\\^&|||MEDAGENT|||||ANALYZER1||P|LIS2-A2|20240115103000\n"
         "P|1|PID12345|||DOE^JOHN^A||19800101|M\n"
         "O|1|SID0001||^^^GLU\\^^^CREA|R|20240115100000|20240115093000||||N||||SERUM||||||||||O\n"
         "L|1|N\n")
RESULT = "H|\\^&|||ANALYZER1\rP|1\rO|1|SID0001\rR|1|^^^GLU|5.4|mmol/L||N||F\rL|1|N\r"


def wire_frames(text: str) -> list[bytes]:
    out, n = [], 1
    for t, final in codec.frame_texts(text.encode()):
        out.append(codec.build_frame(n, t, final))
        n = codec.next_frame_number(n)
    return out


async def wait(predicate: Callable[[], Any], timeout: float = 5.0) -> None:
    """Poll C{predicate} on the reactor until true (bytes in flight on loopback)."""
    for _ in range(int(timeout / 0.01)):
        if predicate():
            return
        await deferLater(reactor, 0.01, lambda: None)
    raise AssertionError("condition not reached in time")


class ScriptedInstrument(Protocol):
    """An instrument whose every reply a test decides: C{script(self, kind, value)}."""

    def __init__(self, script: Callable[["ScriptedInstrument", str, Any], None]) -> None:
        self.script = script
        self.decoder = codec.FrameDecoder()
        self.events: list[tuple[str, Any]] = []
        self.frames: list[codec.Frame] = []
        self.lost = Deferred()
        self.state: dict[str, Any] = {}

    def dataReceived(self, data: bytes) -> None:
        self.decoder.feed(data)
        for kind, value in self.decoder.events():
            self.events.append((kind, value))
            if kind == "frame":
                self.frames.append(value)
            self.script(self, kind, value)

    def connectionLost(self, reason: Any = None) -> None:
        self.lost.callback(None)

    def write(self, data: bytes) -> None:
        self.transport.write(data)

    def messages(self) -> list[str]:
        """Frame texts joined per ETX, as records each ending in CR."""
        return [f.text.decode() for f in self.frames]


def ack_everything(dev: ScriptedInstrument, kind: str, value: Any) -> None:
    if value == ENQ or kind == "frame":
        dev.write(ACK)


class SenderTestCase(TestCase):
    def setUp(self) -> Deferred:
        self.devices: list[ScriptedInstrument] = []
        self.script: Callable = ack_everything
        self.inbound: list[tuple[str, str, str]] = []

        def build() -> ScriptedInstrument:
            dev = ScriptedInstrument(lambda *a: self.script(*a))
            self.devices.append(dev)
            return dev

        factory = Factory.forProtocol(build)
        d = TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(factory)

        def listening(port: Any) -> None:
            self.port = port
            self.url = f"astm://127.0.0.1:{port.getHost().port}"
            self.addCleanup(port.stopListening)

        self.sender = ASTMSender(reactor, on_inbound=self.on_inbound,
                                 open_retry_delays=(0.05,))
        self.addCleanup(self.close_all)
        return d.addCallback(listening)

    def on_inbound(self, content_type: str, body: str, remote: str) -> None:
        self.inbound.append((content_type, body, remote))

    async def _close_all(self) -> None:
        await self.sender.close()
        for dev in self.devices:
            if not dev.lost.called:
                dev.transport.loseConnection()
                await dev.lost

    def close_all(self) -> Deferred:
        return ensureDeferred(self._close_all())

    def send(self, body: str = ORDER, query: str = "", ct: str = ASTM) -> Deferred:
        dest = parse_destination(self.url + query)
        return self.sender.send(dest, ct, body, {})


class SenderTests(SenderTestCase):
    def test_happy_path_and_connection_reuse(self) -> Deferred:
        async def go() -> None:
            reply = await self.send()
            self.assertIsInstance(reply, Reply)
            self.assertEqual(reply.content_type, JSON)
            self.assertEqual(json.loads(reply.body),
                             {"frames": 4, "records": 4, "retransmissions": 0})
            dev = self.devices[0]
            await wait(lambda: dev.events[-1] == ("control", EOT))
            self.assertEqual([k for k, _ in dev.events],
                             ["control", "frame", "frame", "frame", "frame", "control"])
            self.assertEqual([f.number for f in dev.frames], [1, 2, 3, 4])
            self.assertEqual("".join(dev.messages()), ORDER.replace("\n", "\r"))
            reply = await self.send("H|\\^&\rL|1|N\r")
            self.assertEqual(json.loads(reply.body)["frames"], 2)
            self.assertEqual(len(self.devices), 1)  # the same long-lived connection
            self.assertEqual([f.number for f in dev.frames], [1, 2, 3, 4, 1, 2])
        return ensureDeferred(go())

    def test_bad_input_never_connects(self) -> Deferred:
        async def go() -> None:
            for body, ct in (("", ASTM), ("H|\\^&\rP|1|\x02\r", ASTM), (ORDER, "text/plain"),
                             ("no record type\r|x", ASTM)):
                with self.assertRaises(DeliveryError) as e:
                    await self.send(body, ct=ct)
                self.assertFalse(e.exception.transient)
                self.assertEqual(e.exception.phase, "encode")
            with self.assertRaises(DeliveryError) as e:
                await self.send(query="?ackTimeout=-1")
            self.assertFalse(e.exception.transient)
            self.assertEqual(self.devices, [])
        return ensureDeferred(go())

    def test_connection_refused(self) -> Deferred:
        async def go() -> None:
            await self.port.stopListening()
            with self.assertRaises(DeliveryError) as e:
                await self.send()
            self.assertTrue(e.exception.transient)
            self.assertEqual(e.exception.phase, "connect")
            self.assertIn("connect", str(e.exception))
        return ensureDeferred(go())

    def test_nak_six_times(self) -> Deferred:
        def script(dev: ScriptedInstrument, kind: str, value: Any) -> None:
            if value == ENQ:
                dev.write(ACK)
            elif kind == "frame":
                dev.write(NAK)

        self.script = script

        async def go() -> None:
            with self.assertRaises(DeliveryError) as e:
                await self.send()
            self.assertEqual(e.exception.phase, "transfer")
            self.assertTrue(e.exception.transient)
            self.assertIn("frame 1 refused (NAK) after 6 attempts", str(e.exception))
            dev = self.devices[0]
            await deferLater(reactor, 0.05, lambda: None)
            self.assertEqual([f.number for f in dev.frames], [1] * 6)
            self.assertEqual(dev.events[-1], ("control", EOT))
        return ensureDeferred(go())

    def test_nak_then_ack_retransmits(self) -> Deferred:
        def script(dev: ScriptedInstrument, kind: str, value: Any) -> None:
            if value == ENQ:
                dev.write(ACK)
            elif kind == "frame":
                n = dev.state.get("seen", 0)
                dev.state["seen"] = n + 1
                dev.write(NAK if n in (1, 2) else ACK)

        self.script = script

        async def go() -> None:
            reply = await self.send()
            self.assertEqual(json.loads(reply.body)["retransmissions"], 2)
            self.assertEqual([f.number for f in self.devices[0].frames], [1, 2, 2, 2, 3, 4])
        return ensureDeferred(go())

    def test_no_reply_to_enq(self) -> Deferred:
        self.script = lambda *a: None

        async def go() -> None:
            with self.assertRaises(DeliveryError) as e:
                await self.send(query="?enqTimeout=0.2")
            self.assertEqual(e.exception.phase, "establishment")
            self.assertIn("no reply to ENQ within 0.2 s", str(e.exception))
        return ensureDeferred(go())

    def test_no_ack_to_frame(self) -> Deferred:
        self.script = lambda dev, kind, value: dev.write(ACK) if value == ENQ else None

        async def go() -> None:
            with self.assertRaises(DeliveryError) as e:
                await self.send(query="?ackTimeout=0.2")
            self.assertEqual(e.exception.phase, "transfer")
            self.assertIn("no reply to frame 1 within 0.2 s", str(e.exception))
        return ensureDeferred(go())

    def test_contention_receives_instrument_message_first(self) -> Deferred:
        order: list[str] = []

        def script(dev: ScriptedInstrument, kind: str, value: Any) -> None:
            st = dev.state
            if value == ENQ and not st.get("contended"):
                st["contended"] = True
                dev.write(ENQ)  # both sent ENQ: contention, the instrument wins
                reactor.callLater(0.05, dev.write, ENQ)
                st["to_send"] = wire_frames(RESULT)
            elif value == ACK and st.get("to_send") is not None:
                if st["to_send"]:
                    dev.write(st["to_send"].pop(0))
                else:
                    st["to_send"] = None
                    dev.write(EOT)
                    order.append("instrument done")
            elif value == ENQ or kind == "frame":
                dev.write(ACK)

        self.script = script

        async def go() -> None:
            reply = await self.send()
            order.append("ours sent")
            self.assertEqual(order, ["instrument done", "ours sent"])
            self.assertEqual(self.inbound, [(ASTM, RESULT, self.url)])
            self.assertEqual(json.loads(reply.body)["records"], 4)
            self.assertEqual("".join(self.devices[0].messages()), ORDER.replace("\n", "\r"))
        return ensureDeferred(go())

    def test_unsolicited_message_between_pushes(self) -> Deferred:
        async def go() -> None:
            await self.send()
            dev = self.devices[0]
            self.script = lambda *a: None
            dev.write(ENQ)
            await deferLater(reactor, 0.05, lambda: None)
            for f in wire_frames(RESULT):
                dev.write(f)
            dev.write(EOT)
            for _ in range(100):
                if self.inbound:
                    break
                await deferLater(reactor, 0.02, lambda: None)
            self.assertEqual(self.inbound, [(ASTM, RESULT, self.url)])
        return ensureDeferred(go())

    def test_no_inbound_handler_naks_enq(self) -> Deferred:
        async def go() -> None:
            sender = ASTMSender(reactor)
            self.addCleanup(sender.close)
            await sender.send(parse_destination(self.url), ASTM, ORDER, {})
            dev = self.devices[0]
            await wait(lambda: dev.events[-1] == ("control", EOT))
            before = len(dev.events)
            got: list[bytes] = []
            dev.dataReceived = lambda data: got.append(data)  # type: ignore[assignment]
            dev.write(ENQ)
            await deferLater(reactor, 0.1, lambda: None)
            self.assertEqual(got, [NAK])
            self.assertEqual(len(dev.events), before)
        return ensureDeferred(go())

    def test_connection_dropped_mid_message_then_reconnects(self) -> Deferred:
        def script(dev: ScriptedInstrument, kind: str, value: Any) -> None:
            if value == ENQ:
                dev.write(ACK)
            elif kind == "frame":
                if value.number == 2 and not dev.state.get("dropped"):
                    dev.transport.loseConnection()
                else:
                    dev.write(ACK)

        self.script = script

        async def go() -> None:
            with self.assertRaises(DeliveryError) as e:
                await self.send()
            self.assertEqual(e.exception.phase, "connection")
            self.assertTrue(e.exception.transient)
            self.script = ack_everything
            reply = await self.send()
            self.assertEqual(json.loads(reply.body)["frames"], 4)
            self.assertEqual(len(self.devices), 2)
        return ensureDeferred(go())

    def test_ping(self) -> Deferred:
        async def go() -> None:
            reply = await self.sender.ping(parse_destination(self.url))
            self.assertEqual(reply.content_type, PING)
            self.assertIn("ENQ answered ACK", reply.body)
            self.assertGreaterEqual(float(reply.detail), 0.0)
            await deferLater(reactor, 0.05, lambda: None)
            self.assertEqual([v for _, v in self.devices[0].events], [ENQ, EOT])
            self.script = lambda dev, kind, value: dev.write(NAK) if value == ENQ else None
            reply = await self.sender.ping(parse_destination(self.url))
            self.assertIn("NAK (device busy)", reply.body)
        return ensureDeferred(go())

    def test_ping_timeout(self) -> Deferred:
        self.script = lambda *a: None

        async def go() -> None:
            self.sender._ping_timeout = 0.2
            with self.assertRaises(DeliveryError) as e:
                await self.sender.ping(parse_destination(self.url))
            self.assertEqual(e.exception.phase, "establishment")
        return ensureDeferred(go())

    def test_close_fails_in_flight(self) -> Deferred:
        self.script = lambda *a: None

        async def go() -> None:
            d = self.send()
            await deferLater(reactor, 0.1, lambda: None)
            await self.sender.close()
            with self.assertRaises(DeliveryError) as e:
                await d
            self.assertTrue(e.exception.transient)
            with self.assertRaises(DeliveryError):
                await self.send()
        return ensureDeferred(go())


class SettingsTests(TestCase):
    def test_link_settings_from_url(self) -> None:
        dest = parse_destination("astm://h:1?ackTimeout=2.5&frameAttempts=3&role=instrument"
                                 "&packed=1&encoding=utf-8&maxFrameText=100")
        config, framing = link_settings(dest, LinkConfig())
        self.assertEqual((config.ack_timeout, config.max_attempts, config.role),
                         (2.5, 3, "instrument"))
        self.assertEqual((framing.packed, framing.encoding, framing.max_text),
                         (True, "utf-8", 100))
        for bad in ("role=boss", "ackTimeout=x", "frameAttempts=0", "encoding=nope",
                    "maxFrameText=0"):
            self.assertRaises(DestinationError, link_settings,
                              parse_destination("astm://h:1?" + bad), LinkConfig())

    def test_serial_settings(self) -> None:
        dest = parse_destination("astm+serial:///dev/ttyUSB0?baudrate=19200&bytesize=7"
                                 "&parity=E&stopbits=2&rtscts=1&xonxoff=0", needs_port=False)
        self.assertEqual(serial_settings(dest), {"baudrate": 19200, "bytesize": 7,
                                                 "parity": "E", "stopbits": 2, "rtscts": 1,
                                                 "xonxoff": 0})
        self.assertEqual(serial_settings(parse_destination("astm+serial:///dev/ttyS0"))
                         ["baudrate"], 9600)
        for bad in ("baudrate=x", "bytesize=9", "parity=Q", "stopbits=3"):
            self.assertRaises(DestinationError, serial_settings,
                              parse_destination("astm+serial:///dev/x?" + bad))


class ChannelTests(TestCase):
    """An analyzer connects to our TCP channel and sends results / a host query."""

    def setUp(self) -> Deferred:
        self.forwarded: list[tuple[str, str, str]] = []
        self.answer: Any = None
        self.channel = ASTMChannel(self.forward, reactor=reactor,
                                   endpoint="tcp:0:interface=127.0.0.1", name="test")
        self.channel.startService()
        self.addCleanup(self.channel.stopService)
        return self.channel.when_listening().addCallback(self.listening)

    def listening(self, port: Any) -> None:
        self.port = port.getHost().port

    def forward(self, content_type: str, body: str, remote: str) -> Any:
        self.forwarded.append((content_type, body, remote))
        return self.answer

    async def connect(self, script: Callable) -> ScriptedInstrument:
        from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
        dev = ScriptedInstrument(script)
        await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", self.port), dev)

        async def drop() -> None:
            if not dev.lost.called:
                dev.transport.loseConnection()
                await dev.lost
        self.addCleanup(lambda: ensureDeferred(drop()))
        return dev

    async def wait(self, predicate: Callable[[], bool]) -> None:
        for _ in range(250):
            if predicate():
                return
            await deferLater(reactor, 0.02, lambda: None)
        self.fail("condition not reached")

    def test_results_forwarded_once_per_message(self) -> Deferred:
        def script(dev: ScriptedInstrument, kind: str, value: Any) -> None:
            todo = dev.state.setdefault("todo", [])
            if value == ACK:
                dev.write(todo.pop(0) if todo else EOT)

        async def go() -> None:
            dev = await self.connect(script)
            two = RESULT + RESULT.replace("5.4", "6.1")
            dev.state["todo"] = wire_frames(two)
            dev.write(ENQ)
            await self.wait(lambda: len(self.forwarded) == 2)
            ct, body, remote = self.forwarded[0]
            self.assertEqual(ct, ASTM)
            self.assertEqual(body, RESULT)
            self.assertTrue(remote.startswith("astm://127.0.0.1:"))
            self.assertIn("|6.1|", self.forwarded[1][1])
        return ensureDeferred(go())

    def test_host_query_answered_on_same_link(self) -> Deferred:
        query = "H|\\^&|||ANALYZER1\rQ|1|^SID0001||ALL||||||||O\rL|1|N\r"
        answer = ("H|\\^&|||MEDAGENT\rP|1|PID1\rO|1|SID0001||^^^GLU|R||||||N||||SERUM"
                  "||||||||||Q\rL|1|F\r")
        self.answer = Reply(answer, ASTM)

        def script(dev: ScriptedInstrument, kind: str, value: Any) -> None:
            todo = dev.state.setdefault("todo", [])
            if value == ACK and dev.state.get("sending"):
                if todo:
                    dev.write(todo.pop(0))
                else:
                    dev.state["sending"] = False
                    dev.write(EOT)
            elif value == ENQ or kind == "frame":
                dev.write(ACK)

        async def go() -> None:
            dev = await self.connect(script)
            dev.state.update(todo=wire_frames(query), sending=True)
            dev.write(ENQ)
            await self.wait(lambda: len(dev.frames) == 4 and dev.events[-1] == ("control", EOT))
            self.assertEqual(self.forwarded[0][1], query)
            self.assertEqual("".join(dev.messages()), answer)
        return ensureDeferred(go())

    def test_busy_when_forwards_pile_up(self) -> Deferred:
        self.channel.inbound.max_pending = 1
        self.answer = Deferred()  # the relay has not answered yet

        def script(dev: ScriptedInstrument, kind: str, value: Any) -> None:
            todo = dev.state.setdefault("todo", [])
            if value == ACK and todo:
                dev.write(todo.pop(0))
            elif value == ACK:
                dev.write(EOT)

        async def go() -> None:
            dev = await self.connect(script)
            dev.state["todo"] = wire_frames(RESULT)
            dev.write(ENQ)
            await self.wait(lambda: len(self.forwarded) == 1)
            await deferLater(reactor, 0.05, lambda: None)
            dev.script = lambda *a: None
            dev.write(ENQ)
            await self.wait(lambda: dev.events and dev.events[-1] == ("control", NAK))
            self.answer.callback(None)
            self.assertEqual(self.channel.inbound.pending, 0)
        return ensureDeferred(go())

    def test_listen_failure_reported(self) -> Deferred:
        from twisted.internet.error import CannotListenError

        async def go() -> None:
            other = ASTMChannel(self.forward, reactor=reactor,
                                endpoint=f"tcp:{self.port}:interface=127.0.0.1", name="dup")
            other.startService()
            with self.assertRaises(CannotListenError):
                await other.when_listening()
            await other.stopService()
            self.assertEqual(len(self.flushLoggedErrors(CannotListenError)), 1)
        return ensureDeferred(go())

    def test_needs_exactly_one_address(self) -> None:
        self.assertRaises(ValueError, ASTMChannel, self.forward, reactor=reactor)
        self.assertRaises(ValueError, ASTMChannel, self.forward, reactor=reactor,
                          endpoint="tcp:0", serial="/dev/ttyS0")
