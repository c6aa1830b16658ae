"""
Inbound channel routing on the relay: an agent's ``agent:transmit:request`` for one of its
channels runs the channel's Bot and the Bot's answer goes back on the same socket.

Units drive L{ChannelRouter} with a fake runner; the integration test feeds a real relay's
hub frames from a fake agent connection (as the websocket adapter would) and the bots run in
real, warm worker processes.
"""

from __future__ import annotations

import json
import tempfile
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, ensureDeferred, succeed
from twisted.trial.unittest import SynchronousTestCase, TestCase

from medagent import wire
from medagent.relay import bots as b
from medagent.relay.channels import ChannelRouter
from medagent.relay.service import RelayService
from medagent.storage.sqlite.store import SQLiteStore
from tests import procs
from tests.fakes import InlineReactor, inline_database
from tests.test_hub import FakeConnection

ADT = "MSH|^~\\&|ADT|HOSP|LIS|LAB|20240101120000||ADT^A01|{ctrl}|P|2.5.1\rPID|1||42^^^MRN"
HL7 = "x-application/hl7-v2+er7"


class FakeRunner:
    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []
        self.answer = b.BotRun(bot_id="b1", outcome=b.SUCCESS, result="ACK", result_type="text")

    def execute(self, bot_id: str, input: Any, content_type: str, **kw: Any) -> Deferred:
        self.calls.append({"bot": bot_id, "input": input, "contentType": content_type, **kw})
        return succeed(self.answer)


class RouterTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.store = SQLiteStore(inline_database(self, SQLiteStore.schema(), InlineReactor()))
        self.runner = FakeRunner()
        self.router = ChannelRouter(self.store, self.runner)
        self.agent = self.successResultOf(self.store.create({
            "resourceType": "Agent", "name": "site", "status": "active",
            "channel": [
                {"name": "adt", "endpoint": {"reference": "Endpoint/e1"},
                 "targetReference": {"reference": "Bot/b1"}},
                {"name": "no-bot", "endpoint": {"reference": "Endpoint/e2"}},
                {"name": "url", "endpoint": {"reference": "Endpoint/e3"},
                 "targetReference": {"reference": "https://example.test/x"}},
            ]}))

    def route(self, **msg: Any) -> dict[str, Any]:
        message = {"type": wire.TRANSMIT_REQUEST, "channel": "adt", "remote": "10.0.0.5:5000",
                   "contentType": HL7, "body": ADT.format(ctrl="C1"), "callback": "cb", **msg}
        return self.successResultOf(self.router(self.agent["id"], message))

    def test_runs_the_channel_bot(self) -> None:
        answer = self.route()
        self.assertEqual(answer, {"statusCode": 200, "contentType": HL7, "body": "ACK"})
        [call] = self.runner.calls
        self.assertEqual((call["bot"], call["input"], call["contentType"], call["trigger"]),
                         ("b1", ADT.format(ctrl="C1"), HL7, "channel"))
        self.assertEqual(call["requester"], f"Agent/{self.agent['id']}")
        self.assertEqual(call["event_extra"]["channel"], "adt")
        self.assertEqual(call["event_extra"]["remoteAddress"], "10.0.0.5:5000")
        self.assertEqual(call["headers"]["X-Medagent-Channel"], "adt")

    def test_json_input_and_answers(self) -> None:
        self.runner.answer = b.BotRun(bot_id="b1", outcome=b.SUCCESS, result='{"a":1}',
                                      result_type="json")
        answer = self.route(contentType="application/json", body='{"x": 2}')
        self.assertEqual(self.runner.calls[-1]["input"], {"x": 2})
        self.assertEqual((answer["statusCode"], answer["contentType"]), (200, "application/json"))
        self.runner.answer = b.BotRun(bot_id="b1", outcome=b.SUCCESS)
        self.assertEqual(self.route()["statusCode"], 204)

    def test_errors_are_clear(self) -> None:
        json_msg = {"contentType": "application/json", "body": '{"x": 1}'}
        cases = [
            ({"channel": "nope", **json_msg}, 404, "Channel 'nope' not found"),
            ({"channel": "no-bot", **json_msg}, 404, "has no Bot"),
            ({"channel": "url", **json_msg}, 404, "has no Bot"),
            ({"channel": None, **json_msg}, 400, "Missing channel"),
            ({"body": None}, 400, "Missing body"),
        ]
        for msg, status, text in cases:
            answer = self.route(**msg)
            self.assertEqual(answer["statusCode"], status, msg)
            self.assertIn(text, answer["body"])
        self.assertEqual(self.runner.calls, [])
        answer = self.successResultOf(self.router("ghost", {"channel": "adt", "body": "x"}))
        self.assertEqual(answer["statusCode"], 404)
        for outcome, status in ((b.ERROR, 400), (b.TIMEOUT, 504), (b.CRASH, 500),
                                (b.BUSY, 503), (b.NOT_FOUND, 404)):
            self.runner.answer = b.BotRun(bot_id="b1", outcome=outcome, error="why " * 500)
            answer = self.route(**json_msg)
            self.assertEqual((answer["statusCode"], answer["contentType"]),
                             (status, "text/plain"), outcome)
            self.assertTrue(answer["body"].startswith(f"Bot/b1 failed ({outcome}): why"))
            self.assertLessEqual(len(answer["body"]), 500)

    def test_hl7_failures_are_answered_with_an_ae(self) -> None:
        """Medplum's agent drops answers >= 400: an HL7 device must get an AE, status 200."""
        for msg in ({"channel": "nope"}, {"channel": "no-bot"}):
            answer = self.route(**msg)
            self.assertEqual((answer["statusCode"], answer["contentType"]), (200, HL7), msg)
            self.assertIn("MSA|AE|C1|", answer["body"])
        for outcome in (b.ERROR, b.TIMEOUT, b.CRASH, b.BUSY, b.NOT_FOUND):
            self.runner.answer = b.BotRun(bot_id="b1", outcome=outcome,
                                          error="ValueError: DOE^JANE unknown", audit_id="a9")
            answer = self.route()
            self.assertEqual((answer["statusCode"], answer["contentType"]), (200, HL7), outcome)
            segments = answer["body"].split("\r")
            self.assertTrue(segments[0].startswith("MSH|^~\\&|LIS|LAB|ADT|HOSP|"))
            self.assertEqual(segments[1],
                             f"MSA|AE|C1|Bot/b1 failed ({outcome}); see AuditEvent/a9")
            self.assertTrue(segments[2].startswith("ERR|||207^"), segments)
            self.assertNotIn("DOE", answer["body"])  # the bot's error text may quote PHI
        # not HL7 after all: the status stays, so the agent builds its own negative answer
        answer = self.route(body="PID|1||42")
        self.assertEqual(answer["statusCode"], 404)
        # a bug on the relay's side too (logged)
        self.runner.execute = lambda *a, **kw: 1 / 0
        answer = self.route()
        self.assertEqual(answer["statusCode"], 200)
        self.assertIn("MSA|AE|C1|Relay error", answer["body"])
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)


