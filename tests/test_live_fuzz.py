"""
A bounded live fuzz run against real ``twistd`` relay and agent processes on loopback:
random and malformed HTTP requests, websocket frames and device bytes (a few thousand inputs,
well under a minute), then both processes must still serve, every push accepted before the
run must be delivered exactly once to a recording MLLP sink, and no payload may show up in
either process's log.

Deterministic: one seeded C{random.Random} drives every input.
"""

from __future__ import annotations

import json
import random
import time
from typing import Any, Callable

import treq
from twisted.internet import protocol, reactor
from twisted.internet.defer import Deferred, DeferredList, ensureDeferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase

from medagent.hl7 import message as hl7
from medagent.hl7.mllp import MLLPDecoder, frame
from tests import procs
from tests.test_hostile import RawWebSocket, _Recorder

SEED = 20261203
#: what a run may cost, at most (inputs stop early if time runs out)
MAX_HTTP, MAX_WS_FRAMES, MAX_DEVICE = 1200, 1200, 600
TIME_BUDGET = 35.0
WORKERS = 6
#: planted in every fuzzed body: it must never appear in a log
MARKER = "PHIMARKER"


def hl7_message(ctrl: str) -> str:
    return (f"MSH|^~\\&|EHR|HOSP|LIS|LAB|20240101120000||ORM^O01|{ctrl}|P|2.5.1\r"
            f"PID|1||{MARKER}^^^MRN||DOE^JANE\r")


class RecordingSink(protocol.Protocol):
    """A device: records every MLLP payload it receives and answers AA."""

    def connectionMade(self) -> None:
        self.decoder = MLLPDecoder()

    def dataReceived(self, data: bytes) -> None:
        for payload in self.decoder.feed(data):
            text = payload.decode("utf-8", "replace")
            self.factory.received.append(text)
            try:
                self.transport.write(frame(hl7.build_ack(text, "AA").encode()))
            except hl7.HL7Error:
                pass  # not HL7: no answer (the sender times out)


