"""
ASTM over real serial ports without hardware: a pty pair from C{os.openpty()}, our side on
Twisted's real C{SerialPort} (pyserial) through the slave device, the test playing the
analyzer on the master end.  The device path is a symlink so that a test can unplug the
"adapter" (close the pty) and plug a new one in under the same name.

Integration tests: they wait for events (L{Watch}) with a timeout and never sleep; the
timers and reopen delays are asserted in the C{Clock}-driven tests.test_astm_sender and
tests.test_astm_channel.
"""

from __future__ import annotations

import json
import os
import tempfile
import tty
from typing import Any, Callable

from twisted.internet import abstract, fdesc, reactor
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.interfaces import IProtocolFactory, IStreamClientEndpoint
from twisted.python.failure import Failure
from twisted.trial.unittest import SkipTest, TestCase
from zope.interface import implementer

from medagent.astm.channel import ASTMChannel
from medagent.contenttypes import ASTM
from medagent.delivery import DeliveryError
from medagent.astm.codec import ACK, ENQ, EOT, NAK
from medagent.astm.sender import ASTMSender
from medagent.astm.serial import SerialClientEndpoint, reopen_policy
from medagent.astm.settings import serial_settings
from medagent.destination import Destination, parse_destination
from tests.astm_helpers import ORDER, RESULT, ScriptedInstrument, Watch, wire_frames

try:
    import serial  # noqa: F401  (pyserial, which twisted.internet.serialport needs)
except ImportError:  # pragma: no cover
    serial = None


class _MasterEnd(abstract.FileDescriptor):
    """The analyzer's end of the cable: the pty master fd as a Twisted transport."""

    connected = 1

    def __init__(self, fd: int, protocol: Any) -> None:
        abstract.FileDescriptor.__init__(self, reactor)
        self.fd = fd
        fdesc.setNonBlocking(fd)
        self.protocol = protocol
        protocol.makeConnection(self)
        self.startReading()

    def fileno(self) -> int:
        return self.fd

    def doRead(self) -> Any:
        return fdesc.readFromFD(self.fd, self.protocol.dataReceived)

    def writeSomeData(self, data: bytes) -> Any:
        return fdesc.writeToFD(self.fd, data)

    def connectionLost(self, reason: Any) -> None:
        abstract.FileDescriptor.connectionLost(self, reason)
        os.close(self.fd)
        self.fd = -1
        self.protocol.connectionLost(reason)


class PtyCable:
    """One pty pair plugged in at C{path}; L{unplug} makes the device vanish."""

    def __init__(self, path: str, script: Callable, watch: Watch | None = None) -> None:
        master, slave = os.openpty()
        tty.setraw(slave)
        tty.setraw(master)
        self.slave = slave  # held open so the master never reads EIO before we open the port
        self.path = path
        if os.path.lexists(path):
            os.unlink(path)
        os.symlink(os.ttyname(slave), path)
        self.device = ScriptedInstrument(script, watch)
        self.end = _MasterEnd(master, self.device)

    def unplug(self) -> Deferred:
        if os.path.lexists(self.path):
            os.unlink(self.path)
        if self.slave >= 0:
            os.close(self.slave)
            self.slave = -1
        if self.end.fd >= 0:
            self.end.loseConnection()
        return self.device.lost


def ack_everything(dev: ScriptedInstrument, kind: str, value: Any) -> None:
    if value == ENQ or kind == "frame":
        dev.write(ACK)


@implementer(IStreamClientEndpoint)
class WatchedSerialEndpoint:
    """The real L{SerialClientEndpoint}, counting opens (and telling the L{Watch})."""

    def __init__(self, destination: Destination, watch: Watch,
                 on_failure: Callable[[], None] | None = None) -> None:
        self.endpoint = SerialClientEndpoint(reactor, destination.path,
                                             serial_settings(destination))
        self.watch = watch
        self.on_failure = on_failure
        self.opened = 0
        self.failed = 0

    def connect(self, protocolFactory: IProtocolFactory) -> Deferred:
        def done(result: Any) -> Any:
            if isinstance(result, Failure):
                self.failed += 1
                if self.on_failure is not None:
                    self.on_failure()
            else:
                self.opened += 1
            reactor.callLater(0, self.watch.poke)  # after the caller has seen the result
            return result

        return self.endpoint.connect(protocolFactory).addBoth(done)


