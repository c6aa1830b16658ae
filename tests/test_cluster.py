"""
A relay cluster as it is run: three real ``twistd medagent-relay`` nodes on one PostgreSQL
database (L{tests.pgenv}'s throwaway cluster, loopback), a round-robin TCP balancer in front
(L{tests.balancer}), real agent processes that dial the balancer, and recording MLLP devices
(``tests/peers/recording_sink.py``: one control id a line, in the order received).

What the cluster promises (issue 11): a push accepted by any node reaches its device exactly
once and in order per device; a node killed with ``kill -9`` loses nothing (its agents come
back through the balancer to another node; a caller waiting on it gets an error it can retry
with the same key); a PostgreSQL restart is answered with 503s and nothing accepted is lost;
a Subscription fires its Bot once per write whichever node took the write.
"""

from __future__ import annotations

import collections
import os
import shutil
import signal
import tempfile
from typing import Any

import attr
from twisted.internet import defer, reactor
from twisted.internet.defer import CancelledError, Deferred, ensureDeferred, gatherResults
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.logger import Logger
from twisted.trial.unittest import TestCase

from medagent.client import _RETRYABLE, MedagentClient, RelayError
from medagent.contenttypes import HL7_V2
from medagent.hl7.message import build_ack, control_id
from medagent.hl7.mllp import MLLPDecoder, frame
from medagent.storage.postgres import PgDatabase
from tests import pgenv, procs, test_postgres_relay
from tests.balancer import RoundRobin
from tests.peerenv import FIXTURES
from tests.test_bots import access
from tests.test_e2e import hl7

log = Logger()

SINK = os.path.join(FIXTURES, "recording_sink.py")
#: what a caller may retry with the same key: a lost connection, no answer in time
RETRYABLE = (*_RETRYABLE, CancelledError, defer.TimeoutError)
FINAL = ("delivered", "failed", "expired", "cancelled")


@attr.s(auto_attribs=True)
class Device:
    """A recording MLLP sink and its Device resource."""

    id: str
    port: int
    log: str

    def received(self) -> list[str]:
        try:
            with open(self.log, "rb") as f:
                return [line.decode("ascii") for line in f.read().split(b"\n") if line]
        except FileNotFoundError:
            return []


@attr.s(auto_attribs=True)
class SiteAgent:
    """An Agent resource, its credentials, its agent process and its devices."""

    resource: dict[str, Any]
    creds: dict[str, Any]
    proc: procs.Proc
    devices: list[Device]

    @property
    def id(self) -> str:
        return str(self.resource["id"])


@attr.s(auto_attribs=True)
class Tally:
    """What one pushing client saw: the control ids accepted (2xx), and every error."""

    accepted: list[str] = attr.ib(factory=list)
    errors: list[Any] = attr.ib(factory=list)
    retried: int = 0


