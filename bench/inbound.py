"""
Inbound HL7 messages/s: device → agent channel → relay → trivial Bot (builds the ACK) → back.

Starts a real relay and agent (twistd) with two MLLP channels, original and enhanced mode,
and sends N messages over one MLLP connection to each, the way a device does: one message
at a time, the next after the previous one's (first) ACK.

- original: the ACK the device waits for is the Bot's ``AA`` (a full cloud round trip);
- enhanced: the device waits for the ``CA`` the agent sends once the message is on its disk;
  the Bot's ``AA`` follows asynchronously.  We also time until every AA has arrived.

Medplum's docs quote 3-4 msg/s original and 300-400 msg/s enhanced.  Targets (issue 6):
>= 100 msg/s original, >= 2000 msg/s enhanced.  Last line: one JSON object.

    python bench/inbound.py [--n 1000] [--code CHECKOUT] [--relay-arg=--inbound-log=off]

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
import time
import urllib.parse
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from tests.procs import TWISTD, bot_sandbox_args, free_port  # noqa: E402

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


def run_mode(port: int, n: int, enhanced: bool) -> dict:
    sock = socket.create_connection(("127.0.0.1", port), timeout=60)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    reader = Reader(sock)
    codes: dict[str, int] = {}
    start = time.perf_counter()
    for i in range(n):
        sock.sendall(message(i))
        while True:
            code = reader.frame().split(b"MSA|", 1)[1][:2].decode()
            codes[code] = codes.get(code, 0) + 1
            if code in ("CA", "AA", "AE", "AR", "CE", "CR") and (not enhanced or code != "AA"):
                break
    first = time.perf_counter() - start
    if enhanced:
        while codes.get("AA", 0) < n:
            code = reader.frame().split(b"MSA|", 1)[1][:2].decode()
            codes[code] = codes.get(code, 0) + 1
    total = time.perf_counter() - start
    sock.close()
    return {"msgs_per_s": round(n / first, 1), "all_acks_msgs_per_s": round(n / total, 1),
            "acks": codes}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--code", default=ROOT, help="checkout whose relay and agent run")
    parser.add_argument("--relay-arg", action="append", default=[],
                        help="an option for the relay (repeatable)")
    args = parser.parse_args()
    data = tempfile.mkdtemp(prefix="bench-inbound-")
    relay_port, orig_port, enh_port = free_port(), free_port(), free_port()
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
        procs.append(subprocess.Popen(
            [sys.executable, "-c", TWISTD, "-n", "--pidfile=", "medagent-agent", "--relay", base,
             "--client-id", creds["clientId"], "--client-secret", creds["clientSecret"],
             "--agent-id", agent["id"], "--data", os.path.join(data, "agent")],
            env=env, stdout=alog, stderr=subprocess.STDOUT))
        for _ in range(300):
            try:
                socket.create_connection(("127.0.0.1", enh_port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.1)
        run_mode(orig_port, 20, False)  # warm-up: bot workers, connections
        print("measuring original mode", file=sys.stderr)
        original = run_mode(orig_port, args.n, False)
        print("measuring enhanced mode", file=sys.stderr)
        enhanced = run_mode(enh_port, args.n, True)
        result = {
            "n": args.n,
            "code": os.path.abspath(args.code),
            "relay_args": args.relay_arg,
            "original_msgs_per_s": original["msgs_per_s"],
            "enhanced_msgs_per_s": enhanced["msgs_per_s"],
            "enhanced_all_app_acks_msgs_per_s": enhanced["all_acks_msgs_per_s"],
            "original_acks": original["acks"],
            "enhanced_acks": enhanced["acks"],
            "medplum_docs_original": "3-4",
            "medplum_docs_enhanced": "300-400",
        }
        print(json.dumps(result))
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()


if __name__ == "__main__":
    main()
