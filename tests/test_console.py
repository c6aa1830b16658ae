"""
The operators' console (medagent.relay.console): sign-in, sessions on a Clock, CSRF and
Origin refusals, roles (a viewer sees no payload and cannot act), escaping, the MSH-10
search, the audit of payload views, resend; the live stream's bounds; alerts.

Pages are fetched from a real relay (L{RelayService} in this process on a loopback port)
with treq; the stream and the alerts are units on a Clock.
"""

from __future__ import annotations

import json
import re
from typing import Any
from urllib.parse import urlencode

import treq
from twisted.internet import reactor
from twisted.internet.defer import Deferred, ensureDeferred, fail, succeed
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase, TestCase

from medagent.relay.auth import ADMIN, OPERATOR, VIEWER, Principal
from medagent.relay.console import html
from medagent.metrics import RelayMetrics
from medagent.relay.console.alerts import KINDS, AlertMonitor
from medagent.relay.console.events import EventBroker, ObservedJournal
from medagent.relay.console.sessions import SessionStore
from medagent.hl7.message import order_number
from medagent.storage import journal as j
from tests import procs

XSS = '<script>alert("x")</script>'
XSS_IMG = "<img src=x onerror=alert(1)>"


def hl7(ctrl: str, name: str = "DOE^JANE", order: str = "ORD1") -> str:
    return (f"MSH|^~\\&|EHR|HOSP|LIS|LAB|20240101120000||ORM^O01|{ctrl}|P|2.5.1\r"
            f"PID|1||12345^^^MRN||{name}\rORC|NW|{order}\rOBR|1|{order}||GLU^Glucose")


class Browser:
    """A cookie, a CSRF token read from the pages, and no redirect following."""

    def __init__(self, testcase: TestCase, base: str, pool: Any) -> None:
        self.base = base
        self.pool = pool
        self.cookie: str | None = None
        self.csrf: str | None = None
        self.set_cookie: str = ""

    async def request(self, method: str, path: str, form: dict[str, str] | None = None,
                      origin: str | None = "same") -> tuple[int, str, Any]:
        headers = {}
        if self.cookie:
            headers["Cookie"] = [self.cookie]
        if origin == "same":
            origin = self.base
        if origin is not None and method == "POST":
            headers["Origin"] = [origin]
        data = None
        if form is not None:
            headers["Content-Type"] = ["application/x-www-form-urlencoded"]
            data = urlencode(form).encode()
        r = await treq.request(method, self.base + path, headers=headers, data=data,
                               pool=self.pool, allow_redirects=False)
        text = (await r.content()).decode("utf-8")
        for raw in r.headers.getRawHeaders("set-cookie") or []:
            self.set_cookie = raw
            value = raw.split(";", 1)[0]
            self.cookie = value if value.split("=", 1)[1] else None
        found = re.search(r'name="csrf" value="([^"]+)"', text)
        if found:
            self.csrf = found.group(1)
        return r.code, text, r.headers

    async def get(self, path: str) -> tuple[int, str, Any]:
        return await self.request("GET", path)

    async def post(self, path: str, form: dict[str, str] | None = None, *,
                   csrf: bool = True, origin: str | None = "same") -> tuple[int, str, Any]:
        form = dict(form or {})
        if csrf and self.csrf:
            form.setdefault("csrf", self.csrf)
        return await self.request("POST", path, form, origin)

    async def login(self, creds: dict[str, Any]) -> int:
        code, _, _ = await self.post("/console/login", {"client_id": creds["clientId"],
                                                        "client_secret": creds["clientSecret"]},
                                     csrf=False)
        if code == 303:
            await self.get("/console/fleet")  # reads the CSRF token
        return code


class RawStream(Protocol):
    """An HTTP/1.1 request written by hand, its answer kept as bytes (an event stream never
    ends, so treq's buffering reads do not fit)."""

    def __init__(self, request: bytes) -> None:
        self.request = request
        self.data = b""
        self.lost: Deferred[None] = Deferred()
        self._waiting: list[tuple[bytes, Deferred[None]]] = []

    def connectionMade(self) -> None:  # noqa: N802
        assert self.transport is not None
        self.transport.write(self.request)

    def dataReceived(self, data: bytes) -> None:  # noqa: N802
        self.data += data
        for needle, d in list(self._waiting):
            if needle in self.data:
                self._waiting.remove((needle, d))
                d.callback(None)

    def connectionLost(self, reason: Any = None) -> None:  # noqa: N802
        self.lost.callback(None)

    def wait_for(self, needle: bytes, timeout: float = 10.0) -> Deferred[None]:
        if needle in self.data:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._waiting.append((needle, d))
        return d.addTimeout(timeout, reactor)


