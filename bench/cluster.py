"""
Pushes/s of a relay cluster on PostgreSQL with 1, 2 and 3 nodes, next to one node on SQLite,
in one run, with the same clients, agents and devices.

Real processes: relay nodes (twistd; PostgreSQL from L{tests.pgenv}, a throwaway cluster on
loopback, or ``MEDAGENT_PG_DSN``), 16 agents (twistd) and 16 MLLP devices
(``tests/peers/recording_sink.py``, one per agent, kept for every configuration).  Agent i
dials node i mod k; 16 clients push round-robin over the agents, and each agent's pushes go
through every node in turn (what a load balancer does, without one in the way).  For each
configuration:

- fire-and-forget: N pushes not waited; accepted/s (202s) and delivered/s (lines at the
  devices, from the first push to the last line);
- waited: M pushes waited for the device's ACK; pushes/s and latency p50/p99.

A push through a node that does not hold its agent reaches it from the journal: the node
that took it wakes the holder (C{LISTEN/NOTIFY}, L{medagent.relay.cluster}; polls as the
fallback), and its waited caller gets the outcome from the journal when woken in turn.
Issue 11's shape: no collapse as nodes are added; one PostgreSQL node's waited latency
within 1.5x of SQLite.  Last line: one JSON object.

    python bench/cluster.py [--n 3000] [--waited 800] [--agents 16] [--concurrency 16]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import treq  # noqa: E402
from twisted.internet import reactor  # noqa: E402
from twisted.internet.task import deferLater  # noqa: E402
from twisted.internet.threads import deferToThread  # noqa: E402
from twisted.web.client import HTTPConnectionPool  # noqa: E402

from bench.push_rtt import (  # noqa: E402
    HL7,
    SINK,
    Bench,
    percentile,
    print_result,
    timed_loop,
)
from medagent.contenttypes import HL7_V2  # noqa: E402
from tests.procs import LISTENING, TWISTD, free_port  # noqa: E402


class Sinks:
    """The devices: one recording sink each, their logs counted for deliveries."""

    def __init__(self, bench: Bench, folder: str, n: int) -> None:
        self.ports = [free_port() for _ in range(n)]
        self.logs = [os.path.join(folder, f"sink-{p}.log") for p in self.ports]
        self.procs = [bench.spawn("sink", [SINK, str(p), log])
                      for p, log in zip(self.ports, self.logs)]

    async def ready(self) -> None:
        for p in self.procs:
            await p.wait_for("recording sink on", timeout=30)

    def delivered(self) -> int:
        total = 0
        for log in self.logs:
            try:
                with open(log, "rb") as f:
                    total += f.read().count(b"\n")
            except FileNotFoundError:
                pass
        return total


class Config:
    """One relay configuration: C{nodes} twistd nodes on SQLite (one) or PostgreSQL."""

    def __init__(self, bench: Bench, root: str, name: str, nodes: int,
                 dsn: str | None, extra: list[str] | None = None) -> None:
        self.bench, self.name, self.dsn = bench, name, dsn
        #: more relay options (SQLite's --synchronous FULL: a commit on disk, as PostgreSQL's)
        self.extra = list(extra or [])
        self.dirs = [os.path.join(root, f"{name}-node{i + 1}") for i in range(nodes)]
        for d in self.dirs:
            os.makedirs(d)
        self.urls: list[str] = []
        self.procs: list[Any] = []

    def create_client(self, role: str, agents: list[str] = ()) -> dict[str, Any]:
        """A client in the configuration's registry (blocking: call on a thread)."""
        from medagent.relay.auth import Authority, load_or_create_key

        if self.dsn is None:
            from medagent.relay.service import open_authority, open_database

            data = self.dirs[0]
            return open_authority(open_database(None, data), data).create_client_sync(
                role, list(agents))
        from medagent.storage.postgres import MIGRATIONS, PgClientRegistry, PgDatabase

        db = PgDatabase(reactor, self.dsn, migrations=MIGRATIONS)
        try:
            key = load_or_create_key(os.path.join(self.dirs[0], "token.key"))
            return Authority(PgClientRegistry(db), key).create_client_sync(role, list(agents))
        finally:
            db.stop()

    async def start(self) -> None:
        """Node 1 first (its token.key becomes the cluster's signing key), then the others."""
        for i, d in enumerate(self.dirs):
            extra = [] if self.dsn is None else ["--database", self.dsn,
                                                 "--node-id", f"node-{i + 1}"]
            self.procs.append(self.bench.spawn(self.name, [
                "-c", TWISTD, "-n", "--pidfile=", "medagent-relay", "--data", d,
                "--listen", "tcp:0:interface=127.0.0.1", "--bots-unsandboxed", *extra,
                *self.extra]))
            if i == 0:
                await self.procs[0].wait_for("medagent relay listening on", timeout=60)
        for p in self.procs:
            await p.wait_for("medagent relay listening on", timeout=60)
            found = LISTENING.search(bytes(p.output))
            assert found is not None, p.text[-2000:]
            self.urls.append(found.group(1).decode())
        for url in self.urls:  # ready: database reachable, schema current, keys read
            for _ in range(600):
                try:
                    resp = await treq.get(url + "/readyz")
                    await resp.content()
                    if resp.code == 200:
                        break
                except Exception:
                    pass
                await deferLater(reactor, 0.1, lambda: None)

    async def stop(self) -> None:
        for p in self.procs:
            await p.stop()


