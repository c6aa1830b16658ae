"""
Connect storms: N agents opening their websockets at once, on a fresh relay and again after
the relay is killed (``kill -9``) and started on the same data.

Starts real processes: the relay (``twistd -n medagent-relay`` on SQLite in a temporary
folder, L{tests.procs.RelayFixture}) and C{--load-procs} load processes (this script with
C{--load}), each holding a share of the fake agents.  A fake agent is an autobahn websocket
client speaking our wire protocol as our agent does: C{agent:connect:request} with its token
and our agent's capabilities, heartbeat requests every C{--heartbeat-interval} seconds (with
the token, as ours), answers to the relay's heartbeats; it runs inside a L{ClientService} with
our agent's retry policy (L{medagent.agent.uplink.medplum_backoff}, its own random base per
agent) and our agent's websocket options, and closes (then retries) when the relay refuses it
in-band or does not accept it within C{CONNECT_WAIT} seconds.  Each fake agent dials from its
own loopback address (127.10.x.y; C{--per-address} agents share one), as a fleet of sites
does.

Set-up, before the relay starts: N C{Agent} resources and N agent clients are written through
the storage and L{Authority} APIs, and each agent's access token is minted with the relay's
C{token.key} (L{Authority.mint_token}): the fake agents do not call ``/oauth2/token``
(C{"tokens": "minted offline"} in the JSON).  The relay gets C{--max-connections} N + 1000 (its
default, 2048, would refuse the fleet by design); every other limit is its default.

Measures, for the start storm and the restart storm: agents connected within C{--window}
seconds (from the moment the relay listens) and the time until all were; the load's count of
refusals and timeouts by kind; the relay's peak RSS.  In between, once all are connected, a
steady phase of C{--steady} seconds: the relay's CPU (its utime+stime from /proc), RSS, the
heartbeat round trip the fake agents see (p50/p99), and the gaps between the relay's
heartbeat requests to each agent (p99/max: are heartbeats on time?).  The floor it is held
against is the target: N connected within 60 s, RSS <= 1 GB, gaps near the interval.

    python bench/connect_storm.py [--agents 10000] [--load-procs 4] [--window 60]

Prints progress on stderr and one JSON object as the last line of stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import sys
import tempfile
import time
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import txaio  # noqa: E402

txaio.use_twisted()

from twisted.internet import defer, reactor  # noqa: E402

from medagent import wire  # noqa: E402

#: seconds a fake agent waits for agent:connect:response after its socket opened (our agent
#: gives up after its third heartbeat tick without one; the relay closes after 10 s anyway)
CONNECT_WAIT = 15.0
#: what our agent announces (the relay replays its open pushes for "durable" agents)
CAPABILITIES = [wire.CAP_DURABLE, wire.CAP_DEDUPE, wire.CAP_TOKEN_REFRESH, wire.CAP_CANCEL,
                "mllp"]
#: seconds between the load processes' reports
REPORT_EVERY = 0.5


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return round(values[min(len(values) - 1, int(round(q * (len(values) - 1))))], 2)


def source_address(index: int, per_address: int) -> str:
    n = index // per_address
    return f"127.10.{1 + n // 250}.{1 + n % 250}"


# -- the load process ----------------------------------------------------------------------


def run_load(args: argparse.Namespace) -> None:
    """One load process: its share of fake agents, a report line every REPORT_EVERY s."""
    from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
    from twisted.application.internet import ClientService
    from twisted.internet.endpoints import TCP4ClientEndpoint
    from twisted.internet.protocol import Factory
    from twisted.internet.task import LoopingCall

    from medagent.agent.uplink import medplum_backoff, websocket_options

    with open(args.agents_file) as f:
        agents = json.load(f)[args.first:args.first + args.count]

    counters = {"connects": 0, "tcp_failed": 0, "closed_before_open": 0,
                "handshake_timeout": 0, "refused_in_band": 0, "connect_timeout": 0,
                "dropped": 0, "sockets": 0}
    rtts: list[float] = []
    gaps: list[float] = []
    connected: set[str] = set()

    url = f"ws://{args.host}:{args.port}/ws/agent"
    shared = WebSocketClientFactory(url, reactor=reactor)
    shared.setProtocolOptions(**websocket_options(wire.DEFAULT_MAX_MESSAGE_SIZE))

    class FakeSocket(WebSocketClientProtocol):
        agent: "FakeAgent"
        opened = False
        live = False
        wait_call: Any = None

        def onOpen(self) -> None:
            self.opened = True
            counters["sockets"] += 1
            self.agent.conn = self
            self.sendMessage(wire.encode({"type": wire.CONNECT_REQUEST, "agentId":
                                          self.agent.agent_id, "accessToken": self.agent.token,
                                          "capabilities": CAPABILITIES}), isBinary=False)
            self.wait_call = reactor.callLater(CONNECT_WAIT, self._not_accepted)

        def _not_accepted(self) -> None:
            self.wait_call = None
            if not self.live:
                counters["connect_timeout"] += 1
                self.agent.counted = True
                self.sendClose(4000, "connect not answered")

        def onMessage(self, payload: bytes, isBinary: bool) -> None:
            msg = json.loads(payload)
            kind = msg.get("type")
            agent = self.agent
            if kind == wire.CONNECT_RESPONSE:
                self.live = True
                if self.wait_call is not None and self.wait_call.active():
                    self.wait_call.cancel()
                counters["connects"] += 1
                connected.add(agent.agent_id)
                agent.backoff.accepted()  # as our agent's uplink does (AgentApp.on_live)
                agent.last_relay_heartbeat = None
            elif kind == wire.HEARTBEAT_REQUEST:
                now = time.monotonic()
                if agent.last_relay_heartbeat is not None:
                    gaps.append(now - agent.last_relay_heartbeat)
                agent.last_relay_heartbeat = now
                self.sendMessage(wire.encode(wire.heartbeat_response()), isBinary=False)
            elif kind == wire.HEARTBEAT_RESPONSE:
                if agent.heartbeat_sent is not None:
                    rtts.append((time.monotonic() - agent.heartbeat_sent) * 1000)
                    agent.heartbeat_sent = None
            elif kind == wire.ERROR and not self.live:
                counters["refused_in_band"] += 1
                agent.counted = True
                self.sendClose(4000, "refused")

        def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
            if self.wait_call is not None and self.wait_call.active():
                self.wait_call.cancel()
            agent = self.agent
            if agent.conn is self:
                agent.conn = None
            if self.opened:
                counters["sockets"] -= 1
            if self.live:
                connected.discard(agent.agent_id)
                counters["dropped"] += 1
            elif not self.opened:
                if "timeout" in (reason or ""):
                    counters["handshake_timeout"] += 1
                else:
                    counters["closed_before_open"] += 1
            elif not agent.counted:
                counters["connect_timeout"] += 1  # the relay closed it unauthenticated
            agent.counted = False

    class CountingEndpoint:
        """A TCP endpoint that counts failed TCP connects (ClientService just retries)."""

        def __init__(self, endpoint: Any) -> None:
            self.endpoint = endpoint

        def connect(self, factory: Any) -> Any:
            def failed(f: Any) -> Any:
                counters["tcp_failed"] += 1
                return f

            return self.endpoint.connect(factory).addErrback(failed)

    class FakeAgent(Factory):
        def __init__(self, agent_id: str, token: str, src: str) -> None:
            self.agent_id = agent_id
            self.token = token
            self.conn: FakeSocket | None = None
            self.counted = False
            self.heartbeat_sent: float | None = None
            self.last_relay_heartbeat: float | None = None
            endpoint = CountingEndpoint(TCP4ClientEndpoint(
                reactor, args.host, args.port, timeout=10, bindAddress=(src, 0)))
            self.backoff = medplum_backoff()
            self.service = ClientService(endpoint, self, retryPolicy=self.backoff,
                                         clock=reactor)
            self.ticker = LoopingCall(self.tick)

        def buildProtocol(self, addr: Any) -> FakeSocket:
            p = FakeSocket()
            p.factory = shared
            p.agent = self
            return p

        def tick(self) -> None:
            conn = self.conn
            if conn is None or not conn.live:
                return
            self.heartbeat_sent = time.monotonic()
            conn.sendMessage(wire.encode({"type": wire.HEARTBEAT_REQUEST,
                                          "accessToken": self.token}), isBinary=False)

        def start(self) -> None:
            self.service.startService()
            # our agent's ticker runs from its process start: phases are random in a fleet
            reactor.callLater(random.uniform(0, args.heartbeat_interval), self.ticker.start,
                              args.heartbeat_interval, False)

    fakes = [FakeAgent(a["id"], a["token"], source_address(args.first + i, args.per_address))
             for i, a in enumerate(agents)]

    def report() -> None:
        line = dict(counters, t=time.time(), connected=len(connected), rtt=rtts[:], gaps=gaps[:])
        rtts.clear()
        gaps.clear()
        sys.stdout.write("REPORT " + json.dumps(line) + "\n")
        sys.stdout.flush()

    def go() -> None:
        sys.stdout.write(f"GO {time.time()}\n")
        sys.stdout.flush()
        for fake in fakes:
            fake.start()
        LoopingCall(report).start(REPORT_EVERY)

    reactor.callWhenRunning(go)
    reactor.run()


# -- the controller ------------------------------------------------------------------------


class _Cleanups:
    """What L{tests.procs.RelayFixture} wants of a test case: somewhere to put cleanups."""

    def __init__(self) -> None:
        self.calls: list[Any] = []

    def addCleanup(self, fn: Any, *args: Any) -> None:
        self.calls.append((fn, args))

    async def run(self) -> None:
        for fn, args in reversed(self.calls):
            try:
                await defer.maybeDeferred(fn, *args)
            except Exception as e:  # a cleanup failing must not hide the others
                print(f"cleanup failed: {e}", file=sys.stderr)


def proc_stat(pid: int) -> tuple[float, int]:
    """(CPU seconds used, RSS bytes) of a process, from /proc."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    cpu = (int(fields[11]) + int(fields[12])) / ticks
    rss = int(fields[21]) * os.sysconf("SC_PAGE_SIZE")
    return cpu, rss