class Fuzzer:
    """Random inputs, all drawn from one seeded generator."""

    def __init__(self, rng: random.Random, token: str, agent_id: str, device_id: str) -> None:
        self.r = rng
        self.token = token
        self.agent_id = agent_id
        self.device_id = device_id

    def junk(self, n: int = 60) -> bytes:
        r = self.r
        alphabet = [b"\x0b", b"\x1c", b"\r", b"\n", b"\x00", b"\xff", b"{", b"[", b'"', b"|",
                    b"MSH|^~\\&|", MARKER.encode(), b"%", b"\\u0000", b" "]
        return b"".join(r.choice(alphabet) if r.random() < 0.5 else
                        bytes([r.randrange(256)]) for _ in range(r.randrange(n)))

    def json_value(self, depth: int = 0) -> Any:
        r = self.r
        kind = r.randrange(9 if depth < 4 else 5)
        if kind == 0:
            return None
        if kind == 1:
            return r.choice([True, False])
        if kind == 2:
            return r.randrange(-2 ** 63, 2 ** 63)
        if kind == 3:
            return r.random() * 10 ** r.randrange(-5, 300)
        if kind == 4:
            return r.choice(["", MARKER, "x" * r.randrange(300), "Device/missing",
                             "mllp://127.0.0.1:1", "Parameters", "\u0000\ud7ff", "true"])
        if kind in (5, 6):
            return [self.json_value(depth + 1) for _ in range(r.randrange(4))]
        keys = ["resourceType", "destination", "contentType", "body", "waitTimeout",
                "waitForResponse", "parameter", "meta", "id", "name", "value", "type",
                "callback", "agentId", "accessToken", "identifier", "ttl", "returnAck"]
        return {r.choice(keys): self.json_value(depth + 1) for _ in range(r.randrange(5))}

    def json_body(self) -> bytes:
        r = self.r
        choice = r.randrange(6)
        if choice == 0:
            n = r.randrange(10, 5000)
            return b"[" * n + b"]" * (n if r.random() < 0.5 else n // 2)
        if choice == 1:
            return self.junk(200)
        if choice == 2:  # a push that must fail validation: body has no MSH
            return json.dumps({"destination": f"Device/{self.device_id}", "contentType":
                               "x-application/hl7-v2+er7", "body": f"PID|{MARKER}",
                               "waitTimeout": r.choice([-1, 1.5, "x", None])}).encode()
        return json.dumps(self.json_value()).encode()

    def http_request(self) -> bytes:
        r = self.r
        if r.random() < 0.15:
            return self.junk(400) + b"\r\n\r\n"
        method = r.choice([b"GET", b"POST", b"PUT", b"DELETE", b"PATCH", b"OPTIONS", b"G\x00T",
                           b"X" * 300])
        path = r.choice([
            b"/healthz", b"/oauth2/token", b"/auth/me", b"/fhir/R4/Device", b"/fhir/R4/Agent",
            f"/fhir/R4/Agent/{self.agent_id}/$push".encode(), b"/fhir/R4/Agent/$push?identifier=",
            f"/fhir/R4/Agent/{self.agent_id}/$status".encode(), b"/fhir/R4/AgentPush?_count=x",
            b"/fhir/R4/Device/%00%ff", b"/fhir/R4/../../etc/passwd", b"/ws/agent",
            b"/fhir/R4/Patient?name=" + b"%" * 50, b"/" + self.junk(40).replace(b" ", b"")])
        headers = [b"Host: 127.0.0.1"]
        if r.random() < 0.7:
            headers.append(b"Authorization: " + r.choice([
                f"Bearer {self.token}".encode(), b"Bearer garbage", b"Basic !!!", b"Basic " +
                b"A" * 500, b"Bearer"]))
        headers.append(b"Content-Type: " + r.choice([
            b"application/fhir+json", b"application/json", b"application/x-www-form-urlencoded",
            b"text/plain", b"application/json; charset=utf-16", b""]))
        body = self.json_body() if r.random() < 0.8 else (
            b"grant_type=client_credentials&client_id=" + self.junk(30).replace(b"&", b"")
            + b"&client_secret=wrong" + b"&x=1" * r.randrange(40))
        framing = r.randrange(5)
        if framing == 0:
            headers.append(b"Content-Length: %d" % len(body))
        elif framing == 1:
            headers.append(b"Content-Length: " + r.choice([b"-1", b"99999999999", b"abc", b"5"]))
        elif framing == 2:
            headers.append(b"Transfer-Encoding: chunked")
            body = b"%x\r\n" % len(body) + body + b"\r\n" + r.choice([b"0\r\n\r\n", b"zz\r\n"])
        elif framing == 3:
            headers += [b"X-Pad: " + b"a" * r.randrange(20000)] * r.randrange(3)
        return method + b" " + path + b" HTTP/1.1\r\n" + b"\r\n".join(headers) + b"\r\n\r\n" + body

    def ws_frame(self) -> bytes:
        r = self.r
        kind = r.randrange(8)
        if kind == 0:  # arbitrary bytes as a text frame (often invalid UTF-8)
            return RawWebSocket.header(len(p := self.junk(100))) + p
        if kind == 1:  # random opcode / reserved bits / unmasked
            p = self.junk(30)
            return bytes([r.randrange(256), len(p) | r.choice([0, 0x80])]) + b"\0\0\0\0" + p
        if kind == 2:  # a length the relay must not buffer
            return RawWebSocket.header(r.choice([70_000, 10 ** 6, 2 ** 40])) + self.junk(100)
        if kind == 3:
            p = self.json_body()
            return RawWebSocket.header(len(p)) + p
        messages = [
            {"type": "agent:connect:request", "agentId": self.agent_id,
             "accessToken": r.choice(["bad", self.token, ""]), "callback": MARKER},
            {"type": "agent:connect:request", "agentId": "x" * r.randrange(100),
             "accessToken": "t"},
            {"type": "agent:transmit:response", "pushId": "p", "body": MARKER, "remote": "r",
             "statusCode": r.choice([200, "x", 10 ** 30])},
            {"type": "agent:heartbeat:request"},
            {"type": "t" * r.randrange(1000), "body": MARKER},
        ]
        p = json.dumps(r.choice(messages)).encode()
        return RawWebSocket.header(len(p)) + p

    def device_bytes(self) -> bytes:
        r = self.r
        parts = []
        for _ in range(r.randrange(1, 5)):
            choice = r.randrange(4)
            if choice == 0:
                parts.append(self.junk(200))
            elif choice == 1:
                parts.append(b"\x0b" + self.junk(200) + b"\x1c\r")
            elif choice == 2:  # a message with no MSH-10, or broken separators
                parts.append(frame(r.choice([f"MSH|^~\\&|A|B||||||P|2.5\rPID|{MARKER}",
                                             f"MSH\rPID|{MARKER}", "MSH|"]).encode()))
            else:
                parts.append(b"\x0b" + b"x" * r.randrange(100_000))  # no end: a half frame
        return b"".join(parts)


class LiveFuzz(TestCase):
    timeout = 240

    def setUp(self) -> Deferred:
        return ensureDeferred(self._setUp())

    async def _setUp(self) -> None:
        self.relay, self.admin = await procs.relay_with_admin(self)
        sink = protocol.ServerFactory.forProtocol(RecordingSink)
        sink.received = []
        self.sink = sink
        port = reactor.listenTCP(0, sink, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        self.device = await self.admin.create(
            {"resourceType": "Device", "url": f"mllp://127.0.0.1:{port.getHost().port}"})
        self.channel_port = procs.free_port()
        endpoint = await self.admin.create({
            "resourceType": "Endpoint", "status": "active",
            "address": f"mllp://127.0.0.1:{self.channel_port}"})
        self.agent = await self.admin.create({
            "resourceType": "Agent", "name": "fuzzed", "status": "active",
            "channel": [{"name": "in", "endpoint": {"reference": f"Endpoint/{endpoint['id']}"},
                         "targetReference": {"reference": "Bot/none"}}]})
        creds = self.relay.create_client("agent", [self.agent["id"]])
        self.agent_proc = procs.agent_process(self, self.relay.url, creds, self.agent["id"])
        await self.agent_proc.wait_for("Channel in: mllp", timeout=30)
        await self.wait_connected()

    async def status(self) -> str:
        params = await self.admin.request_json(
            "GET", f"/fhir/R4/Agent/{self.agent['id']}/$status")
        return params["parameter"][0]["valueCode"]

    async def wait_connected(self) -> None:
        async def connected() -> bool:
            return (await self.status()) == "connected"

        await procs.wait_until(connected, timeout=30, interval=0.1, what="agent connected")

    async def raw(self, port: int, data: bytes, wait: float = 0.3,
                  chunked: random.Random | None = None) -> None:
        p = await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), _Recorder())
        try:
            if chunked is not None and len(data) > 10 and chunked.random() < 0.3:
                cut = chunked.randrange(1, len(data))
                p.transport.write(data[:cut])
                await deferLater(reactor, 0.01, lambda: None)
                data = data[cut:]
            p.transport.write(data)
            await _either(p.lost, wait)
        finally:
            if not p.lost.called:
                p.transport.abortConnection()
                await p.lost

    async def ws_session(self, fuzz: Fuzzer, frames: int) -> int:
        ws = await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", self.relay.port),
                                   RawWebSocket())
        sent = 0
        try:
            await _either(ws.handshake, 5)
            for _ in range(frames):
                if ws.closed.called:
                    break
                ws.transport.write(fuzz.ws_frame())
                sent += 1
                await deferLater(reactor, 0.002, lambda: None)
            await _either(ws.closed, 0.2)
        finally:
            if not ws.closed.called:
                ws.transport.abortConnection()
                await ws.closed
        return sent

    def test_fuzz_then_still_serving(self) -> Deferred:
        async def go() -> None:
            # Pushes accepted before the run: each must reach the device exactly once.
            controls = [f"FZ{n:06d}" for n in range(20)]
            status_paths = []
            for ctrl in controls:
                accepted = await self.admin.push_to_agent(
                    self.agent, f"Device/{self.device['id']}", hl7_message(ctrl),
                    "x-application/hl7-v2+er7")
                status_paths.append(
                    accepted["issue"][0]["diagnostics"].split(self.relay.url, 1)[1])
            token = await self.admin.access_token()
            counts = {"http": 0, "ws": 0, "device": 0}
            deadline = time.monotonic() + TIME_BUDGET

            def left() -> bool:
                return time.monotonic() < deadline

            async def http_worker(rng: random.Random) -> None:
                fuzz = Fuzzer(rng, token, self.agent["id"], self.device["id"])
                while counts["http"] < MAX_HTTP and left():
                    counts["http"] += 1
                    await self.raw(self.relay.port, fuzz.http_request(), 0.15, rng)

            async def ws_worker(rng: random.Random) -> None:
                fuzz = Fuzzer(rng, token, self.agent["id"], self.device["id"])
                while counts["ws"] < MAX_WS_FRAMES and left():
                    counts["ws"] += await self.ws_session(fuzz, rng.randrange(1, 30))

            async def device_worker(rng: random.Random) -> None:
                fuzz = Fuzzer(rng, token, self.agent["id"], self.device["id"])
                while counts["device"] < MAX_DEVICE and left():
                    counts["device"] += 1
                    await self.raw(self.channel_port, fuzz.device_bytes(), 0.15, rng)

            seeds = random.Random(SEED)
            workers: list[Callable[[random.Random], Any]] = [http_worker, ws_worker,
                                                             device_worker]
            runs = [ensureDeferred(workers[i % 3](random.Random(seeds.random())))
                    for i in range(WORKERS)]
            results = await DeferredList(runs, consumeErrors=True)
            for ok, result in results:
                if not ok:
                    result.raiseException()
            total = sum(counts.values())
            self.assertGreater(total, 1000, counts)  # the run really happened

            # Both processes still there and serving.
            self.assertFalse(self.relay.proc.ended.called)
            self.assertFalse(self.agent_proc.ended.called)
            r = await treq.get(f"{self.relay.url}/healthz", pool=self.admin.pool)
            self.assertEqual(r.code, 200)
            await r.content()
            await self.wait_connected()
            ack = await self.admin.push_to_agent(self.agent, f"Device/{self.device['id']}",
                                                 hl7_message("FZAFTER1"),
                                                 "x-application/hl7-v2+er7", True)
            self.assertIn("MSA|AA|FZAFTER1", ack)
            # The device channel still answers a good message (a negative ACK: no such Bot).
            answer = _Recorder()
            p = await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1",
                                                         self.channel_port), answer)
            p.transport.write(frame(hl7_message("FZCHAN01").encode()))
            await procs.wait_until(lambda: b"\x1c" in answer.data, timeout=30,
                                   what="channel ACK")
            self.assertIn(b"MSA|", answer.data)
            p.transport.loseConnection()

            # Every push accepted before the run: delivered, exactly once.
            def all_there() -> bool:
                return all(any(f"|{c}|" in m for m in self.sink.received) for c in controls)

            await procs.wait_until(all_there, timeout=60, what="pre-fuzz pushes delivered")
            for ctrl in controls:
                self.assertEqual(sum(f"|{ctrl}|" in m for m in self.sink.received), 1, ctrl)
            for path in status_paths:
                doc = await self.admin.request_json("GET", path)
                self.assertEqual(doc["state"], "delivered", path)

            # No payload in any log, no unhandled error.
            for proc in (self.relay.proc, self.agent_proc):
                for needle in (MARKER, "Unhandled error", "Traceback"):
                    lines = [line[:300] for line in proc.text.splitlines() if needle in line]
                    self.assertEqual(lines, [], f"{proc.name} logged {needle!r}")

        return ensureDeferred(go())


async def _either(d: Deferred[Any], seconds: float) -> None:
    """Wait for C{d} at most C{seconds} (without cancelling it)."""
    waiter: Deferred[None] = Deferred()
    timer = reactor.callLater(seconds, lambda: waiter.called or waiter.callback(None))
    d.addBoth(lambda _: waiter.called or waiter.callback(None))  # its result is not needed
    await waiter
    if timer.active():
        timer.cancel()

