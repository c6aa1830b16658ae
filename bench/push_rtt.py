"""
Waited-push latency and throughput, side by side with its baselines, in one run.

Starts real processes: the relay (twistd), the agent (twistd), MLLP ACK sinks (one, and
``--devices`` more), and a bare twisted.web server.  Measures

- waited ``$push`` round trips (HTTP → relay → websocket → agent → MLLP → sink and back),
  1 client (latency p50/p99, pushes/s), 16 concurrent clients to one device, and 16 clients
  spread over ``--devices`` devices (one lane each);
- the direct MLLP round trip to the same sink (our MLLP sender, persistent connection);
- a bare twisted.web POST round trip with the same HTTP client;
- where a push's time went: the median of each stage of its timeline (received, journaled,
  sent, accepted, device, answered) from the push status documents.

Prints progress, then one JSON object as the last line:
``push_p50_ms, push_p99_ms, http_p50_ms, mllp_p50_ms, ratio, pushes_per_s_1, pushes_per_s_16,
http_per_s_16, pushes_per_s_16_devices, stage_p50_ms`` and CPU per push (relay, agent, this
client) with ratio = push_p50 / (http_p50 + mllp_p50); http_per_s_16 is bare twisted.web with
as many clients, the throughput floor.
Targets (issue 13): ratio ≤ 2.0; ≥ 1000 waited pushes/s with 16 clients to one device and
≥ 2000 spread over 16 devices.

    python bench/push_rtt.py [--n 2000] [--concurrency 16] [--devices 16] [--profile DIR]

C{--profile DIR} runs the relay and the agent under twistd's cProfile and leaves
``DIR/relay.prof`` and ``DIR/agent.prof`` (pstats files; the profiler slows both, so the
numbers of that run are not the ones to report).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import treq  # noqa: E402
from twisted.internet import defer, reactor  # noqa: E402
from twisted.web.client import HTTPConnectionPool  # noqa: E402

from medagent.contenttypes import HL7_V2  # noqa: E402
from medagent.destination import parse_destination  # noqa: E402
from medagent.hl7.sender import MLLPSender  # noqa: E402
from tests.procs import TWISTD, Proc, free_port  # noqa: E402

HL7 = "MSH|^~\\&|BENCH|HOSP|LIS|LAB|20240101120000||ORM^O01|{ctrl}|P|2.5.1\rPID|1||1^^^MRN||DOE^J\r"

SINK = os.path.join(ROOT, "tests", "peers", "recording_sink.py")

WEB = r"""
import sys
from twisted.internet import reactor
from twisted.web import resource, server
class R(resource.Resource):
    isLeaf = True
    def render_POST(self, request):
        request.content.read()
        request.setHeader(b"content-type", b"x-application/hl7-v2+er7")
        return b"MSH|^~\\&|LIS|LAB|BENCH|HOSP|20240101120000||ACK^O01^ACK|A1|P|2.5.1\rMSA|AA|X\r"
