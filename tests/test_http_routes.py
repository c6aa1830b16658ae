"""
The relay's HTTP API in memory: the resource tree of L{medagent.relay.web.Root} on a real
SQLite store and journal driven synchronously (L{tests.fakes.inline_database}), requests sent
with C{treq.testing.StubTreq}: no sockets, no ports, no reactor.

Covers the routes end to end (token, REST, ``$push``, the push list's paging) and the
answers of the router itself (404, 405, 415, 401), plus the route table's pattern matching.
"""

from __future__ import annotations

import json
from io import BytesIO
from typing import Any
from urllib.parse import urlencode

from treq.testing import StubTreq
from twisted.internet.error import ConnectionDone
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource, getChildForRequest
from twisted.web.server import NOT_DONE_YET
from twisted.web.test.requesthelper import DummyRequest

from medagent import wire
from medagent.relay.access import EXT_DEVICE
from medagent.relay.auth import Authority
from medagent.relay.http import router
from medagent.relay.http.router import ANY, Route, find_route
from medagent.relay.hub import Hub
from medagent.relay.push import PushService
from medagent.relay.web import Api, Root
from medagent.storage import journal as j
from medagent.storage.sqlite.clients import SQLiteClientRegistry
from medagent.storage.sqlite.journal import SQLiteJournal
from medagent.storage.sqlite.store import SQLiteStore
from tests.fakes import InlineReactor, inline_database
from tests.test_hub import FakeConnection

HL7_V2 = "x-application/hl7-v2+er7"
BASE = "http://relay.test"
HL7 = "MSH|^~\\&|EHR|HOSP|LIS|LAB|20240101120000||ORM^O01|{ctrl}|P|2.5.1\rPID|1"


class _Wall:
    def __init__(self, clock: InlineReactor) -> None:
        self.clock = clock

    def time(self) -> float:
        return self.clock.seconds()


