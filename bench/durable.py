"""
Fire-and-forget throughput with durability, and relay memory with a huge backlog.

1. Throughput: 16 concurrent clients push N HL7 messages (not waited) through a real relay
   and agent (twistd) to an MLLP sink; we time how fast the relay accepts them (202s) and
   how fast the sink receives all of them.  Side by side in the same run with the same
   pipeline whose SQLite files live in RAM (/dev/shm, ``synchronous=OFF``) — the cost of
   keeping everything on disk.
2. Memory: a relay whose journal holds Q pushes queued for an offline agent (written straight
   into its SQLite file), RSS idle and while the agent drains the backlog for a while; and
   the same with 1,000 queued, to show the queue is streamed from disk, not held in RAM.

Targets (issue 3): >= 3000 pushes/s accepted and delivered; <= 1.5x slowdown against the
in-memory pipeline; flat memory.  The floor of "accepted" is ``bare_http_202_per_s``: the
same client against a bare twisted.web server that stores nothing (what the client and HTTP
alone allow on this machine).  Last line: one JSON object.

    python bench/durable.py [--n 5000] [--queued 1000000]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
import uuid

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench.inbound import http  # noqa: E402
from tests.procs import TWISTD, free_port  # noqa: E402

SINK = os.path.join(ROOT, "tests", "peers", "recording_sink.py")
HL7 = "MSH|^~\\&|B|H|L|L|20240101120000||ORM^O01|{ctrl}|P|2.5.1\rPID|1||1^^^MRN||DOE^J\r"


def rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


class Stack:
    """relay + agent + sink as processes, data in C{root}."""

    def __init__(self, root: str, synchronous: str) -> None:
        self.root, self.synchronous = root, synchronous
        self.env = dict(os.environ, PYTHONPATH=ROOT, PYTHONUNBUFFERED="1")
        self.procs: list[subprocess.Popen] = []
        self.relay_port, self.sink_port = free_port(), free_port()
        self.base = f"http://127.0.0.1:{self.relay_port}"
        self.sink_log = os.path.join(root, "sink.log")

    def client(self, role: str, agents: list[str] = ()) -> dict:
        from medagent.relay.service import open_authority, open_database

        data = os.path.join(self.root, "relay")
        return open_authority(open_database(None, data), data).create_client_sync(role, agents)

    def spawn(self, args: list[str], log: str) -> subprocess.Popen:
        p = subprocess.Popen([sys.executable, *args], env=self.env,
                             stdout=open(os.path.join(self.root, log), "w"),
                             stderr=subprocess.STDOUT)
        self.procs.append(p)
        return p

    def start_relay(self) -> subprocess.Popen:
        relay = self.spawn(["-c", TWISTD, "-n", "--pidfile=", "medagent-relay", "--data",
                            os.path.join(self.root, "relay"), "--synchronous", self.synchronous,
                            "--listen", f"tcp:{self.relay_port}:interface=127.0.0.1"],
                           "relay.log")
        for _ in range(600):
            try:
                http("GET", self.base + "/healthz")
                return relay
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("relay did not start")

    def setup(self) -> None:
        self.admin = self.client("admin")
        self.relay = self.start_relay()
        self.token = http("POST", self.base + "/oauth2/token", form={
            "grant_type": "client_credentials", "client_id": self.admin["clientId"],
            "client_secret": self.admin["clientSecret"]})["access_token"]
        self.agent = http("POST", self.base + "/fhir/R4/Agent", self.token,
                          {"resourceType": "Agent", "name": "bench", "status": "active"})
        self.creds = self.client("agent", [self.agent["id"]])
        self.spawn([SINK, str(self.sink_port), self.sink_log], "sink.out")

    def start_agent(self) -> None:
        self.spawn(["-c", TWISTD, "-n", "--pidfile=", "medagent-agent", "--relay", self.base,
                    "--client-id", self.creds["clientId"],
                    "--client-secret", self.creds["clientSecret"],
                    "--agent-id", self.agent["id"], "--synchronous", self.synchronous,
                    "--data", os.path.join(self.root, "agent")], "agent.log")

    def delivered(self) -> int:
        try:
            with open(self.sink_log, "rb") as f:
                return f.read().count(b"\n")
        except FileNotFoundError:
            return 0

    def stop(self) -> None:
        for p in self.procs:
            p.terminate()
        for p in self.procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()


def push_concurrently(stack: Stack, n: int, concurrency: int = 16) -> float:
    """N not-waited pushes from C{concurrency} threads (keep-alive HTTP); seconds taken."""
    import http.client

    url = urllib.parse.urlsplit(stack.base)
    path = f"/fhir/R4/Agent/{stack.agent['id']}/$push"
    dest = f"mllp://127.0.0.1:{stack.sink_port}"
    run = uuid.uuid4().hex[:6]
    counter = iter(range(n))
    lock = threading.Lock()
    errors: list[str] = []

    def worker() -> None:
        conn = http.client.HTTPConnection(url.hostname, url.port, timeout=60)
        headers = {"Authorization": f"Bearer {stack.token}",
                   "Content-Type": "application/fhir+json"}
        while True:
            with lock:
                i = next(counter, None)
            if i is None:
                break
            body = json.dumps({"destination": dest, "contentType": "x-application/hl7-v2+er7",
                               "body": HL7.format(ctrl=f"{run}{i:08d}")})
            conn.request("POST", path, body, headers)
            r = conn.getresponse()
            r.read()
            if r.status != 202:
                errors.append(str(r.status))
        conn.close()

    start = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise RuntimeError(f"{len(errors)} pushes failed: {errors[:3]}")
    return time.perf_counter() - start


#: The floor of the throughput measure: a bare twisted.web server answering each push with a
#: 202 and a small OperationOutcome, nothing stored or sent, pushed by the same client.
BARE_202 = r"""
import sys
from twisted.internet import reactor
from twisted.web import resource, server
BODY = (b'{"resourceType":"OperationOutcome","issue":[{"severity":"information",'
        b'"code":"informational","diagnostics":"AgentPush/0123456789abcdef"}]}')