async def setup_agents(data: str, n: int) -> list[dict[str, str]]:
    """N Agent resources and agent clients in the relay's database, tokens minted offline."""
    from medagent.relay.auth import AGENT, Principal
    from medagent.relay.service import open_authority, open_database
    from medagent.storage.sqlite import SQLiteStore

    db = open_database(reactor, data)
    db.start()
    try:
        store = SQLiteStore(db)
        authority = open_authority(db, data)
        agents: list[dict[str, str]] = []
        batch = 200
        for start in range(0, n, batch):
            made = await defer.gatherResults([
                store.create({"resourceType": "Agent", "name": f"storm-{i}",
                              "status": "active"}) for i in range(start, min(n, start + batch))])
            clients = await defer.gatherResults([
                authority.create_client(AGENT, [a["id"]]) for a in made])
            for agent, client in zip(made, clients):
                token = authority.mint_token(
                    Principal(client["clientId"], AGENT, frozenset([agent["id"]])), 3600)
                agents.append({"id": agent["id"], "token": token})
        return agents
    finally:
        db.stop()


class LoadProc:
    """A load process: the latest report of its counters, and every RTT/gap sample."""

    def __init__(self, proc: Any) -> None:
        self.proc = proc
        self.go: float | None = None
        self.latest: dict[str, Any] = {}
        self.samples: list[tuple[float, list[float], list[float]]] = []
        self._seen = 0
        self._buffer = b""
        original = proc.outReceived

        def received(data: bytes) -> None:
            self._buffer += data
            lines = self._buffer.split(b"\n")
            self._buffer = lines.pop()
            for line in lines:
                if line.startswith(b"REPORT "):
                    report = json.loads(line[7:])
                    self.samples.append((report["t"], report.pop("rtt"), report.pop("gaps")))
                    self.latest = report
                elif line.startswith(b"GO "):
                    self.go = float(line[3:])
                    original(line + b"\n")
                else:
                    original(line + b"\n")

        proc.outReceived = received


