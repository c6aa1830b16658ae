"""
MLLP on real loopback sockets against third-party peers we did not write:

- python-hl7's asyncio MLLP server (``hl7.mllp``): persistent connection, one ACK per message;
- hl7apy's ``MLLPServer``: answers one message per connection, then closes it;
- python-hl7's ``mllp_send`` command sending to our L{MLLPChannel} listener;
- our own sender and channel over TLS (``mllps://``).
"""

from __future__ import annotations

import datetime
import os
import re
import shutil
import subprocess
import sys
import tempfile
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, succeed
from twisted.internet.endpoints import serverFromString
from twisted.trial.unittest import TestCase

from medagent.contenttypes import HL7_V2, PING
from medagent.delivery import DeliveryError, Reply
from medagent.destination import parse_destination
from medagent.hl7.message import build_ack, control_id, parse_ack
from medagent.hl7.mllp import frame
from medagent.hl7.channel import MLLPChannel
from medagent.hl7.sender import MLLPSender
from tests import procs
from tests.peerenv import FIXTURES, need

HL7_PEERS = os.path.join(FIXTURES, "hl7")


def adt(cid: str, name: str = "DOE^JOHN") -> str:
    return (
        f"MSH|^~\\&|SENDAPP|SENDFAC|RECVAPP|RECVFAC|20240101120000||ADT^A01|{cid}|P|2.5\r"
        "EVN|A01|20240101120000\r"
        f"PID|1||12345^^^MRN||{name}||19800101|M\r"
    )


def importable(module: str) -> bool:
    """Whether the interpreter that runs the peers can import C{module}."""
    return subprocess.run(
        [sys.executable, "-c", f"import {module}"], capture_output=True
    ).returncode == 0


async def port_open(port: int) -> bool:
    from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
    from twisted.internet.protocol import Protocol

    try:
        p = await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port, timeout=1),
                                  Protocol())
    except Exception:
        return False
    p.transport.loseConnection()
    return True


def recv_lines(proc: procs.Proc) -> list[str]:
    return [line for line in proc.text.splitlines() if line.startswith("RECV")]


class PythonHL7ServerTests(TestCase):
    """Our sender against python-hl7's MLLP server (the best-behaved listener we know)."""

    timeout = 60

    async def start_server(self, ack_code: str = "AA") -> tuple[procs.Proc, int]:
        need(importable("hl7.mllp"), "python-hl7 (pip hl7)")
        port = procs.free_port()
        proc = procs.python(self, "python-hl7 server",
                            [os.path.join(HL7_PEERS, "pyhl7_server.py"), str(port), ack_code])
        await proc.wait_for(f"python-hl7 MLLP server on 127.0.0.1:{port}", timeout=20)
        return proc, port

    def sender(self, **kw: Any) -> MLLPSender:
        sender = MLLPSender(reactor, **kw)
        self.addCleanup(sender.close)
        return sender

    async def test_twenty_messages_on_one_persistent_connection(self) -> None:
        proc, port = await self.start_server()
        sender = self.sender()
        destination = parse_destination(f"mllp://127.0.0.1:{port}")
        ids = [f"PYHL7{i:05d}" for i in range(20)]
        for cid in ids:
            reply = await sender.send(destination, HL7_V2, adt(cid).replace("\r", "\n"), {})
            self.assertIsInstance(reply, Reply)
            ack = parse_ack(reply.body)
            self.assertEqual((ack.code, ack.control_id), ("AA", cid))
            self.assertEqual((reply.delivered, reply.detail, reply.content_type),
                             (True, "AA", HL7_V2))
        await procs.wait_until(lambda: proc.count("SENT ACK") >= 20, what="server log")
        lines = recv_lines(proc)
        self.assertEqual(len(lines), 20)
        for cid in ids:
            self.assertEqual(sum(f"|{cid}|" in line for line in lines), 1, cid)
        # The server logs the client's address with each message: one connection for all.
        peers = {re.match(r"RECV from (\(.*?\)):", line).group(1) for line in lines}
        self.assertEqual(len(peers), 1, peers)

    async def test_negative_ack_is_not_delivered(self) -> None:
        proc, port = await self.start_server("AE")
        sender = self.sender()
        reply = await sender.send(parse_destination(f"mllp://127.0.0.1:{port}"), HL7_V2,
                                  adt("NEG00001"), {})
        self.assertEqual((reply.delivered, reply.detail), (False, "AE"))
        self.assertEqual(parse_ack(reply.body).control_id, "NEG00001")

    async def test_keepalive_false_uses_a_connection_per_message(self) -> None:
        proc, port = await self.start_server()
        sender = self.sender()
        destination = parse_destination(f"mllp://127.0.0.1:{port}?keepAlive=false")
        for i in range(3):
            reply = await sender.send(destination, HL7_V2, adt(f"KA{i}"), {})
            self.assertEqual(reply.detail, "AA")
        await procs.wait_until(lambda: len(recv_lines(proc)) >= 3, what="server log")
        peers = {re.match(r"RECV from (\(.*?\)):", line).group(1) for line in recv_lines(proc)}
        self.assertEqual(len(peers), 3)

    async def test_ping(self) -> None:
        proc, port = await self.start_server()
        reply = await self.sender().ping(parse_destination(f"mllp://127.0.0.1:{port}"))
        self.assertEqual(reply.content_type, PING)
        self.assertIn("connected in", reply.body)

    async def test_refused(self) -> None:
        port = procs.free_port()
        sender = self.sender()
        with self.assertRaises(DeliveryError) as cm:
            await sender.send(parse_destination(f"mllp://127.0.0.1:{port}"), HL7_V2,
                              adt("REFUSED1"), {})
        self.assertEqual((cm.exception.phase, cm.exception.transient), ("connect", True))


