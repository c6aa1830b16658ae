"""
Tests for L{medagent.astm.channel.ASTMChannel} driven by a C{Clock}: an analyzer connects to
the TCP channel (a C{MemoryReactorClock}, the connection joined with iosim) and sends
results and host queries; a serial channel's line is lost, its reopen attempts fail and it
is opened again, every delay a clock step.  (Over loopback TCP and a real pty:
tests.test_astm_tcp, tests.test_astm_serial.)
"""

from __future__ import annotations

from typing import Any, Callable

from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase

from medagent.contenttypes import ASTM
from medagent.delivery import Reply
from medagent.astm.channel import ASTMChannel
from medagent.astm.codec import ACK, ENQ, EOT, NAK
from tests.astm_helpers import RESULT, MemoryLine, ScriptedInstrument, attach, wire_frames

QUERY = "H|\\^&|||ANALYZER1\rQ|1|^SID0001||ALL||||||||O\rL|1|N\r"
ANSWER = ("H|\\^&|||MEDAGENT\rP|1|PID1\rO|1|SID0001||^^^GLU|R||||||N||||SERUM"
          "||||||||||Q\rL|1|F\r")


def sends_when_acked(dev: ScriptedInstrument, kind: str, value: Any) -> None:
    """Sends C{state['todo']} one frame per ACK, then EOT."""
    todo = dev.state.setdefault("todo", [])
    if value == ACK:
        dev.write(todo.pop(0) if todo else EOT)


class TCPChannelTests(SynchronousTestCase):
    """An analyzer connects to our TCP channel and sends results / a host query."""

    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.forwarded: list[tuple[str, str, str]] = []
        self.answer: Any = None
        self.channel = ASTMChannel(self.forward, reactor=self.reactor,
                                   endpoint="tcp:15210:interface=127.0.0.1", name="test")
        self.channel.startService()
        self.pumps: list[Any] = []
        self.addCleanup(self.stop)

    def stop(self) -> None:
        d = self.channel.stopService()
        self.flush()
        self.successResultOf(d)
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def forward(self, content_type: str, body: str, remote: str) -> Any:
        self.forwarded.append((content_type, body, remote))
        return self.answer

    def flush(self) -> None:
        for pump in self.pumps:
            pump.flush()

    def connect(self, script: Callable) -> ScriptedInstrument:
        [(port, factory, _backlog, interface)] = self.reactor.tcpServers
        self.assertEqual((port, interface), (15210, "127.0.0.1"))
        link = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40001))
        dev = ScriptedInstrument(script)
        self.pumps.append(attach(self.reactor, link, dev))
        return dev

    def test_listening(self) -> None:
        port = self.successResultOf(self.channel.when_listening())
        self.assertIs(port, self.channel.port)

    def test_results_forwarded_once_per_message(self) -> None:
        dev = self.connect(sends_when_acked)
        two = RESULT + RESULT.replace("5.4", "6.1")
        dev.state["todo"] = wire_frames(two)
        dev.write(ENQ)
        self.flush()
        self.assertEqual(len(self.forwarded), 2)
        ct, body, remote = self.forwarded[0]
        self.assertEqual(ct, ASTM)
        self.assertEqual(body, RESULT)
        self.assertTrue(remote.startswith("astm://127.0.0.1:"))
        self.assertEqual(remote, "astm://127.0.0.1:40001")
        self.assertIn("|6.1|", self.forwarded[1][1])

    def test_host_query_answered_on_same_link(self) -> None:
        self.answer = Reply(ANSWER, ASTM)

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

        dev = self.connect(script)
        dev.state.update(todo=wire_frames(QUERY), sending=True)
        dev.write(ENQ)
        self.flush()
        self.assertEqual(len(dev.frames), 4)
        self.assertEqual(dev.events[-1], ("control", EOT))
        self.assertEqual(self.forwarded[0][1], QUERY)
        self.assertEqual("".join(dev.messages()), ANSWER)

    def test_busy_when_forwards_pile_up(self) -> None:
        self.channel.inbound.max_pending = 1
        self.answer = Deferred()  # the relay has not answered yet

        def script(dev: ScriptedInstrument, kind: str, value: Any) -> None:
            todo = dev.state.setdefault("todo", [])
            if value == ACK and todo:
                dev.write(todo.pop(0))
            elif value == ACK:
                dev.write(EOT)

        dev = self.connect(script)
        dev.state["todo"] = wire_frames(RESULT)
        dev.write(ENQ)
        self.flush()
        self.assertEqual(len(self.forwarded), 1)
        dev.script = lambda *a: None
        dev.write(ENQ)
        self.flush()
        self.assertEqual(dev.events[-1], ("control", NAK))
        self.answer.callback(None)
        self.assertEqual(self.channel.inbound.pending, 0)

    def test_needs_exactly_one_address(self) -> None:
        self.assertRaises(ValueError, ASTMChannel, self.forward, reactor=self.reactor)
        self.assertRaises(ValueError, ASTMChannel, self.forward, reactor=self.reactor,
                          endpoint="tcp:0", serial="/dev/ttyS0")