class SerialTestCase(TestCase):
    def setUp(self) -> None:
        if serial is None:
            raise SkipTest("pyserial is not installed")
        self.watch = Watch(reactor)
        self.tmp = tempfile.mkdtemp(prefix="medagent-astm-tty-")
        self.path = os.path.join(self.tmp, "ttyANALYZER")
        self.script: Callable = ack_everything
        self.cables: list[PtyCable] = []
        self.inbound: list[tuple[str, str, str]] = []
        self.sender = self.make_sender()
        self.addCleanup(self.cleanup)

    def make_sender(self, **kw: Any) -> ASTMSender:
        return ASTMSender(reactor, on_inbound=self.on_inbound, open_retries=2,
                          open_backoff=reopen_policy(0.05, 0.05), **kw)

    def on_inbound(self, ct: str, body: str, remote: str) -> None:
        self.inbound.append((ct, body, remote))
        self.watch.poke()

    def plug(self) -> PtyCable:
        cable = PtyCable(self.path, lambda *a: self.script(*a), self.watch)
        self.cables.append(cable)
        return cable

    async def _cleanup(self) -> None:
        await self.sender.close()
        for cable in self.cables:
            await cable.unplug()
        os.rmdir(self.tmp)

    def cleanup(self) -> Deferred:
        return ensureDeferred(self._cleanup())

    def url(self, query: str = "?baudrate=9600&bytesize=8&parity=N&stopbits=1") -> str:
        return f"astm+serial://{self.path}{query}"

    def send(self, body: str = ORDER, query: str | None = None) -> Deferred:
        dest = parse_destination(self.url() if query is None else self.url(query))
        return self.sender.send(dest, ASTM, body, {})


class SerialSenderTests(SerialTestCase):
    def test_order_over_serial(self) -> Deferred:
        async def go() -> None:
            cable = self.plug()
            reply = await self.send()
            self.assertEqual(json.loads(reply.body), {"frames": 4, "records": 4,
                                                      "retransmissions": 0})
            dev = cable.device
            await self.watch.until(lambda: dev.events and dev.events[-1] == ("control", EOT))
            self.assertEqual("".join(dev.messages()), ORDER.replace("\n", "\r"))
            self.assertEqual([f.number for f in dev.frames], [1, 2, 3, 4])
        return ensureDeferred(go())

    def test_bad_checksum_nak_then_retransmit(self) -> Deferred:
        """The analyzer NAKs frame 2 twice (as for a line error); we resend it, same number."""
        def script(dev: ScriptedInstrument, kind: str, value: Any) -> None:
            if value == ENQ:
                dev.write(ACK)
            elif kind == "frame":
                n = dev.state["n"] = dev.state.get("n", 0) + 1
                dev.write(NAK if n in (2, 3) else ACK)

        self.script = script

        async def go() -> None:
            cable = self.plug()
            reply = await self.send()
            self.assertEqual(json.loads(reply.body)["retransmissions"], 2)
            self.assertEqual([f.number for f in cable.device.frames], [1, 2, 2, 2, 3, 4])
        return ensureDeferred(go())

    def test_instrument_result_during_contention(self) -> Deferred:
        def script(dev: ScriptedInstrument, kind: str, value: Any) -> None:
            st = dev.state
            if value == ENQ and not st.get("contended"):
                st["contended"] = True
                dev.write(ENQ)
                reactor.callLater(0.05, dev.write, ENQ)
                st["todo"] = wire_frames(RESULT)
            elif value == ACK and st.get("todo") is not None:
                if st["todo"]:
                    dev.write(st["todo"].pop(0))
                else:
                    st["todo"] = None
                    dev.write(EOT)
            elif value == ENQ or kind == "frame":
                dev.write(ACK)

        self.script = script

        async def go() -> None:
            self.plug()
            reply = await self.send()
            self.assertEqual(self.inbound, [(ASTM, RESULT, self.url())])
            self.assertEqual(json.loads(reply.body)["frames"], 4)
        return ensureDeferred(go())

    def test_port_missing(self) -> Deferred:
        async def go() -> None:
            with self.assertRaises(DeliveryError) as e:
                await self.send()
            self.assertEqual(e.exception.phase, "connect")
            self.assertTrue(e.exception.transient)
            self.assertIn("serial port missing", str(e.exception))
        return ensureDeferred(go())

    def test_port_appears_during_open_backoff(self) -> Deferred:
        endpoints: list[WatchedSerialEndpoint] = []

        def plug_once() -> None:
            if not self.cables:
                self.plug()  # after the first failed open, before the retry

        def endpoint(destination: Destination) -> WatchedSerialEndpoint:
            endpoints.append(WatchedSerialEndpoint(destination, self.watch, plug_once))
            return endpoints[-1]

        async def go() -> None:
            await self.sender.close()
            self.sender = self.make_sender(endpoint_factory=endpoint)
            reply = await self.send()
            self.assertEqual(json.loads(reply.body)["frames"], 4)
            self.assertEqual((endpoints[0].failed, endpoints[0].opened), (1, 1))
        return ensureDeferred(go())

    def test_port_vanishes_mid_message_then_reopened(self) -> Deferred:
        def script(dev: ScriptedInstrument, kind: str, value: Any) -> None:
            if value == ENQ:
                dev.write(ACK)
            elif kind == "frame":
                if value.number == 2:
                    reactor.callLater(0, self.cables[0].unplug)  # USB adapter pulled
                else:
                    dev.write(ACK)

        self.script = script

        async def go() -> None:
            self.plug()
            with self.assertRaises(DeliveryError) as e:
                await self.send()
            self.assertEqual(e.exception.phase, "connection")
            self.assertTrue(e.exception.transient)
            self.script = ack_everything
            with self.assertRaises(DeliveryError) as e:
                await self.send()          # still unplugged
            self.assertEqual(e.exception.phase, "connect")
            cable = self.plug()            # plugged back in, same device name
            reply = await self.send()
            self.assertEqual(json.loads(reply.body)["frames"], 4)
            self.assertEqual([f.number for f in cable.device.frames], [1, 2, 3, 4])
        return ensureDeferred(go())

    def test_ping_over_serial(self) -> Deferred:
        async def go() -> None:
            self.plug()
            reply = await self.sender.ping(parse_destination(self.url()))
            self.assertIn("ENQ answered ACK", reply.body)
        return ensureDeferred(go())