class HL7apyServerTests(TestCase):
    """hl7apy's MLLPServer answers one message and closes: we must reconnect each time."""

    timeout = 60

    async def test_reconnects_for_every_message(self) -> None:
        need(importable("hl7apy.mllp"), "hl7apy (pip hl7apy; .ci/peers-hl7.sh)")
        port = procs.free_port()
        proc = procs.python(self, "hl7apy server",
                            [os.path.join(HL7_PEERS, "hl7apy_server.py"), str(port)])
        await proc.wait_for(f"hl7apy MLLP server on 127.0.0.1:{port}", timeout=20)
        # The script prints before it binds.
        await procs.wait_until(lambda: port_open(port), timeout=20, what="hl7apy listening")
        sender = MLLPSender(reactor)
        self.addCleanup(sender.close)
        destination = parse_destination(f"mllp://127.0.0.1:{port}")  # keepAlive defaults on
        ids = [f"APY{i:05d}" for i in range(6)]
        for cid in ids:
            reply = await sender.send(destination, HL7_V2, adt(cid), {})
            ack = parse_ack(reply.body)
            self.assertEqual((ack.code, ack.control_id, reply.delivered), ("AA", cid, True))
        await procs.wait_until(lambda: proc.count("SENT ACK") >= len(ids), what="server log")
        lines = recv_lines(proc)
        self.assertEqual(len(lines), len(ids))
        for cid in ids:
            self.assertEqual(sum(f"|{cid}|" in line for line in lines), 1, cid)


class _RecordingChannel(MLLPChannel):
    def __init__(self, *a: Any, **kw: Any) -> None:
        super().__init__(*a, **kw)
        self.protocols: list[Any] = []

    def buildProtocol(self, addr: Any) -> Any:
        p = super().buildProtocol(addr)
        self.protocols.append(p)
        return p


class ChannelWithThirdPartySenderTests(TestCase):
    """python-hl7's ``mllp_send`` (a blocking socket client) sends to our listener."""

    timeout = 60

    async def listen(self, channel: MLLPChannel, description: str = "tcp:0:interface=127.0.0.1"
                     ) -> int:
        port = await serverFromString(reactor, description).listen(channel)
        self.addCleanup(port.stopListening)
        return port.getHost().port

    async def test_mllp_send_gets_our_acks(self) -> None:
        need(importable("hl7.client"), "python-hl7 (pip hl7)")
        forwarded: list[tuple[str, str, str]] = []

        def forward(content_type: str, body: str, remote: str) -> Deferred:
            forwarded.append((content_type, body, remote))
            return succeed(Reply(build_ack(body, "AA", text="stored"), HL7_V2))

        channel = _RecordingChannel(forward, clock=reactor)
        port = await self.listen(channel)
        # Two messages in one file: mllp_send sends both on one connection, one at a time.
        folder = tempfile.mkdtemp(prefix="medagent-hl7-")
        self.addCleanup(shutil.rmtree, folder, True)
        path = os.path.join(folder, "two.mllp")
        with open(path, "wb") as f:
            f.write(frame(adt("SEND0001").encode()) + frame(adt("SEND0002").encode()))
        proc = procs.python(self, "mllp_send",
                            ["-m", "hl7.client", "--port", str(port), "--file", path, "127.0.0.1"])
        await procs.wait_until(lambda: proc.ended.called, timeout=30, what="mllp_send to exit")
        self.assertEqual(proc.exit_code, 0, proc.text)
        msa = re.findall(r"MSA\|(\w\w)\|(\w+)\|stored", proc.text)
        self.assertEqual(msa, [("AA", "SEND0001"), ("AA", "SEND0002")], proc.text)
        self.assertEqual([control_id(body) for _, body, _ in forwarded], ["SEND0001", "SEND0002"])
        self.assertEqual({ct for ct, _, _ in forwarded}, {HL7_V2})
        self.assertTrue(all(remote.startswith("127.0.0.1:") for _, _, remote in forwarded))
        self.assertEqual(len(channel.protocols), 1)
        await procs.wait_until(lambda: not channel.protocols[0].connected, what="disconnect")

    async def test_python_hl7_client_gets_a_nak_for_garbage(self) -> None:
        need(importable("hl7.client"), "python-hl7 (pip hl7)")
        channel = _RecordingChannel(lambda *a: succeed(None), clock=reactor)
        port = await self.listen(channel)
        script = (
            "import sys; from hl7.client import MLLPClient\n"
            f"with MLLPClient('127.0.0.1', {port}) as c:\n"
            "    print(repr(c.send_message('PID|1||not a message')))\n"
            f"    print(repr(c.send_message({adt('AFTER001')!r})))\n"
        )
        proc = procs.python(self, "MLLPClient", ["-c", script])
        await procs.wait_until(lambda: proc.ended.called, timeout=30, what="MLLPClient to exit")
        self.assertEqual(proc.exit_code, 0, proc.text)
        # The garbage gets AR (connection kept); the real message then gets our AE because
        # this cloud answers nothing.
        self.assertEqual(re.findall(r"MSA\|(\w\w)\|(\w*)\|", proc.text),
                         [("AR", ""), ("AE", "AFTER001")], proc.text)
        await procs.wait_until(lambda: not channel.protocols[0].connected, what="disconnect")


