"""
Tests for L{medagent.astm.sender.ASTMSender} driven by a C{Clock}: the sender's links run
over an in-memory line (iosim) to scripted instruments, so every timeout, retry and reopen
is a clock step and nothing depends on how loaded the machine is.  (The same sender over
loopback TCP and a pty: tests.test_astm_tcp and tests.test_astm_serial.)
"""

from __future__ import annotations

import json
from typing import Any, Callable

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from medagent.contenttypes import ASTM, JSON, PING
from medagent.delivery import DeliveryError, Reply
from medagent.astm.codec import ACK, ENQ, EOT, NAK
from medagent.astm.sender import ASTMSender
from medagent.astm.serial import SerialClientEndpoint, reopen_policy
from medagent.destination import parse_destination
from tests.astm_helpers import (
    ORDER, RESULT, MemoryLine, ScriptedInstrument, ack_everything, wire_frames,
)

URL = "astm://127.0.0.1:5000"
SERIAL_URL = "astm+serial:///dev/ttyANALYZER?baudrate=9600"


class SenderTestCase(SynchronousTestCase):
    url = URL

    def setUp(self) -> None:
        self.clock = Clock()
        self.script: Callable = ack_everything
        self.inbound: list[tuple[str, str, str]] = []
        self.line = MemoryLine(self.clock,
                               lambda: ScriptedInstrument(lambda *a: self.script(*a)))
        self.devices = self.line.devices
        self.sender = self.make_sender(on_inbound=self.on_inbound)

    def make_sender(self, **kw: Any) -> ASTMSender:
        kw.setdefault("endpoint_factory", self.line.endpoint)
        sender = ASTMSender(self.clock, **kw)

        def close() -> None:
            d = sender.close()
            self.line.flush()
            self.successResultOf(d)
            self.assertEqual(self.clock.getDelayedCalls(), [])  # no timer left behind
        self.addCleanup(close)
        return sender

    def on_inbound(self, content_type: str, body: str, remote: str) -> None:
        self.inbound.append((content_type, body, remote))

    def send(self, body: str = ORDER, query: str = "", ct: str = ASTM) -> Any:
        d = self.sender.send(parse_destination(self.url + query), ct, body, {})
        self.line.flush()
        return d

    def delivery_error(self, d: Any) -> DeliveryError:
        return self.failureResultOf(d, DeliveryError).value