class SerialChannelTests(SynchronousTestCase):
    """The channel holds the serial line open and reopens it with backoff when it is lost."""

    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.forwarded: list[tuple[str, str, str]] = []
        self.line = MemoryLine(self.reactor, lambda: ScriptedInstrument(sends_when_acked))
        self.url = "astm+serial:///dev/ttyANALYZER?baudrate=9600"

    def channel(self, **kw: Any) -> ASTMChannel:
        channel = ASTMChannel(lambda *a: self.forwarded.append(a), reactor=self.reactor,
                              serial=self.url, name="serial-test",
                              serial_endpoint=self.line.endpoint, **kw)
        channel.startService()

        def stop() -> None:
            d = channel.stopService()
            self.line.flush()
            self.successResultOf(d)
            self.assertEqual(self.reactor.getDelayedCalls(), [])
        self.addCleanup(stop)
        return channel

    def receive(self, device: ScriptedInstrument, text: str) -> None:
        device.state["todo"] = wire_frames(text)
        device.write(ENQ)
        self.line.flush()

    def test_results_and_reopen_after_unplug(self) -> None:
        channel = self.channel(reopen_delay=0.05)
        self.assertEqual(self.line.attempts, [0.0])
        [link] = channel.links
        self.assertTrue(link.connected_)
        self.receive(self.line.devices[0], RESULT)
        self.assertEqual(self.forwarded, [(ASTM, RESULT, self.url)])
        self.assertEqual([d.path for d in self.line.endpoints], ["/dev/ttyANALYZER"])

        self.line.refuse = True                       # the USB adapter is pulled
        self.line.devices[0].transport.loseConnection()
        self.line.flush()
        self.assertEqual(channel.links, set())
        self.line.run(0.05 + 0.1 + 0.2)               # a few failed reopen attempts
        self.assertEqual(len(self.line.attempts), 4)
        self.assertEqual([round(t, 3) for t in self.line.attempts[1:]], [0.05, 0.15, 0.35])
        self.assertEqual(channel.links, set())

        self.line.refuse = False                      # plugged back in
        self.line.run(0.4)
        self.assertEqual(len(self.line.attempts), 5)
        [link] = channel.links
        self.assertTrue(link.connected_)
        self.receive(self.line.devices[1], RESULT.replace("5.4", "7.7"))
        self.assertEqual(len(self.forwarded), 2)
        self.assertIn("|7.7|", self.forwarded[1][1])

    def test_reopen_delays_double_up_to_the_cap_and_reset_after_an_open(self) -> None:
        self.line.refuse = True
        self.channel(reopen_delay=1.0, max_reopen_delay=4.0)
        self.line.run(1 + 2 + 4 + 4)
        self.assertEqual(self.line.attempts, [0.0, 1.0, 3.0, 7.0, 11.0])
        self.line.refuse = False
        self.line.run(4)
        self.assertEqual(self.line.attempts[-1], 15.0)
        self.line.devices[0].transport.loseConnection()
        self.line.flush()
        self.line.run(1)                               # back to the first delay
        self.assertEqual(self.line.attempts[-1], 16.0)

    def test_jitter_is_added_to_every_delay(self) -> None:
        self.line.refuse = True
        self.channel(reopen_delay=1.0, reopen_jitter=lambda: 0.25)
        self.line.run(1.25 + 2.25)
        self.assertEqual(self.line.attempts, [0.0, 1.25, 3.5])

    def test_failed_opens_of_the_real_endpoint_leave_no_link_behind(self) -> None:
        from medagent.astm.serial import SerialClientEndpoint

        def missing(protocol: Any, device: str, reactor: Any, **settings: Any) -> None:
            raise OSError(2, f"could not open port {device}")

        channel = ASTMChannel(
            lambda *a: None, reactor=self.reactor, serial=self.url, reopen_delay=1.0,
            serial_endpoint=lambda dest: SerialClientEndpoint(self.reactor, dest.path, {},
                                                              portFactory=missing))
        channel.startService()
        self.addCleanup(channel.stopService)
        self.reactor.advance(1)
        self.reactor.advance(2)
        self.assertEqual(channel.links, set())

    def test_stop_while_waiting_to_reopen(self) -> None:
        self.line.refuse = True
        channel = self.channel(reopen_delay=1.0)
        self.line.run(0.5)
        d = channel.stopService()
        self.successResultOf(d)
        self.assertEqual(self.reactor.getDelayedCalls(), [])
        self.line.run(10)
        self.assertEqual(self.line.attempts, [0.0])

    def test_stop_closes_the_open_line(self) -> None:
        channel = self.channel()
        device = self.line.devices[0]
        d = channel.stopService()
        self.line.flush()
        self.successResultOf(d)
        self.assertTrue(device.lost.called)
        self.line.run(60)
        self.assertEqual(len(self.line.attempts), 1)