class _Cluster(TestCase):
    """Three nodes on one fresh database, a balancer in front, admin clients for each."""

    timeout = 240
    nodes_count = 3

    # (the module, not the class: a TestCase imported here would run here too)
    setUp = test_postgres_relay.RelayOnPostgres.setUp
    create_client = test_postgres_relay.RelayOnPostgres.create_client

    async def _setUp(self) -> None:
        self.dsn = await deferToThread(pgenv.fresh_database, "medagent_cluster")
        self.data_dir = tempfile.mkdtemp(prefix="medagent-cluster-")
        self.addCleanup(shutil.rmtree, self.data_dir, True)
        self.work = tempfile.mkdtemp(prefix="medagent-cluster-work-")  # agents', devices'
        self.addCleanup(shutil.rmtree, self.work, True)
        self.admin_creds = await self.create_client("admin")  # (and the token key)
        # node 1 puts its token.key into the database's signing keys; the others read them
        first = await self._node(1)
        self.nodes: list[procs.RelayFixture] = [first, *await gatherResults(
            [ensureDeferred(self._node(n)) for n in range(2, self.nodes_count + 1)])]
        self.balancer = RoundRobin(reactor, [node.port for node in self.nodes])
        self.balancer.listen()
        self.addCleanup(self.balancer.close)
        self.direct = [self.client(node.url) for node in self.nodes]
        # a new connection per request: the balancer spreads them over the nodes
        self.via_lb = self.client(self.balancer.url, persistent=False)
        self.db = self.database()

    async def _node(self, n: int) -> procs.RelayFixture:
        """Node C{n}: node 1 on the folder with the token key, the others on empty ones."""
        data = self.data_dir
        if n > 1:
            data = tempfile.mkdtemp(prefix=f"medagent-cluster-node{n}-")
            self.addCleanup(shutil.rmtree, data, True)
        node = procs.RelayFixture(self, data)
        await node.start(["--database", self.dsn, "--node-id", f"node-{n}"])
        return node

    def client(self, url: str, persistent: bool = True) -> MedagentClient:
        c = MedagentClient(reactor, url, self.admin_creds["clientId"],
                           self.admin_creds["clientSecret"], timeout=10,
                           persistent=persistent)
        self.addCleanup(c.close)
        return c

    def database(self) -> PgDatabase:
        db = PgDatabase(reactor, self.dsn)
        self.addCleanup(db.stop)
        return db

    def node(self, node_id: str) -> procs.RelayFixture:
        return self.nodes[int(node_id.rsplit("-", 1)[1]) - 1]

    async def holder(self, agent_id: str, db: PgDatabase | None = None) -> str | None:
        """The node holding a live session for C{agent_id}, from the session table."""
        row = await (db or self.db).run(lambda c: c.execute(
            "SELECT node_id FROM agent_sessions WHERE agent_id = %s"
            " AND lease_expires > now()", (agent_id,)).fetchone())
        return None if row is None else str(row["node_id"])

    async def sink(self) -> Device:
        port = procs.free_port()
        path = os.path.join(self.work, f"sink-{port}.log")
        proc = procs.python(self, "recording-sink", [SINK, str(port), path])
        await proc.wait_for("recording sink on", timeout=20)
        device = await self.direct[0].create(
            {"resourceType": "Device", "url": f"mllp://127.0.0.1:{port}"})
        return Device(device["id"], port, path)

    async def site(self, devices: int) -> SiteAgent:
        """An Agent with C{devices} devices, its agent process dialling the balancer."""
        agent = await self.direct[0].create({"resourceType": "Agent", "name": "Lab agent",
                                             "status": "active"})
        creds = await self.create_client("agent", [agent["id"]])
        found = [await self.sink() for _ in range(devices)]
        proc = procs.agent_process(self, self.balancer.url, creds, agent["id"],
                                   ["--data", tempfile.mkdtemp(prefix="agent-",
                                                               dir=self.work)])
        return SiteAgent(agent, creds, proc, found)

    async def connected(self, *sites: SiteAgent, timeout: float = 60,
                        not_on: str | None = None) -> dict[str, str]:
        """Wait until every site's agent holds a session (on a node other than C{not_on})."""
        held: dict[str, str] = {}

        async def all_held() -> bool:
            for s in sites:
                node = await self.holder(s.id)
                if node is None or node == not_on:
                    return False
                held[s.id] = node
            return True

        await procs.wait_until(all_held, timeout=timeout, interval=0.2,
                               what="agents connected")
        for s in sites:  # the node logs the agent once its session is claimed
            await self.node(held[s.id]).proc.wait_for(f"Agent/{s.id} connected from")
        return held

    async def journal(self, db: PgDatabase | None = None) -> list[dict[str, Any]]:
        return list(await (db or self.db).run(lambda c: c.execute(
            "SELECT control_id, idempotency_key, state, in_doubt, agent_id, remote"
            " FROM pushes ORDER BY seq").fetchall()))

    async def all_final(self, expected: int, timeout: float = 90,
                        db: PgDatabase | None = None) -> list[dict[str, Any]]:
        """Wait until the journal holds C{expected} pushes, every one final; its rows."""
        rows: list[dict[str, Any]] = []

        async def done() -> bool:
            rows[:] = await self.journal(db)
            return len(rows) >= expected and all(r["state"] in FINAL for r in rows)

        try:
            await procs.wait_until(done, timeout=timeout, interval=0.25,
                                   what="every push final")
        except AssertionError:
            states = collections.Counter(r["state"] for r in rows)
            raise AssertionError(f"journal after {timeout}s: {len(rows)} of {expected}"
                                 f" pushes, states {dict(states)}") from None
        return rows

    @staticmethod
    def device_problems(device: Device, sent: list[str], in_doubt: set[str]
                        ) -> dict[str, Any]:
        """
        How C{device}'s record differs from C{sent} (every control id once, in that order;
        a push the journal marks in doubt may be missing or repeated): empty when it does not.
        """
        got = device.received()
        counts = collections.Counter(got)
        problems: dict[str, Any] = {
            "lost": [c for c in sent if counts[c] == 0 and c not in in_doubt],
            "repeated": sorted(c for c, n in counts.items() if n > 1 and c not in in_doubt),
            "unknown": sorted(set(got) - set(sent)),
        }
        first_seen = list(dict.fromkeys(got))
        in_order = [c for c in sent if c in counts]
        if first_seen != in_order:
            at = next(i for i, (a, b) in enumerate(zip(first_seen, in_order)) if a != b)
            problems["out_of_order"] = sum(a != b for a, b in zip(first_seen, in_order))
            problems["first_out_of_order"] = (at, first_seen[max(0, at - 2):at + 4])
        return {k: v for k, v in problems.items() if v}

    def check_devices(self, checks: list[tuple[Device, list[str]]], in_doubt: set[str]
                      ) -> None:
        """Every device of C{checks} got its pushes once, in order (all reported at once)."""
        problems = {d.port: p for d, sent in checks
                    if (p := self.device_problems(d, sent, in_doubt))}
        log.info("device problems: {problems}", problems=problems)
        self.assertEqual(problems, {}, "lost / repeated / unknown / out of order, by device")

    async def push_retrying(self, client: MedagentClient, agent: SiteAgent, device: Device,
                            ctrl: str, tally: Tally, deadline: float = 120) -> None:
        """
        One push with an C{Idempotency-Key}, retried with the same key on a lost connection
        or a 5xx (as a careful client does) until it is accepted.
        """
        started = reactor.seconds()
        attempts = 0
        while True:
            attempts += 1
            try:
                await client.push_to_agent(agent.resource, f"Device/{device.id}", hl7(ctrl),
                                           HL7_V2, idempotency_key=f"key-{ctrl}", retries=0)
                tally.accepted.append(ctrl)
                tally.retried += attempts > 1
                return
            except RelayError as e:
                if e.status < 500:
                    raise
                tally.errors.append((e.status, _resource_type(e.outcome)))
            except RETRYABLE as e:
                tally.errors.append(type(e).__name__)
            if reactor.seconds() - started > deadline:
                raise AssertionError(f"push {ctrl} not accepted in {deadline}s:"
                                     f" {tally.errors[-5:]}")
            await deferLater(reactor, 0.2, lambda: None)


