"""
Subscription rest-hooks as an attack: SSRF to loopback, metadata and private addresses,
injected credential headers, redirects, and a Bot that would trigger itself forever.

Network tests listen and connect on loopback only.  Private and metadata addresses appear only
as literals handed to pure functions: nothing ever connects to them.
"""

from __future__ import annotations

import ipaddress
from typing import Any

from twisted.internet import defer, reactor
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.resource import Resource
from twisted.web.server import Site

from medagent.relay.subscriptions import SubscriptionManager, subscription_spec, treq_poster
from medagent.relay.webhooks import (
    WebhookPolicy,
    WebhookRefused,
    forbidden_address,
    header_problem,
)
from medagent.storage.sqlite.deliveries import SQLiteDeliveryQueue
from medagent.storage.sqlite.store import SQLiteStore
from tests.fakes import InlineReactor, inline_database
from tests.test_subscriptions import SR, FakeRunner, subscription


class AddressRuleTests(SynchronousTestCase):
    def test_refused_address_classes(self) -> None:
        # Never contacted: pure classification.
        for text in ("127.0.0.1", "127.9.9.9", "::1", "169.254.169.254", "fe80::1",
                     "10.1.2.3", "172.16.0.1", "192.168.1.1", "100.64.0.1", "0.0.0.0",
                     "224.0.0.1", "fd00::1", "::ffff:127.0.0.1", "::ffff:169.254.169.254",
                     "240.0.0.1", "::"):
            self.assertTrue(forbidden_address(ipaddress.ip_address(text)), text)

    def test_public_addresses_pass(self) -> None:
        for text in ("93.184.216.34", "2606:4700:4700::1111", "8.8.8.8"):
            self.assertFalse(forbidden_address(ipaddress.ip_address(text)), text)


class SpecRuleTests(SynchronousTestCase):
    def spec(self, endpoint: str, headers: list[str] | None = None,
             policy: WebhookPolicy | None = None) -> Any:
        resource = {"id": "s", **subscription(endpoint=endpoint)}
        if headers is not None:
            resource["channel"] = {"type": "rest-hook", "endpoint": endpoint, "header": headers}
        return subscription_spec(resource, policy=policy)

    def test_plain_http_refused_unless_allowlisted(self) -> None:
        spec = self.spec("http://127.0.0.1:8103/fhir/R4/ServiceRequest")
        self.assertFalse(spec.usable)
        self.assertIn("https", spec.problem)
        allowed = self.spec("http://127.0.0.1:8103/fhir/R4/x",
                            policy=WebhookPolicy(["http://127.0.0.1:8103"]))
        self.assertTrue(allowed.usable, allowed.problem)
        # The allowlist is an exact origin: another port is not allowed.
        other = self.spec("http://127.0.0.1:8104/x",
                          policy=WebhookPolicy(["http://127.0.0.1:8103"]))
        self.assertFalse(other.usable)

    def test_address_literals_refused(self) -> None:
        for url in ("https://127.0.0.1:8443/x", "https://[::1]/x",
                    "https://169.254.169.254/latest/meta-data/", "https://[::ffff:7f00:1]/x"):
            spec = self.spec(url)
            self.assertFalse(spec.usable, url)

    def test_credentials_in_url_refused(self) -> None:
        self.assertFalse(self.spec("https://user:pw@hooks.test/x").usable)

    def test_injected_headers_refused(self) -> None:
        for header in ("Authorization: Bearer stolen", "Host: relay.internal",
                       "Cookie: a=b", "Transfer-Encoding: chunked", "X-Signature: forged",
                       "X-Medplum-Subscription: other", "Proxy-Authorization: x",
                       "Content-Type: text/html"):
            spec = self.spec("https://hooks.test/x", [header])
            self.assertFalse(spec.usable, header)
            self.assertEqual(spec.headers, ())
        self.assertIsNotNone(header_problem("X-Api-Key", "a\r\nInjected: 1"))
        self.assertIsNone(header_problem("X-Api-Key", "abc"))


class _Recorder(Resource):
    isLeaf = True

    def __init__(self, status: int = 200, location: bytes | None = None) -> None:
        super().__init__()
        self.status = status
        self.location = location
        self.requests: list[tuple[bytes, dict[bytes, list[bytes]]]] = []

    def render_POST(self, request: Any) -> bytes:
        self.requests.append((request.uri, dict(request.requestHeaders.getAllRawHeaders())))
        request.setResponseCode(self.status)
        request.setHeader(b"connection", b"close")  # nothing left in the client's pool
        if self.location:
            request.setHeader(b"location", self.location)
        return b"ok"