class HubChannelIntegration(TestCase):
    """A real relay's hub, a fake agent socket, real bot workers."""

    timeout = 60

    def setUp(self) -> Deferred:
        return ensureDeferred(self._setUp())

    async def _setUp(self) -> None:
        self.relay = RelayService(reactor, data_dir=tempfile.mkdtemp(prefix="relay-chan-"),
                                  listen="tcp:0:interface=127.0.0.1", bot_workers=1,
                                  **procs.bot_sandbox())
        self.relay.startService()
        self.addCleanup(self.relay.stopService)
        store = self.relay.store
        self.ack_bot = await store.create({"resourceType": "Bot", "name": "ADT in", "code": (
            "def handler(medplum, event):\n"
            "    if 'REJECT' in event.input:\n"
            "        raise ValueError('unknown patient')\n"
            "    return event.build_ack('AA')\n")})
        self.agent = await store.create({
            "resourceType": "Agent", "name": "site", "status": "active",
            "channel": [{"name": "adt", "endpoint": {"reference": "Endpoint/e1"},
                         "targetReference": {"reference": f"Bot/{self.ack_bot['id']}"}}]})
        creds = await self.relay.authority.create_client("agent", [self.agent["id"]])
        token = await self.relay.authority.issue_token(creds["clientId"], creds["clientSecret"])
        self.token = token["access_token"]
        self.conn = FakeConnection()
        self.session = self.relay.hub.connection_made(self.conn)
        self.addCleanup(self.relay.hub.connection_lost, self.session)
        self.relay.hub.frame_received(self.session, wire.encode({
            "type": wire.CONNECT_REQUEST, "accessToken": self.token,
            "agentId": self.agent["id"]}))
        await procs.wait_until(lambda: self.conn.of_type(wire.CONNECT_RESPONSE), timeout=10,
                               what="connect response")
        await procs.wait_until(lambda: self.relay.bot_pool._idle, timeout=30,
                               what="bot worker ready")

    async def transmit(self, body: str, channel: str = "adt") -> dict[str, Any]:
        callback = f"Agent/{self.agent['id']}-{len(self.conn.sent)}"
        self.relay.hub.frame_received(self.session, wire.encode({
            "type": wire.TRANSMIT_REQUEST, "accessToken": self.token, "channel": channel,
            "remote": "10.1.1.1:4000", "contentType": HL7, "body": body,
            "callback": callback}))

        def answered() -> Any:
            return [m for m in self.conn.of_type(wire.TRANSMIT_RESPONSE)
                    if m.get("callback") == callback]

        [answer] = await procs.wait_until(answered, timeout=20, what="transmit response")
        return answer

    def test_inbound_message_gets_the_bots_ack(self) -> Deferred:
        async def go() -> None:
            for i in range(25):
                answer = await self.transmit(ADT.format(ctrl=f"IN{i:04d}"))
                self.assertEqual((answer["statusCode"], answer["contentType"], answer["channel"],
                                  answer["remote"]), (200, HL7, "adt", "10.1.1.1:4000"))
                self.assertIn(f"MSA|AA|IN{i:04d}", answer["body"])
            self.assertEqual(self.relay.bot_pool.spawned, 1)  # one warm worker, reused
            answer = await self.transmit(ADT.format(ctrl="REJECT01"))
            self.assertEqual((answer["statusCode"], answer["contentType"]), (200, HL7))
            self.assertIn("MSA|AE|REJECT01|", answer["body"])
            self.assertNotIn("unknown patient", answer["body"])
            answer = await self.transmit(ADT.format(ctrl="X"), channel="other")
            self.assertEqual(answer["statusCode"], 200)
            self.assertIn("MSA|AE|X|Channel 'other' not found", answer["body"])
            audits = await self.relay.store.search("AuditEvent", {"_count": ["1000"]})
            self.assertEqual(len(audits), 26)  # every run recorded; the unknown channel ran none
            failed = [a for a in audits if a["outcome"] != "0"]
            self.assertEqual(len(failed), 1)
            self.assertIn({"what": {"reference": f"Agent/{self.agent['id']}"}},
                          failed[0]["entity"])
            self.assertNotIn("REJECT01", json.dumps(audits))

        return ensureDeferred(go())
