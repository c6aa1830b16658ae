"""
Inbound HL7 messages/s: device → agent channel → relay → trivial Bot (builds the ACK) → back.

Starts a real relay and agent (twistd) with two MLLP channels, original and enhanced mode,
and sends N messages over one MLLP connection to each, the way a device does: one message
at a time, the next after the previous one's (first) ACK.

- original: the ACK the device waits for is the Bot's ``AA`` (a full cloud round trip);
- enhanced: the device waits for the ``CA`` the agent sends once the message is on its disk;
  the Bot's ``AA`` follows asynchronously.  We also time until every AA has arrived.
- enhanced, C{--connections} devices at once (8 by default), each one message at a time.

The floor, measured in the same run: the same clients against a bare MLLP responder (a
Twisted process that answers each frame with its ACK at once: no disk, no relay), one
connection and C{--connections} connections.

Medplum's docs quote 3-4 msg/s original and 300-400 msg/s enhanced.  Targets (issue 13):
>= 100 msg/s original, >= 2000 msg/s enhanced.  Last line: one JSON object.

    python bench/inbound.py [--n 1000] [--connections 8] [--profile-agent FILE]
                            [--code CHECKOUT] [--relay-arg=--inbound-log=off]

C{--profile-agent FILE}: run the agent under cProfile (twistd --profile), stats in FILE.
C{--code} runs the relay and agent of another checkout (a baseline: ``--code`` of the main
branch beside this one, interleaved); C{--relay-arg} passes an option to the relay.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from tests.procs import TWISTD, bot_sandbox_args, free_port  # noqa: E402

#: the floor: a bare MLLP responder (medagent's decoder, an ACK per frame), no disk, no relay
FLOOR = """
import sys
from twisted.internet import protocol, reactor
from medagent.hl7 import message as hl7msg
from medagent.hl7.mllp import MLLPDecoder, frame

class Ack(protocol.Protocol):
    def connectionMade(self):
        self.decoder = MLLPDecoder()
        self.transport.setTcpNoDelay(True)

    def dataReceived(self, data):
        for payload in self.decoder.feed(data):
            text = hl7msg.normalise(payload.decode("utf-8"))
            self.transport.write(frame(hl7msg.build_ack(text, "CA").encode("utf-8")))