async def open_stream(testcase: TestCase, base: str, cookie: str | None) -> RawStream:
    host, port = base.removeprefix("http://").split(":")
    lines = [b"GET /console/events HTTP/1.1", f"Host: {host}:{port}".encode()]
    if cookie:
        lines.append(f"Cookie: {cookie}".encode())
    proto = RawStream(b"\r\n".join(lines) + b"\r\n\r\n")
    await connectProtocol(TCP4ClientEndpoint(reactor, host, int(port)), proto)

    def close() -> Deferred[None]:
        if proto.transport is not None:
            proto.transport.loseConnection()
        return proto.lost

    testcase.addCleanup(close)
    return proto


def _location(headers: Any) -> str:
    return (headers.getRawHeaders("location") or [""])[0]


class ConsolePages(TestCase):
    timeout = 60

    def setUp(self) -> Deferred:
        return ensureDeferred(self._setUp())

    async def _setUp(self) -> None:
        self.relay, self.base, self.pool = procs.in_process_relay(
            self, "relay-console-", login_failures_per_client=3)
        auth = self.relay.authority
        self.admin_creds = await auth.create_client(ADMIN)
        self.operator_creds = await auth.create_client(OPERATOR)
        self.viewer_creds = await auth.create_client(VIEWER)
        self.pusher_creds = await auth.create_client("pusher", ["*"])
        self.admin = Principal(self.admin_creds["clientId"], ADMIN)
        self.agent = await self.relay.store.create(
            {"resourceType": "Agent", "name": f"Lab {XSS}", "status": "active"})

    def browser(self) -> Browser:
        return Browser(self, self.base, self.pool)

    async def push(self, ctrl: str, name: str = "DOE^JANE", order: str = "ORD1",
                   destination: str = "mllp://127.0.0.1:9") -> j.Push:
        result = await self.relay.pushes.push(
            self.admin, (self.agent["id"], None),
            {"destination": destination, "contentType": "x-application/hl7-v2+er7",
             "body": hl7(ctrl, name, order)})
        return result.push

    async def failed_push(self, ctrl: str, **kw: Any) -> j.Push:
        push = await self.push(ctrl, **kw)
        await self.relay.journal.transition(push, j.FAILED, error="AE from the device")
        await self.relay.journal.flushed()
        return push

    # -- sign-in ----------------------------------------------------------------------

    def test_sign_in_sets_a_strict_httponly_cookie_and_shows_the_fleet_escaped(self
                                                                             ) -> Deferred:
        async def go() -> None:
            b = self.browser()
            code, _, headers = await b.get("/console/fleet")
            self.assertEqual((code, _location(headers)), (303, "/console/login"))
            code, text, headers = await b.get("/console/login")
            self.assertEqual(code, 200)
            self.assertIn('<label for="client_id">', text)
            self.assertEqual(await b.login(self.viewer_creds), 303)
            cookie = b.set_cookie.lower()
            self.assertIn("httponly", cookie)
            self.assertIn("samesite=strict", cookie)
            self.assertIn("path=/console", cookie)
            self.assertNotIn("secure", cookie)  # plain http on loopback
            code, text, headers = await b.get("/console/fleet")
            self.assertEqual(code, 200)
            self.assertIn(f'id="agent-{self.agent["id"]}"', text)
            self.assertIn("Lab &lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;", text)
            self.assertNotIn(XSS, text)
            self.assertIn("script-src 'self'",
                          headers.getRawHeaders("content-security-policy")[0])
            self.assertIn("offline", text)
            # signing in again replaces the session (never keeps the id the browser had)
            old = b.cookie
            self.assertEqual(await b.login(self.viewer_creds), 303)
            self.assertNotEqual(b.cookie, old)
            self.assertEqual(len(self.relay.console.sessions), 1)

        return ensureDeferred(go())

    def test_wrong_secret_unknown_client_and_other_roles_are_refused(self) -> Deferred:
        async def go() -> None:
            b = self.browser()
            bad = {**self.operator_creds, "clientSecret": "nope"}
            self.assertEqual(await b.login(bad), 401)
            self.assertIsNone(b.cookie)
            self.assertEqual(await b.login({"clientId": "nobody", "clientSecret": "x"}), 401)
            code = await b.login(self.pusher_creds)
            self.assertEqual(code, 401)
            self.assertIsNone(b.cookie)

        return ensureDeferred(go())

    def test_failed_sign_ins_are_throttled_per_client(self) -> Deferred:
        async def go() -> None:
            b = self.browser()
            bad = {**self.operator_creds, "clientSecret": "nope"}
            for _ in range(3):
                self.assertEqual(await b.login(bad), 401)
            # locked out now, even with the right secret
            self.assertEqual(await b.login(self.operator_creds), 429)
            self.assertIsNone(b.cookie)

        return ensureDeferred(go())

    def test_idle_session_expires_on_the_clock_and_logout_ends_it(self) -> Deferred:
        async def go() -> None:
            clock = Clock()
            clock.advance(1000)
            self.relay.console.sessions.clock = clock
            b = self.browser()
            self.assertEqual(await b.login(self.operator_creds), 303)
            clock.advance(29 * 60)
            self.assertEqual((await b.get("/console/fleet"))[0], 200)  # used: idle again
            clock.advance(29 * 60)
            self.assertEqual((await b.get("/console/messages"))[0], 200)
            clock.advance(30 * 60 + 1)
            code, _, headers = await b.get("/console/fleet")
            self.assertEqual((code, _location(headers)), (303, "/console/login"))
            self.assertEqual(len(self.relay.console.sessions), 0)
            # logout
            self.assertEqual(await b.login(self.operator_creds), 303)
            code, _, headers = await b.post("/console/logout")
            self.assertEqual((code, _location(headers)), (303, "/console/login"))
            self.assertIsNone(b.cookie)
            self.assertEqual(len(self.relay.console.sessions), 0)

        return ensureDeferred(go())

    def test_revoking_the_client_ends_its_console_session(self) -> Deferred:
        async def go() -> None:
            b = self.browser()
            self.assertEqual(await b.login(self.operator_creds), 303)
            await self.relay.authority.revoke_client(self.operator_creds["clientId"])
            code, _, headers = await b.get("/console/fleet")
            self.assertEqual((code, _location(headers)), (303, "/console/login"))

        return ensureDeferred(go())

    def test_console_roles_have_no_rights_in_the_http_api(self) -> Deferred:
        async def go() -> None:
            push = await self.failed_push("APIR0001")
            for creds in (self.viewer_creds, self.operator_creds):
                r = await treq.post(self.base + "/oauth2/token", data={
                    "grant_type": "client_credentials", "client_id": creds["clientId"],
                    "client_secret": creds["clientSecret"]}, pool=self.pool)
                token = (await r.json())["access_token"]
                headers = {"Authorization": [f"Bearer {token}"],
                           "Content-Type": ["application/json"]}
                for method, path, body in (
                        ("GET", "/fhir/R4/AgentPush", None),
                        ("GET", f"/fhir/R4/AgentPush/{push.id}", None),
                        ("POST", f"/fhir/R4/AgentPush/{push.id}/$retry", b"{}"),
                        ("GET", f"/fhir/R4/Agent/{self.agent['id']}", None),
                        ("POST", f"/fhir/R4/Agent/{self.agent['id']}/$push", json.dumps({
                            "destination": "mllp://127.0.0.1:9", "body": hl7("X1"),
                            "contentType": "x-application/hl7-v2+er7"}).encode())):
                    r = await treq.request(method, self.base + path, headers=headers,
                                           data=body, pool=self.pool)
                    await r.content()
                    self.assertIn(r.code, (403, 404), (creds["role"], method, path))
            self.assertEqual((await self.relay.journal.get(push.id)).state, j.FAILED)

        return ensureDeferred(go())

    def test_event_stream_needs_a_session_is_bounded_and_carries_no_payload(self
                                                                           ) -> Deferred:
        async def go() -> None:
            broker = self.relay.console.broker
            anonymous = await open_stream(self, self.base, None)
            await anonymous.wait_for(b"HTTP/1.1 401")
            b = self.browser()
            self.assertEqual(await b.login(self.operator_creds), 303)
            broker.max_per_key = 2
            streams = [await open_stream(self, self.base, b.cookie) for _ in range(2)]
            for stream in streams:
                await stream.wait_for(b"event: sessions")
                self.assertIn(b"text/event-stream", stream.data)
            third = await open_stream(self, self.base, b.cookie)
            await third.wait_for(b"HTTP/1.1 503")
            self.assertEqual(len(broker.streams), 2)
            push = await self.failed_push("SSE00001", name="SECRET^PATIENT")
            for stream in streams:
                await stream.wait_for(f'"id":"{push.id}"'.encode())
                await stream.wait_for(b'"state":"failed"')
                self.assertIn(b'"controlId":"SSE00001"', stream.data)
                self.assertNotIn(b"SECRET", stream.data)
            # a stream ends with its session (here: idle expiry, seen at the next keep-alive)
            clock = Clock()
            clock.advance(self.relay.console.sessions.clock.seconds())
            self.relay.console.sessions.clock = clock
            clock.advance(31 * 60)
            broker._ping()
            for stream in streams:
                await stream.wait_for(b"\r\n0\r\n\r\n")  # the response's last chunk
            await procs.wait_until(lambda: not broker.streams, timeout=10,
                                   what="the streams forgotten")

        return ensureDeferred(go())

    # -- CSRF, Origin -----------------------------------------------------------------

    def test_csrf_attack_without_or_with_a_wrong_token_or_origin_is_refused(self
                                                                             ) -> Deferred:
        async def go() -> None:
            push = await self.failed_push("CSRF0001")
            b = self.browser()
            self.assertEqual(await b.login(self.operator_creds), 303)
            path = f"/console/message/{push.id}/retry"
            # the attacker's page posts the form without the token (the browser would send
            # the cookie, were it not SameSite=Strict)
            code, text, _ = await b.post(path, csrf=False, origin="http://evil.example")
            self.assertEqual(code, 403)
            code, text, _ = await b.post(path, csrf=False, origin=None)
            self.assertEqual(code, 403)
            self.assertIn("security token", text)
            code, _, _ = await b.post(path, {"csrf": "x" * 43}, csrf=False)
            self.assertEqual(code, 403)
            # the right token from another origin
            code, text, _ = await b.post(path, origin="http://evil.example")
            self.assertEqual(code, 403)
            self.assertIn("another site", text)
            self.assertEqual((await self.relay.journal.get(push.id)).state, j.FAILED)
            # and the real form
            code, _, headers = await b.post(path)
            self.assertEqual((code, _location(headers)),
                             (303, f"/console/message/{push.id}?done=retried"))
            self.assertEqual((await self.relay.journal.current(push.id)).state, j.QUEUED)
            # no session at all
            code, _, _ = await self.browser().post(path, {"csrf": b.csrf or ""})
            self.assertEqual(code, 403)

        return ensureDeferred(go())

    # -- roles ------------------------------------------------------------------------

    def test_viewer_sees_no_payload_and_cannot_act(self) -> Deferred:
        async def go() -> None:
            push = await self.failed_push("VIEW0001", name="SECRET^PATIENT")
            b = self.browser()
            self.assertEqual(await b.login(self.viewer_creds), 303)
            code, text, _ = await b.get(f"/console/message/{push.id}")
            self.assertEqual(code, 200)
            self.assertIn("VIEW0001", text)
            self.assertNotIn("SECRET", text)
            self.assertNotIn("Show the payload", text)
            self.assertNotIn('name="retry"', text)
            code, text, _ = await b.get(f"/console/message/{push.id}?payload=1")
            self.assertEqual(code, 403)
            self.assertNotIn("SECRET", text)
            for action in ("retry", "cancel", "resend"):
                code, _, _ = await b.post(f"/console/message/{push.id}/{action}")
                self.assertEqual(code, 403, action)
            code, _, _ = await b.post(f"/console/agent/{self.agent['id']}/reload")
            self.assertEqual(code, 403)
            self.assertEqual((await self.relay.journal.get(push.id)).state, j.FAILED)
            audits = await self.relay.store.search("AuditEvent", {})
            self.assertEqual(audits, [])

        return ensureDeferred(go())

    def test_operator_payload_view_is_escaped_and_audited_without_the_payload(self
                                                                              ) -> Deferred:
        async def go() -> None:
            push = await self.failed_push("PAYL0001", name=f"DOE^{XSS_IMG}")
            b = self.browser()
            self.assertEqual(await b.login(self.operator_creds), 303)
            code, text, _ = await b.get(f"/console/message/{push.id}")
            self.assertIn("Show the payload", text)
            self.assertNotIn("DOE^", text)
            self.assertEqual(await self.relay.store.search("AuditEvent", {}), [])
            code, text, _ = await b.get(f"/console/message/{push.id}?payload=1")
            self.assertEqual(code, 200)
            self.assertIn("DOE^&lt;img src=x onerror=alert(1)&gt;", text)
            self.assertNotIn(XSS_IMG, text)
            audits = await self.relay.store.search("AuditEvent", {})
            self.assertEqual(len(audits), 1)
            audit = json.dumps(audits[0])
            self.assertIn(push.id, audit)
            self.assertIn(self.operator_creds["clientId"], audit)
            self.assertNotIn("DOE", audit)
            self.assertNotIn("PAYL0001", audit)  # not even the control id
            self.assertEqual(audits[0]["action"], "R")

        return ensureDeferred(go())

    def test_xss_in_destination_and_error_is_escaped(self) -> Deferred:
        async def go() -> None:
            push = await self.push("XSSD0001", destination=f"mllp://127.0.0.1:9?x={XSS}")
            await self.relay.journal.transition(push, j.FAILED, error=XSS_IMG)
            await self.relay.journal.flushed()
            b = self.browser()
            self.assertEqual(await b.login(self.admin_creds), 303)
            for path in ("/console/messages", f"/console/message/{push.id}",
                         f"/console/agent/{self.agent['id']}", "/console/fleet"):
                code, text, _ = await b.get(path)
                self.assertEqual(code, 200, path)
                self.assertNotIn(XSS, text, path)
                self.assertNotIn(XSS_IMG, text, path)
            code, text, _ = await b.get(f"/console/message/{push.id}")
            self.assertIn("&lt;img src=x onerror=alert(1)&gt;", text)

        return ensureDeferred(go())

    # -- search, actions --------------------------------------------------------------

    def test_messages_are_found_by_msh10_order_number_state_and_time(self) -> Deferred:
        async def go() -> None:
            wanted = await self.push("FINDME01", order="ACC-77")
            for i in range(5):
                await self.push(f"OTHER{i:03d}")
            await self.failed_push("BROKEN01")
            b = self.browser()
            self.assertEqual(await b.login(self.viewer_creds), 303)
            code, text, _ = await b.get("/console/messages?control_id=FINDME01")
            self.assertEqual(code, 200)
            self.assertIn(f'id="push-{wanted.id}"', text)
            self.assertEqual(text.count('<tr id="push-'), 1)
            self.assertIn('<span data-count="1">1</span> message(s)', text)
            code, text, _ = await b.get("/console/messages?accession=ACC-77")
            self.assertEqual(text.count('<tr id="push-'), 1)
            code, text, _ = await b.get("/console/messages?state=failed")
            self.assertEqual(text.count('<tr id="push-'), 1)
            self.assertIn("BROKEN01", text)
            code, text, _ = await b.get("/console/messages")
            self.assertEqual(text.count('<tr id="push-'), 7)
            self.assertIn('data-live="1"', text)
            code, text, _ = await b.get("/console/messages?since=2000-01-01T00:00"
                                        "&until=2000-01-02T00:00")
            self.assertEqual(text.count('<tr id="push-'), 0)
            code, _, _ = await b.get("/console/messages?state=bogus")
            self.assertEqual(code, 400)
            code, _, _ = await b.get("/console/messages?since=yesterday")
            self.assertEqual(code, 400)
            # the search reads the index, not the table
            plan = await self.relay.db.run(lambda conn: conn.execute(
                "EXPLAIN QUERY PLAN SELECT * FROM pushes WHERE control_id=? ORDER BY seq DESC",
                ("FINDME01",)).fetchall())
            self.assertIn("pushes_control", " ".join(str(tuple(r)) for r in plan))

        return ensureDeferred(go())

    def test_resend_makes_a_new_push_linked_to_the_original(self) -> Deferred:
        async def go() -> None:
            push = await self.failed_push("RESEND01")
            b = self.browser()
            self.assertEqual(await b.login(self.operator_creds), 303)
            code, _, headers = await b.post(f"/console/message/{push.id}/resend")
            self.assertEqual(code, 303)
            new_id = _location(headers).split("/console/message/")[1].split("?")[0]
            self.assertNotEqual(new_id, push.id)
            new = await self.relay.journal.current(new_id)
            self.assertEqual((new.resent_from, new.control_id, new.body, new.state,
                              new.requester),
                             (push.id, "RESEND01", push.body, j.QUEUED,
                              self.operator_creds["clientId"]))
            self.assertEqual((await self.relay.journal.get(push.id)).state, j.FAILED)
            code, text, _ = await b.get(f"/console/message/{new_id}")
            self.assertIn(f'href="/console/message/{push.id}"', text)
            code, text, _ = await b.get(f"/console/message/{push.id}")
            self.assertIn(f'id="push-{new_id}"', text)  # listed among its resends
            # an open push cannot be resent; a queued one can be cancelled
            code, text, _ = await b.post(f"/console/message/{new_id}/resend")
            self.assertEqual(code, 409)
            code, _, _ = await b.post(f"/console/message/{new_id}/cancel")
            self.assertEqual(code, 303)
            self.assertEqual((await self.relay.journal.current(new_id)).state, j.CANCELLED)

        return ensureDeferred(go())

    def test_agent_page_lists_lanes_and_reload_needs_a_connected_agent(self) -> Deferred:
        async def go() -> None:
            await self.push("LANE0001")
            await self.failed_push("LANE0002", destination="mllp://127.0.0.1:10")
            b = self.browser()
            self.assertEqual(await b.login(self.operator_creds), 303)
            code, text, _ = await b.get(f"/console/agent/{self.agent['id']}")
            self.assertEqual(code, 200)
            self.assertIn("mllp://127.0.0.1:9", text)
            self.assertIn("mllp://127.0.0.1:10", text)
            self.assertIn("AE from the device", text)
            self.assertIn('name="reload"', text)
            code, text, _ = await b.post(f"/console/agent/{self.agent['id']}/reload")
            self.assertIn(code, (404, 503))  # not connected: said, not a crash
            code, _, _ = await b.get("/console/agent/nobody")
            self.assertEqual(code, 404)

        return ensureDeferred(go())


