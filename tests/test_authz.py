"""
Who may read and write what, attacked over real HTTP on loopback (in-process relay, real
SQLite): a pusher or an agent credential trying to read or change what is not theirs.
"""

from __future__ import annotations

import json
from typing import Any

import treq
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.trial.unittest import TestCase

from medagent.relay.access import EXT_DEVICE
from tests import procs


def _device_ext(device: dict[str, Any]) -> dict[str, Any]:
    return {"url": EXT_DEVICE, "valueReference": {"reference": f"Device/{device['id']}"}}


class _ScopedRelay(TestCase):
    """An in-process relay with two sites, their devices, and a client of every role."""

    timeout = 60

    def setUp(self) -> Deferred:
        return ensureDeferred(self._setUp())

    async def _setUp(self) -> None:
        self.relay, self.base, self.pool = procs.in_process_relay(self, "relay-authz-")
        store = self.relay.store
        # Created first, so a page of one would show it if the scope were applied after paging.
        self.stray = await store.create({"resourceType": "Device", "url": "mllp://10.9.9.9:1"})
        self.dev_a = await store.create({"resourceType": "Device", "url": "mllp://10.0.0.1:2575"})
        self.dev_a2 = await store.create({"resourceType": "Device", "url": "mllp://10.0.0.2:2575"})
        self.dev_b = await store.create({"resourceType": "Device", "url": "mllp://10.1.0.1:2575"})
        self.ep_a = await store.create({"resourceType": "Endpoint",
                                        "address": "mllp://0.0.0.0:2575", "status": "active"})
        self.ep_b = await store.create({"resourceType": "Endpoint",
                                        "address": "mllp://0.0.0.0:9999", "status": "active"})
        self.bot = await store.create({"resourceType": "Bot", "name": "b"})
        self.agent_a = await store.create({
            "resourceType": "Agent", "name": "Site A", "status": "active",
            "device": {"reference": f"Device/{self.dev_a2['id']}"},
            "extension": [_device_ext(self.dev_a)],
            "channel": [{"name": "adt", "endpoint": {"reference": f"Endpoint/{self.ep_a['id']}"},
                         "targetReference": {"reference": f"Bot/{self.bot['id']}"}}]})
        self.agent_b = await store.create({
            "resourceType": "Agent", "name": "Site B", "status": "active",
            "extension": [_device_ext(self.dev_b)],
            "channel": [{"name": "adt", "endpoint": {"reference": f"Endpoint/{self.ep_b['id']}"},
                         "targetReference": {"reference": f"Bot/{self.bot['id']}"}}]})
        self.patient = await store.create({"resourceType": "Patient",
                                           "name": [{"family": "Doe"}]})
        self.order = await store.create({"resourceType": "ServiceRequest", "status": "active",
                                         "subject": {"reference": f"Patient/{self.patient['id']}"}})
        auth = self.relay.authority
        self.admin = await self.token(await auth.create_client("admin"))
        self.pusher = await self.token(await auth.create_client("pusher", [self.agent_a["id"]]))
        self.star = await self.token(await auth.create_client("pusher", ["*"]))
        self.agent = await self.token(await auth.create_client("agent", [self.agent_a["id"]]))

    async def token(self, client: dict[str, Any]) -> str:
        r = await treq.post(self.base + "/oauth2/token", data={
            "grant_type": "client_credentials", "client_id": client["clientId"],
            "client_secret": client["clientSecret"]}, pool=self.pool)
        self.assertEqual(r.code, 200)
        return (await r.json())["access_token"]

    async def call(self, token: str, method: str, path: str, body: Any = None
                   ) -> tuple[int, Any]:
        headers = {"Authorization": [f"Bearer {token}"],
                   "Content-Type": ["application/fhir+json"]}
        data = json.dumps(body).encode() if body is not None else None
        r = await treq.request(method, self.base + path, data=data, headers=headers,
                               pool=self.pool)
        return r.code, json.loads(await r.content())

    async def ids(self, token: str, path: str) -> list[str]:
        code, bundle = await self.call(token, "GET", path)
        self.assertEqual(code, 200, bundle)
        self.assertEqual(bundle["total"], len(bundle.get("entry", [])))
        return sorted(e["resource"]["id"] for e in bundle.get("entry", []))

    def assertHidden(self, code: int, outcome: Any, path: str) -> None:
        """Out of scope looks exactly like missing: 404, the same text."""
        self.assertEqual(code, 404, outcome)
        self.assertEqual(outcome["issue"][0]["details"]["text"],
                         f"{path.rsplit('/', 2)[-2]}/{path.rsplit('/', 1)[-1]} not found")


