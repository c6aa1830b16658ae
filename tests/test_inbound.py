"""
Device → cloud, end to end with real processes: a third-party HL7 sender (python-hl7's
``MLLPClient``) sends ADT to an inbound channel of a real ``twistd`` agent; the message goes
up to a real relay, the channel's Bot answers with an ACK, and the ACK reaches the sender —
in original, enhanced and AA mode.  Channels come from ``Agent.channel`` + ``Endpoint`` and
change on ``$reload-config``.
"""

from __future__ import annotations



from twisted.internet.defer import Deferred, ensureDeferred
from twisted.trial.unittest import TestCase

from tests import procs

BOT = """
def handler(medplum, event):
    return event.build_ack("AA", text="stored by bot")
"""

SEND = r"""
import sys
from hl7.client import MLLPClient
port, ctrl = int(sys.argv[1]), sys.argv[2]
msg = ("MSH|^~\\&|ADT1|HOSP|LIS|LAB|20240101120000||ADT^A01|" + ctrl + "|P|2.5.1" + sys.argv[3]
       + "\rPID|1||123^^^MRN||DOE^JOHN\r")
with MLLPClient("127.0.0.1", port) as c:
    c.socket.settimeout(30)
    ack = c.send_message(msg)
    more = b""
    if len(sys.argv) > 4:   # enhanced mode: a second (application) ACK follows the CA
        while more.count(b"\x1c") < 1:
            more += c.socket.recv(4096)
print("ACKS", (ack + more).decode().replace("\r", "|CR|"), flush=True)
"""


class Inbound(TestCase):
    timeout = 120

    def setUp(self) -> Deferred:
        return ensureDeferred(self._setUp())

    async def _setUp(self) -> None:
        self.relay, self.client = await procs.relay_with_admin(self)
        bot = await self.client.create({"resourceType": "Bot", "name": "ack", "code": BOT})
        self.ports = {}
        channels = []
        for mode, query in (("original", ""), ("enhanced", "?enhanced=true"),
                            ("aa", "?enhanced=aa")):
            port = self.ports[mode] = procs.free_port()
            endpoint = await self.client.create({
                "resourceType": "Endpoint", "status": "active",
                "address": f"mllp://127.0.0.1:{port}{query}"})
            channels.append({"name": f"adt-{mode}",
                             "endpoint": {"reference": f"Endpoint/{endpoint['id']}"},
                             "targetReference": {"reference": f"Bot/{bot['id']}"}})
        self.agent = await self.client.create({"resourceType": "Agent", "name": "in",
                                               "status": "active", "channel": channels})
        creds = self.relay.create_client("agent", [self.agent["id"]])
        self.agent_proc = procs.agent_process(self, self.relay.url, creds, self.agent["id"])
        await self.agent_proc.wait_for("Channel adt-aa: mllp", timeout=30)

    async def send(self, mode: str, ctrl: str, msh_tail: str = "", second: bool = False) -> str:
        args = ["-c", SEND, str(self.ports[mode]), ctrl, msh_tail]
        if second:
            args.append("wait-second")
        proc = procs.python(self, "mllp-client", args)
        await proc.wait_for("ACKS", timeout=60)
        return proc.text

    def test_original_mode_gets_the_bots_ack(self) -> Deferred:
        async def go() -> None:
            out = await self.send("original", "ORIG0001")
            self.assertIn("MSA|AA|ORIG0001|stored by bot", out.replace("|CR|", "\r"))

        return ensureDeferred(go())

    def test_enhanced_mode_commit_then_application_ack(self) -> Deferred:
        async def go() -> None:
            out = await self.send("enhanced", "ENH00001", second=True)
            text = out.replace("|CR|", "\r")
            self.assertLess(text.index("MSA|CA|ENH00001"), text.index("MSA|AA|ENH00001"))

        return ensureDeferred(go())

    def test_aa_mode(self) -> Deferred:
        async def go() -> None:
            out = await self.send("aa", "AAMODE01")
            self.assertIn("MSA|AA|AAMODE01", out.replace("|CR|", "\r"))
            self.assertNotIn("stored by bot", out)

        return ensureDeferred(go())

    def test_reload_config_changes_channels(self) -> Deferred:
        async def go() -> None:
            agent = dict(self.agent)
            agent["channel"] = [c for c in agent["channel"] if c["name"] != "adt-aa"]
            await self.client.update(agent)
            await self.client.request_json(
                "GET", f"/fhir/R4/Agent/{self.agent['id']}/$reload-config")
            await self.agent_proc.wait_for("Channel adt-aa: stopping", timeout=20)
            # the others keep serving
            out = await self.send("original", "ORIG0002")
            self.assertIn("MSA|AA|ORIG0002", out.replace("|CR|", "\r"))

        return ensureDeferred(go())