class ConsoleBehindHTTPS(TestCase):
    """A relay whose public URL is https (behind a TLS proxy): the cookie is Secure, and the
    origin a form must come from is that URL's."""

    timeout = 30

    def test_secure_cookie_and_the_public_origin(self) -> Deferred:
        async def go() -> None:
            relay, base, pool = procs.in_process_relay(
                self, "relay-console-https-", base_url="https://relay.example.org")
            creds = await relay.authority.create_client(OPERATOR)
            b = Browser(self, base, pool)
            form = {"client_id": creds["clientId"], "client_secret": creds["clientSecret"]}
            code, _, _ = await b.post("/console/login", form, csrf=False)  # Origin: http://...
            self.assertEqual(code, 403)
            code, _, _ = await b.post("/console/login", form, csrf=False,
                                      origin="https://relay.example.org")
            self.assertEqual(code, 303)
            self.assertIn("secure", b.set_cookie.lower())

        return ensureDeferred(go())


# -- units ---------------------------------------------------------------------------------


class Sessions(SynchronousTestCase):
    def test_idle_expiry_bound_and_csrf(self) -> None:
        clock = Clock()
        store = SessionStore(clock, idle=60, max_sessions=2)
        p = Principal("c1", OPERATOR)
        a = store.create(p)
        clock.advance(59)
        self.assertIs(store.get(a.id), a)
        clock.advance(60.5)
        self.assertIsNone(store.get(a.id))
        b, c, d = store.create(p), store.create(p), store.create(p)
        self.assertIsNone(store.get(b.id))  # the least recently used went first
        self.assertIs(store.get(c.id), c)
        self.assertTrue(d.csrf_ok(d.csrf))
        self.assertFalse(d.csrf_ok(c.csrf))
        self.assertFalse(d.csrf_ok(None))
        self.assertFalse(d.csrf_ok("\udcff"))
        self.assertNotEqual(c.id, d.id)
        store.drop_client("c1")
        self.assertEqual(len(store), 0)