def _resource_type(outcome: Any) -> str | None:
    return outcome.get("resourceType") if isinstance(outcome, dict) else None


class PushesThroughEveryNode(_Cluster):
    def test_every_node_and_the_balancer_deliver_once_in_order(self) -> Deferred:
        """
        Three agents with two devices each, spread by the balancer; each device gets 15
        pushes in turn through node 1, node 2, node 3 and the balancer (every fifth one
        waited for the device's ACK): each device receives its pushes once, in order.
        """
        async def go() -> None:
            sites = [await self.site(devices=2) for _ in range(3)]
            held = await self.connected(*sites)
            entries = [*self.direct, self.via_lb]
            replies: dict[str, Any] = {}

            async def feed(site: SiteAgent, device: Device, tag: str) -> list[str]:
                sent = []
                for i in range(15):
                    ctrl = f"{tag}{i:03d}"
                    client = entries[i % len(entries)]
                    waited = i % 5 == 4
                    result = await client.push_to_agent(
                        site.resource, f"Device/{device.id}", hl7(ctrl), HL7_V2, waited,
                        wait_timeout=20_000)
                    if waited:
                        replies[ctrl] = result
                    sent.append(ctrl)
                return sent

            feeds = [(site, device, f"E{s}{d}") for s, site in enumerate(sites)
                     for d, device in enumerate(site.devices)]
            sent = await gatherResults([ensureDeferred(feed(*f)) for f in feeds])
            rows = await self.all_final(sum(len(s) for s in sent))
            self.assertEqual(collections.Counter(r["state"] for r in rows),
                             {"delivered": 90})
            self.check_devices([(d, ctrls) for (_, d, _), ctrls in zip(feeds, sent)], set())
            for ctrl, reply in replies.items():
                self.assertIn(f"MSA|AA|{ctrl}", reply)
            self.assertEqual(len(replies), 18)
            log.info("agents held by {held}; balancer backends {chosen}", held=held,
                     chosen=collections.Counter(self.balancer.chosen))
            self.assertEqual(set(self.balancer.chosen), {n.port for n in self.nodes})

        return ensureDeferred(go())