class SenderTests(SenderTestCase):
    def test_happy_path_and_connection_reuse(self) -> None:
        reply = self.successResultOf(self.send())
        self.assertIsInstance(reply, Reply)
        self.assertEqual(reply.content_type, JSON)
        self.assertEqual(json.loads(reply.body),
                         {"frames": 4, "records": 4, "retransmissions": 0})
        dev = self.devices[0]
        self.assertEqual(dev.events[-1], ("control", EOT))
        self.assertEqual([k for k, _ in dev.events],
                         ["control", "frame", "frame", "frame", "frame", "control"])
        self.assertEqual([f.number for f in dev.frames], [1, 2, 3, 4])
        self.assertEqual("".join(dev.messages()), ORDER.replace("\n", "\r"))
        reply = self.successResultOf(self.send("H|\\^&\rL|1|N\r"))
        self.assertEqual(json.loads(reply.body)["frames"], 2)
        self.assertEqual(len(self.devices), 1)  # the same long-lived connection
        self.assertEqual([f.number for f in dev.frames], [1, 2, 3, 4, 1, 2])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_bad_input_never_connects(self) -> None:
        for body, ct in (("", ASTM), ("H|\\^&\rP|1|\x02\r", ASTM), (ORDER, "text/plain"),
                         ("no record type\r|x", ASTM)):
            e = self.delivery_error(self.send(body, ct=ct))
            self.assertFalse(e.transient)
            self.assertEqual(e.phase, "encode")
        e = self.delivery_error(self.send(query="?ackTimeout=-1"))
        self.assertFalse(e.transient)
        self.assertEqual(self.devices, [])
        self.assertEqual(self.line.attempts, [])

    def test_connection_refused(self) -> None:
        self.line.refuse = True
        e = self.delivery_error(self.send())
        self.assertTrue(e.transient)
        self.assertEqual(e.phase, "connect")
        self.assertIn("connect", str(e))
        self.assertEqual(len(self.line.attempts), 1)  # TCP: no retry, the queue retries
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_nak_six_times(self) -> None:
        def script(dev: ScriptedInstrument, kind: str, value: Any) -> None:
            if value == ENQ:
                dev.write(ACK)
            elif kind == "frame":
                dev.write(NAK)

        self.script = script
        e = self.delivery_error(self.send())
        self.assertEqual(e.phase, "transfer")
        self.assertTrue(e.transient)
        self.assertIn("frame 1 refused (NAK) after 6 attempts", str(e))
        dev = self.devices[0]
        self.assertEqual([f.number for f in dev.frames], [1] * 6)
        self.assertEqual(dev.events[-1], ("control", EOT))

    def test_nak_then_ack_retransmits(self) -> None:
        def script(dev: ScriptedInstrument, kind: str, value: Any) -> None:
            if value == ENQ:
                dev.write(ACK)
            elif kind == "frame":
                n = dev.state.get("seen", 0)
                dev.state["seen"] = n + 1
                dev.write(NAK if n in (1, 2) else ACK)

        self.script = script
        reply = self.successResultOf(self.send())
        self.assertEqual(json.loads(reply.body)["retransmissions"], 2)
        self.assertEqual([f.number for f in self.devices[0].frames], [1, 2, 2, 2, 3, 4])

    def test_no_reply_to_enq(self) -> None:
        self.script = lambda *a: None
        d = self.send(query="?enqTimeout=0.2")
        self.line.run(0.19)
        self.assertNoResult(d)
        self.line.run(0.01)
        e = self.delivery_error(d)
        self.assertEqual(e.phase, "establishment")
        self.assertIn("no reply to ENQ within 0.2 s", str(e))

    def test_no_ack_to_frame(self) -> None:
        self.script = lambda dev, kind, value: dev.write(ACK) if value == ENQ else None
        d = self.send(query="?ackTimeout=0.2")
        self.line.run(0.19)
        self.assertNoResult(d)
        self.line.run(0.01)
        e = self.delivery_error(d)
        self.assertEqual(e.phase, "transfer")
        self.assertIn("no reply to frame 1 within 0.2 s", str(e))

    def test_contention_receives_instrument_message_first(self) -> None:
        order: list[str] = []

        def script(dev: ScriptedInstrument, kind: str, value: Any) -> None:
            st = dev.state
            if value == ENQ and not st.get("contended"):
                st["contended"] = True
                dev.write(ENQ)  # both sent ENQ: contention, the instrument wins
                self.clock.callLater(0.05, dev.write, ENQ)
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
        d = self.send()
        d.addCallback(lambda reply: (order.append("ours sent"), reply)[1])
        self.assertNoResult(d)
        self.line.run(0.05)
        reply = self.successResultOf(d)
        self.assertEqual(order, ["instrument done", "ours sent"])
        self.assertEqual(self.inbound, [(ASTM, RESULT, self.url)])
        self.assertEqual(json.loads(reply.body)["records"], 4)
        self.assertEqual("".join(self.devices[0].messages()), ORDER.replace("\n", "\r"))

    def test_unsolicited_message_between_pushes(self) -> None:
        self.successResultOf(self.send())
        dev = self.devices[0]
        self.script = lambda *a: None
        dev.write(ENQ)
        self.line.flush()
        self.assertEqual(dev.events[-1], ("control", ACK))
        for f in wire_frames(RESULT):
            dev.write(f)
        dev.write(EOT)
        self.line.flush()
        self.assertEqual(self.inbound, [(ASTM, RESULT, self.url)])

    def test_no_inbound_handler_naks_enq(self) -> None:
        sender = self.make_sender()
        d = sender.send(parse_destination(self.url), ASTM, ORDER, {})
        self.line.flush()
        self.successResultOf(d)
        dev = self.devices[0]
        self.assertEqual(dev.events[-1], ("control", EOT))
        before = len(dev.events)
        got: list[bytes] = []
        dev.dataReceived = lambda data: got.append(data)  # type: ignore[assignment]
        dev.write(ENQ)
        self.line.flush()
        self.assertEqual(got, [NAK])
        self.assertEqual(len(dev.events), before)

    def test_connection_dropped_mid_message_then_reconnects(self) -> None:
        def script(dev: ScriptedInstrument, kind: str, value: Any) -> None:
            if value == ENQ:
                dev.write(ACK)
            elif kind == "frame":
                if value.number == 2 and not dev.state.get("dropped"):
                    dev.transport.loseConnection()
                else:
                    dev.write(ACK)

        self.script = script
        e = self.delivery_error(self.send())
        self.assertEqual(e.phase, "connection")
        self.assertTrue(e.transient)
        self.script = ack_everything
        reply = self.successResultOf(self.send())
        self.assertEqual(json.loads(reply.body)["frames"], 4)
        self.assertEqual(len(self.devices), 2)

    def test_ping(self) -> None:
        d = self.sender.ping(parse_destination(self.url))
        self.line.flush()
        reply = self.successResultOf(d)
        self.assertEqual(reply.content_type, PING)
        self.assertIn("ENQ answered ACK", reply.body)
        self.assertGreaterEqual(float(reply.detail), 0.0)
        self.assertEqual([v for _, v in self.devices[0].events], [ENQ, EOT])
        self.script = lambda dev, kind, value: dev.write(NAK) if value == ENQ else None
        d = self.sender.ping(parse_destination(self.url))
        self.line.flush()
        self.assertIn("NAK (device busy)", self.successResultOf(d).body)

    def test_ping_round_trip_time_is_measured_on_the_clock(self) -> None:
        self.script = lambda dev, kind, value: (
            self.clock.callLater(0.25, dev.write, ACK) if value == ENQ else None)
        d = self.sender.ping(parse_destination(self.url))
        self.line.run(0.25)
        reply = self.successResultOf(d)
        self.assertEqual(reply.detail, "250.000")
        self.assertIn("in 250.0 ms", reply.body)

    def test_ping_timeout(self) -> None:
        self.script = lambda *a: None
        self.sender._ping_timeout = 0.2
        d = self.sender.ping(parse_destination(self.url))
        self.line.run(0.2)
        e = self.delivery_error(d)
        self.assertEqual(e.phase, "establishment")

    def test_close_fails_in_flight(self) -> None:
        self.script = lambda *a: None
        d = self.send()
        self.assertEqual(self.devices[0].events, [("control", ENQ)])
        closed = self.sender.close()
        self.line.flush()
        self.successResultOf(closed)
        e = self.delivery_error(d)
        self.assertTrue(e.transient)
        self.delivery_error(self.send())
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_close_while_connecting_cancels_the_connect(self) -> None:
        from twisted.internet.defer import Deferred

        cancelled: list[Deferred] = []

        class Slow:
            def connect(self, factory: Any) -> Deferred:
                return Deferred(cancelled.append)

        sender = self.make_sender(endpoint_factory=lambda dest: Slow())
        d = sender.send(parse_destination(self.url), ASTM, ORDER, {})
        self.assertNoResult(d)
        self.successResultOf(sender.close())
        e = self.delivery_error(d)
        self.assertEqual(e.phase, "connect")
        self.assertIn("closed while connecting", str(e))
        self.assertEqual(len(cancelled), 1)  # the connect itself was cancelled


