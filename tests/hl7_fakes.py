"""
Shared test doubles of the MLLP tests (client, sender, server, channel, lanes): HL7 samples,
Deferred helpers, an in-memory device endpoint and a fake cloud forward.  No test cases here.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import ConnectionDone, ConnectionRefusedError
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from medagent.contenttypes import HL7_V2
from medagent.delivery import Reply
from medagent.hl7.channel import MLLPChannel
from medagent.hl7.client import MLLPClientProtocol
from medagent.hl7.message import build_ack, parse_ack
from medagent.hl7.mllp import MLLPDecoder, frame


def orm(cid: str = "C1", extra: str = "", msh18: str = "") -> str:
    return (
        f"MSH|^~\\&|EHR|HOSP|LIS|LAB|20240115103000||ORM^O01|{cid}|P|2.5.1||||||{msh18}\r"
        f"PID|1||12345^^^MRN||DOE^JOHN{extra}\r"
        "ORC|NW|1\r"
    )


def ack_bytes(cid: str, code: str = "AA") -> bytes:
    return build_ack(orm(cid), code).encode("ascii")


def frames_written(transport: StringTransport) -> list[bytes]:
    out = MLLPDecoder().feed(transport.value())
    transport.clear()
    return out


def result_of(d: Deferred) -> Any:
    """The value of a fired Deferred (failing the test if it has not fired or failed)."""
    results: list[Any] = []
    d.addBoth(results.append)
    assert results, "Deferred has not fired"
    if isinstance(results[0], Failure):
        results[0].raiseException()
    return results[0]


def failure_of(d: Deferred) -> Failure:
    results: list[Any] = []
    d.addBoth(results.append)
    assert results, "Deferred has not fired"
    assert isinstance(results[0], Failure), f"Deferred succeeded with {results[0]!r}"
    return results[0]


class ClosingTransport(StringTransport):
    """A StringTransport whose close reaches the protocol (as a real one would, later)."""

    def loseConnection(self) -> None:
        if not self.disconnecting:
            self.disconnecting = True
            self.protocol.connectionLost(Failure(ConnectionDone()))

    def abortConnection(self) -> None:
        self.disconnected = True
        self.loseConnection()


class FakeEndpoint:
    """Connects to an in-memory 'device'; can refuse or hang."""

    def __init__(self, mode: str = "ok") -> None:
        self.mode = mode
        self.attempts = 0
        self.connections: list[tuple[MLLPClientProtocol, ClosingTransport]] = []

    def connect(self, factory: Any) -> Deferred:
        self.attempts += 1
        if self.mode == "refuse":
            return fail(ConnectionRefusedError("Connection refused"))
        if self.mode == "hang":
            return Deferred()
        proto = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 2575))
        transport = ClosingTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 2575))
        transport.protocol = proto
        proto.makeConnection(transport)
        self.connections.append((proto, transport))
        return succeed(proto)

    @property
    def current(self) -> tuple[MLLPClientProtocol, ClosingTransport]:
        return self.connections[-1]

    def answer(self, code: str = "AA") -> list[bytes]:
        """The device reads what was written on the latest connection and ACKs each message."""
        proto, transport = self.current
        received = frames_written(transport)
        for payload in received:
            proto.dataReceived(frame(build_ack(payload.decode("latin-1"), code).encode("latin-1")))
        return received

    def device_closes(self) -> None:
        proto, transport = self.current
        transport.disconnecting = True
        proto.connectionLost(Failure(ConnectionDone()))


class Cloud:
    """A fake forward(): records what went up, answers when the test says so."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, str]] = []
        self.pending: list[Deferred] = []

    def __call__(self, content_type: str, body: str, remote: str) -> Deferred:
        self.calls.append((content_type, body, remote))
        d: Deferred = Deferred()
        self.pending.append(d)
        return d

    def answer(self, code: str = "AA", index: int = 0, **kw: Any) -> None:
        body = self.calls[index][1]
        self.pending[index].callback(Reply(body=build_ack(body, code, **kw), content_type=HL7_V2))


class ChannelHarness:
    """Mixin of the channel and server tests: a channel with one connection from a device."""

    clock: Clock
    cloud: Cloud
    channel: MLLPChannel

    def make(self, **kw: Any) -> tuple[Any, StringTransport]:
        self.clock = Clock()
        self.cloud = Cloud()
        self.channel = MLLPChannel(self.cloud, clock=self.clock, **kw)
        proto = self.channel.buildProtocol(IPv4Address("TCP", "10.0.0.5", 51234))
        transport = StringTransport(peerAddress=IPv4Address("TCP", "10.0.0.5", 51234))
        proto.makeConnection(transport)
        return proto, transport

    def acks(self, transport: StringTransport) -> list[tuple[str, str]]:
        out = []
        for payload in frames_written(transport):
            a = parse_ack(payload.decode())
            out.append((a.code, a.control_id))
        return out