factory = protocol.Factory.forProtocol(Ack)
reactor.listenTCP(int(sys.argv[1]), factory, interface="127.0.0.1")
reactor.run()
"""

BOT = 'def handler(medplum, event):\n    return event.build_ack("AA")\n'


def http(method: str, url: str, token: str | None = None, body: dict | None = None,
         form: dict | None = None) -> dict:
    data, headers = None, {}
    if body is not None:
        data, headers["Content-Type"] = json.dumps(body).encode(), "application/fhir+json"
    if form is not None:
        data = urllib.parse.urlencode(form).encode()
        headers["Content-Type"] = "application/x-www-form-urlencoded"
    if token:
        headers["Authorization"] = f"Bearer {token}"
    req = urllib.request.Request(url, data=data, headers=headers, method=method)
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read() or b"null")


def message(i: int) -> bytes:
    return (f"\x0bMSH|^~\\&|DEV|LAB|LIS|HOSP|20240101120000||ORU^R01|IN{i:08d}|P|2.5.1\r"
            f"PID|1||{i}^^^MRN||DOE^J\rOBX|1|NM|GLU^Glucose||{i % 200}|mg/dL\r\x1c\r").encode()


class Reader:
    def __init__(self, sock: socket.socket) -> None:
        self.sock, self.buf = sock, b""

    def frame(self) -> bytes:
        while b"\x1c\r" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("closed")
            self.buf += chunk
        frame, self.buf = self.buf.split(b"\x1c\r", 1)
        return frame


def run_mode(port: int, n: int, enhanced: bool, first_id: int = 0, wait_aa: bool = True
             ) -> dict:
    sock = socket.create_connection(("127.0.0.1", port), timeout=60)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    reader = Reader(sock)
    codes: dict[str, int] = {}
    start = time.perf_counter()
    for i in range(first_id, first_id + n):
        sock.sendall(message(i))
        while True:
            code = reader.frame().split(b"MSA|", 1)[1][:2].decode()
            codes[code] = codes.get(code, 0) + 1
            if code in ("CA", "AA", "AE", "AR", "CE", "CR") and (not enhanced or code != "AA"):
                break
    first_end = time.perf_counter()
    first = first_end - start
    if enhanced and wait_aa:
        # the Bot's AAs: a loaded machine may not run 1000 bots within the outbox's answer
        # timeout (55 s); what did not come is counted, the CA rate stands
        sock.settimeout(15)
        try:
            while codes.get("AA", 0) < n:
                code = reader.frame().split(b"MSA|", 1)[1][:2].decode()
                codes[code] = codes.get(code, 0) + 1
        except TimeoutError:
            codes["AA missing"] = n - codes.get("AA", 0)
    total = time.perf_counter() - start
    sock.close()
    return {"msgs_per_s": round(n / first, 1), "all_acks_msgs_per_s": round(n / total, 1),
            "acks": codes, "first_end": first_end}


def run_parallel(port: int, n: int, connections: int, enhanced: bool, first_id: int,
                 wait_aa: bool = True) -> dict:
    """
    C{connections} devices at once, C{n} messages each: the rate of first answers (CA in
    enhanced mode) until the last device has its last one; the AAs are then awaited too.
    """
    results: list[dict] = []
    errors: list[BaseException] = []

    def device(k: int) -> None:
        try:
            results.append(run_mode(port, n, enhanced, first_id + k * n, wait_aa))
        except BaseException as e:  # reported below, never silently dropped
            errors.append(e)

    threads = [threading.Thread(target=device, args=(k,)) for k in range(connections)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    elapsed = max(r["first_end"] for r in results) - start
    codes: dict[str, int] = {}
    for r in results:
        for code, count in r["acks"].items():
            codes[code] = codes.get(code, 0) + count
    return {"msgs_per_s": round(n * connections / elapsed, 1), "acks": codes}


def wait_listening(port: int) -> None:
    for _ in range(300):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"nothing listens on port {port}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--code", default=ROOT, help="checkout whose relay and agent run")
    parser.add_argument("--relay-arg", action="append", default=[],
                        help="an option for the relay (repeatable)")
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--profile-agent", default=None)
    args = parser.parse_args()
    if not 1 <= args.connections <= 64:
        raise SystemExit("--connections: 1 to 64")
    data = tempfile.mkdtemp(prefix="bench-inbound-")
    relay_port, orig_port, enh_port, floor_port = free_port(), free_port(), free_port(), free_port()
    base = f"http://127.0.0.1:{relay_port}"
    env = dict(os.environ, PYTHONPATH=os.path.abspath(args.code), PYTHONUNBUFFERED="1")
    procs: list[subprocess.Popen] = []
    try:
        from medagent.relay.service import open_authority, open_database

        def client(role: str, agents: list[str] = ()) -> dict:
            return open_authority(open_database(None, data), data).create_client_sync(role, agents)

        admin = client("admin")
        log = open(os.path.join(data, "relay.log"), "w")
        procs.append(subprocess.Popen(
            [sys.executable, "-c", TWISTD, "-n", "--pidfile=", "medagent-relay", "--data", data,
             "--listen", f"tcp:{relay_port}:interface=127.0.0.1", *bot_sandbox_args(),
             *args.relay_arg],
            env=env, stdout=log, stderr=subprocess.STDOUT))
        for _ in range(300):
            try:
                http("GET", base + "/healthz")
                break
            except OSError:
                time.sleep(0.1)
        token = http("POST", base + "/oauth2/token", form={
            "grant_type": "client_credentials", "client_id": admin["clientId"],
            "client_secret": admin["clientSecret"]})["access_token"]
        bot = http("POST", base + "/fhir/R4/Bot", token, {"resourceType": "Bot", "name": "ack",
                                                          "code": BOT})
        channels = []
        for name, port, query in (("orig", orig_port, ""), ("enh", enh_port, "?enhanced=true")):
            ep = http("POST", base + "/fhir/R4/Endpoint", token, {
                "resourceType": "Endpoint", "status": "active",
                "address": f"mllp://127.0.0.1:{port}{query}"})
            channels.append({"name": name, "endpoint": {"reference": f"Endpoint/{ep['id']}"},
                             "targetReference": {"reference": f"Bot/{bot['id']}"}})
        agent = http("POST", base + "/fhir/R4/Agent", token, {
            "resourceType": "Agent", "name": "bench", "status": "active", "channel": channels})
        creds = client("agent", [agent["id"]])
        alog = open(os.path.join(data, "agent.log"), "w")
        profile = ([f"--profile={os.path.abspath(args.profile_agent)}", "--profiler=cprofile",
                    "--savestats"] if args.profile_agent else [])
        procs.append(subprocess.Popen(
            [sys.executable, "-c", TWISTD, "-n", "--pidfile=", *profile, "medagent-agent",
             "--relay", base,
             "--client-id", creds["clientId"], "--client-secret", creds["clientSecret"],
             "--agent-id", agent["id"], "--data", os.path.join(data, "agent")],
            env=env, stdout=alog, stderr=subprocess.STDOUT))
        procs.append(subprocess.Popen([sys.executable, "-c", FLOOR, str(floor_port)], env=env))
        wait_listening(enh_port)
        wait_listening(floor_port)
        run_mode(orig_port, 20, False)  # warm-up: bot workers, connections
        run_mode(floor_port, 200, False)
        print("measuring original mode", file=sys.stderr)
        original = run_mode(orig_port, args.n, False)
        print("measuring enhanced mode", file=sys.stderr)
        floor = run_mode(floor_port, args.n, False)
        enhanced = run_mode(enh_port, args.n, True, first_id=10**6)
        k = args.connections
        print(f"measuring enhanced mode, {k} connections", file=sys.stderr)
        floor_k = run_parallel(floor_port, args.n // k, k, False, 0)
        enhanced_k = run_parallel(enh_port, args.n // k, k, True, 2 * 10**6)
        result = {
            "n": args.n,
            "code": os.path.abspath(args.code),
            "relay_args": args.relay_arg,
            "original_msgs_per_s": original["msgs_per_s"],
            "enhanced_msgs_per_s": enhanced["msgs_per_s"],
            "floor_msgs_per_s": floor["msgs_per_s"],
            "enhanced_all_app_acks_msgs_per_s": enhanced["all_acks_msgs_per_s"],
            "connections": k,
            f"enhanced_{k}_conn_msgs_per_s": enhanced_k["msgs_per_s"],
            f"floor_{k}_conn_msgs_per_s": floor_k["msgs_per_s"],
            "enhanced_over_floor": round(enhanced["msgs_per_s"] / floor["msgs_per_s"], 2),
            "original_acks": original["acks"],
            "enhanced_acks": enhanced["acks"],
            f"enhanced_{k}_conn_acks": enhanced_k["acks"],
            "medplum_docs_original": "3-4",
            "medplum_docs_enhanced": "300-400",
        }
        print(json.dumps(result))
    finally:
        for p in reversed(procs):  # the agent first: its profile is written on a clean stop
            p.terminate()
        for p in procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()


if __name__ == "__main__":
    main()