class MemorySharedSessions:
    """L{ConsoleSessions} in a dict on a Clock: what nodes sharing a database share."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.rows: dict[bytes, tuple[Any, float]] = {}

    def add(self, session: Any) -> Deferred[None]:
        self.rows[session.id_hash] = (session, self.clock.seconds())
        return succeed(None)

    def use(self, id_hash: bytes, idle: float) -> Deferred[Any]:
        row = self.rows.get(id_hash)
        if row is None or self.clock.seconds() - row[1] > idle:
            return succeed(None)
        self.rows[id_hash] = (row[0], self.clock.seconds())
        return succeed(row[0])

    def drop(self, id_hash: bytes) -> Deferred[None]:
        self.rows.pop(id_hash, None)
        return succeed(None)

    def drop_client(self, client_id: str) -> Deferred[None]:
        for k in [k for k, (s, _) in self.rows.items() if s.client_id == client_id]:
            del self.rows[k]
        return succeed(None)

    def prune(self, idle: float) -> Deferred[int]:
        return succeed(0)


class SharedSessions(SynchronousTestCase):
    """Two nodes' L{SessionStore}s over one shared store."""

    def nodes(self) -> tuple[Clock, MemorySharedSessions, SessionStore, SessionStore]:
        clock = Clock()
        shared = MemorySharedSessions(clock)
        return (clock, shared, SessionStore(clock, idle=60, shared=shared),
                SessionStore(clock, idle=60, shared=shared))

    def found(self, store: SessionStore, session_id: str) -> Any:
        return self.successResultOf(ensureDeferred(store.find(session_id)))

    def test_signed_in_on_one_node_is_signed_in_on_the_other(self) -> None:
        clock, shared, a, b = self.nodes()
        session = self.successResultOf(ensureDeferred(a.open(Principal("c1", OPERATOR))))
        self.assertNotIn(session.id.encode(), b"".join(shared.rows))  # only its hash is kept
        on_b = self.found(b, session.id)
        self.assertEqual((on_b.principal, on_b.csrf), (session.principal, session.csrf))
        self.assertIsNone(self.found(b, "forged"))
        self.assertIsNone(self.found(b, None))

    def test_sign_out_on_one_node_ends_it_on_the_other_within_recheck(self) -> None:
        clock, shared, a, b = self.nodes()
        session = self.successResultOf(ensureDeferred(a.open(Principal("c1", OPERATOR))))
        self.assertIsNotNone(self.found(b, session.id))
        self.successResultOf(ensureDeferred(a.close(session.id)))
        self.assertIsNone(self.found(a, session.id))
        clock.advance(b.recheck)
        self.assertIsNone(self.found(b, session.id))

    def test_use_on_either_node_keeps_it_alive_and_idleness_ends_it(self) -> None:
        clock, shared, a, b = self.nodes()
        session = self.successResultOf(ensureDeferred(a.open(Principal("c1", OPERATOR))))
        for store in (b, a, b, a):
            clock.advance(40)  # idle 60: alive because the other node used it meanwhile
            self.assertIsNotNone(self.found(store, session.id))
        clock.advance(61)
        self.assertIsNone(self.found(a, session.id))
        self.assertIsNone(self.found(b, session.id))

    def test_revoked_client_ends_everywhere(self) -> None:
        clock, shared, a, b = self.nodes()
        session = self.successResultOf(ensureDeferred(a.open(Principal("c1", OPERATOR))))
        a.drop_client("c1")
        clock.advance(b.recheck)
        self.assertIsNone(self.found(b, session.id))

    def test_a_shared_store_that_fails_signs_nobody_in(self) -> None:
        clock, shared, a, b = self.nodes()
        shared.add = lambda s: fail(RuntimeError("database away"))  # type: ignore[method-assign]
        self.failureResultOf(ensureDeferred(a.open(Principal("c1", OPERATOR))), RuntimeError)
        self.assertEqual(len(a), 0)