async def post_json(pool: HTTPConnectionPool, url: str, token: str, body: Any,
                    headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    resp = await treq.post(url, pool=pool, data=json.dumps(body).encode(), headers={
        "Authorization": f"Bearer {token}", "Content-Type": "application/fhir+json",
        **(headers or {})})
    return resp.code, await resp.content()


async def measure(bench: Bench, config: Config, sinks: Sinks, args: argparse.Namespace,
                  run: str) -> dict[str, Any]:
    admin = await deferToThread(config.create_client, "admin")
    await config.start()
    pool = HTTPConnectionPool(reactor)
    pool.maxPersistentPerHost = args.concurrency
    agent_procs: list[Any] = []
    try:
        resp = await treq.post(config.urls[0] + "/oauth2/token", pool=pool, data={
            "grant_type": "client_credentials", "client_id": admin["clientId"],
            "client_secret": admin["clientSecret"]})
        token = (await resp.json())["access_token"]
        agents: list[str] = []
        devices: list[str] = []
        for i, port in enumerate(sinks.ports):
            code, raw = await post_json(pool, config.urls[0] + "/fhir/R4/Agent", token,
                                        {"resourceType": "Agent", "name": f"bench {i}",
                                         "status": "active"})
            assert code == 201, raw
            agents.append(json.loads(raw)["id"])
            code, raw = await post_json(pool, config.urls[0] + "/fhir/R4/Device", token,
                                        {"resourceType": "Device",
                                         "url": f"mllp://127.0.0.1:{port}"})
            assert code == 201, raw
            devices.append(json.loads(raw)["id"])
        for i, agent_id in enumerate(agents):
            creds = await deferToThread(config.create_client, "agent", [agent_id])
            agent_procs.append(bench.spawn("agent", [
                "-c", TWISTD, "-n", "--pidfile=", "medagent-agent",
                "--relay", config.urls[i % len(config.urls)],
                "--client-id", creds["clientId"], "--client-secret", creds["clientSecret"],
                "--agent-id", agent_id, "--data", os.path.join(config.dirs[0], f"agent{i}")]))
        for p in agent_procs:
            await p.wait_for("Connected to the relay", timeout=60)

        async def push(i: int, waited: bool) -> None:
            a = i % len(agents)
            # push i through node (i + round) mod k: each agent's pushes go through every
            # node in turn, 1/k of them through the node that holds it
            node = config.urls[(i + i // len(agents)) % len(config.urls)]
            body = {"destination": f"Device/{devices[a]}", "contentType": HL7_V2,
                    "body": HL7.format(ctrl=f"{run}{config.name}{i:07d}"),
                    "waitForResponse": waited}
            code, raw = await post_json(pool, f"{node}/fhir/R4/Agent/{agents[a]}/$push",
                                        token, body)
            if code != (200 if waited else 202) or (waited and b"MSA|AA|" not in raw):
                raise RuntimeError(f"push failed: {code} {raw[:200]!r}")

        async def waited_until_delivered(expected: int, timeout: float) -> None:
            deadline = time.time() + timeout
            while sinks.delivered() < expected:
                if time.time() > deadline:
                    raise RuntimeError(f"{config.name}: {sinks.delivered()} of {expected}"
                                       f" delivered after {timeout}s")
                await deferLater(reactor, 0.02, lambda: None)

        # warm-up, every agent through every node
        base = sinks.delivered()
        await timed_loop(200, args.concurrency, lambda i: push(9_000_000 + i, False))
        await waited_until_delivered(base + 200, 120)

        print(f"{config.name}: fire-and-forget", file=sys.stderr)
        base = sinks.delivered()
        start = time.perf_counter()
        _, accept_s = await timed_loop(args.n, args.concurrency, lambda i: push(i, False))
        await waited_until_delivered(base + args.n, 300)
        deliver_s = time.perf_counter() - start

        print(f"{config.name}: waited", file=sys.stderr)
        offset = 1_000_000
        lat, waited_s = await timed_loop(args.waited, args.concurrency,
                                         lambda i: push(offset + i, True))
        return {
            "accepted_per_s": round(args.n / accept_s, 1),
            "delivered_per_s": round(args.n / deliver_s, 1),
            "waited_per_s": round(args.waited / waited_s, 1),
            "waited_p50_ms": round(percentile(lat, 0.5), 2),
            "waited_p99_ms": round(percentile(lat, 0.99), 2),
        }
    finally:
        for p in agent_procs:
            await p.stop()
        await config.stop()
        await pool.closeCachedConnections()


async def main(args: argparse.Namespace) -> dict[str, Any]:
    from tests import pgenv

    bench = Bench()
    root = tempfile.mkdtemp(prefix="bench-cluster-")
    try:
        sinks = Sinks(bench, root, args.agents)
        await sinks.ready()
        run = os.urandom(2).hex()
        results: dict[str, Any] = {"n": args.n, "waited": args.waited, "agents": args.agents,
                                   "clients": args.concurrency}
        # SQLite's default (NORMAL: no fsync per commit) and FULL (an fsync per commit, as
        # PostgreSQL's synchronous_commit=on, which the relay requires)
        plan: list[tuple[str, int, bool, list[str]]] = [
            ("sqlite_1", 1, False, []), ("sqlite_1_full", 1, False, ["--synchronous", "FULL"]),
            ("pg_1", 1, True, []), ("pg_2", 2, True, []), ("pg_3", 3, True, [])]
        for name, nodes, on_pg, extra in plan:
            dsn = None
            if on_pg:
                dsn = await deferToThread(pgenv.fresh_database, f"medagent_bench_{name}")
            config = Config(bench, root, name, nodes, dsn, extra)
            results[name] = await measure(bench, config, sinks, args, run)
            print(f"{name}: {results[name]}", file=sys.stderr)
        for floor in ("sqlite_1", "sqlite_1_full"):
            results[f"pg_1_waited_p50_vs_{floor}"] = round(
                results["pg_1"]["waited_p50_ms"] / results[floor]["waited_p50_ms"], 3)
        return results
    finally:
        await bench.stop()
        shutil.rmtree(root, ignore_errors=True)


def run() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=3000)
    parser.add_argument("--waited", type=int, default=800)
    parser.add_argument("--agents", type=int, default=16)
    parser.add_argument("--concurrency", type=int, default=16)
    print_result(main(parser.parse_args()))


if __name__ == "__main__":
    run()