class R(resource.Resource):
    isLeaf = True
    def render_POST(self, request):
        request.content.read()
        request.setResponseCode(202)
        request.setHeader(b"content-type", b"application/fhir+json")
        return BODY
    def render_GET(self, request):
        return b"null"
reactor.listenTCP(int(sys.argv[1]), server.Site(R()), interface="127.0.0.1")
reactor.run()
"""


def bare_http(root: str, n: int) -> float:
    """Pushes/s the bench's own client gets from a bare twisted.web 202 (see L{BARE_202})."""
    stack = Stack(root, "OFF")
    os.makedirs(root, exist_ok=True)
    stack.agent, stack.token = {"id": "bare"}, "bare"
    stack.spawn(["-c", BARE_202, str(stack.relay_port)], "bare.log")
    try:
        for _ in range(600):
            try:
                http("GET", stack.base + "/")
                break
            except OSError:
                time.sleep(0.05)
        push_concurrently(stack, 200)
        return round(n / push_concurrently(stack, n), 1)
    finally:
        stack.stop()


def throughput(root: str, synchronous: str, n: int) -> dict:
    stack = Stack(root, synchronous)
    try:
        stack.setup()
        stack.start_agent()
        time.sleep(2)  # agent connected
        push_concurrently(stack, 200)  # warm-up
        while stack.delivered() < 200:
            time.sleep(0.05)
        base = stack.delivered()
        start = time.perf_counter()
        accept_s = push_concurrently(stack, n)
        deadline = time.time() + 600
        while stack.delivered() < base + n and time.time() < deadline:
            time.sleep(0.02)
        deliver_s = time.perf_counter() - start
        got = stack.delivered() - base
        return {"accepted_per_s": round(n / accept_s, 1),
                "delivered_per_s": round(got / deliver_s, 1), "delivered": got}
    finally:
        stack.stop()


