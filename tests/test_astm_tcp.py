"""
Integration tests over real loopback TCP: L{ASTMSender} against scripted instruments
listening on 127.0.0.1 (a message and connection reuse, refused connect, a dropped
connection, contention with the instrument's own timing, ping) and L{ASTMChannel} receiving
and answering an analyzer that connects to it.  Waits are on events (L{Watch}) with a
timeout, never a sleep; every timer, retry and failure path is in the C{Clock}-driven
tests.test_astm_sender and tests.test_astm_channel.
"""

from __future__ import annotations

import json
from typing import Any, Callable

from twisted.internet import reactor
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint, connectProtocol
from twisted.internet.protocol import Factory
from twisted.trial.unittest import TestCase

from medagent.contenttypes import ASTM, JSON, PING
from medagent.delivery import DeliveryError, Reply
from medagent.astm.channel import ASTMChannel
from medagent.astm.codec import ACK, ENQ, EOT
from medagent.astm.sender import ASTMSender
from medagent.destination import parse_destination
from tests.astm_helpers import (
    ORDER, RESULT, ScriptedInstrument, Watch, ack_everything, wire_frames,
)


class SenderTestCase(TestCase):
    timeout = 30

    def setUp(self) -> Deferred:
        self.watch = Watch(reactor)
        self.devices: list[ScriptedInstrument] = []
        self.script: Callable = ack_everything
        self.inbound: list[tuple[str, str, str]] = []

        def build() -> ScriptedInstrument:
            dev = ScriptedInstrument(lambda *a: self.script(*a), self.watch)
            self.devices.append(dev)
            return dev

        factory = Factory.forProtocol(build)
        d = TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(factory)

        def listening(port: Any) -> None:
            self.port = port
            self.url = f"astm://127.0.0.1:{port.getHost().port}"
            self.addCleanup(port.stopListening)

        self.sender = ASTMSender(reactor, on_inbound=self.on_inbound)
        self.addCleanup(self.close_all)
        return d.addCallback(listening)

    def on_inbound(self, content_type: str, body: str, remote: str) -> None:
        self.inbound.append((content_type, body, remote))
        self.watch.poke()

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
            await self.watch.until(lambda: dev.events[-1] == ("control", EOT))
            self.assertEqual([k for k, _ in dev.events],
                             ["control", "frame", "frame", "frame", "frame", "control"])
            self.assertEqual([f.number for f in dev.frames], [1, 2, 3, 4])
            self.assertEqual("".join(dev.messages()), ORDER.replace("\n", "\r"))
            reply = await self.send("H|\\^&\rL|1|N\r")
            self.assertEqual(json.loads(reply.body)["frames"], 2)
            self.assertEqual(len(self.devices), 1)  # the same long-lived connection
            self.assertEqual([f.number for f in dev.frames], [1, 2, 3, 4, 1, 2])
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

    def test_contention_receives_instrument_message_first(self) -> Deferred:
        order: list[str] = []

        def script(dev: ScriptedInstrument, kind: str, value: Any) -> None:
            st = dev.state
            if value == ENQ and not st.get("contended"):
                st["contended"] = True
                dev.write(ENQ)  # both sent ENQ: contention, the instrument wins
                reactor.callLater(0.05, dev.write, ENQ)  # the instrument's own timing
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
            dev = self.devices[0]
            await self.watch.until(lambda: len(dev.events) == 2)
            self.assertEqual([v for _, v in dev.events], [ENQ, EOT])
        return ensureDeferred(go())


class ChannelTests(TestCase):
    """An analyzer connects to our TCP channel and sends results / a host query."""

    timeout = 30

    def setUp(self) -> Deferred:
        self.watch = Watch(reactor)
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
        self.watch.poke()
        return self.answer

    async def connect(self, script: Callable) -> ScriptedInstrument:
        dev = ScriptedInstrument(script, self.watch)
        await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", self.port), dev)

        async def drop() -> None:
            if not dev.lost.called:
                dev.transport.loseConnection()
                await dev.lost
        self.addCleanup(lambda: ensureDeferred(drop()))
        return dev

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
            await self.watch.until(lambda: len(self.forwarded) == 2)
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
            await self.watch.until(
                lambda: len(dev.frames) == 4 and dev.events[-1] == ("control", EOT))
            self.assertEqual(self.forwarded[0][1], query)
            self.assertEqual("".join(dev.messages()), answer)
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