def total(loads: list[LoadProc], key: str) -> int:
    return sum(int(load.latest.get(key, 0)) for load in loads)


def samples_between(loads: list[LoadProc], t0: float, t1: float) -> tuple[list[float],
                                                                            list[float]]:
    rtt: list[float] = []
    gaps: list[float] = []
    for load in loads:
        for t, r, g in load.samples:
            if t0 <= t <= t1:
                rtt += r
                gaps += g
    return rtt, gaps


async def sleep(seconds: float) -> None:
    from twisted.internet.task import deferLater

    await deferLater(reactor, seconds, lambda: None)


async def storm(name: str, loads: list[LoadProc], relay_pid: int, n: int, t0: float,
                window: float, wait: float) -> dict[str, Any]:
    """Watch the agents connect from t0 (the relay listening): counts, timings, peak RSS."""
    before = {k: total(loads, k) for k in ("connects", "tcp_failed", "closed_before_open",
                                           "handshake_timeout", "refused_in_band",
                                           "connect_timeout", "dropped")}
    peak_rss = 0
    cpu0 = proc_stat(relay_pid)[0]
    at_window: int | None = None
    all_at: float | None = None
    timeline: list[tuple[float, int]] = []
    while True:
        await sleep(REPORT_EVERY)
        now = time.time()
        peak_rss = max(peak_rss, proc_stat(relay_pid)[1])
        connected = total(loads, "connected")
        if not timeline or now - timeline[-1][0] >= 5:
            timeline.append((now, connected))
            print(f"{name}: {now - t0:5.1f}s {connected}/{n} connected", file=sys.stderr)
        if at_window is None and now - t0 >= window:
            at_window = connected
        if connected >= n and all_at is None:
            all_at = now - t0
            at_window = at_window if at_window is not None else n
            break
        if now - t0 >= wait:
            break
    out: dict[str, Any] = {
        f"connected_within_{int(window)}s": at_window if at_window is not None else
        total(loads, "connected"),
        "seconds_to_all_connected": round(all_at, 1) if all_at is not None else None,
        "connected_at_end": total(loads, "connected"),
        "peak_rss_mb": round(peak_rss / 2**20, 1),
        "relay_cpu_percent_of_a_core": round(100 * (proc_stat(relay_pid)[0] - cpu0)
                                             / (time.time() - t0), 1),
        "load_average_1m": round(os.getloadavg()[0], 1),
        "every_5s": [c for _, c in timeline],
    }
    for key, value in before.items():
        out[key] = total(loads, key) - value
    return out