class InMemoryRelay:
    """The relay's HTTP side on an in-memory stack; C{api_class} lets a test swap the API."""

    def __init__(self, testcase: SynchronousTestCase, api_class: Any = Api) -> None:
        self.testcase = testcase
        self.clock = InlineReactor()
        self.clock.advance(1_700_000_000)
        db = inline_database(testcase, SQLiteStore.schema() + SQLiteClientRegistry.schema()
                             + SQLiteJournal.schema(), self.clock)
        self.store = SQLiteStore(db)
        self.auth = Authority(SQLiteClientRegistry(db), b"k" * 32, clock=_Wall(self.clock))
        self.journal = SQLiteJournal(db, clock=self.clock)
        self.hub = Hub(self.clock, self.auth, self.store, self.journal, heartbeat_interval=10)
        testcase.addCleanup(self.hub.close)
        self.pushes = PushService(self.hub, self.store, self.journal, self.clock)
        self.api = api_class(self.auth, self.store, self.journal, self.hub, self.pushes,
                             base_url=BASE)
        self.root = Root(self.api, Resource())
        self.http = StubTreq(self.root)
        self.device = self.ok(self.store.create(
            {"resourceType": "Device", "url": "mllp://127.0.0.1:2575"}))
        self.agent = self.ok(self.store.create(
            {"resourceType": "Agent", "name": "lab", "status": "active",
             "identifier": [{"system": "urn:lab", "value": "lab-1"}],
             "extension": [{"url": EXT_DEVICE,
                            "valueReference": {"reference": f"Device/{self.device['id']}"}}]}))
        self.admin_client = self.ok(self.auth.create_client("admin", []))
        self.pusher_client = self.ok(self.auth.create_client("pusher", [self.agent["id"]]))
        self.admin = self.token(self.admin_client)
        self.pusher = self.token(self.pusher_client)

    def ok(self, d: Any) -> Any:
        return self.testcase.successResultOf(d)

    def token(self, client: dict[str, Any]) -> str:
        return self.ok(self.auth.issue_token(client["clientId"], client["clientSecret"])
                       )["access_token"]

    def call(self, method: str, path: str, *, token: str | None = None,
             body: Any = None, content_type: str | None = "application/fhir+json",
             headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
        """One request; the answer as (status, headers (lower-case names), body)."""
        sent = dict(headers or {})
        if token:
            sent["Authorization"] = f"Bearer {token}"
        if content_type:
            sent["Content-Type"] = content_type
        data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
        d = self.http.request(method, BASE + path, headers=sent, data=data)
        self.http.flush()
        response = self.ok(d)
        content = self.ok(self.http.content(response))
        got = {k.decode().lower(): v[-1].decode()
               for k, v in response.headers.getAllRawHeaders()}
        return response.code, got, content


def outcome_text(body: bytes) -> str:
    doc = json.loads(body)
    assert doc["resourceType"] == "OperationOutcome", doc
    return str(doc["issue"][0]["details"]["text"])


class TokenEndpointTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.relay = InMemoryRelay(self)

    def test_form_credentials_give_a_token(self) -> None:
        client = self.relay.pusher_client
        status, headers, body = self.relay.call(
            "POST", "/oauth2/token", content_type="application/x-www-form-urlencoded",
            body=urlencode({"grant_type": "client_credentials", "client_id": client["clientId"],
                            "client_secret": client["clientSecret"]}).encode())
        self.assertEqual(status, 200)
        self.assertEqual(headers["content-type"], "application/json")
        self.assertEqual(headers["cache-control"], "no-store")
        token = json.loads(body)["access_token"]
        self.assertEqual(self.relay.auth.verify_token(token).client_id, client["clientId"])

    def test_wrong_secret_is_invalid_client(self) -> None:
        status, _, body = self.relay.call(
            "POST", "/oauth2/token", content_type="application/json",
            body={"grant_type": "client_credentials",
                  "client_id": self.relay.pusher_client["clientId"], "client_secret": "no"})
        self.assertEqual((status, json.loads(body)["error"]), (401, "invalid_client"))

    def test_other_grant_type_is_refused(self) -> None:
        status, _, body = self.relay.call("POST", "/oauth2/token", content_type="application/json",
                                          body={"grant_type": "password"})
        self.assertEqual((status, json.loads(body)["error"]), (400, "unsupported_grant_type"))

    def test_get_is_no_route(self) -> None:
        status, _, body = self.relay.call("GET", "/oauth2/token")
        self.assertEqual((status, outcome_text(body)), (404, "No route for oauth2/token"))


class RestTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.relay = InMemoryRelay(self)

    def test_create_read_search(self) -> None:
        r = self.relay
        status, headers, body = r.call("POST", "/fhir/R4/Device", token=r.admin,
                                       body={"resourceType": "Device", "id": "ignored",
                                             "url": "mllp://127.0.0.1:2600"})
        self.assertEqual(status, 201)
        created = json.loads(body)
        self.assertNotEqual(created["id"], "ignored")
        self.assertEqual(created["meta"]["author"],
                         {"reference": f"ClientApplication/{r.admin_client['clientId']}"})
        self.assertEqual(headers["location"],
                         f"{BASE}/fhir/R4/Device/{created['id']}/_history/1")
        self.assertEqual(headers["etag"], 'W/"1"')

        status, headers, body = r.call("GET", f"/fhir/R4/Device/{created['id']}", token=r.admin)
        self.assertEqual((status, json.loads(body)["url"]), (200, "mllp://127.0.0.1:2600"))
        self.assertEqual(headers["etag"], 'W/"1"')

        status, _, body = r.call("GET", "/fhir/R4/Device?url=mllp://127.0.0.1:2600",
                                 token=r.admin)
        bundle = json.loads(body)
        self.assertEqual((status, bundle["type"], bundle["total"]), (200, "searchset", 1))
        self.assertEqual(bundle["entry"][0]["fullUrl"], f"{BASE}/fhir/R4/Device/{created['id']}")

    def test_empty_segments_and_percent_encoding_are_the_same_path(self) -> None:
        r = self.relay
        status, _, body = r.call("GET", f"//fhir/R4//Agent/{r.agent['id']}/", token=r.admin)
        self.assertEqual((status, json.loads(body)["id"]), (200, r.agent["id"]))
        status, _, body = r.call("GET", f"/fhir/%52%34/Agent/{r.agent['id']}", token=r.admin)
        self.assertEqual((status, json.loads(body)["id"]), (200, r.agent["id"]))

    def test_short_form_agent_path(self) -> None:
        r = self.relay
        status, _, body = r.call("GET", f"/Agent/{r.agent['id']}", token=r.admin)
        self.assertEqual((status, json.loads(body)["id"]), (200, r.agent["id"]))

    def test_no_token_is_401_before_any_404(self) -> None:
        status, _, _ = self.relay.call("GET", "/fhir/R4/NoSuchType")
        self.assertEqual(status, 401)

    def test_unknown_paths_are_404(self) -> None:
        r = self.relay
        for path, text in (("/", "No route for /"), ("/nope/x", "No route for nope/x"),
                           ("/healthz/x", "No route for healthz/x"),
                           ("/fhir", "No route for fhir"),
                           ("/fhir/R4", "No resource type given")):
            status, _, body = r.call("GET", path)
            self.assertEqual((status, outcome_text(body)), (404, text), path)
        status, _, body = r.call("GET", "/fhir/R4/NoSuchType/1", token=r.admin)
        self.assertEqual((status, outcome_text(body)),
                         (404, "Unsupported resource type NoSuchType"))
        status, _, body = r.call("GET", "/fhir/R4/Device/missing", token=r.admin)
        self.assertEqual(status, 404)

    def test_method_not_supported_is_405(self) -> None:
        r = self.relay
        for method, path, text in (
                ("PATCH", "/fhir/R4/Device/1", "PATCH not supported on Device/1"),
                ("GET", "/fhir/R4/Device/1/_history", "GET not supported on Device/1/_history"),
                ("DELETE", "/fhir/R4/AgentPush", "DELETE not supported on AgentPush"),
                ("GET", f"/fhir/R4/Agent/{r.agent['id']}/$push", "$push needs POST")):
            status, _, body = r.call(method, path, token=r.admin)
            self.assertEqual((status, outcome_text(body)), (405, text), path)

    def test_body_not_json_is_415(self) -> None:
        r = self.relay
        status, _, body = r.call("POST", "/fhir/R4/Device", token=r.admin,
                                 content_type="text/plain", body=b"{}")
        self.assertEqual(status, 415)
        self.assertEqual(outcome_text(body), "Content-Type must be application/fhir+json or "
                                             "application/json, not text/plain")

    def test_healthz(self) -> None:
        status, _, body = self.relay.call("GET", "/healthz")
        self.assertEqual((status, json.loads(body)), (200, {"status": "ok",
                                                            "agentsConnected": 0}))


class PushTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.relay = InMemoryRelay(self)

    def push(self, ctrl: str, path: str | None = None) -> tuple[int, dict[str, str], bytes]:
        r = self.relay
        return r.call("POST", path or f"/fhir/R4/Agent/{r.agent['id']}/$push", token=r.pusher,
                      body={"destination": f"Device/{r.device['id']}", "contentType": HL7_V2,
                            "body": HL7.format(ctrl=ctrl)})

    def test_not_waited_push_is_202_with_its_status_url(self) -> None:
        status, headers, body = self.push("C1")
        self.assertEqual(status, 202)
        push_id = headers["x-medagent-push-id"]
        location = f"{BASE}/fhir/R4/AgentPush/{push_id}"
        self.assertEqual(headers["content-location"], location)
        self.assertEqual(json.loads(body)["issue"][0]["diagnostics"], location)
        self.assertEqual(self.relay.ok(self.relay.journal.get(push_id)).state, j.QUEUED)
        status, _, body = self.relay.call("GET", f"/fhir/R4/AgentPush/{push_id}",
                                          token=self.relay.pusher)
        self.assertEqual((status, json.loads(body)["id"]), (200, push_id))

    def test_push_by_identifier_short_form(self) -> None:
        status, headers, _ = self.push("C2", "/Agent/$push?identifier=urn:lab|lab-1")
        self.assertEqual(status, 202)
        push = self.relay.ok(self.relay.journal.get(headers["x-medagent-push-id"]))
        self.assertEqual(push.agent_id, self.relay.agent["id"])

    def test_repeat_is_marked_duplicate(self) -> None:
        _, first, _ = self.push("C3")
        status, again, _ = self.push("C3")
        self.assertEqual((status, again["x-medagent-duplicate"]), (202, "true"))
        self.assertEqual(again["x-medagent-push-id"], first["x-medagent-push-id"])

    def test_list_pages_by_cursor(self) -> None:
        ids = [self.push(f"P{i}")[1]["x-medagent-push-id"] for i in range(5)]
        r = self.relay
        seen: list[str] = []
        path = f"/fhir/R4/AgentPush?agent=Agent/{r.agent['id']}&_count=2"
        pages = 0
        while path:
            status, _, body = r.call("GET", path, token=r.pusher)
            self.assertEqual(status, 200)
            page = json.loads(body)
            self.assertEqual(page["total"], 5)
            seen += [e["resource"]["id"] for e in page["entry"]]
            links = {link["relation"]: link["url"] for link in page["link"]}
            self.assertTrue(links["self"].startswith(f"{BASE}/fhir/R4/AgentPush?"))
            path = links.get("next", "").removeprefix(BASE)
            pages += 1
        self.assertEqual(pages, 3)
        self.assertEqual(sorted(seen), sorted(ids))
        self.assertEqual(len(seen), 5)

    def test_list_count_out_of_range_is_400(self) -> None:
        r = self.relay
        status, _, body = r.call("GET", "/fhir/R4/AgentPush?_count=5000", token=r.admin)
        self.assertEqual((status, outcome_text(body)),
                         (400, "_count must be a whole number from 0 to 1000"))

    def test_missing_push_is_404_whatever_the_method(self) -> None:
        r = self.relay
        for method, path in (("GET", "/fhir/R4/AgentPush/nope"),
                             ("PUT", "/fhir/R4/AgentPush/nope"),
                             ("POST", "/fhir/R4/AgentPush/nope/$retry")):
            status, _, _ = r.call(method, path, token=r.admin)
            self.assertEqual(status, 404, (method, path))

    def test_cancel_a_queued_push(self) -> None:
        push_id = self.push("C4")[1]["x-medagent-push-id"]
        status, _, body = self.relay.call("POST", f"/fhir/R4/AgentPush/{push_id}/$cancel",
                                          token=self.relay.pusher)
        self.assertEqual((status, json.loads(body)["state"]), (200, j.CANCELLED))

    def test_agent_status_operation(self) -> None:
        r = self.relay
        status, _, body = r.call("GET", f"/fhir/R4/Agent/{r.agent['id']}/$status",
                                 token=r.pusher)
        params = {p["name"]: p for p in json.loads(body)["parameter"]}
        self.assertEqual((status, params["status"]["valueCode"]), (200, "disconnected"))
        status, _, body = r.call("GET", "/fhir/R4/Agent/a/b/$status", token=r.pusher)
        self.assertEqual((status, outcome_text(body)), (404, "No such Agent operation path"))


class RouteTableTests(SynchronousTestCase):
    """The patterns of L{router.ROUTES}."""

    def test_patterns(self) -> None:
        def handler_of(method: str, path: str) -> tuple[Any, dict[str, str]]:
            return find_route(method, path.split("/"))

        self.assertEqual(handler_of("POST", "Agent/a1/$push"),
                         (router.agent_ops.operation, {"id": "a1", "op": "$push"}))
        self.assertEqual(handler_of("GET", "Agent/$status"),
                         (router.agent_ops.operation, {"op": "$status"}))
        self.assertEqual(handler_of("GET", "Agent/a/b/$status")[0],
                         router.agent_ops.no_such_path)
        self.assertEqual(handler_of("GET", "Agent/a1"),
                         (router.fhir_rest.read, {"type": "Agent", "id": "a1"}))
        self.assertEqual(handler_of("POST", "Bot/$execute"), (router.bot_execute, {}))
        self.assertEqual(handler_of("POST", "Bot/b1/$execute"), (router.bot_execute,
                                                                 {"id": "b1"}))
        self.assertEqual(handler_of("POST", "AgentPush/p1/$retry"),
                         (router.pushes.retry, {"id": "p1"}))
        self.assertEqual(handler_of("GET", "AgentPush/p1/$retry")[0],
                         router.pushes.not_supported)
        self.assertEqual(handler_of("GET", "Nope")[0], router.fhir_rest.unsupported_type)
        self.assertEqual(handler_of("GET", "Device/1/x/y")[0], router.fhir_rest.not_supported)

    def test_route_method_and_wildcards(self) -> None:
        route = Route("GET", "a/**/{op}", router.fhir_rest.not_supported)
        self.assertEqual(route.match("GET", ["a", "$x"]), {"op": "$x"})
        self.assertEqual(route.match("GET", ["a", "1", "2", "$x"]), {"op": "$x"})
        self.assertIsNone(route.match("POST", ["a", "$x"]))
        self.assertIsNone(route.match("GET", ["a", "x"]))
        self.assertEqual(Route(ANY, "a", router.health).match("PATCH", ["a"]), {})


class ConnectedAgentTests(SynchronousTestCase):
    """Pushes through the API to an agent connected to the hub (a fake connection)."""

    def setUp(self) -> None:
        r = self.relay = InMemoryRelay(self)
        agent_client = r.ok(r.auth.create_client("agent", [r.agent["id"]]))
        self.conn = conn = FakeConnection()
        self.session = r.hub.connection_made(conn)
        r.hub.frame_received(self.session, wire.encode({
            "type": wire.CONNECT_REQUEST, "agentId": r.agent["id"],
            "accessToken": r.token(agent_client), "capabilities": [wire.CAP_DURABLE]}))

    def test_push_to_connected_agent_is_sent(self) -> None:
        r, conn = self.relay, self.conn
        status, headers, _ = r.call(
            "POST", f"/fhir/R4/Agent/{r.agent['id']}/$push", token=r.pusher,
            body={"destination": f"Device/{r.device['id']}", "contentType": HL7_V2,
                  "body": HL7.format(ctrl="W1")})
        self.assertEqual(status, 202)
        [sent] = conn.of_type(wire.TRANSMIT_REQUEST)
        self.assertEqual(sent["pushId"], headers["x-medagent-push-id"])

    def test_caller_gone_during_a_waited_push(self) -> None:
        """Nothing is written to a gone caller (the 499 stays internal); the push goes on."""
        r = self.relay
        request = DummyRequest([b"fhir", b"R4", b"Agent", r.agent["id"].encode(), b"$push"])
        request.method = b"POST"
        request.requestHeaders.setRawHeaders(b"authorization", [f"Bearer {r.pusher}".encode()])
        request.requestHeaders.setRawHeaders(b"content-type", [b"application/fhir+json"])
        request.content = BytesIO(json.dumps({
            "destination": f"Device/{r.device['id']}", "contentType": HL7_V2,
            "body": HL7.format(ctrl="G1"), "waitForResponse": True}).encode())
        resource = getChildForRequest(r.root, request)
        self.assertEqual(resource.render(request), NOT_DONE_YET)
        [sent] = self.conn.of_type(wire.TRANSMIT_REQUEST)
        request._disconnected = True  # what Request.connectionLost does, then:
        request.processingFailed(Failure(ConnectionDone()))
        self.assertEqual((request.written, request.finished, request.responseCode),
                         ([], 0, None))
        r.hub.frame_received(self.session, wire.encode({
            "type": wire.TRANSMIT_RESPONSE, "remote": sent["remote"],
            "callback": sent["callback"], "contentType": HL7_V2, "statusCode": 200,
            "body": "MSH|^~\\&|LIS\rMSA|AA|G1"}))
        self.assertEqual(r.ok(r.journal.get(sent["pushId"])).state, j.DELIVERED)
