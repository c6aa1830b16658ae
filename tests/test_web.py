"""
The relay's HTTP API in-process on loopback (real reactor, real SQLite, real HTTP): routes,
auth and every bad-input answer.
"""

from __future__ import annotations

import base64
import json
from typing import Any

import treq
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.trial.unittest import SynchronousTestCase, TestCase

from tests import procs


HL7 = "MSH|^~\\&|A|B|C|D|20240101||ADT^A01|{ctrl}|P|2.5\rPID|1"


class RelayHTTP(TestCase):
    timeout = 60

    def setUp(self) -> Deferred:
        return ensureDeferred(self._setUp())

    async def _setUp(self) -> None:
        self.relay, self.base, self.pool = procs.in_process_relay(self, "relay-web-",
                                                                  max_body=64 * 1024)
        self.admin = await self.relay.authority.create_client("admin")
        self.token = await self.get_token(self.admin)
        self.agent = await self.relay.store.create({"resourceType": "Agent", "name": "A",
                                                    "identifier": [{"system": "urn:s",
                                                                    "value": "lab-1"}]})
        self.device = await self.relay.store.create({"resourceType": "Device",
                                                     "url": "mllp://127.0.0.1:1"})

    async def get_token(self, client: dict[str, Any]) -> str:
        r = await treq.post(self.base + "/oauth2/token", data={
            "grant_type": "client_credentials", "client_id": client["clientId"],
            "client_secret": client["clientSecret"]}, pool=self.pool)
        self.assertEqual(r.code, 200)
        return (await r.json())["access_token"]

    async def call(self, method: str, path: str, body: Any = None, *, token: str | None = "admin",
                   ctype: str = "application/fhir+json", raw: bytes | None = None,
                   headers: dict[str, str] | None = None) -> tuple[int, Any, Any]:
        hdrs = {"Content-Type": [ctype]}
        if token:
            hdrs["Authorization"] = [f"Bearer {self.token if token == 'admin' else token}"]
        for k, v in (headers or {}).items():
            hdrs[k] = [v]
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None
                                            else None)
        r = await treq.request(method, self.base + path, data=data, headers=hdrs, pool=self.pool)
        content = await r.content()
        try:
            parsed = json.loads(content)
        except ValueError:
            parsed = content.decode("utf-8", "replace")
        return r.code, parsed, r.headers

    def push_body(self, **kw: Any) -> dict[str, Any]:
        return {"destination": f"Device/{self.device['id']}",
                "contentType": "x-application/hl7-v2+er7", "body": HL7.format(ctrl="C1"), **kw}

    def text(self, outcome: Any) -> str:
        return outcome["issue"][0]["details"]["text"]

    def test_token_errors(self) -> Deferred:
        async def go() -> None:
            r = await treq.post(self.base + "/oauth2/token", data={
                "grant_type": "client_credentials", "client_id": self.admin["clientId"],
                "client_secret": "wrong"}, pool=self.pool)
            self.assertEqual(r.code, 401)
            self.assertEqual((await r.json())["error"], "invalid_client")
            r = await treq.post(self.base + "/oauth2/token", data={"grant_type": "password"},
                                pool=self.pool)
            self.assertEqual(r.code, 400)
            self.assertEqual((await r.json())["error"], "unsupported_grant_type")
            basic = base64.b64encode(
                f"{self.admin['clientId']}:{self.admin['clientSecret']}".encode()).decode()
            r = await treq.post(self.base + "/oauth2/token",
                                data={"grant_type": "client_credentials"},
                                headers={"Authorization": [f"Basic {basic}"]}, pool=self.pool)
            self.assertEqual(r.code, 200)
            self.assertIn("access_token", await r.json())

        return ensureDeferred(go())

    def test_auth_required(self) -> Deferred:
        async def go() -> None:
            code, body, _ = await self.call("GET", "/fhir/R4/Agent", token=None)
            self.assertEqual(code, 401)
            self.assertEqual(body["resourceType"], "OperationOutcome")
            code, body, _ = await self.call("GET", "/fhir/R4/Agent", token="garbage")
            self.assertEqual(code, 401)
            agent_client = await self.relay.authority.create_client("agent", [self.agent["id"]])
            agent_token = await self.get_token(agent_client)
            code, body, _ = await self.call("POST", f"/fhir/R4/Agent/{self.agent['id']}/$push",
                                            self.push_body(), token=agent_token)
            self.assertEqual(code, 403)
            code, body, _ = await self.call("POST", "/fhir/R4/Device",
                                            {"resourceType": "Device"}, token=agent_token)
            self.assertEqual(code, 403)

        return ensureDeferred(go())

    def test_rest_crud_and_search(self) -> Deferred:
        async def go() -> None:
            code, created, headers = await self.call(
                "POST", "/fhir/R4/Device", {"resourceType": "Device", "url": "mllp://x:1",
                                            "identifier": [{"system": "urn:d", "value": "d7"}]})
            self.assertEqual(code, 201)
            self.assertTrue(headers.getRawHeaders("location")[0].endswith("/_history/1"))
            code, found, _ = await self.call("GET", "/fhir/R4/Device?identifier=urn:d|d7")
            self.assertEqual([e["resource"]["id"] for e in found["entry"]], [created["id"]])
            created["url"] = "mllp://y:2"
            code, updated, _ = await self.call("PUT", f"/fhir/R4/Device/{created['id']}", created)
            self.assertEqual((code, updated["meta"]["versionId"]), (200, "2"))
            code, _, _ = await self.call("DELETE", f"/fhir/R4/Device/{created['id']}")
            self.assertEqual(code, 200)
            code, body, _ = await self.call("GET", f"/fhir/R4/Device/{created['id']}")
            self.assertEqual(code, 404)
            code, body, _ = await self.call("GET", "/fhir/R4/Nope")
            self.assertEqual(code, 404)
            code, body, _ = await self.call("POST", "/fhir/R4/Device", {"resourceType": "Agent"})
            self.assertEqual(code, 400)

        return ensureDeferred(go())

    def test_push_bad_input(self) -> Deferred:
        async def go() -> None:
            path = f"/fhir/R4/Agent/{self.agent['id']}/$push"
            cases = [
                (self.push_body(body=None), 400, "Missing body parameter"),
                ({k: v for k, v in self.push_body().items() if k != "contentType"}, 400,
                 "Missing contentType"),
                ({k: v for k, v in self.push_body().items() if k != "destination"}, 400,
                 "Missing destination"),
                (self.push_body(waitTimeout=56000), 400, "Invalid wait timeout"),
                (self.push_body(destination="Device/missing"), 404, "not found"),
                (self.push_body(destination="ftp://h:1"), 400, "Unsupported destination scheme"),
                (self.push_body(body="PID|no msh"), 400, "MSH"),
                (self.push_body(body=HL7.format(ctrl="")), 400, "MSH-10"),
            ]
            for body, status, text in cases:
                code, outcome, _ = await self.call("POST", path, body)
                self.assertEqual(code, status, (body, outcome))
                self.assertIn(text, self.text(outcome))
            code, outcome, _ = await self.call("POST", path, raw=b"{not json")
            self.assertEqual(code, 400)
            self.assertIn("Invalid JSON", self.text(outcome))
            code, outcome, _ = await self.call("POST", path, raw=b"x", ctype="text/plain")
            self.assertEqual(code, 415)
            code, outcome, _ = await self.call("POST", path,
                                               raw=b'{"body":"' + b"x" * 70000 + b'"}')
            self.assertEqual(code, 413)
            code, outcome, _ = await self.call("POST", "/fhir/R4/Agent/nope/$push",
                                               self.push_body())
            self.assertEqual(code, 404)
            nourl = await self.relay.store.create({"resourceType": "Device"})
            code, outcome, _ = await self.call("POST", path,
                                               self.push_body(destination=f"Device/{nourl['id']}"))
            self.assertEqual((code, self.text(outcome)),
                             (400, f"Destination device missing url: Device/{nourl['id']}"))
            # Waited push while the agent is offline: 503 at once, nothing queued.
            code, outcome, _ = await self.call("POST", path, self.push_body(waitForResponse=True))
            self.assertEqual(code, 503)
            self.assertIn("not connected", self.text(outcome))
            # Not waited: 202, queued, with a status URL; both JSON content types work.
            code, outcome, headers = await self.call("POST", path, self.push_body(),
                                                     ctype="application/json")
            self.assertEqual(code, 202)
            location = headers.getRawHeaders("content-location")[0]
            code, doc, _ = await self.call("GET", location.split(self.base, 1)[1])
            self.assertEqual((code, doc["state"]), (200, "queued"))
            # Same MSH-10 again: the same push.
            code, outcome2, headers2 = await self.call("POST", path, self.push_body())
            self.assertEqual(headers2.getRawHeaders("content-location")[0], location)
            self.assertEqual(headers2.getRawHeaders("x-medagent-duplicate"), ["true"])

        return ensureDeferred(go())

    def test_push_url_forms(self) -> Deferred:
        async def go() -> None:
            for path in (f"/Agent/{self.agent['id']}/$push",
                         "/fhir/R4/Agent/$push?identifier=urn:s|lab-1",
                         f"/fhir/R4/Agent/{self.agent['id']}/%24push"):
                code, outcome, _ = await self.call(
                    "POST", path, self.push_body(body=HL7.format(ctrl=path[-12:])))
                self.assertEqual(code, 202, (path, outcome))
            params = {"resourceType": "Parameters", "parameter": [
                {"name": "destination", "valueString": f"Device/{self.device['id']}"},
                {"name": "contentType", "valueString": "x-application/hl7-v2+er7"},
                {"name": "body", "valueString": HL7.format(ctrl="PARAMS1")},
                {"name": "waitForResponse", "valueBoolean": False}]}
            code, outcome, _ = await self.call(
                "POST", f"/fhir/R4/Agent/{self.agent['id']}/$push", params)
            self.assertEqual(code, 202)
            code, bundle, _ = await self.call(
                "GET", f"/fhir/R4/AgentPush?agent=Agent/{self.agent['id']}&state=queued")
            self.assertEqual(bundle["total"], 4)
            code, status, _ = await self.call("GET", f"/fhir/R4/Agent/{self.agent['id']}/$status")
            self.assertEqual(status["parameter"][0], {"name": "status",
                                                      "valueCode": "disconnected"})

        return ensureDeferred(go())

    def test_cancel_and_retry(self) -> Deferred:
        async def go() -> None:
            code, outcome, headers = await self.call(
                "POST", f"/fhir/R4/Agent/{self.agent['id']}/$push", self.push_body())
            push_id = headers.getRawHeaders("x-medagent-push-id")[0]
            code, doc, _ = await self.call("POST", f"/fhir/R4/AgentPush/{push_id}/$cancel")
            self.assertEqual((code, doc["state"]), (200, "cancelled"))
            code, doc, _ = await self.call("POST", f"/fhir/R4/AgentPush/{push_id}/$cancel")
            self.assertEqual(code, 409)
            code, doc, _ = await self.call("POST", f"/fhir/R4/AgentPush/{push_id}/$retry")
            self.assertEqual(code, 409)

        return ensureDeferred(go())


class AccessLog(SynchronousTestCase):
    """One event per request is the push path's cost: written only with --access-log."""

    def test_off_by_default_and_without_the_query(self) -> None:
        from twisted.logger import capturedLogs, formatEvent
        from twisted.web.resource import Resource
        from twisted.web.test.requesthelper import DummyRequest

        from medagent.relay.web import RelaySite

        request = DummyRequest([b"fhir", b"R4", b"Patient"])
        request.method, request.path, request.code = b"GET", b"/fhir/R4/Patient", 200
        for enabled, expected in ((False, []), (True, ["GET /fhir/R4/Patient 200"])):
            site = RelaySite(Resource(), access_log=enabled)
            with capturedLogs() as events:
                site.log(request)  # type: ignore[arg-type]
            self.assertEqual([formatEvent(e) for e in events
                              if e.get("log_namespace") == "medagent.relay.web"], expected)