async def steady(loads: list[LoadProc], relay_pid: int, seconds: float,
                 interval: float) -> dict[str, Any]:
    cpu0, _ = proc_stat(relay_pid)
    t0 = time.time()
    load_cpu0 = sum(proc_stat(load.proc.transport.pid)[0] for load in loads)
    await sleep(seconds)
    cpu1, rss = proc_stat(relay_pid)
    t1 = time.time()
    load_cpu1 = sum(proc_stat(load.proc.transport.pid)[0] for load in loads)
    rtt, gaps = samples_between(loads, t0 + REPORT_EVERY, t1)
    return {
        "seconds": round(t1 - t0, 1),
        "connected": total(loads, "connected"),
        "relay_cpu_percent_of_a_core": round(100 * (cpu1 - cpu0) / (t1 - t0), 1),
        "load_cpu_percent_of_a_core": round(100 * (load_cpu1 - load_cpu0) / (t1 - t0), 1),
        "relay_rss_mb": round(rss / 2**20, 1),
        "load_average_1m": round(os.getloadavg()[0], 1),
        "heartbeats_answered": len(rtt),
        "heartbeat_rtt_p50_ms": percentile(rtt, 0.5),
        "heartbeat_rtt_p99_ms": percentile(rtt, 0.99),
        "relay_heartbeat_gap_p50_s": percentile(gaps, 0.5),
        "relay_heartbeat_gap_p99_s": percentile(gaps, 0.99),
        "relay_heartbeat_gap_max_s": percentile(gaps, 1.0),
        "relay_heartbeat_interval_s": interval,
    }


def save_log(proc: Any, path: str) -> None:
    """The relay's output (its last 8 MiB), for a look at what a storm did to it."""
    with open(path, "wb") as f:
        f.write(bytes(proc.output))
    print(f"relay log: {path}", file=sys.stderr)