reactor.listenTCP(int(sys.argv[1]), server.Site(R()), interface="127.0.0.1")
print("web listening", flush=True)
reactor.run()
"""


class Bench:
    def __init__(self) -> None:
        self.procs: list[Proc] = []

    def spawn(self, name: str, args: list[str]) -> Proc:
        proc = Proc(name)
        env = dict(os.environ, PYTHONPATH=ROOT, PYTHONUNBUFFERED="1")
        reactor.spawnProcess(proc, sys.executable, [sys.executable, *args], env=env, path=ROOT)
        self.procs.append(proc)
        return proc

    async def stop(self) -> None:
        for p in self.procs:
            await p.stop()


async def stage_medians(base: str, pool: Any, headers: dict, push_ids: list[str]) -> dict:
    """The median of each stage's time since the one before, over these pushes' timelines."""
    gaps: dict[str, list[float]] = {}
    for push_id in push_ids[:500]:
        resp = await treq.get(f"{base}/fhir/R4/AgentPush/{push_id}", pool=pool, headers=headers)
        doc = json.loads(await resp.content())
        stages = doc.get("timeline") or []
        for before, after in zip(stages, stages[1:]):
            gaps.setdefault(f"{before['stage']}->{after['stage']}", []).append(
                after["sinceReceivedMs"] - before["sinceReceivedMs"])
    return {k: round(percentile(v, 0.5), 3) for k, v in gaps.items()}


def cpu_ms(proc: Proc) -> float:
    """CPU time (user + system) the process has used so far, in ms (Linux /proc)."""
    with open(f"/proc/{proc.transport.pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) * 1000 / os.sysconf("SC_CLK_TCK")


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


async def timed_loop(n: int, concurrency: int, one) -> tuple[list[float], float]:
    """Run C{one(i)} n times with C{concurrency} workers; latencies (ms) and wall seconds."""
    latencies: list[float] = []
    counter = iter(range(n))

    async def worker() -> None:
        for i in counter:
            t0 = time.perf_counter()
            await one(i)
            latencies.append((time.perf_counter() - t0) * 1000)

    start = time.perf_counter()
    await defer.gatherResults([defer.ensureDeferred(worker()) for _ in range(concurrency)],
                              consumeErrors=True)
    return latencies, time.perf_counter() - start


async def main(args: argparse.Namespace) -> dict:
    bench = Bench()
    data = tempfile.mkdtemp(prefix="bench-relay-")
    relay_port, sink_port, web_port = free_port(), free_port(), free_port()
    base = f"http://127.0.0.1:{relay_port}"
    try:
        from medagent.relay.service import open_authority, open_database

        def client(role: str, agents: list[str] = ()) -> dict:
            return open_authority(open_database(None, data), data).create_client_sync(role, agents)

        admin = client("admin")

        def profiled(name: str) -> list[str]:
            if not args.profile:
                return []
            os.makedirs(args.profile, exist_ok=True)
            return [f"--profile={os.path.join(args.profile, name + '.prof')}",
                    "--profiler=cprofile", "--savestats"]

        relay = bench.spawn("relay", ["-c", TWISTD, "-n", "--pidfile=", *profiled("relay"),
                                      "medagent-relay",
                                      "--data", data, "--listen",
                                      f"tcp:{relay_port}:interface=127.0.0.1"])
        sink = bench.spawn("sink", [SINK, str(sink_port), os.devnull])
        web = bench.spawn("web", ["-c", WEB, str(web_port)])
        # 16 devices (one lane each) for the spread measurement
        device_ports = [free_port() for _ in range(args.devices)]
        sinks = [bench.spawn(f"sink{i}", [SINK, str(port), os.devnull])
                 for i, port in enumerate(device_ports)]
        for p, text in ((relay, "relay listening"), (sink, "recording sink on"),
                        (web, "web listening"), *((s, "recording sink on") for s in sinks)):
            await p.wait_for(text, timeout=30)

        pool = HTTPConnectionPool(reactor)
        pool.maxPersistentPerHost = args.concurrency + 4
        r = await treq.post(base + "/oauth2/token", pool=pool, data={
            "grant_type": "client_credentials", "client_id": admin["clientId"],
            "client_secret": admin["clientSecret"]})
        token = (await r.json())["access_token"]
        headers = {"Authorization": [f"Bearer {token}"],
                   "Content-Type": ["application/fhir+json"]}
        r = await treq.post(base + "/fhir/R4/Agent", pool=pool, headers=headers,
                            data=json.dumps({"resourceType": "Agent", "name": "bench",
                                             "status": "active"}).encode())
        agent_id = (await r.json())["id"]
        creds = client("agent", [agent_id])
        agent = bench.spawn("agent", ["-c", TWISTD, "-n", "--pidfile=", *profiled("agent"),
                                      "medagent-agent",
                                      "--relay", base, "--client-id", creds["clientId"],
                                      "--client-secret", creds["clientSecret"],
                                      "--agent-id", agent_id,
                                      "--data", os.path.join(data, "agent")])
        await agent.wait_for("Connected to the relay", timeout=30)
        destination = f"mllp://127.0.0.1:{sink_port}"
        run_id = os.urandom(3).hex()
        sampled: list[str] = []

        spread = [f"mllp://127.0.0.1:{port}" for port in device_ports]

        async def push(i: int, to: str | None = None) -> None:
            body = {"destination": to or destination, "contentType": HL7_V2,
                    "waitForResponse": True, "body": HL7.format(ctrl=f"B{run_id}{i:07d}")}
            resp = await treq.post(f"{base}/fhir/R4/Agent/{agent_id}/$push", pool=pool,
                                   headers=headers, data=json.dumps(body).encode())
            content = await resp.content()
            if resp.code != 200 or b"MSA|AA|" not in content:
                raise RuntimeError(f"push failed: {resp.code} {content[:200]!r}")
            if len(sampled) < 2000:
                sampled.extend(resp.headers.getRawHeaders("X-Medagent-Push-Id") or [])

        async def web_post(i: int) -> None:
            resp = await treq.post(f"http://127.0.0.1:{web_port}/", pool=pool, headers=headers,
                                   data=json.dumps({"body": HL7.format(ctrl=i)}).encode())
            await resp.content()

        sender = MLLPSender(reactor)
        dest = parse_destination(destination)

        async def mllp(i: int) -> None:
            reply = await sender.send(dest, HL7_V2, HL7.format(ctrl=f"D{run_id}{i:07d}"), {})
            if "MSA|AA|" not in reply.body:
                raise RuntimeError("bad ACK")

        warm = min(200, args.n // 5)
        for fn in (push, web_post, mllp):
            await timed_loop(warm, 1, lambda i, fn=fn: fn(9_000_000 + i))

        print("measuring direct MLLP round trip", file=sys.stderr)
        mllp_lat, _ = await timed_loop(args.n, 1, mllp)
        print("measuring bare twisted.web POST", file=sys.stderr)
        http_lat, _ = await timed_loop(args.n, 1, web_post)
        print(f"measuring bare twisted.web POST, {args.concurrency} clients", file=sys.stderr)
        http16_lat, http16_wall = await timed_loop(args.n * 2, args.concurrency, web_post)
        print("measuring waited pushes, 1 client", file=sys.stderr)
        cpu = [(cpu_ms(relay), cpu_ms(agent))]
        own = [time.process_time()]
        push_lat, push_wall = await timed_loop(args.n, 1, lambda i: push(i))
        cpu.append((cpu_ms(relay), cpu_ms(agent)))
        print(f"measuring waited pushes, {args.concurrency} clients", file=sys.stderr)
        own.append(time.process_time())
        conc_lat, conc_wall = await timed_loop(args.n * 2, args.concurrency,
                                               lambda i: push(args.n + i))
        own.append(time.process_time())
        cpu.append((cpu_ms(relay), cpu_ms(agent)))
        print(f"measuring waited pushes, {args.concurrency} clients, {args.devices} devices",
              file=sys.stderr)
        spread_lat, spread_wall = await timed_loop(
            args.n * 2, args.concurrency,
            lambda i: push(3 * args.n + i, spread[i % len(spread)]))
        cpu.append((cpu_ms(relay), cpu_ms(agent)))
        await sender.close()
        stages = await stage_medians(base, pool, headers, sampled[warm:])
        await pool.closeCachedConnections()
        push_p50 = percentile(push_lat, 0.5)
        http_p50 = percentile(http_lat, 0.5)
        mllp_p50 = percentile(mllp_lat, 0.5)
        return {
            "n": args.n,
            "push_p50_ms": round(push_p50, 3),
            "push_p99_ms": round(percentile(push_lat, 0.99), 3),
            "http_p50_ms": round(http_p50, 3),
            "mllp_p50_ms": round(mllp_p50, 3),
            "ratio": round(push_p50 / (http_p50 + mllp_p50), 3),
            "pushes_per_s_1": round(len(push_lat) / push_wall, 1),
            "pushes_per_s_16": round(len(conc_lat) / conc_wall, 1),
            # the throughput floor: bare twisted.web POSTs/s with as many clients (the same
            # HTTP client, on the same two cores)
            "http_per_s_16": round(len(http16_lat) / http16_wall, 1),
            "push_p50_ms_16": round(percentile(conc_lat, 0.5), 3),
            "push_p99_ms_16": round(percentile(conc_lat, 0.99), 3),
            "pushes_per_s_16_devices": round(len(spread_lat) / spread_wall, 1),
            "push_p50_ms_16_devices": round(percentile(spread_lat, 0.5), 3),
            # where a waited push's time went (1 client): median ms from the stage before
            # (the push status documents' timeline; received → journaled → sent → accepted →
            # device → answered)
            "stage_p50_ms": stages,
            # CPU each process spent per waited push (load on the machine moves it less
            # than the latencies): where the time goes, relay or agent
            "relay_cpu_ms_per_push_1": round((cpu[1][0] - cpu[0][0]) / args.n, 3),
            "agent_cpu_ms_per_push_1": round((cpu[1][1] - cpu[0][1]) / args.n, 3),
            "relay_cpu_ms_per_push_16": round((cpu[2][0] - cpu[1][0]) / (args.n * 2), 3),
            "agent_cpu_ms_per_push_16": round((cpu[2][1] - cpu[1][1]) / (args.n * 2), 3),
            # this load generator's own CPU per push (treq): the share of the machine the
            # relay and the agent do not get
            "client_cpu_ms_per_push_16": round((own[2] - own[1]) * 1000 / (args.n * 2), 3),
            "relay_cpu_ms_per_push_16_devices": round((cpu[3][0] - cpu[2][0]) / (args.n * 2), 3),
            "agent_cpu_ms_per_push_16_devices": round((cpu[3][1] - cpu[2][1]) / (args.n * 2), 3),
        }
    finally:
        await bench.stop()


def run() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--devices", type=int, default=16,
                        help="devices (MLLP sinks) the spread measurement uses")
    parser.add_argument("--profile", default="",
                        help="directory for cProfile stats of the relay and the agent")
    print_result(main(parser.parse_args()))


def print_result(work: Any) -> None:
    """Run the coroutine C{work} on the reactor; print its dict as the last line (JSON), or
    its failure and exit 1 (what every bench script ends with)."""
    result: dict = {}

    def done(value: Any) -> None:
        if isinstance(value, dict):
            result.update(value)
        else:
            print(value, file=sys.stderr)
        reactor.stop()

    reactor.callWhenRunning(lambda: defer.ensureDeferred(work).addBoth(done))
    reactor.run()
    if not result:
        sys.exit(1)
    print(json.dumps(result))


if __name__ == "__main__":
    run()