class Rendering(SynchronousTestCase):
    def test_everything_from_outside_is_escaped(self) -> None:
        push = j.Push(id=XSS, agent_id=XSS, destination=XSS, remote=XSS,
                      content_type=XSS, body=XSS, control_id=XSS, accession=XSS,
                      last_error=XSS, resent_from=XSS, state=j.FAILED)
        who = Principal(XSS, OPERATOR)
        pages = [
            html.message_page(push, resends=[push], can_act=True,
                              can_see_payload=True, payload_shown=True, csrf=XSS, who=who),
            html.messages_page([push], {"control_id": XSS}, 1, 5, live=False, who=who,
                               csrf=XSS),
            html.fleet_page([{"id": XSS, "name": XSS, "connected": True, "version": XSS,
                              "node": XSS}], 0.0, who=who, csrf=XSS),
            html.agent_page({"id": XSS, "name": XSS, "connected": False},
                            [{"remote": XSS, "lastState": XSS, "lastError": XSS}], 0.0,
                            can_act=True, csrf=XSS, who=who),
            html.login_page(XSS, XSS),
        ]
        for page in pages:
            self.assertNotIn(b"<script>alert", page)
            self.assertNotIn(b'"x")', page)

    def test_only_roles_that_see_patient_data_search_by_patient_id(self) -> None:
        for role, shown in ((VIEWER, False), (OPERATOR, True), (ADMIN, True)):
            page = html.messages_page([], {}, 0, None, live=False,
                                      who=Principal("c", role), csrf="t")
            self.assertEqual(b'name="patient_id"' in page, shown, role)

    def test_the_message_page_shows_the_pushs_own_timeline(self) -> None:
        push = j.Push(id="p1", agent_id="a1", destination="Device/d", remote="mllp://h:1",
                      content_type="x-application/hl7-v2+er7", body="MSH|", state=j.DELIVERED,
                      created=100.0, updated=100.0045)
        for stage, at in (("received", 100.0), ("journaled", 100.0015), ("sent", 100.002),
                          ("accepted", 100.003), ("answered", 100.004)):
            push.stamp(stage, at)
        page = html.message_page(push, resends=[], can_act=False, can_see_payload=False,
                                 payload_shown=False, csrf="t",
                                 who=Principal("v", "viewer")).decode()
        timeline = page[page.index('id="timeline"'):]
        for text in ("received", "journaled", "sent to the agent", "+1.5 ms",
                     "on the agent&#x27;s disk", "device answered", "+4.0 ms", "delivered"):
            self.assertIn(text, timeline)

    def test_order_number(self) -> None:
        self.assertEqual(order_number(hl7("C1", order="A-1")), "A-1")
        self.assertEqual(order_number("MSH|^~\\&|A|B|C|D|x||ORM^O01|C1|P|2.5\rOBR|1||F9^LAB"),
                         "F9")
        self.assertIsNone(order_number("MSH|^~\\&|A|B\rPID|1"))
        self.assertIsNone(order_number("not hl7"))


