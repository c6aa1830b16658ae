"""
Test doubles for the ASTM sender and channel: a scripted instrument (every reply decided by
the test), an in-memory line that connects whatever the code under test builds to a new
instrument through C{twisted.test.iosim} (driven with a C{Clock}: nothing waits on real
time), and L{Watch}, which lets the loopback and pty integration tests wait for an event
with a timeout instead of sleeping and then asserting.
"""

from __future__ import annotations

from typing import Any, Callable

from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.interfaces import IProtocolFactory, IReactorTime, IStreamClientEndpoint
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock
from twisted.test import iosim
from zope.interface import implementer

from medagent.astm import codec
from medagent.astm.codec import ACK, ENQ

ORDER = ("H|\\^&|||MEDAGENT|||||ANALYZER1||P|LIS2-A2|20240115103000\n"
         "P|1|PID12345|||DOE^JOHN^A||19800101|M\n"
         "O|1|SID0001||^^^GLU\\^^^CREA|R|20240115100000|20240115093000||||N||||SERUM||||||||||O\n"
         "L|1|N\n")
RESULT = "H|\\^&|||ANALYZER1\rP|1\rO|1|SID0001\rR|1|^^^GLU|5.4|mmol/L||N||F\rL|1|N\r"


def wire_frames(text: str) -> list[bytes]:
    """Wire frames of a message as a conforming instrument sends them."""
    out, n = [], 1
    for t, final in codec.frame_texts(text.encode()):
        out.append(codec.build_frame(n, t, final))
        n = codec.next_frame_number(n)
    return out


class Watch:
    """
    Waits for a condition to become true, checked whenever something it watches changed
    (L{poke}): an event, never a sleep.  Every wait has a timeout on C{clock}.
    """

    def __init__(self, clock: IReactorTime) -> None:
        self.clock = clock
        self._waiters: list[tuple[Callable[[], Any], Deferred]] = []

    def poke(self) -> None:
        for entry in list(self._waiters):
            predicate, d = entry
            if d.called:
                self._waiters.remove(entry)
            elif predicate():
                self._waiters.remove(entry)
                d.callback(None)

    def until(self, predicate: Callable[[], Any], timeout: float = 10.0) -> Deferred:
        """Fires once C{predicate()} is true; fails with C{TimeoutError} after C{timeout}."""
        if predicate():
            return succeed(None)
        d: Deferred = Deferred()
        self._waiters.append((predicate, d))
        return d.addTimeout(timeout, self.clock)


class ScriptedInstrument(Protocol):
    """An instrument whose every reply a test decides: C{script(self, kind, value)}."""

    def __init__(self, script: Callable[["ScriptedInstrument", str, Any], None],
                 watch: Watch | None = None) -> None:
        self.script = script
        self.watch = watch
        self.decoder = codec.FrameDecoder()
        self.events: list[tuple[str, Any]] = []
        self.frames: list[codec.Frame] = []
        self.lost: Deferred = Deferred()
        self.state: dict[str, Any] = {}

    def dataReceived(self, data: bytes) -> None:
        self.decoder.feed(data)
        for kind, value in self.decoder.events():
            self.events.append((kind, value))
            if kind == "frame":
                self.frames.append(value)
            self.script(self, kind, value)
        if self.watch is not None:
            self.watch.poke()

    def connectionLost(self, reason: Any = None) -> None:
        self.lost.callback(None)
        if self.watch is not None:
            self.watch.poke()

    def write(self, data: bytes) -> None:
        self.transport.write(data)

    def messages(self) -> list[str]:
        """Frame texts, as records each ending in CR."""
        return [f.text.decode() for f in self.frames]


def ack_everything(dev: ScriptedInstrument, kind: str, value: Any) -> None:
    if value == ENQ or kind == "frame":
        dev.write(ACK)


def attach(clock: Clock, ours: Any, device: ScriptedInstrument) -> iosim.IOPump:
    """Connect our protocol (client side) and the device in memory; returns the pump."""
    ours_io = iosim.FakeTransport(ours, isServer=False,
                                  hostAddress=IPv4Address("TCP", "127.0.0.1", 40000),
                                  peerAddress=IPv4Address("TCP", "127.0.0.1", 5000))
    dev_io = iosim.FakeTransport(device, isServer=True)
    return iosim.connect(device, dev_io, ours, ours_io, greet=False, clock=clock)


class MemoryLine:
    """
    Where the code under test connects to: each connect builds its protocol, a new
    instrument (C{make_device()}) and joins them with iosim.  C{refuse} makes connects fail
    (``ConnectionRefusedError``, or C{refuse_with}: a serial port that is not there).
    """

    def __init__(self, clock: Clock, make_device: Callable[[], ScriptedInstrument]) -> None:
        self.clock = clock
        self.make_device = make_device
        self.devices: list[ScriptedInstrument] = []
        self.pumps: list[iosim.IOPump] = []
        self.attempts: list[float] = []
        self.endpoints: list[Any] = []
        self.refuse = False
        self.refuse_with: Callable[[], Exception] = ConnectionRefusedError

    def endpoint(self, destination: Any = None) -> IStreamClientEndpoint:
        """An endpoint factory for C{ASTMSender(endpoint_factory=...)} and the channel."""
        self.endpoints.append(destination)
        return _MemoryEndpoint(self)

    def flush(self) -> None:
        """Move every byte and disconnect until nothing moves."""
        moved = True
        while moved:
            moved = False
            for pump in self.pumps:
                moved = pump.flush() or moved

    def run(self, seconds: float = 0.0) -> None:
        """Let C{seconds} pass on the clock, moving bytes after every timer that fires."""
        end = self.clock.seconds() + seconds
        self.flush()
        while True:
            due = [c.getTime() for c in self.clock.getDelayedCalls() if c.getTime() <= end]
            if not due:
                break
            self.clock.advance(max(min(due) - self.clock.seconds(), 0))
            self.flush()
        self.clock.advance(max(end - self.clock.seconds(), 0))
        self.flush()


@implementer(IStreamClientEndpoint)
class _MemoryEndpoint:
    def __init__(self, line: MemoryLine) -> None:
        self.line = line

    def connect(self, protocolFactory: IProtocolFactory) -> Deferred:
        line = self.line
        line.attempts.append(line.clock.seconds())
        if line.refuse:
            return fail(line.refuse_with())
        ours = protocolFactory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 5000))
        device = line.make_device()
        line.devices.append(device)
        line.pumps.append(attach(line.clock, ours, device))
        return succeed(ours)
