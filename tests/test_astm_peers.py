"""
ASTM against third-party programs we did not write (installed by ``.ci/peers-astm.sh``):

* labmcp-astm-lis 0.1.3, a strict E1381 receiver (checksums, frame numbers mod 8, ETB joins),
  over TCP and over a socat pty pair (a null-modem cable): it must accept every frame of our
  orders and decode our records unchanged;
* python-astm 0.5.0 (with its Py3.10+ shim): its server decodes our H, P, O, L records; its
  client's message reaches our channel intact;
* the raw E1381 prober of peers.md against our channel: our receiver answers bad checksums
  and frame numbers exactly as the strict receiver does.

Skipped when the peers are missing, failed instead when ``MEDAGENT_REQUIRE_PEERS=1``.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.trial.unittest import TestCase

from medagent.contenttypes import ASTM
from medagent.astm import codec
from medagent.astm.channel import ASTMChannel
from medagent.astm.sender import ASTMSender
from medagent.destination import parse_destination
from tests.peerenv import FIXTURES, need, need_program, peer_path
from tests.procs import Proc, free_port, spawn, wait_until

ORDER = ("H|\\^&|||MEDAGENT|||||ANALYZER1||P|LIS2-A2|20240115103000\r"
         "P|1|PID12345|||DOE^JOHN^A||19800101|M\r"
         "O|1|SID0001||^^^GLU\\^^^CREA|R|20240115100000|20240115093000||||N||||SERUM||||||||||O\r"
         "L|1|N\r")
# 26 tests on one specimen: the O record is longer than 240 bytes, so it goes as ETB + ETX frames.
TESTS = ["GLU", "CREA", "UREA", "NA", "K", "CL", "CA", "MG", "PHOS", "ALB", "TP", "ALT", "AST",
         "ALP", "GGT", "TBIL", "CHOL", "TRIG", "HDL", "LDL", "CRP", "FE", "UA", "LDH", "CK",
         "AMY"]
LONG_ORDER = ("H|\\^&|||MEDAGENT|||||ANALYZER1||P|LIS2-A2|20240115103000\r"
              "P|1|PID777|||O'BRIEN^MARY||19700202|F\r"
              "O|1|SID0002||" + "\\".join(f"^^^{t}" for t in TESTS) +
              "|S|20240115100000|20240115093000||||N||||SERUM||||||||||O\r"
              "C|1|L|fasting a&F&b|G\r"
              "L|1|N\r")

LABMCP_SCRIPT = os.path.join(FIXTURES, "astm", "labmcp_receiver.py")
PYASTM_SERVER = os.path.join(FIXTURES, "astm", "astm_server.py")
PYASTM_CLIENT = os.path.join(FIXTURES, "astm", "astm_client.py")
RAWPROBE = os.path.join(FIXTURES, "astm", "astm_rawprobe.py")
SHIM = os.path.join(FIXTURES, "astm", "shim")


def labmcp_python() -> str:
    path = peer_path("venv-labmcp", "bin", "python")
    need(os.access(path, os.X_OK), "labmcp-astm-lis (venv-labmcp)")
    return path


def pyastm_python() -> str:
    path = peer_path("venv-astm", "bin", "python")
    need(os.access(path, os.X_OK), "python-astm 0.5.0 (venv-astm)")
    return path


def labmcp_messages(proc: Proc) -> list[dict[str, Any]]:
    return [json.loads(line[len("MESSAGE "):]) for line in proc.text.splitlines()
            if line.startswith("MESSAGE ")]


def records(text: str) -> list[str]:
    return codec.split_records(text)


assert 240 < len(codec.split_records(LONG_ORDER)[2]) + 1 <= 480


class PeerTestCase(TestCase):
    timeout = 60

    def setUp(self) -> None:
        self.sender = ASTMSender(reactor)
        self.addCleanup(self.sender.close)

    def push(self, url: str, body: str) -> Deferred:
        return self.sender.send(parse_destination(url), ASTM, body, {})

    async def socat_pair(self) -> tuple[str, str]:
        """A null-modem cable: two pty ends, linked as files in a temp folder."""
        socat = need_program("socat")
        tmp = tempfile.mkdtemp(prefix="medagent-socat-")
        a, b = os.path.join(tmp, "ttyA"), os.path.join(tmp, "ttyB")
        proc = spawn(self, "socat", [socat, "-d", "-d", f"pty,raw,echo=0,link={a}",
                                     f"pty,raw,echo=0,link={b}"])
        await proc.wait_for("starting data transfer loop", timeout=10)

        def remove() -> None:
            for p in (a, b):
                if os.path.lexists(p):
                    os.unlink(p)
            os.rmdir(tmp)
        self.addCleanup(remove)
        return a, b


class LabmcpTests(PeerTestCase):
    """The strict receiver accepts every frame and decodes our records unchanged."""

    async def check_receiver(self, proc: Proc, url: str) -> None:
        reply = await self.push(url, ORDER)
        self.assertEqual(json.loads(reply.body)["frames"], 4)
        reply = await self.push(url, LONG_ORDER)
        body = json.loads(reply.body)
        self.assertEqual(body["records"], 5)
        self.assertEqual(body["frames"], 6)  # the long O record took two frames
        self.assertEqual(body["retransmissions"], 0)
        await wait_until(lambda: len(labmcp_messages(proc)) >= 2 and "STATS" in proc.text,
                         timeout=15, what="labmcp-astm-lis to store both messages")
        first, second = labmcp_messages(proc)[:2]
        self.assertTrue(first["complete"])
        self.assertEqual(first["records"], records(ORDER))
        self.assertTrue(second["complete"])
        self.assertEqual(second["records"], records(LONG_ORDER))
        await wait_until(lambda: "frames_accepted=10" in proc.text, timeout=10,
                         what="labmcp stats")
        stats = [line for line in proc.text.splitlines() if line.startswith("STATS")][-1]
        self.assertIn("frames_rejected=0", stats)
        self.assertIn("checksum_errors=0", stats)
        self.assertIn("frame_number_errors=0", stats)
        self.assertIn("duplicate_frames=0", stats)

    def test_tcp(self) -> Deferred:
        async def go() -> None:
            port = free_port()
            proc = spawn(self, "labmcp-tcp",
                         [labmcp_python(), "-u", LABMCP_SCRIPT, "tcp-listen", str(port)])
            await proc.wait_for("labmcp-astm-lis receiver on", timeout=30)
            await self.check_receiver(proc, f"astm://127.0.0.1:{port}")
        return ensureDeferred(go())

    def test_serial_over_socat_pty_pair(self) -> Deferred:
        async def go() -> None:
            python = labmcp_python()
            ours, theirs = await self.socat_pair()
            proc = spawn(self, "labmcp-serial", [python, "-u", LABMCP_SCRIPT, "serial", theirs,
                                                 "9600"])
            await proc.wait_for("labmcp-astm-lis receiver on", timeout=30)
            await self.check_receiver(
                proc, f"astm+serial://{ours}?baudrate=9600&bytesize=8&parity=N&stopbits=1")
        return ensureDeferred(go())

    def test_ping(self) -> Deferred:
        async def go() -> None:
            port = free_port()
            proc = spawn(self, "labmcp-tcp",
                         [labmcp_python(), "-u", LABMCP_SCRIPT, "tcp-listen", str(port)])
            await proc.wait_for("labmcp-astm-lis receiver on", timeout=30)
            reply = await self.sender.ping(parse_destination(f"astm://127.0.0.1:{port}"))
            self.assertIn("ENQ answered ACK", reply.body)
            await wait_until(lambda: "EOT: session 1 ended" in proc.text, timeout=10,
                             what="labmcp to see our EOT")
        return ensureDeferred(go())


class PythonAstmTests(PeerTestCase):
    def test_server_decodes_our_records(self) -> Deferred:
        async def go() -> None:
            port = free_port()
            proc = spawn(self, "python-astm-server",
                         [pyastm_python(), "-u", PYASTM_SERVER, str(port)],
                         env={"PYTHONPATH": SHIM})
            await proc.wait_for("python-astm server on", timeout=30)
            reply = await self.push(f"astm://127.0.0.1:{port}", ORDER)
            self.assertEqual(json.loads(reply.body)["frames"], 4)
            await proc.wait_for("L record", timeout=10)
            text = proc.text
            self.assertIn("H record: ['H', [[None], [None, '&']], None, None, 'MEDAGENT', None, "
                          "None, None, None, 'ANALYZER1', None, 'P', 'LIS2-A2', "
                          "'20240115103000']", text)
            self.assertIn("P record: ['P', '1', 'PID12345', None, None, ['DOE', 'JOHN', 'A'], "
                          "None, '19800101', 'M']", text)
            self.assertIn("O record: ['O', '1', 'SID0001', None, [[None, None, None, 'GLU'], "
                          "[None, None, None, 'CREA']], 'R', '20240115100000', "
                          "'20240115093000'", text)
            self.assertIn("L record: ['L', '1', 'N']", text)
            self.assertNotIn("NAK", text)
            self.assertEqual(text.count("OUT b'\\x15'"), 0)
        return ensureDeferred(go())

    def test_client_message_reaches_our_channel(self) -> Deferred:
        forwarded: list[tuple[str, str, str]] = []

        async def go() -> None:
            python = pyastm_python()
            channel = ASTMChannel(lambda *a: forwarded.append(a), reactor=reactor,
                                  endpoint="tcp:0:interface=127.0.0.1", name="peer-test")
            channel.startService()
            self.addCleanup(channel.stopService)
            port = (await channel.when_listening()).getHost().port
            proc = spawn(self, "python-astm-client", [python, "-u", PYASTM_CLIENT, str(port)],
                         env={"PYTHONPATH": SHIM})
            await wait_until(lambda: forwarded, timeout=20, what="the client's message")
            ct, body, remote = forwarded[0]
            self.assertEqual(ct, ASTM)
            recs = codec.decode_message(body)
            self.assertEqual([r[0] for r in recs], ["H", "P", "O", "L"])
            self.assertEqual(recs[1][:9], ["P", "1", "", "12345", "", ["DOE", "JOHN"], "",
                                           "19800101", "M"])
            self.assertEqual(codec.get_field(recs[2], 3), "SPEC0001")
            self.assertEqual(codec.get_field(recs[2], 5), ["", "", "", "GLU"])
            self.assertEqual(recs[3], ["L", "1", "N"])
            await proc.wait_for("client done", timeout=30)
            self.assertEqual(len(forwarded), 1)
        return ensureDeferred(go())


class RawProbeTests(PeerTestCase):
    """The prober's hand-built frames get from our channel what labmcp-astm-lis answers."""

    def test_channel_answers_like_the_strict_receiver(self) -> Deferred:
        forwarded: list[tuple[str, str, str]] = []

        async def go() -> None:
            python = sys.executable  # the prober needs only the standard library over TCP
            channel = ASTMChannel(lambda *a: forwarded.append(a), reactor=reactor,
                                  endpoint="tcp:0:interface=127.0.0.1", name="probe-test")
            channel.startService()
            self.addCleanup(channel.stopService)
            port = (await channel.when_listening()).getHost().port
            proc = spawn(self, "rawprobe", [python, "-u", RAWPROBE, "tcp", str(port)])
            await proc.wait_for("EOT sent", timeout=30)
            replies = [line.rsplit("-> ", 1)[1] for line in proc.text.splitlines()
                       if "-> " in line]
            self.assertEqual(replies, ["b'\\x06'", "b'\\x06'", "b'\\x15'", "b'\\x06'",
                                       "b'\\x06'", "b'\\x06'", "b'\\x15'", "b'\\x06'"])
            await wait_until(lambda: forwarded, timeout=10, what="the probe's message")
            self.assertEqual(records(forwarded[0][1]), [
                "H|\\^&|||PROBE|||||||P|1394-97", "P|1||PID1",
                "O|1|SPEC1||^^^GLU|R||||||N||||||||||||||||O", "L|1|N"])
        return ensureDeferred(go())