class FakeRequest:
    """What a stream uses of a twisted.web request."""

    def __init__(self) -> None:
        self.written: list[bytes] = []
        self.headers: dict[bytes, bytes] = {}
        self.producer: Any = None
        self.finished = False
        self._finish: list[Deferred[None]] = []

    def setHeader(self, k: bytes, v: bytes) -> None:  # noqa: N802
        self.headers[k] = v

    def registerProducer(self, producer: Any, streaming: bool) -> None:  # noqa: N802
        self.producer = producer

    def unregisterProducer(self) -> None:  # noqa: N802
        self.producer = None

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def notifyFinish(self) -> Deferred[None]:  # noqa: N802
        d: Deferred[None] = Deferred()
        self._finish.append(d)
        return d

    def finish(self) -> None:
        self.finished = True
        for d in self._finish:
            d.callback(None)
        self._finish = []


class Events(SynchronousTestCase):
    def test_streams_are_bounded_and_a_slow_one_is_dropped(self) -> None:
        clock = Clock()
        broker = EventBroker(clock, max_clients=2, max_queued=3)
        r1, r2, r3 = FakeRequest(), FakeRequest(), FakeRequest()
        s1 = broker.open(r1)
        self.assertIsNotNone(broker.open(r2))
        self.assertIsNone(broker.open(r3))  # too many
        self.assertEqual(r1.headers[b"Content-Type"], b"text/event-stream; charset=utf-8")
        assert s1 is not None
        s1.pauseProducing()  # its socket is full
        for i in range(3):
            broker.publish("push", {"n": i})
        self.assertEqual(len(s1.queued), 3)
        self.assertFalse(r1.finished)
        broker.publish("push", {"n": 3})  # one more than it may hold
        self.assertTrue(r1.finished)
        self.assertEqual(len(broker.streams), 1)
        self.assertTrue(any(b'"n":3' in w for w in r2.written))
        clock.advance(20)
        self.assertIn(b": keep-alive\n\n", r2.written)
        r2.finish()  # the browser went away
        self.assertEqual(broker.streams, [])
        broker.max_per_key = 1
        self.assertIsNotNone(broker.open(FakeRequest(), key="session-1"))
        self.assertIsNone(broker.open(FakeRequest(), key="session-1"))
        last = FakeRequest()
        self.assertIsNotNone(broker.open(last, key="session-2"))
        broker.close()  # the relay stops
        self.assertTrue(last.finished)
        self.assertEqual(broker.streams, [])
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_journal_events_carry_no_payload(self) -> None:
        clock = Clock()
        broker = EventBroker(clock)
        request = FakeRequest()
        broker.open(request)

        class Journal:
            def transition(self, push: Any, state: str, **kw: Any) -> Deferred[Any]:
                push.state = state
                d: Deferred[Any] = Deferred()
                d.callback(push)
                return d

        observed = ObservedJournal(Journal(), broker, clock)
        push = j.Push(id="p1", agent_id="a1", destination="Device/d", remote="mllp://h:1",
                      content_type="x-application/hl7-v2+er7", body="MSH|SECRET",
                      reply_body="SECRET ACK", control_id="C1")
        observed.transition(push, j.FAILED, error="AE")
        text = b"".join(request.written)
        self.assertIn(b'"state":"failed"', text)
        self.assertIn(b'"controlId":"C1"', text)
        self.assertNotIn(b"SECRET", text)