class SerialChannelTests(SerialTestCase):
    def test_results_and_reopen_after_unplug(self) -> Deferred:
        forwarded: list[tuple[str, str, str]] = []

        def sender_script(dev: ScriptedInstrument, kind: str, value: Any) -> None:
            todo = dev.state.get("todo")
            if value == ACK and todo is not None:
                if todo:
                    dev.write(todo.pop(0))
                else:
                    dev.state["todo"] = None
                    dev.write(EOT)

        self.script = sender_script

        line: list[WatchedSerialEndpoint] = []

        def endpoint(destination: Destination) -> WatchedSerialEndpoint:
            line.append(WatchedSerialEndpoint(destination, self.watch))
            return line[0]

        def link_up() -> bool:
            return bool(channel.links) and next(iter(channel.links)).connected_

        def forward(ct: str, body: str, remote: str) -> None:
            forwarded.append((ct, body, remote))
            self.watch.poke()

        async def go() -> None:
            cable = self.plug()
            channel.startService()
            self.addCleanup(channel.stopService)
            await self.watch.until(link_up)
            cable.device.state["todo"] = wire_frames(RESULT)
            cable.device.write(ENQ)
            await self.watch.until(lambda: len(forwarded) == 1)
            self.assertEqual(forwarded[0], (ASTM, RESULT, self.url()))
            await cable.unplug()
            await self.watch.until(lambda: line[0].failed >= 3)  # a few failed reopen attempts
            self.assertFalse(channel.links)
            cable = self.plug()
            await self.watch.until(lambda: line[0].opened == 2 and link_up())
            cable.device.state["todo"] = wire_frames(RESULT.replace("5.4", "7.7"))
            cable.device.write(ENQ)
            await self.watch.until(lambda: len(forwarded) == 2)
            self.assertIn("|7.7|", forwarded[1][1])

        channel = ASTMChannel(forward, reactor=reactor, serial=self.url(), reopen_delay=0.05,
                              name="serial-test", serial_endpoint=endpoint)
        return ensureDeferred(go())