class NodeKilledMidRun(_Cluster):
    def test_kill_9_the_agents_node_loses_and_repeats_nothing(self) -> Deferred:
        """
        Two agents with two devices each; four clients (one a device) push 150 HL7
        messages each through the balancer, each with an C{Idempotency-Key}, retrying lost
        connections and 5xx with the same key.  After 150 pushes are accepted the node that
        holds the first agent is killed (``kill -9``): the agent comes back through the
        balancer to another node once the dead node's lease lapses, and every device gets
        every push once, in order (pushes the journal marks in doubt excepted, and counted).
        """
        async def go() -> None:
            sites = [await self.site(devices=2) for _ in range(2)]
            held = await self.connected(*sites)
            per_device = 150
            tallies = [Tally() for _ in range(4)]
            plan = [(site, device) for site in sites for device in site.devices]

            async def feed(n: int) -> None:
                site, device = plan[n]
                for i in range(per_device):
                    await self.push_retrying(self.via_lb, site, device, f"K{n}{i:04d}",
                                             tallies[n])

            feeding = gatherResults([ensureDeferred(feed(n)) for n in range(4)])
            await procs.wait_until(lambda: sum(len(t.accepted) for t in tallies) >= 150,
                                   timeout=60, what="150 pushes accepted")
            victim = held[sites[0].id]
            killed_at = reactor.seconds()
            await self.node(victim).stop(signal.SIGKILL)
            accepted_at_kill = sum(len(t.accepted) for t in tallies)
            await feeding
            fed_in = reactor.seconds() - killed_at
            back = await self.connected(sites[0], not_on=victim, timeout=60)
            back_in = reactor.seconds() - killed_at
            rows = await self.all_final(4 * per_device)
            self.assertEqual(len(rows), 4 * per_device, "one journal entry per push")
            in_doubt = {r["control_id"] for r in rows if r["in_doubt"]}
            states = collections.Counter(r["state"] for r in rows)
            self.assertEqual(states["delivered"] + len(in_doubt), len(rows), dict(states))
            errors = collections.Counter(str(e) for t in tallies for e in t.errors)
            log.info(
                "kill -9 {victim} after {n} accepted: pushes done {fed:.1f}s later, agent back"
                " on {back} after {back_in:.1f}s; {retried} pushes retried, errors {errors};"
                " in doubt {doubt}; states {states}", victim=victim, n=accepted_at_kill,
                fed=fed_in, back=back[sites[0].id], back_in=back_in,
                retried=sum(t.retried for t in tallies), errors=dict(errors),
                doubt=len(in_doubt), states=dict(states))
            for n, tally in enumerate(tallies):
                self.assertEqual(tally.accepted, [f"K{n}{i:04d}" for i in range(per_device)])
            self.check_devices([(device, t.accepted) for (_, device), t in zip(plan, tallies)],
                               in_doubt)

        return ensureDeferred(go())


class _GatedDevice(Protocol):
    def connectionMade(self) -> None:
        self.decoder = MLLPDecoder()
        self.factory.connections.append(self)

    def dataReceived(self, data: bytes) -> None:
        for payload in self.decoder.feed(data):
            message = payload.decode("latin-1")
            self.factory.received.append(control_id(message))
            self.factory.held.append((self, message))
            self.factory.answer()

    def connectionLost(self, reason: Any) -> None:
        self.factory.connections.remove(self)