class _CountingSite(Site):
    """Counts connections; L{closed} fires once every server-side connection is gone."""

    connections = 0

    def __init__(self, *a: Any, **kw: Any) -> None:
        super().__init__(*a, **kw)
        self.lost: list[defer.Deferred[None]] = []

    def buildProtocol(self, addr: Any) -> Any:
        self.connections += 1
        proto = super().buildProtocol(addr)
        lost: defer.Deferred[None] = defer.Deferred()
        self.lost.append(lost)
        original = proto.connectionLost

        def connectionLost(reason: Any) -> None:
            original(reason)
            lost.callback(None)

        proto.connectionLost = connectionLost
        return proto

    def closed(self) -> defer.Deferred[Any]:
        return defer.DeferredList(self.lost)


class GuardedPosterTests(TestCase):
    """The real HTTP client of rest-hooks, aimed at loopback listeners."""

    def listen(self, resource: Resource) -> tuple[_CountingSite, int]:
        site = _CountingSite(resource)
        port = reactor.listenTCP(0, site, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        self.addCleanup(site.closed)  # after the client pool closed its connections
        return site, port.getHost().port

    def poster(self, policy: WebhookPolicy) -> Any:
        post, close = treq_poster(reactor, policy)
        self.addCleanup(close)
        return post

    @defer.inlineCallbacks
    def test_loopback_by_name_is_refused_before_connecting(self) -> None:
        site, port = self.listen(_Recorder())
        post = self.poster(WebhookPolicy())
        for url in (f"https://localhost:{port}/hook", f"http://127.0.0.1:{port}/hook",
                    f"https://127.0.0.1:{port}/hook"):
            with self.assertRaises(WebhookRefused):
                yield post(url, b"{}", {"Content-Type": "application/fhir+json"}, 5.0)
        self.assertEqual(site.connections, 0)

    @defer.inlineCallbacks
    def test_allowlisted_origin_is_delivered_and_redirects_not_followed(self) -> None:
        other_site, other = self.listen(_Recorder())
        recorder = _Recorder(status=307,
                             location=f"http://127.0.0.1:{other}/elsewhere".encode())
        site, port = self.listen(recorder)
        post = self.poster(WebhookPolicy([f"http://127.0.0.1:{port}"]))
        status = yield post(f"http://127.0.0.1:{port}/hook", b"{}",
                            {"Content-Type": "application/fhir+json"}, 5.0)
        self.assertEqual(status, 307)
        self.assertEqual(len(recorder.requests), 1)
        self.assertEqual(other_site.connections, 0)


class LoopTests(SynchronousTestCase):
    """A Bot that writes what it is subscribed to must not run again for its own write."""

    def setUp(self) -> None:
        self.clock = InlineReactor()
        self.db = inline_database(self, SQLiteStore.schema() + SQLiteDeliveryQueue.schema(),
                                  self.clock)
        self.store = SQLiteStore(self.db)
        self.runner = FakeRunner()
        self.manager = SubscriptionManager(self.clock, SQLiteDeliveryQueue(self.db), self.store,
                                           self.runner)
        self.addCleanup(self.manager.stop)
        self.successResultOf(self.manager.start())

    def test_own_write_does_not_fire_own_subscription(self) -> None:
        self.successResultOf(self.store.create(subscription("ServiceRequest",
                                                            endpoint="Bot/bot-1")))
        self.successResultOf(self.store.create(subscription("ServiceRequest",
                                                            endpoint="Bot/bot-2")))
        by_bot = {**{k: v for k, v in SR.items() if k != "id"},
                  "meta": {"author": {"reference": "Bot/bot-1"}}}
        self.successResultOf(self.store.create(by_bot))
        self.assertEqual([c["bot"] for c in self.runner.calls], ["bot-2"])


class AuthorStampTests(SynchronousTestCase):
    def test_author_is_the_writer_not_the_body(self) -> None:
        from medagent.relay.auth import ADMIN, Principal
        from medagent.relay.web import stamp_author

        forged = {"resourceType": "ServiceRequest",
                  "meta": {"author": {"reference": "Bot/bot-1"}, "tag": [{"code": "x"}]}}
        stamp_author(forged, Principal("admin-client", ADMIN))
        self.assertEqual(forged["meta"]["author"],
                         {"reference": "ClientApplication/admin-client"})
        self.assertEqual(forged["meta"]["tag"], [{"code": "x"}])
        mine = {"resourceType": "ServiceRequest"}
        stamp_author(mine, Principal("Bot/bot-1", ADMIN))
        self.assertEqual(mine["meta"]["author"], {"reference": "Bot/bot-1"})