class Scopes(_ScopedRelay):
    def test_pusher_reads_no_clinical_resources(self) -> Deferred:
        async def go() -> None:
            for path in ("/fhir/R4/Patient", f"/fhir/R4/Patient/{self.patient['id']}",
                         "/fhir/R4/ServiceRequest", f"/fhir/R4/ServiceRequest/{self.order['id']}",
                         "/fhir/R4/ServiceRequest?status=active", "/fhir/R4/Patient/missing",
                         "/fhir/R4/Endpoint", f"/fhir/R4/Endpoint/{self.ep_a['id']}",
                         "/fhir/R4/Bot", "/fhir/R4/Subscription", "/fhir/R4/ClientApplication",
                         "/fhir/R4/AuditEvent", "/fhir/R4/Binary"):
                for token in (self.pusher, self.star):
                    code, outcome = await self.call(token, "GET", path)
                    # 403 whatever the id: reveals nothing about any one record
                    self.assertEqual(code, 403, (path, outcome))
                    self.assertNotIn("entry", outcome)

        return ensureDeferred(go())

    def test_pusher_sees_its_agents_and_their_devices_only(self) -> Deferred:
        async def go() -> None:
            a, b = self.agent_a["id"], self.agent_b["id"]
            self.assertEqual(await self.ids(self.pusher, "/fhir/R4/Agent"), [a])
            self.assertEqual(await self.ids(self.pusher, "/fhir/R4/Agent?name=site"), [a])
            self.assertEqual(await self.ids(self.pusher, f"/fhir/R4/Agent?_id={b}"), [])
            self.assertEqual(await self.ids(self.pusher, "/fhir/R4/Device"),
                             sorted([self.dev_a["id"], self.dev_a2["id"]]))
            self.assertEqual(
                await self.ids(self.pusher, "/fhir/R4/Device?url=mllp://10.1.0.1:2575"), [])
            # the scope is in the query, not applied to a page afterwards
            one = await self.ids(self.pusher, "/fhir/R4/Device?_count=1")
            self.assertEqual(len(one), 1)
            self.assertIn(one[0], (self.dev_a["id"], self.dev_a2["id"]))
            code, agent = await self.call(self.pusher, "GET", f"/fhir/R4/Agent/{a}")
            self.assertEqual((code, agent["id"]), (200, a))
            code, _ = await self.call(self.pusher, "GET", f"/fhir/R4/Device/{self.dev_a['id']}")
            self.assertEqual(code, 200)
            for path in (f"/fhir/R4/Agent/{b}", f"/fhir/R4/Device/{self.dev_b['id']}",
                         f"/fhir/R4/Device/{self.stray['id']}", "/fhir/R4/Device/missing",
                         "/fhir/R4/Agent/missing"):
                code, outcome = await self.call(self.pusher, "GET", path)
                self.assertHidden(code, outcome, path)

        return ensureDeferred(go())

    def test_star_pusher_sees_every_agent_and_device(self) -> Deferred:
        async def go() -> None:
            self.assertEqual(await self.ids(self.star, "/fhir/R4/Agent"),
                             sorted([self.agent_a["id"], self.agent_b["id"]]))
            self.assertEqual(len(await self.ids(self.star, "/fhir/R4/Device")), 4)

        return ensureDeferred(go())

    def test_agent_sees_its_config_only(self) -> Deferred:
        async def go() -> None:
            a = self.agent_a["id"]
            self.assertEqual(await self.ids(self.agent, "/fhir/R4/Agent"), [a])
            self.assertEqual(await self.ids(self.agent, "/fhir/R4/Endpoint"), [self.ep_a["id"]])
            self.assertEqual(await self.ids(self.agent, "/fhir/R4/Device"),
                             sorted([self.dev_a["id"], self.dev_a2["id"]]))
            code, endpoint = await self.call(self.agent, "GET",
                                             f"/fhir/R4/Endpoint/{self.ep_a['id']}")
            self.assertEqual((code, endpoint["address"]), (200, "mllp://0.0.0.0:2575"))
            for path in (f"/fhir/R4/Agent/{self.agent_b['id']}",
                         f"/fhir/R4/Endpoint/{self.ep_b['id']}",
                         f"/fhir/R4/Device/{self.dev_b['id']}",
                         f"/fhir/R4/Device/{self.stray['id']}"):
                code, outcome = await self.call(self.agent, "GET", path)
                self.assertHidden(code, outcome, path)
            for path in ("/fhir/R4/Patient", f"/fhir/R4/Patient/{self.patient['id']}",
                         "/fhir/R4/ServiceRequest", "/fhir/R4/Bot",
                         f"/fhir/R4/Bot/{self.bot['id']}", "/fhir/R4/Binary"):
                code, outcome = await self.call(self.agent, "GET", path)
                self.assertEqual(code, 403, (path, outcome))

        return ensureDeferred(go())

    def test_admin_sees_everything(self) -> Deferred:
        async def go() -> None:
            self.assertEqual(len(await self.ids(self.admin, "/fhir/R4/Device")), 4)
            self.assertEqual(len(await self.ids(self.admin, "/fhir/R4/Endpoint")), 2)
            self.assertEqual(await self.ids(self.admin, "/fhir/R4/Patient"), [self.patient["id"]])

        return ensureDeferred(go())

    def test_pushers_and_agents_write_nothing(self) -> Deferred:
        async def go() -> None:
            targets = [self.agent_a, self.dev_a, self.ep_a, self.patient, self.order, self.bot]
            for token in (self.pusher, self.star, self.agent):
                for resource in targets:
                    kind, id = resource["resourceType"], resource["id"]
                    changed = dict(resource, status="entered-in-error")
                    code, _ = await self.call(token, "PUT", f"/fhir/R4/{kind}/{id}", changed)
                    self.assertEqual(code, 403, ("PUT", kind))
                    code, _ = await self.call(token, "PUT", f"/fhir/R4/{kind}/new-{id}",
                                              dict(changed, id=f"new-{id}"))
                    self.assertEqual(code, 403, ("PUT new", kind))
                    code, _ = await self.call(token, "POST", f"/fhir/R4/{kind}",
                                              {"resourceType": kind})
                    self.assertEqual(code, 403, ("POST", kind))
                    code, _ = await self.call(token, "DELETE", f"/fhir/R4/{kind}/{id}")
                    self.assertEqual(code, 403, ("DELETE", kind))
            for resource in targets:
                kind, id = resource["resourceType"], resource["id"]
                code, now = await self.call(self.admin, "GET", f"/fhir/R4/{kind}/{id}")
                self.assertEqual((code, now["meta"]["versionId"]), (200, "1"), kind)
                code, _ = await self.call(self.admin, "GET", f"/fhir/R4/{kind}/new-{id}")
                self.assertEqual(code, 404)
            # the one write an agent makes: a received instance as a Binary (not for pushers)
            binary = {"resourceType": "Binary", "contentType": "application/dicom", "data": "AA=="}
            code, _ = await self.call(self.agent, "POST", "/fhir/R4/Binary", binary)
            self.assertEqual(code, 201)
            code, _ = await self.call(self.pusher, "POST", "/fhir/R4/Binary", binary)
            self.assertEqual(code, 403)

        return ensureDeferred(go())