async def main(args: argparse.Namespace) -> dict[str, Any]:
    from tests.procs import Proc, RelayFixture

    cleanups = _Cleanups()
    try:
        data = tempfile.mkdtemp(prefix="bench-storm-")
        print(f"writing {args.agents} agents and clients", file=sys.stderr)
        t = time.time()
        agents = await setup_agents(data, args.agents)
        setup_s = time.time() - t
        agents_file = os.path.join(data, "storm-agents.json")
        with open(agents_file, "w") as f:
            json.dump(agents, f)
        relay_args = ["--max-connections", str(args.agents + 1000),
                      "--heartbeat-interval", str(args.heartbeat_interval), *args.relay_arg]
        relay = RelayFixture(cleanups, data)
        await relay.start(relay_args)
        assert relay.proc is not None and relay.port is not None
        t_listen = time.time()

        loads: list[LoadProc] = []
        share = -(-args.agents // args.load_procs)
        for i in range(args.load_procs):
            proc = Proc(f"load{i}")
            env = dict(os.environ, PYTHONPATH=ROOT, PYTHONUNBUFFERED="1")
            argv = [sys.executable, os.path.abspath(__file__), "--load", "--agents-file",
                    agents_file, "--first", str(i * share), "--count", str(share),
                    "--port", str(relay.port), "--per-address", str(args.per_address),
                    "--heartbeat-interval", str(args.heartbeat_interval)]
            load = LoadProc(proc)
            reactor.spawnProcess(proc, sys.executable, argv, env=env, path=ROOT)
            cleanups.addCleanup(proc.stop, signal.SIGKILL)
            loads.append(load)
        for load in loads:
            await load.proc.wait_for("GO ", timeout=120)
        t_go = max(load.go or 0.0 for load in loads)
        print(f"storm 1: agents opening (relay pid {relay.proc.transport.pid})",
              file=sys.stderr)
        first = await storm("start", loads, relay.proc.transport.pid, args.agents, t_go,
                            args.window, args.wait)
        first["relay_listening_before_go_s"] = round(t_go - t_listen, 1)
        print("settling, then steady heartbeats", file=sys.stderr)
        await sleep(2 * args.heartbeat_interval)
        steady1 = await steady(loads, relay.proc.transport.pid, args.steady,
                               args.heartbeat_interval)

        print("kill -9 the relay, start it again on the same data", file=sys.stderr)
        t_kill = time.time()
        await relay.stop(signal.SIGKILL)
        save_log(relay.proc, os.path.join(data, "relay-1.log"))
        await sleep(args.down)
        await relay.start(relay_args)
        t_back = time.time()
        print(f"relay back (pid {relay.proc.transport.pid})", file=sys.stderr)
        second = await storm("restart", loads, relay.proc.transport.pid, args.agents, t_back,
                             args.window, args.wait)
        second["relay_down_s"] = round(t_back - t_kill, 1)
        await sleep(2 * args.heartbeat_interval)
        steady2 = await steady(loads, relay.proc.transport.pid, args.steady,
                               args.heartbeat_interval)
        save_log(relay.proc, os.path.join(data, "relay-2.log"))
        return {
            "bench": "connect_storm",
            "agents": args.agents,
            "load_procs": args.load_procs,
            "agents_per_source_address": args.per_address,
            "tokens": "minted offline with the relay's token.key (no /oauth2/token calls)",
            "setup_s": round(setup_s, 1),
            "relay_args": relay_args,
            "target": {"connected_within_60s": args.agents, "rss_mb_max": 1024},
            "start_storm": first,
            "steady_after_start": steady1,
            "restart_storm": second,
            "steady_after_restart": steady2,
        }
    finally:
        await cleanups.run()


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--agents", type=int, default=10000)
    parser.add_argument("--load-procs", type=int, default=4)
    parser.add_argument("--per-address", type=int, default=1,
                        help="fake agents sharing one loopback source address")
    parser.add_argument("--window", type=float, default=60.0)
    parser.add_argument("--wait", type=float, default=120.0,
                        help="seconds to keep watching a storm for all to connect")
    parser.add_argument("--steady", type=float, default=30.0)
    parser.add_argument("--down", type=float, default=2.0,
                        help="seconds the relay stays down after kill -9")
    parser.add_argument("--heartbeat-interval", type=float, default=10.0)
    parser.add_argument("--relay-arg", action="append", default=[],
                        help="one more relay command-line argument (repeatable)")
    # the load process (started by the controller)
    parser.add_argument("--load", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--agents-file", help=argparse.SUPPRESS)
    parser.add_argument("--first", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--count", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--host", default="127.0.0.1", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def run() -> None:
    args = parse(sys.argv[1:])
    if args.load:
        run_load(args)
        return
    from bench.push_rtt import print_result

    print_result(main(args))


if __name__ == "__main__":
    run()