class GatedDevice(Factory):
    """
    An MLLP device in the test's reactor that records what it receives and holds its ACKs
    until L{open} (to keep a push in flight while a node is killed).
    """

    protocol = _GatedDevice

    def __init__(self) -> None:
        self.received: list[str] = []
        self.held: list[tuple[_GatedDevice, str]] = []
        self.connections: list[_GatedDevice] = []
        self.is_open = False

    def open(self) -> None:
        self.is_open = True
        self.answer()

    def answer(self) -> None:
        while self.is_open and self.held:
            conn, message = self.held.pop(0)
            if conn.transport.connected:
                conn.transport.write(frame(build_ack(message, "AA").encode("latin-1")))


class WaitedPushOnAKilledNode(_Cluster):
    async def gated_agent(self) -> tuple[GatedDevice, dict[str, Any], dict[str, Any], str]:
        """A gated device, an agent dialling the balancer; the node that holds it."""
        gate = GatedDevice()
        port = reactor.listenTCP(0, gate, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        self.addCleanup(lambda: [c.transport.abortConnection() for c in gate.connections])
        device = await self.direct[0].create(
            {"resourceType": "Device", "url": f"mllp://127.0.0.1:{port.getHost().port}"})
        agent = await self.direct[0].create({"resourceType": "Agent", "name": "Lab agent",
                                             "status": "active"})
        creds = await self.create_client("agent", [agent["id"]])
        proc = procs.agent_process(
            self, self.balancer.url, creds, agent["id"],
            ["--data", tempfile.mkdtemp(prefix="agent-", dir=self.work)])
        holder = (await self.connected(SiteAgent(agent, creds, proc, [])))[agent["id"]]
        return gate, device, agent, holder

    def client_of(self, node_id: str) -> MedagentClient:
        return self.direct[int(node_id.rsplit("-", 1)[1]) - 1]

    async def kill_then_retry(self, gate: GatedDevice, device: dict[str, Any],
                              agent: dict[str, Any], first_node: str, retry_node: str,
                              ctrl: str) -> float:
        """
        A waited push through C{first_node}; once the device has it (its ACK held),
        C{first_node} is killed: the caller's error is one it may retry, the retry with the
        same key through C{retry_node} waits on the same push (not sent again) and answers
        with the device's ACK once the device gives it.  Seconds the retry took.
        """
        body = hl7(ctrl)

        def push(node: str) -> Deferred[Any]:
            return self.client_of(node).push_to_agent(
                agent, f"Device/{device['id']}", body, HL7_V2, True, wait_timeout=50_000,
                idempotency_key=f"waited-{ctrl}", retries=0)

        first = push(first_node)
        await procs.wait_until(lambda: gate.received, timeout=30, what="device got it")
        await self.node(first_node).stop(signal.SIGKILL)
        failure = await self.assertFailure(first, *RETRYABLE)
        log.info("caller of the killed node got {error}", error=type(failure).__name__)

        started = reactor.seconds()
        retry = push(retry_node)
        await self.node(retry_node).proc.wait_for("repeats push", timeout=20)
        self.assertFalse(retry.called)
        gate.open()
        reply = await retry
        took = reactor.seconds() - started
        self.assertIn(f"MSA|AA|{ctrl}", reply)
        self.assertEqual(gate.received, [ctrl])
        # (the caller may be answered just before the node's journal write of the outcome)
        rows = await self.all_final(1, timeout=10)
        self.assertEqual([(r["control_id"], r["idempotency_key"], r["state"], r["in_doubt"])
                          for r in rows], [(ctrl, f"waited-{ctrl}", "delivered", False)])
        return took

    def test_node_without_the_agent_killed(self) -> Deferred:
        """
        The agent on node X; the waited push through node Y, which is killed; the retry
        through node Z.
        """
        async def go() -> None:
            gate, device, agent, x = await self.gated_agent()
            y, z = [f"node-{i}" for i in (1, 2, 3) if f"node-{i}" != x]
            await self.kill_then_retry(gate, device, agent, y, z, "WK000001")

        return ensureDeferred(go())

    def test_node_holding_the_agent_killed(self) -> Deferred:
        """
        The agent and the waited push on node X, which is killed; the retry through node Y
        waits while the agent comes back (to Y or Z, once X's lease lapses) and is answered
        from the agent's record of the delivery.
        """
        async def go() -> None:
            gate, device, agent, x = await self.gated_agent()
            y = next(f"node-{i}" for i in (1, 2, 3) if f"node-{i}" != x)
            took = await self.kill_then_retry(gate, device, agent, x, y, "WK000002")
            log.info("the retry was answered after {took:.1f}s", took=took)

        return ensureDeferred(go())


class ThreeNodesOneAgentId(_Cluster):
    def test_the_same_agent_id_on_two_other_nodes_is_refused_by_both(self) -> Deferred:
        """One agent id dialling node 1, 2 and 3 directly: the first holds, two are refused."""
        async def go() -> None:
            agent = await self.direct[0].create({"resourceType": "Agent", "name": "Lab agent",
                                                 "status": "active"})
            creds = await self.create_client("agent", [agent["id"]])
            first = procs.agent_process(self, self.nodes[0].url, creds, agent["id"],
                                        ["--data", tempfile.mkdtemp(dir=self.work)])
            await self.nodes[0].proc.wait_for(f"Agent/{agent['id']} connected from", 30)
            for node in self.nodes[1:]:
                procs.agent_process(self, node.url, creds, agent["id"],
                                    ["--data", tempfile.mkdtemp(dir=self.work)])
            for node in self.nodes[1:]:
                await node.proc.wait_for(f"Refused connection for Agent/{agent['id']}", 30)
                self.assertNotIn(f"Agent/{agent['id']} connected from".encode(),
                                 bytes(node.proc.output))
            self.assertEqual(await self.holder(agent["id"]), "node-1")
            self.assertNotIn(f"Agent/{agent['id']} disconnected".encode(),
                             bytes(self.nodes[0].proc.output))
            self.assertIsNone(first.exit_code)

        return ensureDeferred(go())


class PostgresRestartMidRun(_Cluster):
    def test_503_meanwhile_recovery_and_nothing_accepted_lost(self) -> Deferred:
        """
        One agent with three devices; three clients, each pushing to its own device
        through its own node, retrying 5xx with the same key.  PostgreSQL is stopped (as if
        it crashed) after 30 pushes and started again once every client has been answered
        503 ten times: the nodes answer 503 with an OperationOutcome meanwhile (and
        ``/readyz`` 503), accept again by themselves, and every push they accepted is
        journaled and delivered once, in order.  (The test server runs with
        C{synchronous_commit = off}, which the relay raises for its own sessions: with it, a
        crash lost acknowledged pushes.)
        """
        async def go() -> None:
            cluster = pgenv.restartable()
            site = await self.site(devices=3)
            await self.connected(site)
            per_device = 60
            tallies = [Tally() for _ in range(3)]

            async def feed(n: int) -> None:
                for i in range(per_device):
                    await self.push_retrying(self.direct[n], site, site.devices[n],
                                             f"P{n}{i:04d}", tallies[n])

            feeding = gatherResults([ensureDeferred(feed(n)) for n in range(3)])
            await procs.wait_until(lambda: sum(len(t.accepted) for t in tallies) >= 30,
                                   timeout=60, what="30 pushes accepted")
            await deferToThread(cluster.stop_server)
            down_at = reactor.seconds()
            before = [len(t.errors) for t in tallies]
            try:
                # down until every client has been refused ten times (two seconds or more)
                await procs.wait_until(
                    lambda: all(len(t.errors) >= b + 10 for t, b in zip(tallies, before)),
                    timeout=30, what="every node refusing")
                readiness = [await self._ready(c) for c in self.direct]
            finally:
                await deferToThread(cluster.start_server)
            up_at = reactor.seconds()
            down_for = up_at - down_at
            accepted_while_down = [len(t.accepted) for t in tallies]
            await procs.wait_until(
                lambda: all(len(t.accepted) > n for t, n in zip(tallies, accepted_while_down)),
                timeout=60, what="every node accepting again")
            recovered_in = reactor.seconds() - up_at
            await feeding
            fed_in = reactor.seconds() - up_at
            self.assertEqual(readiness, [503, 503, 503])
            errors = collections.Counter(e for t in tallies for e in t.errors)
            self.assertEqual(set(errors), {(503, "OperationOutcome")}, dict(errors))
            db = self.database()  # (a connection of its own, opened after the restart)
            accepted = [c for t in tallies for c in t.accepted]
            try:
                rows = await self.all_final(3 * per_device, timeout=60, db=db)
            except AssertionError as e:
                journaled = {r["control_id"] for r in await self.journal(db)}
                raise AssertionError(f"{e}; answered 2xx but not in the journal:"
                                     f" {sorted(set(accepted) - journaled)}") from None
            final_in = reactor.seconds() - up_at
            journaled = {r["control_id"] for r in rows}
            self.assertEqual(sorted(set(accepted) - journaled), [], "2xx but not journaled")
            in_doubt = {r["control_id"] for r in rows if r["in_doubt"]}
            self.assertEqual(in_doubt, set())
            self.assertEqual(collections.Counter(r["state"] for r in rows),
                             {"delivered": 3 * per_device})
            self.check_devices(list(zip(site.devices, (t.accepted for t in tallies))),
                               in_doubt)
            self.assertEqual([await self._ready(c) for c in self.direct], [200, 200, 200])
            log.info("PostgreSQL down {down:.1f}s; accepted by then {accepted}; every node"
                     " accepting {recovered:.1f}s after the restart, all pushes {fed:.1f}s, all"
                     " delivered {final:.1f}s; errors {errors}", down=down_for,
                     accepted=accepted_while_down, recovered=recovered_in, fed=fed_in,
                     final=final_in, errors=dict(errors))

        return ensureDeferred(go())

    async def _ready(self, client: MedagentClient) -> int:
        status, _, _, _ = await client.request("GET", "/readyz")
        return status


class SubscriptionOnThreeNodes(_Cluster):
    def test_a_subscription_fires_its_bot_once_per_write(self) -> Deferred:
        """
        A Bot and a Subscription on Patient created through node 1; three Patients written
        through each node: each write runs the Bot once (one delivery, one attempt, one
        Observation the Bot writes about that Patient), whichever node took the write.
        """
        async def go() -> None:
            bot = await self.direct[0].create({
                "resourceType": "Bot", "name": "note writer",
                "code": "def handler(medplum, event):\n"
                        "    medplum.create_resource({'resourceType': 'Observation',"
                        " 'status': 'final', 'code': {'text': 'seen'},"
                        " 'subject': {'reference': 'Patient/' + event.input['id']}})\n"
                        "    return 'ok'\n",
                "extension": [access(read=["Patient"], write=["Observation"])]})
            sub = await self.direct[0].create({
                "resourceType": "Subscription", "status": "active", "reason": "t",
                "criteria": "Patient", "channel": {"type": "rest-hook",
                                                   "endpoint": f"Bot/{bot['id']}"}})
            patients = []
            for _ in range(3):
                for client in self.direct:
                    patients.append((await client.create({"resourceType": "Patient"}))["id"])

            rows: list[dict[str, Any]] = []

            async def delivered() -> bool:
                rows[:] = await self.db.run(lambda c: c.execute(
                    "SELECT resource_id, state, attempts FROM subscription_deliveries"
                    " WHERE subscription_id = %s", (sub["id"],)).fetchall())
                return len(rows) >= len(patients) and all(r["state"] != "pending"
                                                          for r in rows)

            try:
                await procs.wait_until(delivered, timeout=30, interval=0.25,
                                       what="a delivery per write")
            except AssertionError:
                tried = collections.Counter((r["state"], r["attempts"]) for r in rows)
                raise AssertionError(
                    f"deliveries after 30s: {len(rows)} for {len(patients)} writes (writes"
                    f" that fired, by the node that took them: {self._by_node(patients, rows)};"
                    f" (state, attempts): {dict(tried)})"
                ) from None
            self.assertEqual(sorted((r["resource_id"], r["state"], r["attempts"]) for r in rows),
                             sorted((p, "delivered", 1) for p in patients))
            notes = await self.direct[1].search("Observation", {"_count": "100"})
            self.assertEqual(sorted(n["subject"]["reference"] for n in notes),
                             sorted(f"Patient/{p}" for p in patients))

        return ensureDeferred(go())

    @staticmethod
    def _by_node(patients: list[str], rows: list[dict[str, Any]]) -> dict[str, int]:
        seen = {r["resource_id"] for r in rows}
        out: dict[str, int] = collections.Counter()
        for i, p in enumerate(patients):
            if p in seen:
                out[f"node-{i % 3 + 1}"] += 1
        return dict(out)

