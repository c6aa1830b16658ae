"""
The inbound log end to end with real processes: a third-party HL7 sender (python-hl7's
``MLLPClient``) sends ORU to an MLLP channel of a real ``twistd`` agent, the message goes up
to a real ``twistd`` relay, the channel's Bot answers (AA, or AE for a message it refuses),
and the relay's inbound log has the message with its ACK code - read with the ``medagent``
CLI (``inbound list``, ``tail --inbound``) and the ``AgentInbound`` API, which a pusher
client cannot read.
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any

import treq
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from medagent.client import RelayError
from tests import pgenv, procs, test_postgres_relay
from tests.test_inbound import SEND

BOT = """
def handler(medplum, event):
    if "REFUSE" in event.input:
        return event.build_ack("AE", text="unknown test")
    return event.build_ack("AA", text="stored by bot")
"""


class Site:
    """A real relay with a Bot, an agent process with an MLLP channel (``lab-in``) on
    C{port} whose Bot answers AA (AE for a message with ``REFUSE``), an admin client."""

    relay: Any
    client: Any
    agent: dict[str, Any]
    port: int

    @classmethod
    async def start(cls, testcase: TestCase, relay: Any = None, client: Any = None,
                    create_client: Any = None) -> "Site":
        """On a new relay with an admin client (or on C{relay} with C{client}, and
        C{create_client(role, agents)} making its clients)."""
        site = cls()
        if relay is None:
            relay, client = await procs.relay_with_admin(testcase)
        site.relay, site.client = relay, client
        bot = await site.client.create({"resourceType": "Bot", "name": "ack", "code": BOT})
        site.port = procs.free_port()
        endpoint = await site.client.create({
            "resourceType": "Endpoint", "status": "active",
            "address": f"mllp://127.0.0.1:{site.port}"})
        site.agent = await site.client.create({
            "resourceType": "Agent", "name": "in", "status": "active",
            "channel": [{"name": "lab-in",
                         "endpoint": {"reference": f"Endpoint/{endpoint['id']}"},
                         "targetReference": {"reference": f"Bot/{bot['id']}"}}]})
        if create_client is not None:
            creds = await create_client("agent", [site.agent["id"]])
        else:
            creds = site.relay.create_client("agent", [site.agent["id"]])
        agent_proc = procs.agent_process(testcase, site.relay.url, creds, site.agent["id"])
        await agent_proc.wait_for("Channel lab-in: mllp", timeout=30)
        return site

    async def send(self, testcase: TestCase, ctrl: str) -> str:
        """A device (python-hl7's MLLP client) sends ADT with MSH-10 C{ctrl}; its ACK."""
        proc = procs.python(testcase, "mllp-client", ["-c", SEND, str(self.port), ctrl, ""])
        await proc.wait_for("ACKS", timeout=60)
        return proc.text.replace("|CR|", "\r")

    async def logged(self, ctrl: str) -> dict[str, Any]:
        """The inbound log's record of MSH-10 C{ctrl} (written just after the answer)."""
        async def find() -> Any:
            page = await self.client.request_json(
                "GET", "/fhir/R4/AgentInbound", params={"control_id": ctrl})
            return page["entry"][0]["resource"] if page.get("entry") else None

        return dict(await procs.wait_until(find, timeout=20,
                                           what=f"the inbound record of {ctrl}"))


class InboundLogEndToEnd(TestCase):
    timeout = 180

    def setUp(self) -> Deferred:
        return ensureDeferred(self._setUp())

    async def _setUp(self) -> None:
        self.site = await Site.start(self)
        self.relay, self.client, self.agent = self.site.relay, self.site.client, self.site.agent
        self.admin_creds = self.relay.create_client("admin")
        self.pusher_creds = self.relay.create_client("pusher", [self.agent["id"]])
        from twisted.internet import reactor
        from twisted.web.client import HTTPConnectionPool

        self.pool = HTTPConnectionPool(reactor)
        self.addCleanup(self.pool.closeCachedConnections)

    async def send(self, ctrl: str) -> str:
        return await self.site.send(self, ctrl)

    async def logged(self, ctrl: str) -> dict[str, Any]:
        return await self.site.logged(ctrl)

    def env(self) -> dict[str, str]:
        return {"MEDAGENT_RELAY": self.relay.url,
                "MEDAGENT_CLIENT_ID": self.admin_creds["clientId"],
                "MEDAGENT_CLIENT_SECRET": self.admin_creds["clientSecret"]}

    async def cli(self, *argv: str) -> procs.Proc:
        proc = procs.python(self, "cli", ["-m", "medagent.cli", *argv], env=self.env())
        await proc.ended
        return proc

    def test_a_device_message_is_in_the_inbound_log_with_its_ack(self) -> Deferred:
        async def go() -> None:
            tail = procs.python(self, "tail", ["-m", "medagent.cli", "tail", "--inbound",
                                               "--json", "--interval", "0.2", "--for", "60"],
                                env=self.env())
            out = await self.send("E2E00001")
            self.assertIn("MSA|AA|E2E00001|stored by bot", out)
            record = await self.logged("E2E00001")
            agent = self.agent["id"]
            self.assertEqual(
                (record["agent"]["reference"], record["channel"], record["ackCode"],
                 record["statusCode"], record["outcome"], record["messageType"],
                 record["patientId"], record["payloadKept"]),
                (f"Agent/{agent}", "lab-in", "AA", 200, "ok", "ADT^A01", "123", True))
            self.assertTrue(record["remote"].startswith("127.0.0.1"), record)
            self.assertTrue(record["bot"]["reference"].startswith("Bot/"))
            out = await self.send("REFUSE01")
            self.assertIn("MSA|AE|REFUSE01", out)
            refused = await self.logged("REFUSE01")
            self.assertEqual((refused["ackCode"], refused["outcome"]), ("AE", "rejected"))
            # the CLI: a table and --json, filtered
            listed = await self.cli("inbound", "list", "--agent", agent, "--json")
            self.assertEqual(listed.exit_code, 0, listed.text)
            doc = json.loads(listed.text[listed.text.index("{"):])
            self.assertEqual(([m["controlId"] for m in doc["inbound"]], doc["total"]),
                             (["REFUSE01", "E2E00001"], 2))
            self.assertNotIn("body", json.dumps(doc))
            listed = await self.cli("inbound", "list", "--outcome", "rejected")
            self.assertEqual(listed.exit_code, 0, listed.text)
            self.assertIn("REFUSE01", listed.text)
            self.assertIn("AE", listed.text)
            self.assertNotIn("E2E00001", listed.text)
            self.assertIn("# 1 shown of 1", listed.text)
            listed = await self.cli("inbound", "list", "--patient", "123", "--json")
            self.assertEqual(json.loads(listed.text[listed.text.index("{"):])["total"], 2)
            bad = await self.cli("inbound", "list", "--count", "0")
            self.assertEqual(bad.exit_code, 2, bad.text)
            # tail --inbound printed each message once, as it was recorded
            await tail.wait_for("REFUSE01", timeout=30)
            tail.transport.signalProcess("TERM")
            await tail.ended
            events = [json.loads(line) for line in bytes(tail.output).decode().splitlines()
                      if line.startswith("{")]
            self.assertEqual([e["controlId"] for e in events], ["E2E00001", "REFUSE01"])
            # the payload: admin only, over the API, audited
            full = await self.client.request_json(
                "GET", f"/fhir/R4/AgentInbound/{record['id']}", params={"_payload": "true"})
            self.assertIn("PID|1||123^^^MRN||DOE^JOHN", full["body"])
            audits = await self.client.search("AuditEvent", {"_count": "1000"})
            viewed = [a for a in audits if "Inbound message payload viewed"
                      in a.get("outcomeDesc", "")]
            self.assertEqual(len(viewed), 1)
            self.assertNotIn("DOE^JOHN", json.dumps(viewed))

        return ensureDeferred(go())

    def test_attack_a_pusher_reads_no_inbound_message(self) -> Deferred:
        async def go() -> None:
            await self.send("ATTACK01")
            record = await self.logged("ATTACK01")
            token = await self.relay_token(self.pusher_creds)
            for path in ("/fhir/R4/AgentInbound", f"/fhir/R4/AgentInbound/{record['id']}",
                         f"/fhir/R4/AgentInbound/{record['id']}?_payload=true",
                         f"/fhir/R4/AgentInbound?agent={self.agent['id']}"):
                r = await treq.get(self.relay.url + path, pool=self.pool,
                                   headers={"Authorization": [f"Bearer {token}"]})
                text = (await r.content()).decode()
                self.assertEqual(r.code, 403, path)
                self.assertNotIn("ATTACK01", text)
                self.assertNotIn("DOE", text)
            # and through the CLI with the pusher's credentials: a clear refusal, exit 1
            proc = procs.python(self, "cli", ["-m", "medagent.cli", "inbound", "list"], env={
                "MEDAGENT_RELAY": self.relay.url,
                "MEDAGENT_CLIENT_ID": self.pusher_creds["clientId"],
                "MEDAGENT_CLIENT_SECRET": self.pusher_creds["clientSecret"]})
            await proc.ended
            self.assertEqual(proc.exit_code, 1, proc.text)
            self.assertIn("403", proc.text)
            self.assertNotIn("ATTACK01", proc.text)

        return ensureDeferred(go())

    def test_pushes_list_by_patient_and_dicom_uids(self) -> Deferred:
        async def go() -> None:
            from tests.test_inbound_log import ORU, part10

            agent = self.agent["id"]
            dicom = await self.client.push_to_agent(
                agent, "dicom://PACS@127.0.0.1:9", part10("1.2.826.9", "1.2.826.9.1",
                                                           patient="MRN-CLI"),
                "application/dicom", False)
            hl7 = await self.client.push_to_agent(
                agent, "mllp://127.0.0.1:9", ORU.format(ctrl="CLIP0001", mrn="MRN-CLI",
                                                        order="O1"),
                "x-application/hl7-v2+er7", False)
            self.assertEqual((dicom["resourceType"], hl7["resourceType"]),
                             ("OperationOutcome", "OperationOutcome"))  # (202: queued)

            async def listed(*flags: str) -> list[str]:
                proc = await self.cli("pushes", "list", "--json", *flags)
                self.assertEqual(proc.exit_code, 0, proc.text)
                doc = json.loads(proc.text[proc.text.index("{"):])
                return sorted(p["contentType"] for p in doc["pushes"])

            self.assertEqual(await listed("--patient", "MRN-CLI"),
                             ["application/dicom", "x-application/hl7-v2+er7"])
            self.assertEqual(await listed("--study-uid", "1.2.826.9"), ["application/dicom"])
            self.assertEqual(await listed("--sop-uid", "1.2.826.9.1"), ["application/dicom"])
            self.assertEqual(await listed("--sop-uid", "1.2.826.9"), [])

        return ensureDeferred(go())

    async def relay_token(self, creds: dict[str, Any]) -> str:
        r = await treq.post(self.relay.url + "/oauth2/token", pool=self.pool, data={
            "grant_type": "client_credentials", "client_id": creds["clientId"],
            "client_secret": creds["clientSecret"]})
        if r.code != 200:
            raise RelayError(r.code, (await r.content()).decode(), {})
        return str(json.loads((await r.content()).decode())["access_token"])


class InboundLogOnPostgres(TestCase):
    """The same, on a relay whose database is PostgreSQL (migration 7's table)."""

    timeout = 120
    create_client = test_postgres_relay.RelayOnPostgres.create_client

    def test_a_device_message_is_recorded_in_postgres(self) -> Deferred:
        async def go() -> None:
            from twisted.internet import reactor

            from medagent.client import MedagentClient
            from medagent.storage.postgres import PgDatabase

            self.dsn = await deferToThread(pgenv.fresh_database, "medagent_inbound_e2e")
            self.data_dir = tempfile.mkdtemp(prefix="medagent-relay-pg-in-")
            admin = await self.create_client("admin")
            relay = procs.RelayFixture(self, self.data_dir)
            await relay.start(["--database", self.dsn])
            client = MedagentClient(reactor, relay.url, admin["clientId"],
                                    admin["clientSecret"])
            self.addCleanup(client.close)
            # (a node on PostgreSQL reads its signing keys after it listens: ready first)
            await procs.wait_until(lambda: ensureDeferred(self._ready(relay.url)), timeout=30,
                                   what="the relay ready")
            site = await Site.start(self, relay, client, self.create_client)
            out = await site.send(self, "PGIN0001")
            self.assertIn("MSA|AA|PGIN0001", out)
            record = await site.logged("PGIN0001")
            self.assertEqual((record["ackCode"], record["outcome"]), ("AA", "ok"))
            db = PgDatabase(reactor, self.dsn)
            self.addCleanup(db.stop)
            rows = await db.run(lambda c: c.execute(
                "SELECT control_id, patient_id, ack_code, channel, body FROM inbound"
            ).fetchall())
            self.assertEqual([(r["control_id"], r["patient_id"], r["ack_code"], r["channel"])
                              for r in rows], [("PGIN0001", "123", "AA", "lab-in")])
            self.assertIn("PID|1||123", rows[0]["body"])
            self.assertFalse(os.path.exists(os.path.join(self.data_dir, "relay.sqlite")))

        return ensureDeferred(go())

    async def _ready(self, url: str) -> bool:
        from twisted.internet import reactor
        from twisted.web.client import HTTPConnectionPool

        pool = HTTPConnectionPool(reactor, persistent=False)
        r = await treq.get(url + "/readyz", pool=pool)
        await r.content()
        return bool(r.code == 200)