class MissingPort(OSError):
    pass


class SerialOpenTests(SenderTestCase):
    """
    C{astm+serial://}: a missing port is opened again after 0.5, 1 and 2 s (the defaults)
    before the message fails; through the real L{SerialClientEndpoint} with a port factory
    standing in for pyserial.
    """

    url = SERIAL_URL

    def setUp(self) -> None:
        super().setUp()
        self.present = False
        self.opened: list[tuple[str, dict]] = []
        self.sender = self.make_sender(on_inbound=self.on_inbound,
                                       endpoint_factory=self.endpoint)

    def endpoint(self, destination: Any) -> Any:
        from medagent.astm.settings import serial_settings
        return SerialClientEndpoint(self.clock, destination.path, serial_settings(destination),
                                    portFactory=self.port)

    def port(self, protocol: Any, device: str, reactor: Any, **settings: Any) -> Any:
        self.opened.append((device, settings))
        if not self.present:
            raise MissingPort(2, f"could not open port {device}")
        self.line.pumps.append(_attach(self, protocol))
        return protocol.transport

    def test_port_missing(self) -> None:
        d = self.send()
        for delay in (0.5, 1.0, 2.0):
            self.assertNoResult(d)
            attempts = len(self.opened)
            self.line.run(delay - 0.001)
            self.assertEqual(len(self.opened), attempts)
            self.line.run(0.001)
            self.assertEqual(len(self.opened), attempts + 1)
        e = self.delivery_error(d)
        self.assertEqual(e.phase, "connect")
        self.assertTrue(e.transient)
        self.assertIn("serial port missing", str(e))
        self.assertIn("could not open port /dev/ttyANALYZER", str(e))
        self.assertEqual(len(self.opened), 4)
        self.assertEqual(self.opened[0], ("/dev/ttyANALYZER", {
            "baudrate": 9600, "bytesize": 8, "parity": "N", "stopbits": 1, "rtscts": 0,
            "xonxoff": 0}))
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_port_appears_during_open_backoff(self) -> None:
        d = self.send()
        self.line.run(1.0)
        self.assertNoResult(d)
        self.assertEqual(len(self.opened), 2)
        self.present = True
        self.line.run(1.0)
        reply = self.successResultOf(d)
        self.assertEqual(json.loads(reply.body)["frames"], 4)
        self.assertEqual(len(self.opened), 3)

    def test_close_while_waiting_to_reopen(self) -> None:
        d = self.send()
        closed = self.sender.close()
        self.successResultOf(closed)
        e = self.delivery_error(d)
        self.assertEqual(e.phase, "connect")
        self.assertIn("closed while connecting", str(e))
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(len(self.opened), 1)

    def test_open_backoff_is_injectable(self) -> None:
        sender = self.make_sender(endpoint_factory=self.endpoint, open_retries=1,
                                  open_backoff=reopen_policy(0.05, 0.05))
        d = sender.send(parse_destination(self.url), ASTM, ORDER, {})
        self.line.run(0.05)
        self.assertEqual(self.delivery_error(d).phase, "connect")
        self.assertEqual(len(self.opened), 2)


def _attach(case: SenderTestCase, protocol: Any) -> Any:
    from tests.astm_helpers import attach
    device = ScriptedInstrument(lambda *a: case.script(*a))
    case.line.devices.append(device)
    return attach(case.clock, protocol, device)


class ReopenPolicyTests(SynchronousTestCase):
    def test_delays_double_from_the_first_up_to_the_cap(self) -> None:
        policy = reopen_policy(1.0, 30.0)
        self.assertEqual([policy(n) for n in range(1, 8)], [1, 2, 4, 8, 16, 30, 30])

    def test_jitter_is_added(self) -> None:
        policy = reopen_policy(0.5, 2.0, jitter=lambda: 0.125)
        self.assertEqual([policy(n) for n in (1, 2, 3, 4)], [0.625, 1.125, 2.125, 2.125])