class FakeHub:
    def __init__(self) -> None:
        self.connected: set[str] = set()
        self.last: dict[str, float] = {}

    def is_connected(self, agent_id: str) -> bool:
        return agent_id in self.connected

    def status(self, agent_id: str) -> dict[str, Any]:
        return {"status": "disconnected", "lastUpdated": self.last.get(agent_id)}


class FakeStore:
    def __init__(self, agents: list[dict[str, Any]]) -> None:
        self.agents = agents

    def search(self, resource_type: str, params: Any) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        d.callback(self.agents)
        return d


class FakeSummaries:
    """The journal's per-agent summaries (what the queue alert reads)."""

    def __init__(self) -> None:
        self.rows: dict[str, dict[str, Any]] = {}

    def agent_summaries(self, since: float) -> Deferred[dict[str, dict[str, Any]]]:
        from twisted.internet.defer import succeed

        return succeed(dict(self.rows))


class Alerts(SynchronousTestCase):
    def test_a_stuck_queue_is_one_alert_cleared_when_it_moves(self) -> None:
        clock = Clock()
        clock.advance(10_000)
        journal = FakeSummaries()
        monitor = AlertMonitor(clock, FakeHub(), FakeStore([]), offline_after=None,
                               journal=journal, queue_age_after=600, interval=15)
        seen: list[tuple[str, str, bool]] = []
        monitor.listeners.append(
            lambda alert, raised: seen.append((alert.kind, alert.agent_id, raised)))
        monitor.start()
        journal.rows["a1"] = {"open": 40, "oldestOpen": clock.seconds(), "failedSince": 0}
        journal.rows["a2"] = {"open": 0, "oldestOpen": None, "failedSince": 3}
        for _ in range(39):  # 585 s: not yet
            clock.advance(15)
        self.assertEqual(seen, [])
        for _ in range(20):  # past 600 s, checked many times, 40 pushes waiting: one alert
            clock.advance(15)
        self.assertEqual(seen, [("queue-age", "a1", True)])
        self.assertEqual(monitor.active[("queue-age", "a1")].text(),
                         "Agent/a1: pushes waiting too long")
        journal.rows["a1"] = {"open": 2, "oldestOpen": clock.seconds() - 5, "failedSince": 0}
        clock.advance(15)  # the stuck ones went; the two waiting are young
        self.assertEqual(seen, [("queue-age", "a1", True), ("queue-age", "a1", False)])
        self.assertEqual(monitor.active, {})
        monitor.stop()

    def test_offline_alert_is_raised_once_and_cleared(self) -> None:
        clock = Clock()
        clock.advance(1000)
        hub = FakeHub()
        hub.connected.add("a1")
        monitor = AlertMonitor(clock, hub, FakeStore([{"id": "a1"}, {"id": "off",
                                                                     "status": "off"}]),
                               offline_after=300, interval=15)
        seen: list[tuple[str, bool]] = []
        monitor.listeners.append(lambda alert, raised: seen.append((alert.agent_id, raised)))
        metrics = RelayMetrics()
        metrics.watch_alerts(monitor, KINDS)
        monitor.start()
        clock.advance(15)
        hub.connected.discard("a1")
        hub.last["a1"] = clock.seconds()
        for _ in range(19):  # 285 s offline: not yet
            clock.advance(15)
        self.assertEqual(seen, [])
        for _ in range(10):  # past 300 s, checked many times: one alert
            clock.advance(15)
        self.assertEqual(seen, [("a1", True)])
        self.assertEqual(list(monitor.active), [("agent-offline", "a1")])
        self.assertIn(b'medagent_relay_alerts_active{kind="agent-offline"} 1.0',
                      metrics.render())
        hub.connected.add("a1")
        clock.advance(15)
        self.assertEqual(seen, [("a1", True), ("a1", False)])
        self.assertEqual(monitor.active, {})
        self.assertEqual(monitor.history[0].agent_id, "a1")
        self.assertIn(b'medagent_relay_alerts_active{kind="agent-offline"} 0.0',
                      metrics.render())
        monitor.stop()
        self.assertEqual(clock.getDelayedCalls(), [])