class PushDestinations(_ScopedRelay):
    """A pusher aiming its agent at hosts that are not the Agent's Devices (a port scan)."""

    def push(self, token: str, destination: str, content_type: str = "x-application/ping",
             body: str = "ping") -> Deferred[tuple[int, Any]]:
        return ensureDeferred(self.call(token, "POST", f"/fhir/R4/Agent/{self.agent_a['id']}"
                                        "/$push", {"destination": destination,
                                                   "contentType": content_type, "body": body}))

    def test_pusher_pushes_only_to_its_agents_devices(self) -> Deferred:
        async def go() -> None:
            refused = [
                "mllp://127.0.0.1:22",  # any host:port of the site
                "mllp://10.0.0.1:22",  # a Device's host, another port
                f"Device/{self.dev_b['id']}",  # another site's Device
                f"Device/{self.stray['id']}",  # a Device no Agent serves
                "mllp://10.1.0.1:2575",  # another site's Device by URL
                "127.0.0.1",  # a bare-host ping of a host that is no Device's
            ]
            for token in (self.pusher, self.star):
                for destination in refused:
                    code, outcome = await self.push(token, destination)
                    self.assertEqual(code, 403, (destination, outcome))
                    self.assertIn("Devices", outcome["issue"][0]["details"]["text"])
            code, bundle = await self.call(self.admin, "GET",
                                           f"/fhir/R4/AgentPush?agent={self.agent_a['id']}")
            self.assertEqual(bundle["total"], 0)  # nothing was journaled, nothing sent
            allowed = [f"Device/{self.dev_a['id']}", f"Device/{self.dev_a2['id']}",
                       "mllp://10.0.0.1:2575", "mllp://10.0.0.1:2575?returnAck=application",
                       "10.0.0.2"]
            for destination in allowed:
                code, outcome = await self.push(self.pusher, destination)
                self.assertEqual(code, 202, (destination, outcome))
            # admins may use any destination (the agent's allowlist still applies)
            code, outcome = await self.push(self.admin, "mllp://127.0.0.1:22")
            self.assertEqual(code, 202, outcome)

        return ensureDeferred(go())


    def test_pusher_sees_only_its_own_pushes(self) -> Deferred:
        async def go() -> None:
            a = self.agent_a["id"]
            code, mine = await self.push(self.pusher, f"Device/{self.dev_a['id']}")
            self.assertEqual(code, 202, mine)
            code, theirs = await self.push(self.star, f"Device/{self.dev_a2['id']}")
            self.assertEqual(code, 202, theirs)
            code, listed = await self.call(self.pusher, "GET", f"/fhir/R4/AgentPush?agent={a}")
            self.assertEqual(code, 200, listed)
            own = [e["resource"]["id"] for e in listed.get("entry", [])]
            self.assertEqual(listed["total"], 1)
            # the caller cannot widen the filter to another client's pushes
            code, widened = await self.call(
                self.pusher, "GET", f"/fhir/R4/AgentPush?agent={a}&requester=anyone")
            self.assertEqual([e["resource"]["id"] for e in widened.get("entry", [])], own)
            code, everything = await self.call(self.admin, "GET",
                                               f"/fhir/R4/AgentPush?agent={a}")
            self.assertEqual(everything["total"], 2)
            other = [e["resource"]["id"] for e in everything["entry"] if e["resource"]["id"]
                     not in own][0]
            code, outcome = await self.call(self.pusher, "GET", f"/fhir/R4/AgentPush/{other}")
            self.assertEqual(code, 404, outcome)  # like a missing push: nothing leaks
            code, missing = await self.call(self.pusher, "GET", "/fhir/R4/AgentPush/nope")
            self.assertEqual(code, 404)
            for action in ("$cancel", "$retry"):
                code, outcome = await self.call(self.pusher, "POST",
                                                f"/fhir/R4/AgentPush/{other}/{action}")
                self.assertEqual(code, 404, outcome)
            code, doc = await self.call(self.pusher, "GET", f"/fhir/R4/AgentPush/{own[0]}")
            self.assertEqual(code, 200, doc)

        return ensureDeferred(go())