class TLSTests(TestCase):
    """``mllps://`` from our sender to our channel on a TLS listener, trusting a test CA."""

    timeout = 60

    def make_cert(self) -> tuple[str, str]:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID

        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
        now = datetime.datetime.now(datetime.timezone.utc)
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
            .sign(key, hashes.SHA256())
        )
        folder = tempfile.mkdtemp(prefix="medagent-tls-")
        self.addCleanup(shutil.rmtree, folder, True)
        cert_path = os.path.join(folder, "cert.pem")
        key_path = os.path.join(folder, "key.pem")
        with open(cert_path, "wb") as f:
            f.write(cert.public_bytes(serialization.Encoding.PEM))
        with open(key_path, "wb") as f:
            f.write(key.private_bytes(serialization.Encoding.PEM,
                                      serialization.PrivateFormat.TraditionalOpenSSL,
                                      serialization.NoEncryption()))
        return cert_path, key_path

    async def test_mllps_round_trip(self) -> None:
        cert, key = self.make_cert()
        channel = _RecordingChannel(
            lambda ct, body, remote: succeed(Reply(build_ack(body, "AA"), HL7_V2)),
            clock=reactor,
        )
        listening = await serverFromString(
            reactor, f"ssl:0:interface=127.0.0.1:privateKey={key}:certKey={cert}"
        ).listen(channel)
        self.addCleanup(listening.stopListening)
        port = listening.getHost().port
        sender = MLLPSender(reactor, tls_ca=cert)
        self.addCleanup(sender.close)
        for i in range(3):
            reply = await sender.send(
                parse_destination(f"mllps://localhost:{port}"), HL7_V2,
                adt(f"TLS{i}"), {})
            self.assertEqual((reply.detail, parse_ack(reply.body).control_id), ("AA", f"TLS{i}"))
        self.assertEqual(len(channel.protocols), 1)
        # A pusher cannot make the agent read files: certificate paths in the URL are refused
        # before anything is opened or sent.
        for param in ("ca", "cert", "key"):
            with self.assertRaises(DeliveryError) as cm:
                await sender.send(parse_destination(f"mllps://localhost:{port + 1}"
                                                    f"?{param}=/etc/hostname"),
                                  HL7_V2, adt("FILE"), {})
            self.assertEqual((cm.exception.phase, cm.exception.transient),
                             ("destination", False))
        # Without our CA the platform trust store refuses the self-signed certificate, during
        # the handshake: nothing was sent.
        untrusting = MLLPSender(reactor)
        self.addCleanup(untrusting.close)
        with self.assertRaises(DeliveryError) as cm:
            await untrusting.send(parse_destination(f"mllps://localhost:{port}"), HL7_V2,
                                  adt("UNTRUSTED"), {})
        self.assertEqual((cm.exception.phase, cm.exception.transient), ("connect", True))
        self.assertIn("TLS handshake failed", cm.exception.reason)
        self.assertEqual(channel.received, 3)
        await sender.close()
        await procs.wait_until(lambda: not any(p.connected for p in channel.protocols),
                               what="TLS connections closed")