def memory(root: str, queued: int) -> dict:
    """RSS of a relay with C{queued} pushes waiting, idle and while the agent drains them."""
    stack = Stack(root, "NORMAL")
    try:
        stack.setup()
        agent_id = stack.agent["id"]
        dest = f"mllp://127.0.0.1:{stack.sink_port}"
        stack.relay.terminate()
        stack.relay.wait(10)
        db = sqlite3.connect(os.path.join(root, "relay", "relay.sqlite"))
        now = time.time()
        t0 = time.perf_counter()
        batch = 50_000
        for start in range(0, queued, batch):
            db.executemany(
                "INSERT INTO pushes (id, agent_id, destination, remote, content_type, body,"
                " options, state, created, updated) VALUES (?,?,?,?,?,?,'{}','queued',?,?)",
                ((uuid.uuid4().hex, agent_id, dest, dest, "x-application/hl7-v2+er7",
                  HL7.format(ctrl=f"Q{i:09d}"), now, now)
                 for i in range(start, min(queued, start + batch))))
            db.commit()
        db.close()
        fill_s = time.perf_counter() - t0
        stack.relay = stack.start_relay()
        time.sleep(2)
        idle = rss_kb(stack.relay.pid)
        stack.start_agent()
        peak, t_end = idle, time.time() + 20
        while time.time() < t_end:
            peak = max(peak, rss_kb(stack.relay.pid))
            time.sleep(0.2)
        return {"queued": queued, "fill_s": round(fill_s, 1), "relay_rss_idle_mb":
                round(idle / 1024, 1), "relay_rss_peak_draining_mb": round(peak / 1024, 1),
                "delivered_in_20s": stack.delivered()}
    finally:
        stack.stop()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=5000)
    parser.add_argument("--queued", type=int, default=1_000_000)
    args = parser.parse_args()
    disk = tempfile.mkdtemp(prefix="bench-durable-")
    ram = tempfile.mkdtemp(prefix="bench-durable-", dir="/dev/shm" if os.path.isdir(
        "/dev/shm") else None)
    try:
        print("throughput, on disk (synchronous=NORMAL)", file=sys.stderr)
        durable = throughput(os.path.join(disk, "t"), "NORMAL", args.n)
        print("throughput, in RAM (/dev/shm, synchronous=OFF)", file=sys.stderr)
        in_ram = throughput(os.path.join(ram, "t"), "OFF", args.n)
        print("floor: a bare twisted.web 202, same client", file=sys.stderr)
        bare = bare_http(os.path.join(ram, "b"), args.n)
        print(f"memory with {args.queued} queued", file=sys.stderr)
        big = memory(os.path.join(disk, "m1"), args.queued)
        print("memory with 1000 queued", file=sys.stderr)
        small = memory(os.path.join(disk, "m2"), 1000)
        result = {
            "n": args.n,
            "durable_accepted_per_s": durable["accepted_per_s"],
            "durable_delivered_per_s": durable["delivered_per_s"],
            "ram_accepted_per_s": in_ram["accepted_per_s"],
            "ram_delivered_per_s": in_ram["delivered_per_s"],
            "bare_http_202_per_s": bare,
            "slowdown_delivered": round(in_ram["delivered_per_s"]
                                        / max(durable["delivered_per_s"], 1e-9), 3),
            "queued": args.queued,
            "relay_rss_mb_idle_big_backlog": big["relay_rss_idle_mb"],
            "relay_rss_mb_draining_big_backlog": big["relay_rss_peak_draining_mb"],
            "relay_rss_mb_draining_1000": small["relay_rss_peak_draining_mb"],
            "delivered_in_20s_from_big_backlog": big["delivered_in_20s"],
        }
        print(json.dumps(result))
    finally:
        shutil.rmtree(disk, ignore_errors=True)
        shutil.rmtree(ram, ignore_errors=True)


if __name__ == "__main__":
    main()