class OperatorRoutes(_ScopedRelay):
    """
    The routes of lane pauses, bulk retry and the inbound log, attacked by every client that
    is not theirs: an agent (its own id and another's), a pusher (of every agent), a viewer,
    a Bot's token, no token and a forged one.  Each is refused by the server, changes
    nothing and says nothing of what is there.
    """

    def test_lane_bulk_retry_and_inbound_routes_refuse_other_roles(self) -> Deferred:
        async def go() -> None:
            from medagent.relay.auth import BOT, Principal
            from medagent.storage import journal as j
            from medagent.storage.inbound import InboundMessage

            auth = self.relay.authority
            viewer = await self.token(await auth.create_client("viewer"))
            bot = auth.mint_token(Principal("Bot/b", BOT, frozenset({"*"}), frozenset(),
                                            frozenset()), 60)
            admin = Principal("admin", "admin")
            result = await self.relay.pushes.push(admin, (self.agent_a["id"], None), {
                "destination": "mllp://10.0.0.1:2575", "contentType": "x-application/hl7-v2+er7",
                "body": "MSH|^~\\&|A|B|C|D|20240101||ORM^O01|AUTHZ01|P|2.5\r"
                        "PID|1||MRN-AUTHZ^^^H||Doe^Jane\r"})
            await self.relay.journal.transition(result.push, j.FAILED, error="AE")
            log = self.relay.inbound
            message = await log.add(InboundMessage(
                id=log.new_id(), agent_id=self.agent_a["id"], channel="adt", received=1.0,
                content_type="x-application/hl7-v2+er7", size=10, control_id="AUTHZ02",
                patient_id="MRN-AUTHZ", outcome="ok", body="PID|1||MRN-AUTHZ"))
            await self.relay.journal.flushed()
            lane = {"destination": "mllp://10.0.0.1:2575"}
            routes = []
            for agent in (self.agent_a["id"], self.agent_b["id"]):
                routes += [("POST", f"/fhir/R4/Agent/{agent}/$pause-lane", lane),
                           ("POST", f"/fhir/R4/Agent/{agent}/$resume-lane", lane),
                           ("GET", f"/fhir/R4/Agent/{agent}/$lanes", None),
                           ("POST", f"/Agent/{agent}/$pause-lane", lane)]
            routes += [("POST", "/fhir/R4/AgentPush/$retry", None),
                       ("POST", f"/fhir/R4/AgentPush/$retry?agent={self.agent_a['id']}", None),
                       ("GET", "/fhir/R4/AgentInbound", None),
                       ("GET", f"/fhir/R4/AgentInbound?agent={self.agent_a['id']}", None),
                       ("GET", f"/fhir/R4/AgentInbound/{message.id}?_payload=true", None)]
            for who, token, status in (("agent", self.agent, 403), ("pusher", self.pusher, 403),
                                       ("pusher *", self.star, 403), ("viewer", viewer, 403),
                                       ("bot", bot, 403), ("no token", "", 401),
                                       ("forged", bot[:-4] + "AAAA", 401)):
                for method, path, body in routes:
                    code, outcome = await self.call(token, method, path, body)
                    self.assertEqual((code, outcome.get("resourceType")),
                                     (status, "OperationOutcome"), (who, method, path))
                    text = json.dumps(outcome)
                    for secret in ("MRN-AUTHZ", "AUTHZ01", "AUTHZ02", result.push.id):
                        self.assertNotIn(secret, text, (who, path))
            self.assertEqual(await self.relay.lanes.paused(), [])
            self.assertEqual((await self.relay.journal.current(result.push.id)).state,
                             j.FAILED)
            self.assertEqual(await self.relay.store.search("AuditEvent", {}), [])

        return ensureDeferred(go())
